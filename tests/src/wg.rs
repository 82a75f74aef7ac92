//! Standard WireGuard: key pairs from `wg`, and [`WgPeer`], a wireguard-go
//! or boringtun peer in a namespace to test subway against.

use crate::{Netns, Proc, host, unique, which, work_dir};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A WireGuard key pair from `wg genkey` / `wg pubkey` (base64).
pub fn wg_keypair() -> Result<(String, String)> {
    let private = host(&["wg", "genkey"])?.trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running wg pubkey (wireguard-tools)")?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((private, String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// A standard WireGuard peer run in a namespace: wireguard-go (Debian's)
/// or boringtun-cli, on a TUN, configured with `wg` like any wg-quick box.
pub struct WgPeer {
    pub ifname: String,
    pub proc: Proc,
}

impl WgPeer {
    /// Starts `impl_` ("wireguard-go" or "boringtun-cli") in `ns` and
    /// configures it: our key, listen port, one peer, routes to its
    /// allowed IPs through the tunnel interface.
    pub fn start(
        impl_: &str,
        ns: &Netns,
        private_key: &str,
        listen_port: u16,
        peer_public: &str,
        peer_endpoint: &str,
        allowed: &[&str],
    ) -> Result<WgPeer> {
        // /var/run/wireguard/NAME.sock is shared by every namespace: unique names.
        let ifname = unique("wg");
        let log = work_dir().join(format!("{ifname}.log"));
        let bin = which(impl_)?;
        let args: Vec<&str> = match impl_ {
            "boringtun-cli" => vec![&bin, "--foreground", "--disable-drop-privileges", &ifname],
            _ => vec![&bin, "-f", &ifname],
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .args(&args)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("WG_SUDO", "true");
        let f = std::fs::File::create(&log)?;
        let child = c
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {impl_}"))?;
        let mut proc = Proc {
            child: Some(child),
            log,
        };
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let t0 = Instant::now();
        while !sock.exists() {
            if !proc.alive() {
                bail!("{impl_} exited:\n{}", proc.log_text());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{impl_} did not create {}:\n{}", sock.display(), proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let key_file = work_dir().join(format!("{ifname}.key"));
        std::fs::write(&key_file, private_key)?;
        let allowed_csv = allowed.join(",");
        ns.run(&[
            "wg",
            "set",
            &ifname,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            &listen_port.to_string(),
            "peer",
            peer_public,
            "endpoint",
            peer_endpoint,
            "allowed-ips",
            &allowed_csv,
        ])?;
        ns.run(&["ip", "link", "set", &ifname, "up"])?;
        for a in allowed {
            let fam = if a.contains(':') { "-6" } else { "-4" };
            ns.run(&["ip", fam, "route", "replace", a, "dev", &ifname])?;
        }
        Ok(WgPeer { ifname, proc })
    }
}
