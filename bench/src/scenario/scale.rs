//! `scale`: many peers and routes on one gateway. The generator plays N
//! standard WireGuard peers (boringtun's `Tunn`, each with its own key,
//! its own address 172.16.x.y and its own UDP socket) behind site A's
//! uplink; subway runs with those N peers in its config (Endpoint set, R
//! routes each). For each N it measures:
//!
//! - `subway check` on the config, and start (spawn to "subway is running");
//! - sessions: from spawn until every peer holds a session subway
//!   initiated and confirmed (the generator opened subway's keepalive);
//! - resident memory (VmRSS) once all are up, and per peer against N = 0;
//! - the control thread's CPU when idle with N sessions (its per-wake-up
//!   work, which should not grow with N);
//! - `subway reload` after changing one peer's routes;
//! - a rekey storm: all N peers initiate at the same instant; how long
//!   until all have new sessions, at what rate, and how many were told to
//!   come back with a cookie (subway under load, as the paper intends);
//! - data: 64-byte frames to one peer, then to up to 1,000 peers
//!   round-robin, the same offer (the fast path's cost of many sessions).

use super::{Common, date_stamp, need_root};
use anyhow::{Context, Result, bail};
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use subway_testkit::{Subway, TwoSites, profile_bin};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Peer counts, comma-separated (0 is the memory baseline).
    #[arg(long, default_value = "0,1000,10000")]
    peers: String,
    /// Routes (AllowedIPs) per peer.
    #[arg(long, default_value_t = 10)]
    routes: usize,
    /// Smoke test: 0 and 200 peers; asserts only that every peer got a
    /// session, was re-keyed in the storm, that reload worked and that
    /// data went through.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    common: Common,
}

/// Where subway listens (site A's uplink) and where the peers live: an
/// address each in 172.16.0.0/16, local to gateway B's namespace.
const SUBWAY: &str = "192.0.2.1:51820";
const PEER_PORT: u16 = 51820;

fn peer_addr(i: usize) -> Ipv4Addr {
    let n = 0xac10_0000u32 + 1 + i as u32; // 172.16.0.1 + i
    Ipv4Addr::from(n)
}

/// Route `k` of peer `i`: a /28 in 100.64.0.0/10 (enough for 262,144).
fn route(i: usize, k: usize, per_peer: usize) -> String {
    let j = (i * per_peer + k) as u32;
    format!("{}/28", Ipv4Addr::from(0x6440_0000u32 + j * 16))
}

/// One result row.
#[derive(Default, Debug)]
struct Row {
    peers: usize,
    routes: usize,
    check_ms: f64,
    start_ms: f64,
    sessions_ms: Option<f64>,
    /// Sessions per second from the first to the last.
    handshakes_per_s: f64,
    rss_kb: u64,
    idle_ctl_pct: f64,
    wakeups_per_s: f64,
    us_per_wakeup: f64,
    /// Route changes elsewhere on the box: the control thread's CPU for
    /// each (above its idle rate), and the FIB rebuilds and endpoint
    /// lookups they caused in all.
    route_event_ms: f64,
    route_event_rebuilds: u64,
    route_event_lookups: u64,
    /// The control thread's CPU per question (ms): `subway show`, `route
    /// get`, `route list`, `route overlaps`, `wg show`.
    questions_ms: [f64; 5],
    reload_ms: Option<f64>,
    /// The kernel alone making the first reload's route change: the same
    /// rtnetlink call subway makes, in a namespace of its own that holds
    /// the same routes.
    reload_kernel_ms: Option<f64>,
    /// The median of six more, back and forth.
    reload_next_ms: Option<f64>,
    storm_ms: Option<f64>,
    storm_cookies: u64,
    data_one_mpps: f64,
    data_many_mpps: f64,
    data_many_peers: usize,
    /// The workers' CPU time per packet sealed, one peer and many (the
    /// pair of windows with the median ratio of these): on cores of their
    /// own the rate ratio would be the inverse of theirs.
    data_one_ns: f64,
    data_many_ns: f64,
    /// The many-peer rate while reloads run back to back, and how many ran.
    data_reload_mpps: f64,
    reloads_during: usize,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench scale")?;
    let counts: Vec<usize> = if a.quick {
        QUICK.to_vec()
    } else {
        a.peers
            .split(',')
            .map(|s| s.trim().parse::<usize>().context("--peers: numbers, comma-separated"))
            .collect::<Result<_>>()?
    };
    let dir = a.common.out.join(date_stamp());
    scale(&counts, a.routes, &a.common.profile, &dir)
}

