//! The anti-replay window, lock-free so that several workers can decrypt
//! for the same session at once.
//!
//! The window is a ring of 128 atomic words. Each word holds a 32-bit
//! block number (counter / 32) in its high half and a bitmap of the
//! block's 32 counters in its low half, so "is this counter new?" and
//! "mark it seen" are one compare-and-swap on one word. A slot only ever
//! moves forward to a newer block; a counter whose slot already holds a
//! newer block is too old. Counters more than WINDOW behind the highest
//! seen are refused, as in RFC 6479. 4064 counters (127 blocks) are
//! always tracked, well above WireGuard's minimum of 2048.
//!
//! A 32-bit block number covers 2^37 messages. Sessions live at most
//! REJECT_AFTER_TIME (180 s), which at 400 Mpps is 2^36.1 messages, so
//! counters beyond it are refused rather than wrapped.

use super::REJECT_AFTER_MESSAGES;
use std::sync::atomic::{AtomicU64, Ordering};

const WORDS: usize = 128;
const BITS: u64 = 32;
/// How far behind the highest counter seen a counter may be.
pub const WINDOW: u64 = (WORDS as u64 - 1) * BITS;
const MAX_COUNTER: u64 = (1u64 << 37) - 1;

pub struct ReplayWindow {
    words: [AtomicU64; WORDS],
    /// Highest counter accepted plus one (0: none yet).
    top: AtomicU64,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            top: AtomicU64::new(0),
        }
    }
}

impl ReplayWindow {
    /// Would `counter` be accepted now? (No change; a cheap filter before
    /// spending an AEAD open on it.)
    #[inline]
    pub fn would_accept(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES || counter > MAX_COUNTER {
            return false;
        }
        if counter + WINDOW < self.top.load(Ordering::Relaxed) {
            return false;
        }
        let block = counter / BITS;
        let w = self.words[(block as usize) % WORDS].load(Ordering::Acquire);
        let (tag, bits) = (w >> 32, w & 0xffff_ffff);
        tag < block || (tag == block && bits & (1 << (counter % BITS)) == 0)
    }

    /// Marks `counter` seen; false if it was seen already or is too old.
    /// Call only after the packet authenticated.
    #[inline]
    pub fn check_and_set(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES || counter > MAX_COUNTER {
            return false;
        }
        if counter + WINDOW < self.top.load(Ordering::Relaxed) {
            return false;
        }
        let block = counter / BITS;
        let bit = 1u64 << (counter % BITS);
        let slot = &self.words[(block as usize) % WORDS];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let tag = cur >> 32;
            let next = if tag == block {
                if cur & bit != 0 {
                    return false;
                }
                cur | bit
            } else if tag < block {
                (block << 32) | bit
            } else {
                return false;
            };
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.top.fetch_max(counter + 1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn in_order_duplicates_and_reordering() {
        let w = ReplayWindow::default();
        for c in 0..5000 {
            assert!(w.would_accept(c));
            assert!(w.check_and_set(c), "{c}");
            assert!(!w.check_and_set(c), "duplicate {c}");
        }
        // Reordered within the window: accepted once.
        let w = ReplayWindow::default();
        assert!(w.check_and_set(3000));
        assert!(w.check_and_set(10));
        assert!(!w.check_and_set(10));
        assert!(w.check_and_set(2999));
        // Too old (beyond the window behind the highest).
        assert!(w.check_and_set(10_000));
        assert!(!w.would_accept(10_000 - WINDOW - 1));
        assert!(!w.check_and_set(10_000 - WINDOW - 1));
        assert!(w.check_and_set(10_000 - WINDOW + 1));
        const { assert!(WINDOW >= 2048) };
    }

    #[test]
    fn limits() {
        let w = ReplayWindow::default();
        assert!(!w.check_and_set(REJECT_AFTER_MESSAGES));
        assert!(!w.check_and_set(MAX_COUNTER + 1));
        assert!(w.check_and_set(MAX_COUNTER));
    }

    #[test]
    fn matches_a_reference_window() {
        // Random walk of counters against a simple set-based model.
        let w = ReplayWindow::default();
        let mut seen = std::collections::HashSet::new();
        let mut top = 0u64;
        let mut seed = 7u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let jump = (seed % 64) as i64 - 40;
            let c = (top as i64 + jump).max(0) as u64;
            let expect = !seen.contains(&c) && c + WINDOW >= top;
            let got = w.check_and_set(c);
            assert_eq!(got, expect, "counter {c}, top {top}");
            if got {
                seen.insert(c);
                top = top.max(c + 1);
            }
        }
    }

    #[test]
    fn concurrent_workers_accept_each_counter_once() {
        let w = Arc::new(ReplayWindow::default());
        let accepted: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let w = w.clone();
                    s.spawn(move || (0..20_000u64).filter(|c| w.check_and_set(*c)).count() as u64)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(accepted.iter().sum::<u64>(), 20_000);
    }
}
