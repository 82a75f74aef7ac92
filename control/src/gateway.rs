//! The gateway's control thread: the WireGuard device (handshakes,
//! cookies, timers), its UDP sockets on the listen port, the slow-path TUN
//! reader, and the publication of sessions and paths to the workers.
//!
//! The workers carry data messages; everything else reaches this thread:
//! handshake and cookie messages (the XDP program passes them to the
//! kernel, which delivers them to our UDP socket), the packets the kernel
//! routes into the TUN (first packets before a handshake, traffic the fast
//! path could not finish, the gateway's own traffic), and data messages
//! when the fast path is down.

use crate::config::{Config, PeerSection};
use crate::status::PeerStatus;
use anyhow::{Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use subway_dataplane::Dataplane;
use subway_dataplane::stats::{Counter, Counts};
use subway_dataplane::tables::PeerRt;
use subway_dataplane::wg::device::{Device, Outgoing, Received};
use subway_dataplane::wg::peer::PeerConfig;
use subway_dataplane::wg::{Now, WgError};

pub struct Gateway {
    dev: Device,
    udp4: UdpSocket,
    udp6: Option<UdpSocket>,
    /// `SourcePorts`: sockets on the ports after the listen port, for the
    /// handshakes a peer sends to the port it last heard us from (the
    /// workers send data from them; these only receive).
    extra: Vec<UdpSocket>,
    pub listen_port: u16,
    last: Vec<(u64, u64, u64)>,
    /// Per peer: when a datagram last came from its published endpoint
    /// (monotonic; see [`follows_roam`]).
    heard: Vec<std::time::Duration>,
    /// Peers seen at a new source, not followed yet (see [`follows_roam`]).
    roam_pending: Vec<(u32, SocketAddr)>,
    /// Per peer: the send session and outer path the workers were given.
    published: Vec<(Option<u32>, Option<subway_dataplane::tunnel::OuterPath>)>,
    published_gen: u64,
    /// The dataplane's paths epoch `published` was worked out in.
    published_epoch: u64,
    /// Reused per round: the peers the workers marked, the peers looked
    /// at, and last round's marked ones.
    marked: Vec<u32>,
    look: Vec<u32>,
    recent: Vec<u32>,
    /// Control-path outcomes (handshakes, refusals by reason).
    pub events: Events,
    buf: Vec<u8>,
}

impl Gateway {
    /// The device with the configured peers, and its UDP sockets.
    pub fn new(cfg: &Config) -> Result<Gateway> {
        let key = cfg.interface.private_key.context("[Interface] has no PrivateKey")?;
        let mut dev = Device::new(key.0);
        // Test hook: SUBWAY_TEST_REKEY_AFTER_SECS shortens REKEY_AFTER_TIME so
        // that tests see rekeys under traffic; production never sets it.
        if let Some(secs) = std::env::var("SUBWAY_TEST_REKEY_AFTER_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tracing::warn!("REKEY_AFTER_TIME shortened to {secs} s for testing");
            dev.set_rekey_after(std::time::Duration::from_secs(secs));
        }
        let vnets = cfg.vnet_ids();
        for p in &cfg.peers {
            let vnet = vnets.iter().position(|v| *v == p.vnet).unwrap_or(0) as u32;
            let id = dev
                .add_peer(&peer_config(p, vnet))
                .with_context(|| format!("{}:{}: this peer has our own public key", cfg.path.display(), p.line))?;
            debug_assert_eq!(id, p.id);
        }
        let port = cfg.interface.listen_port.unwrap_or(0);
        let udp4 = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("binding UDP port {port}"))?;
        let listen_port = udp4.local_addr()?.port();
        let udp6 = bind_v6_only(listen_port).ok();
        udp4.set_nonblocking(true)?;
        grow_rcvbuf(&udp4);
        if let Some(u) = &udp6 {
            u.set_nonblocking(true)?;
            grow_rcvbuf(u);
        }
        let spread = cfg.tuning.spread();
        let mut extra = Vec::new();
        for port in subway_dataplane::config::tunnel_ports(listen_port, spread).skip(1) {
            let why = || format!("binding UDP port {port} (SourcePorts = {spread} from ListenPort {listen_port})");
            extra.push(UdpSocket::bind(("0.0.0.0", port)).with_context(why)?);
            if udp6.is_some() {
                extra.push(bind_v6_only(port).with_context(why)?);
            }
        }
        for u in &extra {
            u.set_nonblocking(true)?;
            grow_rcvbuf(u);
        }
        Ok(Gateway {
            dev,
            udp4,
            udp6,
            extra,
            listen_port,
            last: vec![(0, 0, 0); cfg.peers.len()],
            heard: vec![std::time::Duration::ZERO; cfg.peers.len()],
            roam_pending: Vec::new(),
            published: Vec::new(),
            published_gen: u64::MAX,
            published_epoch: u64::MAX,
            marked: Vec::new(),
            look: Vec::new(),
            recent: Vec::new(),
            events: Events::default(),
            buf: vec![0u8; 65536],
        })
    }

    /// Peer ids handed out so far (live and removed): the next new peer's id.
    pub fn peer_slots(&self) -> u32 {
        self.dev.peers().len() as u32
    }

    pub fn is_own_key(&self, key: &[u8; 32]) -> bool {
        self.dev.public == *key
    }

    pub fn add_peer(&mut self, p: &PeerSection, vnet: u32) -> Result<()> {
        let id = self
            .dev
            .add_peer(&peer_config(p, vnet))
            .context("a peer with our own public key, or twice the same key")?;
        anyhow::ensure!(id == p.id, "peer id {id} given, {} expected", p.id);
        tracing::info!(peer = id, key = %p.public_key.to_base64(), "peer added");
        Ok(())
    }

    pub fn remove_peer(&mut self, id: u32) {
        if self.dev.remove_peer(id) {
            tracing::info!(peer = id, "peer removed");
        }
    }

    pub fn update_peer(&mut self, p: &PeerSection, vnet: u32) {
        if self.dev.update_peer(p.id, &peer_config(p, vnet)) {
            tracing::info!(peer = p.id, key = %p.public_key.to_base64(), "peer changed");
        }
    }

    /// The uplink was renumbered: new paths for the workers, and a
    /// handshake with every peer so that they roam to the new address.
    pub fn uplink_renumbered(&mut self, dp: &mut Dataplane) {
        self.dev.local_address_changed();
        self.count(Event::UplinkRenumbered);
        self.publish_now(dp);
    }

    /// HA: this box became the active one (handshake every peer now) or
    /// the standby (drop every session, send nothing).
    pub fn set_active(&mut self, active: bool, dp: &mut Dataplane) {
        if self.dev.set_standby(!active, Now::system().mono) {
            self.count(if active {
                Event::BecameActive
            } else {
                Event::BecameStandby
            });
            self.publish_now(dp);
        }
    }

    /// Seals an IP packet the control thread made (a route group's probe)
    /// for `peer` and sends it, or queues it for a handshake.
    pub fn send_packet(&mut self, peer: u32, pkt: &[u8]) {
        self.count(Event::ProbesSent);
        match self.dev.send(peer, pkt, Now::system()) {
            Ok(Some(o)) => self.send(vec![o]),
            Ok(None) => self.count(Event::QueuedForHandshake),
            Err(e) => self.count(e),
        }
    }

    /// Whether `peer` has a session data can be sent on now.
    pub fn has_session(&self, peer: u32) -> bool {
        let now = Now::system().mono;
        self.dev.peer(peer).is_some_and(|p| p.send_session(now).is_some())
    }

    /// Data packets received from `peer` so far (workers and this thread).
    pub fn rx_packets(&self, peer: u32, dp: &Dataplane) -> u64 {
        let t = dp.tables();
        let fast = t
            .peers
            .get(peer as usize)
            .map_or(0, |r| r.stats.rx_packets.load(Ordering::Relaxed));
        fast + self.dev.peer(peer).map_or(0, |p| p.rx_packets)
    }

    /// Publishes the sessions and paths of the peers a live change added,
    /// removed or changed (the dataplane kept the others' as they were):
    /// a change of one peer among 10,000 is not 10,000 peers' work.
    pub fn publish_changed(&mut self, dp: &mut Dataplane) {
        self.publish(dp, Now::system());
    }

    /// Publishes every peer's sessions and paths now.
    pub fn publish_now(&mut self, dp: &mut Dataplane) {
        self.published_gen = u64::MAX;
        self.publish(dp, Now::system());
    }

    pub fn fds(&self) -> Vec<i32> {
        let mut v = vec![self.udp4.as_raw_fd()];
        if let Some(u) = &self.udp6 {
            v.push(u.as_raw_fd());
        }
        v.extend(self.extra.iter().map(|u| u.as_raw_fd()));
        v
    }

    fn count(&mut self, what: impl Into<Outcome>) {
        self.events.add(what.into());
    }

    fn send(&mut self, outs: Vec<Outgoing>) {
        self.send_via(outs.into_iter().map(|o| (0, o)));
    }

    /// Sends each datagram from socket `k` of [`Gateway::fds`]'s order:
    /// a reply from the port its request arrived on (a peer that wrote to
    /// one of the `SourcePorts` hears back from that port, as a stateful
    /// firewall or NAT on its side expects), anything else (k = 0) from
    /// the listen port.
    fn send_via(&mut self, outs: impl IntoIterator<Item = (usize, Outgoing)>) {
        for (k, o) in outs {
            let Some(to) = o.to else {
                self.count(Event::TxNoEndpoint);
                continue;
            };
            let sock = match k.checked_sub(2).and_then(|e| self.extra.get(e)) {
                Some(extra) => Some(extra),
                None if to.is_ipv4() => Some(&self.udp4),
                None => self.udp6.as_ref(),
            };
            match sock.map(|s| s.send_to(&o.datagram, to)) {
                Some(Ok(_)) => self.count(Event::TxDatagrams),
                _ => self.count(Event::TxErrors),
            }
        }
    }

    /// When the device next needs a round without anything arriving
    /// (monotonic time): its earliest timer, or a port move waiting for
    /// the current endpoint to go quiet.
    pub fn next_deadline(&mut self, now: std::time::Duration) -> Option<std::time::Duration> {
        let roam = self
            .roam_pending
            .iter()
            .map(|(id, _)| self.heard.get(*id as usize).copied().unwrap_or_default() + PORT_MOVE_QUIET)
            .min();
        match (self.dev.next_deadline(now), roam) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Follows the peers whose authenticated datagrams came from a new
    /// source ([`follows_roam`]); a port move waits here until the current
    /// endpoint has been quiet long enough, or is forgotten if the peer
    /// came back to it or is gone.
    fn follow_roams(&mut self, now: Now) {
        let mut pending = std::mem::take(&mut self.roam_pending);
        pending.retain(|&(id, to)| {
            let heard = self.heard.get(id as usize).copied().unwrap_or_default();
            let Some(p) = self.dev.peer(id).filter(|p| !p.removed) else {
                return false;
            };
            if p.endpoint == Some(to) {
                return false;
            }
            if !follows_roam(p.endpoint, to, now.mono.saturating_sub(heard)) {
                return true;
            }
            if let Some(p) = self.dev.peer_mut(id) {
                if p.endpoint.is_some_and(|e| e.ip() == to.ip()) {
                    tracing::debug!(peer = id, from = ?p.endpoint, to = %to, "peer moved to another port");
                } else {
                    tracing::info!(peer = id, from = ?p.endpoint, to = %to, "peer roamed");
                }
                p.endpoint = Some(to);
            }
            if let Some(h) = self.heard.get_mut(id as usize) {
                *h = now.mono;
            }
            self.events.add(Event::Roams.into());
            false
        });
        self.roam_pending = pending;
    }

    /// One round: datagrams, TUN packets, traffic notes, timers,
    /// publication. Returns whether the workers moved any peer's traffic
    /// since the last round (the timers then want frequent notes).
    pub fn poll(&mut self, dp: &mut Dataplane) -> bool {
        let now = Now::system();
        let mut moved = false;
        self.read_udp(dp, now);
        self.read_tun(dp, now);
        self.read_punted(dp, now);
        let t = dp.tables();
        if self.last.len() < t.peers.len() {
            self.last.resize(t.peers.len(), (0, 0, 0));
            self.heard.resize(t.peers.len(), std::time::Duration::ZERO);
        }
        // The peers the workers marked, and last round's once more (a
        // worker's last counts may land after another worker's mark was
        // taken): not every peer.
        let mut marked = std::mem::take(&mut self.marked);
        marked.clear();
        dp.drain_traffic_marks(|id| marked.push(id));
        let mut look = std::mem::take(&mut self.look);
        look.clear();
        look.extend_from_slice(&marked);
        look.extend_from_slice(&self.recent);
        look.sort_unstable();
        look.dedup();
        for &id in &look {
            let Some(rt) = t.peers.get(id as usize) else { continue };
            let id = id as usize;
            let cur = (
                rt.stats.tx_packets.load(Ordering::Relaxed),
                rt.stats.rx_packets.load(Ordering::Relaxed),
                rt.stats.rx_keepalives.load(Ordering::Relaxed),
            );
            if rt.stats.at_endpoint.swap(false, Ordering::Relaxed) {
                self.heard[id] = now.mono;
            }
            let roamed = rt.stats.roamed_v4.swap(0, Ordering::Relaxed);
            if let Some(a) = subway_dataplane::tables::PeerStats::unpack_v4(roamed) {
                self.roam_pending.retain(|(p, _)| *p != id as u32);
                self.roam_pending.push((id as u32, SocketAddr::V4(a)));
            }
            let last = self.last[id];
            moved |= cur != last;
            self.dev.note_traffic(
                id as u32,
                cur.0 != last.0,
                cur.1 != last.1,
                cur.1 != last.1 || cur.2 != last.2,
                now,
            );
            self.last[id] = cur;
        }
        self.follow_roams(now);
        // This round's marked ones are looked at again next round.
        std::mem::swap(&mut self.recent, &mut marked);
        self.marked = marked;
        self.look = look;
        let outs = self.dev.tick(now);
        self.send(outs);
        self.publish(dp, now);
        moved
    }

    /// Packets of non-default VNETs for peers without a session (the
    /// default VNET's come through the kernel and the TUN).
    fn read_punted(&mut self, dp: &mut Dataplane, now: Now) {
        let mut outs = Vec::new();
        let (dev, events) = (&mut self.dev, &mut self.events);
        dp.serve_punted(|peer, pkt| {
            events.add(match dev.send(peer, pkt, now) {
                Ok(Some(o)) => {
                    outs.push(o);
                    Event::VnetSentFromControl.into()
                }
                Ok(None) => Event::QueuedForHandshake.into(),
                Err(e) => e.into(),
            });
        });
        self.send(outs);
    }

    fn read_udp(&mut self, dp: &mut Dataplane, now: Now) {
        // Replies go out only after the sessions they create are published:
        // the peer's first data message must find them in the workers' table.
        let mut replies = Vec::new();
        let mut behind = false;
        // The `SourcePorts` sockets share one round's budget: a flood
        // spread over them costs a round no more than one on the listen
        // port.
        let mut extra_left = UDP_PER_ROUND;
        for k in 0..2 + self.extra.len() {
            let limit = if k < 2 { UDP_PER_ROUND } else { extra_left };
            for i in 0..=limit {
                let sock = match k {
                    0 => Some(&self.udp4),
                    1 => self.udp6.as_ref(),
                    k => self.extra.get(k - 2),
                };
                let Some(sock) = sock else { break };
                if i == limit {
                    // More wait than a round takes: behind (for long, that
                    // is under load: cookie replies to initiations
                    // without mac2).
                    behind |= sock.peek_from(&mut self.buf).is_ok();
                    break;
                }
                let (n, src) = match sock.recv_from(&mut self.buf) {
                    Ok(x) => x,
                    Err(_) => break,
                };
                if k >= 2 {
                    extra_left -= 1;
                }
                let src = canonical(src);
                let mut msg = self.buf[..n].to_vec();
                match self.dev.receive(src, &mut msg, now) {
                    Ok(Received::Send(outs)) => {
                        self.count(Event::HandshakeMessagesIn);
                        if outs.first().is_some_and(|o| {
                            o.datagram.first() == Some(&subway_dataplane::wg::messages::TYPE_COOKIE_REPLY)
                        }) {
                            // Under load: a handshake not taken now (the
                            // peer comes back with mac2 after REKEY_TIMEOUT).
                            self.count(WgError::CookieRequired);
                        }
                        replies.extend(outs.into_iter().map(|o| (k, o)));
                    }
                    Ok(Received::CookieStored { .. }) => self.count(Event::CookiesReceived),
                    Ok(Received::Keepalive { .. }) => self.count(Event::KeepalivesInControl),
                    Ok(Received::Data { peer, start, end }) => {
                        // The fast path is down or skipped this one: the
                        // kernel forwards the inner packet (default VNET),
                        // or the control thread does (others).
                        self.count(Event::DataInControl);
                        let vnet = self.dev.peer(peer).map_or(0, |p| p.vnet);
                        let c = dp
                            .slow_path()
                            .hand_off(vnet, &msg[start..end], Counter::SlowNeighUnknown, now.mono);
                        if c != Counter::SlowNeighUnknown {
                            self.count(c);
                        }
                    }
                    Err(e) => self.count(e),
                }
            }
        }
        self.dev.cookies.note_backlog(now.mono, behind);
        if !replies.is_empty() {
            self.publish(dp, now);
            self.send_via(replies);
        }
    }

    fn read_tun(&mut self, dp: &mut Dataplane, now: Now) {
        let t = dp.tables();
        for _ in 0..1024 {
            let n = match dp.slow_path().recv(&mut self.buf) {
                Ok(n) => n,
                Err(_) => break,
            };
            let pkt = self.buf[..n].to_vec();
            let Some(dst) = subway_dataplane::tunnel::parse_inner(&pkt).map(|i| i.dst) else {
                self.count(Event::TunMalformed);
                continue;
            };
            // The TUN carries the default VNET only.
            match t.fib.lookup(0, dst) {
                Some((_, tt)) if tt.is_tunnel() => {
                    match t.fib.peer_for(tt, &pkt).map(|p| self.dev.send(p, &pkt, now)) {
                        None => self.count(Event::TunNoPeer),
                        Some(r) => match r {
                            Ok(Some(o)) => self.send(vec![o]),
                            Ok(None) => self.count(Event::QueuedForHandshake),
                            Err(e) => self.count(e),
                        },
                    }
                }
                _ => self.count(Event::TunNoPeer),
            }
        }
    }

    /// Gives the workers the peers' send sessions and outer paths if any
    /// changed. Looks only at the peers the device changed, unless the
    /// paths may all have (a route, neighbour or address event) or a
    /// publication is forced ([`Gateway::publish_now`]).
    fn publish(&mut self, dp: &mut Dataplane, now: Now) {
        let epoch = dp.paths_epoch();
        let n = self.dev.peers().len();
        let all = epoch != self.published_epoch || self.published_gen == u64::MAX || self.published.len() != n;
        self.published.resize(n, (None, None));
        let mut changed = false;
        let mut want = |id: u32, dev: &Device, published: &mut Vec<_>| {
            let Some(p) = dev.peer(id) else { return };
            let s = p.send_session(now.mono).map(|s| s.local_index);
            let path = p.endpoint.and_then(|e| dp.outer_path(e, self.listen_port));
            if published[id as usize] != (s, path) {
                published[id as usize] = (s, path);
                changed = true;
            }
        };
        if all {
            for id in 0..n as u32 {
                want(id, &self.dev, &mut self.published);
            }
        } else {
            for id in self.dev.changed_peers() {
                want(id, &self.dev, &mut self.published);
            }
        }
        self.published_epoch = epoch;
        let generation = self.dev.generation();
        if !changed && generation == self.published_gen {
            return;
        }
        let sessions: Vec<_> = self.dev.sessions().cloned().collect();
        let send: Vec<_> = self
            .dev
            .peers()
            .iter()
            .map(|p| p.send_session(now.mono).cloned())
            .collect();
        let want = &self.published;
        dp.publish(|t| {
            t.sessions = sessions.iter().map(|s| (s.local_index, Arc::clone(s))).collect();
            for (i, rt) in t.peers.iter_mut().enumerate() {
                *rt = PeerRt {
                    session: send.get(i).cloned().flatten(),
                    path: want.get(i).and_then(|w| w.1),
                    ..rt.clone()
                };
            }
        });
        tracing::debug!(sessions = sessions.len(), "published sessions and paths");
        self.published_gen = generation;
    }

    /// Peers for `subway show`, in the configuration's order.
    /// Each configured peer as `subway show` and `wg show` report it.
    pub fn peers_status(&self, cfg: &Config, dp: &Dataplane) -> Vec<PeerStatus> {
        let now = Now::system();
        let t = dp.tables();
        cfg.peers
            .iter()
            .filter_map(|c| Some((c.id as usize, c, self.dev.peer(c.id).filter(|p| !p.removed)?)))
            .map(|(i, c, p)| {
                let rt = t.peers.get(i);
                let ld = |f: fn(&subway_dataplane::tables::PeerStats) -> &std::sync::atomic::AtomicU64| {
                    rt.map_or(0, |r| f(&r.stats).load(Ordering::Relaxed))
                };
                let session = p.send_session(now.mono);
                PeerStatus {
                    public_key: c.public_key.to_base64(),
                    id: i,
                    vnet: c.vnet.clone(),
                    preshared_key: c.preshared_key.is_some(),
                    persistent_keepalive: c.persistent_keepalive,
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    latest_handshake_secs_ago: p.last_handshake.map(|h| now.mono.saturating_sub(h.mono).as_secs()),
                    session: session.map(|s| s.local_index),
                    session_initiator: session.map(|s| s.initiator),
                    handshakes: p.handshakes,
                    fast_path: rt.is_some_and(|r| r.session.is_some() && r.path.is_some()),
                    rx_packets: ld(|s| &s.rx_packets) + p.rx_packets,
                    rx_bytes: ld(|s| &s.rx_bytes) + p.rx_bytes,
                    tx_packets: ld(|s| &s.tx_packets) + p.tx_packets,
                    tx_bytes: ld(|s| &s.tx_bytes) + p.tx_bytes,
                    priority: c.group.as_ref().map(|g| g.priority),
                    probe: None,
                }
            })
            .collect()
    }
}

fn peer_config(p: &PeerSection, vnet: u32) -> PeerConfig {
    PeerConfig {
        public_key: p.public_key.0,
        preshared_key: p.preshared_key.map(|k| k.0),
        endpoint: p.endpoint,
        allowed_ips: p.allowed_ips.iter().map(|(n, _)| *n).collect(),
        persistent_keepalive: p.persistent_keepalive,
        vnet,
    }
}

/// Datagrams one round reads from each UDP socket at most; a socket
/// still holding more after that is a backlog.
const UDP_PER_ROUND: usize = 256;

/// How long a peer's endpoint must be quiet before it is followed to
/// another port of the same address.
const PORT_MOVE_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the published endpoint `cur` follows a peer whose datagrams
/// (authenticated) now also come from `to`, when `cur` was last heard
/// from `quiet` ago. A new address, or a port far from the current one
/// (a NAT's new mapping), is followed at once (roaming). A port within
/// [`crate::config::MAX_SOURCE_PORTS`] of it on the same address is
/// followed only once the current one has been quiet for
/// [`PORT_MOVE_QUIET`]: a NAT that rebinds the port goes quiet on the old
/// one, while a peer spreading its flows over source ports (subway's
/// `SourcePorts`) keeps every port busy; following each would republish
/// its path every round.
fn follows_roam(cur: Option<SocketAddr>, to: SocketAddr, quiet: std::time::Duration) -> bool {
    match cur {
        Some(c) if c == to => false,
        // Within a `SourcePorts` range of it: maybe a spreading peer.
        Some(c) if c.ip() == to.ip() && c.port().abs_diff(to.port()) < crate::config::MAX_SOURCE_PORTS => {
            quiet >= PORT_MOVE_QUIET
        }
        _ => true,
    }
}

/// A handshake burst (or flood) must queue, not overflow, between polls.
fn grow_rcvbuf(s: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a pointer to a live c_int on our own socket.
    unsafe {
        let p = (&size as *const libc::c_int).cast();
        if libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, p, 4) != 0 {
            libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, p, 4);
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        a => a,
    }
}

