//! Cookies: WireGuard's answer to handshake floods (paper section 5.4.7).
//!
//! The responder keeps a secret that rotates every COOKIE_REFRESH_TIME.
//! When it is under load it answers initiations that lack a valid mac2
//! with a cookie reply instead of doing Diffie-Hellman; the cookie is a MAC
//! of the sender's address under that secret. The initiator stores the
//! cookie and uses it as the key of mac2 for COOKIE_REFRESH_TIME.

use super::crypto::{ct_eq, mac, open_cookie, seal_cookie};
use super::messages::{COOKIE_REPLY_LEN, TYPE_COOKIE_REPLY, cookie, write_type, write_u32};
use super::{COOKIE_REFRESH_TIME, random_bytes};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use zeroize::Zeroize;

/// The responder is under load once it has been behind (handshake
/// messages waiting beyond what a round takes) this long without a break:
/// a burst it clears sooner (1,000 peers re-keying at once) is answered
/// without cookies, which would cost each of those peers REKEY_TIMEOUT.
pub const UNDER_LOAD_AFTER: Duration = Duration::from_secs(1);
/// ... and stays under load this long after it last was.
pub const UNDER_LOAD_HOLD: Duration = Duration::from_secs(1);
/// Per source address, under load: sustained handshakes per second...
pub const PER_SOURCE_PER_SEC: f64 = 20.0;
/// ...and burst.
pub const PER_SOURCE_BURST: f64 = 5.0;
const MAX_TRACKED_SOURCES: usize = 8192;

/// The responder's side: secret, load detection, per-source limits.
pub struct CookieChecker {
    secret: [u8; 32],
    secret_born: Option<Duration>,
    /// Since when every round found more waiting than it takes
    /// ([`CookieChecker::note_backlog`]).
    behind_since: Option<Duration>,
    /// When it last found that it had been behind for UNDER_LOAD_AFTER.
    loaded_at: Option<Duration>,
    forced_load: bool,
    buckets: HashMap<IpAddr, (f64, Duration)>,
    last_sweep: Duration,
}

/// The rate limiter's notion of one source: an IPv4 address, an IPv6 /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Drop for CookieChecker {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl Default for CookieChecker {
    fn default() -> Self {
        CookieChecker {
            secret: [0; 32],
            secret_born: None,
            behind_since: None,
            loaded_at: None,
            forced_load: false,
            buckets: HashMap::new(),
            last_sweep: Duration::ZERO,
        }
    }
}

fn addr_bytes(src: SocketAddr, out: &mut [u8; 18]) -> &[u8] {
    match src.ip() {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            out[4..6].copy_from_slice(&src.port().to_be_bytes());
            &out[..6]
        }
        IpAddr::V6(a) => {
            out[..16].copy_from_slice(&a.octets());
            out[16..18].copy_from_slice(&src.port().to_be_bytes());
            &out[..18]
        }
    }
}

impl CookieChecker {
    /// Whether a handshake message arriving now finds us under load (see
    /// [`UNDER_LOAD_AFTER`]). Load is what this thread cannot keep up
    /// with, not a fixed rate: a box that answers 5,000 handshakes a
    /// second has no reason to send cookies at 1,001.
    pub fn under_load(&self, now: Duration) -> bool {
        self.forced_load || self.loaded_at.is_some_and(|t| now.saturating_sub(t) < UNDER_LOAD_HOLD)
    }

    /// After each round of reading: whether more was waiting than the
    /// round takes (`behind`) or the sockets were drained.
    pub fn note_backlog(&mut self, now: Duration, behind: bool) {
        if !behind {
            self.behind_since = None;
            return;
        }
        let since = *self.behind_since.get_or_insert(now);
        if now.saturating_sub(since) >= UNDER_LOAD_AFTER {
            self.loaded_at = Some(now);
        }
    }

    /// Forces (or stops forcing) the under-load behaviour, for tests and
    /// for operators who want cookies always.
    pub fn force_under_load(&mut self, on: bool) {
        self.forced_load = on;
    }

    fn secret(&mut self, now: Duration) -> &[u8; 32] {
        let stale = self
            .secret_born
            .is_none_or(|b| now.saturating_sub(b) >= COOKIE_REFRESH_TIME);
        if stale {
            random_bytes(&mut self.secret);
            self.secret_born = Some(now);
        }
        &self.secret
    }

