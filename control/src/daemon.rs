//! `subway run`: the control thread. It starts the dataplane and the
//! WireGuard device, then loops: sleep until a socket is readable (local
//! clients, WireGuard's UDP, the slow path, netlink's address, neighbour
//! and route events, a metrics scrape's eventfd), a signal, or the next
//! deadline ([`State::sleep_for`]); `step` does the housekeeping (workers
//! alive, liveness, uplink addresses, neighbours, handshakes and timers,
//! SIGHUP); `on_uapi`, `on_ctl` and `on_metrics` answer local clients.
//! The state a request may read or change ([`State`]) is kept apart from
//! the sockets that carry requests ([`Io`]), so answering one borrows both
//! without a lock.

use crate::config::Config;
use crate::local::Reply;
use crate::protocol::{self, Request};
use crate::status::{LocalRefused, Rates, Reloads, Status};
use crate::{capture, ctl, export, gateway, ha, health, live, liveness, metrics, probe, routes, uapi};
use anyhow::{Context, Result, bail};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use subway_dataplane::Dataplane;

static STOP: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        HUP.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

/// The longest sleep with nothing due: rates, worker and watchdog checks.
const IDLE_MAX: Duration = Duration::from_secs(1);
/// The round while the workers move a peer's traffic: WireGuard's timers
/// (keepalive, rekey) learn of it from the control thread's notes.
const TRAFFIC_TICK: Duration = Duration::from_millis(50);

/// What requests read and change: the config, the device, the dataplane.
struct State {
    cfg: Config,
    gw: Option<gateway::Gateway>,
    dp: Dataplane,
    liveness: liveness::Liveness,
    rates: Rates,
    reloads: Reloads,
    started: Instant,
    /// The workers moved a peer's traffic during the last round.
    busy: bool,
    /// Rounds of the loop, for `subway show` (wake-ups).
    rounds: u64,
    /// Active/standby ([HA]), if configured.
    ha: Option<ha::Ha>,
    /// Route groups' probes, if any peer is in one.
    probes: Option<probe::Probes>,
    /// The routing table kept for a routing daemon ([Export]).
    export: Option<export::Exporter>,
    /// A clean stop that drains first: when it may stop.
    draining_until: Option<Instant>,
}

/// The local sockets and event sources the loop waits on.
struct Io {
    ctl: ctl::CtlServer,
    uapi: Option<uapi::UapiServer>,
    metrics: Option<metrics::MetricsServer>,
    addr_events: Option<subway_dataplane::netlink::AddressEvents>,
    /// The fds every round waits on (the pending clients' are added).
    fds: Vec<RawFd>,
}

/// Runs the instance configured in `path` until SIGINT or SIGTERM.
pub fn run(path: &Path) -> Result<()> {
    let (mut s, mut io) = start(path)?;
    let pollfd = |fd: RawFd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    loop {
        if STOP.load(Ordering::Relaxed) && !s.keep_draining() {
            break;
        }
        // Local clients whose request has not all arrived wake the loop
        // when it does, not a round later.
        pfds.clear();
        pfds.extend(io.fds.iter().copied().map(pollfd));
        pfds.extend(io.ctl.pending_fds().map(pollfd));
        if let Some(u) = &io.uapi {
            pfds.extend(u.pending_fds().map(pollfd));
        }
        // Rounded up: a deadline less than a millisecond away is slept
        // to, not polled for in a loop of zero timeouts.
        let timeout = s.sleep_for().as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: valid pollfds.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        s.rounds += 1;
        s.step(&mut io)?;
        s.on_uapi(&mut io);
        s.on_metrics(&mut io);
        s.on_ctl(&mut io);
    }
    liveness::Liveness::stopping();
    tracing::info!("stopping: detaching XDP and closing sockets");
    let last = s.status(&io);
    s.dp.stop_clean();
    drop(s);
    tracing::info!(totals = ?last.totals.iter().filter(|(_, v)| **v > 0).collect::<Vec<_>>(), "stopped");
    Ok(())
}

