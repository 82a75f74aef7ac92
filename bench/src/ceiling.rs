//! The crypto-only ceiling of one core: how many data messages per second
//! subway's WireGuard session seals, and opens, with nothing else in the
//! way (no packet I/O, no routing). A gateway cannot beat this per core;
//! the harness reports the gateway's rate as a fraction of it.

use std::time::{Duration, Instant};
use subway_dataplane::wg::noise::SessionKeys;
use subway_dataplane::wg::session::Session;

/// Fixed transport keys for one side of a test session (no handshake):
/// the initiator's send key is the responder's receive key.
pub fn keys(initiator: bool) -> SessionKeys {
    let (a, b) = ([0x11u8; 32], [0x22u8; 32]);
    let (send, recv) = if initiator { (a, b) } else { (b, a) };
    SessionKeys {
        send: send.into(),
        recv: recv.into(),
        local_index: if initiator { 1 } else { 2 },
        remote_index: if initiator { 2 } else { 1 },
        initiator,
    }
}

/// Messages per second sealed and opened for inner IP packets of
/// `ip_len` bytes, each measured for `secs` on the calling thread (pin it
/// first). Opening includes copying each message into place, as a
/// receive path must (the same message cannot be opened twice in place).
pub fn crypto_rates(ip_len: usize, secs: f64) -> (f64, f64) {
    let limit = Duration::from_secs_f64(secs);
    let tx = Session::new(&keys(true), 0, Duration::ZERO);
    let mut buf = vec![0u8; Session::message_len(ip_len) + 64];
    buf[16..16 + ip_len].fill(0x5a);

    // Seal, one counter reservation per batch of 64 as the workers do.
    let t0 = Instant::now();
    let mut sealed = 0u64;
    while t0.elapsed() < limit {
        let first = tx.reserve(64).expect("counter space");
        for k in 0..64 {
            // A failed seal is a broken engine, not a slower one.
            tx.seal(first + k, &mut buf, ip_len).expect("seal");
        }
        sealed += 64;
    }
    let seal_rate = sealed as f64 / t0.elapsed().as_secs_f64();

    // Open: a pool of messages sealed once, opened by fresh receive
    // sessions (each counter is accepted once per session).
    const POOL: usize = 4096;
    let tx = Session::new(&keys(true), 0, Duration::ZERO);
    let len = Session::message_len(ip_len);
    let first = tx.reserve(POOL as u64).expect("counter space");
    let pool: Vec<Vec<u8>> = (0..POOL)
        .map(|i| {
            let mut m = vec![0u8; len];
            m[16..16 + ip_len].fill(0x5a);
            tx.seal(first + i as u64, &mut m, ip_len).expect("seal");
            m
        })
        .collect();
    let mut scratch = vec![0u8; len];
    let t0 = Instant::now();
    let mut opened = 0u64;
    while t0.elapsed() < limit {
        let rx = Session::new(&keys(false), 0, Duration::ZERO);
        for m in &pool {
            scratch.copy_from_slice(m);
            // Each message once per fresh session: every open must succeed.
            rx.open(&mut scratch, Duration::ZERO).expect("open");
            opened += 1;
        }
    }
    let open_rate = opened as f64 / t0.elapsed().as_secs_f64();
    (seal_rate, open_rate)
}

#[cfg(test)]
mod tests {
    #[test]
    fn seals_and_opens_something() {
        let (s, o) = super::crypto_rates(100, 0.05);
        assert!(s > 1000.0 && o > 1000.0, "seal {s}/s, open {o}/s");
    }
}
