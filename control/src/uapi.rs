//! The cross-platform WireGuard userspace API, read side: the running
//! instance answers `get=1` on /var/run/wireguard/NAME.sock, so that
//! `wg show NAME` and `wg showconf NAME` work against subway unchanged.
//! `set=1` is refused (errno EOPNOTSUPP) until live changes land.

use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

pub struct UapiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl UapiServer {
    pub fn bind(name: &str) -> std::io::Result<Self> {
        let path = PathBuf::from("/var/run/wireguard").join(format!("{name}.sock"));
        let listener = crate::ctl::bind_unix(&path, "in use by another WireGuard interface")?;
        Ok(UapiServer { listener, path })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// Serves pending requests; `state` renders the device as `get` wants it.
    pub fn serve(&self, state: impl Fn() -> String) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let mut r = BufReader::new(&stream);
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            // Consume the rest of the request, up to the blank line.
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line.trim() != "" {
                line.clear();
            }
            let reply = match first.trim() {
                "get=1" => state() + "errno=0\n\n",
                _ => "errno=95\n\n".to_string(),
            };
            let mut w = &stream;
            let _ = w.write_all(reply.as_bytes());
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// The `get=1` body from the device's keys and `subway show`'s peers.
pub fn render(
    private_key: &[u8; 32],
    listen_port: u16,
    peers: &Value,
    keys: &[[u8; 32]],
    psks: &[Option<[u8; 32]>],
    keepalives: &[Option<u16>],
    now_unix: Duration,
) -> String {
    let mut s = format!("private_key={}\nlisten_port={listen_port}\n", hex(private_key));
    for (i, p) in peers.as_array().into_iter().flatten().enumerate() {
        let Some(k) = keys.get(i) else { continue };
        let _ = writeln!(s, "public_key={}", hex(k));
        if let Some(Some(psk)) = psks.get(i) {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        if let Some(e) = p["endpoint"].as_str() {
            let _ = writeln!(s, "endpoint={e}");
        }
        for a in p["allowed_ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
        {
            let _ = writeln!(s, "allowed_ip={a}");
        }
        if let Some(age) = p["latest_handshake_secs_ago"].as_u64() {
            let _ = writeln!(
                s,
                "last_handshake_time_sec={}\nlast_handshake_time_nsec=0",
                now_unix.as_secs().saturating_sub(age)
            );
        }
        let _ = writeln!(
            s,
            "rx_bytes={}\ntx_bytes={}",
            p["rx_bytes"].as_u64().unwrap_or(0),
            p["tx_bytes"].as_u64().unwrap_or(0)
        );
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            keepalives.get(i).copied().flatten().unwrap_or(0)
        );
        s.push_str("protocol_version=1\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_what_wg_show_reads() {
        let peers = json!([{"endpoint": "192.0.2.2:51820", "allowed_ips": ["10.2.0.0/24"], "latest_handshake_secs_ago": 5, "rx_bytes": 10, "tx_bytes": 20}]);
        let s = render(
            &[1; 32],
            51820,
            &peers,
            &[[2; 32]],
            &[None],
            &[Some(25)],
            Duration::from_secs(1000),
        );
        assert_eq!(
            s,
            format!(
                "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint=192.0.2.2:51820\nallowed_ip=10.2.0.0/24\n\
                 last_handshake_time_sec=995\nlast_handshake_time_nsec=0\nrx_bytes=10\ntx_bytes=20\n\
                 persistent_keepalive_interval=25\nprotocol_version=1\n",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
    }
}