fn start(path: &Path) -> Result<(State, Io)> {
    let cfg = crate::load(path)?;
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
    // Files and sockets this process creates are its own (the UAPI socket
    // answers with the private key); the sockets are also chmod 0600.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let ctl = ctl::CtlServer::bind(&cfg.name).context("opening the control socket")?;
    let mut dcfg = crate::dataplane_config(&cfg);
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
    // HA: the role before the first handshake (a standby sends nothing).
    let ha = match &cfg.ha {
        Some(section) => {
            let h = ha::Ha::new(section, &dp).context("reading this box's addresses for [HA]")?;
            if let Some(g) = gw.as_mut() {
                g.set_active(h.active, &mut dp);
            }
            Some(h)
        }
        None => None,
    };
    let mode = if gw.is_some() { "gateway" } else { "routed" };
    if let Some(g) = &gw {
        tracing::info!(listen_port = g.listen_port, peers = cfg.peers.len(), "WireGuard");
    }
    tracing::info!(instance = %cfg.name, slow_path = dp.slow_path_name(), "subway is running ({mode} mode); `subway show {}`", cfg.name);

    // `wg show NAME` works against a gateway.
    let uapi = match &gw {
        Some(_) => match uapi::UapiServer::bind(&cfg.name) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!("not serving the WireGuard UAPI (wg show): {e}");
                None
            }
        },
        None => None,
    };
    let metrics = match cfg.metrics {
        Some((addr, line)) => {
            let m = metrics::MetricsServer::bind(addr)
                .with_context(|| format!("{}:{line}: serving metrics on {addr}", cfg.path.display()))?;
            tracing::info!("Prometheus metrics on http://{addr}/metrics");
            Some(m)
        }
        None => None,
    };
    let mut fds = vec![ctl.fd(), dp.slow_path().fd(), dp.slow_path().punt_fd()];
    if let Some(g) = &gw {
        fds.extend(g.fds());
    }
    // The uplink's addresses may change under us (DHCP, SLAAC).
    let addr_events = match subway_dataplane::netlink::AddressEvents::open() {
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
    fds.extend(metrics.as_ref().map(|m| m.fd()));
    // Neighbours and routes change under us too (ARP, NDP, routing daemons).
    fds.extend(dp.kernel_events_fd());
    let probes = gw.as_ref().and_then(|_| probe::Probes::new(&cfg));
    let export = match (&cfg.export, &gw) {
        (Some(e), Some(_)) => Some(export::Exporter::new(e, dp.slow_path_name())),
        _ => None,
    };
    if let Some(p) = &probes {
        fds.extend(p.fds());
    }
    let liveness = liveness::Liveness::new(&dp);
    // Every socket is bound: systemd (Type=notify) may start what waits for us.
    liveness.ready(&format!("{mode} mode, {} worker(s)", dp.workers().len()));
    let state = State {
        cfg,
        gw,
        dp,
        liveness,
        rates: Rates::default(),
        reloads: Reloads::default(),
        started: Instant::now(),
        busy: false,
        rounds: 0,
        ha,
        probes,
        export,
        draining_until: None,
    };
    let io = Io {
        ctl,
        uapi,
        metrics,
        addr_events,
        fds,
    };
    Ok((state, io))
}

