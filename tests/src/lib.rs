//! The namespace test kit: builds topologies of network namespaces joined
//! by veth pairs, runs commands in them, starts and stops `subway`, and
//! removes everything in `Drop`, even when a test fails or panics.
//!
//! Names are unique per process and call (`sw<pid>x<n>...`) so tests can
//! run in parallel. Interfaces are created directly inside their namespace,
//! so their names there (lan0, eth0, ...) never collide with the host's.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when running as root. Tests that need root print why they skip.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns false (and says so) when the test cannot run here. In CI
/// (`CI` set), which runs as root, a missing root is a failure: a green
/// run must not hide tests that did not run.
pub fn require_root(test: &str) -> bool {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs root, and CI is expected to run as root");
        }
        eprintln!("SKIP {test}: needs root (network namespaces, XDP, AF_XDP); CI runs as root");
        // test.sh counts these (libtest hides a passing test's output).
        if let Some(path) = std::env::var_os("SUBWAY_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{test}");
            }
        }
        return false;
    }
    true
}

fn check(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command on the host and returns its stdout, or an error with stderr.
pub fn host(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    check(out, &args.join(" "))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `sw<pid>x<n><role>` with loopback up.
    pub fn new(role: &str) -> Result<Netns> {
        let name = format!("{}{role}", unique("sw"));
        host(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs a command inside; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cmd(args)
            .output()
            .with_context(|| format!("running {} in {}", args[0], self.name))?;
        check(out, &format!("[{}] {}", self.name, args.join(" ")))
    }

    /// Runs a shell snippet inside.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Runs a command inside and returns its raw output, success or not.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.cmd(args)
            .output()
            .with_context(|| format!("running {} in {}", args[0], self.name))
    }

    /// Starts a background process inside, ended (by its pid) on drop.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<Proc> {
        self.spawn_env(args, log, &[])
    }

    /// As [`Netns::spawn`], with extra environment variables.
    pub fn spawn_env(&self, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Result<Proc> {
        let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = self
            .cmd(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {} in {}", args[0], self.name))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Sets a sysctl inside.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// Counter `stat` (rx_packets, tx_bytes, ...) of interface `ifname`.
    pub fn if_stat(&self, ifname: &str, stat: &str) -> Result<u64> {
        let s = self.run(&["cat", &format!("/sys/class/net/{ifname}/statistics/{stat}")])?;
        s.trim().parse().context("parsing an interface counter")
    }

    /// Runs `f` on a thread that has joined this namespace (sockets made
    /// there live in it).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a thread of our own with a valid netns fd;
                // it affects only this thread, which ends with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Joins `a:a_if` and `b:b_if` with a veth pair created directly in the
/// two namespaces, both ends up. Transmit checksum offload is turned off
/// on both ends: a veth otherwise hands on partial checksums that a
/// userspace forwarder copies as they are (see environment.md).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    host(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, i) in [(a, a_if), (b, b_if)] {
        ns.run(&["ip", "link", "set", i, "up"])?;
        ns.run(&["ethtool", "-K", i, "tx", "off"])?;
    }
    Ok(())
}

/// A background process, ended by its pid on drop.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status
    /// (None if it had to be killed) and the log.
    pub fn stop(&mut self, grace: Duration) -> (Option<std::process::ExitStatus>, String) {
        let mut status = None;
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child we started, by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) if t0.elapsed() < grace => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        (status, std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Where test logs and configs go.
pub fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join("subway-tests");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// A binary of this workspace: `$SUBWAY_BIN_DIR/NAME`, else the newest of
/// target/{debug,release}/NAME. Build them first with `cargo build --bins`.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    if let Ok(d) = std::env::var("SUBWAY_BIN_DIR") {
        return Ok(PathBuf::from(d).join(name));
    }
    let cands = ["debug", "release"].map(|p| target_dir().join(p).join(name));
    cands
        .iter()
        .filter_map(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, p.clone()))
        })
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("{name} is not built: run `cargo build --bins` (./test.sh does)"))
}

