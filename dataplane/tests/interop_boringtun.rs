//! Interoperability with boringtun's `Tunn`, the reference peer, in
//! process: both roles, data both ways, keepalives, rekey after time and
//! after messages, cookie replies under load in both directions, and the
//! refusals (replayed data, replayed initiation, tampering, unknown index).

use boringtun::noise::{Tunn, TunnResult, rate_limiter::RateLimiter};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use subway_dataplane::wg::device::{Device, Outgoing, Received};
use subway_dataplane::wg::peer::PeerConfig;
use subway_dataplane::wg::{Now, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, WgError};
use subway_dataplane::wire::ipv4;

const OURS: &str = "192.0.2.1:51820";
const THEIRS: &str = "192.0.2.2:51820";
const OUR_NET: [u8; 4] = [10, 1, 0, 0];
const THEIR_NET: [u8; 4] = [10, 2, 0, 0];

struct Pair {
    ours: Device,
    theirs: Tunn,
    now: Now,
    buf: Vec<u8>,
}

fn packet(src: [u8; 4], dst: [u8; 4], tag: u32) -> Vec<u8> {
    let payload = tag.to_be_bytes();
    let mut p = vec![0u8; 20 + 8 + payload.len()];
    ipv4::emit(&mut p, src.into(), dst.into(), 17, 64, 8 + payload.len());
    p[28..].copy_from_slice(&payload);
    p
}

fn host(net: [u8; 4], h: u8) -> [u8; 4] {
    [net[0], net[1], net[2], h]
}

impl Pair {
    /// `their_limit`: boringtun's handshake rate limit (0 puts it under load).
    fn new(their_limit: u64, psk: Option<[u8; 32]>) -> Pair {
        let our_private = [0x5au8; 32];
        let their_secret = StaticSecret::from([0xa5u8; 32]);
        let their_public = PublicKey::from(&their_secret);
        let mut ours = Device::new(our_private);
        ours.add_peer(&PeerConfig {
            public_key: *their_public.as_bytes(),
            preshared_key: psk,
            endpoint: Some(THEIRS.parse().unwrap()),
            allowed_ips: vec![
                format!("{}.{}.{}.0/24", THEIR_NET[0], THEIR_NET[1], THEIR_NET[2])
                    .parse()
                    .unwrap(),
            ],
            persistent_keepalive: None,
            vnet: 0,
        })
        .unwrap();
        let our_public = PublicKey::from(ours.public);
        let limiter = Arc::new(RateLimiter::new(&their_public, their_limit));
        let theirs = Tunn::new(their_secret, our_public, psk, None, 0x1000, Some(limiter));
        Pair {
            ours,
            theirs,
            now: Now {
                mono: Duration::from_secs(10_000),
                unix: Duration::from_secs(1_750_000_000),
            },
            buf: vec![0u8; 65536],
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now.plus(d);
    }

    /// Hands our datagram to boringtun; returns (datagrams it sends back,
    /// inner packets it delivered).
    fn deliver_to_theirs(&mut self, d: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let src: IpAddr = OURS.parse::<SocketAddr>().unwrap().ip();
        let (mut net, mut tun) = (Vec::new(), Vec::new());
        let mut first = true;
        loop {
            let input: &[u8] = if first { d } else { &[] };
            match self.theirs.decapsulate(Some(src), input, &mut self.buf) {
                TunnResult::WriteToNetwork(b) => net.push(b.to_vec()),
                TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                    tun.push(b.to_vec());
                    break;
                }
                TunnResult::Done => break,
                TunnResult::Err(e) => panic!("boringtun refused our datagram: {e:?}"),
            }
            first = false;
        }
        (net, tun)
    }

    /// Hands boringtun's datagram to us.
    fn deliver_to_ours(&mut self, d: &[u8]) -> Result<(Received, Vec<u8>), WgError> {
        let mut d = d.to_vec();
        let r = self.ours.receive(THEIRS.parse().unwrap(), &mut d, self.now)?;
        Ok((r, d))
    }

    fn their_encapsulate(&mut self, p: &[u8]) -> Vec<u8> {
        match self.theirs.encapsulate(p, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            other => panic!("boringtun did not encapsulate: {other:?}"),
        }
    }

    fn our_send(&mut self, p: &[u8]) -> Option<Vec<u8>> {
        self.ours.send(0, p, self.now).unwrap().map(|o| o.datagram)
    }

