//! The primitives WireGuard uses outside the Noise handshake itself, from
//! vetted crates: HASH (BLAKE2s-256), MAC (keyed BLAKE2s-128), the cookie
//! AEAD (XChaCha20-Poly1305) and TAI64N timestamps.

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest, digest::consts::U16};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::time::Duration;

pub const LABEL_MAC1: &[u8] = b"mac1----";
pub const LABEL_COOKIE: &[u8] = b"cookie--";

/// HASH(a || b) with BLAKE2s-256.
pub fn hash(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, a);
    Digest::update(&mut h, b);
    h.finalize().into()
}

/// MAC(key, data): keyed BLAKE2s with a 16-byte output.
pub fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("BLAKE2s keys are up to 32 bytes");
    m.update(data);
    m.finalize_fixed().into()
}

/// The key of mac1 for messages sent to the holder of `public`.
pub fn mac1_key(public: &[u8; 32]) -> [u8; 32] {
    hash(LABEL_MAC1, public)
}

/// The key of cookie replies from the holder of `public`.
pub fn cookie_key(public: &[u8; 32]) -> [u8; 32] {
    hash(LABEL_COOKIE, public)
}

/// TAI64N of a Unix time: 8 bytes of TAI seconds, 4 of nanoseconds, big-endian.
pub fn tai64n(unix: Duration) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(0x4000_0000_0000_000a_u64 + unix.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&unix.subsec_nanos().to_be_bytes());
    t
}

/// Seals a 16-byte cookie for a cookie reply: 32 bytes out.
pub fn seal_cookie(key: &[u8; 32], nonce: &[u8; 24], cookie: &[u8; 16], aad: &[u8]) -> [u8; 32] {
    let aead = XChaCha20Poly1305::new(key.into());
    let mut buf = [0u8; 16];
    buf.copy_from_slice(cookie);
    let tag = aead
        .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, &mut buf)
        .expect("16 bytes always seal");
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&buf);
    out[16..].copy_from_slice(&tag);
    out
}

/// Opens a cookie reply's 32 sealed bytes.
pub fn open_cookie(key: &[u8; 32], nonce: &[u8; 24], sealed: &[u8; 32], aad: &[u8]) -> Option<[u8; 16]> {
    let aead = XChaCha20Poly1305::new(key.into());
    let mut buf = [0u8; 16];
    buf.copy_from_slice(&sealed[..16]);
    aead.decrypt_in_place_detached(XNonce::from_slice(nonce), aad, &mut buf, sealed[16..].into())
        .ok()?;
    Some(buf)
}

/// Constant-time equality for MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tai64n_orders_like_time() {
        let a = tai64n(Duration::new(1_700_000_000, 5));
        let b = tai64n(Duration::new(1_700_000_000, 6));
        let c = tai64n(Duration::new(1_700_000_001, 0));
        assert!(a < b && b < c);
        assert_eq!(&a[..8], &(0x4000_0000_0000_000a_u64 + 1_700_000_000).to_be_bytes());
    }

    #[test]
    fn cookie_round_trip_and_tamper() {
        let (k, n, c) = ([7u8; 32], [9u8; 24], [1u8; 16]);
        let sealed = seal_cookie(&k, &n, &c, b"mac1");
        assert_eq!(open_cookie(&k, &n, &sealed, b"mac1"), Some(c));
        assert_eq!(open_cookie(&k, &n, &sealed, b"mac2"), None);
        let mut bad = sealed;
        bad[3] ^= 1;
        assert_eq!(open_cookie(&k, &n, &bad, b"mac1"), None);
    }

    #[test]
    fn blake2s_known_answer() {
        // BLAKE2s-256("abc") from RFC 7693 appendix B.
        let h = hash(b"ab", b"c");
        assert_eq!(h[..4], [0x50, 0x8c, 0x5e, 0x8c]);
        assert_ne!(mac(&[1; 32], b"x"), mac(&[2; 32], b"x"));
    }
}
