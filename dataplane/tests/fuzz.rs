//! Bounded, deterministic mutation fuzzing of every parser that sees
//! bytes from the network, on stable Rust, as part of `cargo test`.
//!
//! Seeds are valid messages made by two real devices; each round mutates
//! one (bit flips, byte overwrites, truncation, extension, type swaps) and
//! feeds it to the parser. For handshake messages the fuzzer can re-seal
//! mac1 after mutating, so the Noise decoding behind the mac1 gate is
//! reached too. A target passes if nothing panics and the genuine seeds
//! are still accepted. The rounds are fixed (fixed seeds, no time budget),
//! so a run is the same on any machine; `SUBWAY_FUZZ_ITERS` (default
//! 50000 per target) runs more. For coverage-guided fuzzing on nightly,
//! see `dataplane/fuzz/` (`cargo fuzz`).

use std::net::SocketAddr;
use std::time::Duration;
use subway_dataplane::wg::crypto::{mac, mac1_key};
use subway_dataplane::wg::device::{Device, Received};
use subway_dataplane::wg::messages::{Message, init, resp};
use subway_dataplane::wg::peer::PeerConfig;
use subway_dataplane::wg::{Now, WgError};
use subway_dataplane::wire::{EthernetFrame, IcmpPacket, Ipv4Packet, Ipv6Packet, UdpPacket};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iters() -> usize {
    std::env::var("SUBWAY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 if !m.is_empty() => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 if !m.is_empty() => {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
            2 => m.truncate(rng.below(m.len() + 1)),
            3 => {
                for _ in 0..rng.below(64) {
                    m.push(rng.next() as u8);
                }
            }
            4 if !m.is_empty() => m[0] = rng.below(6) as u8,
            5 if m.len() >= 12 => {
                // Overwrite an index field with a small or random value.
                let off = 4 + 4 * rng.below(2);
                let v = if rng.below(2) == 0 {
                    rng.below(4) as u32
                } else {
                    rng.next() as u32
                };
                m[off..off + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let n = rng.below(200);
                m = (0..n).map(|_| rng.next() as u8).collect();
            }
        }
    }
    m
}

const A: &str = "192.0.2.1:51820";
const B: &str = "192.0.2.2:51820";

fn now() -> Now {
    Now {
        mono: Duration::from_secs(100),
        unix: Duration::from_secs(1_750_000_000),
    }
}

fn devices() -> (Device, Device) {
    let mut a = Device::new([1u8; 32]);
    let mut b = Device::new([2u8; 32]);
    let (pa, pb) = (a.public, b.public);
    let cfg = |k: [u8; 32], net: &str, ep: Option<&str>| PeerConfig {
        public_key: k,
        preshared_key: None,
        endpoint: ep.map(|e| e.parse().unwrap()),
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: None,
        vnet: 0,
    };
    a.add_peer(&cfg(pb, "0.0.0.0/0", Some(B))).unwrap();
    b.add_peer(&cfg(pa, "0.0.0.0/0", None)).unwrap();
    (a, b)
}

/// Valid initiation, response and data messages (a -> b, b -> a, a -> b).
fn seeds() -> (Vec<u8>, Vec<u8>, Vec<u8>, Device, Device) {
    let (mut a, mut b) = devices();
    a.send(0, &[], now()).unwrap();
    let m1 = a.tick(now()).remove(0).datagram;
    let Received::Send(r) = b.receive(A.parse().unwrap(), &mut m1.clone(), now()).unwrap() else {
        panic!()
    };
    let m2 = r[0].datagram.clone();
    let Received::Send(d) = a.receive(B.parse().unwrap(), &mut m2.clone(), now()).unwrap() else {
        panic!()
    };
    let mut pkt = vec![0u8; 60];
    subway_dataplane::wire::ipv4::emit(&mut pkt, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 17, 64, 40);
    let data = a.send(0, &pkt, now()).unwrap().unwrap().datagram;
    let _ = d;
    (m1, m2, data, a, b)
}

/// Re-seals mac1 of a handshake message after mutation, for `receiver_pub`.
fn reseal(m: &mut [u8], receiver_pub: &[u8; 32]) {
    let off = match (m.first(), m.len()) {
        (Some(1), 148) => init::MAC1,
        (Some(2), 92) => resp::MAC1,
        _ => return,
    };
    let k = mac1_key(receiver_pub);
    let m1 = mac(&k, &m[..off]);
    m[off..off + 16].copy_from_slice(&m1);
}

#[test]
fn fuzz_message_parse() {
    let (m1, m2, data, ..) = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut classified = 0usize;
    for i in 0..iters() * 10 {
        let seed = [&m1, &m2, &data][i % 3];
        let m = mutate(&mut rng, seed);
        if Message::parse(&m).is_ok() {
            classified += 1;
        }
    }
    assert!(classified > 0, "the mutator never produced a well-formed message");
    assert!(Message::parse(&m1).is_ok() && Message::parse(&m2).is_ok() && Message::parse(&data).is_ok());
}

