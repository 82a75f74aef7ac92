//! A gateway that fails safe, tried as an operator would: gateway A is a
//! box with a default route to the internet and forwarding off, site B is
//! a stock wireguard-go box, and a capture on B's uplink shows whatever A
//! lets out in clear. subway is killed with SIGKILL and stopped cleanly
//! mid-flow, and the fence is tried at boot before subway's first start.
//! One file for the fail-safe suite (it shares the capture and flow
//! helpers below), hence its length.

use anyhow::{Context, Result, ensure};
use std::time::{Duration, Instant};
use subway_testkit::{Capture, Subway, TwoSites, UdpFlow, ping_until, require_root, workspace_bin};

/// What the capture on B's uplink looks for: packets for site B's LAN,
/// which only ever cross the internet inside the tunnel (UDP to 51820).
const PLAINTEXT_TO_B: &str = "dst net 10.2.0.0/24 or dst net fd02::/64";

fn refused(t: &TwoSites, name: &str) -> Result<u64> {
    let table = format!("subway_{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let out = t
        .gwa
        .run(&["nft", "list", "counter", "inet", &table, "tunnel_refused"])?;
    let after = out.split("packets ").nth(1).context("no packets in the counter")?;
    Ok(after.split_whitespace().next().unwrap_or("0").parse()?)
}

fn sysctl(t: &TwoSites, key: &str) -> Result<String> {
    Ok(t.gwa.run(&["sysctl", "-n", key])?.trim().to_string())
}

#[test]
fn sigkill_mid_flow_leaks_nothing_and_a_restart_resumes() -> Result<()> {
    if !require_root("sigkill_mid_flow_leaks_nothing_and_a_restart_resumes") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    t.a_as_a_fresh_box_with_a_default_route()?;
    let _far = t.standard_b("wireguard-go")?;
    let cfg = t.subway_config(true, false, "");
    let ga = Subway::start(&t.gwa, &cfg)?;
    // A fresh box: subway turned forwarding on where it needs it, and only there.
    assert_eq!(sysctl(&t, "net.ipv4.conf.lan0.forwarding")?, "1");
    assert_eq!(sysctl(&t, "net.ipv4.ip_forward")?, "0", "box-wide forwarding stays off");
    assert_eq!(
        sysctl(&t, "net.ipv4.conf.wan0.forwarding")?,
        "0",
        "the uplink does not forward"
    );
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;

    let cap = Capture::start(&t.gwb, "wan0", PLAINTEXT_TO_B)?;
    // 200 datagrams/s for 8 s; killed at 1.5 s, restarted 2.5 s later.
    let flow = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7001".parse()?, 1600, 200, 200)?;
    std::thread::sleep(Duration::from_millis(1500));
    let name = ga.name.clone();
    let mut proc = ga.proc;
    // SIGKILL to the child we started, by its pid.
    t.gwa.run(&["kill", "-KILL", &proc.pid().to_string()])?;
    let t_kill = Instant::now();
    while proc.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(2500));
    // While it was down the kernel had a route (the default) and
    // forwarding on lan0: the fence refused what it would have sent.
    let refused_while_down = refused(&t, &name)?;
    let ga = Subway::start_as(&t.gwa, &name, &cfg)?;
    let t_back = Instant::now();
    let r = flow.finish()?;
    let leaked = cap.finish()?;
    assert!(
        leaked.is_empty(),
        "{} packets for site B left A's uplink in clear, e.g. {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(3)]
    );
    assert!(
        refused_while_down >= 300,
        "the fence counted {refused_while_down} refusals in 2.5 s at 200/s"
    );
    // Everything sent before the kill (1.5 s at 200/s, less a margin for
    // the sender's start) arrived, and everything from one second after
    // the flow resumed.
    ensure!(r.lost_in(0..250) == 0, "lost before the kill: {}", r.lost_in(0..250));
    let resumed = r
        .first_after(t_back)
        .with_context(|| format!("nothing arrived after the restart: {}", ga.proc.log_text()))?;
    let tail = resumed.0 + 200..r.sent;
    ensure!(
        r.lost_in(tail.clone()) == 0,
        "{} lost after the flow resumed (seq {tail:?}): received {} of {}",
        r.lost_in(tail.clone()),
        r.received,
        r.sent
    );
    let _ = t_kill;
    eprintln!(
        "SIGKILL: {} refused by the fence while down, flow resumed {} ms after the restart was ready",
        refused_while_down,
        resumed.1.duration_since(t_back).as_millis()
    );
    Ok(())
}

