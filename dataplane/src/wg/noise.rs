//! The handshake: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s with WireGuard's
//! prologue, run by `snow` (a vetted Noise implementation), plus
//! WireGuard's framing around it (indices, TAI64N payload, mac1/mac2).
//! Ends with the raw transport keys from Noise's Split().
//!
//! Message 1 (initiator -> responder) carries `e, es, s, ss` with the
//! TAI64N timestamp as payload: exactly WireGuard's ephemeral, encrypted
//! static and encrypted timestamp fields. Message 2 carries
//! `e, ee, se, psk` with an empty payload.

use super::WgError;
use super::cookie::CookieState;
use super::crypto::{ct_eq, mac};
use super::messages::{
    INITIATION_LEN, RESPONSE_LEN, TYPE_INITIATION, TYPE_RESPONSE, init, resp, write_type, write_u32,
};
use std::sync::OnceLock;
use std::time::Duration;
use zeroize::Zeroizing;

const PATTERN: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";

fn params() -> snow::params::NoiseParams {
    static P: OnceLock<snow::params::NoiseParams> = OnceLock::new();
    P.get_or_init(|| PATTERN.parse().expect("a valid Noise pattern"))
        .clone()
}

/// Transport keys of a completed handshake, from this side's view.
pub struct SessionKeys {
    pub send: Zeroizing<[u8; 32]>,
    pub recv: Zeroizing<[u8; 32]>,
    /// Our index (the peer sends data to it).
    pub local_index: u32,
    /// The peer's index (we send data to it).
    pub remote_index: u32,
    pub initiator: bool,
}

/// An initiation we sent, waiting for its response.
pub struct PendingInitiation {
    state: snow::HandshakeState,
    pub local_index: u32,
}

/// The public key of a private key.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    let s = x25519_dalek::StaticSecret::from(*private);
    x25519_dalek::PublicKey::from(&s).to_bytes()
}

/// Writes mac1 (keyed for the receiver) and mac2 (from our cookie, if any)
/// at the end of a handshake message.
fn seal_macs(msg: &mut [u8], mac1_off: usize, mac1_key: &[u8; 32], cookie: &mut CookieState, now: Duration) {
    let m1 = mac(mac1_key, &msg[..mac1_off]);
    msg[mac1_off..mac1_off + 16].copy_from_slice(&m1);
    // A cookie reply answers our initiation; a response's mac1 must not
    // replace the one it would be sealed with.
    if msg[0] == TYPE_INITIATION {
        cookie.sent_mac1(m1);
    }
    let m2 = cookie.mac2(&msg[..mac1_off + 16], now);
    msg[mac1_off + 16..mac1_off + 32].copy_from_slice(&m2);
}

/// Checks mac1 of an incoming handshake message with our own mac1 key.
pub fn mac1_valid(msg: &[u8], mac1_off: usize, our_mac1_key: &[u8; 32]) -> bool {
    ct_eq(&mac(our_mac1_key, &msg[..mac1_off]), &msg[mac1_off..mac1_off + 16])
}

/// Builds an initiation to the holder of `peer_public`.
#[allow(clippy::too_many_arguments)]
pub fn create_initiation(
    local_private: &[u8; 32],
    peer_public: &[u8; 32],
    psk: &[u8; 32],
    peer_mac1_key: &[u8; 32],
    local_index: u32,
    timestamp: [u8; 12],
    cookie: &mut CookieState,
    now: Duration,
    out: &mut [u8; INITIATION_LEN],
) -> Result<PendingInitiation, WgError> {
    let mut state = snow::Builder::new(params())
        .local_private_key(local_private)
        .and_then(|b| b.remote_public_key(peer_public))
        .and_then(|b| b.psk(2, psk))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(|_| WgError::HandshakeFailed)?;
    out.fill(0);
    write_type(out, TYPE_INITIATION);
    write_u32(out, init::SENDER, local_index);
    let n = state
        .write_message(&timestamp, &mut out[init::NOISE])
        .map_err(|_| WgError::HandshakeFailed)?;
    debug_assert_eq!(n, init::NOISE.len());
    seal_macs(out, init::MAC1, peer_mac1_key, cookie, now);
    Ok(PendingInitiation { state, local_index })
}

/// What a responder learns from a valid initiation.
pub struct ReceivedInitiation {
    state: snow::HandshakeState,
    pub peer_public: [u8; 32],
    pub timestamp: [u8; 12],
    pub remote_index: u32,
}

/// Decrypts an initiation (mac1 already checked by the caller).
pub fn consume_initiation(local_private: &[u8; 32], msg: &[u8; INITIATION_LEN]) -> Result<ReceivedInitiation, WgError> {
    let mut state = snow::Builder::new(params())
        .local_private_key(local_private)
        // The peer (and so its PSK) is known only after decrypting its
        // static key; the PSK is set before writing the response.
        .and_then(|b| b.psk(2, &[0u8; 32]))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_responder())
        .map_err(|_| WgError::HandshakeFailed)?;
    let mut ts = [0u8; 12];
    let n = state
        .read_message(&msg[init::NOISE], &mut ts)
        .map_err(|_| WgError::HandshakeFailed)?;
    if n != 12 {
        return Err(WgError::HandshakeFailed);
    }
    let peer_public: [u8; 32] = state
        .get_remote_static()
        .and_then(|s| s.try_into().ok())
        .ok_or(WgError::HandshakeFailed)?;
    let remote_index = u32::from_le_bytes(msg[init::SENDER..init::SENDER + 4].try_into().unwrap());
    Ok(ReceivedInitiation {
        state,
        peer_public,
        timestamp: ts,
        remote_index,
    })
}