    /// Expects `r` to be data equal to `want`.
    fn expect_data(r: (Received, Vec<u8>), want: &[u8]) {
        match r.0 {
            Received::Data { peer: 0, start, end } => assert_eq!(&r.1[start..end], want),
            other => panic!("expected data, got {other:?}"),
        }
    }

    /// We initiate (with a queued packet): full handshake, the packet arrives.
    fn handshake_from_ours(&mut self, tag: u32) {
        let p = packet(host(OUR_NET, 5), host(THEIR_NET, 5), tag);
        assert_eq!(self.our_send(&p), None, "queued until the handshake completes");
        let out = self.ours.tick(self.now);
        assert_eq!(out.len(), 1, "one initiation");
        let (back, _) = self.deliver_to_theirs(&out[0].datagram);
        assert_eq!(back.len(), 1, "boringtun answers with a response");
        let (r, _) = self.deliver_to_ours(&back[0]).unwrap();
        let Received::Send(sends) = r else {
            panic!("expected our queued data, got {r:?}")
        };
        assert_eq!(sends.len(), 1);
        let (_, tun) = self.deliver_to_theirs(&sends[0].datagram);
        assert_eq!(tun, vec![p], "the queued packet arrived intact");
    }
}

fn sends(r: Received) -> Vec<Outgoing> {
    match r {
        Received::Send(v) => v,
        other => panic!("expected datagrams to send, got {other:?}"),
    }
}

#[test]
fn we_initiate_and_data_flows_both_ways() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    for i in 0..50 {
        let ours = packet(host(OUR_NET, 5), host(THEIR_NET, 9), i);
        let d = p.our_send(&ours).unwrap();
        assert_eq!(p.deliver_to_theirs(&d).1, vec![ours]);
        let theirs = packet(host(THEIR_NET, 9), host(OUR_NET, 5), 1000 + i);
        let d = p.their_encapsulate(&theirs);
        Pair::expect_data(p.deliver_to_ours(&d).unwrap(), &theirs);
    }
}

#[test]
fn boringtun_initiates_and_we_respond() {
    let mut p = Pair::new(100, Some([7u8; 32]));
    let first = packet(host(THEIR_NET, 2), host(OUR_NET, 3), 42);
    let init = p.their_encapsulate(&first);
    assert_eq!(init.len(), 148, "no session yet: boringtun sends an initiation");
    let (r, _) = p.deliver_to_ours(&init).unwrap();
    let resp = sends(r);
    assert_eq!(resp[0].datagram.len(), 92);
    // boringtun completes the handshake and sends what it queued.
    let (back, _) = p.deliver_to_theirs(&resp[0].datagram);
    let mut delivered = Vec::new();
    for d in back {
        match p.deliver_to_ours(&d).unwrap() {
            (Received::Data { start, end, .. }, buf) => delivered.push(buf[start..end].to_vec()),
            (Received::Keepalive { .. }, _) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delivered, vec![first]);
    // Our responder session is confirmed: we can send.
    let ours = packet(host(OUR_NET, 3), host(THEIR_NET, 2), 43);
    let d = p.our_send(&ours).expect("the session is confirmed");
    assert_eq!(p.deliver_to_theirs(&d).1, vec![ours]);
}

#[test]
fn keepalives_both_ways() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    // boringtun sends data; we send nothing back for KEEPALIVE_TIMEOUT.
    let d = p.their_encapsulate(&packet(host(THEIR_NET, 1), host(OUR_NET, 1), 5));
    p.deliver_to_ours(&d).unwrap();
    p.advance(Duration::from_secs(9));
    assert!(p.ours.tick(p.now).is_empty());
    p.advance(Duration::from_secs(1));
    let out = p.ours.tick(p.now);
    assert_eq!(out.len(), 1, "a keepalive after 10 s");
    assert_eq!(out[0].datagram.len(), 32, "header + empty payload + tag");
    let (net, tun) = p.deliver_to_theirs(&out[0].datagram);
    assert!(
        net.is_empty() && tun.is_empty(),
        "boringtun accepts the keepalive silently"
    );
    // And boringtun's keepalive (an empty packet) reaches us as one.
    let k = p.their_encapsulate(&[]);
    assert_eq!(p.deliver_to_ours(&k).unwrap().0, Received::Keepalive { peer: 0 });
}