#[test]
fn at_boot_and_after_a_clean_stop_nothing_leaves_in_clear_until_subway_down() -> Result<()> {
    if !require_root("at_boot_and_after_a_clean_stop_nothing_leaves_in_clear_until_subway_down") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    t.a_as_a_fresh_box_with_a_default_route()?;
    // A router box whose operator turned forwarding on box-wide: without a
    // fence, its kernel forwards site A's traffic for B along the default
    // route, in clear.
    t.gwa.sysctl("net.ipv4.ip_forward", "1")?;
    t.gwa.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let _far = t.standard_b("wireguard-go")?;
    let name = subway_testkit::unique("fs");
    let cfg_path = subway_testkit::work_dir().join(format!("{name}.conf"));
    let cfg = t.subway_config(true, false, "");
    std::fs::write(&cfg_path, &cfg)?;
    let bin = workspace_bin("subway")?;
    let subway = |args: &[&str]| -> Result<String> {
        let mut v = vec![bin.to_str().unwrap()];
        v.extend_from_slice(args);
        t.gwa.run(&v)
    };
    let cap = Capture::start(&t.gwb, "wan0", PLAINTEXT_TO_B)?;
    let send = |n: u32, port: u16| -> Result<subway_testkit::FlowReport> {
        UdpFlow::start(&t.a, &t.b, format!("10.2.0.2:{port}").parse()?, n, 200, 100)?.finish()
    };

    // Boot: the fail-safe unit runs `subway fence` before the network.
    let out = subway(&["fence", "--config", cfg_path.to_str().unwrap()])?;
    assert!(out.contains("2 tunnelled prefix(es)"), "{out}");
    let r = send(100, 7101)?;
    assert_eq!(r.received, 0, "reached B before subway ever ran: {r:?}");
    assert!(cap.packets()?.is_empty(), "left in clear at boot: {:?}", cap.packets()?);
    assert!(refused(&t, &name)? >= 100);

    // Running: the tunnel carries it.
    let ga = Subway::start_as(&t.gwa, &name, &cfg)?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    let r = send(200, 7102)?;
    assert_eq!(r.lost, 0, "{r:?}");

    // A clean stop (FailMode = closed by default) keeps the fence.
    let (status, log) = ga.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains("leaving nft table inet"), "{log}");
    let r = send(100, 7103)?;
    assert_eq!(r.received, 0, "reached B after a clean stop: {r:?}");
    assert!(
        cap.packets()?.is_empty(),
        "left in clear after a clean stop: {:?}",
        cap.packets()?
    );

    // `subway down` takes it away: now the kernel routes in clear, and the
    // capture sees it (which is what makes the checks above able to fail).
    let out = subway(&["down", &name])?;
    assert!(out.contains("removed nft table inet"), "{out}");
    let r = send(50, 7104)?;
    let leaked = cap.finish()?;
    assert!(r.received > 0, "nothing got through after subway down: {r:?}");
    assert!(
        leaked.len() >= 40,
        "after subway down the kernel's clear-text forwarding should show in the capture: {leaked:?}"
    );

    // FailMode = open: a clean stop removes the fence itself.
    let open_cfg = cfg.replace("Uplink = wan0", "Uplink = wan0\nFailMode = open");
    let ga = Subway::start_as(&t.gwa, &name, &open_cfg)?;
    let (status, log) = ga.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(
        !t.gwa
            .run(&["nft", "list", "tables"])?
            .contains(&format!("subway_{name}"))
    );
    Ok(())
}

