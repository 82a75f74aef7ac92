//! WireGuard's timers (paper section 6; the kernel's timers.c), as
//! deadlines on a peer, armed and cancelled by hooks named after the event
//! that happened. [`Timers::expired`] reports which deadlines passed; the
//! device decides what to send.
//!
//! | timer                 | armed by                      | when it fires                          |
//! |-----------------------|-------------------------------|----------------------------------------|
//! | retransmit_handshake  | handshake_initiated           | resend the initiation, or give up      |
//! | send_keepalive        | data_received                 | nothing was sent back: send keepalive  |
//! | new_handshake         | data_sent                     | nothing came back: start a handshake   |
//! | zero_key_material     | session_derived               | wipe every key of the peer             |
//! | persistent_keepalive  | any_authenticated_packet_traversal | send a keepalive (NAT keep-alive) |

use super::{KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_TIMEOUT};
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Timers {
    pub retransmit_handshake: Option<Duration>,
    pub send_keepalive: Option<Duration>,
    pub new_handshake: Option<Duration>,
    pub zero_key_material: Option<Duration>,
    pub persistent_keepalive: Option<Duration>,
    /// PersistentKeepalive interval, if configured.
    pub persistent_interval: Option<Duration>,
    /// Initiations sent for the current handshake attempt.
    pub handshake_attempts: u32,
    /// Data arrived while a keepalive was already pending.
    need_another_keepalive: bool,
}

/// Which timers fired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fired {
    pub retransmit_handshake: bool,
    pub send_keepalive: bool,
    pub new_handshake: bool,
    pub zero_key_material: bool,
    pub persistent_keepalive: bool,
}

fn take_if_due(t: &mut Option<Duration>, now: Duration) -> bool {
    match *t {
        Some(d) if d <= now => {
            *t = None;
            true
        }
        _ => false,
    }
}

impl Timers {
    /// Timers of a peer with an optional persistent keepalive interval.
    pub fn new(persistent_interval: Option<Duration>) -> Timers {
        Timers {
            persistent_interval,
            ..Default::default()
        }
    }

    /// Call when a data packet (not a keepalive) was sent.
    pub fn data_sent(&mut self, now: Duration) {
        if self.new_handshake.is_none() {
            self.new_handshake = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    /// Call when a data packet (not a keepalive) was received.
    pub fn data_received(&mut self, now: Duration) {
        if self.send_keepalive.is_none() {
            self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
        } else {
            self.need_another_keepalive = true;
        }
    }

    /// Call when any authenticated packet (data or keepalive) was sent.
    pub fn any_authenticated_packet_sent(&mut self) {
        self.send_keepalive = None;
    }

    /// Call when any authenticated packet (data, keepalive or handshake)
    /// was received.
    pub fn any_authenticated_packet_received(&mut self) {
        self.new_handshake = None;
    }

    /// Call when any authenticated packet was sent or received.
    pub fn any_authenticated_packet_traversal(&mut self, now: Duration) {
        if let Some(i) = self.persistent_interval {
            self.persistent_keepalive = Some(now + i);
        }
    }

    /// Call when an initiation was sent; `jitter` is random, up to
    /// REKEY_TIMEOUT_JITTER_MAX.
    pub fn handshake_initiated(&mut self, now: Duration, jitter: Duration) {
        self.retransmit_handshake = Some(now + REKEY_TIMEOUT + jitter);
    }

    /// Call when a handshake completed (either role).
    pub fn handshake_complete(&mut self) {
        self.retransmit_handshake = None;
        self.handshake_attempts = 0;
    }

    /// Call when new session keys were derived.
    pub fn session_derived(&mut self, now: Duration) {
        self.zero_key_material = Some(now + REJECT_AFTER_TIME * 3);
    }

    /// Disarms and reports every timer whose deadline has passed.
    pub fn expired(&mut self, now: Duration) -> Fired {
        let f = Fired {
            retransmit_handshake: take_if_due(&mut self.retransmit_handshake, now),
            send_keepalive: take_if_due(&mut self.send_keepalive, now),
            new_handshake: take_if_due(&mut self.new_handshake, now),
            zero_key_material: take_if_due(&mut self.zero_key_material, now),
            persistent_keepalive: take_if_due(&mut self.persistent_keepalive, now),
        };
        if f.send_keepalive && self.need_another_keepalive {
            self.need_another_keepalive = false;
            self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
        }
        f
    }

    /// The earliest armed deadline.
    pub fn next_deadline(&self) -> Option<Duration> {
        [
            self.retransmit_handshake,
            self.send_keepalive,
            self.new_handshake,
            self.zero_key_material,
            self.persistent_keepalive,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_after_receiving_without_replying() {
        let mut t = Timers::default();
        let t0 = Duration::from_secs(100);
        t.data_received(t0);
        assert_eq!(t.expired(t0 + Duration::from_secs(9)), Fired::default());
        assert!(t.expired(t0 + KEEPALIVE_TIMEOUT).send_keepalive);
        // Replying cancels it.
        t.data_received(t0);
        t.any_authenticated_packet_sent();
        assert!(!t.expired(t0 + KEEPALIVE_TIMEOUT).send_keepalive);
    }

    #[test]
    fn new_handshake_when_the_peer_goes_quiet() {
        let mut t = Timers::default();
        let t0 = Duration::from_secs(1);
        t.data_sent(t0);
        assert!(t.expired(t0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT).new_handshake);
        t.data_sent(t0);
        t.any_authenticated_packet_received();
        assert!(!t.expired(t0 + Duration::from_secs(60)).new_handshake);
    }

    #[test]
    fn another_keepalive_is_rearmed() {
        let mut t = Timers::default();
        let t0 = Duration::from_secs(1);
        t.data_received(t0);
        t.data_received(t0 + Duration::from_secs(5));
        assert!(t.expired(t0 + KEEPALIVE_TIMEOUT).send_keepalive);
        assert_eq!(t.send_keepalive, Some(t0 + KEEPALIVE_TIMEOUT * 2));
    }

    #[test]
    fn persistent_keepalive_and_zeroing() {
        let mut t = Timers::new(Some(Duration::from_secs(25)));
        t.any_authenticated_packet_traversal(Duration::ZERO);
        t.session_derived(Duration::ZERO);
        assert_eq!(t.next_deadline(), Some(Duration::from_secs(25)));
        assert!(t.expired(Duration::from_secs(25)).persistent_keepalive);
        assert!(t.expired(REJECT_AFTER_TIME * 3).zero_key_material);
    }
}
