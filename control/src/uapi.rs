//! The cross-platform WireGuard userspace API: the running instance
//! answers `get=1` and `set=1` on /var/run/wireguard/NAME.sock, so that
//! `wg show`, `wg showconf`, `wg set` and `wg syncconf` work against subway
//! unchanged. A `set` becomes a new configuration that goes through the
//! same live-change path as `subway reload` (see `live.rs`).
//!
//! What a kernel WireGuard device would accept but subway cannot honour
//! live (a new private key or listen port, a fwmark) is refused with
//! EINVAL and logged, never silently ignored. Peers added by `wg set` join
//! the default VNET. Changes made with `wg set` last until the next
//! `subway reload`, which re-reads the file (as with wg-quick).

use crate::config::{Config, Key32, PeerSection};
use crate::local::RequestServer;
use crate::status::PeerStatus;
use ipnet::IpNet;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// The UAPI socket's server (see `local.rs`: it never blocks on a client).
pub struct UapiServer(RequestServer);

/// Longest UAPI request: a `wg syncconf` of thousands of peers fits.
const MAX_REQUEST: usize = 8 << 20;

impl UapiServer {
    pub fn bind(name: &str) -> std::io::Result<Self> {
        let path = PathBuf::from("/var/run/wireguard").join(format!("{name}.sock"));
        // A request ends with a blank line.
        RequestServer::bind(path, "in use by another WireGuard interface", MAX_REQUEST, |b| {
            b.ends_with(b"\n\n")
        })
        .map(UapiServer)
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }

    pub fn pending_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.0.pending_fds()
    }

    pub fn refused(&self) -> crate::local::Refusals {
        self.0.refused
    }

    /// Serves complete requests; `answer` renders the device for a `get`
    /// (ending in `errno=0`) or applies a `set` (answering `errno=N`).
    pub fn serve(&mut self, mut answer: impl FnMut(Request) -> String) {
        self.0.serve(|req| {
            let mut lines = req.lines().map(str::trim);
            let first = lines.next().unwrap_or("");
            let rest: Vec<String> = lines.take_while(|l| !l.is_empty()).map(String::from).collect();
            let reply = match first {
                "get=1" => answer(Request::Get),
                "set=1" => answer(Request::Set(rest)),
                _ => format!("errno={}\n", libc::EINVAL),
            };
            reply + "\n"
        });
    }
}

/// A UAPI request.
pub enum Request {
    Get,
    /// The `key=value` lines after `set=1`.
    Set(Vec<String>),
}

