//! ICMPv4 and ICMPv6 messages share a 4-byte header plus 4 bytes of
//! type-specific data; this view covers both.

use super::checksum;
use super::{WireError, be16, put_be16};
use std::net::Ipv6Addr;

pub const HEADER_LEN: usize = 8;
pub const PROTOCOL_V4: u8 = 1;
pub const PROTOCOL_V6: u8 = 58;

pub mod v4 {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    /// Code of DEST_UNREACHABLE: fragmentation needed and DF set.
    pub const CODE_FRAG_NEEDED: u8 = 4;
}

pub mod v6 {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
}

/// A checked view of an ICMP message (at least 8 bytes).
#[derive(Debug)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(IcmpPacket { buf })
    }
    pub fn msg_type(&self) -> u8 {
        self.buf.as_ref()[0]
    }
    pub fn code(&self) -> u8 {
        self.buf.as_ref()[1]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }
    /// The 4 type-specific bytes (echo id/seq, next-hop MTU, ...).
    pub fn rest(&self) -> [u8; 4] {
        let b = self.buf.as_ref();
        [b[4], b[5], b[6], b[7]]
    }
    pub fn echo_ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }
    pub fn echo_seq(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }
    pub fn verify_checksum_v4(&self) -> bool {
        checksum::fold(checksum::sum(self.buf.as_ref())) == 0xffff
    }
    pub fn verify_checksum_v6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        let b = self.buf.as_ref();
        let s = checksum::add(
            checksum::pseudo_v6(src, dst, PROTOCOL_V6, b.len() as u32),
            checksum::sum(b),
        );
        checksum::fold(s) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    pub fn set_header(&mut self, msg_type: u8, code: u8, rest: [u8; 4]) {
        let b = self.buf.as_mut();
        b[0] = msg_type;
        b[1] = code;
        put_be16(b, 2, 0);
        b[4..8].copy_from_slice(&rest);
    }
    pub fn fill_checksum_v4(&mut self) {
        let b = self.buf.as_mut();
        put_be16(b, 2, 0);
        let c = checksum::checksum(b);
        put_be16(b, 2, c);
    }
    pub fn fill_checksum_v6(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        let b = self.buf.as_mut();
        put_be16(b, 2, 0);
        let s = checksum::add(
            checksum::pseudo_v6(src, dst, PROTOCOL_V6, b.len() as u32),
            checksum::sum(b),
        );
        put_be16(b, 2, !checksum::fold(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frag_needed_v4() {
        let mut b = [0u8; 36];
        let mut p = IcmpPacket::new_checked(&mut b[..]).unwrap();
        let mtu = 1420u16.to_be_bytes();
        p.set_header(v4::DEST_UNREACHABLE, v4::CODE_FRAG_NEEDED, [0, 0, mtu[0], mtu[1]]);
        p.fill_checksum_v4();
        assert!(p.verify_checksum_v4());
        assert_eq!(u16::from_be_bytes([p.rest()[2], p.rest()[3]]), 1420);
    }

    #[test]
    fn echo_v6_checksum() {
        let mut b = [0u8; 16];
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd01::2".parse().unwrap(), "fd02::2".parse().unwrap());
        let mut p = IcmpPacket::new_checked(&mut b[..]).unwrap();
        p.set_header(v6::ECHO_REQUEST, 0, [0, 7, 0, 1]);
        p.fill_checksum_v6(s, d);
        assert!(p.verify_checksum_v6(s, d));
        assert_eq!((p.echo_ident(), p.echo_seq()), (7, 1));
        assert!(IcmpPacket::new_checked(&b[..7]).is_err());
    }
}

/// An ICMP (IPv4) or ICMPv6 echo request from `src` to `dst`, as a whole
/// IP packet with 8 bytes of payload: a route group's probe. None if the
/// two addresses are of different families.
pub fn echo_request(src: std::net::IpAddr, dst: std::net::IpAddr, ident: u16, seq: u16) -> Option<Vec<u8>> {
    use std::net::IpAddr;
    let rest = {
        let (i, s) = (ident.to_be_bytes(), seq.to_be_bytes());
        [i[0], i[1], s[0], s[1]]
    };
    let payload = *b"subway\0\0";
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut out = vec![0u8; 20 + HEADER_LEN + payload.len()];
            super::ipv4::emit(&mut out, s, d, PROTOCOL_V4, 64, HEADER_LEN + payload.len());
            out[28..].copy_from_slice(&payload);
            let mut m = IcmpPacket::new_checked(&mut out[20..]).ok()?;
            m.set_header(v4::ECHO_REQUEST, 0, rest);
            m.fill_checksum_v4();
            Some(out)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut out = vec![0u8; 40 + HEADER_LEN + payload.len()];
            super::ipv6::emit(&mut out, s, d, PROTOCOL_V6, 64, HEADER_LEN + payload.len());
            out[48..].copy_from_slice(&payload);
            let mut m = IcmpPacket::new_checked(&mut out[40..]).ok()?;
            m.set_header(v6::ECHO_REQUEST, 0, rest);
            m.fill_checksum_v6(s, d);
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn echo_requests_carry_ident_and_seq_and_valid_checksums() {
        let p = echo_request("10.1.0.1".parse().unwrap(), "10.2.0.11".parse().unwrap(), 0x5177, 9).unwrap();
        let ip = crate::wire::ipv4::Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!((ip.protocol(), ip.total_len()), (PROTOCOL_V4, p.len()));
        let m = IcmpPacket::new_checked(&p[20..]).unwrap();
        assert_eq!(
            (m.msg_type(), m.echo_ident(), m.echo_seq()),
            (v4::ECHO_REQUEST, 0x5177, 9)
        );
        assert!(m.verify_checksum_v4());
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd01::1".parse().unwrap(), "fd02::11".parse().unwrap());
        let p = echo_request(s.into(), d.into(), 1, 2).unwrap();
        let m = IcmpPacket::new_checked(&p[40..]).unwrap();
        assert_eq!((m.msg_type(), m.echo_seq()), (v6::ECHO_REQUEST, 2));
        assert!(m.verify_checksum_v6(s, d));
        assert!(echo_request(s.into(), "10.2.0.1".parse().unwrap(), 1, 2).is_none());
    }
}
