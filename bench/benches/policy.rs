//! [Policy]'s per-packet cost, in one run: the bit-vector classifier
//! against a linear scan of the same rules (the baseline), with 10 and
//! 1,000 rules, on packets of new flows; and `policy::check` on packets
//! of known flows, with 1 and 100,000 flows in the table. Per packet =
//! time / 1024.
//!
//! Run: `cargo bench -p subway-bench --bench policy`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use subway_dataplane::policy::{
    Action, Classifier, FlowLimits, FlowTable, Ingress, Packet, PolicyConfig, Proto, Rule, VnetPolicy, check,
};

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The benchmark rig's rules (bench/src/scenario/rig.rs): n-2 that match
/// none of the packets, then the two that allow them.
fn rules(n: usize) -> Vec<Rule> {
    let mut v: Vec<Rule> = (0..n.saturating_sub(2))
        .map(|i| Rule {
            action: Action::Deny,
            ingress: None,
            src: Some(
                format!("172.16.{}.{}/32", (i / 250) % 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
            ),
            dst: Some(format!("192.168.{}.0/24", i % 200).parse().unwrap()),
            proto: Some(Proto::Tcp),
            ports: Some((1000 + i as u16, 1000 + i as u16)),
            text: String::new(),
            line: i,
        })
        .collect();
    for (src, dst, ing) in [
        ("10.1.0.0/24", "10.2.0.0/16", Some(Ingress::Lan(0))),
        ("10.2.0.0/16", "10.1.0.0/24", None),
    ] {
        v.push(Rule {
            action: Action::Allow,
            ingress: ing,
            src: Some(src.parse().unwrap()),
            dst: Some(dst.parse().unwrap()),
            proto: Some(Proto::Udp),
            ports: None,
            text: String::new(),
            line: 0,
        });
    }
    v
}

/// A UDP packet from 10.1.0.2 of flow `f` (source port and destination).
fn udp(f: u32) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 1, 0, 2]);
    p[16..20].copy_from_slice(&[10, 2, (f >> 16) as u8, (f >> 8) as u8]);
    p[20..22].copy_from_slice(&(10_000 + (f & 0xff) as u16).to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p
}

const BATCH: usize = 1024;

fn classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_classify");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let packets: Vec<Packet> = (0..BATCH)
        .map(|_| {
            let r = xorshift(&mut seed);
            Packet {
                src: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)),
                dst: IpAddr::V4(Ipv4Addr::new(10, 2, (r >> 8) as u8, r as u8)),
                proto: 17,
                sport: Some(10_000 + (r >> 16) as u16 % 1000),
                dport: Some(9),
                closing: false,
                echo: false,
                about: None,
            }
        })
        .collect();
    for n in [10usize, 1000] {
        let rs = rules(n);
        let cl = Classifier::new(&rs);
        g.bench_with_input(BenchmarkId::new("bitvector", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0usize;
                for p in &packets {
                    hits += cl.first_match(black_box(p), Ingress::Lan(0)).unwrap_or(0);
                }
                hits
            })
        });
        g.bench_with_input(BenchmarkId::new("linear_scan", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0usize;
                for p in &packets {
                    hits += rs
                        .iter()
                        .position(|r| r.matches(black_box(p), Ingress::Lan(0)))
                        .unwrap_or(0);
                }
                hits
            })
        });
    }
    g.finish();
}

fn known_flows(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_check_known_flow");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for (rules_n, flows_n) in [(10usize, 1u32), (1000, 1), (1000, 100_000)] {
        let pol = VnetPolicy::new(
            PolicyConfig {
                vnet: 0,
                default: Action::Deny,
                rules: rules(rules_n),
            },
            None,
            1,
        );
        let table = FlowTable::new(FlowLimits::default());
        // Every flow seen once (allowed, remembered).
        for f in 0..flows_n {
            assert!(check(&pol, Some(&table), 0, Ingress::Lan(0), &udp(f), 10, false).passes());
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let probes: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| udp((xorshift(&mut seed) % flows_n as u64) as u32))
            .collect();
        let id = format!("rules={rules_n}/flows={flows_n}");
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                let mut ok = 0usize;
                for p in &probes {
                    ok += check(&pol, Some(&table), 0, Ingress::Lan(0), black_box(p), 10, false).passes() as usize;
                }
                assert_eq!(ok, BATCH);
                ok
            })
        });
    }
    g.finish();
}

criterion_group!(benches, classify, known_flows);
criterion_main!(benches);
