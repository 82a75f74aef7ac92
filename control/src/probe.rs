//! Route groups' health, in band: every member of a route group (peers
//! sharing a prefix, `Priority` + `Probe` in their [Peer] sections) is
//! sent an ICMP echo through its own tunnel every `ProbeInterval`, from
//! the gateway's own LAN address; the answer comes back through the
//! tunnel, the workers hand it to the kernel (a local address) and a raw
//! ICMP socket here sees it. Data received from the peer is a sign of
//! life too. Nothing heard from a peer for `ProbeMisses` intervals and it
//! is down: the FIB is rebuilt without it ([`Dataplane::set_peers_up`])
//! and its prefixes move to the next peer of the group. `ProbeMisses`
//! answers in a row and it is up again.
//!
//! The probes also keep a session up with every member, so a failover
//! costs no handshake.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};
use subway_dataplane::Dataplane;
use subway_dataplane::fib::Target;
use subway_dataplane::wire::icmp;

/// A member is not declared down before its first handshake had a chance.
const START_GRACE: Duration = Duration::from_secs(1);

struct Member {
    peer: u32,
    target: IpAddr,
    /// The gateway's own address the probe comes from (its family's first
    /// in the default VNET), found once the dataplane runs.
    src: Option<IpAddr>,
    interval: Duration,
    limit: u32,
    seq: u16,
    outstanding: Option<(u16, Instant)>,
    next_at: Instant,
    misses: u32,
    answers: u32,
    up: bool,
    last_reply: Option<Instant>,
    rtt: Option<Duration>,
    changes: u64,
    /// Data packets received from the peer when last looked at.
    last_rx: u64,
    /// The last answer, or data from the peer (or the start, plus a grace
    /// for the first handshake).
    last_heard: Instant,
    why: String,
}

/// `subway show`'s view of one member's health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub target: String,
    pub up: bool,
    pub misses: u32,
    pub interval_ms: u64,
    pub rtt_ms: Option<f64>,
    pub last_answer_ms_ago: Option<u64>,
    /// Changes between up and down since start.
    pub changes: u64,
    pub why: String,
}

pub struct Probes {
    members: Vec<Member>,
    raw4: Option<OwnedFd>,
    raw6: Option<OwnedFd>,
    ident: u16,
}

