//! The device: our static key, the peers, and the index table that maps a
//! receiver index to the handshake or session it names. Sans-IO: datagrams
//! in (with their source address and the time), datagrams out.
//!
//! The control thread owns the device. Workers see only the sessions
//! (shared by `Arc`), which [`Device::sessions`] lists for publication.
//!
//! Longer than ~600 lines because of its tests (the code is ~680 lines):
//! the handshake, rekey, roaming and cookie scenarios run two devices
//! against each other here, next to the state machine they check.

use super::cookie::CookieChecker;
use super::crypto::{mac1_key, tai64n};
use super::messages::{self, INITIATION_LEN, Message, RESPONSE_LEN, init, resp};
use super::noise::{self, public_key};
use super::peer::{MAX_QUEUED, Peer, PeerConfig};
use super::schedule::Schedule;
use super::session::Session;
use super::timers::Timers;
use super::{MAX_TIMER_HANDSHAKES, Now, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX, WgError, random_u32};
use crate::fib::AllowedIps;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Which handshake or session an index names.
#[derive(Clone)]
enum IndexEntry {
    Pending { peer: u32 },
    Session { peer: u32, session: Arc<Session> },
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub peer: u32,
    /// Where to send it (the peer's endpoint, or the source of the
    /// message being answered).
    pub to: Option<SocketAddr>,
    pub datagram: Vec<u8>,
}

/// What a received datagram amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Send these (a handshake response, a cookie reply, or, after our
    /// handshake completed, the packets that waited for it or a keepalive).
    Send(Vec<Outgoing>),
    /// A cookie from the peer was stored; the next initiation uses it.
    CookieStored { peer: u32 },
    /// An inner packet from `peer`: bytes `start..end` of the datagram.
    Data { peer: u32, start: usize, end: usize },
    /// An authenticated empty packet.
    Keepalive { peer: u32 },
}

pub struct Device {
    private: Zeroizing<[u8; 32]>,
    pub public: [u8; 32],
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    pub cookies: CookieChecker,
    peers: Vec<Peer>,
    by_key: HashMap<[u8; 32], u32>,
    index: HashMap<u32, IndexEntry>,
    /// REKEY_AFTER_TIME, shortened only by tests (see `set_rekey_after`).
    rekey_after: Duration,
    /// Cryptokey routing over the peers' AllowedIPs (see [`Device::allowed`]).
    allowed: AllowedIps,
    /// A peer changed since `allowed` was built.
    allowed_stale: bool,
    /// The standby of an HA pair ([`Device::set_standby`]).
    standby: bool,
    /// When this box last became active (HA), for [`ACTIVATION_WINDOW`].
    activated: Option<Duration>,
    /// Which peers the next [`Device::tick`] looks at: those touched by a
    /// call since the last one and those whose timer is due.
    sched: Schedule,
    /// The peers the last [`Device::tick`] looked at.
    ticked: Vec<u32>,
    /// Counts changes of the sessions in `index` ([`Device::generation`]).
    sessions_gen: u64,
}

/// After a box becomes active (HA), a peer without a session is asked
/// again every [`ACTIVATION_RETRY`] instead of every REKEY_TIMEOUT, for
/// this long: a lost first initiation, or one the peer refused because
/// this box's clock is behind the other box's (its TAI64N was not newer
/// than the last the peer saw for our key), costs a tenth of a second,
/// not five. Peers accept an initiation every 20 ms at most, so this is
/// well within what they take.
pub const ACTIVATION_WINDOW: Duration = Duration::from_secs(3);
pub const ACTIVATION_RETRY: Duration = Duration::from_millis(100);

/// When a wanted handshake (a peer added, an endpoint changed, a rekey
/// asked for on receive) may start: not while one is under way, at most
/// one initiation per REKEY_TIMEOUT, and only toward a known endpoint.
fn wanted_handshake_at(p: &Peer) -> Option<Duration> {
    if !p.want_handshake || p.pending.is_some() || p.endpoint.is_none() {
        return None;
    }
    Some(p.last_initiation_sent.map_or(Duration::ZERO, |t| t + REKEY_TIMEOUT))
}

/// The source address of an inner IP packet and its length.
fn inner_source(p: &[u8]) -> Option<(IpAddr, usize)> {
    let ip = crate::wire::IpPacket::new_checked(p).ok()?;
    Some((ip.src(), ip.total_len()))
}

/// New handshakes (not retries) one [`Device::tick`] starts at most.
pub const NEW_HANDSHAKES_PER_TICK: usize = 64;

fn jitter() -> Duration {
    Duration::from_millis((random_u32() % (REKEY_TIMEOUT_JITTER_MAX.as_millis() as u32 + 1)) as u64)
}

impl Device {
    pub fn new(private: [u8; 32]) -> Device {
        let public = public_key(&private);
        Device {
            private: Zeroizing::new(private),
            public,
            mac1_key: mac1_key(&public),
            cookie_key: super::crypto::cookie_key(&public),
            cookies: CookieChecker::default(),
            peers: Vec::new(),
            by_key: HashMap::new(),
            index: HashMap::new(),
            rekey_after: super::REKEY_AFTER_TIME,
            allowed: AllowedIps::default(),
            allowed_stale: false,
            standby: false,
            activated: None,
            sched: Schedule::default(),
            ticked: Vec::new(),
            sessions_gen: 0,
        }
    }

    /// HA: the standby shares the active box's private key, so it must
    /// send nothing to the peers (an initiation would make them roam to
    /// it) and hold no session: every key is wiped and every timer
    /// stopped; it drops what it receives. Leaving standby (this box
    /// became the active one) asks every peer with an endpoint for a
    /// handshake at once, retried every [`ACTIVATION_RETRY`] for
    /// [`ACTIVATION_WINDOW`], so that they roam to this box by the
    /// ordinary WireGuard rules. Returns whether anything changed.
    pub fn set_standby(&mut self, standby: bool, now: Duration) -> bool {
        if self.standby == standby {
            return false;
        }
        self.standby = standby;
        self.sched.touch_all(self.peers.len() as u32);
        if standby {
            self.activated = None;
            let mut gone = Vec::new();
            for p in self.peers.iter_mut() {
                gone.extend(p.zero_keys());
                p.want_handshake = false;
                p.timers = Timers::new(p.timers.persistent_interval);
            }
            self.forget(gone);
        } else {
            self.activated = Some(now);
            for p in self.peers.iter_mut().filter(|p| !p.removed && p.endpoint.is_some()) {
                p.want_handshake = true;
                p.last_initiation_sent = None;
                p.timers.handshake_attempts = 0;
            }
        }
        true
    }

    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// Within [`ACTIVATION_WINDOW`] of becoming active, when `p` (without a
    /// session) may be asked again.
    fn activation_retry_at(&self, p: &Peer, now: Duration) -> Option<Duration> {
        let since = self.activated?;
        if now.saturating_sub(since) > ACTIVATION_WINDOW || p.current.is_some() || p.endpoint.is_none() || p.removed {
            return None;
        }
        Some(p.last_initiation_sent.map_or(now, |t| t + ACTIVATION_RETRY))
    }