impl State {
    /// One round of housekeeping. An error ends the process (workers
    /// died or stalled: traffic falls back to the kernel, tunnelled
    /// prefixes stay fenced).
    fn step(&mut self, io: &mut Io) -> Result<()> {
        if let Some(id) = self.dp.dead_worker() {
            bail!("worker {id} stopped unexpectedly; exiting so that traffic falls back to the kernel");
        }
        if let Err(e) = self.liveness.check(&self.dp) {
            bail!("{e}");
        }
        if io.addr_events.as_mut().is_some_and(|e| e.drain()) {
            // A virtual address came or went: the role first, so that a
            // new active box handshakes in this very round.
            if let Some(active) = self.ha.as_mut().and_then(|h| h.update(&self.dp))
                && let Some(g) = self.gw.as_mut()
            {
                g.set_active(active, &mut self.dp);
            }
            let port = self.gw.as_ref().map_or(0, |g| g.listen_port);
            match self.dp.follow_uplink_addresses(port) {
                Ok(Some(_)) => {
                    if let Some(g) = self.gw.as_mut() {
                        g.uplink_renumbered(&mut self.dp);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("following the uplink's addresses: {e}"),
            }
        }
        if let Err(e) = self.dp.follow_kernel() {
            tracing::warn!("following neighbours and routes: {e}");
        }
        self.rates.sample(&self.dp);
        if HUP.swap(false, Ordering::Relaxed) {
            let r = live::reload(&mut self.cfg, self.gw.as_mut(), &mut self.dp);
            self.reloads.note("SIGHUP", &r);
        }
        self.probe();
        self.export();
        if let Some(g) = self.gw.as_mut() {
            self.busy = g.poll(&mut self.dp);
        } else {
            // Routed mode: nothing reads the TUN; drain what the kernel
            // routes there (nothing should be).
            let mut b = [0u8; 2048];
            while self.dp.slow_path().recv(&mut b).is_ok() {}
            self.dp.serve_punted(|_, _| {});
        }
        Ok(())
    }

    /// [Export]: the table holds what the healthy peers can serve now.
    fn export(&mut self) {
        let (Some(e), Some(g)) = (self.export.as_mut(), self.gw.as_ref()) else {
            return;
        };
        let probes = self.probes.as_ref();
        let wanted = export::Exporter::wanted(&self.cfg, |id| match probes.and_then(|p| p.status(id)) {
            Some(s) => s.up && g.has_session(id),
            None => g.has_session(id),
        });
        e.sync(&wanted);
    }

    /// A clean stop with [Export]: the first call withdraws every route
    /// and starts DrainSeconds of serving on while the routers move away;
    /// true until that is over.
    fn keep_draining(&mut self) -> bool {
        let Some(e) = self.export.as_mut() else {
            return false;
        };
        let now = Instant::now();
        match self.draining_until {
            Some(until) => now < until,
            None => {
                e.draining = true;
                let had = e.withdraw_all();
                let d = self.cfg.export.as_ref().map_or(Duration::ZERO, |x| x.drain);
                if !had || d.is_zero() {
                    return false;
                }
                tracing::info!(
                    "stopping: routes withdrawn, serving {} s more while the routers move away",
                    d.as_secs()
                );
                self.draining_until = Some(now + d);
                true
            }
        }
    }

    /// Route groups: answers read, misses counted, due probes sent; a
    /// member that went up or down moves its group's prefixes.
    fn probe(&mut self) {
        let (Some(p), Some(g)) = (self.probes.as_mut(), self.gw.as_mut()) else {
            return;
        };
        let mut changed = p.receive();
        let (due, moved) = p.tick(&self.dp, Instant::now(), |peer| g.rx_packets(peer, &self.dp));
        changed |= moved;
        for (peer, pkt) in due {
            g.send_packet(peer, &pkt);
        }
        if changed {
            match self.dp.set_peers_up(&p.states()) {
                Ok(ch) => tracing::warn!(retargeted = ?ch.retargeted, "route groups: prefixes moved"),
                Err(e) => tracing::warn!("route groups: the FIB could not follow the peers' health: {e}"),
            }
        }
    }

    /// How long the loop may sleep when nothing arrives: a short round
    /// while traffic moves, else until the device's next timer, at most
    /// [`IDLE_MAX`] and half the watchdog's interval.
    fn sleep_for(&mut self) -> Duration {
        if self.dp.kernel_events_held() {
            return Duration::ZERO;
        }
        if self.busy {
            return TRAFFIC_TICK;
        }
        let mut d = IDLE_MAX;
        if let Some(every) = self.liveness.feed_every() {
            d = d.min(every / 2);
        }
        if let Some(soon) = self.dp.punt_deadline() {
            d = d.min(soon);
        }
        if let Some(at) = self.probes.as_ref().and_then(|p| p.next_at()) {
            d = d.min(at.saturating_duration_since(Instant::now()));
        }
        let now = subway_dataplane::wg::Now::system().mono;
        if let Some(at) = self.gw.as_mut().and_then(|g| g.next_deadline(now)) {
            d = d.min(at.saturating_sub(now));
        }
        d
    }

    /// `wg show` and `wg set` on the UAPI socket.
    fn on_uapi(&mut self, io: &mut Io) {
        let Some(u) = io.uapi.as_mut() else { return };
        u.serve(|req| match req {
            uapi::Request::Get => {
                let Some(g) = self.gw.as_ref() else {
                    return String::new();
                };
                let cfg = &self.cfg;
                let key = cfg.interface.private_key.map(|k| k.0).unwrap_or([0; 32]);
                let keys: Vec<[u8; 32]> = cfg.peers.iter().map(|p| p.public_key.0).collect();
                let psks: Vec<Option<[u8; 32]>> = cfg.peers.iter().map(|p| p.preshared_key.map(|k| k.0)).collect();
                let kas: Vec<Option<u16>> = cfg.peers.iter().map(|p| p.persistent_keepalive).collect();
                uapi::render(
                    &key,
                    g.listen_port,
                    &g.peers_status(cfg, &self.dp),
                    &keys,
                    &psks,
                    &kas,
                    subway_dataplane::wg::Now::system().unix,
                ) + "errno=0\n"
            }
            uapi::Request::Set(lines) => {
                let errno = match uapi::apply_set(&self.cfg, &lines) {
                    Ok(new) => {
                        let r = live::apply(&mut self.cfg, new, self.gw.as_mut(), &mut self.dp);
                        let ok = r.is_ok();
                        self.reloads.note("wg set", &r);
                        if ok { 0 } else { libc::EINVAL }
                    }
                    Err((errno, msg)) => {
                        tracing::warn!("wg set refused: {msg}");
                        errno
                    }
                };
                format!("errno={errno}\n")
            }
        });
    }

    /// Prometheus scrapes waiting for numbers.
    fn on_metrics(&mut self, io: &mut Io) {
        if let Some(m) = io.metrics.as_mut() {
            let status = || metrics::render(&self.status_without_io());
            m.serve(status);
        }
    }

    /// Requests on the control socket (`subway show`, `reload`, `route`,
    /// `health`).
    fn on_ctl(&mut self, io: &mut Io) {
        // Clients the local sockets closed on, by reason (read before
        // serving: the server is busy answering).
        let local_refused = local_refused(io);
        io.ctl.serve(|line| {
            let answer = match Request::parse(line) {
                Ok(Request::Capture(req)) => match capture::start(&self.cfg, &self.dp, &req) {
                    Ok(session) => return Reply::Stream(Box::new(move |s| session.run(s))),
                    Err(e) => protocol::error(e),
                },
                Ok(Request::Show) => {
                    let mut st = self.status_without_io();
                    st.local_refused = local_refused.clone();
                    return Reply::json_later(st);
                }
                Ok(Request::Reload) => {
                    let r = live::reload(&mut self.cfg, self.gw.as_mut(), &mut self.dp);
                    self.reloads.note("subway reload", &r);
                    r.unwrap_or_else(|e| protocol::error(format!("{e:#}")))
                }
                Ok(Request::Route { query }) => {
                    let probes = self.probes.as_ref();
                    let answer = routes::answer(&self.cfg, &self.dp, &query, |peer| {
                        probes.and_then(|p| p.status(peer)).map(|s| (s.up, s.why))
                    });
                    match answer {
                        routes::Answer::Now(v) => v,
                        list => return Reply::json_later(list),
                    }
                }
                Ok(Request::Drain { undo }) => match self.export.as_mut() {
                    Some(e) => {
                        let before = e.status().routes;
                        e.draining = !undo;
                        if !undo {
                            e.withdraw_all();
                        }
                        tracing::info!(
                            "subway drain{}: {} route(s) withdrawn",
                            if undo { " --undo" } else { "" },
                            if undo { 0 } else { before.len() }
                        );
                        serde_json::json!({
                            "table": e.status().table,
                            "draining": e.draining,
                            "withdrawn": if undo { Vec::new() } else { before },
                        })
                    }
                    None => protocol::error("this instance exports nothing: drain needs an [Export] section"),
                },
                Ok(Request::Health {
                    handshake_within_secs,
                    stall_ms,
                }) => {
                    let peers = self.gw.as_ref().map(|g| g.peers_status(&self.cfg, &self.dp));
                    let input = health::gather(&mut self.dp, &mut self.liveness, &peers.unwrap_or_default());
                    let limits = health::Limits::new(handshake_within_secs, stall_ms);
                    // A standby box is healthy without handshakes; an
                    // active one is given the limit from when it became so.
                    let (active, since) = match &self.ha {
                        Some(h) => (h.active, h.since()),
                        None => (true, self.started),
                    };
                    let h = health::verdict(&input, &limits, active, since, Instant::now());
                    serde_json::to_value(h).unwrap_or_else(protocol::error)
                }
                Err(e) => protocol::error(e),
            };
            Reply::Text(answer.to_string())
        });
    }

    /// The instance's status, as `subway show` reports it.
    fn status(&self, io: &Io) -> Status {
        let mut st = self.status_without_io();
        st.local_refused = local_refused(io);
        st
    }

    fn status_without_io(&self) -> Status {
        let vnets = self.cfg.vnet_ids();
        let mut st = crate::status::dataplane_status(&self.dp, &vnets, &self.rates, &self.reloads);
        st.name = self.cfg.name.clone();
        st.mode = if self.gw.is_some() { "gateway" } else { "routed" }.into();
        st.uptime_secs = self.started.elapsed().as_secs();
        if let Some(g) = &self.gw {
            st.listen_port = Some(g.listen_port);
            st.source_ports = self.cfg.tuning.spread();
            st.peers = g.peers_status(&self.cfg, &self.dp);
            if let Some(pr) = &self.probes {
                for p in &mut st.peers {
                    p.probe = pr.status(p.id as u32);
                }
            }
            st.control = g.events.named().map(|(k, v)| (k.to_string(), v)).collect();
        }
        st.control_wakeups = self.rounds;
        st.ha = self.ha.as_ref().map(|h| h.status());
        st.export = self.export.as_ref().map(|e| e.status());
        st
    }
}

fn local_refused(io: &Io) -> LocalRefused {
    LocalRefused {
        control: io.ctl.refused(),
        uapi: io.uapi.as_ref().map(|u| u.refused()),
    }
}
