//! `subway`: the command-line front end and the control thread.

mod config;
mod ctl;
mod gateway;
mod live;
mod liveness;
mod local;
mod metrics;
mod routes;
mod uapi;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use config::Config;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use subway_dataplane::{Dataplane, DataplaneConfig, LanConfig, PeerRoutes, stats::Counter, xsk::XskStats};

/// subway: a site-to-site WireGuard gateway whose packet path runs in
/// userspace on AF_XDP.
///
/// Configuration is one file per gateway, a superset of wg-quick's format
/// ([Interface], [Lan], [Peer], [Tuning]); see README.md. The instance name
/// is the file's stem. Needs root (or CAP_NET_ADMIN, CAP_BPF, CAP_NET_RAW
/// and CAP_SYS_ADMIN) to load XDP and open AF_XDP sockets.
#[derive(Parser, Debug)]
#[command(name = "subway", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive);
    /// RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a gateway in the foreground until SIGINT or SIGTERM.
    ///
    /// Loads the XDP program on every [Lan] interface, binds one AF_XDP
    /// socket per interface and RX queue, starts one worker per queue
    /// pinned to a core, and serves `subway show` on /run/subway/NAME.sock.
    /// On exit it detaches XDP and closes the sockets; if it dies, the
    /// kernel detaches XDP itself and traffic falls back to the kernel.
    Run {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Install the fail-safe table of an instance from its configuration
    /// file, without starting it: the kernel refuses (ICMP administratively
    /// prohibited) any packet for a peer's AllowedIPs that would leave in
    /// clear. For boot, before the network is up (subway-fence@.service);
    /// `subway run` installs it too, and `subway down` removes it.
    Fence {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Remove everything an instance that is not running left in the
    /// kernel: its fail-safe table (tunnelled prefixes refused, VNET
    /// interfaces fenced) and a stale control socket. Traffic for the
    /// peers' prefixes is then routed by the kernel as if subway had never
    /// run, in clear if a route leads out.
    Down {
        /// Instance name (the config file's stem).
        name: String,
    },
    /// Validate a configuration file (syntax, keys, prefixes, interfaces)
    /// without touching the network. Exit status 0 means valid.
    Check {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Ask a running instance about its routes: which route and peer serve
    /// an address, what each VNET routes, which prefixes overlap.
    Route {
        #[command(subcommand)]
        query: RouteQuery,
        /// Instance name; optional when only one instance runs.
        #[arg(long, global = true)]
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Re-read the running instance's configuration file and apply the
    /// differences without a restart: peers added, removed or changed,
    /// their AllowedIPs, LAN Subnets. Sessions of unchanged peers stay up.
    /// An invalid file changes nothing. Same as SIGHUP.
    Reload {
        /// Instance name; optional when only one instance runs.
        name: Option<String>,
    },
    /// Show a running instance: workers (queue, core, mode, packet and
    /// byte counters), drops and slow-path hand-offs by reason, XDP
    /// counters.
    Show {
        /// Instance name (the config file's stem); optional when only one
        /// instance runs.
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RouteQuery {
    /// Every route, or those of one VNET.
    List {
        #[arg(long)]
        vnet: Option<String>,
    },
    /// The route (and peer) serving ADDRESS, and the less specific routes
    /// that would match next.
    Get {
        address: std::net::IpAddr,
        #[arg(long, default_value = "default")]
        vnet: String,
    },
    /// Every pair of overlapping prefixes, with their VNETs and owners.
    Overlaps,
    /// What the gateway would do with a packet arriving on a LAN of a
    /// VNET, step by step, including why it would drop it.
    Explain {
        #[arg(long, default_value = "default")]
        vnet: String,
        #[arg(long)]
        src: std::net::IpAddr,
        #[arg(long)]
        dst: std::net::IpAddr,
        /// tcp, udp, icmp...
        #[arg(long)]
        proto: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        HUP.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_level, &cli.log_format);
    let r = match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::Check { config } => check(&config),
        Cmd::Fence { config } => fence(&config),
        Cmd::Down { name } => down(&name),
        Cmd::Show { name, json } => show(name, json),
        Cmd::Reload { name } => reload_cmd(name),
        Cmd::Route { query, name, json } => route(name, query, json),
    };
    if let Err(e) = r {
        eprintln!("subway: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(level: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn load(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

fn check(path: &Path) -> Result<()> {
    let cfg = load(path)?;
    cfg.check_interfaces()?;
    println!(
        "{}: ok ({} LAN interface(s), {} peer(s), VNETs: {})",
        path.display(),
        cfg.lans.len(),
        cfg.peers.len(),
        cfg.vnet_ids().join(", ")
    );
    for p in &cfg.peers {
        println!(
            "  peer {} (line {}): endpoint {}, allowed {}, keepalive {}, preshared key {}, VNET {}",
            p.public_key.to_base64(),
            p.line,
            p.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "none".into()),
            p.allowed_ips
                .iter()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            p.persistent_keepalive
                .map(|k| format!("{k}s"))
                .unwrap_or_else(|| "off".into()),
            if p.preshared_key.is_some() { "yes" } else { "no" },
            p.vnet
        );
    }
    Ok(())
}

fn fence(path: &Path) -> Result<()> {
    let cfg = load(path)?;
    let mut dcfg = dataplane_config(&cfg);
    dcfg.listen_port = cfg.interface.listen_port.unwrap_or(0);
    let f = subway_dataplane::fence_for_config(&dcfg)?;
    subway_dataplane::failsafe::install(&f)?;
    println!("{}: installed: {}", cfg.name, f.summary());
    Ok(())
}

fn down(name: &str) -> Result<()> {
    let sock = ctl::socket_path(name);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        bail!(
            "instance {name} is running ({}): stop it first (systemctl stop subway@{name}, or SIGTERM)",
            sock.display()
        );
    }
    let uapi = PathBuf::from("/var/run/wireguard").join(format!("{name}.sock"));
    for stale in [&sock, &uapi] {
        if stale.exists() && !local::is_live(stale) {
            std::fs::remove_file(stale).with_context(|| format!("removing the stale {}", stale.display()))?;
            println!("removed the stale socket {}", stale.display());
        }
    }
    let table = subway_dataplane::failsafe::table_name(name);
    let refused = subway_dataplane::failsafe::refused(&table);
    if subway_dataplane::failsafe::remove(&table)? {
        println!(
            "removed nft table inet {table} ({} packet(s) refused while it stood): the kernel routes the peers' prefixes again",
            refused.map_or("?".into(), |n| n.to_string())
        );
    } else {
        println!("{name}: nothing left in the kernel (no nft table inet {table})");
    }
    Ok(())
}

pub(crate) fn dataplane_config(cfg: &Config) -> DataplaneConfig {
    let vnets = cfg.vnet_ids();
    let vnet_id = |n: &str| vnets.iter().position(|v| v == n).unwrap_or(0) as u32;
    DataplaneConfig {
        name: cfg.name.clone(),
        lans: cfg
            .lans
            .iter()
            .map(|l| LanConfig {
                ifname: l.interface.clone(),
                subnets: l.subnets.clone(),
                vnet: vnet_id(&l.vnet),
            })
            .collect(),
        queues: cfg.tuning.queues.clone(),
        cores: cfg.tuning.cores.clone(),
        xsk: cfg.tuning.xsk,
        xdp_mode: cfg.tuning.xdp_mode,
        uplink: cfg.interface.uplink.as_ref().map(|(u, _)| u.clone()),
        listen_port: 0,
        fail_open: cfg.interface.fail_open,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerRoutes {
                id: p.id,
                vnet: vnet_id(&p.vnet),
                allowed_ips: p.allowed_ips.iter().map(|(n, _)| *n).collect(),
            })
            .collect(),
    }
}

fn run(path: &Path) -> Result<()> {
    let mut cfg = load(path)?;
    cfg.check_interfaces()?;
    // The device and its UDP sockets first: the listen port may be chosen
    // by the kernel, and the XDP program must know it. A gateway with a key
    // and an uplink but no peers yet is a gateway too (peers come later).
    let gateway_mode = !cfg.peers.is_empty() || (cfg.interface.private_key.is_some() && cfg.interface.uplink.is_some());
    let mut gw = if gateway_mode {
        Some(gateway::Gateway::new(&cfg)?)
    } else {
        None
    };
    // SAFETY: installing a handler that only stores to atomics.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
    }
    let mut reloads = Reloads::default();
    // Files and sockets this process creates are its own (the UAPI socket
    // answers with the private key); the sockets are also chmod 0600.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let mut ctl = ctl::CtlServer::bind(&cfg.name).context("opening the control socket")?;
    let mut dcfg = dataplane_config(&cfg);
    dcfg.listen_port = gw.as_ref().map(|g| g.listen_port).unwrap_or(0);
    let mut dp = Dataplane::start(&dcfg).with_context(|| format!("starting {}", cfg.name))?;
    for w in dp.workers() {
        tracing::info!(
            "worker {}: queue {} core {} interfaces {} AF_XDP {} XDP {} batch {} ring {} {}",
            w.info.id,
            w.info.queue,
            w.info.core.map(|c| c.to_string()).unwrap_or_else(|| "any".into()),
            w.info.ports.join(","),
            if w.info.zero_copy { "zero-copy" } else { "copy" },
            w.xdp_mode,
            dcfg.xsk.batch_size,
            dcfg.xsk.ring_size,
            if dcfg.xsk.busy_poll {
                "busy-poll"
            } else if dcfg.xsk.need_wakeup {
                "need-wakeup"
            } else {
                "spin"
            },
        );
    }
    let mode = if gw.is_some() { "gateway" } else { "routed" };
    if let Some(g) = &gw {
        tracing::info!(listen_port = g.listen_port, peers = cfg.peers.len(), "WireGuard");
    }
    tracing::info!(instance = %cfg.name, slow_path = dp.slow_path_name(), "subway is running ({mode} mode); `subway show {}`", cfg.name);

    let started = Instant::now();
    let mut liveness = liveness::Liveness::new(&dp);
    let mut rates = Rates::default();
    // `wg show NAME` works against a gateway.
    let mut uapi = match &gw {
        Some(_) => match uapi::UapiServer::bind(&cfg.name) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!("not serving the WireGuard UAPI (wg show): {e}");
                None
            }
        },
        None => None,
    };
    let mut metrics = match cfg.metrics {
        Some((addr, line)) => Some(
            metrics::MetricsServer::bind(addr)
                .with_context(|| format!("{}:{line}: serving metrics on {addr}", cfg.path.display()))?,
        ),
        None => None,
    };
    if let Some((addr, _)) = cfg.metrics {
        tracing::info!("Prometheus metrics on http://{addr}/metrics");
    }
    let mut fds = vec![ctl.fd(), dp.slow_path().fd(), dp.slow_path().punt_fd()];
    if let Some(g) = &gw {
        fds.extend(g.fds());
    }
    // The uplink's addresses may change under us (DHCP, SLAAC).
    let mut addr_events = match subway_dataplane::netlink::AddressEvents::open() {
        Ok(e) => {
            fds.push(e.fd());
            Some(e)
        }
        Err(e) => {
            tracing::warn!("not following address changes (netlink): {e}");
            None
        }
    };
    if let Some(u) = &uapi {
        fds.push(u.fd());
    }
    // Every socket is bound: systemd (Type=notify) may start what waits for us.
    liveness.ready(&format!("{mode} mode, {} worker(s)", dp.workers().len()));
    let pollfd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|fd| pollfd(*fd)).collect();
    while !STOP.load(Ordering::Relaxed) {
        // Local clients whose request has not all arrived wake the loop
        // when it does, not a round later.
        pfds.truncate(fds.len());
        pfds.extend(ctl.pending_fds().map(pollfd));
        if let Some(u) = &uapi {
            pfds.extend(u.pending_fds().map(pollfd));
        }
        // SAFETY: valid pollfds; the timeout bounds timer and neighbour latency.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        if let Some(id) = dp.dead_worker() {
            bail!("worker {id} stopped unexpectedly; exiting so that traffic falls back to the kernel");
        }
        if let Err(e) = liveness.check(&dp) {
            bail!("{e}");
        }
        if addr_events.as_mut().is_some_and(|e| e.drain()) {
            let port = gw.as_ref().map_or(0, |g| g.listen_port);
            match dp.follow_uplink_addresses(port) {
                Ok(Some(_)) => {
                    if let Some(g) = gw.as_mut() {
                        g.uplink_renumbered(&mut dp);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("following the uplink's addresses: {e}"),
            }
        }
        if let Err(e) = dp.refresh_neighbours() {
            tracing::warn!("neighbour refresh: {e}");
        }
        rates.sample(&dp);
        if HUP.swap(false, Ordering::Relaxed) {
            let r = live::reload(&mut cfg, gw.as_mut(), &mut dp);
            reloads.note("SIGHUP", &r);
        }
        if let Some(g) = gw.as_mut() {
            g.poll(&mut dp);
        } else {
            // Routed mode: nothing reads the TUN; drain what the kernel
            // routes there (nothing should be).
            let mut b = [0u8; 2048];
            while dp.slow_path().recv(&mut b).is_ok() {}
            dp.serve_punted(|_, _| {});
        }
        if let Some(u) = uapi.as_mut() {
            u.serve(|req| match req {
                uapi::Request::Get => {
                    let Some(g) = gw.as_ref() else { return String::new() };
                    let key = cfg.interface.private_key.map(|k| k.0).unwrap_or([0; 32]);
                    let keys: Vec<[u8; 32]> = cfg.peers.iter().map(|p| p.public_key.0).collect();
                    let psks: Vec<Option<[u8; 32]>> = cfg.peers.iter().map(|p| p.preshared_key.map(|k| k.0)).collect();
                    let kas: Vec<Option<u16>> = cfg.peers.iter().map(|p| p.persistent_keepalive).collect();
                    uapi::render(
                        &key,
                        g.listen_port,
                        &g.peers_json(&cfg, &dp),
                        &keys,
                        &psks,
                        &kas,
                        subway_dataplane::wg::Now::system().unix,
                    ) + "errno=0\n"
                }
                uapi::Request::Set(lines) => {
                    let r = uapi::apply_set(&cfg, &lines).map_err(|(errno, msg)| {
                        tracing::warn!("wg set refused: {msg}");
                        errno
                    });
                    let errno = match r {
                        Ok(new) => {
                            let r = live::apply(&mut cfg, new, gw.as_mut(), &mut dp);
                            let ok = r.is_ok();
                            reloads.note("wg set", &r);
                            if ok { 0 } else { libc::EINVAL }
                        }
                        Err(errno) => errno,
                    };
                    format!("errno={errno}\n")
                }
            });
        }
        if let Some(m) = metrics.as_mut() {
            m.serve(|| metrics::render(&show_json(&cfg, &dp, gw.as_ref(), &rates, started, &reloads)));
        }
        // Clients the local sockets closed on, by reason (before serving:
        // the server is busy answering).
        let refused = |r: local::Refusals| {
            json!({"not_permitted": r.not_permitted, "too_large": r.too_large,
                   "timed_out": r.timed_out, "too_many": r.too_many})
        };
        let local_refused = json!({
            "control": refused(ctl.refused()),
            "uapi": uapi.as_ref().map(|u| refused(u.refused())),
        });
        ctl.serve(|req| match req {
            "show" | "" => {
                let mut v = show_json(&cfg, &dp, gw.as_ref(), &rates, started, &reloads);
                v["local_refused"] = local_refused.clone();
                v.to_string()
            }
            "reload" => {
                let r = live::reload(&mut cfg, gw.as_mut(), &mut dp);
                reloads.note("subway reload", &r);
                match r {
                    Ok(v) => v.to_string(),
                    Err(e) => json!({"error": format!("{e:#}")}).to_string(),
                }
            }
            q if q.starts_with("route ") => route_answer(&cfg, &dp, &q[6..]).to_string(),
            other => json!({"error": format!("unknown request {other:?}")}).to_string(),
        });
    }
    liveness::Liveness::stopping();
    tracing::info!("stopping: detaching XDP and closing sockets");
    let last = show_json(&cfg, &dp, gw.as_ref(), &rates, started, &reloads);
    dp.stop_clean();
    drop(dp);
    tracing::info!(totals = %last["totals"], "stopped");
    Ok(())
}

fn counters_json(values: &[u64]) -> Value {
    let mut m = serde_json::Map::new();
    for c in Counter::ALL {
        m.insert(c.name().into(), json!(values[*c as usize]));
    }
    Value::Object(m)
}

/// Per-worker packet rates over the last second or so.
#[derive(Default)]
struct Rates {
    at: Option<Instant>,
    last: Vec<(u64, u64)>,
    pps: Vec<(f64, f64)>,
}

impl Rates {
    fn sample(&mut self, dp: &Dataplane) {
        let now = Instant::now();
        let cur: Vec<(u64, u64)> = dp
            .workers()
            .iter()
            .map(|w| (w.stats.get(Counter::RxPackets), w.stats.get(Counter::TxPackets)))
            .collect();
        match self.at {
            Some(t) if now.duration_since(t).as_secs_f64() < 1.0 => return,
            Some(t) => {
                let dt = now.duration_since(t).as_secs_f64();
                self.pps = cur
                    .iter()
                    .zip(&self.last)
                    .map(|(c, l)| ((c.0 - l.0) as f64 / dt, (c.1 - l.1) as f64 / dt))
                    .collect();
            }
            None => {}
        }
        self.at = Some(now);
        self.last = cur;
    }
}

/// Outcomes of live changes (reload, SIGHUP, `wg set`).
#[derive(Default)]
struct Reloads {
    ok: u64,
    failed: u64,
    last_error: Option<String>,
    last: Option<Value>,
}

impl Reloads {
    fn note(&mut self, how: &str, r: &Result<Value>) {
        match r {
            Ok(v) => {
                self.ok += 1;
                self.last = Some(v.clone());
                tracing::info!(changes = %v, "{how}: applied");
            }
            Err(e) => {
                self.failed += 1;
                self.last_error = Some(format!("{e:#}"));
                tracing::error!("{how}: {e:#}");
            }
        }
    }

    fn json(&self) -> Value {
        json!({"ok": self.ok, "failed": self.failed, "last_error": self.last_error, "last_changes": self.last})
    }
}

fn show_json(
    cfg: &Config,
    dp: &Dataplane,
    gw: Option<&gateway::Gateway>,
    rates: &Rates,
    started: Instant,
    reloads: &Reloads,
) -> Value {
    let mut totals = vec![0u64; Counter::COUNT];
    let mut xsk_totals = [0u64; 6];
    let workers: Vec<Value> = dp
        .workers()
        .iter()
        .map(|w| {
            let snap = w.stats.snapshot();
            for (t, v) in totals.iter_mut().zip(snap.iter()) {
                *t += v;
            }
            let mut xsk = serde_json::Map::new();
            for (ifname, st) in w.xsk_stats() {
                let vals = st.values();
                for (t, v) in xsk_totals.iter_mut().zip(vals.iter()) {
                    *t += v;
                }
                let m: serde_json::Map<String, Value> = XskStats::NAMES
                    .iter()
                    .zip(vals)
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                xsk.insert(ifname, Value::Object(m));
            }
            json!({
                "id": w.info.id, "queue": w.info.queue, "core": w.info.core,
                "mode": if w.info.zero_copy { "zero-copy" } else { "copy" },
                "xdp_mode": w.xdp_mode, "interfaces": w.info.ports,
                "counters": counters_json(&snap),
                "rx_pps": rates.pps.get(w.info.id).map(|r| r.0.round()).unwrap_or(0.0),
                "tx_pps": rates.pps.get(w.info.id).map(|r| r.1.round()).unwrap_or(0.0),
                "xsk": xsk,
            })
        })
        .collect();
    let xdp: serde_json::Map<String, Value> = dp
        .xdp_counters()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let t = dp.tables();
    json!({
        "name": cfg.name,
        "pid": std::process::id(),
        "mode": if gw.is_some() { "gateway" } else { "routed" },
        "listen_port": gw.map(|g| g.listen_port),
        "peers": gw.map(|g| g.peers_json(cfg, dp)).unwrap_or(json!([])),
        "control": gw.map(|g| json!(g.events)).unwrap_or(json!({})),
        "uptime_secs": started.elapsed().as_secs(),
        "slow_path": dp.slow_path_name(),
        "interfaces": t.ports.iter().map(|p| json!({"name": p.name, "ifindex": p.ifindex, "mac": p.mac.to_string(), "vnet": cfg.vnet_ids().get(p.vnet as usize)})).collect::<Vec<_>>(),
        "routes": t.fib.routes().iter().map(|r| json!({"vnet": cfg.vnet_ids().get(r.vnet as usize), "prefix": r.prefix.to_string(), "target": format!("{:?}", r.target)})).collect::<Vec<_>>(),
        "neighbours": t.neigh.len(),
        "workers": workers,
        "totals": counters_json(&totals),
        "xsk": XskStats::NAMES.iter().zip(xsk_totals).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<String, Value>>(),
        "xdp": xdp,
        "reloads": reloads.json(),
        "vnet_slow_path": dp.punt_stats().fields().iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<String, Value>>(),
    })
}

fn instance_name(name: Option<String>) -> Result<String> {
    Ok(match name {
        Some(n) => n,
        None => {
            let all = ctl::instances();
            match all.as_slice() {
                [one] => one.clone(),
                [] => bail!("no running instance found in {}", ctl::RUN_DIR),
                many => bail!("several instances run ({}): name one", many.join(", ")),
            }
        }
    })
}

/// Answers "list [VNET]", "get ADDRESS VNET" or "overlaps".
fn route_answer(cfg: &Config, dp: &Dataplane, q: &str) -> Value {
    let t = dp.tables();
    let views = routes::views(cfg, t.fib.routes(), &t.ports);
    let mut words = q.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("list"), vnet, _) => routes::list(&views, vnet),
        (Some("get"), Some(addr), vnet) => match addr.parse() {
            Ok(_) if !cfg.vnet_ids().iter().any(|v| v == vnet.unwrap_or("default")) => json!({
                "error": format!("no VNET named {}: this instance has {}", vnet.unwrap_or("default"), cfg.vnet_ids().join(", "))
            }),
            Ok(a) => routes::get(&views, a, vnet.unwrap_or("default")),
            Err(_) => json!({"error": format!("{addr} is not an IP address")}),
        },
        (Some("overlaps"), _, _) => routes::overlaps(&views),
        (Some("explain"), Some(vnet), Some(src)) => {
            let rest: Vec<&str> = words.collect();
            let dst = rest.first().and_then(|d| d.parse().ok());
            let proto = rest.get(1).copied().filter(|p| *p != "-");
            let port = rest.get(2).and_then(|p| p.parse().ok());
            match (src.parse(), dst) {
                (Ok(src), Some(dst)) => routes::explain(
                    cfg,
                    &t,
                    &routes::Probe {
                        vnet,
                        src,
                        dst,
                        proto,
                        port,
                    },
                    subway_dataplane::wg::Now::system().mono,
                ),
                _ => json!({"error": "explain needs a source and a destination address"}),
            }
        }
        _ => json!({"error": format!("unknown route query {q:?}")}),
    }
}