/// A binary from one build profile ("debug" or "release"), for benchmarks
/// that must not measure a debug build by accident.
pub fn profile_bin(name: &str, profile: &str) -> Result<PathBuf> {
    let p = target_dir().join(profile).join(name);
    if !p.exists() {
        bail!("{} is not built: run `cargo build --{profile} --bins`", p.display());
    }
    Ok(p)
}

/// A running `subway run` inside a namespace. Stopped on drop.
pub struct Subway {
    pub name: String,
    pub config: PathBuf,
    pub proc: Proc,
}

impl Subway {
    /// Writes `config_text` to `<unique name>.conf` and runs subway with it
    /// in `ns`, waiting until its control socket answers.
    pub fn start(ns: &Netns, config_text: &str) -> Result<Subway> {
        Self::start_bin(ns, config_text, &workspace_bin("subway")?)
    }

    /// As [`Subway::start`], with extra environment variables.
    pub fn start_env(ns: &Netns, config_text: &str, env: &[(&str, &str)]) -> Result<Subway> {
        Self::start_inner(ns, config_text, &workspace_bin("subway")?, env)
    }

    /// As [`Subway::start`], with a given binary.
    pub fn start_bin(ns: &Netns, config_text: &str, bin: &Path) -> Result<Subway> {
        Self::start_inner(ns, config_text, bin, &[])
    }

    /// As [`Subway::start`], under a given instance name (a restart after
    /// a crash uses the name of the instance that crashed).
    pub fn start_as(ns: &Netns, name: &str, config_text: &str) -> Result<Subway> {
        Self::start_named(ns, name.to_string(), config_text, &workspace_bin("subway")?, &[])
    }

    fn start_inner(ns: &Netns, config_text: &str, bin: &Path, env: &[(&str, &str)]) -> Result<Subway> {
        Self::start_named(ns, unique("gw"), config_text, bin, env)
    }

    fn start_named(ns: &Netns, name: String, config_text: &str, bin: &Path, env: &[(&str, &str)]) -> Result<Subway> {
        Self::launch(ns, name, config_text, &[bin.to_str().unwrap()], env)
    }

    /// As [`Subway::start`], under a launcher (`setpriv ... --`) and with
    /// extra environment variables.
    pub fn start_under(ns: &Netns, launcher: &[&str], config_text: &str, env: &[(&str, &str)]) -> Result<Subway> {
        let bin = workspace_bin("subway")?;
        let mut cmd: Vec<&str> = launcher.to_vec();
        cmd.push(bin.to_str().unwrap());
        Self::launch(ns, unique("gw"), config_text, &cmd, env)
    }