#[test]
fn rekey_after_time_loses_nothing_in_flight() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    let old_index = p.ours.peer(0).unwrap().current.as_ref().unwrap().local_index;
    p.advance(REKEY_AFTER_TIME + Duration::from_secs(1));
    // Sending on an old session wants a rekey; the packet still goes out.
    let ours = packet(host(OUR_NET, 5), host(THEIR_NET, 5), 2);
    let d = p.our_send(&ours).unwrap();
    assert_eq!(p.deliver_to_theirs(&d).1, vec![ours]);
    // A packet boringtun sealed with the old session is still in flight...
    let in_flight = packet(host(THEIR_NET, 5), host(OUR_NET, 5), 3);
    let late = p.their_encapsulate(&in_flight);
    // ...while the new handshake runs.
    let out = p.ours.tick(p.now);
    assert_eq!(out.len(), 1, "the rekey initiation");
    assert_eq!(out[0].datagram.len(), 148);
    let (back, _) = p.deliver_to_theirs(&out[0].datagram);
    let (r, _) = p.deliver_to_ours(&back[0]).unwrap();
    for o in sends(r) {
        p.deliver_to_theirs(&o.datagram);
    }
    let new_index = p.ours.peer(0).unwrap().current.as_ref().unwrap().local_index;
    assert_ne!(old_index, new_index, "a new session is current");
    // The old session still opens what was in flight.
    Pair::expect_data(p.deliver_to_ours(&late).unwrap(), &in_flight);
    // And new traffic flows on the new session both ways.
    let ours = packet(host(OUR_NET, 5), host(THEIR_NET, 5), 4);
    let d = p.our_send(&ours).unwrap();
    assert_eq!(
        u32::from_le_bytes(d[4..8].try_into().unwrap()),
        p.ours.peer(0).unwrap().current.as_ref().unwrap().remote_index
    );
    assert_eq!(p.deliver_to_theirs(&d).1, vec![ours]);
    let theirs = packet(host(THEIR_NET, 5), host(OUR_NET, 5), 5);
    let d = p.their_encapsulate(&theirs);
    Pair::expect_data(p.deliver_to_ours(&d).unwrap(), &theirs);
}

#[test]
fn rekey_after_messages() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    // Jump the session's counter to REKEY_AFTER_MESSAGES without sending.
    let s = p.ours.peer(0).unwrap().current.clone().unwrap();
    s.reserve(REKEY_AFTER_MESSAGES - s.sent()).unwrap();
    let ours = packet(host(OUR_NET, 5), host(THEIR_NET, 5), 2);
    let d = p.our_send(&ours).unwrap();
    assert_eq!(u64::from_le_bytes(d[8..16].try_into().unwrap()), REKEY_AFTER_MESSAGES);
    assert_eq!(
        p.deliver_to_theirs(&d).1,
        vec![ours],
        "boringtun accepts a counter of 2^60"
    );
    // Initiations are at most one per REKEY_TIMEOUT; the last was at the start.
    p.advance(Duration::from_secs(6));
    let out = p.ours.tick(p.now);
    assert_eq!(out.len(), 1, "REKEY_AFTER_MESSAGES starts a handshake");
    let (back, _) = p.deliver_to_theirs(&out[0].datagram);
    let (r, _) = p.deliver_to_ours(&back[0]).unwrap();
    let _ = sends(r);
    assert!(!Arc::ptr_eq(p.ours.peer(0).unwrap().current.as_ref().unwrap(), &s));
}

#[test]
fn sessions_expire_after_reject_after_time() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    let d = p.their_encapsulate(&packet(host(THEIR_NET, 5), host(OUR_NET, 5), 9));
    p.advance(REJECT_AFTER_TIME);
    assert_eq!(p.deliver_to_ours(&d).unwrap_err(), WgError::Expired);
    // Nothing can be sent on it either: the packet is queued for a new handshake.
    assert_eq!(p.our_send(&packet(host(OUR_NET, 5), host(THEIR_NET, 5), 1)), None);
}

#[test]
fn we_send_a_cookie_under_load_and_boringtun_retries_with_mac2() {
    let mut p = Pair::new(100, None);
    p.ours.cookies.force_under_load(true);
    let init = p.their_encapsulate(&packet(host(THEIR_NET, 2), host(OUR_NET, 3), 1));
    let (r, _) = p.deliver_to_ours(&init).unwrap();
    let reply = sends(r);
    assert_eq!(reply[0].datagram.len(), 64, "a cookie reply, no handshake");
    let (net, _) = p.deliver_to_theirs(&reply[0].datagram);
    assert!(net.is_empty(), "boringtun stores the cookie");
    // boringtun's retry carries mac2 made with our cookie.
    let retry = match p.theirs.format_handshake_initiation(&mut p.buf, true) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    assert_ne!(&retry[132..148], &[0u8; 16], "mac2 is set");
    let (r, _) = p.deliver_to_ours(&retry).unwrap();
    assert_eq!(sends(r)[0].datagram.len(), 92, "now a real response");
}

