//! The WireGuard engine, sans-IO: byte slices in, byte slices out, and an
//! explicit clock. The same code runs in the daemon, in the unit and
//! interoperability tests, and under the fuzz harness.
//!
//! - `messages`  the four message formats, as checked views
//! - `crypto`    HASH, MAC, TAI64N, mac1/mac2 and the cookie AEAD
//! - `cookie`    the responder's cookie secret and load gate, the
//!   initiator's stored cookie
//! - `noise`     the IKpsk2 handshake (snow) and key derivation
//! - `replay`    the lock-free anti-replay window
//! - `session`   transport keys and batched encrypt / decrypt
//! - `timers`    the protocol's timers, as event hooks on a peer
//! - `peer`      a peer: keys, keypairs (previous/current/next), endpoint
//! - `device`    the local static key, the peers, the index table

pub mod cookie;
pub mod crypto;
pub mod device;
pub mod messages;
pub mod noise;
pub mod peer;
pub mod replay;
mod schedule;
pub mod session;
pub mod timers;

use std::time::Duration;

// Constants from the WireGuard paper, section 6, under their names.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Cookie secrets rotate, and cookies expire, after this long.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// Up to this much random jitter is added to REKEY_TIMEOUT.
pub const REKEY_TIMEOUT_JITTER_MAX: Duration = Duration::from_millis(333);
/// Handshake retransmissions before giving up (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT).
pub const MAX_TIMER_HANDSHAKES: u32 = (REKEY_ATTEMPT_TIME.as_secs() / REKEY_TIMEOUT.as_secs()) as u32;

/// The engine's clock: a monotonic instant for timers and the wall clock
/// for TAI64N handshake timestamps. Tests drive both by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now {
    /// Monotonic time since an arbitrary start.
    pub mono: Duration,
    /// Wall-clock time since the Unix epoch.
    pub unix: Duration,
}

impl Now {
    /// The real clocks.
    pub fn system() -> Now {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Now { mono, unix }
    }

    /// A clock `d` later.
    pub fn plus(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            unix: self.unix + d,
        }
    }
}

subway_common::named_counters! {
    /// Why a WireGuard message was not accepted. Each is counted by name
    /// (the names are the counters' in stats and metrics).
    #[derive(thiserror::Error)]
    pub enum WgError {
        #[error("message too short or of the wrong size for its type")]
        BadLength = "wg_bad_length",
        #[error("unknown message type")]
        BadType = "wg_bad_type",
        #[error("mac1 does not authenticate the message")]
        BadMac1 = "wg_bad_mac1",
        #[error("under load and mac2 is missing or stale: a cookie reply was sent")]
        CookieRequired = "wg_cookie_required",
        #[error("handshake failed to decrypt or authenticate")]
        HandshakeFailed = "wg_handshake_failed",
        #[error("the initiator's static key is not a configured peer")]
        UnknownPeer = "wg_unknown_peer",
        #[error("replayed or old handshake initiation (TAI64N not newer)")]
        ReplayedInitiation = "wg_replayed_initiation",
        #[error("no session or handshake with this receiver index")]
        UnknownIndex = "wg_unknown_index",
        #[error("data packet failed to decrypt")]
        DecryptFailed = "wg_decrypt_failed",
        #[error("data packet counter already seen or too old")]
        Replayed = "wg_replayed",
        #[error("session expired (REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES)")]
        Expired = "wg_expired",
        #[error("no usable session for this peer")]
        NoSession = "wg_no_session",
        #[error("decrypted packet's source is not in the peer's allowed IPs")]
        NotAllowed = "wg_not_allowed",
        #[error("handshake rate limit for this source exceeded")]
        RateLimited = "wg_rate_limited",
        #[error("output buffer too small")]
        BufferTooSmall = "wg_buffer_too_small",
        #[error("this box is the standby of an HA pair: it sends and accepts nothing")]
        Standby = "wg_standby",
    }
}

/// Random bytes from the OS.
pub fn random_bytes(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    // The system RNG failing is unrecoverable for a crypto protocol.
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the OS random number generator failed");
}

pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    random_bytes(&mut b);
    u32::from_le_bytes(b)
}