#[test]
fn fuzz_device_receive_handshakes_and_data() {
    let (m1, m2, data, a, b) = seeds();
    let (mut a, mut b) = (a, b);
    let (pa, pb) = (a.public, b.public);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut errors = std::collections::HashMap::<&'static str, usize>::new();
    for i in 0..iters() {
        let (target_is_b, seed) = match i % 3 {
            0 => (true, &m1),
            1 => (false, &m2),
            _ => (true, &data),
        };
        let mut m = mutate(&mut rng, seed);
        if rng.below(2) == 0 {
            reseal(&mut m, if target_is_b { &pb } else { &pa });
        }
        let (dev, src): (&mut Device, SocketAddr) = if target_is_b {
            (&mut b, A.parse().unwrap())
        } else {
            (&mut a, B.parse().unwrap())
        };
        match dev.receive(src, &mut m, now()) {
            Ok(_) => *errors.entry("accepted").or_default() += 1,
            Err(e) => *errors.entry(e.name()).or_default() += 1,
        }
    }
    // Mutations with a re-sealed mac1 reach the Noise layer.
    assert!(
        errors.get(WgError::HandshakeFailed.name()).copied().unwrap_or(0) > 0,
        "{errors:?}"
    );
    assert!(
        errors.get(WgError::BadMac1.name()).copied().unwrap_or(0) > 0,
        "{errors:?}"
    );
    // The genuine data message still decrypts exactly once (it was never
    // delivered unmutated above... unless a mutation left it intact).
    let r = b.receive(A.parse().unwrap(), &mut data.clone(), now());
    assert!(
        matches!(r, Ok(Received::Data { .. })) || r == Err(WgError::Replayed),
        "{r:?}"
    );
}

