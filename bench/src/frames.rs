//! UDP test frames: sizes, IMIX, and templates the generator fills once
//! and then only stamps with a sequence number.

use std::net::Ipv4Addr;
use subway_dataplane::wire::{EtherType, MacAddr, ethernet, ipv4, udp};

/// Bytes of an Ethernet + IPv4 + UDP header.
pub const HEADERS: usize = 14 + 20 + 8;
/// Payload bytes used for the sequence number and a flow id.
pub const STAMP: usize = 12;

/// A packet size or a mix, by L2 frame length without FCS (a "64-byte"
/// packet is 60 bytes here, as on the wire before the FCS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Size {
    Fixed(usize),
    /// The simple IMIX: 7 x 64, 4 x 570, 1 x 1518 (wire sizes).
    Imix,
}

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        if s.eq_ignore_ascii_case("imix") {
            return Ok(Size::Imix);
        }
        let n: usize = s
            .parse()
            .map_err(|_| format!("size {s:?}: a number of bytes (64 to 1518) or imix"))?;
        if !(64..=1518).contains(&n) {
            return Err(format!("size {n} out of range: 64 to 1518 (wire bytes, with FCS)"));
        }
        Ok(Size::Fixed(n))
    }

    pub fn label(&self) -> String {
        match self {
            Size::Fixed(n) => n.to_string(),
            Size::Imix => "imix".into(),
        }
    }

    /// Frame lengths without FCS, in the order the generator cycles them.
    pub fn frame_lens(&self) -> Vec<usize> {
        match self {
            Size::Fixed(n) => vec![n - 4],
            Size::Imix => {
                let mut v = vec![60; 7];
                v.extend([566; 4]);
                v.push(1514);
                v
            }
        }
    }

    /// Mean wire size (with FCS) for bit-rate figures.
    pub fn mean_wire_bytes(&self) -> f64 {
        let l = self.frame_lens();
        l.iter().map(|x| (x + 4) as f64).sum::<f64>() / l.len() as f64
    }
}

/// Addresses of generated frames.
#[derive(Clone, Copy, Debug)]
pub struct FlowSpec {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// Distinct UDP source ports (flows), from 10000 upwards.
    pub flows: u16,
}

/// Writes a complete frame of `len` bytes for flow `flow` into `buf`. The
/// UDP checksum is 0 (none, valid for IPv4) so that stamping a sequence
/// number needs no checksum update.
pub fn build(buf: &mut [u8], len: usize, spec: &FlowSpec, flow: u16) -> usize {
    let len = len.max(HEADERS + STAMP);
    let payload = len - HEADERS;
    ethernet::emit(buf, spec.dst_mac, spec.src_mac, EtherType::IPV4);
    ipv4::emit(&mut buf[14..], spec.src_ip, spec.dst_ip, udp::PROTOCOL, 64, 8 + payload);
    udp::emit(&mut buf[34..], 10000 + flow % spec.flows.max(1), spec.dst_port, payload);
    for (i, b) in buf[HEADERS..len].iter_mut().enumerate() {
        *b = i as u8;
    }
    buf[HEADERS + 8..HEADERS + 12].copy_from_slice(&(flow as u32).to_be_bytes());
    len
}

/// Writes an Ethernet + IPv4 + UDP frame from `from` to `to` around
/// `payload` (a WireGuard message) into `buf`; returns its length. UDP
/// checksum 0, as WireGuard implementations send over IPv4.
pub fn wrap_udp(
    buf: &mut [u8],
    spec: &FlowSpec,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    payload: &[u8],
) -> usize {
    let len = HEADERS + payload.len();
    ethernet::emit(buf, spec.dst_mac, spec.src_mac, EtherType::IPV4);
    ipv4::emit(
        &mut buf[14..],
        *from.ip(),
        *to.ip(),
        udp::PROTOCOL,
        64,
        8 + payload.len(),
    );
    udp::emit(&mut buf[34..], from.port(), to.port(), payload.len());
    buf[HEADERS..len].copy_from_slice(payload);
    len
}

/// Sets the UDP ports of a built frame (checksum 0: nothing to update).
#[inline(always)]
pub fn set_ports(buf: &mut [u8], sport: u16, dport: u16) {
    buf[34..36].copy_from_slice(&sport.to_be_bytes());
    buf[36..38].copy_from_slice(&dport.to_be_bytes());
}

/// Stamps the sequence number into a built frame.
#[inline(always)]
pub fn stamp(buf: &mut [u8], seq: u64) {
    buf[HEADERS..HEADERS + 8].copy_from_slice(&seq.to_be_bytes());
}

/// Reads (sequence, flow) back from a frame, if it is one of ours.
pub fn read_stamp(frame: &[u8]) -> Option<(u64, u32)> {
    if frame.len() < HEADERS + STAMP {
        return None;
    }
    let seq = u64::from_be_bytes(frame[HEADERS..HEADERS + 8].try_into().ok()?);
    let flow = u32::from_be_bytes(frame[HEADERS + 8..HEADERS + 12].try_into().ok()?);
    Some((seq, flow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use subway_dataplane::wire::{Ipv4Packet, UdpPacket};

    #[test]
    fn frames_are_valid_and_stamped() {
        let spec = FlowSpec {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src_ip: Ipv4Addr::new(10, 1, 0, 2),
            dst_ip: Ipv4Addr::new(10, 2, 0, 99),
            dst_port: 9,
            flows: 4,
        };
        for size in [Size::Fixed(64), Size::Fixed(1420), Size::Imix] {
            for len in size.frame_lens() {
                let mut buf = [0u8; 2048];
                let n = build(&mut buf, len, &spec, 5);
                assert_eq!(n, len);
                stamp(&mut buf, 77);
                let ip = Ipv4Packet::new_checked(&buf[14..n]).unwrap();
                assert!(ip.verify_checksum());
                assert_eq!(ip.total_len(), n - 14);
                let u = UdpPacket::new_checked(ip.payload()).unwrap();
                assert_eq!(u.src_port(), 10001);
                assert_eq!(read_stamp(&buf[..n]), Some((77, 5)));
            }
        }
        assert_eq!(Size::Imix.frame_lens().len(), 12);
        assert!((Size::Imix.mean_wire_bytes() - 353.83).abs() < 0.1);
        assert!(Size::parse("63").is_err() && Size::parse("imix").is_ok());
    }
}