fn unhex(v: &str) -> Option<[u8; 32]> {
    if v.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(v.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// Applies a `set=1` request to a copy of `cfg`: the configuration the
/// instance should run next, or (errno, why) when it cannot be honoured.
/// As in the kernel, an AllowedIP given to one peer leaves any other peer
/// of the same VNET that had it.
pub fn apply_set(cfg: &Config, lines: &[String]) -> Result<Config, (i32, String)> {
    let inval = |m: String| (libc::EINVAL, m);
    let mut new = cfg.clone();
    // Its peers will no longer be what the file's text says.
    new.peer_texts = None;
    let mut cur: Option<usize> = None;
    // A peer section skipped (update_only or remove of an unknown peer):
    // its lines are ignored, as the kernel does.
    let mut skipping = false;
    // Removed peers are dropped at the end, so that indices stay valid.
    let mut remove = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| inval(format!("malformed line {l:?}")))?;
        if skipping && k != "public_key" {
            continue;
        }
        skipping = false;
        match (k, cur) {
            ("private_key", None) => {
                if unhex(v) != new.interface.private_key.map(|k| k.0) {
                    return Err(inval("changing the private key needs a restart (edit the file)".into()));
                }
            }
            ("listen_port", None) => {
                let port: u16 = v.parse().map_err(|_| inval(format!("bad listen_port {v}")))?;
                if Some(port) != new.interface.listen_port {
                    return Err(inval("changing the listen port needs a restart (edit the file)".into()));
                }
            }
            ("fwmark", None) if v == "0" => {}
            ("fwmark", None) => return Err(inval("subway does not set a fwmark".into())),
            ("replace_peers", None) if v == "true" => {
                remove.extend(0..new.peers.len());
            }
            ("public_key", _) => {
                let key = unhex(v).ok_or_else(|| inval(format!("bad public_key {v}")))?;
                cur = Some(match new.peers.iter().position(|p| p.public_key.0 == key) {
                    Some(i) => {
                        remove.retain(|r| *r != i);
                        i
                    }
                    None => {
                        new.peers.push(PeerSection {
                            id: u32::MAX,
                            line: 0,
                            public_key: Key32(key),
                            preshared_key: None,
                            endpoint: None,
                            allowed_ips: Vec::new(),
                            persistent_keepalive: None,
                            vnet: "default".into(),
                            group: None,
                        });
                        new.peers.len() - 1
                    }
                });
            }
            (_, Some(i)) => match k {
                "remove" | "update_only" if v == "true" && new.peers[i].id == u32::MAX => {
                    // Not a running peer: forget it and its lines. It is
                    // the last one pushed (its public_key line came just
                    // before), so indices of the others stay valid.
                    if i + 1 == new.peers.len() {
                        new.peers.pop();
                    } else {
                        remove.push(i);
                    }
                    cur = None;
                    skipping = true;
                }
                "remove" if v == "true" => remove.push(i),
                "update_only" if v == "true" => {}
                "preshared_key" => {
                    let psk = unhex(v).ok_or_else(|| inval(format!("bad preshared_key {v}")))?;
                    new.peers[i].preshared_key = (psk != [0; 32]).then_some(Key32(psk));
                }
                "endpoint" => {
                    let e = v
                        .parse()
                        .map_err(|_| inval(format!("bad endpoint {v}: give IP:port or [IPv6]:port")))?;
                    new.peers[i].endpoint = Some(e);
                }
                "persistent_keepalive_interval" => {
                    let s: u16 = v.parse().map_err(|_| inval(format!("bad keepalive {v}")))?;
                    new.peers[i].persistent_keepalive = (s > 0).then_some(s);
                }
                "replace_allowed_ips" if v == "true" => new.peers[i].allowed_ips.clear(),
                "allowed_ip" => {
                    let net: IpNet = v.parse().map_err(|_| inval(format!("bad allowed_ip {v}")))?;
                    let net = net.trunc();
                    let vnet = new.peers[i].vnet.clone();
                    for (j, p) in new.peers.iter_mut().enumerate() {
                        if j != i && p.vnet == vnet {
                            p.allowed_ips.retain(|(n, _)| *n != net);
                        }
                    }
                    if !new.peers[i].allowed_ips.iter().any(|(n, _)| *n == net) {
                        new.peers[i].allowed_ips.push((net, 0));
                    }
                }
                "protocol_version" if v == "1" => {}
                _ => return Err(inval(format!("unsupported peer key {k}={v}"))),
            },
            _ => return Err(inval(format!("unsupported key {k}={v}"))),
        }
    }
    remove.sort_unstable();
    remove.dedup();
    for i in remove.into_iter().rev() {
        new.peers.remove(i);
    }
    Ok(new)
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
    peers: &[PeerStatus],
    keys: &[[u8; 32]],
    psks: &[Option<[u8; 32]>],
    keepalives: &[Option<u16>],
    now_unix: Duration,
) -> String {
    let mut s = format!("private_key={}\nlisten_port={listen_port}\n", hex(private_key));
    for (i, p) in peers.iter().enumerate() {
        let Some(k) = keys.get(i) else { continue };
        let _ = writeln!(s, "public_key={}", hex(k));
        if let Some(Some(psk)) = psks.get(i) {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        if let Some(e) = &p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
        if let Some(age) = p.latest_handshake_secs_ago {
            let _ = writeln!(
                s,
                "last_handshake_time_sec={}\nlast_handshake_time_nsec=0",
                now_unix.as_secs().saturating_sub(age)
            );
        }
        let _ = writeln!(s, "rx_bytes={}\ntx_bytes={}", p.rx_bytes, p.tx_bytes);
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

    fn cfg() -> Config {
        use base64::Engine;
        let k = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n[Lan]\nInterface = lan0\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 10.2.0.0/24, 10.9.0.0/24\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 10.3.0.0/24\nVNet = red\n",
            k(1),
            k(2),
            k(3)
        );
        // As read from a file: with its [Peer] texts for the next reload.
        let c = Config::parse_with(std::path::Path::new("gw.conf"), text, None).unwrap();
        assert!(c.peer_texts.is_some());
        c
    }

    fn set(c: &Config, lines: &[String]) -> Result<Config, (i32, String)> {
        apply_set(c, lines)
    }

    #[test]
    fn wg_set_adds_changes_moves_and_removes_peers() {
        let c = cfg();
        // `wg set gw peer K4 allowed-ips 10.9.0.0/24,10.4.0.0/24 endpoint ...`:
        // a new peer, and 10.9.0.0/24 moves to it from peer 2.
        let lines: Vec<String> = vec![
            format!("public_key={}", "04".repeat(32)),
            "endpoint=192.0.2.9:51820".into(),
            "replace_allowed_ips=true".into(),
            "allowed_ip=10.9.0.0/24".into(),
            "allowed_ip=10.4.0.0/24".into(),
        ];
        let n = set(&c, &lines).unwrap();
        // Its peers are no longer the file's: the next reload parses all.
        assert!(n.peer_texts.is_none());
        assert_eq!(n.peers.len(), 3);
        let nets = |p: &PeerSection| p.allowed_ips.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(nets(&n.peers[0]), vec!["10.2.0.0/24"]);
        assert_eq!(nets(&n.peers[2]), vec!["10.9.0.0/24", "10.4.0.0/24"]);
        assert_eq!((n.peers[2].id, n.peers[2].vnet.as_str()), (u32::MAX, "default"));
        assert_eq!(n.peers[2].endpoint, Some("192.0.2.9:51820".parse().unwrap()));
        // The red peer keeps its VNET; a prefix it shares with no one stays.
        assert_eq!(
            (n.peers[1].vnet.as_str(), nets(&n.peers[1])),
            ("red", vec!["10.3.0.0/24".to_string()])
        );
        // `wg set gw peer K2 remove`.
        let n = set(&c, &[format!("public_key={}", "02".repeat(32)), "remove=true".into()]).unwrap();
        assert_eq!(n.peers.len(), 1);
        assert_eq!(n.peers[0].public_key.0, [3; 32]);
        // update_only on an unknown peer changes nothing, not even the
        // AllowedIPs its lines name.
        let n = set(
            &c,
            &[
                format!("public_key={}", "05".repeat(32)),
                "update_only=true".into(),
                "replace_allowed_ips=true".into(),
                "allowed_ip=10.2.0.0/24".into(),
            ],
        )
        .unwrap();
        assert_eq!(n.peers, c.peers);
        // Keepalive and preshared key (all zeros: none).
        let n = set(
            &c,
            &[
                format!("public_key={}", "02".repeat(32)),
                "persistent_keepalive_interval=25".into(),
                format!("preshared_key={}", "07".repeat(32)),
            ],
        )
        .unwrap();
        assert_eq!(n.peers[0].persistent_keepalive, Some(25));
        assert_eq!(n.peers[0].preshared_key.map(|k| k.0), Some([7; 32]));
    }

    #[test]
    fn wg_syncconf_replaces_the_peer_set_and_keeps_running_peers() {
        let c = cfg();
        // What `wg syncconf` sends for a file holding peer 2 (new routes)
        // and a new peer 6: peer 3 goes, 2 stays (its id and VNET kept).
        let n = set(
            &c,
            &[
                "replace_peers=true".into(),
                format!("public_key={}", "02".repeat(32)),
                "replace_allowed_ips=true".into(),
                "allowed_ip=10.2.0.0/16".into(),
                format!("public_key={}", "06".repeat(32)),
                "replace_allowed_ips=true".into(),
                "allowed_ip=10.6.0.0/24".into(),
            ],
        )
        .unwrap();
        let keys: Vec<u8> = n.peers.iter().map(|p| p.public_key.0[0]).collect();
        assert_eq!(keys, vec![2, 6]);
        assert_eq!(n.peers[0].id, c.peers[0].id);
        assert_eq!(n.peers[0].allowed_ips.len(), 1);
        assert_eq!(n.peers[0].allowed_ips[0].0.to_string(), "10.2.0.0/16");
        assert_eq!(n.peers[1].id, u32::MAX, "a new peer, id given by the apply");
    }

    #[test]
    fn wg_set_refuses_what_needs_a_restart() {
        let c = cfg();
        let e = set(&c, &["listen_port=1234".into()]).unwrap_err();
        assert_eq!(e.0, libc::EINVAL);
        assert!(e.1.contains("restart"), "{}", e.1);
        assert!(set(&c, &["listen_port=51820".into()]).is_ok());
        assert!(set(&c, &[format!("private_key={}", "09".repeat(32))]).is_err());
        assert!(set(&c, &[format!("private_key={}", "01".repeat(32))]).is_ok());
        assert!(set(&c, &["fwmark=7".into()]).is_err());
        assert!(
            set(&c, &["allowed_ip=10.0.0.0/8".into()]).is_err(),
            "a peer key before any peer"
        );
        assert!(
            set(
                &c,
                &[format!("public_key={}", "02".repeat(32)), "endpoint=nowhere".into()]
            )
            .is_err()
        );
    }

    #[test]
    fn renders_what_wg_show_reads() {
        let peers = [PeerStatus {
            endpoint: Some("192.0.2.2:51820".into()),
            allowed_ips: vec!["10.2.0.0/24".into()],
            latest_handshake_secs_ago: Some(5),
            rx_bytes: 10,
            tx_bytes: 20,
            ..Default::default()
        }];
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
