//! A WireGuard peer: its keys, its sessions (previous, current, next, as
//! in the paper, so no packet is lost across a rekey), the handshake in
//! flight, its endpoint and its allowed IPs.

use super::cookie::CookieState;
use super::crypto::{cookie_key, mac1_key};
use super::noise::PendingInitiation;
use super::session::Session;
use super::timers::Timers;
use super::{KEEPALIVE_TIMEOUT, Now, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_TIMEOUT};
use ipnet::IpNet;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Packets queued per peer while a handshake is under way.
pub const MAX_QUEUED: usize = 128;

/// What the configuration says about a peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// The routing domain (VNET) the peer's AllowedIPs belong to:
    /// cryptokey routing compares prefixes within one domain only.
    pub vnet: u32,
}

pub struct Peer {
    pub id: u32,
    pub public_key: [u8; 32],
    pub(crate) psk: Zeroizing<[u8; 32]>,
    /// mac1 key for messages we send to this peer.
    pub(crate) mac1_key: [u8; 32],
    /// Key of cookie replies this peer sends us.
    pub(crate) cookie_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub vnet: u32,
    /// Removed (`wg set ... remove`, a reload): the id stays reserved
    /// until a new peer takes it, nothing else is left.
    pub removed: bool,
    pub(crate) pending: Option<PendingInitiation>,
    pub(crate) last_initiation_sent: Option<Duration>,
    /// Greatest TAI64N seen in an initiation from this peer.
    pub(crate) last_timestamp: [u8; 12],
    pub(crate) cookie: CookieState,
    pub previous: Option<Arc<Session>>,
    pub current: Option<Arc<Session>>,
    pub next: Option<Arc<Session>>,
    pub timers: Timers,
    /// A rekey is due (time or messages), to be started by the next tick.
    pub(crate) want_handshake: bool,
    pub(crate) queue: VecDeque<Vec<u8>>,
    pub last_handshake: Option<Now>,
    /// Handshakes completed with this peer, in either role.
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl Peer {
    pub fn new(id: u32, cfg: &PeerConfig) -> Peer {
        let timers = Timers::new(
            cfg.persistent_keepalive
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(s as u64)),
        );
        Peer {
            id,
            public_key: cfg.public_key,
            psk: Zeroizing::new(cfg.preshared_key.unwrap_or([0; 32])),
            mac1_key: mac1_key(&cfg.public_key),
            cookie_key: cookie_key(&cfg.public_key),
            endpoint: cfg.endpoint,
            allowed_ips: cfg.allowed_ips.clone(),
            vnet: cfg.vnet,
            removed: false,
            pending: None,
            last_initiation_sent: None,
            last_timestamp: [0; 12],
            cookie: CookieState::default(),
            previous: None,
            current: None,
            next: None,
            timers,
            want_handshake: false,
            queue: VecDeque::new(),
            last_handshake: None,
            handshakes: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// Cryptokey routing: may this peer send us packets from `src`?
    pub fn allows(&self, src: IpAddr) -> bool {
        self.allowed_ips.iter().any(|n| n.contains(&src))
    }

    /// The session to send on: current, or a next one the peer has
    /// confirmed by sending on it.
    pub fn send_session(&self, now: Duration) -> Option<&Arc<Session>> {
        if let Some(c) = &self.current
            && c.can_send(now)
        {
            return Some(c);
        }
        self.next.as_ref().filter(|n| n.can_send(now))
    }

    /// Installs a new session. An initiator uses it at once; a responder
    /// keeps it as `next` until the initiator's first packet confirms it.
    pub(crate) fn install(&mut self, s: Arc<Session>) -> Vec<u32> {
        let mut retired = Vec::new();
        if s.initiator {
            if let Some(p) = self.previous.take() {
                retired.push(p.local_index);
            }
            // An unconfirmed next may be what the peer is sending on right
            // now (simultaneous handshakes): keep it as previous.
            match self.next.take() {
                Some(n) => {
                    if let Some(c) = self.current.take() {
                        retired.push(c.local_index);
                    }
                    self.previous = Some(n);
                }
                None => self.previous = self.current.take(),
            }
            self.current = Some(s);
        } else {
            if let Some(n) = self.next.take() {
                retired.push(n.local_index);
            }
            self.next = Some(s);
        }
        retired
    }

    /// A packet arrived on `next`: it becomes current. Returns the index
    /// of the session that was dropped (the old previous), if any.
    pub(crate) fn confirm_next(&mut self) -> Option<u32> {
        let n = self.next.take()?;
        let dropped = self.previous.take().map(|p| p.local_index);
        self.previous = self.current.take();
        self.current = Some(n);
        dropped
    }

    /// Wipes every key: sessions, pending handshake, queued packets.
    pub(crate) fn zero_keys(&mut self) -> Vec<u32> {
        let mut idx = Vec::new();
        for s in [self.previous.take(), self.current.take(), self.next.take()]
            .into_iter()
            .flatten()
        {
            idx.push(s.local_index);
        }
        if let Some(p) = self.pending.take() {
            idx.push(p.local_index);
        }
        self.queue.clear();
        idx
    }

    /// Sending on `s` now: is it time to rekey (we initiated the session
    /// and it is old, or has sent many messages)?
    pub(crate) fn rekey_due_on_send(s: &Session, now: Duration) -> bool {
        (s.initiator && s.age(now) >= REKEY_AFTER_TIME) || s.sent() >= REKEY_AFTER_MESSAGES
    }

    /// Receiving on `s` now: about to expire, and we are the initiator?
    pub(crate) fn rekey_due_on_receive(s: &Session, now: Duration) -> bool {
        s.initiator && s.age(now) >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
    }
}
