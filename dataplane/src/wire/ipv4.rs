//! IPv4 headers.

use super::checksum;
use super::{WireError, be16, put_be16};
use std::net::Ipv4Addr;

pub const MIN_HEADER_LEN: usize = 20;

/// A checked view of an IPv4 packet: version 4, IHL >= 5, and
/// `header_len <= total_len <= buffer length`. Bytes past `total_len`
/// (Ethernet padding) are ignored by `payload`.
#[derive(Debug)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let hl = ((b[0] & 0x0f) as usize) * 4;
        if hl < MIN_HEADER_LEN || hl > b.len() {
            return Err(WireError::BadHeaderLen);
        }
        let total = be16(b, 2) as usize;
        if total < hl || total > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(Ipv4Packet { buf })
    }

    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    pub fn header_len(&self) -> usize {
        ((self.b()[0] & 0x0f) as usize) * 4
    }
    pub fn dscp_ecn(&self) -> u8 {
        self.b()[1]
    }
    pub fn total_len(&self) -> usize {
        be16(self.b(), 2) as usize
    }
    pub fn ident(&self) -> u16 {
        be16(self.b(), 4)
    }
    pub fn dont_fragment(&self) -> bool {
        self.b()[6] & 0x40 != 0
    }
    pub fn more_fragments(&self) -> bool {
        self.b()[6] & 0x20 != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        ((be16(self.b(), 6) & 0x1fff) as usize) * 8
    }
    pub fn is_fragment(&self) -> bool {
        self.more_fragments() || self.frag_offset() != 0
    }
    pub fn ttl(&self) -> u8 {
        self.b()[8]
    }
    pub fn protocol(&self) -> u8 {
        self.b()[9]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.b(), 10)
    }
    pub fn src(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.b();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }
    /// True when the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(&self.b()[..self.header_len()])) == 0xffff
    }
    /// The bytes after the header, up to `total_len`.
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn bm(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }
    /// Decrements the TTL and patches the header checksum incrementally.
    /// The caller checks `ttl() > 1` first.
    pub fn decrement_ttl(&mut self) {
        let b = self.bm();
        let old = be16(b, 8);
        b[8] = b[8].wrapping_sub(1);
        let new = be16(b, 8);
        let c = checksum::update16(be16(b, 10), old, new);
        put_be16(b, 10, c);
    }
    pub fn set_checksum(&mut self, c: u16) {
        put_be16(self.bm(), 10, c);
    }
    /// Recomputes the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = checksum::checksum(&self.b()[..hl]);
        self.set_checksum(c);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len());
        &mut self.bm()[hl..tl]
    }
}

/// Writes a 20-byte IPv4 header (no options) with its checksum.
pub fn emit(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload_len: usize) {
    let total = (MIN_HEADER_LEN + payload_len) as u16;
    buf[0] = 0x45;
    buf[1] = 0;
    put_be16(buf, 2, total);
    put_be16(buf, 4, 0);
    put_be16(buf, 6, 0x4000); // DF
    buf[8] = ttl;
    buf[9] = proto;
    put_be16(buf, 10, 0);
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    let c = checksum::checksum(&buf[..MIN_HEADER_LEN]);
    put_be16(buf, 10, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; 28] {
        let mut b = [0u8; 28];
        emit(
            &mut b,
            Ipv4Addr::new(10, 1, 0, 2),
            Ipv4Addr::new(10, 2, 0, 2),
            17,
            64,
            8,
        );
        b
    }

    #[test]
    fn emit_then_parse() {
        let b = sample();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.src(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 2, 0, 2));
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.payload().len(), 8);
        assert!(p.dont_fragment() && !p.is_fragment());
        assert!(p.verify_checksum());
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut b = sample();
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.decrement_ttl();
        assert_eq!(p.ttl(), 63);
        assert!(p.verify_checksum());
    }

    #[test]
    fn padding_is_not_payload() {
        let mut b = [0u8; 60];
        b[..28].copy_from_slice(&sample());
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn rejects_malformed() {
        let good = sample();
        assert_eq!(Ipv4Packet::new_checked(&good[..19]).unwrap_err(), WireError::Truncated);
        let mut b = good;
        b[0] = 0x65;
        assert_eq!(Ipv4Packet::new_checked(&b[..]).unwrap_err(), WireError::BadVersion);
        let mut b = good;
        b[0] = 0x44; // IHL 4
        assert_eq!(Ipv4Packet::new_checked(&b[..]).unwrap_err(), WireError::BadHeaderLen);
        let mut b = good;
        b[0] = 0x4f; // IHL 15 = 60 bytes > buffer
        assert_eq!(Ipv4Packet::new_checked(&b[..]).unwrap_err(), WireError::BadHeaderLen);
        let mut b = good;
        b[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new_checked(&b[..]).unwrap_err(), WireError::BadLength);
        let mut b = good;
        b[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(Ipv4Packet::new_checked(&b[..]).unwrap_err(), WireError::BadLength);
    }

    #[test]
    fn any_bytes_never_panic() {
        // A cheap deterministic sweep of short buffers with every first byte.
        let mut b = [0u8; 64];
        for len in 0..64 {
            for first in 0..=255u8 {
                b[0] = first;
                b[2] = len as u8;
                b[3] = first;
                if let Ok(p) = Ipv4Packet::new_checked(&b[..len]) {
                    let _ = (p.payload().len(), p.verify_checksum(), p.frag_offset());
                }
            }
        }
    }
}