    /// Shortens REKEY_AFTER_TIME, for tests that must see rekeys under
    /// traffic within seconds. Never shorter than REKEY_TIMEOUT.
    pub fn set_rekey_after(&mut self, d: Duration) {
        self.rekey_after = d.max(REKEY_TIMEOUT);
        self.sched.touch_all(self.peers.len() as u32);
    }

    /// Adds a peer; returns its id: the next one, never reused, so that a
    /// table snapshot a worker still holds can never mistake a new peer for
    /// a removed one. A second peer with the same key is refused.
    ///
    /// A peer with an endpoint is handshaken at the next tick, without
    /// waiting for traffic: after a restart the far side may still hold
    /// its old session and would otherwise send into the void until its
    /// own timers give up on it (REKEY_AFTER_TIME + REKEY_TIMEOUT).
    pub fn add_peer(&mut self, cfg: &PeerConfig) -> Option<u32> {
        if self.by_key.contains_key(&cfg.public_key) || cfg.public_key == self.public {
            return None;
        }
        let id = self.peers.len() as u32;
        let mut peer = Peer::new(id, cfg);
        peer.want_handshake = cfg.endpoint.is_some();
        self.peers.push(peer);
        self.by_key.insert(cfg.public_key, id);
        self.allowed_stale = true;
        self.sched.touch(id);
        Some(id)
    }

    /// Removes a peer: its sessions and handshake end at once (their
    /// indices are forgotten, so its packets are refused from now on).
    pub fn remove_peer(&mut self, id: u32) -> bool {
        let Some(p) = self.peers.get_mut(id as usize).filter(|p| !p.removed) else {
            return false;
        };
        let idx = p.zero_keys();
        self.by_key.remove(&p.public_key);
        let mut gone = Peer::new(
            id,
            &PeerConfig {
                public_key: [0; 32],
                preshared_key: None,
                endpoint: None,
                allowed_ips: Vec::new(),
                persistent_keepalive: None,
                vnet: 0,
            },
        );
        gone.removed = true;
        *p = gone;
        self.forget(idx);
        self.allowed_stale = true;
        self.sched.touch(id);
        true
    }

