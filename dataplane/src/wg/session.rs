//! A session: the transport keys of one completed handshake, shared by
//! reference with every worker. Sending reserves a range of counters for a
//! whole batch with one atomic add; receiving checks the lock-free replay
//! window after the AEAD authenticated the packet. Nothing here allocates
//! or takes a lock.
//!
//! Data message: type 4, receiver index, 64-bit counter, then the
//! plaintext padded to 16 bytes and sealed with ChaCha20-Poly1305 (nonce:
//! 32 zero bits and the little-endian counter, no associated data).

use super::messages::{DATA_HEADER_LEN, TAG_LEN, padded, write_data_header};
use super::noise::SessionKeys;
use super::replay::ReplayWindow;
use super::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, WgError};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A ring AEAD key whose memory is wiped when it is dropped: ring keeps
/// the expanded key inline, so overwriting the storage after the drop
/// wipes the key material.
struct WipedKey(Box<MaybeUninit<LessSafeKey>>);

impl WipedKey {
    fn new(raw: &[u8; 32]) -> WipedKey {
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, raw).expect("32-byte ChaCha20 key"));
        WipedKey(Box::new(MaybeUninit::new(key)))
    }
    #[inline(always)]
    fn get(&self) -> &LessSafeKey {
        // SAFETY: initialised in new() and only de-initialised in drop().
        unsafe { self.0.assume_init_ref() }
    }
}

impl Drop for WipedKey {
    fn drop(&mut self) {
        let p = self.0.as_mut_ptr();
        // SAFETY: the key is initialised (see new); after drop_in_place the
        // storage is plain bytes we own, which we zero with volatile writes
        // so the compiler cannot elide them. The Box frees MaybeUninit.
        unsafe {
            std::ptr::drop_in_place(p);
            let bytes = p as *mut u8;
            for i in 0..std::mem::size_of::<LessSafeKey>() {
                std::ptr::write_volatile(bytes.add(i), 0);
            }
        }
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}

/// One direction-pair of transport keys.
pub struct Session {
    pub local_index: u32,
    pub remote_index: u32,
    pub initiator: bool,
    /// The peer this session belongs to.
    pub peer: u32,
    /// Monotonic time the handshake completed.
    pub born: Duration,
    send: WipedKey,
    recv: WipedKey,
    send_counter: AtomicU64,
    replay: ReplayWindow,
    /// Set once an authenticated packet arrived on this session (a
    /// responder may send on a new session only after that).
    confirmed: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("peer", &self.peer)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(keys: &SessionKeys, peer: u32, born: Duration) -> Session {
        Session {
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            initiator: keys.initiator,
            peer,
            born,
            send: WipedKey::new(&keys.send),
            recv: WipedKey::new(&keys.recv),
            send_counter: AtomicU64::new(0),
            replay: ReplayWindow::default(),
            confirmed: AtomicBool::new(keys.initiator),
        }
    }

    /// Messages sent so far (the next counter).
    pub fn sent(&self) -> u64 {
        self.send_counter.load(Ordering::Relaxed)
    }

    pub fn age(&self, now: Duration) -> Duration {
        now.saturating_sub(self.born)
    }

    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Usable for sending: confirmed, not too old, counters left.
    pub fn can_send(&self, now: Duration) -> bool {
        self.is_confirmed() && self.age(now) < REJECT_AFTER_TIME && self.sent() < REJECT_AFTER_MESSAGES
    }

    /// Reserves `n` consecutive counters with one atomic operation;
    /// returns the first. Never hands out a counter twice, and never one at
    /// or past REJECT_AFTER_MESSAGES (a compare-and-swap rather than an
    /// add, so the counter cannot wrap).
    #[inline]
    pub fn reserve(&self, n: u64) -> Result<u64, WgError> {
        self.send_counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(n).filter(|e| *e <= REJECT_AFTER_MESSAGES)
            })
            .map_err(|_| WgError::Expired)
    }

    /// Room a message needs for `len` bytes of plaintext.
    #[inline]
    pub const fn message_len(len: usize) -> usize {
        DATA_HEADER_LEN + padded(len) + TAG_LEN
    }

    /// Seals one message with `counter` (from [`Session::reserve`]).
    /// `buf[16..16 + len]` holds the plaintext; returns the message length.
    #[inline]
    pub fn seal(&self, counter: u64, buf: &mut [u8], len: usize) -> Result<usize, WgError> {
        let total = Self::message_len(len);
        if buf.len() < total {
            return Err(WgError::BufferTooSmall);
        }
        let body_end = DATA_HEADER_LEN + padded(len);
        buf[DATA_HEADER_LEN + len..body_end].fill(0);
        write_data_header(buf, self.remote_index, counter);
        let (body, rest) = buf[DATA_HEADER_LEN..].split_at_mut(padded(len));
        let tag = self
            .send
            .get()
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), body)
            .map_err(|_| WgError::BufferTooSmall)?;
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Opens a data message in place (`msg` is the whole message). Returns
    /// the padded plaintext (the inner packet's own length field says how
    /// much of it is packet). Checks the replay window after authenticating.
    #[inline]
    pub fn open<'m>(&self, msg: &'m mut [u8], now: Duration) -> Result<&'m mut [u8], WgError> {
        if msg.len() < DATA_HEADER_LEN + TAG_LEN {
            return Err(WgError::BadLength);
        }
        if self.age(now) >= REJECT_AFTER_TIME {
            return Err(WgError::Expired);
        }
        let counter = u64::from_le_bytes(msg[8..16].try_into().unwrap());
        if !self.replay.would_accept(counter) {
            return Err(WgError::Replayed);
        }
        let body = &mut msg[DATA_HEADER_LEN..];
        let plain_len = body.len() - TAG_LEN;
        self.recv
            .get()
            .open_in_place(nonce(counter), Aad::empty(), body)
            .map_err(|_| WgError::DecryptFailed)?;
        if !self.replay.check_and_set(counter) {
            return Err(WgError::Replayed);
        }
        if !self.confirmed.load(Ordering::Relaxed) {
            self.confirmed.store(true, Ordering::Relaxed);
        }
        Ok(&mut msg[DATA_HEADER_LEN..DATA_HEADER_LEN + plain_len])
    }
}

