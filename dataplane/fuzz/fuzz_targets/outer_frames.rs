//! Whole frames as the fast path meets them: the outer WireGuard parse,
//! the inner packet parse, MSS clamping and the routing decision.
#![no_main]

use libfuzzer_sys::fuzz_target;
use subway_dataplane::fib::{Fib, Target};
use subway_dataplane::forward::route_frame;
use subway_dataplane::tables::{Port, Tables};
use subway_dataplane::tunnel::{clamp_mss, parse_inner, parse_outer};
use subway_dataplane::wire::MacAddr;

fuzz_target!(|data: &[u8]| {
    if let Some(r) = parse_outer(data) {
        assert!(r.msg_start <= r.msg_end && r.msg_end <= data.len());
    }
    if let Some(i) = parse_inner(data) {
        assert!(i.len <= data.len());
    }
    let mut ip = data.to_vec();
    let _ = clamp_mss(&mut ip, 1420);
    assert_eq!(ip.len(), data.len());
    let mut fib = Fib::new();
    let _ = fib.insert(0, "10.0.0.0/8".parse().unwrap(), Target::Port(0));
    let _ = fib.insert(0, "fd00::/8".parse().unwrap(), Target::Port(1));
    let port = |ifindex, last| Port {
        name: "lan".into(),
        ifindex,
        mac: MacAddr([2, 0, 0, 0, 0, last]),
        vnet: 0,
        mtu: 1500,
    };
    let t = Tables {
        fib: fib.into(),
        ports: vec![port(1, 1), port(2, 2)],
        ..Default::default()
    };
    let mut frame = data.to_vec();
    let _ = route_frame(&mut frame, 0, &t);
});