/// Writes the response to an initiation and derives the responder's keys.
pub fn create_response(
    mut r: ReceivedInitiation,
    psk: &[u8; 32],
    peer_mac1_key: &[u8; 32],
    local_index: u32,
    cookie: &mut CookieState,
    now: Duration,
    out: &mut [u8; RESPONSE_LEN],
) -> Result<SessionKeys, WgError> {
    r.state.set_psk(2, psk).map_err(|_| WgError::HandshakeFailed)?;
    out.fill(0);
    write_type(out, TYPE_RESPONSE);
    write_u32(out, resp::SENDER, local_index);
    write_u32(out, resp::RECEIVER, r.remote_index);
    let n = r
        .state
        .write_message(&[], &mut out[resp::NOISE])
        .map_err(|_| WgError::HandshakeFailed)?;
    debug_assert_eq!(n, resp::NOISE.len());
    seal_macs(out, resp::MAC1, peer_mac1_key, cookie, now);
    let (i2r, r2i) = r.state.dangerously_get_raw_split();
    Ok(SessionKeys {
        send: Zeroizing::new(r2i),
        recv: Zeroizing::new(i2r),
        local_index,
        remote_index: r.remote_index,
        initiator: false,
    })
}

/// Completes our initiation with the peer's response.
/// On failure the pending initiation is left as it was (snow restores its
/// state), so a forged response cannot kill a handshake in flight.
pub fn consume_response(p: &mut PendingInitiation, msg: &[u8; RESPONSE_LEN]) -> Result<SessionKeys, WgError> {
    let mut empty = [0u8; 0];
    let n = p
        .state
        .read_message(&msg[resp::NOISE], &mut empty)
        .map_err(|_| WgError::HandshakeFailed)?;
    if n != 0 {
        return Err(WgError::HandshakeFailed);
    }
    let (i2r, r2i) = p.state.dangerously_get_raw_split();
    let remote_index = u32::from_le_bytes(msg[resp::SENDER..resp::SENDER + 4].try_into().unwrap());
    Ok(SessionKeys {
        send: Zeroizing::new(i2r),
        recv: Zeroizing::new(r2i),
        local_index: p.local_index,
        remote_index,
        initiator: true,
    })
}

#[cfg(test)]
mod tests {
    use super::super::crypto::mac1_key;
    use super::*;

    #[test]
    fn both_sides_derive_matching_keys() {
        let (a_priv, b_priv) = ([0x11u8; 32], [0x22u8; 32]);
        let (a_pub, b_pub) = (public_key(&a_priv), public_key(&b_priv));
        let psk = [0x33u8; 32];
        let now = Duration::from_secs(1);
        let (mut ca, mut cb) = (CookieState::default(), CookieState::default());
        let mut m1 = [0u8; INITIATION_LEN];
        let mut pending = create_initiation(
            &a_priv,
            &b_pub,
            &psk,
            &mac1_key(&b_pub),
            7,
            [1; 12],
            &mut ca,
            now,
            &mut m1,
        )
        .unwrap();
        assert!(mac1_valid(&m1, init::MAC1, &mac1_key(&b_pub)));
        assert!(!mac1_valid(&m1, init::MAC1, &mac1_key(&a_pub)));
        let got = consume_initiation(&b_priv, &m1).unwrap();
        assert_eq!(got.peer_public, a_pub);
        assert_eq!(got.timestamp, [1; 12]);
        assert_eq!(got.remote_index, 7);
        let mut m2 = [0u8; RESPONSE_LEN];
        let kb = create_response(got, &psk, &mac1_key(&a_pub), 9, &mut cb, now, &mut m2).unwrap();
        let ka = consume_response(&mut pending, &m2).unwrap();
        assert_eq!(*ka.send, *kb.recv);
        assert_eq!(*ka.recv, *kb.send);
        assert_ne!(*ka.send, *ka.recv);
        assert_eq!(
            (ka.local_index, ka.remote_index, kb.local_index, kb.remote_index),
            (7, 9, 9, 7)
        );
    }

    #[test]
    fn a_wrong_psk_fails_the_handshake() {
        let (a_priv, b_priv) = ([0x11u8; 32], [0x22u8; 32]);
        let b_pub = public_key(&b_priv);
        let now = Duration::from_secs(1);
        let (mut ca, mut cb) = (CookieState::default(), CookieState::default());
        let mut m1 = [0u8; INITIATION_LEN];
        let mut pending =
            create_initiation(&a_priv, &b_pub, &[1; 32], &[0; 32], 7, [1; 12], &mut ca, now, &mut m1).unwrap();
        let got = consume_initiation(&b_priv, &m1).unwrap();
        let mut m2 = [0u8; RESPONSE_LEN];
        create_response(got, &[2; 32], &[0; 32], 9, &mut cb, now, &mut m2).unwrap();
        assert!(consume_response(&mut pending, &m2).is_err());
    }
}