/// `--quick`'s peer counts (what `all --quick` runs too).
pub const QUICK: [usize; 2] = [0, 200];

/// Measures each peer count in `counts` (`per_peer` routes each), prints
/// the table and writes scale.md into `dir`; an error if any peer did not
/// get a session, was not re-keyed, or the reload failed.
pub fn scale(counts: &[usize], per_peer: usize, profile: &str, dir: &std::path::Path) -> Result<()> {
    if counts.iter().any(|&n| n * per_peer > subway_testkit_max_routes()) {
        bail!("--peers x --routes is above subway's route limit");
    }
    raise_fd_limit(counts.iter().max().copied().unwrap_or(0) + 4096)?;
    let mut rows = Vec::new();
    for &n in counts {
        eprintln!("scale: {n} peers, {} routes", n * per_peer);
        let r = once(n, per_peer, profile)?;
        eprintln!("  {r:?}");
        rows.push(r);
    }
    let md = markdown(&rows);
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("scale.md"), &md)?;
    eprintln!("results written to {}", dir.display());
    for r in rows.iter().filter(|r| r.peers > 0) {
        if r.sessions_ms.is_none() || r.storm_ms.is_none() || r.reload_ms.is_none() {
            bail!(
                "{} peers: not every peer got a session, was re-keyed or reloaded",
                r.peers
            );
        }
        if r.data_one_mpps <= 0.0 || r.data_many_mpps <= 0.0 || r.data_reload_mpps <= 0.0 {
            bail!("{} peers: no data went through the tunnels", r.peers);
        }
    }
    Ok(())
}

fn subway_testkit_max_routes() -> usize {
    subway_dataplane::MAX_ROUTES as usize
}

/// Route events in the route-change measurement (adds and deletes).
const ROUTE_EVENTS: usize = 20;

fn markdown(rows: &[Row]) -> String {
    let base = rows.iter().find(|r| r.peers == 0).map(|r| r.rss_kb);
    let ms = |v: Option<f64>| v.map_or("failed".to_string(), |v| format!("{v:.0}"));
    let mut md = String::from(
        "| peers | routes | check ms | start ms | all sessions ms | handshakes/s (first to last) | RSS MB | per peer KB | control thread idle CPU % (wake-ups/s, µs each) | an unrelated route change: control ms each (FIB rebuilds, endpoint lookups in 20) | control ms per show / route get / route list / route overlaps / wg show | one-peer reload ms: first (median of the next 6) | the kernel alone: the first reload's route change, ms | rekey storm ms (cookies) | 64 B Mpps: 1 peer / many (how many) | workers' ns per packet: 1 peer / many | many while reloading (reloads) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|---|---|\n",
    );
    for r in rows {
        let per_peer = match (base, r.peers) {
            (Some(b), n) if n > 0 => format!("{:.1}", r.rss_kb.saturating_sub(b) as f64 / n as f64),
            _ => "-".into(),
        };
        let (sessions, hs, reload, kernel, storm, data, cost, reloading) = if r.peers == 0 {
            let no = || "-".to_string();
            (no(), no(), no(), no(), no(), no(), no(), no())
        } else {
            (
                ms(r.sessions_ms),
                r.sessions_ms
                    .map_or("-".into(), |_| format!("{:.0}", r.handshakes_per_s)),
                format!("{} ({})", ms(r.reload_ms), ms(r.reload_next_ms)),
                r.reload_kernel_ms.map_or("-".into(), |v| format!("{v:.1}")),
                format!("{} ({})", ms(r.storm_ms), r.storm_cookies),
                format!(
                    "{:.3} / {:.3} ({}: {:.0}%)",
                    r.data_one_mpps,
                    r.data_many_mpps,
                    r.data_many_peers,
                    100.0 * r.data_many_mpps / r.data_one_mpps.max(1e-9)
                ),
                format!(
                    "{:.0} / {:.0} ({:.0}%)",
                    r.data_one_ns,
                    r.data_many_ns,
                    100.0 * r.data_one_ns / r.data_many_ns.max(1e-9)
                ),
                format!(
                    "{:.3} ({}: {:.0}%)",
                    r.data_reload_mpps,
                    r.reloads_during,
                    100.0 * r.data_reload_mpps / r.data_many_mpps.max(1e-9)
                ),
            )
        };
        md += &format!(
            "| {} | {} | {:.0} | {:.0} | {sessions} | {hs} | {:.1} | {per_peer} | {:.2} ({:.1}, {:.0}) | {:.2} ({}, {}) | {} | {reload} | {kernel} | {storm} | {data} | {cost} | {reloading} |\n",
            r.peers,
            r.routes,
            r.check_ms,
            r.start_ms,
            r.rss_kb as f64 / 1024.0,
            r.idle_ctl_pct,
            r.wakeups_per_s,
            r.us_per_wakeup,
            r.route_event_ms,
            r.route_event_rebuilds,
            r.route_event_lookups,
            r.questions_ms.map(|q| format!("{q:.0}")).join(" / "),
        );
    }
    md
}