    fn launch(ns: &Netns, name: String, config_text: &str, cmd: &[&str], env: &[(&str, &str)]) -> Result<Subway> {
        let dir = work_dir();
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, config_text)?;
        let log = dir.join(format!("{name}.log"));
        let mut args = cmd.to_vec();
        args.extend_from_slice(&["run", "--config", config.to_str().unwrap()]);
        let mut proc = ns.spawn_env(&args, &log, env)?;
        let sock = PathBuf::from(format!("/run/subway/{name}.sock"));
        let t0 = Instant::now();
        loop {
            if !proc.alive() {
                bail!("subway exited during start-up:\n{}", proc.log_text());
            }
            if sock.exists()
                && std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && proc.log_text().contains("subway is running")
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("subway did not become ready in 30 s:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Subway { name, config, proc })
    }

    /// `subway show NAME --json`.
    pub fn show(&self) -> Result<Value> {
        let bin = workspace_bin("subway")?;
        let out = host(&[bin.to_str().unwrap(), "show", &self.name, "--json"])?;
        serde_json::from_str(&out).context("subway show --json printed invalid JSON")
    }

    /// A total counter from `show`.
    pub fn total(&self, counter: &str) -> Result<u64> {
        self.show()?["totals"][counter]
            .as_u64()
            .ok_or_else(|| anyhow!("no counter {counter}"))
    }

    /// An XDP program counter from `show`.
    pub fn xdp(&self, counter: &str) -> Result<u64> {
        self.show()?["xdp"][counter]
            .as_u64()
            .ok_or_else(|| anyhow!("no XDP counter {counter}"))
    }

    /// SIGTERM and wait; returns the exit status and the log.
    pub fn stop(mut self) -> (Option<std::process::ExitStatus>, String) {
        self.proc.stop(Duration::from_secs(10))
    }
}

/// Two subnets joined by a gateway namespace:
///
/// ```text
///  a (eth0 10.1.0.2/24 fd01::2/64) ── lan0 [gw] lan1 ── b (eth0 10.2.0.2/24 fd02::2/64)
///                             10.1.0.1 fd01::1   10.2.0.1 fd02::1
/// ```
/// Hosts route everything via the gateway; the gateway forwards (sysctl)
/// so its kernel can serve as the slow path or as the baseline router.
pub struct TwoSubnets {
    pub a: Netns,
    pub gw: Netns,
    pub b: Netns,
}

impl TwoSubnets {
    pub fn new() -> Result<Self> {
        let t = TwoSubnets {
            a: Netns::new("a")?,
            gw: Netns::new("gw")?,
            b: Netns::new("b")?,
        };
        veth(&t.a, "eth0", &t.gw, "lan0")?;
        veth(&t.b, "eth0", &t.gw, "lan1")?;
        t.a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip -6 addr add fd01::2/64 dev eth0 nodad && ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1")?;
        t.b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip -6 addr add fd02::2/64 dev eth0 nodad && ip route add default via 10.2.0.1 && ip -6 route add default via fd02::1")?;
        t.gw.sh("ip addr add 10.1.0.1/24 dev lan0 && ip -6 addr add fd01::1/64 dev lan0 nodad && ip addr add 10.2.0.1/24 dev lan1 && ip -6 addr add fd02::1/64 dev lan1 nodad")?;
        t.gw.sysctl("net.ipv4.ip_forward", "1")?;
        t.gw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(t)
    }

