//! WireGuard transport crypto, side by side in one run:
//!
//! - `seal/*` and `open/*`: subway's batch path (one counter reservation
//!   per batch of 64, ring's ChaCha20-Poly1305) against boringtun's
//!   `Tunn::encapsulate` / `decapsulate`, one packet at a time as its API
//!   works, at 64, 512 and 1420 bytes of plaintext, on one thread;
//! - `seal_2threads/*`: two threads sealing for the same peer: subway's
//!   shared session against boringtun behind the `Mutex` a multi-threaded
//!   user of `Tunn` (`&mut self`) needs;
//! - `aead/*`: the AEAD choice, ring against RustCrypto's chacha20poly1305;
//! - `seal_runs/*`: the worker's send step for a batch of 64-byte packets
//!   to 1 peer, and round-robin to 1,000 and 10,000 peers (grouping by
//!   peer, a run per peer: its session's counter reservation, the seal,
//!   its counters), without the sockets: what many peers cost per packet.
//!
//! Run: `cargo bench -p subway-bench --bench wg`. Report ratios, not
//! absolute numbers: this machine is small and shared.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subway_bench::ceiling::keys;
use subway_dataplane::stats::Tally;
use subway_dataplane::tables::{PeerRt, Port, Tables};
use subway_dataplane::tunnel::OuterPath;
use subway_dataplane::tunnel::tx::{PeerRun, Sealed, peer_runs};
use subway_dataplane::wg::session::Session;
use subway_dataplane::wire::ethernet::MacAddr;

const SIZES: [usize; 3] = [64, 512, 1420];
const BATCH: usize = 64;

/// An IPv4 packet of `len` bytes (boringtun looks at the header).
fn ip_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    subway_dataplane::wire::ipv4::emit(&mut p, [10, 1, 0, 1].into(), [10, 2, 0, 1].into(), 17, 64, len - 20);
    p
}

/// Two boringtun peers with a completed handshake.
fn tunn_pair() -> (Tunn, Tunn) {
    let (sa, sb) = (StaticSecret::from([3u8; 32]), StaticSecret::from([4u8; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    let keepalive = match a.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    let _ = b.decapsulate(None, &keepalive, &mut buf2);
    (a, b)
}

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    for &size in &SIZES {
        g.throughput(Throughput::Bytes((size * BATCH) as u64));
        let session = Session::new(&keys(true), 0, Duration::ZERO);
        let plain = ip_packet(size);
        let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; Session::message_len(size)]).collect();
        g.bench_with_input(BenchmarkId::new("subway", size), &size, |b, _| {
            b.iter(|| {
                // The worker's batch: one counter reservation, then a seal each.
                let first = session.reserve(BATCH as u64).unwrap();
                for (i, buf) in bufs.iter_mut().enumerate() {
                    buf[16..16 + size].copy_from_slice(&plain);
                    black_box(session.seal(first + i as u64, buf, size).unwrap());
                }
            })
        });
        let (mut a, _) = tunn_pair();
        let mut out = vec![0u8; size + 64];
        g.bench_with_input(BenchmarkId::new("boringtun", size), &size, |b, _| {
            b.iter(|| {
                for _ in 0..BATCH {
                    match a.encapsulate(&plain, &mut out) {
                        TunnResult::WriteToNetwork(p) => {
                            black_box(p.len());
                        }
                        _ => panic!(),
                    }
                }
            })
        });
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    for &size in &SIZES {
        g.throughput(Throughput::Bytes((size * BATCH) as u64));
        let plain = ip_packet(size);
        // Fresh counters for every message: make them outside the timing.
        g.bench_with_input(BenchmarkId::new("subway", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let tx = Session::new(&keys(true), 0, Duration::ZERO);
                let rx = Session::new(&keys(false), 0, Duration::ZERO);
                let n = iters as usize * BATCH;
                let mut msgs: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        let mut m = vec![0u8; Session::message_len(size)];
                        m[16..16 + size].copy_from_slice(&plain);
                        let c = tx.reserve(1).unwrap();
                        tx.seal(c, &mut m, size).unwrap();
                        m
                    })
                    .collect();
                let t0 = Instant::now();
                for m in msgs.iter_mut() {
                    black_box(rx.open(m, Duration::ZERO).unwrap().len());
                }
                t0.elapsed()
            })
        });
        g.bench_with_input(BenchmarkId::new("boringtun", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let (mut a, mut bt) = tunn_pair();
                let n = iters as usize * BATCH;
                let mut out = vec![0u8; size + 64];
                let msgs: Vec<Vec<u8>> = (0..n)
                    .map(|_| match a.encapsulate(&plain, &mut out) {
                        TunnResult::WriteToNetwork(p) => p.to_vec(),
                        _ => panic!(),
                    })
                    .collect();
                let mut dst = vec![0u8; size + 64];
                let t0 = Instant::now();
                for m in &msgs {
                    match bt.decapsulate(None, m, &mut dst) {
                        TunnResult::WriteToTunnelV4(p, _) => {
                            black_box(p.len());
                        }
                        other => panic!("{other:?}"),
                    }
                }
                t0.elapsed()
            })
        });
    }
    g.finish();
}

