//! The four WireGuard messages. Little-endian integers, fixed sizes for
//! the handshake messages; a checked view validates the size and type once.

use super::WgError;

pub const TYPE_INITIATION: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
pub const TYPE_COOKIE_REPLY: u8 = 3;
pub const TYPE_DATA: u8 = 4;

pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Header of a data message: type, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 16;
pub const TAG_LEN: usize = 16;
/// The smallest data message: an empty (keepalive) payload.
pub const DATA_MIN_LEN: usize = DATA_HEADER_LEN + TAG_LEN;

/// Offsets inside an initiation.
pub mod init {
    pub const SENDER: usize = 4;
    /// The Noise handshake bytes: ephemeral, encrypted static, encrypted timestamp.
    pub const NOISE: core::ops::Range<usize> = 8..116;
    pub const MAC1: usize = 116;
    pub const MAC2: usize = 132;
}

/// Offsets inside a response.
pub mod resp {
    pub const SENDER: usize = 4;
    pub const RECEIVER: usize = 8;
    /// The Noise handshake bytes: ephemeral, encrypted empty payload.
    pub const NOISE: core::ops::Range<usize> = 12..60;
    pub const MAC1: usize = 60;
    pub const MAC2: usize = 76;
}

/// Offsets inside a cookie reply.
pub mod cookie {
    pub const RECEIVER: usize = 4;
    pub const NONCE: core::ops::Range<usize> = 8..32;
    pub const COOKIE: core::ops::Range<usize> = 32..64;
}

#[inline]
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A validated message of any type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Initiation(&'a [u8; INITIATION_LEN]),
    Response(&'a [u8; RESPONSE_LEN]),
    CookieReply(&'a [u8; COOKIE_REPLY_LEN]),
    Data {
        receiver: u32,
        counter: u64,
        payload: &'a [u8],
    },
}

impl<'a> Message<'a> {
    /// Classifies a datagram: type byte, three zero bytes, exact size.
    pub fn parse(b: &'a [u8]) -> Result<Message<'a>, WgError> {
        if b.len() < 4 {
            return Err(WgError::BadLength);
        }
        if b[1] != 0 || b[2] != 0 || b[3] != 0 {
            return Err(WgError::BadType);
        }
        match b[0] {
            TYPE_INITIATION => b.try_into().map(Message::Initiation).map_err(|_| WgError::BadLength),
            TYPE_RESPONSE => b.try_into().map(Message::Response).map_err(|_| WgError::BadLength),
            TYPE_COOKIE_REPLY => b.try_into().map(Message::CookieReply).map_err(|_| WgError::BadLength),
            TYPE_DATA => {
                if b.len() < DATA_MIN_LEN {
                    return Err(WgError::BadLength);
                }
                let counter = u64::from_le_bytes(b[8..16].try_into().unwrap());
                Ok(Message::Data {
                    receiver: le32(b, 4),
                    counter,
                    payload: &b[16..],
                })
            }
            _ => Err(WgError::BadType),
        }
    }
}

pub fn initiation_sender(m: &[u8; INITIATION_LEN]) -> u32 {
    le32(m, init::SENDER)
}
pub fn response_sender(m: &[u8; RESPONSE_LEN]) -> u32 {
    le32(m, resp::SENDER)
}
pub fn response_receiver(m: &[u8; RESPONSE_LEN]) -> u32 {
    le32(m, resp::RECEIVER)
}
pub fn cookie_receiver(m: &[u8; COOKIE_REPLY_LEN]) -> u32 {
    le32(m, cookie::RECEIVER)
}

/// Writes a data header (type 4, receiver, counter) into `b[..16]`.
#[inline(always)]
pub fn write_data_header(b: &mut [u8], receiver: u32, counter: u64) {
    b[0..4].copy_from_slice(&[TYPE_DATA, 0, 0, 0]);
    b[4..8].copy_from_slice(&receiver.to_le_bytes());
    b[8..16].copy_from_slice(&counter.to_le_bytes());
}

pub fn write_type(b: &mut [u8], t: u8) {
    b[0..4].copy_from_slice(&[t, 0, 0, 0]);
}

pub fn write_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Padded length of a plaintext of `len` bytes (multiple of 16).
#[inline(always)]
pub const fn padded(len: usize) -> usize {
    (len + 15) & !15
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_type_and_size() {
        let mut m = [0u8; INITIATION_LEN];
        m[0] = 1;
        assert!(matches!(Message::parse(&m), Ok(Message::Initiation(_))));
        assert_eq!(Message::parse(&m[..147]), Err(WgError::BadLength));
        m[2] = 1;
        assert_eq!(Message::parse(&m), Err(WgError::BadType));
        let mut d = [0u8; 32];
        write_data_header(&mut d, 0x11223344, 7);
        match Message::parse(&d).unwrap() {
            Message::Data {
                receiver,
                counter,
                payload,
            } => {
                assert_eq!((receiver, counter, payload.len()), (0x11223344, 7, 16));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Message::parse(&d[..31]), Err(WgError::BadLength));
        assert_eq!(Message::parse(&[9, 0, 0, 0]), Err(WgError::BadType));
        assert_eq!(Message::parse(&[1, 0]), Err(WgError::BadLength));
        assert_eq!(padded(0), 0);
        assert_eq!(padded(1), 16);
        assert_eq!(padded(16), 16);
        assert_eq!(padded(1420), 1424);
    }
}