#[inline(always)]
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn pair() -> (Session, Session) {
        let a = SessionKeys {
            send: Zeroizing::new([1; 32]),
            recv: Zeroizing::new([2; 32]),
            local_index: 10,
            remote_index: 20,
            initiator: true,
        };
        let b = SessionKeys {
            send: Zeroizing::new([2; 32]),
            recv: Zeroizing::new([1; 32]),
            local_index: 20,
            remote_index: 10,
            initiator: false,
        };
        (Session::new(&a, 0, Duration::ZERO), Session::new(&b, 0, Duration::ZERO))
    }

    #[test]
    fn seal_open_pad_and_replay() {
        let (a, b) = pair();
        let now = Duration::from_secs(1);
        for len in [0usize, 1, 15, 16, 17, 1420] {
            let mut buf = vec![0u8; Session::message_len(len)];
            for (i, x) in buf[16..16 + len].iter_mut().enumerate() {
                *x = i as u8;
            }
            let c = a.reserve(1).unwrap();
            let n = a.seal(c, &mut buf, len).unwrap();
            assert_eq!(n, 16 + padded(len) + 16);
            assert_eq!(&buf[0..8], &[4, 0, 0, 0, 20, 0, 0, 0]);
            let copy = buf.clone();
            let pt = b.open(&mut buf, now).unwrap();
            assert_eq!(pt.len(), padded(len));
            assert!(pt[..len].iter().enumerate().all(|(i, x)| *x == i as u8));
            let mut again = copy.clone();
            assert_eq!(b.open(&mut again, now), Err(WgError::Replayed));
        }
        assert!(b.is_confirmed());
    }

    #[test]
    fn tampering_and_expiry_are_refused() {
        let (a, b) = pair();
        let mut buf = vec![0u8; Session::message_len(100)];
        a.seal(0, &mut buf, 100).unwrap();
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert_eq!(b.open(&mut bad, Duration::ZERO), Err(WgError::DecryptFailed));
        // A failed open does not burn the counter: the genuine one passes.
        assert!(b.open(&mut buf.clone(), Duration::ZERO).is_ok());
        let mut late = buf.clone();
        late[8] = 1;
        assert_eq!(b.open(&mut late, REJECT_AFTER_TIME), Err(WgError::Expired));
        assert!(!a.can_send(REJECT_AFTER_TIME));
        assert!(matches!(a.reserve(REJECT_AFTER_MESSAGES + 1), Err(WgError::Expired)));
        assert_eq!(a.reserve(REJECT_AFTER_MESSAGES - 1), Ok(0));
        assert_eq!(a.reserve(1), Ok(REJECT_AFTER_MESSAGES - 1));
        assert!(matches!(a.reserve(1), Err(WgError::Expired)));
        assert_eq!(a.sent(), REJECT_AFTER_MESSAGES, "a refused reservation takes nothing");
    }

    #[test]
    fn each_message_opens_once_and_tampering_is_refused() {
        let (a, b) = pair();
        let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; Session::message_len(10)]).collect();
        let first = a.reserve(4).unwrap();
        assert_eq!((first, a.sent()), (0, 4), "one reservation for the batch");
        for (i, buf) in bufs.iter_mut().enumerate() {
            a.seal(first + i as u64, buf, 10).unwrap();
            assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), i as u64);
        }
        bufs[2][20] ^= 1;
        let dup = bufs[0].clone();
        bufs.push(dup);
        let res: Vec<_> = bufs
            .iter_mut()
            .map(|m| b.open(m, Duration::ZERO).map(|p| p.len()))
            .collect();
        assert_eq!(
            res,
            vec![
                Ok(16),
                Ok(16),
                Err(WgError::DecryptFailed),
                Ok(16),
                Err(WgError::Replayed)
            ]
        );
    }

    #[test]
    fn threads_share_one_session_and_every_packet_opens_once() {
        let (a, b) = pair();
        let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
        let msgs: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4u32)
                .map(|t| {
                    let a = a.clone();
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for i in 0..2000u32 {
                            let mut buf = vec![0u8; Session::message_len(8)];
                            buf[16..20].copy_from_slice(&t.to_le_bytes());
                            buf[20..24].copy_from_slice(&i.to_le_bytes());
                            let c = a.reserve(1).unwrap();
                            a.seal(c, &mut buf, 8).unwrap();
                            out.push(buf);
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        // Counters are unique and together cover 0..8000.
        let mut msgs = msgs;
        msgs.sort_by_key(|m| u64::from_le_bytes(m[8..16].try_into().unwrap()));
        assert!(
            msgs.iter()
                .enumerate()
                .all(|(i, m)| u64::from_le_bytes(m[8..16].try_into().unwrap()) == i as u64)
        );
        // Decrypt on 4 threads at once, each trying every message: each
        // message opens exactly once.
        let opened: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let b = b.clone();
                    let msgs = &msgs;
                    s.spawn(move || {
                        msgs.iter()
                            .filter(|m| b.open(&mut m.to_vec(), Duration::ZERO).is_ok())
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(opened, 8000);
    }
}