/// Two threads seal for the same peer; time for both to finish `per` each.
fn seal_2threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_2threads");
    g.sample_size(20);
    for &size in &SIZES {
        g.throughput(Throughput::Bytes((size * BATCH * 2) as u64));
        let plain = ip_packet(size);
        g.bench_with_input(BenchmarkId::new("subway", size), &size, |b, _| {
            let session = Arc::new(Session::new(&keys(true), 0, Duration::ZERO));
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let session = session.clone();
                        let plain = &plain;
                        s.spawn(move || {
                            let mut bufs: Vec<Vec<u8>> =
                                (0..BATCH).map(|_| vec![0u8; Session::message_len(size)]).collect();
                            for _ in 0..iters {
                                let first = session.reserve(BATCH as u64).unwrap();
                                for (i, buf) in bufs.iter_mut().enumerate() {
                                    buf[16..16 + size].copy_from_slice(plain);
                                    black_box(session.seal(first + i as u64, buf, size).unwrap());
                                }
                            }
                        });
                    }
                });
                t0.elapsed()
            })
        });
        g.bench_with_input(BenchmarkId::new("boringtun_mutex", size), &size, |b, _| {
            let tunn = Arc::new(Mutex::new(tunn_pair().0));
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let tunn = tunn.clone();
                        let plain = &plain;
                        s.spawn(move || {
                            let mut out = vec![0u8; size + 64];
                            for _ in 0..iters * BATCH as u64 {
                                let mut t = tunn.lock().unwrap();
                                match t.encapsulate(plain, &mut out) {
                                    TunnResult::WriteToNetwork(p) => {
                                        black_box(p.len());
                                    }
                                    _ => panic!(),
                                }
                            }
                        });
                    }
                });
                t0.elapsed()
            })
        });
    }
    g.finish();
}

fn aead(c: &mut Criterion) {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    let mut g = c.benchmark_group("aead");
    for &size in &SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &[9; 32]).unwrap(),
        );
        let mut buf = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                let _ = black_box(
                    key.seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::empty(),
                        &mut buf,
                    )
                    .unwrap(),
                );
            })
        });
        let rc = chacha20poly1305::ChaCha20Poly1305::new(&[9u8; 32].into());
        g.bench_with_input(BenchmarkId::new("rustcrypto", size), &size, |b, _| {
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                black_box(rc.encrypt_in_place_detached(&nonce.into(), &[], &mut buf).unwrap());
            })
        });
    }
    g.finish();
}

/// A gateway's tables with `n` peers, each with a session of its own and
/// a path to its endpoint on the uplink (port 0).
fn peer_tables(n: usize) -> Tables {
    let peers = (0..n)
        .map(|i| PeerRt {
            vnet: 0,
            session: Some(Arc::new(Session::new(&keys(true), i as u32, Duration::ZERO))),
            path: Some(OuterPath {
                src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
                src: "192.0.2.1:51820".parse().unwrap(),
                dst: std::net::SocketAddr::new(std::net::Ipv4Addr::from(0xac10_0000 + i as u32).into(), 51820),
            }),
            stats: Default::default(),
        })
        .collect();
    Tables {
        ports: vec![Port {
            name: "wan0".into(),
            ifindex: 1,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            vnet: subway_dataplane::config::UPLINK_VNET,
            mtu: 1500,
        }],
        peers,
        uplink: Some(0),
        source_ports: 1,
        ..Tables::default()
    }
}

fn seal_runs(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_runs");
    g.throughput(Throughput::Elements(BATCH as u64));
    const L3: usize = 14;
    let plain = ip_packet(64);
    for peers in [1usize, 1000, 10_000] {
        let t = peer_tables(peers);
        let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; 2048]).collect();
        let mut pending: Vec<(u32, usize)> = Vec::with_capacity(BATCH);
        let mut next = 0usize;
        let mut tally = Tally::default();
        g.bench_with_input(BenchmarkId::new("peers", peers), &peers, |b, _| {
            b.iter(|| {
                // The batch: frame k to the next peer round-robin.
                pending.clear();
                for (k, buf) in bufs.iter_mut().enumerate() {
                    buf[L3..L3 + plain.len()].copy_from_slice(&plain);
                    pending.push(((next % peers) as u32, k));
                    next += 1;
                }
                for (peer, frames) in peer_runs(&mut pending, |f| f.0) {
                    let mut run = PeerRun::begin(&t, peer, frames.len(), Duration::ZERO).expect("a session and a path");
                    for (k, &(_, f)) in frames.iter().enumerate() {
                        let sealed = run.seal(k, &mut bufs[f], L3, plain.len(), &mut tally);
                        assert!(matches!(sealed, Sealed::Datagram(_)));
                    }
                    run.finish();
                }
                black_box(&bufs);
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

criterion_group! { name = benches; config = config(); targets = seal, open, seal_2threads, aead, seal_runs }
criterion_main!(benches);