#[test]
fn fuzz_wire_codecs() {
    let mut rng = Rng(42);
    let mut seed = vec![0u8; 74];
    seed[12] = 0x08;
    subway_dataplane::wire::ipv4::emit(&mut seed[14..], [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 17, 64, 40);
    subway_dataplane::wire::udp::emit(&mut seed[34..], 1, 2, 32);
    let mut ok = 0usize;
    for _ in 0..iters() * 10 {
        let f = mutate(&mut rng, &seed);
        if let Ok(e) = EthernetFrame::new_checked(&f[..]) {
            let _ = (e.dst(), e.src(), e.vlan_id(), e.payload().len());
            let p = e.payload();
            if let Ok(ip) = Ipv4Packet::new_checked(p) {
                ok += 1;
                let _ = (
                    ip.src(),
                    ip.dst(),
                    ip.verify_checksum(),
                    ip.frag_offset(),
                    ip.payload().len(),
                );
                if let Ok(u) = UdpPacket::new_checked(ip.payload()) {
                    let _ = (u.verify_checksum_v4(ip.src(), ip.dst()), u.payload().len());
                }
                if let Ok(icmp) = IcmpPacket::new_checked(ip.payload()) {
                    let _ = (icmp.verify_checksum_v4(), icmp.rest());
                }
            }
            if let Ok(ip) = Ipv6Packet::new_checked(p) {
                let _ = (ip.src(), ip.dst(), ip.payload().len());
            }
        }
    }
    assert!(ok > 0);
}

/// Seeds for the fast path's own parsers: a WireGuard data message in
/// Ethernet/IPv4/UDP and Ethernet/IPv6/UDP, TCP SYNs with an MSS option,
/// plain UDP.
fn fast_path_seeds() -> Vec<Vec<u8>> {
    use subway_dataplane::wire::{EtherType, MacAddr, ethernet, ipv4, ipv6, udp};
    let (_, _, data, ..) = seeds();
    let mut out = Vec::new();
    let mut f = vec![0u8; 14 + 20 + 8 + data.len()];
    ethernet::emit(
        &mut f,
        MacAddr([2, 0, 0, 0, 0, 1]),
        MacAddr([2, 0, 0, 0, 0, 2]),
        EtherType::IPV4,
    );
    ipv4::emit(
        &mut f[14..],
        [192, 0, 2, 2].into(),
        [192, 0, 2, 1].into(),
        17,
        64,
        8 + data.len(),
    );
    udp::emit(&mut f[34..], 51820, 51820, data.len());
    f[42..].copy_from_slice(&data);
    out.push(f);
    let mut f = vec![0u8; 14 + 40 + 8 + data.len()];
    ethernet::emit(
        &mut f,
        MacAddr([2, 0, 0, 0, 0, 1]),
        MacAddr([2, 0, 0, 0, 0, 2]),
        EtherType::IPV6,
    );
    ipv6::emit(
        &mut f[14..],
        "2001:db8::2".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
        17,
        64,
        8 + data.len(),
    );
    udp::emit(&mut f[54..], 51820, 51820, data.len());
    f[62..].copy_from_slice(&data);
    out.push(f);
    // TCP SYN with options MSS 1460, SACK permitted, timestamps, in IPv4 and IPv6.
    let opts = [2u8, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
    let mut syn = vec![0u8; 20 + opts.len()];
    syn[12] = ((20 + opts.len()) as u8 / 4) << 4;
    syn[13] = 0x02;
    syn[20..].copy_from_slice(&opts);
    let mut p = vec![0u8; 20 + syn.len()];
    ipv4::emit(&mut p, [10, 1, 0, 2].into(), [10, 2, 0, 2].into(), 6, 64, syn.len());
    p[20..].copy_from_slice(&syn);
    out.push(p);
    let mut p = vec![0u8; 40 + syn.len()];
    ipv6::emit(
        &mut p,
        "fd01::2".parse().unwrap(),
        "fd02::2".parse().unwrap(),
        6,
        64,
        syn.len(),
    );
    p[40..].copy_from_slice(&syn);
    out.push(p);
    out
}

#[test]
fn fuzz_outer_and_inner_parsers_and_mss_clamping() {
    use subway_dataplane::tunnel::{clamp_mss, parse_inner, parse_outer};
    let seeds = fast_path_seeds();
    assert!(parse_outer(&seeds[0]).is_some() && parse_outer(&seeds[1]).is_some());
    assert!(parse_inner(&seeds[2]).is_some() && parse_inner(&seeds[3]).is_some());
    let mut rng = Rng(0x005e_ed0f_0a57);
    let (mut outer, mut inner, mut clamped) = (0usize, 0usize, 0usize);
    for i in 0..iters() * 4 {
        let mut m = mutate(&mut rng, &seeds[i % seeds.len()]);
        if let Some(r) = parse_outer(&m) {
            outer += 1;
            assert!(
                r.msg_start <= r.msg_end && r.msg_end <= m.len(),
                "{r:?} for {} bytes",
                m.len()
            );
        }
        if let Some(p) = parse_inner(&m) {
            inner += 1;
            assert!(p.len <= m.len(), "inner length {} of {} bytes", p.len, m.len());
        }
        let len = m.len();
        if clamp_mss(&mut m, 1420) {
            clamped += 1;
        }
        assert_eq!(m.len(), len, "clamping never resizes");
    }
    assert!(outer > 0 && inner > 0 && clamped > 0, "{outer} {inner} {clamped}");
    // The genuine SYNs are clamped to the tunnel's MSS.
    let mut syn = seeds[2].clone();
    assert!(clamp_mss(&mut syn, 1420));
    assert_eq!(u16::from_be_bytes([syn[42], syn[43]]), 1380);
}

#[test]
fn fuzz_route_frame() {
    use subway_dataplane::fib::{Fib, Target};
    use subway_dataplane::forward::route_frame;
    use subway_dataplane::tables::{NeighTable, Port, Tables};
    use subway_dataplane::wire::MacAddr;
    let mut fib = Fib::new();
    fib.insert(0, "10.1.0.0/24".parse().unwrap(), Target::Port(0)).unwrap();
    fib.insert(0, "10.2.0.0/24".parse().unwrap(), Target::Port(1)).unwrap();
    fib.insert(0, "fd02::/64".parse().unwrap(), Target::Port(1)).unwrap();
    fib.insert(0, "192.0.2.0/24".parse().unwrap(), Target::Peer(0)).unwrap();
    let mut neigh = NeighTable::default();
    neigh.insert(20, "10.2.0.2".parse().unwrap(), MacAddr([2, 0, 0, 0, 0, 0xb]));
    let port = |name: &str, ifindex, last| Port {
        name: name.into(),
        ifindex,
        mac: MacAddr([2, 0, 0, 0, 1, last]),
        vnet: 0,
        mtu: 1500,
    };
    let t = Tables {
        fib: fib.into(),
        neigh,
        ports: vec![port("lan0", 10, 0), port("lan1", 20, 1)],
        ..Default::default()
    };
    let seeds = fast_path_seeds();
    let mut rng = Rng(0x00f0_4a2d);
    let mut verdicts = std::collections::HashMap::<String, usize>::new();
    for i in 0..iters() * 4 {
        let mut m = mutate(&mut rng, &seeds[i % 2]);
        let v = route_frame(&mut m, (i % 2) as u16, &t);
        let name = format!("{v:?}");
        *verdicts
            .entry(name.split(['(', ' ']).next().unwrap_or("").to_string())
            .or_default() += 1;
    }
    assert!(verdicts.len() >= 3, "the mutations reached few verdicts: {verdicts:?}");
}
