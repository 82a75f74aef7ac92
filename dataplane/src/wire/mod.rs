//! Packet codecs: typed, checked views over frame bytes (smoltcp style).
//!
//! `new_checked` validates lengths and versions once; accessors after that
//! are cheap and cannot panic. Malformed input is a [`WireError`], never a
//! panic, and nothing here allocates.

pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod udp;

pub use ethernet::{EtherType, EthernetFrame, MacAddr};
pub use icmp::IcmpPacket;
pub use ip::IpPacket;
pub use ipv4::Ipv4Packet;
pub use ipv6::Ipv6Packet;
pub use udp::UdpPacket;

/// Why a buffer is not a valid header of the kind asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("buffer shorter than the header")]
    Truncated,
    #[error("wrong IP version")]
    BadVersion,
    #[error("header length field out of range")]
    BadHeaderLen,
    #[error("length field disagrees with the buffer")]
    BadLength,
}

#[inline(always)]
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub(crate) fn put_be16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