    /// The routed-mode config for the gateway (subnets from its addresses).
    pub fn routed_config(&self, tuning: &str) -> String {
        format!("[Lan]\nInterface = lan0\n\n[Lan]\nInterface = lan1\n\n[Tuning]\n{tuning}\n")
    }
}

/// Is any XDP program attached to `ifname` in `ns`?
pub fn xdp_attached(ns: &Netns, ifname: &str) -> Result<bool> {
    let s = ns.run(&["ip", "-d", "link", "show", "dev", ifname])?;
    Ok(s.contains("prog/xdp") || s.contains(" xdp"))
}

/// A WireGuard key pair from `wg genkey` / `wg pubkey` (base64).
pub fn wg_keypair() -> Result<(String, String)> {
    let private = host(&["wg", "genkey"])?.trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running wg pubkey (wireguard-tools)")?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((private, String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// Two sites joined over an "internet" link:
///
/// ```text
///  a (10.1.0.2 fd01::2) ─ lan0 [gwa] wan0 ══ wan0 [gwb] lan0 ─ b (10.2.0.2 fd02::2)
///                          10.1.0.1   192.0.2.1   192.0.2.2   10.2.0.1
///                          fd01::1    2001:db8::1 2001:db8::2 fd02::1
/// ```
/// The gateways do not forward between their LAN and the internet by
/// themselves for the remote site: nothing but the tunnel reaches the far
/// subnet (their kernels have no route to it).
pub struct TwoSites {
    pub a: Netns,
    pub gwa: Netns,
    pub gwb: Netns,
    pub b: Netns,
    pub keys_a: (String, String),
    pub keys_b: (String, String),
}

impl TwoSites {
    pub fn new() -> Result<Self> {
        let t = TwoSites {
            a: Netns::new("a")?,
            gwa: Netns::new("ga")?,
            gwb: Netns::new("gb")?,
            b: Netns::new("b")?,
            keys_a: wg_keypair()?,
            keys_b: wg_keypair()?,
        };
        veth(&t.a, "eth0", &t.gwa, "lan0")?;
        veth(&t.gwa, "wan0", &t.gwb, "wan0")?;
        veth(&t.b, "eth0", &t.gwb, "lan0")?;
        t.a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip -6 addr add fd01::2/64 dev eth0 nodad && ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1")?;
        t.b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip -6 addr add fd02::2/64 dev eth0 nodad && ip route add default via 10.2.0.1 && ip -6 route add default via fd02::1")?;
        t.gwa.sh("ip addr add 10.1.0.1/24 dev lan0 && ip -6 addr add fd01::1/64 dev lan0 nodad && ip addr add 192.0.2.1/24 dev wan0 && ip -6 addr add 2001:db8::1/64 dev wan0 nodad")?;
        t.gwb.sh("ip addr add 10.2.0.1/24 dev lan0 && ip -6 addr add fd02::1/64 dev lan0 nodad && ip addr add 192.0.2.2/24 dev wan0 && ip -6 addr add 2001:db8::2/64 dev wan0 nodad")?;
        for gw in [&t.gwa, &t.gwb] {
            gw.sysctl("net.ipv4.ip_forward", "1")?;
            gw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(t)
    }

    /// Gateway A as an operator's box: forwarding off (as on a fresh
    /// Debian install) and a default route to the internet (B's uplink),
    /// so that anything the kernel sends in clear is not dropped for want
    /// of a route but leaves, where a capture on B's uplink sees it.
    pub fn a_as_a_fresh_box_with_a_default_route(&self) -> Result<()> {
        self.gwa.sysctl("net.ipv4.ip_forward", "0")?;
        self.gwa.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        self.gwa
            .sh("ip route add default via 192.0.2.2 && ip -6 route add default via 2001:db8::2")?;
        Ok(())
    }

    /// subway's config for gateway A (`for_a`) or B; `endpoint_v6` puts the
    /// tunnel on IPv6 outside.
    pub fn subway_config(&self, for_a: bool, endpoint_v6: bool, extra_peer: &str) -> String {
        let (me, peer) = if for_a {
            (&self.keys_a, &self.keys_b)
        } else {
            (&self.keys_b, &self.keys_a)
        };
        let (remote4, remote6, remote_net4, remote_net6) = if for_a {
            ("192.0.2.2", "2001:db8::2", "10.2.0.0/24", "fd02::/64")
        } else {
            ("192.0.2.1", "2001:db8::1", "10.1.0.0/24", "fd01::/64")
        };
        let endpoint = if endpoint_v6 {
            format!("[{remote6}]:51820")
        } else {
            format!("{remote4}:51820")
        };
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {endpoint}\nAllowedIPs = {remote_net4}, {remote_net6}\n{extra_peer}\n",
            me.0, peer.1
        )
    }
}

/// tcpdump on an interface of a namespace, writing what matches a filter
/// to a pcap file; ended by its pid.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns` and waits until tcpdump listens.
    pub fn start(ns: &Netns, ifname: &str, filter: &str) -> Result<Capture> {
        let file = work_dir().join(format!("{}.pcap", unique("cap")));
        let log = file.with_extension("log");
        let bin = which("tcpdump")?;
        let mut proc = ns.spawn(
            &[
                &bin,
                "-Z",
                "root",
                "-i",
                ifname,
                "-nn",
                "-U",
                "-s",
                "128",
                "-w",
                file.to_str().unwrap(),
                filter,
            ],
            &log,
        )?;
        let t0 = Instant::now();
        while !proc.log_text().contains("listening on") {
            if !proc.alive() || t0.elapsed() > Duration::from_secs(10) {
                bail!("tcpdump did not start:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture { proc, file })
    }

    /// The packets captured so far, one tcpdump line each.
    pub fn packets(&self) -> Result<Vec<String>> {
        let out = host(&["tcpdump", "-nn", "-r", self.file.to_str().unwrap()])?;
        Ok(out.lines().map(String::from).collect())
    }

    /// Stops tcpdump and returns what it captured.
    pub fn finish(mut self) -> Result<Vec<String>> {
        // SIGTERM flushes the file (-U writes per packet anyway).
        self.proc.stop(Duration::from_secs(3));
        self.packets()
    }
}

/// Sites on one "internet" segment (a bridge in namespace `inet`): site i
/// (1-based) has a host 10.i.0.2 behind gateway 10.i.0.1, whose uplink is
/// 192.0.2.i/24. The gateways forward (as wg-quick boxes are set up).
pub struct SitesOnABridge {
    pub inet: Netns,
    pub hosts: Vec<Netns>,
    pub gws: Vec<Netns>,
}

impl SitesOnABridge {
    pub fn new(n: u8) -> Result<Self> {
        let inet = Netns::new("in")?;
        inet.sh("ip link add br0 type bridge && ip link set br0 up")?;
        let (mut hosts, mut gws) = (Vec::new(), Vec::new());
        for i in 1..=n {
            let h = Netns::new(&format!("h{i}"))?;
            let g = Netns::new(&format!("g{i}"))?;
            veth(&h, "eth0", &g, "lan0")?;
            veth(&g, "wan0", &inet, &format!("p{i}"))?;
            inet.run(&["ip", "link", "set", &format!("p{i}"), "master", "br0"])?;
            h.sh(&format!(
                "ip addr add 10.{i}.0.2/24 dev eth0 && ip route add default via 10.{i}.0.1"
            ))?;
            g.sh(&format!(
                "ip addr add 10.{i}.0.1/24 dev lan0 && ip addr add 192.0.2.{i}/24 dev wan0"
            ))?;
            g.sysctl("net.ipv4.ip_forward", "1")?;
            hosts.push(h);
            gws.push(g);
        }
        Ok(SitesOnABridge { inet, hosts, gws })
    }
}

/// A standard WireGuard peer run in a namespace: wireguard-go (Debian's)
/// or boringtun-cli, on a TUN, configured with `wg` like any wg-quick box.
pub struct WgPeer {
    pub ifname: String,
    pub proc: Proc,
}

impl WgPeer {
    /// Starts `impl_` ("wireguard-go" or "boringtun-cli") in `ns` and
    /// configures it: our key, listen port, one peer, routes to its
    /// allowed IPs through the tunnel interface.
    pub fn start(
        impl_: &str,
        ns: &Netns,
        private_key: &str,
        listen_port: u16,
        peer_public: &str,
        peer_endpoint: &str,
        allowed: &[&str],
    ) -> Result<WgPeer> {
        // /var/run/wireguard/NAME.sock is shared by every namespace: unique names.
        let ifname = unique("wg");
        let log = work_dir().join(format!("{ifname}.log"));
        let bin = which(impl_)?;
        let args: Vec<&str> = match impl_ {
            "boringtun-cli" => vec![&bin, "--foreground", "--disable-drop-privileges", &ifname],
            _ => vec![&bin, "-f", &ifname],
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name])
            .args(&args)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("WG_SUDO", "true");
        let f = std::fs::File::create(&log)?;
        let child = c
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {impl_}"))?;
        let mut proc = Proc {
            child: Some(child),
            log,
        };
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let t0 = Instant::now();
        while !sock.exists() {
            if !proc.alive() {
                bail!("{impl_} exited:\n{}", proc.log_text());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{impl_} did not create {}:\n{}", sock.display(), proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let key_file = work_dir().join(format!("{ifname}.key"));
        std::fs::write(&key_file, private_key)?;
        let allowed_csv = allowed.join(",");
        ns.run(&[
            "wg",
            "set",
            &ifname,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            &listen_port.to_string(),
            "peer",
            peer_public,
            "endpoint",
            peer_endpoint,
            "allowed-ips",
            &allowed_csv,
        ])?;
        ns.run(&["ip", "link", "set", &ifname, "up"])?;
        for a in allowed {
            let fam = if a.contains(':') { "-6" } else { "-4" };
            ns.run(&["ip", fam, "route", "replace", a, "dev", &ifname])?;
        }
        Ok(WgPeer { ifname, proc })
    }
}

/// The path of a program on PATH (or in ~/.cargo/bin).
pub fn which(prog: &str) -> Result<String> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = format!("{}:{home}/.cargo/bin", std::env::var("PATH").unwrap_or_default());
    for d in path.split(':') {
        let p = Path::new(d).join(prog);
        if p.is_file() {
            return Ok(p.to_string_lossy().into_owned());
        }
    }
    bail!("{prog} is not installed: run ./setup.sh")
}

impl TwoSites {
    /// Gateway B as a standard WireGuard box (`impl_`) instead of subway.
    pub fn standard_b(&self, impl_: &str) -> Result<WgPeer> {
        self.standard(impl_, false)
    }

    /// Gateway A (`for_a`) or B as a standard WireGuard box (`impl_`).
    pub fn standard(&self, impl_: &str, for_a: bool) -> Result<WgPeer> {
        if for_a {
            WgPeer::start(
                impl_,
                &self.gwa,
                &self.keys_a.0,
                51820,
                &self.keys_b.1,
                "192.0.2.2:51820",
                &["10.2.0.0/24", "fd02::/64"],
            )
        } else {
            WgPeer::start(
                impl_,
                &self.gwb,
                &self.keys_b.0,
                51820,
                &self.keys_a.1,
                "192.0.2.1:51820",
                &["10.1.0.0/24", "fd01::/64"],
            )
        }
    }
}

/// Pings `count` times, 50 ms apart; an error unless every one answers
/// (iputils exits 0 when a single reply of many arrives, so the summary
/// line is read).
pub fn ping(ns: &Netns, dst: &str, count: u32) -> Result<()> {
    let c = count.to_string();
    let out = ns.output(&["ping", "-c", &c, "-i", "0.05", "-W", "2", "-q", dst])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .split(", ")
        .find_map(|part| part.strip_suffix(" received"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    match received {
        Some(n) if n == count => Ok(()),
        Some(n) => bail!("[{}] ping {dst}: {n} of {count} answered\n{text}", ns.name),
        None => bail!(
            "[{}] ping {dst}: no summary\n{text}{}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Polls `cond` every 20 ms until it holds; an error naming `what` (and
/// the last thing `cond` said) if it does not within `limit`. For waiting
/// on the system under test instead of sleeping a fixed time.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let last = cond();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?} (last: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pings until one answer comes back (the first packets wait for the
/// handshake), bounded to `secs` attempts.
pub fn ping_until(ns: &Netns, dst: &str, secs: u32) -> Result<()> {
    for _ in 0..secs {
        if ns.output(&["ping", "-c", "1", "-W", "1", "-q", dst])?.status.success() {
            return Ok(());
        }
    }
    anyhow::bail!("{dst} did not answer within {secs} attempts")
}

/// A TCP exchange from `client` to `server_addr` served in `server`;
/// returns the source address the server saw.
pub fn tcp_echo(client: &Netns, server: &Netns, server_addr: SocketAddr, bytes: usize) -> Result<SocketAddr> {
    let bind: SocketAddr = match server_addr {
        SocketAddr::V4(_) => format!("0.0.0.0:{}", server_addr.port()).parse()?,
        SocketAddr::V6(_) => format!("[::]:{}", server_addr.port()).parse()?,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<SocketAddr> {
        let srv = s.spawn(move || {
            server.enter(move || -> Result<SocketAddr> {
                let l = TcpListener::bind(bind)?;
                l.set_nonblocking(true)?;
                ready_tx.send(()).ok();
                // Bounded: a client that never connects must not hang the test.
                let t0 = std::time::Instant::now();
                let (mut c, peer) = loop {
                    match l.accept() {
                        Ok(x) => break x,
                        Err(_) if t0.elapsed() < Duration::from_secs(15) => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                c.set_nonblocking(false)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = c.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    c.write_all(&buf[..n])?;
                }
                Ok(peer)
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server did not start")?;
        client.enter(move || -> Result<()> {
            let mut c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
            let mut w = c.try_clone()?;
            let d2 = data.clone();
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                w.write_all(&d2)?;
                w.shutdown(std::net::Shutdown::Write)
            });
            let mut back = Vec::new();
            c.read_to_end(&mut back)?;
            writer.join().unwrap()?;
            anyhow::ensure!(
                back == data,
                "echo differs: {} of {} bytes came back",
                back.len(),
                data.len()
            );
            Ok(())
        })??;
        srv.join().unwrap()?
    })
}

/// The MSS a TCP server in `server` sees for a connection from `client`
/// (TCP_MAXSEG on the accepted socket: the smaller of its own and the one
/// the client's SYN announced, as it arrived).
pub fn tcp_mss_seen(client: &Netns, server: &Netns, server_addr: SocketAddr) -> Result<u32> {
    let bind: SocketAddr = match server_addr {
        SocketAddr::V4(_) => format!("0.0.0.0:{}", server_addr.port()).parse()?,
        SocketAddr::V6(_) => format!("[::]:{}", server_addr.port()).parse()?,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let srv = in_netns(server.name.clone(), move || -> Result<u32> {
        let l = TcpListener::bind(bind)?;
        l.set_nonblocking(true)?;
        ready_tx.send(()).ok();
        let t0 = Instant::now();
        let c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.into()),
            }
        };
        let mut mss: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: TCP_MAXSEG writes one int of the size we pass, on a valid fd.
        let r = unsafe {
            libc::getsockopt(
                c.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                (&mut mss as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        anyhow::ensure!(r == 0, "getsockopt TCP_MAXSEG: {}", std::io::Error::last_os_error());
        Ok(mss as u32)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the MSS server did not start")?;
    client.enter(|| -> Result<()> {
        let _c = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    })??;
    srv.join().map_err(|_| anyhow!("MSS server panicked"))?
}

/// What the sink of a [`UdpFlow`] saw.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FlowReport {
    pub sent: u32,
    pub received: u32,
    /// Sequence numbers never received.
    pub lost: u32,
    pub duplicates: u32,
    /// Datagrams that arrived after a higher sequence number.
    pub reordered: u32,
    /// Each datagram's sequence number and arrival time at the sink.
    pub arrivals: Vec<(u32, Instant)>,
}

impl std::fmt::Debug for FlowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {}, received {}, lost {}, duplicates {}, reordered {}",
            self.sent, self.received, self.lost, self.duplicates, self.reordered
        )
    }
}

impl FlowReport {
    /// Sequence numbers in `range` (within what was sent) that never arrived.
    pub fn lost_in(&self, range: std::ops::Range<u32>) -> u32 {
        let mut seen = vec![false; self.sent as usize];
        for (q, _) in &self.arrivals {
            if let Some(s) = seen.get_mut(*q as usize) {
                *s = true;
            }
        }
        let end = range.end.min(self.sent);
        (range.start.min(end)..end).filter(|q| !seen[*q as usize]).count() as u32
    }

    /// The first datagram to arrive after `t`, and when.
    pub fn first_after(&self, t: Instant) -> Option<(u32, Instant)> {
        self.arrivals.iter().find(|(_, at)| *at > t).copied()
    }
}

/// Sequence numbers in the order they arrived, with their arrival times.
type Arrivals = Vec<(u32, Instant)>;

/// A bounded UDP flow with sequence numbers, from a sender namespace to a
/// sink namespace, at a fixed rate, checked at the sink for loss,
/// duplicates and reordering. Runs in the background while a test changes
/// things; [`UdpFlow::finish`] waits for it.
pub struct UdpFlow {
    sink: std::thread::JoinHandle<Result<(Arrivals, u32)>>,
    sender: std::thread::JoinHandle<Result<u32>>,
}

fn in_netns<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        let path = format!("/var/run/netns/{name}");
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a thread of our own with a valid netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {name}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

impl UdpFlow {
    /// Sends `count` datagrams of `size` bytes (at least 8) to `dst` at
    /// `pps` from `from`, received by a socket bound in `sink`.
    pub fn start(from: &Netns, sink: &Netns, dst: SocketAddr, count: u32, pps: u32, size: usize) -> Result<UdpFlow> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let bind: SocketAddr = match dst {
            SocketAddr::V4(_) => format!("0.0.0.0:{}", dst.port()).parse()?,
            SocketAddr::V6(_) => format!("[::]:{}", dst.port()).parse()?,
        };
        let period = Duration::from_secs_f64(1.0 / pps.max(1) as f64);
        let sink = in_netns(sink.name.clone(), move || {
            let s = std::net::UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            ready_tx.send(()).ok();
            let mut order = Vec::with_capacity(count as usize);
            let mut buf = [0u8; 2048];
            let mut last_rx = Instant::now();
            let budget = period * count + Duration::from_secs(20);
            let t0 = Instant::now();
            let mut done_marker = 0;
            // Until the sender says it is done and nothing came for 1 s, bounded.
            while t0.elapsed() < budget {
                match s.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        last_rx = Instant::now();
                        let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        if seq == u32::MAX {
                            done_marker += 1;
                        } else {
                            order.push((seq, last_rx));
                        }
                    }
                    _ => {
                        if done_marker > 0 && last_rx.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                        if order.len() as u32 >= count && last_rx.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                    }
                }
            }
            Ok((order, done_marker))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the flow's sink did not start")?;
        let sender = in_netns(from.name.clone(), move || {
            let s = std::net::UdpSocket::bind(match dst {
                SocketAddr::V4(_) => "0.0.0.0:0",
                SocketAddr::V6(_) => "[::]:0",
            })?;
            let mut buf = vec![0u8; size.max(8)];
            let t0 = Instant::now();
            for seq in 0..count {
                let due = t0 + period * seq;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                buf[..4].copy_from_slice(&seq.to_be_bytes());
                s.send_to(&buf, dst)?;
            }
            std::thread::sleep(Duration::from_millis(200));
            buf[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            for _ in 0..3 {
                let _ = s.send_to(&buf, dst);
            }
            Ok(count)
        });
        Ok(UdpFlow { sink, sender })
    }

    /// Waits for the flow to end and checks what the sink saw.
    pub fn finish(self) -> Result<FlowReport> {
        let sent = self.sender.join().map_err(|_| anyhow!("flow sender panicked"))??;
        let (order, _) = self.sink.join().map_err(|_| anyhow!("flow sink panicked"))??;
        let mut seen = vec![false; sent as usize];
        let mut r = FlowReport {
            sent,
            received: order.len() as u32,
            ..Default::default()
        };
        let mut highest: Option<u32> = None;
        for &(q, _) in &order {
            match seen.get_mut(q as usize) {
                Some(s) if *s => r.duplicates += 1,
                Some(s) => *s = true,
                None => r.duplicates += 1,
            }
            if highest.is_some_and(|h| q < h) {
                r.reordered += 1;
            }
            highest = highest.max(Some(q));
        }
        r.lost = seen.iter().filter(|s| !**s).count() as u32;
        r.arrivals = order;
        Ok(r)
    }
}

/// ICMP echo requests this namespace's kernel has received (`InEchos`
/// in /proc/net/snmp), to tell which of two hosts a ping reached.
pub fn icmp_in_echos(ns: &Netns) -> Result<u64> {
    let snmp = ns.run(&["cat", "/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (
        lines.next().context("no Icmp header")?,
        lines.next().context("no Icmp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .context("no InEchos in /proc/net/snmp")?;
    values
        .split_whitespace()
        .nth(i)
        .context("short Icmp line")?
        .parse()
        .context("parsing InEchos")
}

/// ICMPv6 echo requests this namespace's kernel has received.
pub fn icmp6_in_echos(ns: &Netns) -> Result<u64> {
    let snmp6 = ns.run(&["cat", "/proc/net/snmp6"])?;
    snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Icmp6InEchos"))
        .context("no Icmp6InEchos in /proc/net/snmp6")?
        .trim()
        .parse()
        .context("parsing Icmp6InEchos")
}

impl Subway {
    /// Runs `subway ARGS...` against this instance (from the host: the
    /// control socket is in /run/subway) and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let bin = workspace_bin("subway")?;
        let mut v = vec![bin.to_str().unwrap()];
        v.extend_from_slice(args);
        host(&v)
    }
}
