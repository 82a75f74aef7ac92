//! UDP headers and checksums.

use super::checksum;
use super::{WireError, be16, put_be16};
use std::net::{Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 8;
pub const PROTOCOL: u8 = 17;

/// A checked view of a UDP datagram: `8 <= length field <= buffer length`.
#[derive(Debug)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = be16(b, 4) as usize;
        if len < HEADER_LEN || len > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(UdpPacket { buf })
    }
    #[inline]
    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }
    pub fn src_port(&self) -> u16 {
        be16(self.b(), 0)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.b(), 2)
    }
    pub fn len(&self) -> usize {
        be16(self.b(), 4) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        be16(self.b(), 6)
    }
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..self.len()]
    }
    /// Checks the checksum over an IPv4 pseudo-header (0 means "none").
    pub fn verify_checksum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let s = checksum::add(
            checksum::pseudo_v4(src, dst, PROTOCOL, self.len() as u16),
            checksum::sum(&self.b()[..self.len()]),
        );
        checksum::fold(s) == 0xffff
    }
    /// Checks the checksum over an IPv6 pseudo-header (mandatory in IPv6).
    pub fn verify_checksum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        let s = checksum::add(
            checksum::pseudo_v6(src, dst, PROTOCOL, self.len() as u32),
            checksum::sum(&self.b()[..self.len()]),
        );
        checksum::fold(s) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let l = self.len();
        &mut self.buf.as_mut()[HEADER_LEN..l]
    }
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        let l = self.len();
        let b = self.buf.as_mut();
        put_be16(b, 6, 0);
        let s = checksum::add(
            checksum::pseudo_v4(src, dst, PROTOCOL, l as u16),
            checksum::sum(&b[..l]),
        );
        let c = !checksum::fold(s);
        put_be16(b, 6, if c == 0 { 0xffff } else { c });
    }
    pub fn fill_checksum_v6(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        let l = self.len();
        let b = self.buf.as_mut();
        put_be16(b, 6, 0);
        let s = checksum::add(
            checksum::pseudo_v6(src, dst, PROTOCOL, l as u32),
            checksum::sum(&b[..l]),
        );
        let c = !checksum::fold(s);
        put_be16(b, 6, if c == 0 { 0xffff } else { c });
    }
}

/// Writes a UDP header with a zero checksum; fill it afterwards.
pub fn emit(buf: &mut [u8], src_port: u16, dst_port: u16, payload_len: usize) {
    put_be16(buf, 0, src_port);
    put_be16(buf, 2, dst_port);
    put_be16(buf, 4, (HEADER_LEN + payload_len) as u16);
    put_be16(buf, 6, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_round_trip_v4_v6() {
        let mut b = [0u8; 21];
        emit(&mut b, 1234, 51820, 13);
        b[8..].copy_from_slice(b"hello, subway");
        let (s4, d4) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut u = UdpPacket::new_checked(&mut b[..]).unwrap();
        u.fill_checksum_v4(s4, d4);
        assert!(u.verify_checksum_v4(s4, d4));
        assert!(!u.verify_checksum_v4(s4, Ipv4Addr::new(10, 0, 0, 3)));
        let (s6, d6): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        u.fill_checksum_v6(s6, d6);
        assert!(u.verify_checksum_v6(s6, d6));
        assert_eq!(
            (u.src_port(), u.dst_port(), u.payload()),
            (1234, 51820, &b"hello, subway"[..])
        );
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut b = [0u8; 16];
        emit(&mut b, 1, 2, 8);
        assert!(UdpPacket::new_checked(&b[..]).is_ok());
        assert_eq!(UdpPacket::new_checked(&b[..7]).unwrap_err(), WireError::Truncated);
        assert_eq!(UdpPacket::new_checked(&b[..15]).unwrap_err(), WireError::BadLength);
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(UdpPacket::new_checked(&b[..]).unwrap_err(), WireError::BadLength);
    }
}