#[test]
fn boringtun_under_load_sends_us_a_cookie_and_our_retry_passes() {
    let mut p = Pair::new(0, None);
    p.our_send(&packet(host(OUR_NET, 5), host(THEIR_NET, 5), 1));
    let out = p.ours.tick(p.now);
    let (back, _) = p.deliver_to_theirs(&out[0].datagram);
    assert_eq!(back[0].len(), 64, "boringtun under load answers with a cookie reply");
    assert_eq!(
        p.deliver_to_ours(&back[0]).unwrap().0,
        Received::CookieStored { peer: 0 }
    );
    // Our retransmission (after REKEY_TIMEOUT and jitter) carries mac2.
    p.advance(Duration::from_millis(5400));
    let out = p.ours.tick(p.now);
    assert_eq!(out.len(), 1, "retransmitted initiation");
    assert_ne!(&out[0].datagram[132..148], &[0u8; 16], "mac2 is set");
    let (back, _) = p.deliver_to_theirs(&out[0].datagram);
    assert_eq!(back[0].len(), 92, "boringtun accepts it and responds");
    let (r, _) = p.deliver_to_ours(&back[0]).unwrap();
    let (_, tun) = p.deliver_to_theirs(&sends(r)[0].datagram);
    assert_eq!(tun.len(), 1, "the queued packet arrives");
}

#[test]
fn replayed_data_and_initiations_are_refused() {
    let mut p = Pair::new(100, None);
    let init = p.their_encapsulate(&packet(host(THEIR_NET, 2), host(OUR_NET, 3), 1));
    let (r, _) = p.deliver_to_ours(&init).unwrap();
    assert_eq!(
        p.deliver_to_ours(&init).unwrap_err(),
        WgError::ReplayedInitiation,
        "same TAI64N twice"
    );
    let (back, _) = p.deliver_to_theirs(&sends(r)[0].datagram);
    for d in &back {
        p.deliver_to_ours(d).unwrap();
    }
    let d = p.their_encapsulate(&packet(host(THEIR_NET, 2), host(OUR_NET, 3), 2));
    assert!(matches!(p.deliver_to_ours(&d).unwrap().0, Received::Data { .. }));
    assert_eq!(p.deliver_to_ours(&d).unwrap_err(), WgError::Replayed);
}

#[test]
fn tampered_and_unknown_messages_are_refused() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    let d = p.their_encapsulate(&packet(host(THEIR_NET, 2), host(OUR_NET, 3), 2));
    for i in [16, 20, d.len() - 1] {
        let mut t = d.clone();
        t[i] ^= 0x40;
        assert_eq!(
            p.deliver_to_ours(&t).unwrap_err(),
            WgError::DecryptFailed,
            "flip at byte {i}"
        );
    }
    let mut t = d.clone();
    t[4] ^= 0xff;
    assert_eq!(p.deliver_to_ours(&t).unwrap_err(), WgError::UnknownIndex);
    // The genuine packet still opens after the forgeries.
    assert!(matches!(p.deliver_to_ours(&d).unwrap().0, Received::Data { .. }));
    // A tampered initiation fails mac1.
    let mut q = Pair::new(100, None);
    let mut init = q.their_encapsulate(&packet(host(THEIR_NET, 2), host(OUR_NET, 3), 1));
    init[40] ^= 1;
    assert_eq!(q.deliver_to_ours(&init).unwrap_err(), WgError::BadMac1);
    // A packet from a source outside the peer's allowed IPs is refused.
    let spoof = p.their_encapsulate(&packet([10, 9, 9, 9], host(OUR_NET, 3), 3));
    assert_eq!(p.deliver_to_ours(&spoof).unwrap_err(), WgError::NotAllowed);
}

#[test]
fn boringtun_refuses_our_replays_too() {
    let mut p = Pair::new(100, None);
    p.handshake_from_ours(1);
    let d = p.our_send(&packet(host(OUR_NET, 5), host(THEIR_NET, 5), 2)).unwrap();
    assert_eq!(p.deliver_to_theirs(&d).1.len(), 1);
    let src: IpAddr = OURS.parse::<SocketAddr>().unwrap().ip();
    assert!(matches!(
        p.theirs.decapsulate(Some(src), &d, &mut p.buf),
        TunnResult::Err(_)
    ));
}