fn raw_icmp(family: libc::c_int, proto: libc::c_int) -> Option<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        tracing::warn!(
            "route groups: no raw ICMP socket ({}): probes cannot be answered",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: fd is a new, valid socket nobody else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Probes {
    /// The route groups' members of `cfg`; None when there is none.
    pub fn new(cfg: &Config) -> Option<Probes> {
        let now = Instant::now();
        let members: Vec<Member> = cfg
            .peers
            .iter()
            .filter_map(|p| {
                let g = p.group.as_ref()?;
                let (target, _) = g.probe?;
                Some(Member {
                    peer: p.id,
                    target,
                    src: None,
                    interval: g.probe_interval,
                    limit: g.probe_misses,
                    seq: 0,
                    outstanding: None,
                    next_at: now,
                    misses: 0,
                    answers: 0,
                    up: true,
                    last_reply: None,
                    rtt: None,
                    changes: 0,
                    last_rx: 0,
                    last_heard: now + START_GRACE,
                    why: "not probed yet".into(),
                })
            })
            .collect();
        if members.is_empty() {
            return None;
        }
        let v4 = members.iter().any(|m| m.target.is_ipv4());
        let v6 = members.iter().any(|m| m.target.is_ipv6());
        Some(Probes {
            members,
            raw4: v4.then(|| raw_icmp(libc::AF_INET, libc::IPPROTO_ICMP)).flatten(),
            raw6: v6.then(|| raw_icmp(libc::AF_INET6, libc::IPPROTO_ICMPV6)).flatten(),
            ident: (std::process::id() as u16) ^ 0x5377,
        })
    }

    pub fn fds(&self) -> Vec<RawFd> {
        [&self.raw4, &self.raw6]
            .into_iter()
            .flatten()
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// When the next probe, miss or verdict is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.members
            .iter()
            .map(|m| {
                let mut t = m
                    .outstanding
                    .map_or(m.next_at, |(_, at)| (at + m.interval).min(m.next_at));
                if m.up {
                    t = t.min(m.last_heard + m.interval * m.limit);
                }
                t
            })
            .min()
    }

    /// Each member's health, for the FIB.
    pub fn states(&self) -> Vec<(u32, bool)> {
        self.members.iter().map(|m| (m.peer, m.up)).collect()
    }

    pub fn status(&self, peer: u32) -> Option<ProbeStatus> {
        let m = self.members.iter().find(|m| m.peer == peer)?;
        Some(ProbeStatus {
            target: m.target.to_string(),
            up: m.up,
            misses: m.misses,
            interval_ms: m.interval.as_millis() as u64,
            rtt_ms: m.rtt.map(|d| d.as_secs_f64() * 1e3),
            last_answer_ms_ago: m.last_reply.map(|t| t.elapsed().as_millis() as u64),
            changes: m.changes,
            why: m.why.clone(),
        })
    }

    /// Counts what went unanswered and returns the probes due, as (peer,
    /// IP packet) to seal and send; `rx(peer)` is the data packets
    /// received from a peer so far. The flag: a member went up or down.
    pub fn tick(&mut self, dp: &Dataplane, now: Instant, rx: impl Fn(u32) -> u64) -> (Vec<(u32, Vec<u8>)>, bool) {
        let mut changed = false;
        let mut out = Vec::new();
        for m in &mut self.members {
            if m.src.is_none() {
                m.src = own_address(dp, m.target);
            }
            let seen = rx(m.peer);
            if seen > m.last_rx {
                // Authenticated data from the peer: alive.
                m.last_rx = seen;
                m.last_heard = m.last_heard.max(now);
            }
            if let Some((_, at)) = m.outstanding
                && now >= at + m.interval
            {
                m.outstanding = None;
                m.misses += 1;
                m.answers = 0;
            }
            // Down once nothing was heard for ProbeMisses intervals: at
            // most that long after the peer's last sign of life.
            if m.up && now >= m.last_heard + m.interval * m.limit {
                changed |= m.down();
            }
            if now >= m.next_at {
                m.next_at = now + m.interval;
                m.seq = m.seq.wrapping_add(1);
                match m
                    .src
                    .and_then(|src| icmp::echo_request(src, m.target, self.ident, m.seq))
                {
                    Some(pkt) => {
                        m.outstanding = Some((m.seq, now));
                        out.push((m.peer, pkt));
                    }
                    None => m.why = "no address of the gateway's own to probe from in the default VNET".into(),
                }
            }
        }
        (out, changed)
    }

    /// Reads the answers that arrived. Returns whether a member came up.
    pub fn receive(&mut self) -> bool {
        let mut changed = false;
        let mut buf = [0u8; 1500];
        for v6 in [false, true] {
            let Some(fd) = (if v6 { &self.raw6 } else { &self.raw4 }) else {
                continue;
            };
            for _ in 0..256 {
                let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                // SAFETY: recvfrom into a buffer and sockaddr of ours, sizes given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_storage).cast(),
                        &mut len,
                    )
                };
                if n <= 0 {
                    break;
                }
                let pkt = &buf[..n as usize];
                // IPv4 raw sockets hand over the IP header; IPv6 ones do not.
                let (src, msg) = if v6 {
                    // SAFETY: an AF_INET6 socket fills a sockaddr_in6.
                    let sa = unsafe { &*(&from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                    (IpAddr::from(sa.sin6_addr.s6_addr), pkt)
                } else {
                    let Ok(ip) = subway_dataplane::wire::ipv4::Ipv4Packet::new_checked(pkt) else {
                        continue;
                    };
                    let hl = ((pkt[0] & 0x0f) as usize) * 4;
                    (IpAddr::V4(ip.src()), &pkt[hl.min(pkt.len())..])
                };
                let Ok(m) = icmp::IcmpPacket::new_checked(msg) else {
                    continue;
                };
                let reply = if v6 { icmp::v6::ECHO_REPLY } else { icmp::v4::ECHO_REPLY };
                if m.msg_type() != reply || m.echo_ident() != self.ident {
                    continue;
                }
                let seq = m.echo_seq();
                if let Some(member) = self.members.iter_mut().find(|x| x.target == src) {
                    let sent = member.outstanding.filter(|(s, _)| *s == seq).map(|(_, at)| at);
                    if sent.is_some() {
                        member.outstanding = None;
                    }
                    changed |= member.answered(sent);
                }
            }
        }
        changed
    }
}

impl Member {
    fn down(&mut self) -> bool {
        self.up = false;
        self.changes += 1;
        self.why = format!(
            "nothing heard for {} ms ({} probes to {} unanswered)",
            (self.interval * self.limit).as_millis(),
            self.misses,
            self.target
        );
        tracing::warn!(
            peer = self.peer,
            "route group: peer down ({}): its prefixes move",
            self.why
        );
        true
    }

    /// An answer (`sent`: when its probe left, for the round trip), or
    /// data from the peer.
    fn answered(&mut self, sent: Option<Instant>) -> bool {
        let now = Instant::now();
        self.misses = 0;
        self.answers += 1;
        self.last_reply = Some(now);
        self.last_heard = self.last_heard.max(now);
        if let Some(at) = sent {
            self.rtt = Some(now - at);
        }
        if !self.up && self.answers >= self.limit {
            self.up = true;
            self.changes += 1;
            self.why = format!("answering probes to {} again", self.target);
            tracing::warn!(
                peer = self.peer,
                "route group: peer up ({}): its prefixes come back",
                self.why
            );
            return true;
        }
        if self.up {
            self.why = format!("answering probes to {}", self.target);
        }
        false
    }
}

/// The gateway's own address in the default VNET of `target`'s family.
fn own_address(dp: &Dataplane, target: IpAddr) -> Option<IpAddr> {
    let t = dp.tables();
    t.fib
        .routes()
        .iter()
        .filter(|r| r.vnet == 0 && r.target == Target::Local && r.prefix.addr().is_ipv4() == target.is_ipv4())
        .map(|r| r.prefix.addr())
        .next()
}