fn route(name: Option<String>, q: RouteQuery, as_json: bool) -> Result<()> {
    let name = instance_name(name)?;
    let req = match &q {
        RouteQuery::List { vnet } => format!("route list {}", vnet.as_deref().unwrap_or("")),
        RouteQuery::Get { address, vnet } => format!("route get {address} {vnet}"),
        RouteQuery::Overlaps => "route overlaps".to_string(),
        RouteQuery::Explain {
            vnet,
            src,
            dst,
            proto,
            port,
        } => format!(
            "route explain {vnet} {src} {dst} {} {}",
            proto.as_deref().unwrap_or("-"),
            port.map(|p| p.to_string()).unwrap_or_default()
        ),
    };
    let v: Value = serde_json::from_str(&ctl::request(&name, &req)?).context("the instance sent invalid JSON")?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("error"));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let line = |r: &Value| {
        format!(
            "[{}] {} -> {} {}{}",
            r["vnet"].as_str().unwrap_or("?"),
            r["prefix"].as_str().unwrap_or("?"),
            r["kind"].as_str().unwrap_or("?"),
            r["via"].as_str().unwrap_or("?"),
            r["endpoint"]
                .as_str()
                .map(|e| format!(" (endpoint {e})"))
                .unwrap_or_default()
        )
    };
    match q {
        RouteQuery::List { .. } => {
            for r in v.as_array().into_iter().flatten() {
                println!("{}", line(r));
            }
        }
        RouteQuery::Get { .. } => {
            println!(
                "{} in VNET {}: {}",
                v["address"].as_str().unwrap_or("?"),
                v["vnet"].as_str().unwrap_or("?"),
                v["verdict"].as_str().unwrap_or("?")
            );
            if !v["route"].is_null() {
                println!("  route: {}", line(&v["route"]));
            }
            for r in v["less_specific"].as_array().into_iter().flatten() {
                println!("  then:  {}", line(r));
            }
        }
        RouteQuery::Explain { .. } => {
            println!(
                "{} in VNET {}:",
                v["packet"].as_str().unwrap_or("?"),
                v["vnet"].as_str().unwrap_or("?")
            );
            for (i, step) in v["steps"].as_array().into_iter().flatten().enumerate() {
                println!("  {}. {}", i + 1, step.as_str().unwrap_or("?"));
            }
            println!("  => {}", v["verdict"].as_str().unwrap_or("?"));
        }
        RouteQuery::Overlaps => {
            let pairs = v.as_array().cloned().unwrap_or_default();
            if pairs.is_empty() {
                println!("no overlapping prefixes");
            }
            for p in pairs {
                println!(
                    "{}\n  overlaps {}\n  {}",
                    line(&p["a"]),
                    line(&p["b"]),
                    p["resolution"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

fn reload_cmd(name: Option<String>) -> Result<()> {
    let name = instance_name(name)?;
    let v: Value = serde_json::from_str(&ctl::request(&name, "reload")?).context("the instance sent invalid JSON")?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("error"));
    }
    let list = |k: &str| {
        let items: Vec<&str> = v[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    println!("{name}: reloaded");
    for (k, what) in [
        ("peers_added", "peers added"),
        ("peers_removed", "peers removed"),
        ("peers_changed", "peers changed"),
        ("routes_added", "routes added"),
        ("routes_removed", "routes removed"),
        ("routes_changed", "routes changed"),
    ] {
        println!("  {what}: {}", list(k));
    }
    Ok(())
}

fn show(name: Option<String>, as_json: bool) -> Result<()> {
    let name = instance_name(name)?;
    let reply = ctl::request(&name, "show")?;
    let v: Value = serde_json::from_str(&reply).context("the instance sent invalid JSON")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "instance {} (pid {}, {} mode, up {}s), slow path {}",
        v["name"].as_str().unwrap_or("?"),
        v["pid"],
        v["mode"].as_str().unwrap_or("?"),
        v["uptime_secs"],
        v["slow_path"].as_str().unwrap_or("?")
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let c = &w["counters"];
        println!(
            "  worker {} queue {} core {} {} XDP {}: rx {} pkts / {} B, tx {} pkts / {} B, batches {}, now {} / {} pps",
            w["id"],
            w["queue"],
            w["core"],
            w["mode"].as_str().unwrap_or("?"),
            w["xdp_mode"].as_str().unwrap_or("?"),
            c["rx_packets"],
            c["rx_bytes"],
            c["tx_packets"],
            c["tx_bytes"],
            c["rx_batches"],
            w["rx_pps"],
            w["tx_pps"]
        );
    }
    let nonzero = |obj: &Value, pred: &dyn Fn(&str) -> bool| -> Vec<String> {
        obj.as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| pred(k) && v.as_u64().unwrap_or(0) > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    };
    if let Some(port) = v["listen_port"].as_u64() {
        println!("  listening on UDP {port}");
    }
    for p in v["peers"].as_array().into_iter().flatten() {
        println!(
            "  peer {} (VNET {})\n    endpoint {}, allowed ips {}\n    latest handshake {}, handshakes {}, fast path {}\n    transfer: {} packets / {} B received, {} packets / {} B sent",
            p["public_key"].as_str().unwrap_or("?"),
            p["vnet"].as_str().unwrap_or("default"),
            p["endpoint"].as_str().unwrap_or("(none)"),
            p["allowed_ips"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            p["latest_handshake_secs_ago"]
                .as_u64()
                .map(|s| format!("{s} s ago"))
                .unwrap_or_else(|| "never".into()),
            p["handshakes"],
            p["fast_path"],
            p["rx_packets"],
            p["rx_bytes"],
            p["tx_packets"],
            p["tx_bytes"],
        );
    }
    let drops = nonzero(&v["totals"], &|k| k.starts_with("drop_"));
    let slow = nonzero(&v["totals"], &|k| k.starts_with("slow_"));
    println!(
        "  drops: {}",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(" ")
        }
    );
    println!(
        "  to kernel (slow path): {}",
        if slow.is_empty() { "none".into() } else { slow.join(" ") }
    );
    println!("  xdp: {}", nonzero(&v["xdp"], &|_| true).join(" "));
    let xsk = nonzero(&v["xsk"], &|_| true);
    println!(
        "  AF_XDP sockets (kernel): {}",
        if xsk.is_empty() {
            "no drops".into()
        } else {
            xsk.join(" ")
        }
    );
    // The control thread's own counters: handshakes in and out, cookie
    // replies, rate limiting and refusals by reason (a handshake flood
    // shows here, not among the workers' drops).
    let control = nonzero(&v["control"], &|_| true);
    println!(
        "  control thread: {}",
        if control.is_empty() {
            "idle".into()
        } else {
            control.join(" ")
        }
    );
    let refused: Vec<String> = ["control", "uapi"]
        .iter()
        .flat_map(|s| {
            nonzero(&v["local_refused"][*s], &|_| true)
                .into_iter()
                .map(move |r| format!("{s}.{r}"))
        })
        .collect();
    if !refused.is_empty() {
        println!("  local clients closed: {}", refused.join(" "));
    }
    let vnet_slow = nonzero(&v["vnet_slow_path"], &|_| true);
    if !vnet_slow.is_empty() {
        println!("  non-default VNETs, control thread: {}", vnet_slow.join(" "));
    }
    let r = &v["reloads"];
    if r["ok"].as_u64().unwrap_or(0) + r["failed"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  live changes: {} applied, {} refused{}",
            r["ok"],
            r["failed"],
            r["last_error"]
                .as_str()
                .map(|e| format!(" (last refusal: {e})"))
                .unwrap_or_default()
        );
    }
    println!("  interfaces:");
    for i in v["interfaces"].as_array().into_iter().flatten() {
        println!(
            "    {} ({}) VNET {}",
            i["name"].as_str().unwrap_or("?"),
            i["mac"].as_str().unwrap_or("?"),
            i["vnet"].as_str().unwrap_or("uplink only")
        );
    }
    println!("  routes:");
    for r in v["routes"].as_array().into_iter().flatten() {
        println!(
            "    [{}] {} -> {}",
            r["vnet"].as_str().unwrap_or("?"),
            r["prefix"].as_str().unwrap_or("?"),
            r["target"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