fn bind_v6_only(port: u16) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket, configured and bound before use.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            4,
        );
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as u16;
        sa.sin6_port = port.to_be();
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(sock)
    }
}

subway_dataplane::named_counters! {
    /// The control thread's own events, for `subway show` (`control`) and
    /// the metrics.
    #[repr(usize)]
    pub enum Event {
        UplinkRenumbered = "uplink_renumbered",
        /// Route groups' probes sent.
        ProbesSent = "probes_sent",
        /// HA: this box became the active one.
        BecameActive = "ha_became_active",
        /// HA: this box became the standby.
        BecameStandby = "ha_became_standby",
        /// Datagrams for a peer without a known endpoint.
        TxNoEndpoint = "tx_no_endpoint",
        TxDatagrams = "tx_datagrams",
        TxErrors = "tx_errors",
        Roams = "roams",
        /// A non-default VNET's packet sealed and sent by the control thread.
        VnetSentFromControl = "vnet_sent_from_control",
        QueuedForHandshake = "queued_for_handshake",
        HandshakeMessagesIn = "handshake_messages_in",
        CookiesReceived = "cookies_received",
        KeepalivesInControl = "keepalives_in_control",
        /// Data messages opened by the control thread (before the workers
        /// have the session).
        DataInControl = "data_in_control",
        TunMalformed = "tun_malformed",
        TunNoPeer = "tun_no_peer",
    }
}

