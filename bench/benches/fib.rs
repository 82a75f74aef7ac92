//! FIB lookup speed, on the same routes and the same random destinations,
//! in one run: subway's FIB (a tree bitmap per VNET, ip_network_table)
//! against the design it replaced, a hash table per prefix length probed
//! from the longest down (kept here as the baseline).
//!
//! Run: `cargo bench -p subway-bench --bench fib`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::collections::HashMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Duration;
use subway_dataplane::fib::{Fib, Target};

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The rejected design: one hash table per prefix length present.
type FxTable = HashMap<u32, u32, std::hash::BuildHasherDefault<subway_dataplane::fxhash::FxHasher>>;

#[derive(Default)]
struct HashPerLength {
    levels: Vec<(u8, FxTable)>,
}

fn mask(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len as u32))
    }
}

impl HashPerLength {
    fn insert(&mut self, addr: u32, len: u8, v: u32) {
        match self.levels.iter_mut().find(|(l, _)| *l == len) {
            Some((_, t)) => {
                t.insert(mask(addr, len), v);
            }
            None => {
                let mut t = HashMap::default();
                t.insert(mask(addr, len), v);
                self.levels.push((len, t));
                self.levels.sort_by_key(|l| std::cmp::Reverse(l.0));
            }
        }
    }
    fn lookup(&self, a: u32) -> Option<u32> {
        self.levels.iter().find_map(|(l, t)| t.get(&mask(a, *l)).copied())
    }
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("fib_lookup_v4");
    const PROBES: usize = 1024;
    g.throughput(Throughput::Elements(PROBES as u64));
    for &routes in &[16usize, 1000, 50_000] {
        let mut seed = 0x5eed_u64;
        let mut fib = Fib::new();
        let mut table = HashPerLength::default();
        let mut inserted = 0;
        while inserted < routes {
            // Typical site routes: /16 to /30, with a default.
            let len = 16 + (xorshift(&mut seed) % 15) as u8;
            let addr = (xorshift(&mut seed) as u32) & (u32::MAX << (32 - len));
            let net: ipnet::IpNet = ipnet::Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().into();
            if fib.insert(0, net, Target::Peer(inserted as u32)).is_ok() {
                table.insert(addr, len, inserted as u32);
                inserted += 1;
            }
        }
        let probes: Vec<Ipv4Addr> = (0..PROBES)
            .map(|_| Ipv4Addr::from(xorshift(&mut seed) as u32))
            .collect();
        g.bench_with_input(BenchmarkId::new("subway_fib", routes), &routes, |b, _| {
            b.iter(|| {
                for p in &probes {
                    black_box(fib.lookup_v4(0, *p));
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("hash_per_length", routes), &routes, |b, _| {
            b.iter(|| {
                for p in &probes {
                    black_box(table.lookup(u32::from(*p)));
                }
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = lookups }
criterion_main!(benches);