    /// The cookie for a source address: MAC(secret, ip || port).
    pub fn cookie_for(&mut self, src: SocketAddr, now: Duration) -> [u8; 16] {
        let mut b = [0u8; 18];
        let secret = *self.secret(now);
        mac(&secret, addr_bytes(src, &mut b))
    }

    /// Is `mac2` (over `covered`) made with this source's current cookie?
    pub fn mac2_valid(&mut self, src: SocketAddr, covered: &[u8], mac2: &[u8], now: Duration) -> bool {
        let c = self.cookie_for(src, now);
        ct_eq(&mac(&c, covered), mac2)
    }

    /// Token bucket per source, applied under load. A source is an IPv4
    /// address or an IPv6 /64 (one host holds a whole /64 and could
    /// otherwise take a fresh bucket per address). When the table is full,
    /// entries idle for a second (their bucket is full again: forgetting
    /// them loses nothing) are evicted; if none is, the newcomer is
    /// refused. The table is never cleared: that would hand every limited
    /// source a fresh burst.
    pub fn allow_source(&mut self, ip: IpAddr, now: Duration) -> bool {
        let key = source_key(ip);
        if self.buckets.len() >= MAX_TRACKED_SOURCES && !self.buckets.contains_key(&key) {
            if now.saturating_sub(self.last_sweep) >= Duration::from_millis(100) {
                self.last_sweep = now;
                self.buckets
                    .retain(|_, (_, last)| now.saturating_sub(*last) < Duration::from_secs(1));
            }
            if self.buckets.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let (tokens, last) = self.buckets.entry(key).or_insert((PER_SOURCE_BURST, now));
        let elapsed = now.saturating_sub(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * PER_SOURCE_PER_SEC).min(PER_SOURCE_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Writes a cookie reply to `receiver` (the sender index of the message
    /// being answered), sealed under `cookie_key` with that message's mac1
    /// as associated data.
    pub fn write_reply(
        &mut self,
        out: &mut [u8],
        receiver: u32,
        mac1: &[u8],
        src: SocketAddr,
        cookie_key: &[u8; 32],
        now: Duration,
    ) -> usize {
        let c = self.cookie_for(src, now);
        let mut nonce = [0u8; 24];
        random_bytes(&mut nonce);
        write_type(out, TYPE_COOKIE_REPLY);
        write_u32(out, cookie::RECEIVER, receiver);
        out[cookie::NONCE].copy_from_slice(&nonce);
        out[cookie::COOKIE].copy_from_slice(&seal_cookie(cookie_key, &nonce, &c, mac1));
        COOKIE_REPLY_LEN
    }
}

/// The initiator's side, per peer: the last cookie received and the mac1
/// of the last handshake message sent (the associated data of a reply).
#[derive(Default)]
pub struct CookieState {
    cookie: Option<([u8; 16], Duration)>,
    last_mac1: Option<[u8; 16]>,
}

impl Drop for CookieState {
    fn drop(&mut self) {
        if let Some((c, _)) = self.cookie.as_mut() {
            c.zeroize();
        }
    }
}

impl CookieState {
    /// Remember the mac1 just sent.
    pub fn sent_mac1(&mut self, mac1: [u8; 16]) {
        self.last_mac1 = Some(mac1);
    }

    /// mac2 for an outgoing message: keyed with a fresh cookie, else zeros.
    pub fn mac2(&self, covered: &[u8], now: Duration) -> [u8; 16] {
        match self.cookie {
            Some((c, t)) if now.saturating_sub(t) < COOKIE_REFRESH_TIME => mac(&c, covered),
            _ => [0; 16],
        }
    }

    /// Decrypts and stores the cookie of a reply from the peer whose
    /// cookie key is `cookie_key`.
    pub fn consume_reply(&mut self, reply: &[u8; COOKIE_REPLY_LEN], cookie_key: &[u8; 32], now: Duration) -> bool {
        let Some(mac1) = self.last_mac1 else { return false };
        let nonce: [u8; 24] = reply[cookie::NONCE].try_into().unwrap();
        let sealed: [u8; 32] = reply[cookie::COOKIE].try_into().unwrap();
        match open_cookie(cookie_key, &nonce, &sealed, &mac1) {
            Some(c) => {
                self.cookie = Some((c, now));
                true
            }
            None => false,
        }
    }

    pub fn has_cookie(&self, now: Duration) -> bool {
        matches!(self.cookie, Some((_, t)) if now.saturating_sub(t) < COOKIE_REFRESH_TIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trip_and_mac2() {
        let now = Duration::from_secs(10);
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let key = [3u8; 32];
        let mut checker = CookieChecker::default();
        let mut state = CookieState::default();
        state.sent_mac1([5; 16]);
        let mut out = [0u8; 64];
        checker.write_reply(&mut out, 77, &[5; 16], src, &key, now);
        assert!(state.consume_reply(&out, &key, now));
        assert!(state.has_cookie(now));
        let covered = b"an initiation up to mac2";
        let m2 = state.mac2(covered, now);
        assert!(checker.mac2_valid(src, covered, &m2, now));
        // Another source, or an expired secret, does not validate.
        assert!(!checker.mac2_valid("192.0.2.8:40000".parse().unwrap(), covered, &m2, now));
        assert!(!checker.mac2_valid(src, covered, &m2, now + COOKIE_REFRESH_TIME));
        // A reply with the wrong associated data is refused.
        let mut other = CookieState::default();
        other.sent_mac1([6; 16]);
        assert!(!other.consume_reply(&out, &key, now));
    }

    #[test]
    fn load_and_per_source_limits() {
        let mut c = CookieChecker::default();
        let t = Duration::from_secs(5);
        // Behind for less than UNDER_LOAD_AFTER: a burst, not load.
        c.note_backlog(t, true);
        c.note_backlog(t + Duration::from_millis(900), true);
        assert!(!c.under_load(t + Duration::from_millis(900)));
        // A drained round ends the streak.
        c.note_backlog(t + Duration::from_millis(950), false);
        c.note_backlog(t + Duration::from_millis(1500), true);
        assert!(!c.under_load(t + Duration::from_millis(1500)));
        // Behind without a break for UNDER_LOAD_AFTER: under load, and
        // for UNDER_LOAD_HOLD after the last time it was.
        let at = t + Duration::from_millis(1500) + UNDER_LOAD_AFTER;
        c.note_backlog(at, true);
        assert!(c.under_load(at));
        c.note_backlog(at + Duration::from_millis(10), false);
        assert!(c.under_load(at + UNDER_LOAD_HOLD - Duration::from_millis(1)));
        assert!(!c.under_load(at + UNDER_LOAD_HOLD));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..50).filter(|_| c.allow_source(ip, t)).count();
        assert_eq!(allowed, PER_SOURCE_BURST as usize);
        assert!(c.allow_source(ip, t + Duration::from_millis(100)));
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_a_full_table_evicts_instead_of_clearing() {
        let mut c = CookieChecker::default();
        let t = Duration::from_secs(5);
        // Every address of one /64 draws from one bucket.
        let allowed = (0..50u16)
            .filter(|i| c.allow_source(format!("2001:db8:1:2::{i:x}").parse().unwrap(), t))
            .count();
        assert_eq!(allowed, PER_SOURCE_BURST as usize);
        assert!(c.allow_source("2001:db8:1:3::1".parse().unwrap(), t), "another /64");
        // A limited source stays limited however many others come.
        let limited: IpAddr = "192.0.2.7".parse().unwrap();
        while c.allow_source(limited, t) {}
        for i in 0..MAX_TRACKED_SOURCES as u32 {
            c.allow_source(IpAddr::V4((0x0a00_0000 + i).into()), t);
        }
        assert_eq!(c.buckets.len(), MAX_TRACKED_SOURCES);
        assert!(!c.allow_source(limited, t), "the flood reset the limited source");
        assert!(
            !c.allow_source("198.51.100.1".parse().unwrap(), t),
            "full of active sources: refused"
        );
        // A second later the idle entries go and newcomers get in.
        let later = t + Duration::from_secs(2);
        assert!(c.allow_source("198.51.100.1".parse().unwrap(), later));
        assert!(c.buckets.len() < 10, "{}", c.buckets.len());
    }
}
