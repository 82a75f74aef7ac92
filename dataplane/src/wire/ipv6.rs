//! IPv6 fixed headers.

use super::{WireError, be16, put_be16};
use std::net::Ipv6Addr;

pub const HEADER_LEN: usize = 40;

/// A checked view of an IPv6 packet: version 6 and
/// `40 + payload_len <= buffer length`.
#[derive(Debug)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(WireError::BadVersion);
        }
        if HEADER_LEN + be16(b, 4) as usize > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(Ipv6Packet { buf })
    }
    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    pub fn payload_len(&self) -> usize {
        be16(self.b(), 4) as usize
    }
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }
    pub fn next_header(&self) -> u8 {
        self.b()[6]
    }
    pub fn hop_limit(&self) -> u8 {
        self.b()[7]
    }
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[8..24]);
        Ipv6Addr::from(a)
    }
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[24..40]);
        Ipv6Addr::from(a)
    }
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.total_len()]
    }
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Decrements the hop limit (IPv6 has no header checksum).
    pub fn decrement_hop_limit(&mut self) {
        let b = self.buf.as_mut();
        b[7] = b[7].wrapping_sub(1);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let tl = self.total_len();
        &mut self.buf.as_mut()[HEADER_LEN..tl]
    }
}

/// Writes a 40-byte IPv6 header.
pub fn emit(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hop_limit: u8, payload_len: usize) {
    buf[0] = 0x60;
    buf[1] = 0;
    buf[2] = 0;
    buf[3] = 0;
    put_be16(buf, 4, payload_len as u16);
    buf[6] = next_header;
    buf[7] = hop_limit;
    buf[8..24].copy_from_slice(&src.octets());
    buf[24..40].copy_from_slice(&dst.octets());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_parse_and_hop_limit() {
        let mut b = [0u8; 48];
        let s: Ipv6Addr = "fd01::2".parse().unwrap();
        let d: Ipv6Addr = "fd02::2".parse().unwrap();
        emit(&mut b, s, d, 17, 64, 8);
        let mut p = Ipv6Packet::new_checked(&mut b[..]).unwrap();
        assert_eq!((p.src(), p.dst(), p.next_header()), (s, d, 17));
        assert_eq!(p.payload().len(), 8);
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 63);
    }

    #[test]
    fn rejects_malformed() {
        let mut b = [0u8; 48];
        emit(&mut b, Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 17, 64, 8);
        assert_eq!(Ipv6Packet::new_checked(&b[..39]).unwrap_err(), WireError::Truncated);
        assert_eq!(Ipv6Packet::new_checked(&b[..47]).unwrap_err(), WireError::BadLength);
        b[0] = 0x40;
        assert_eq!(Ipv6Packet::new_checked(&b[..]).unwrap_err(), WireError::BadVersion);
    }
}