fn raise_fd_limit(want: usize) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: want as libc::rlim_t,
    };
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to rlimit structs.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    if cur.rlim_cur as usize >= want {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "raising the open-file limit to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The generated peers: keys, and subway's config with them.
struct Peers {
    secrets: Vec<[u8; 32]>,
    config: String,
}

fn peers(t: &TwoSites, n: usize, per_peer: usize, changed: bool) -> Result<Peers> {
    let mut secrets = vec![[0u8; 32]; n];
    let mut f = std::fs::File::open("/dev/urandom")?;
    for s in &mut secrets {
        std::io::Read::read_exact(&mut f, s)?;
    }
    let mut p = Peers {
        secrets,
        config: String::new(),
    };
    p.config = config(t, &p.secrets, per_peer, changed);
    Ok(p)
}

/// The kernel's share of the first one-peer reload, measured without
/// subway: a namespace of its own, a veth standing for the TUN, the
/// `n * per_peer` routes subway's TUN holds (added as subway adds them),
/// then the reload's one new prefix, timed around that one rtnetlink call.
/// A trie of adjacent /28s makes the kernel rebalance when a prefix
/// outside them arrives: that cost is the kernel's, any gateway that
/// routes these prefixes pays it.
fn kernel_alone(n: usize, per_peer: usize) -> Result<f64> {
    use subway_dataplane::netlink::Netlink;
    let ns = subway_testkit::Netns::new("kt")?;
    ns.run(&["ip", "link", "add", "k0", "type", "veth", "peer", "name", "k1"])?;
    ns.run(&["ip", "link", "set", "k0", "up"])?;
    ns.run(&["ip", "link", "set", "k1", "up"])?;
    let net = |s: String| s.parse::<ipnet::IpNet>().context("a generated prefix");
    let all: Vec<ipnet::IpNet> = (0..n * per_peer)
        .map(|j| net(route(j / per_peer, j % per_peer, per_peer)))
        .collect::<Result<_>>()?;
    let change = net(CHANGED_ROUTE.into())?;
    ns.enter(|| -> Result<f64> {
        let mut nl = Netlink::open()?;
        let k0 = std::ffi::CString::new("k0")?;
        // SAFETY: a NUL-terminated interface name.
        let ifindex = unsafe { libc::if_nametoindex(k0.as_ptr()) };
        nl.dev_routes(true, &all, ifindex, false, None)?;
        // As in subway's case, the change comes a while after the start.
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        nl.dev_routes(true, &[change], ifindex, false, None)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    })?
}

/// The prefix that the one-peer reload gives peer 0 instead of its last:
/// outside the others (100.64.0.0/10 from its start, densely).
const CHANGED_ROUTE: &str = "100.127.255.0/28";

/// subway's config: site A's interface and LAN, the N peers. `changed`:
/// peer 0's last route differs (the one-peer reload).
fn config(t: &TwoSites, secrets: &[[u8; 32]], per_peer: usize, changed: bool) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut c = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n",
        t.keys_a.0
    );
    for (i, s) in secrets.iter().enumerate() {
        let public = PublicKey::from(&StaticSecret::from(*s));
        let mut routes: Vec<String> = (0..per_peer).map(|k| route(i, k, per_peer)).collect();
        if changed && i == 0 {
            routes.pop();
            routes.push(CHANGED_ROUTE.into());
        }
        c += &format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = {}:{PEER_PORT}\nAllowedIPs = {}\n",
            b64.encode(public.as_bytes()),
            peer_addr(i),
            routes.join(", ")
        );
    }
    c
}