/// One thing the control thread counts: its own events, WireGuard's
/// refusals, and the fast-path outcome of a packet it handed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Own(Event),
    Wg(WgError),
    Data(Counter),
}

impl From<Event> for Outcome {
    fn from(e: Event) -> Self {
        Outcome::Own(e)
    }
}
impl From<WgError> for Outcome {
    fn from(e: WgError) -> Self {
        Outcome::Wg(e)
    }
}
impl From<Counter> for Outcome {
    fn from(c: Counter) -> Self {
        Outcome::Data(c)
    }
}

/// The control thread's counts, each set indexed by its enum.
#[derive(Clone, Debug, Default)]
pub struct Events {
    own: Counts<Event>,
    wg: Counts<WgError>,
    data: Counts<Counter>,
}

impl Events {
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Own(e) => self.own.inc(e),
            Outcome::Wg(e) => self.wg.inc(e),
            Outcome::Data(c) => self.data.inc(c),
        }
    }

    /// The counts above zero, by name.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let all = self.own.named().chain(self.wg.named()).chain(self.data.named());
        all.filter(|(_, v)| *v > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_new_address_is_followed_at_once_a_new_port_only_once_the_old_one_is_quiet() {
        let cur: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let other_port: SocketAddr = "192.0.2.2:51821".parse().unwrap();
        let other_addr: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        assert!(!follows_roam(Some(cur), cur, Duration::from_secs(9)));
        assert!(follows_roam(Some(cur), other_addr, Duration::ZERO));
        assert!(follows_roam(None, other_port, Duration::ZERO));
        // A peer spreading its source ports: the endpoint is still busy.
        assert!(!follows_roam(Some(cur), other_port, Duration::from_millis(200)));
        // A NAT that rebound the port: the old one went quiet.
        assert!(follows_roam(Some(cur), other_port, PORT_MOVE_QUIET));
        // A port far from the current one is no SourcePorts neighbour: a
        // NAT's new mapping, followed at once.
        let far_port: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        assert!(follows_roam(Some(cur), far_port, Duration::ZERO));
    }
}