    /// Applies a changed configuration to a peer in place (same public
    /// key): its sessions stay up, as with `wg set`. A new endpoint is
    /// handshaken at the next tick (the sessions are kept meanwhile).
    pub fn update_peer(&mut self, id: u32, cfg: &PeerConfig) -> bool {
        let Some(p) = self
            .peers
            .get_mut(id as usize)
            .filter(|p| !p.removed && p.public_key == cfg.public_key)
        else {
            return false;
        };
        if cfg.endpoint.is_some() && cfg.endpoint != p.endpoint {
            p.endpoint = cfg.endpoint;
            p.want_handshake = true;
        }
        p.allowed_ips = cfg.allowed_ips.clone();
        p.vnet = cfg.vnet;
        *p.psk = cfg.preshared_key.unwrap_or([0; 32]);
        let interval = cfg
            .persistent_keepalive
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64));
        if p.timers.persistent_interval != interval {
            p.timers.persistent_interval = interval;
            p.timers.persistent_keepalive = None;
        }
        self.allowed_stale = true;
        self.sched.touch(id);
        true
    }

    /// Our own address changed (the uplink was renumbered): every peer
    /// with an endpoint is handshaken at the next tick, so that it roams
    /// to the new address by the ordinary WireGuard rules.
    pub fn local_address_changed(&mut self) {
        for p in self.peers.iter_mut().filter(|p| !p.removed && p.endpoint.is_some()) {
            p.want_handshake = true;
            self.sched.touch(p.id);
        }
    }

    pub fn peer(&self, id: u32) -> Option<&Peer> {
        self.peers.get(id as usize)
    }

    /// A peer to change (it is looked at in the next tick).
    pub fn peer_mut(&mut self, id: u32) -> Option<&mut Peer> {
        let p = self.peers.get_mut(id as usize)?;
        self.sched.touch(id);
        Some(p)
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn peer_by_key(&self, key: &[u8; 32]) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The session a receiver index names (for the workers' table).
    pub fn session(&self, index: u32) -> Option<&Arc<Session>> {
        match self.index.get(&index)? {
            IndexEntry::Session { session, .. } => Some(session),
            IndexEntry::Pending { .. } => None,
        }
    }

    /// Every live session, for publishing to the workers.
    pub fn sessions(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.index.values().filter_map(|e| match e {
            IndexEntry::Session { session, .. } => Some(session),
            IndexEntry::Pending { .. } => None,
        })
    }

    fn new_index(&mut self, entry: IndexEntry) -> u32 {
        loop {
            let i = random_u32();
            if i != 0 && !self.index.contains_key(&i) {
                self.index_insert(i, entry);
                return i;
            }
        }
    }

    fn index_insert(&mut self, i: u32, e: IndexEntry) {
        let session = matches!(e, IndexEntry::Session { .. });
        if matches!(self.index.insert(i, e), Some(IndexEntry::Session { .. })) || session {
            self.sessions_gen += 1;
        }
    }

    fn index_remove(&mut self, i: u32) {
        if matches!(self.index.remove(&i), Some(IndexEntry::Session { .. })) {
            self.sessions_gen += 1;
        }
    }

    fn forget(&mut self, indices: Vec<u32>) {
        for i in indices {
            self.index_remove(i);
        }
    }

    /// Builds a handshake initiation to `peer` (timers and index updated).
    pub fn initiate(&mut self, peer: u32, now: Now) -> Result<Outgoing, WgError> {
        if self.standby {
            return Err(WgError::Standby);
        }
        let pi = peer as usize;
        if pi >= self.peers.len() {
            return Err(WgError::UnknownPeer);
        }
        self.sched.touch(peer);
        if let Some(old) = self.peers[pi].pending.take() {
            self.index_remove(old.local_index);
        }
        let local_index = self.new_index(IndexEntry::Pending { peer });
        let mut out = [0u8; INITIATION_LEN];
        let p = &mut self.peers[pi];
        let pending = noise::create_initiation(
            &self.private,
            &p.public_key,
            &p.psk,
            &p.mac1_key,
            local_index,
            tai64n(now.unix),
            &mut p.cookie,
            now.mono,
            &mut out,
        );
        let pending = match pending {
            Ok(x) => x,
            Err(e) => {
                self.index_remove(local_index);
                return Err(e);
            }
        };
        p.pending = Some(pending);
        p.last_initiation_sent = Some(now.mono);
        p.want_handshake = false;
        p.timers.handshake_initiated(now.mono, jitter());
        p.timers.any_authenticated_packet_traversal(now.mono);
        Ok(Outgoing {
            peer,
            to: p.endpoint,
            datagram: out.to_vec(),
        })
    }

    /// Processes one datagram received from `src`. Data messages are
    /// decrypted in place in `datagram`.
    pub fn receive(&mut self, src: SocketAddr, datagram: &mut [u8], now: Now) -> Result<Received, WgError> {
        if self.standby {
            return Err(WgError::Standby);
        }
        match Message::parse(datagram)? {
            Message::Initiation(m) => {
                let m = *m;
                self.on_initiation(src, &m, now)
            }
            Message::Response(m) => {
                let m = *m;
                self.on_response(src, &m, now)
            }
            Message::CookieReply(m) => {
                let receiver = messages::cookie_receiver(m);
                let Some(IndexEntry::Pending { peer }) = self.index.get(&receiver).cloned() else {
                    return Err(WgError::UnknownIndex);
                };
                self.sched.touch(peer);
                let p = &mut self.peers[peer as usize];
                if p.cookie.consume_reply(m, &p.cookie_key, now.mono) {
                    Ok(Received::CookieStored { peer })
                } else {
                    Err(WgError::DecryptFailed)
                }
            }
            Message::Data { receiver, .. } => self.on_data(src, receiver, datagram, now),
        }
    }

    /// mac1, then (under load) mac2 or a cookie reply, then the source limit.
    fn gate(
        &mut self,
        src: SocketAddr,
        msg: &[u8],
        mac1_off: usize,
        sender: u32,
        now: Now,
    ) -> Result<Option<Received>, WgError> {
        if !noise::mac1_valid(msg, mac1_off, &self.mac1_key) {
            return Err(WgError::BadMac1);
        }
        if self.cookies.under_load(now.mono) {
            let covered = &msg[..mac1_off + 16];
            let mac2 = &msg[mac1_off + 16..mac1_off + 32];
            if !self.cookies.mac2_valid(src, covered, mac2, now.mono) {
                let mut out = vec![0u8; messages::COOKIE_REPLY_LEN];
                let cookie_key = self.cookie_key;
                self.cookies.write_reply(
                    &mut out,
                    sender,
                    &msg[mac1_off..mac1_off + 16],
                    src,
                    &cookie_key,
                    now.mono,
                );
                return Ok(Some(Received::Send(vec![Outgoing {
                    peer: u32::MAX,
                    to: Some(src),
                    datagram: out,
                }])));
            }
            if !self.cookies.allow_source(src.ip(), now.mono) {
                return Err(WgError::RateLimited);
            }
        }
        Ok(None)
    }

    fn on_initiation(&mut self, src: SocketAddr, m: &[u8; INITIATION_LEN], now: Now) -> Result<Received, WgError> {
        if let Some(r) = self.gate(src, m, init::MAC1, messages::initiation_sender(m), now)? {
            return Ok(r);
        }
        let got = noise::consume_initiation(&self.private, m)?;
        let peer = self.peer_by_key(&got.peer_public).ok_or(WgError::UnknownPeer)?;
        if got.timestamp <= self.peers[peer as usize].last_timestamp {
            return Err(WgError::ReplayedInitiation);
        }
        let timestamp = got.timestamp;
        self.sched.touch(peer);
        let local_index = self.new_index(IndexEntry::Pending { peer });
        let mut out = [0u8; RESPONSE_LEN];
        let p = &mut self.peers[peer as usize];
        let keys =
            match noise::create_response(got, &p.psk, &p.mac1_key, local_index, &mut p.cookie, now.mono, &mut out) {
                Ok(k) => k,
                Err(e) => {
                    self.index_remove(local_index);
                    return Err(e);
                }
            };
        p.last_timestamp = timestamp;
        p.endpoint = Some(src);
        let session = Arc::new(Session::new(&keys, peer, now.mono));
        let retired = p.install(session.clone());
        p.last_handshake = Some(now);
        p.handshakes += 1;
        tracing::debug!(peer, from = %src, handshakes = p.handshakes, "handshake: answered the peer's initiation");
        // Our own initiation, if one is in flight, keeps its retransmit timer.
        p.timers.session_derived(now.mono);
        p.timers.any_authenticated_packet_received();
        p.timers.any_authenticated_packet_traversal(now.mono);
        self.index_insert(local_index, IndexEntry::Session { peer, session });
        self.forget(retired);
        Ok(Received::Send(vec![Outgoing {
            peer,
            to: Some(src),
            datagram: out.to_vec(),
        }]))
    }

    fn on_response(&mut self, src: SocketAddr, m: &[u8; RESPONSE_LEN], now: Now) -> Result<Received, WgError> {
        if let Some(r) = self.gate(src, m, resp::MAC1, messages::response_sender(m), now)? {
            return Ok(r);
        }
        let receiver = messages::response_receiver(m);
        let Some(IndexEntry::Pending { peer }) = self.index.get(&receiver).cloned() else {
            return Err(WgError::UnknownIndex);
        };
        let p = &mut self.peers[peer as usize];
        let Some(pending) = p.pending.as_mut().filter(|x| x.local_index == receiver) else {
            return Err(WgError::UnknownIndex);
        };
        // A forged or corrupt response leaves the handshake in flight as it was.
        let keys = noise::consume_response(pending, m)?;
        self.sched.touch(peer);
        p.pending = None;
        let session = Arc::new(Session::new(&keys, peer, now.mono));
        p.endpoint = Some(src);
        let retired = p.install(session.clone());
        p.last_handshake = Some(now);
        p.handshakes += 1;
        tracing::debug!(peer, from = %src, handshakes = p.handshakes, "handshake: the peer answered ours");
        p.timers.handshake_complete();
        p.timers.session_derived(now.mono);
        p.timers.any_authenticated_packet_received();
        p.timers.any_authenticated_packet_traversal(now.mono);
        self.index_insert(receiver, IndexEntry::Session { peer, session });
        self.forget(retired);
        // Send what waited for the handshake, or a keepalive so that the
        // responder can start using the session.
        let queued: Vec<Vec<u8>> = self.peers[peer as usize].queue.drain(..).collect();
        let mut send = Vec::new();
        if queued.is_empty() {
            send.push(self.send(peer, &[], now)?.ok_or(WgError::NoSession)?);
        } else {
            for q in queued {
                if let Some(o) = self.send(peer, &q, now)? {
                    send.push(o);
                }
            }
        }
        Ok(Received::Send(send))
    }

    fn on_data(&mut self, src: SocketAddr, receiver: u32, datagram: &mut [u8], now: Now) -> Result<Received, WgError> {
        let Some(IndexEntry::Session { peer, session }) = self.index.get(&receiver).cloned() else {
            return Err(WgError::UnknownIndex);
        };
        let plain_len = session.open(datagram, now.mono)?.len();
        self.sched.touch(peer);
        let p = &mut self.peers[peer as usize];
        // Authenticated: the peer may have roamed.
        p.endpoint = Some(src);
        if p.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &session)) {
            // The responder's session is confirmed: the handshake is
            // complete, and an initiation of ours still in flight (both
            // sides started one, as both do at start) is not retried.
            p.timers.handshake_complete();
            if let Some(dropped) = p.confirm_next() {
                self.index_remove(dropped);
            }
        }
        let p = &mut self.peers[peer as usize];
        p.timers.any_authenticated_packet_received();
        p.timers.any_authenticated_packet_traversal(now.mono);
        if p.current
            .as_ref()
            .is_some_and(|c| Peer::rekey_due_on_receive(c, now.mono))
        {
            p.want_handshake = true;
        }
        let start = messages::DATA_HEADER_LEN;
        if plain_len == 0 {
            return Ok(Received::Keepalive { peer });
        }
        let plain = &datagram[start..start + plain_len];
        let (src_ip, len) = inner_source(plain).ok_or(WgError::BadLength)?;
        // Cryptokey routing as WireGuard does it: the longest AllowedIPs
        // match for the source, over every peer, must be this peer.
        let vnet = self.peers[peer as usize].vnet;
        if !self.allowed().allows(vnet, src_ip, peer) {
            return Err(WgError::NotAllowed);
        }
        let p = &mut self.peers[peer as usize];
        p.timers.data_received(now.mono);
        p.rx_packets += 1;
        p.rx_bytes += len as u64;
        Ok(Received::Data {
            peer,
            start,
            end: start + len,
        })
    }

    /// The peer of VNET `vnet` whose AllowedIPs hold the longest prefix
    /// matching `ip` (cryptokey routing: [`AllowedIps`]).
    pub fn owner_of(&mut self, ip: IpAddr, vnet: u32) -> Option<u32> {
        self.allowed().owner(vnet, ip)
    }

    /// The AllowedIPs table, rebuilt first if a peer was added, changed
    /// or removed since (control-thread work, never per packet; once
    /// after a whole config's peers, not once per peer).
    fn allowed(&mut self) -> &AllowedIps {
        if self.allowed_stale {
            self.allowed = AllowedIps::new(
                self.peers
                    .iter()
                    .filter(|p| !p.removed)
                    .map(|p| (p.id, p.vnet, &p.allowed_ips[..])),
            );
            self.allowed_stale = false;
        }
        &self.allowed
    }

    /// Encrypts `packet` (empty: a keepalive) for `peer`. Without a usable
    /// session the packet is queued (bounded) and a handshake is wanted:
    /// `Ok(None)`; call [`Device::tick`] to send the initiation.
    pub fn send(&mut self, peer: u32, packet: &[u8], now: Now) -> Result<Option<Outgoing>, WgError> {
        if self.standby {
            return Err(WgError::Standby);
        }
        let p = self.peers.get_mut(peer as usize).ok_or(WgError::UnknownPeer)?;
        self.sched.touch(peer);
        let Some(s) = p.send_session(now.mono).cloned() else {
            if !packet.is_empty() {
                if p.queue.len() >= MAX_QUEUED {
                    p.queue.pop_front();
                }
                p.queue.push_back(packet.to_vec());
            }
            p.want_handshake = true;
            return Ok(None);
        };
        let mut buf = vec![0u8; Session::message_len(packet.len())];
        buf[messages::DATA_HEADER_LEN..messages::DATA_HEADER_LEN + packet.len()].copy_from_slice(packet);
        let counter = s.reserve(1)?;
        let n = s.seal(counter, &mut buf, packet.len())?;
        buf.truncate(n);
        if Peer::rekey_due_on_send(&s, now.mono) {
            p.want_handshake = true;
        }
        if !packet.is_empty() {
            p.timers.data_sent(now.mono);
            p.tx_packets += 1;
            p.tx_bytes += packet.len() as u64;
        }
        p.timers.any_authenticated_packet_sent();
        p.timers.any_authenticated_packet_traversal(now.mono);
        Ok(Some(Outgoing {
            peer,
            to: p.endpoint,
            datagram: buf,
        }))
    }

    /// Traffic the workers carried for `peer` since the last call (the
    /// fast path runs the same timer hooks as [`Device::send`] and
    /// [`Device::receive`], in aggregate).
    pub fn note_traffic(&mut self, peer: u32, sent_data: bool, received_data: bool, received_any: bool, now: Now) {
        let Some(p) = self.peers.get_mut(peer as usize) else {
            return;
        };
        if sent_data || received_any {
            self.sched.touch(peer);
        }
        if sent_data {
            p.timers.data_sent(now.mono);
            p.timers.any_authenticated_packet_sent();
            p.timers.any_authenticated_packet_traversal(now.mono);
            let rekey_after = self.rekey_after;
            if p.current.as_ref().is_some_and(|s| {
                Peer::rekey_due_on_send(s, now.mono) || (s.initiator && s.age(now.mono) >= rekey_after)
            }) {
                p.want_handshake = true;
            }
        }
        if received_data {
            p.timers.data_received(now.mono);
        }
        if received_any {
            p.timers.any_authenticated_packet_received();
            p.timers.any_authenticated_packet_traversal(now.mono);
            if p.current
                .as_ref()
                .is_some_and(|s| Peer::rekey_due_on_receive(s, now.mono))
            {
                p.want_handshake = true;
            }
        }
    }

    /// A counter that changes whenever sessions are added or removed.
    pub fn generation(&self) -> u64 {
        self.sessions_gen
    }

    /// The peers whose sessions or endpoint may have changed since the
    /// last tick began: those it looked at, and those touched since.
    pub fn changed_peers(&self) -> impl Iterator<Item = u32> + '_ {
        self.ticked.iter().chain(self.sched.touched()).copied()
    }

    /// When [`Device::tick`] is next wanted (monotonic time): now if a
    /// peer was touched, else the earliest timer. Independent of the
    /// number of peers.
    pub fn next_deadline(&mut self, now: Duration) -> Option<Duration> {
        if self.standby {
            return None;
        }
        if self.sched.pending() {
            return Some(now);
        }
        self.sched.next()
    }

    /// The earliest time `p` needs a tick without anything happening to
    /// it: its timers, a wanted handshake, an HA activation retry, queued
    /// packets with a session to send them on, and its current session
    /// turning unusable with age (what the workers are given changes).
    fn deadline_of(&self, p: &Peer, now: Duration) -> Option<Duration> {
        if p.removed {
            return None;
        }
        if !p.queue.is_empty() && p.send_session(now).is_some() {
            return Some(now);
        }
        [
            p.timers.next_deadline(),
            wanted_handshake_at(p),
            self.activation_retry_at(p, now),
            p.current
                .as_ref()
                .map(|c| now + super::REJECT_AFTER_TIME.saturating_sub(c.age(now))),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// One round of timers: looks at the peers touched since the last
    /// round and those whose deadline passed, not at every peer.
    pub fn tick(&mut self, now: Now) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let mut new_attempts = 0;
        if self.standby {
            return out;
        }
        let due = self.sched.take_due(now.mono);
        for &id in &due {
            self.tick_peer(id, now, &mut new_attempts, &mut out);
        }
        for &id in &due {
            let at = self.peers.get(id as usize).and_then(|p| self.deadline_of(p, now.mono));
            self.sched.done(id, at);
        }
        tracing::trace!(peers = due.len(), "tick");
        self.ticked = due;
        out
    }

    fn tick_peer(&mut self, id: u32, now: Now, new_attempts: &mut usize, out: &mut Vec<Outgoing>) {
        if id as usize >= self.peers.len() {
            return;
        }
        // A responder's next session the workers saw traffic on becomes current.
        let p = &mut self.peers[id as usize];
        if p.next.as_ref().is_some_and(|n| n.is_confirmed()) {
            p.timers.handshake_complete();
            if let Some(dropped) = p.confirm_next() {
                self.index_remove(dropped);
            }
        }
        // Packets that waited for a handshake we answered go now.
        let p = &mut self.peers[id as usize];
        if !p.queue.is_empty() && p.send_session(now.mono).is_some() {
            let queued: Vec<Vec<u8>> = p.queue.drain(..).collect();
            for q in queued {
                if let Ok(Some(o)) = self.send(id, &q, now) {
                    out.push(o);
                }
            }
        }
        let p = &mut self.peers[id as usize];
        let fired = p.timers.expired(now.mono);
        let mut initiate = false;
        if fired.zero_key_material {
            let idx = p.zero_keys();
            self.forget(idx);
            return;
        }
        let p = &mut self.peers[id as usize];
        if fired.retransmit_handshake {
            if p.timers.handshake_attempts >= MAX_TIMER_HANDSHAKES {
                // Give up; data will start a new attempt.
                if let Some(old) = p.pending.take() {
                    self.index_remove(old.local_index);
                }
                let p = &mut self.peers[id as usize];
                p.timers.send_keepalive = None;
                p.queue.clear();
                if p.timers.zero_key_material.is_none() {
                    p.timers.session_derived(now.mono);
                }
            } else {
                p.timers.handshake_attempts += 1;
                initiate = true;
            }
        }
        let p = &mut self.peers[id as usize];
        if fired.new_handshake {
            p.timers.handshake_attempts = 0;
            initiate = true;
        }
        if wanted_handshake_at(p).is_some_and(|at| at <= now.mono) && *new_attempts < NEW_HANDSHAKES_PER_TICK {
            // A new attempt, not a retry: it gets its full retries.
            // Past the budget it waits for the next round (which is
            // due at once), so that 10,000 peers wanting a handshake
            // at start do not keep this thread from reading their
            // responses for seconds while its socket overflows.
            p.timers.handshake_attempts = 0;
            initiate = true;
            *new_attempts += 1;
        }
        let p = &self.peers[id as usize];
        if self.activation_retry_at(p, now.mono).is_some_and(|at| at <= now.mono) {
            initiate = true;
        }
        let p = &mut self.peers[id as usize];
        if initiate
            && p.endpoint.is_some()
            && let Ok(o) = self.initiate(id, now)
        {
            out.push(o);
        }
        let p = &mut self.peers[id as usize];
        if (fired.send_keepalive || fired.persistent_keepalive)
            && p.send_session(now.mono).is_some()
            && let Ok(Some(o)) = self.send(id, &[], now)
        {
            out.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Device, Device, Now) {
        let mut a = Device::new([0x41; 32]);
        let mut b = Device::new([0x42; 32]);
        let pa = a.public;
        let pb = b.public;
        a.add_peer(&PeerConfig {
            public_key: pb,
            preshared_key: None,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            allowed_ips: vec!["10.2.0.0/24".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 0,
        })
        .unwrap();
        b.add_peer(&PeerConfig {
            public_key: pa,
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.1.0.0/24".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 0,
        })
        .unwrap();
        (
            a,
            b,
            Now {
                mono: Duration::from_secs(1000),
                unix: Duration::from_secs(1_700_000_000),
            },
        )
    }

    #[test]
    fn the_next_deadline_is_now_while_a_handshake_waits_then_the_retransmit_and_none_when_idle() {
        let (mut a, mut b, now) = pair();
        assert!(
            a.next_deadline(now.mono).is_some_and(|d| d <= now.mono),
            "a peer with an endpoint waits for a handshake: due now"
        );
        // A peer just added is looked at once; without an endpoint there
        // is nothing to do after that.
        assert!(b.tick(now).is_empty());
        assert_eq!(
            b.next_deadline(now.mono),
            None,
            "nothing to do: sleep until something arrives"
        );
        let sent = a.tick(now);
        assert_eq!(sent.len(), 1, "the initiation");
        let d = a.next_deadline(now.mono).expect("the retransmit timer");
        assert!(d >= now.mono + REKEY_TIMEOUT && d <= now.mono + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX);
        // Wanted again while the initiation is in flight: not before the
        // retransmit (no busy loop on a handshake that cannot start yet).
        a.local_address_changed();
        assert!(a.tick(now).is_empty(), "no second initiation");
        assert_eq!(a.next_deadline(now.mono), Some(d));
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload.len()];
        crate::wire::ipv4::emit(&mut p, src.into(), dst.into(), 17, 64, payload.len());
        p[20..].copy_from_slice(payload);
        p
    }

    const A: &str = "192.0.2.1:51820";
    const B: &str = "192.0.2.2:51820";

    #[test]
    fn both_sides_initiate_at_start_and_the_loser_does_not_retry() {
        let (mut a, mut b, now) = pair();
        // B knows A's endpoint too, and its initiation is lost (A is not up).
        let cfg = PeerConfig {
            public_key: a.public,
            preshared_key: None,
            endpoint: Some(A.parse().unwrap()),
            allowed_ips: vec!["10.1.0.0/24".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 0,
        };
        b.update_peer(0, &cfg);
        assert_eq!(b.tick(now).len(), 1);
        // A's initiation completes; its keepalive confirms B's session.
        let init = a.tick(now).remove(0).datagram;
        complete(&mut a, &mut b, init, now);
        assert_eq!(b.peer(0).unwrap().handshakes, 1);
        // B's own initiation is not retransmitted REKEY_TIMEOUT later.
        let later = Now {
            mono: now.mono + REKEY_TIMEOUT * 2,
            ..now
        };
        let out = b.tick(later);
        assert!(
            out.iter().all(|o| o.datagram[0] != 1),
            "B retried its initiation: {} datagrams",
            out.len()
        );
    }

    #[test]
    fn a_peer_with_an_endpoint_is_handshaken_without_waiting_for_traffic() {
        let (mut a, mut b, now) = pair();
        let out = a.tick(now);
        assert_eq!(out.len(), 1, "peer_configured: one initiation at the first tick");
        assert_eq!(out[0].datagram[0], 1, "a handshake initiation");
        assert_eq!(out[0].to, Some(B.parse().unwrap()));
        // No endpoint, nothing to send to.
        assert!(b.tick(now).is_empty());
        // An endpoint learned from the config later (reload, wg set) starts one.
        let cfg = PeerConfig {
            public_key: a.public,
            preshared_key: None,
            endpoint: Some(A.parse().unwrap()),
            allowed_ips: vec!["10.1.0.0/24".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 0,
        };
        assert!(b.update_peer(0, &cfg));
        assert_eq!(b.tick(now).len(), 1);
        // The same endpoint again does not.
        assert!(b.update_peer(0, &cfg));
        assert!(!b.peer(0).unwrap().want_handshake);
    }

    /// Runs a handshake a -> b (peer 0 on each side) and returns b's view
    /// of one data packet from a.
    fn handshake_and_send(a: &mut Device, b: &mut Device, pkt: &[u8], now: Now) -> Result<Received, WgError> {
        a.send(0, pkt, now).unwrap();
        let init = a.tick(now);
        let mut m1 = init[0].datagram.clone();
        let Received::Send(resp) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        let mut m2 = resp[0].datagram.clone();
        let Received::Send(data) = a.receive(B.parse().unwrap(), &mut m2, now).unwrap() else {
            panic!()
        };
        let mut d = data[0].datagram.clone();
        b.receive(A.parse().unwrap(), &mut d, now)
    }

    #[test]
    fn cryptokey_routing_compares_allowed_ips_within_one_vnet_only() {
        let (mut a, mut b, now) = pair();
        // Another peer of b, in another VNET, owns a longer prefix holding
        // a's source: a's packets are still a's in its own VNET.
        b.add_peer(&PeerConfig {
            public_key: [0x77; 32],
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.1.0.0/25".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 1,
        })
        .unwrap();
        assert_eq!(b.owner_of("10.1.0.5".parse().unwrap(), 0), Some(0));
        assert_eq!(b.owner_of("10.1.0.5".parse().unwrap(), 1), Some(1));
        let pkt = ipv4([10, 1, 0, 5], [10, 2, 0, 5], b"red");
        assert!(matches!(
            handshake_and_send(&mut a, &mut b, &pkt, now),
            Ok(Received::Data { peer: 0, .. })
        ));
    }

    #[test]
    fn a_removed_peer_loses_its_sessions_and_an_updated_one_keeps_them() {
        let (mut a, mut b, now) = pair();
        let pkt = ipv4([10, 1, 0, 5], [10, 2, 0, 5], b"x");
        assert!(handshake_and_send(&mut a, &mut b, &pkt, now).is_ok());
        let sessions = b.sessions().count();
        assert!(sessions >= 1);
        // Update: new AllowedIPs, same key; the session stays.
        let mut cfg = PeerConfig {
            public_key: a.public,
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
            persistent_keepalive: Some(25),
            vnet: 0,
        };
        assert!(b.update_peer(0, &cfg));
        assert_eq!(b.sessions().count(), sessions);
        assert_eq!(b.peer(0).unwrap().allowed_ips, cfg.allowed_ips);
        cfg.public_key = [9; 32];
        assert!(!b.update_peer(0, &cfg), "another key is another peer");
        // Remove: the sessions and the key go, the id is never reused.
        assert!(b.remove_peer(0));
        assert_eq!(b.sessions().count(), 0);
        assert!(b.peer_by_key(&a.public).is_none());
        assert!(!b.remove_peer(0));
        let again = b
            .add_peer(&PeerConfig {
                public_key: a.public,
                ..cfg.clone()
            })
            .unwrap();
        assert_eq!(again, 1);
        // a's data on the old session is refused now.
        let mut d = a.send(0, &pkt, now).unwrap().unwrap().datagram;
        assert!(b.receive(A.parse().unwrap(), &mut d, now).is_err());
    }

    #[test]
    fn handshake_data_both_ways_and_queueing() {
        let (mut a, mut b, now) = pair();
        let pkt = ipv4([10, 1, 0, 5], [10, 2, 0, 5], b"hello");
        // No session yet: queued, then the tick starts the handshake.
        assert_eq!(a.send(0, &pkt, now).unwrap(), None);
        let init = a.tick(now);
        assert_eq!(init.len(), 1);
        let mut m1 = init[0].datagram.clone();
        let Received::Send(resp) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        let mut m2 = resp[0].datagram.clone();
        let Received::Send(data) = a.receive(B.parse().unwrap(), &mut m2, now).unwrap() else {
            panic!()
        };
        assert_eq!(data.len(), 1, "the queued packet goes out");
        let mut d = data[0].datagram.clone();
        match b.receive(A.parse().unwrap(), &mut d, now).unwrap() {
            Received::Data { peer: 0, start, end } => assert_eq!(&d[start..end], &pkt[..]),
            other => panic!("{other:?}"),
        }
        // b's session is now confirmed: b can answer.
        let back = ipv4([10, 2, 0, 5], [10, 1, 0, 5], b"world");
        let mut r = b.send(0, &back, now).unwrap().unwrap().datagram;
        assert!(matches!(
            a.receive(B.parse().unwrap(), &mut r, now).unwrap(),
            Received::Data { .. }
        ));
        assert_eq!(b.peer(0).unwrap().endpoint, Some(A.parse().unwrap()));
    }

    #[test]
    fn cryptokey_routing_refuses_foreign_sources() {
        let (mut a, mut b, now) = pair();
        a.send(0, &[], now).unwrap();
        let mut m1 = a.tick(now)[0].datagram.clone();
        let Received::Send(r) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        let mut m2 = r[0].datagram.clone();
        a.receive(B.parse().unwrap(), &mut m2, now).unwrap();
        let spoofed = ipv4([10, 9, 9, 9], [10, 2, 0, 5], b"x");
        let mut d = a.send(0, &spoofed, now).unwrap().unwrap().datagram;
        assert_eq!(b.receive(A.parse().unwrap(), &mut d, now), Err(WgError::NotAllowed));
    }

    #[test]
    fn replayed_initiation_and_unknown_index_are_refused() {
        let (mut a, mut b, now) = pair();
        a.send(0, &[], now).unwrap();
        let m1 = a.tick(now)[0].datagram.clone();
        b.receive(A.parse().unwrap(), &mut m1.clone(), now).unwrap();
        assert_eq!(
            b.receive(A.parse().unwrap(), &mut m1.clone(), now),
            Err(WgError::ReplayedInitiation)
        );
        let mut junk = vec![4u8, 0, 0, 0, 1, 2, 3, 4];
        junk.resize(48, 0);
        assert_eq!(
            b.receive(A.parse().unwrap(), &mut junk, now),
            Err(WgError::UnknownIndex)
        );
        let mut bad = m1.clone();
        bad[20] ^= 1;
        assert_eq!(b.receive(A.parse().unwrap(), &mut bad, now), Err(WgError::BadMac1));
    }

    /// Completes a handshake a -> b.
    fn connect(a: &mut Device, b: &mut Device, now: Now) {
        a.send(0, &[], now).unwrap();
        let m1 = a.tick(now).remove(0).datagram;
        complete(a, b, m1, now);
    }

    /// Completes the handshake a's initiation `m1` starts: b responds, a's
    /// keepalive confirms b's session.
    fn complete(a: &mut Device, b: &mut Device, mut m1: Vec<u8>, now: Now) {
        let Received::Send(r) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        let mut m2 = r[0].datagram.clone();
        let Received::Send(k) = a.receive(B.parse().unwrap(), &mut m2, now).unwrap() else {
            panic!()
        };
        let mut k = k[0].datagram.clone();
        assert_eq!(
            b.receive(A.parse().unwrap(), &mut k, now).unwrap(),
            Received::Keepalive { peer: 0 }
        );
    }

    /// An HA pair: `a` and a second box with `a`'s key (the standby),
    /// at another address.
    #[test]
    fn a_standby_sends_and_accepts_nothing_and_takes_over_with_one_handshake() {
        let (mut a, mut b, now) = pair();
        let (mut s, _, _) = pair();
        const S: &str = "192.0.2.3:51820";
        assert!(s.set_standby(true, now.mono));
        assert!(!s.set_standby(true, now.mono), "no change");
        // The active box handshakes; the standby stays silent whatever happens.
        let init = a.tick(now).remove(0).datagram;
        complete(&mut a, &mut b, init, now);
        assert!(s.tick(now).is_empty());
        assert_eq!(s.next_deadline(now.mono), None);
        assert_eq!(
            s.send(0, &ipv4([10, 1, 0, 5], [10, 2, 0, 5], b"x"), now),
            Err(WgError::Standby)
        );
        let mut from_b = b.send(0, &[], now).unwrap().unwrap().datagram;
        assert_eq!(s.receive(B.parse().unwrap(), &mut from_b, now), Err(WgError::Standby));

        // The active box dies; the standby becomes active 100 ms later and
        // asks at once. Its first initiation is lost: asked again 100 ms
        // later, not REKEY_TIMEOUT.
        let t1 = Now {
            mono: now.mono + Duration::from_millis(100),
            unix: now.unix + Duration::from_millis(100),
        };
        assert!(s.set_standby(false, t1.mono));
        assert!(s.next_deadline(t1.mono).is_some_and(|d| d <= t1.mono));
        let lost = s.tick(t1);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].datagram[0], 1, "an initiation");
        let t2 = Now {
            mono: t1.mono + ACTIVATION_RETRY,
            unix: t1.unix + ACTIVATION_RETRY,
        };
        assert_eq!(s.next_deadline(t1.mono), Some(t2.mono));
        let mut m1 = s.tick(t2).remove(0).datagram;
        // The far peer answers it and roams to the new box.
        let Received::Send(r) = b.receive(S.parse().unwrap(), &mut m1, t2).unwrap() else {
            panic!()
        };
        assert_eq!(b.peer(0).unwrap().endpoint, Some(S.parse().unwrap()));
        let mut m2 = r[0].datagram.clone();
        let Received::Send(k) = s.receive(B.parse().unwrap(), &mut m2, t2).unwrap() else {
            panic!()
        };
        let mut k = k[0].datagram.clone();
        assert_eq!(
            b.receive(S.parse().unwrap(), &mut k, t2).unwrap(),
            Received::Keepalive { peer: 0 }
        );
        // Done: no more activation retries.
        assert!(
            s.tick(Now {
                mono: t2.mono + ACTIVATION_RETRY,
                ..t2
            })
            .is_empty()
        );

        // The old active box comes back as standby: its keys are gone.
        assert!(a.set_standby(true, t2.mono));
        assert!(a.peer(0).unwrap().current.is_none() && a.sessions().next().is_none());
    }

    #[test]
    fn a_new_active_box_whose_clock_is_behind_is_accepted_once_its_retries_pass_the_old_timestamp() {
        let (mut a, mut b, now) = pair();
        let (mut s, _, _) = pair();
        s.set_standby(true, now.mono);
        let init = a.tick(now).remove(0).datagram;
        complete(&mut a, &mut b, init, now);
        // s's clock is 250 ms behind a's: its first initiations carry an
        // older TAI64N than the last b saw for this key, and b refuses them.
        let skew = Duration::from_millis(250);
        s.set_standby(false, now.mono);
        let mut accepted_after = None;
        for i in 0..10u32 {
            let at = Now {
                mono: now.mono + ACTIVATION_RETRY * i,
                unix: now.unix + ACTIVATION_RETRY * i - skew,
            };
            let mut out = s.tick(at);
            if out.is_empty() {
                continue;
            }
            match b.receive("192.0.2.3:51820".parse().unwrap(), &mut out[0].datagram, at) {
                Err(WgError::ReplayedInitiation) => {}
                Ok(Received::Send(_)) => {
                    accepted_after = Some(ACTIVATION_RETRY * i);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let after = accepted_after.expect("never accepted within a second");
        assert!(
            after > skew && after <= skew + ACTIVATION_RETRY,
            "accepted after {after:?}"
        );
    }

    #[test]
    fn a_forged_response_does_not_kill_the_handshake() {
        let (mut a, mut b, now) = pair();
        a.send(0, &[], now).unwrap();
        let mut m1 = a.tick(now).remove(0).datagram;
        let Received::Send(r) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        let genuine = r[0].datagram.clone();
        // Same indices, valid mac1, garbage Noise payload.
        let mut forged = genuine.clone();
        forged[20] ^= 0xff;
        let k = crate::wg::crypto::mac1_key(&a.public);
        let m = crate::wg::crypto::mac(&k, &forged[..resp::MAC1]);
        forged[resp::MAC1..resp::MAC1 + 16].copy_from_slice(&m);
        assert_eq!(
            a.receive(B.parse().unwrap(), &mut forged, now),
            Err(WgError::HandshakeFailed)
        );
        assert!(matches!(
            a.receive(B.parse().unwrap(), &mut genuine.clone(), now),
            Ok(Received::Send(_))
        ));
    }

    #[test]
    fn cryptokey_routing_uses_the_longest_match_over_all_peers() {
        let (mut a, mut b, now) = pair();
        // A second peer of b's owns a more specific prefix inside a's.
        b.peer_mut(0).unwrap().allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
        b.add_peer(&PeerConfig {
            public_key: [9u8; 32],
            preshared_key: None,
            endpoint: None,
            allowed_ips: vec!["10.1.2.0/24".parse().unwrap()],
            persistent_keepalive: None,
            vnet: 0,
        })
        .unwrap();
        connect(&mut a, &mut b, now);
        let mut ok = a
            .send(0, &ipv4([10, 1, 3, 1], [10, 2, 0, 5], b"x"), now)
            .unwrap()
            .unwrap()
            .datagram;
        assert!(matches!(
            b.receive(A.parse().unwrap(), &mut ok, now),
            Ok(Received::Data { .. })
        ));
        let mut spoof = a
            .send(0, &ipv4([10, 1, 2, 7], [10, 2, 0, 5], b"x"), now)
            .unwrap()
            .unwrap()
            .datagram;
        assert_eq!(b.receive(A.parse().unwrap(), &mut spoof, now), Err(WgError::NotAllowed));
    }

    #[test]
    fn retransmits_then_gives_up_after_rekey_attempt_time() {
        let (mut a, _b, now) = pair();
        a.send(0, &ipv4([10, 1, 0, 5], [10, 2, 0, 5], b"x"), now).unwrap();
        let mut t = now;
        let mut initiations = a.tick(t).len();
        for _ in 0..40 {
            t = t.plus(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX);
            initiations += a.tick(t).len();
        }
        // The first plus MAX_TIMER_HANDSHAKES retransmissions, then silence.
        assert_eq!(initiations as u32, 1 + MAX_TIMER_HANDSHAKES);
        let p = a.peer(0).unwrap();
        assert!(
            p.pending.is_none() && p.queue.is_empty(),
            "gave up and dropped the queue"
        );
    }

    #[test]
    fn keys_are_wiped_after_three_reject_after_times() {
        let (mut a, mut b, now) = pair();
        connect(&mut a, &mut b, now);
        assert!(a.peer(0).unwrap().current.is_some());
        assert!(a.sessions().count() >= 1);
        let later = now.plus(super::super::REJECT_AFTER_TIME * 3);
        a.tick(later);
        let p = a.peer(0).unwrap();
        assert!(p.current.is_none() && p.previous.is_none() && p.next.is_none());
        assert_eq!(a.sessions().count(), 0, "no index names a wiped session");
    }

    #[test]
    fn a_round_looks_at_the_peers_that_changed_or_are_due_not_at_every_peer() {
        let (mut a, mut b, now) = pair();
        // 1,000 more peers on A without an endpoint: nothing to do for them.
        for i in 0..1000u32 {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            a.add_peer(&PeerConfig {
                public_key: key,
                preshared_key: None,
                endpoint: None,
                allowed_ips: Vec::new(),
                persistent_keepalive: None,
                vnet: 0,
            })
            .unwrap();
        }
        // The first round looks at every peer just added once.
        let m1 = a.tick(now);
        assert_eq!(a.changed_peers().count(), 1001);
        // Idle: no peer is looked at, and only B's retransmit is due.
        let later = Now {
            mono: now.mono + Duration::from_secs(1),
            ..now
        };
        assert!(a.tick(later).is_empty());
        assert_eq!(a.changed_peers().count(), 0);
        // Traffic for one peer: that peer only.
        a.note_traffic(7, true, false, false, later);
        a.tick(later);
        assert_eq!(a.changed_peers().collect::<Vec<_>>(), vec![7]);
        // B's answer: B's peer (id 0) only, and the session is published.
        let generation = a.generation();
        let r = b.receive(A.parse().unwrap(), &mut m1[0].datagram.clone(), now).unwrap();
        let Received::Send(resp) = r else { panic!("{r:?}") };
        a.receive(B.parse().unwrap(), &mut resp[0].datagram.clone(), later)
            .unwrap();
        // (Last round's peer 7, and B's peer touched since.)
        assert_eq!(a.changed_peers().collect::<Vec<_>>(), vec![7, 0]);
        assert_ne!(a.generation(), generation, "a new session changes the generation");
        // Its retransmit timer is gone with the handshake: the next
        // deadline is the keepalive or rekey of a live session, not now.
        a.tick(later);
        assert!(a.next_deadline(later.mono).is_some_and(|d| d > later.mono));
    }

    #[test]
    fn persistent_keepalive_and_roaming() {
        let (mut a, mut b, now) = pair();
        a.peer_mut(0).unwrap().timers.persistent_interval = Some(Duration::from_secs(25));
        connect(&mut a, &mut b, now);
        let out = a.tick(now.plus(Duration::from_secs(25)));
        assert_eq!(out.len(), 1, "persistent keepalive");
        let mut k = out[0].datagram.clone();
        // It arrives from a new address: b follows the peer there.
        let roamed: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        assert_eq!(b.receive(roamed, &mut k, now).unwrap(), Received::Keepalive { peer: 0 });
        assert_eq!(b.peer(0).unwrap().endpoint, Some(roamed));
    }

    #[test]
    fn cookie_reply_under_load_then_mac2_passes() {
        let (mut a, mut b, now) = pair();
        b.cookies.force_under_load(true);
        a.send(0, &[], now).unwrap();
        let mut m1 = a.tick(now)[0].datagram.clone();
        let Received::Send(reply) = b.receive(A.parse().unwrap(), &mut m1, now).unwrap() else {
            panic!()
        };
        assert_eq!(reply[0].datagram.len(), messages::COOKIE_REPLY_LEN);
        let mut c = reply[0].datagram.clone();
        assert_eq!(
            a.receive(B.parse().unwrap(), &mut c, now).unwrap(),
            Received::CookieStored { peer: 0 }
        );
        // The retransmission carries mac2 and gets a real response.
        let later = now.plus(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX);
        let mut m1 = a.tick(later)[0].datagram.clone();
        let Received::Send(resp) = b.receive(A.parse().unwrap(), &mut m1, later).unwrap() else {
            panic!()
        };
        assert_eq!(resp[0].datagram.len(), RESPONSE_LEN);
    }
}