/// What the generator reports while it runs (ns since its `t0`).
#[derive(Default)]
struct Progress {
    confirmed: AtomicUsize,
    first_confirmed_ns: AtomicU64,
    last_confirmed_ns: AtomicU64,
    storm: AtomicBool,
    storm_at_ns: AtomicU64,
    rekeyed: AtomicUsize,
    last_rekeyed_ns: AtomicU64,
    cookies: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

fn once(n: usize, per_peer: usize, profile: &str) -> Result<Row> {
    let t = TwoSites::new()?;
    // Measured from a settled box: the LAN's link-local address arriving
    // after the start would be a one-off FIB rebuild in the figures.
    if !t.gwa.settle_dad() {
        eprintln!("  IPv6 addresses still tentative after 5 s: measuring anyway");
    }
    t.gwb.sh("ip route add local 172.16.0.0/16 dev lo")?;
    t.gwa.sh("ip route add 172.16.0.0/16 via 192.0.2.2")?;
    let p = peers(&t, n, per_peer, false)?;
    let bin = profile_bin("subway", profile)?;
    let path = subway_testkit::work_dir().join(format!("{}.conf", subway_testkit::unique("scale")));
    std::fs::write(&path, &p.config)?;
    let t0 = Instant::now();
    t.gwa
        .run(&[bin.to_str().unwrap(), "check", "--config", path.to_str().unwrap()])
        .context("subway check")?;
    let check_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&path);
    let subway_pub = {
        let b64 = base64::engine::general_purpose::STANDARD;
        let v = b64.decode(t.keys_a.1.trim())?;
        <[u8; 32]>::try_from(v.as_slice()).context("subway's public key")?
    };
    let prog = Progress::default();
    let gen_t0 = Instant::now();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::scope(|sc| -> Result<Row> {
        let (prog, secrets, gwb) = (&prog, &p.secrets, &t.gwb);
        let gen_thread = sc.spawn(move || {
            gwb.enter(|| generate(secrets, subway_pub, prog, gen_t0, &ready_tx))
                .and_then(|r| r)
        });
        let res = (|| -> Result<Row> {
            ready_rx.recv().context("the generator ended before it was ready")??;
            let spawned = Instant::now();
            let gw = Subway::start_bin(&t.gwa, &p.config, &bin)?;
            let start_ms = spawned.elapsed().as_secs_f64() * 1e3;
            let pid = gw.proc.pid();
            let spawned_ns = spawned.duration_since(gen_t0).as_nanos() as u64;
            let mut row = Row {
                peers: n,
                routes: n * per_peer,
                check_ms,
                start_ms,
                ..Row::default()
            };
            // Sessions: wait for every peer (or give up after 60 s).
            let all = wait_for(&prog.confirmed, n, || {
                format!(
                    "{:.1} s after spawn: {} sessions",
                    spawned.elapsed().as_secs_f64(),
                    prog.confirmed.load(Ordering::Relaxed)
                )
            });
            if n > 0 && all {
                let last = prog.last_confirmed_ns.load(Ordering::Relaxed);
                let first = prog.first_confirmed_ns.load(Ordering::Relaxed);
                row.sessions_ms = Some(last.saturating_sub(spawned_ns) as f64 / 1e6);
                row.handshakes_per_s = n as f64 / (last.saturating_sub(first).max(1) as f64 / 1e9);
            } else if n > 0 {
                eprintln!(
                    "  only {} of {n} peers got a session in 60 s",
                    prog.confirmed.load(Ordering::Relaxed)
                );
            }
            // Idle: memory, and the control thread's own CPU over 5 s, in
            // all and per wake-up of its loop.
            std::thread::sleep(Duration::from_secs(1));
            row.rss_kb = rss_kb(pid);
            // The loop's wake-ups and the FIB rebuilds so far.
            let counts = || {
                gw.show().map(|v| {
                    (
                        v["control_wakeups"].as_u64().unwrap_or(0),
                        v["kernel_routes"]["fib_rebuilds"].as_u64().unwrap_or(0),
                    )
                })
            };
            // The CPU window excludes the two `show`s that read the
            // wake-ups (answering one is work proportional to the peers),
            // and so do the rounds counted. A window in which the FIB was
            // rebuilt (a route event: a one-off, not the idle loop) is
            // measured again, up to three times.
            let (mut cpu, mut rounds, mut window) = (0, 1, Duration::from_secs(5));
            for attempt in 0..3 {
                let (r0, b0) = counts()?;
                let (c0, w0) = (crate::cpu::main_thread_cpu_ns(pid), Instant::now());
                std::thread::sleep(Duration::from_secs(5));
                cpu = crate::cpu::main_thread_cpu_ns(pid) - c0;
                window = w0.elapsed();
                let (r1, b1) = counts()?;
                rounds = r1.saturating_sub(r0 + 1).max(1);
                if b1 == b0 {
                    break;
                }
                eprintln!(
                    "  idle window {attempt}: {} FIB rebuild(s) in it, measuring again",
                    b1 - b0
                );
            }
            row.idle_ctl_pct = cpu as f64 / window.as_nanos() as f64 * 100.0;
            row.wakeups_per_s = rounds as f64 / window.as_secs_f64();
            row.us_per_wakeup = cpu as f64 / 1e3 / rounds as f64;
            // Route changes that are neither the LAN's nor the endpoints'
            // (a routing daemon or DHCP elsewhere on the box): what each
            // costs the control thread beyond its idle rate.
            let idle_ns_per_s = cpu as f64 / window.as_secs_f64();
            // The control thread's CPU (ns) while `f` runs, above its idle rate.
            let above_idle = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                let (c0, w0) = (crate::cpu::main_thread_cpu_ns(pid), Instant::now());
                f()?;
                let cpu = crate::cpu::main_thread_cpu_ns(pid) - c0;
                Ok((cpu as f64 - idle_ns_per_s * w0.elapsed().as_secs_f64()).max(0.0))
            };
            let work = |gw: &Subway| -> Result<(u64, u64)> {
                let v = gw.show()?;
                let k = &v["kernel_routes"];
                Ok((
                    k["fib_rebuilds"].as_u64().unwrap_or(0),
                    k["endpoint_lookups"].as_u64().unwrap_or(0),
                ))
            };
            let before = work(&gw)?;
            let events = above_idle(&|| {
                for _ in 0..ROUTE_EVENTS / 2 {
                    t.gwa
                        .sh("ip route add 198.51.100.0/24 via 192.0.2.2 dev wan0 && ip route del 198.51.100.0/24")?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            })?;
            row.route_event_ms = events / 1e6 / ROUTE_EVENTS as f64;
            let after = work(&gw)?;
            row.route_event_rebuilds = after.0 - before.0;
            row.route_event_lookups = after.1 - before.1;
            // What the operator's questions cost the control thread (the
            // answers are written by a thread of their own where they are
            // big): three of each, above the idle rate.
            let questions: [&dyn Fn() -> Result<String>; 5] = [
                &|| gw.ctl(&["show", &gw.name, "--json"]),
                &|| gw.ctl(&["route", "get", "100.64.0.7", "--name", &gw.name]),
                &|| gw.ctl(&["route", "list", "--name", &gw.name, "--json"]),
                &|| gw.ctl(&["route", "overlaps", "--name", &gw.name, "--json"]),
                // (No WireGuard interface without peers: routed mode.)
                &|| {
                    if n > 0 {
                        t.gwa.run(&["wg", "show", &gw.name])
                    } else {
                        Ok(String::new())
                    }
                },
            ];
            for (q, out) in questions.iter().zip(&mut row.questions_ms) {
                *out = above_idle(&|| (0..3).try_for_each(|_| q().map(|_| ())))? / 1e6 / 3.0;
            }
            if n > 0 {
                // One peer's routes change; the others' stay.
                let b64 = base64::engine::general_purpose::STANDARD;
                let changed = config(&t, &p.secrets, per_peer, true);
                std::fs::write(&gw.config, &changed)?;
                let r0 = Instant::now();
                let out = gw.ctl(&["reload", &gw.name])?;
                let took = r0.elapsed().as_secs_f64() * 1e3;
                if !out.contains(CHANGED_ROUTE) {
                    bail!("reload did not see the change:\n{out}");
                }
                let got = gw.ctl(&["route", "get", "100.127.255.1", "--name", &gw.name])?;
                if !got.contains(&b64.encode(PublicKey::from(&StaticSecret::from(p.secrets[0])).as_bytes())) {
                    bail!("after reload, the changed route is not there:\n{got}");
                }
                row.reload_ms = Some(took);
                row.reload_kernel_ms = Some(kernel_alone(n, per_peer)?);
                // Six more, back and forth: the first change into a part of
                // the kernel's routing trie that 100,000 routes left
                // unbalanced pays for its rebalancing, the next ones not.
                let back = config(&t, &p.secrets, per_peer, false);
                let mut next = Vec::new();
                for k in 0..6 {
                    std::fs::write(&gw.config, if k % 2 == 0 { &back } else { &changed })?;
                    let r0 = Instant::now();
                    gw.ctl(&["reload", &gw.name])?;
                    next.push(r0.elapsed().as_secs_f64() * 1e3);
                }
                next.sort_by(f64::total_cmp);
                row.reload_next_ms = Some((next[2] + next[3]) / 2.0);
                // The storm: every peer initiates at once.
                let storm_at = Instant::now();
                prog.storm_at_ns
                    .store(storm_at.duration_since(gen_t0).as_nanos() as u64, Ordering::Relaxed);
                prog.storm.store(true, Ordering::Release);
                let all = wait_for(&prog.rekeyed, n, || {
                    format!(
                        "storm + {:.1} s: {} re-keyed, {} cookie replies",
                        storm_at.elapsed().as_secs_f64(),
                        prog.rekeyed.load(Ordering::Relaxed),
                        prog.cookies.load(Ordering::Relaxed)
                    )
                });
                if all {
                    let last = prog.last_rekeyed_ns.load(Ordering::Relaxed);
                    let at = prog.storm_at_ns.load(Ordering::Relaxed);
                    row.storm_ms = Some(last.saturating_sub(at) as f64 / 1e6);
                } else {
                    eprintln!(
                        "  only {} of {n} peers re-keyed in 60 s",
                        prog.rekeyed.load(Ordering::Relaxed)
                    );
                }
                row.storm_cookies = prog.cookies.load(Ordering::Relaxed);
                // subway counts what it did not take at once.
                let counted = gw.show()?["control"]["wg_cookie_required"].as_u64().unwrap_or(0);
                eprintln!(
                    "  cookie replies: {} received by the peers, {counted} counted by subway",
                    row.storm_cookies
                );
                // Reloads back to back (the change and back again) while
                // the many-peer data runs: the workers' rate meanwhile.
                let texts = [config(&t, &p.secrets, per_peer, false), changed];
                let turn = AtomicUsize::new(0);
                let reload = || -> Result<()> {
                    let k = turn.fetch_add(1, Ordering::Relaxed);
                    std::fs::write(&gw.config, &texts[k % 2])?;
                    gw.ctl(&["reload", &gw.name]).map(|_| ())
                };
                let d = data(&t, &gw, n, per_peer, profile, &reload)?;
                (row.data_one_mpps, row.data_many_mpps, row.data_many_peers) = (d.one, d.many, d.many_peers);
                (row.data_one_ns, row.data_many_ns) = (d.one_ns, d.many_ns);
                (row.data_reload_mpps, row.reloads_during) = (d.reloading, d.reloads);
            }
            let errors = prog.errors.load(Ordering::Relaxed);
            if errors > 0 {
                eprintln!("  the generator's peers refused {errors} datagrams");
            }
            let (status, log) = gw.stop();
            if !status.is_some_and(|s| s.success()) {
                bail!("subway did not stop cleanly: {status:?}\n{log}");
            }
            Ok(row)
        })();
        prog.stop.store(true, Ordering::Relaxed);
        let generated = gen_thread
            .join()
            .map_err(|_| anyhow::anyhow!("the generator panicked"))?;
        let row = res?;
        generated?;
        Ok(row)
    })
}

