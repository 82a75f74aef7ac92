//! Ethernet II frames with up to two VLAN tags (802.1Q, 802.1ad).

use super::{WireError, be16, put_be16};
use std::fmt;

pub const HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut m = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in m.iter_mut() {
            *b = u8::from_str_radix(parts.next().ok_or(())?, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddr(m))
    }
}

/// EtherType values subway looks at.
pub struct EtherType;
impl EtherType {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88a8;
}

/// A checked view of an Ethernet frame.
#[derive(Debug)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buf: T,
    /// Offset of the L3 header, after any VLAN tags.
    l3: usize,
    ethertype: u16,
    vlans: u8,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Validates the header and any VLAN tags (at most two).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let mut ethertype = be16(b, 12);
        let mut l3 = HEADER_LEN;
        let mut vlans = 0;
        while (ethertype == EtherType::VLAN || ethertype == EtherType::QINQ) && vlans < 2 {
            if b.len() < l3 + VLAN_TAG_LEN {
                return Err(WireError::Truncated);
            }
            ethertype = be16(b, l3 + 2);
            l3 += VLAN_TAG_LEN;
            vlans += 1;
        }
        Ok(EthernetFrame {
            buf,
            l3,
            ethertype,
            vlans,
        })
    }

    pub fn dst(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buf.as_ref()[0..6]);
        MacAddr(m)
    }
    pub fn src(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buf.as_ref()[6..12]);
        MacAddr(m)
    }
    /// The EtherType after any VLAN tags.
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }
    /// How many VLAN tags the frame carries.
    pub fn vlan_count(&self) -> u8 {
        self.vlans
    }
    /// The outer VLAN id, if tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        (self.vlans > 0).then(|| be16(self.buf.as_ref(), 14) & 0x0fff)
    }
    /// Offset of the L3 header in the frame.
    pub fn header_len(&self) -> usize {
        self.l3
    }
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.l3..]
    }
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst(&mut self, m: MacAddr) {
        self.buf.as_mut()[0..6].copy_from_slice(&m.0);
    }
    pub fn set_src(&mut self, m: MacAddr) {
        self.buf.as_mut()[6..12].copy_from_slice(&m.0);
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let l3 = self.l3;
        &mut self.buf.as_mut()[l3..]
    }
}

/// Writes an untagged Ethernet header at the start of `buf` (at least 14 bytes).
pub fn emit(buf: &mut [u8], dst: MacAddr, src: MacAddr, ethertype: u16) {
    buf[0..6].copy_from_slice(&dst.0);
    buf[6..12].copy_from_slice(&src.0);
    put_be16(buf, 12, ethertype);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_untagged() {
        let mut f = [0u8; 60];
        emit(&mut f, MacAddr([1; 6]), MacAddr([2; 6]), EtherType::IPV4);
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(e.ethertype(), EtherType::IPV4);
        assert_eq!(e.header_len(), 14);
        assert_eq!(e.dst(), MacAddr([1; 6]));
        assert_eq!(e.src(), MacAddr([2; 6]));
        assert_eq!(e.vlan_id(), None);
    }

    #[test]
    fn parses_qinq() {
        let mut f = [0u8; 60];
        emit(&mut f, MacAddr([1; 6]), MacAddr([2; 6]), EtherType::QINQ);
        f[14..16].copy_from_slice(&0x0064u16.to_be_bytes());
        f[16..18].copy_from_slice(&EtherType::VLAN.to_be_bytes());
        f[20..22].copy_from_slice(&EtherType::IPV6.to_be_bytes());
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(e.ethertype(), EtherType::IPV6);
        assert_eq!(e.header_len(), 22);
        assert_eq!(e.vlan_count(), 2);
        assert_eq!(e.vlan_id(), Some(100));
    }

    #[test]
    fn rejects_truncated() {
        assert_eq!(
            EthernetFrame::new_checked(&[0u8; 13][..]).unwrap_err(),
            WireError::Truncated
        );
        let mut f = [0u8; 16];
        f[12..14].copy_from_slice(&EtherType::VLAN.to_be_bytes());
        assert_eq!(EthernetFrame::new_checked(&f[..]).unwrap_err(), WireError::Truncated);
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "02:00:0a:ff:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "02:00:0a:ff:00:01");
        assert!("02:00".parse::<MacAddr>().is_err());
    }
}