#[test]
fn a_fresh_box_forwards_and_a_clean_stop_restores_its_sysctls() -> Result<()> {
    if !require_root("a_fresh_box_forwards_and_a_clean_stop_restores_its_sysctls") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    t.a_as_a_fresh_box_with_a_default_route()?;
    // New interfaces get loose reverse-path filtering, as systemd's
    // sysctl defaults set on Debian; the slow-path TUN must not.
    t.gwa.sysctl("net.ipv4.conf.default.rp_filter", "2")?;
    let _far = t.standard_b("wireguard-go")?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    // The far side speaks first: its first packets reach A's LAN through
    // the kernel slow path (the neighbour is unknown), IPv4 and IPv6.
    ping_until(&t.b, "10.1.0.2", 10).with_context(|| ga.proc.log_text())?;
    // Too big for the tunnel: the kernel answers through the TUN.
    let out =
        t.a.output(&["ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1472", "10.2.0.2"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("mtu = 1420") || text.contains("mtu=1420"),
        "no frag-needed: {text}"
    );
    ping_until(&t.b, "fd01::2", 5).with_context(|| ga.proc.log_text())?;
    ping_until(&t.a, "fd02::2", 5).with_context(|| ga.proc.log_text())?;
    // A directed broadcast from the far side is not flooded onto A's LAN.
    let echos = subway_testkit::icmp_in_echos(&t.a)?;
    let _ =
        t.b.output(&["ping", "-b", "-c", "3", "-i", "0.1", "-W", "1", "10.1.0.255"])?;
    assert!(ga.total("drop_directed_broadcast")? >= 3, "{}", ga.show()?["totals"]);
    assert_eq!(
        subway_testkit::icmp_in_echos(&t.a)?,
        echos,
        "a LAN host got the broadcast"
    );
    assert_eq!(sysctl(&t, "net.ipv6.conf.lan0.force_forwarding")?, "1");
    assert_eq!(sysctl(&t, "net.ipv6.conf.all.forwarding")?, "0");
    let log = ga.proc.log_text();
    assert!(log.contains("net.ipv4.conf.lan0.forwarding to 1"), "{log}");
    let (status, _) = ga.stop();
    assert!(status.is_some_and(|s| s.success()));
    assert_eq!(
        sysctl(&t, "net.ipv4.conf.lan0.forwarding")?,
        "0",
        "restored on a clean stop"
    );
    assert_eq!(
        sysctl(&t, "net.ipv6.conf.lan0.force_forwarding")?,
        "0",
        "restored on a clean stop"
    );
    Ok(())
}

#[test]
fn a_far_wireguard_go_that_kept_its_session_is_back_within_a_second_of_a_restart() -> Result<()> {
    if !require_root("a_far_wireguard_go_that_kept_its_session_is_back_within_a_second_of_a_restart") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let _far = t.standard_b("wireguard-go")?;
    let cfg = t.subway_config(true, false, "");
    let ga = Subway::start(&t.gwa, &cfg)?;
    ping_until(&t.b, "10.1.0.2", 10).with_context(|| ga.proc.log_text())?;
    // The far side sends 200/s to A's LAN for 10 s; subway is killed at 2 s
    // and started again at 4 s. wireguard-go keeps sending on its old
    // session until something tells it otherwise.
    let flow = UdpFlow::start(&t.b, &t.a, "10.1.0.2:7201".parse()?, 2000, 200, 100)?;
    std::thread::sleep(Duration::from_secs(2));
    let name = ga.name.clone();
    let mut proc = ga.proc;
    t.gwa.run(&["kill", "-KILL", &proc.pid().to_string()])?;
    while proc.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    let t_spawn = Instant::now();
    let ga = Subway::start_as(&t.gwa, &name, &cfg)?;
    let t_ready = Instant::now();
    let r = flow.finish()?;
    let (_, first) = r
        .first_after(t_ready)
        .with_context(|| format!("the far side's traffic never came back: {}", ga.proc.log_text()))?;
    let from_ready = first.saturating_duration_since(t_ready);
    let from_spawn = first.saturating_duration_since(t_spawn);
    eprintln!(
        "restart recovery with wireguard-go on the far side: {} ms from ready ({} ms from the process start)",
        from_ready.as_millis(),
        from_spawn.as_millis()
    );
    assert!(
        from_ready < Duration::from_secs(1),
        "the far side's traffic came back {} ms after subway was ready (goal: under 1 s)",
        from_ready.as_millis()
    );
    Ok(())
}

/// Any local user can connect to the control and UAPI sockets and to the
/// metrics port. Fifty idle connections to each, and one client sending a
/// megabyte without a newline, delay neither `subway show`, `wg show`, a
/// scrape, nor a handshake by more than 100 ms.
#[test]
fn idle_and_oversized_local_clients_stall_nothing() -> Result<()> {
    if !require_root("idle_and_oversized_local_clients_stall_nothing") {
        return Ok(());
    }
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let t = TwoSites::new()?;
    let cfg = t.subway_config(true, false, "") + "\n[Metrics]\nListen = 127.0.0.1:9586\n";
    let ga = Subway::start(&t.gwa, &cfg)?;
    let ctl = std::path::PathBuf::from(format!("/run/subway/{}.sock", ga.name));
    let uapi = std::path::PathBuf::from(format!("/var/run/wireguard/{}.sock", ga.name));
    for p in [&ctl, &uapi] {
        let mode = std::fs::metadata(p)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
    }
    let timed = |f: &dyn Fn() -> Result<()>| -> Result<Duration> {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            f()?;
            v.push(t0.elapsed());
        }
        v.sort();
        Ok(v[2])
    };
    let show = || ga.show().map(|_| ());
    let wg_show = || t.gwa.run(&["wg", "show", &ga.name]).map(|_| ());
    let scrape = || -> Result<()> {
        let body = t.gwa.enter(|| -> Result<String> {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9586")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        ensure!(body.starts_with("HTTP/1.1 200"), "{body}");
        Ok(())
    };
    let before = [timed(&show)?, timed(&wg_show)?, timed(&scrape)?];

    let idle_ctl: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&ctl))
        .collect::<std::io::Result<_>>()?;
    let idle_uapi: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&uapi))
        .collect::<std::io::Result<_>>()?;
    let idle_tcp = t.gwa.enter(|| -> std::io::Result<Vec<std::net::TcpStream>> {
        (0..50)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9586"))
            .collect()
    })??;
    let mut big = UnixStream::connect(&ctl)?;
    big.set_write_timeout(Some(Duration::from_secs(2)))?;
    let _ = big.write_all(&vec![b'x'; 1 << 20]);

    let after = [timed(&show)?, timed(&wg_show)?, timed(&scrape)?];
    // The far gateway starts now: its handshake at start is answered by A's
    // control thread while all those clients hang on.
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    let ready = Instant::now();
    let mut handshake = None;
    while ready.elapsed() < Duration::from_secs(5) {
        if ga.show()?["peers"][0]["handshakes"].as_u64().unwrap_or(0) >= 1 {
            handshake = Some(ready.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let handshake = handshake.with_context(|| format!("no handshake: {}", gb.proc.log_text()))?;
    let refused = ga.show()?["local_refused"].clone();
    eprintln!(
        "median latency before/after 150 idle clients and a 1 MB one: show {:?}/{:?}, wg show {:?}/{:?}, scrape {:?}/{:?}; handshake seen {:?} after B was ready; refused {refused}",
        before[0], after[0], before[1], after[1], before[2], after[2], handshake
    );
    for (what, b, a) in [
        ("subway show", before[0], after[0]),
        ("wg show", before[1], after[1]),
        ("a scrape", before[2], after[2]),
    ] {
        assert!(
            a < b + Duration::from_millis(100),
            "{what}: {b:?} before, {a:?} with idle clients"
        );
    }
    assert!(
        handshake < Duration::from_millis(100),
        "handshake seen {handshake:?} after B was ready"
    );
    assert!(refused["control"]["too_large"].as_u64() >= Some(1), "{refused}");
    // The text view says so too, with the control thread's own counters.
    let text = ga.ctl(&["show", &ga.name])?;
    assert!(text.contains("local clients closed: control.too_large=1"), "{text}");
    assert!(
        text.contains("control thread: ") && text.contains("handshake_messages_in="),
        "{text}"
    );
    // The kit writes configs 0644: a private key others can read is named.
    assert!(
        ga.proc.log_text().contains("readable by group or others (mode 644)"),
        "{}",
        ga.proc.log_text()
    );
    drop((idle_ctl, idle_uapi, idle_tcp));
    Ok(())
}

/// Collects what subway tells systemd through $NOTIFY_SOCKET.
struct NotifySink {
    path: std::path::PathBuf,
    msgs: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl NotifySink {
    fn new() -> Result<NotifySink> {
        let path = subway_testkit::work_dir().join(format!("{}.notify", subway_testkit::unique("sd")));
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, st) = (msgs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    m.lock()
                        .unwrap()
                        .push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        });
        Ok(NotifySink { path, msgs, stop })
    }

    fn count(&self, what: &str, since: Instant) -> usize {
        let m = self.msgs.lock().unwrap();
        m.iter()
            .filter(|(t, s)| *t >= since && s.lines().any(|l| l == what))
            .count()
    }
}

impl Drop for NotifySink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// systemd's view: READY=1 once up, WATCHDOG=1 while the control thread
/// and every worker turn, nothing while the process is stopped; a worker
/// that wedges stops the feeding, and the instance exits by itself,
/// leaving no XDP behind and the fail-safe table in place. It also runs
/// with only the capabilities the unit grants (no CAP_SYS_ADMIN).
#[test]
fn the_watchdog_is_fed_only_while_everything_turns() -> Result<()> {
    if !require_root("the_watchdog_is_fed_only_while_everything_turns") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let _far = t.standard_b("wireguard-go")?;
    let sink = NotifySink::new()?;
    let env = [
        ("NOTIFY_SOCKET", sink.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ];
    // The unit's capability set, nothing more.
    let caps = [
        "setpriv",
        "--bounding-set=-all,+net_admin,+net_raw,+bpf,+perfmon,+ipc_lock",
        "--",
    ];
    let ga = Subway::start_under(&t.gwa, &caps, &t.subway_config(true, false, ""), &env)?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    assert_eq!(sink.count("READY=1", Instant::now() - Duration::from_secs(60)), 1);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let fed = sink.count("WATCHDOG=1", t0);
    assert!(fed >= 3, "{fed} watchdog pings in 1 s at WATCHDOG_USEC=400000");
    // A stopped process (its control thread with it) feeds nothing.
    t.gwa.run(&["kill", "-STOP", &ga.proc.pid().to_string()])?;
    std::thread::sleep(Duration::from_millis(100));
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let while_stopped = sink.count("WATCHDOG=1", t1);
    t.gwa.run(&["kill", "-CONT", &ga.proc.pid().to_string()])?;
    assert_eq!(while_stopped, 0, "fed while stopped");
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        sink.count("WATCHDOG=1", t1 + Duration::from_secs(1)) >= 1,
        "not fed after SIGCONT"
    );
    let (status, log) = ga.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(sink.count("STOPPING=1", t0) >= 1);

    // Worker 0 wedges 2 s after start: the feeding stops, and the instance
    // exits by itself within the stall limit.
    let sink = NotifySink::new()?;
    let env = [
        ("NOTIFY_SOCKET", sink.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
        ("SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS", "2"),
    ];
    let mut ga = Subway::start_under(&t.gwa, &[], &t.subway_config(true, false, ""), &env)?;
    let t0 = Instant::now();
    let mut exited = None;
    while t0.elapsed() < Duration::from_secs(10) {
        if !ga.proc.alive() {
            exited = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = ga.proc.log_text();
    let exited = exited.with_context(|| format!("a wedged worker did not end the process:\n{log}"))?;
    assert!(log.contains("worker 0 made no progress"), "{log}");
    let wedged_at = log
        .lines()
        .find(|l| l.contains("wedged on purpose"))
        .context("the hook did not fire")?;
    let _ = wedged_at;
    // No feeding in the second before the exit (the worker had stopped).
    let last_feed = sink
        .msgs
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| s.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .max()
        .context("never fed")?;
    assert!(
        t0 + exited - last_feed >= Duration::from_secs(2),
        "fed {:?} before the exit",
        t0 + exited - last_feed
    );
    assert!(
        !subway_testkit::xdp_attached(&t.gwa, "lan0")?,
        "XDP outlived the process"
    );
    assert!(
        t.gwa
            .run(&["nft", "list", "tables"])?
            .contains(&format!("subway_{}", ga.name))
    );
    Ok(())
}

/// The shipped systemd units are valid (systemd-analyze verify prints
/// nothing, not even an ignored key) and the gateway's is hardened
/// (exposure at most 4.0 of 10 by systemd-analyze security).
#[test]
fn the_shipped_systemd_units_verify_and_are_hardened() -> Result<()> {
    let Ok(analyze) = subway_testkit::which("systemd-analyze") else {
        eprintln!("SKIP: no systemd-analyze on this machine");
        return Ok(());
    };
    let bin = workspace_bin("subway")?;
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/dist");
    let dir = subway_testkit::work_dir().join(subway_testkit::unique("units"));
    std::fs::create_dir_all(&dir)?;
    for unit in ["subway@.service", "subway-fence@.service"] {
        let text = std::fs::read_to_string(dist.join(unit))?.replace("/usr/sbin/subway", bin.to_str().unwrap());
        let path = dir.join(unit.replace("@.", "@site-a."));
        std::fs::write(&path, text)?;
        let out = std::process::Command::new(&analyze).arg("verify").arg(&path).output()?;
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
    let out = std::process::Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(dir.join("subway@site-a.service"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for subway@site-a.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .context("no exposure level")?
        .parse()?;
    assert!(score <= 4.0, "exposure {score}:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The uplink is renumbered under traffic (as DHCP or SLAAC would): subway
/// follows from the kernel's address events, steers WireGuard on the new
/// address in XDP, and handshakes so that a stock wireguard-go far side
/// roams to it. Both directions resume, on the fast path.
#[test]
fn the_uplink_is_renumbered_under_traffic_and_both_directions_resume() -> Result<()> {
    if !require_root("the_uplink_is_renumbered_under_traffic_and_both_directions_resume") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let _far = t.standard_b("wireguard-go")?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    // 200/s each way for 6 s; the address changes at 2 s.
    let out = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7301".parse()?, 1200, 200, 100)?;
    let back = UdpFlow::start(&t.b, &t.a, "10.1.0.2:7302".parse()?, 1200, 200, 100)?;
    std::thread::sleep(Duration::from_secs(2));
    t.gwa
        .sh("ip addr del 192.0.2.1/24 dev wan0 && ip addr add 192.0.2.11/24 dev wan0")?;
    let renumbered = Instant::now();
    let listen_before = ga.xdp("redirect_listen")?;
    let (out, back) = (out.finish()?, back.finish()?);
    for (what, r) in [("A to B", &out), ("B to A", &back)] {
        let resumed = r
            .first_after(renumbered + Duration::from_millis(50))
            .with_context(|| format!("{what}: nothing after the renumbering ({r:?}): {}", ga.proc.log_text()))?;
        let tail = resumed.0 + 100..r.sent;
        ensure!(
            r.lost_in(tail.clone()) == 0,
            "{what}: {} lost after it resumed ({r:?})",
            r.lost_in(tail)
        );
        eprintln!(
            "{what}: resumed {} ms after the renumbering, {} lost in all",
            resumed.1.duration_since(renumbered).as_millis(),
            r.lost
        );
    }
    // B's datagrams now reach the new address through XDP, not the kernel.
    assert!(
        ga.xdp("redirect_listen")? >= listen_before + 500,
        "{}",
        ga.show()?["xdp"]
    );
    let s = ga.show()?;
    // Two changes: the old address went, then the new one came.
    assert!(
        s["control"]["uplink_renumbered"].as_u64() >= Some(1),
        "{}",
        s["control"]
    );
    Ok(())
}

/// A scan of a LAN prefix where no host answers (every packet needs a
/// neighbour the kernel cannot resolve: the slow path) at 100 kpps, while
/// a flow runs through the fast path: the slow path's per-VNET budget
/// drops the excess cheaply and the flow keeps at least 80% of its packets.
/// On this 2-core VM 100 kpps does not hurt the flow even without the
/// budget; `SCAN_PPS=0` (as fast as the generator goes, ~0.6 Mpps) is where
/// the budget matters: 84% of the flow kept with it, 55% without
/// (2026-12-02). The rate is not the default because that figure is at the
/// edge of what this box does and would fail by load, not by bug.
#[test]
fn a_scan_of_absent_lan_hosts_does_not_collapse_forwarding() -> Result<()> {
    if !require_root("a_scan_of_absent_lan_hosts_does_not_collapse_forwarding") {
        return Ok(());
    }
    let t = subway_testkit::TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;
    subway_testkit::ping_until(&t.a, "10.2.0.2", 5)?;
    subway_testkit::ping(&t.a, "10.2.0.2", 3)?;
    let mac = t.gw.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
    let pktgen = workspace_bin("subway-pktgen")?;
    let log = subway_testkit::work_dir().join(format!("{}.log", subway_testkit::unique("scan")));
    let flow = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7401".parse()?, 8000, 2000, 200)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut scan = t.a.spawn(
        &[
            pktgen.to_str().unwrap(),
            "--iface",
            "eth0",
            "--dst-mac",
            &mac,
            "--src-ip",
            "10.1.0.2",
            "--dst-ip",
            "10.2.0.99",
            "--rate",
            &std::env::var("SCAN_PPS").unwrap_or("100000".into()),
            "--count",
            "3000000",
            "--duration",
            "3",
            "--flows",
            "64",
        ],
        &log,
    )?;
    let r = flow.finish()?;
    let (_, scan_log) = scan.stop(Duration::from_secs(5));
    let s = gw.show()?;
    let limited = s["totals"]["drop_slow_path_limited"].as_u64().unwrap_or(0);
    let slow = s["totals"]["slow_neigh_unknown"].as_u64().unwrap_or(0);
    eprintln!(
        "flow {r:?}; scan: {limited} dropped by the budget, {slow} to the kernel; pktgen: {}",
        scan_log.lines().last().unwrap_or("")
    );
    assert!(
        limited > 10_000,
        "the scan was not limited: {}\n{scan_log}",
        s["totals"]
    );
    assert!(
        r.received as f64 >= 0.8 * r.sent as f64,
        "the flow kept {} of {} during the scan",
        r.received,
        r.sent
    );
    Ok(())
}