/// What [`data`] measured, in Mpps.
struct Data {
    one: f64,
    many: f64,
    /// The workers' CPU ns per packet sealed (the median pair of these).
    one_ns: f64,
    many_ns: f64,
    many_peers: usize,
    reloading: f64,
    reloads: usize,
}

/// 64-byte frames from site A's LAN host, as fast as the generator goes
/// for 2 s, to one peer's route, then to up to 1,000 peers' routes
/// round-robin, then the same while `reload` runs back to back; the
/// ciphertext is counted on B's wire (B's kernel drops it unread: the
/// peers need not answer any more).
fn data(
    t: &TwoSites,
    gw: &Subway,
    n: usize,
    per_peer: usize,
    profile: &str,
    reload: &(dyn Fn() -> Result<()> + Sync),
) -> Result<Data> {
    use super::rig::{Gen, offer};
    super::rig::neigh_to_sink(&t.gwa, "192.0.2.2", "wan0")?;
    std::thread::sleep(Duration::from_millis(400));
    let mac = t.gwa.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
    // From peer 1 on: the reload changes peer 0's routes (all of them
    // with one route per peer).
    let many = n.saturating_sub(1).clamp(1, 1000);
    let first = route(1, 0, per_peer);
    let first = first.split('/').next().unwrap_or_default().parse::<Ipv4Addr>()?;
    let dst = Ipv4Addr::from(u32::from(first) + 1).to_string();
    let pid = gw.proc.pid();
    let sealed = || -> Result<u64> { Ok(super::queues::per_worker(gw, "tunnel_tx")?.iter().sum()) };
    // The rate, and the workers' CPU ns per packet sealed meanwhile.
    let run = |peers: usize| -> Result<(f64, f64)> {
        let (n0, c0) = (sealed()?, crate::cpu::threads_cpu_ns(pid, "subway-w"));
        let g = Gen {
            ns: &t.a,
            iface: "eth0",
            dst_mac: mac.clone(),
            src_ip: "10.1.0.2",
            dst_ip: &dst,
            extra: vec![
                "--dst-ips".into(),
                peers.to_string(),
                "--dst-ip-step".into(),
                (per_peer * 16).to_string(),
            ],
        };
        let r = offer(
            &g,
            (&t.gwb, "wan0"),
            "subway",
            &crate::frames::Size::Fixed(64),
            &super::Params::base(2.0, profile),
        )?;
        let cpu = crate::cpu::threads_cpu_ns(pid, "subway-w").saturating_sub(c0);
        let n = sealed()?.saturating_sub(n0);
        Ok((r.delivered as f64 / r.seconds / 1e6, cpu as f64 / n.max(1) as f64))
    };
    // One peer and many, alternated five times: a ratio is taken between
    // two adjacent windows (this VM's speed drifts by 3x between runs),
    // and the pair with the median ratio is reported, for the rates and
    // for the workers' CPU per packet each.
    let mut pairs = Vec::new();
    for _ in 0..5 {
        let one = run(1)?;
        let many = run(many)?;
        eprintln!(
            "  1 peer {:.3} Mpps {:.0} ns/packet, many {:.3} Mpps {:.0} ns/packet",
            one.0, one.1, many.0, many.1
        );
        pairs.push((one, many));
    }
    type Pair = ((f64, f64), (f64, f64));
    let median = |pairs: &mut Vec<Pair>, ratio: fn(&Pair) -> f64| {
        pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        pairs[pairs.len() / 2]
    };
    let ((one, _), (many_mpps, _)) = median(&mut pairs, |(one, many)| many.0 / one.0.max(1e-9));
    let ((_, one_ns), (_, many_ns)) = median(&mut pairs, |(one, many)| one.1 / many.1.max(1e-9));
    let done = AtomicBool::new(false);
    let (reloading, reloads) = std::thread::scope(|s| -> Result<(f64, usize)> {
        let traffic = s.spawn(|| {
            let r = run(many).map(|r| r.0);
            done.store(true, Ordering::Relaxed);
            r
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut reloads = 0;
        let mut failed = None;
        while !done.load(Ordering::Relaxed) && failed.is_none() {
            match reload() {
                Ok(()) => reloads += 1,
                Err(e) => failed = Some(e),
            }
        }
        let mpps = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
        match failed {
            Some(e) => Err(e.context("a reload during the data run failed")),
            None => Ok((mpps, reloads)),
        }
    })?;
    Ok(Data {
        one,
        many: many_mpps,
        one_ns,
        many_ns,
        many_peers: many,
        reloading,
        reloads,
    })
}

/// Waits until `count` reaches `n` (true) or 60 s pass (false), printing
/// `progress()` every second.
fn wait_for(count: &AtomicUsize, n: usize, progress: impl Fn() -> String) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shown = Instant::now();
    while count.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            eprintln!("  {}", progress());
        }
    }
    count.load(Ordering::Relaxed) >= n
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The N peers, on one thread in gateway B's namespace: a socket and a
/// boringtun `Tunn` each, an epoll set over the sockets; answers what
/// subway sends, runs boringtun's timers (its retransmissions after a
/// cookie reply), and on `storm` makes every peer initiate at once.
fn generate(
    secrets: &[[u8; 32]],
    subway_pub: [u8; 32],
    prog: &Progress,
    t0: Instant,
    ready: &std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let setup = || -> Result<(Vec<UdpSocket>, Vec<Tunn>, i32)> {
        // SAFETY: epoll_create1 has no preconditions.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        let mut socks = Vec::with_capacity(secrets.len());
        let mut tunns = Vec::with_capacity(secrets.len());
        for (i, s) in secrets.iter().enumerate() {
            let sock =
                UdpSocket::bind((peer_addr(i), PEER_PORT)).with_context(|| format!("binding {}", peer_addr(i)))?;
            sock.set_nonblocking(true)?;
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: valid epoll fd, socket fd and event.
            if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) } != 0 {
                bail!("epoll_ctl: {}", std::io::Error::last_os_error());
            }
            socks.push(sock);
            tunns.push(Tunn::new(
                StaticSecret::from(*s),
                PublicKey::from(subway_pub),
                None,
                None,
                i as u32,
                None,
            ));
        }
        Ok((socks, tunns, ep))
    };
    let (socks, mut tunns, ep) = match setup() {
        Ok(x) => {
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let subway: SocketAddr = SUBWAY.parse().unwrap();
    let n = secrets.len();
    let mut confirmed = vec![false; n];
    let mut rekeyed = vec![false; n];
    let mut storming = false;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let mut last_timers = Instant::now();
    let now_ns = || t0.elapsed().as_nanos() as u64;
    let end = Instant::now() + Duration::from_secs(600);
    while !prog.stop.load(Ordering::Relaxed) && Instant::now() < end {
        if !storming && prog.storm.load(Ordering::Acquire) {
            storming = true;
            for (i, t) in tunns.iter_mut().enumerate() {
                if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut out, true) {
                    let _ = socks[i].send_to(p, subway);
                }
            }
        }
        // SAFETY: valid epoll fd and event buffer.
        let k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20) };
        for e in events.iter().take(k.max(0) as usize) {
            let i = e.u64 as usize;
            while let Ok((len, src)) = socks[i].recv_from(&mut buf) {
                let kind = buf[0];
                let r = tunns[i].decapsulate(Some(src.ip()), &buf[..len], &mut out);
                let ok = !matches!(r, TunnResult::Err(_));
                if let TunnResult::WriteToNetwork(p) = r {
                    let _ = socks[i].send_to(p, src);
                    // Flush what boringtun queued behind it.
                    while let TunnResult::WriteToNetwork(p) = tunns[i].decapsulate(None, &[], &mut out) {
                        let _ = socks[i].send_to(p, src);
                    }
                }
                if !ok {
                    prog.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match kind {
                    // subway's keepalive after its handshake: its session is up.
                    4 if !confirmed[i] => {
                        confirmed[i] = true;
                        let _ =
                            prog.first_confirmed_ns
                                .compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
                        prog.last_confirmed_ns.store(now_ns(), Ordering::Relaxed);
                        prog.confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    2 if storming && !rekeyed[i] => {
                        rekeyed[i] = true;
                        prog.last_rekeyed_ns.store(now_ns(), Ordering::Relaxed);
                        prog.rekeyed.fetch_add(1, Ordering::Relaxed);
                    }
                    3 => {
                        prog.cookies.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        // boringtun's timers: retransmissions (after a cookie reply, with
        // its mac2), keepalives.
        if last_timers.elapsed() >= Duration::from_millis(250) {
            last_timers = Instant::now();
            for (i, t) in tunns.iter_mut().enumerate() {
                if let TunnResult::WriteToNetwork(p) = t.update_timers(&mut out) {
                    let _ = socks[i].send_to(p, subway);
                }
            }
        }
    }
    // SAFETY: our epoll fd.
    unsafe { libc::close(ep) };
    Ok(())
}
