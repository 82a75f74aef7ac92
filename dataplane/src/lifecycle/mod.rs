//! The running dataplane: its start ([`start`]: named steps, fail-safe
//! first), live changes (`apply`: a [`RouteDiff`] and its side effects,
//! rolled back if one fails before the switch), the housekeeping the
//! control thread drives (neighbour and route events, punted packets, the
//! uplink's addresses), `route explain` on the live XDP program, and stop.

mod spare;
pub use spare::free_elsewhere;
mod start;

use crate::config::{DataplaneConfig, RouteChanges};
use crate::error::{Error, Result};
use crate::host::{KernelUndo, kernel_routes};
use crate::netlink::{self, Neighbour, Netlink};
use crate::plan::{self, RouteDiff, allowed_ips, build_fib, check_capacity, default_vnet_routes, peer_rts, steer};
use crate::slowpath::SlowPath;
use crate::stats::WorkerStats;
use crate::tables::{self, NeighTable, Port, SharedTables, Tables};
use crate::worker::WorkerInfo;
use crate::xdp::XdpSteering;
use crate::xsk;
use crate::{failsafe, punt, trace, tunnel};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use subway_common::XdpCounter;

/// How a live change makes its tables.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// Patch the running ones when only peers changed.
    Patch,
    /// Build them anew (the kernel's routes changed: read them again).
    Anew,
}

/// The fence's part of a live change, under way ([`Dataplane::fence_start`]).
#[derive(Default)]
struct FenceStep {
    /// The fence after the change, its pieces, and nft adding what the
    /// sets lack (None: its prefixes are those of the running fence, or
    /// there are no sets). None: no route changed, or there is no fence.
    next: Option<(failsafe::Fence, failsafe::Pieces, Option<failsafe::Covering>)>,
    /// The time its plan took.
    plan: std::time::Duration,
}

/// Where a live change takes the peers' health from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Health {
    /// The running instance's (a reload: the file says nothing of it).
    Running,
    /// The change's own (route group members went up or down).
    Given,
}

/// How long a live change waits for new routers to answer ARP/NDP.
const RESOLVE_FIRST_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// A started worker as the control thread sees it.
pub struct WorkerHandle {
    pub info: WorkerInfo,
    pub xdp_mode: String,
    pub stats: Arc<WorkerStats>,
    /// (interface, socket fd), valid while the dataplane runs.
    pub sockets: Vec<(String, std::os::fd::RawFd)>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// The kernel's AF_XDP counters of each of this worker's sockets.
    pub fn xsk_stats(&self) -> Vec<(String, xsk::XskStats)> {
        if self.thread.is_none() {
            return Vec::new();
        }
        self.sockets
            .iter()
            .map(|(n, fd)| (n.clone(), xsk::XskStats::read(*fd).unwrap_or_default()))
            .collect()
    }
}

/// The control thread's work for the kernel's route changes (a change
/// costs what it touches: see `netlink::RouteNews`).
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelRouteWork {
    /// FIB rebuilds that followed a change of a route it is built from.
    pub fib_rebuilds: u64,
    /// Routes to peers' endpoints looked up in the kernel (once per
    /// endpoint, again only when a changed route covers it).
    pub endpoint_lookups: u64,
}

/// The running packet path. Dropping it stops the workers, closes the
/// sockets and detaches XDP.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    workers: Vec<WorkerHandle>,
    tables: SharedTables,
    /// What runs: the config as last started or applied (the kernel's
    /// route changes are applied against it).
    running: DataplaneConfig,
    netlink: Netlink,
    neigh_scratch: Vec<Neighbour>,
    /// The kernel's neighbour and route changes, followed as they come
    /// (None if the subscription failed: then the table is re-read).
    events: Option<netlink::RoutingEvents>,
    neigh_changes: Vec<netlink::NeighbourChange>,
    /// The kernel's answers to route lookups toward peers' endpoints,
    /// until a route or an uplink address changes.
    route_cache: std::collections::HashMap<std::net::IpAddr, Option<netlink::RouteInfo>>,
    /// Changes when what [`Dataplane::outer_path`] answers may change (a
    /// route, a neighbour, the uplink's addresses).
    paths_epoch: u64,
    /// What following the kernel's routes cost ([`Dataplane::kernel_route_work`]).
    kernel_work: KernelRouteWork,
    /// The workers' per-peer traffic bits.
    marks: tables::TrafficMarks,
    slow: Arc<SlowPath>,
    /// Where the workers find a running `subway capture`.
    capture: Arc<crate::capture::CaptureHook>,
    punt: punt::PuntServer,
    undo: KernelUndo,
    /// The spare copies a live change of peers patches, and the prefixes
    /// it must leave to a build (see [`plan::peer_patch`]).
    spare_fib: spare::Spare<crate::fib::Fib>,
    spare_allowed: spare::Spare<crate::fib::AllowedIps>,
    fixed: plan::FixedKeys,
    /// The fence's pieces for the published FIB (None: built at the next
    /// change that needs them).
    fence_pieces: Option<failsafe::Pieces>,
    /// The running config no longer says what the tables were made from
    /// (a health change failed to apply): the next change builds anew.
    rebuild: bool,
    // Dropped last: detaching XDP after the sockets close is harmless
    // (the redirect falls back to XDP_PASS).
    xdp: XdpSteering,
}

impl Dataplane {
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    pub fn slow_path_name(&self) -> &str {
        self.slow.name()
    }

    pub fn slow_path(&self) -> &SlowPath {
        &self.slow
    }

    /// Starts a capture of the workers' frames (one at a time); it runs
    /// until [`crate::capture::CaptureHook::remove`] on the returned hook.
    pub fn start_capture(
        &self,
        spec: crate::capture::CaptureSpec,
        filter: crate::capture::Filter,
    ) -> Result<(Arc<crate::capture::CaptureHook>, Arc<crate::capture::Tap>)> {
        let ports = self.tables.load().ports.len();
        let tap = Arc::new(crate::capture::Tap::new(spec, filter, self.workers.len(), ports));
        self.capture.install(tap.clone()).map_err(Error::config)?;
        Ok((self.capture.clone(), tap))
    }

    /// Whether a capture runs now.
    pub fn capturing(&self) -> bool {
        self.capture.running()
    }

    /// Publishes new tables made by `f` from the current ones. Workers see
    /// them from their next batch.
    pub fn publish(&self, f: impl FnOnce(&mut Tables)) {
        let mut next = (*self.tables.load_full()).clone();
        f(&mut next);
        self.tables.store(Arc::new(next));
    }

    /// The peers the workers carried traffic for since the last call
    /// ([`tables::TrafficMarks::drain`]).
    pub fn drain_traffic_marks(&self, f: impl FnMut(u32)) {
        self.marks.drain(f)
    }

    /// What following the kernel's routes cost so far.
    pub fn kernel_route_work(&self) -> KernelRouteWork {
        self.kernel_work
    }

    /// Changes whenever [`Dataplane::outer_path`]'s answers may have.
    pub fn paths_epoch(&self) -> u64 {
        self.paths_epoch
    }

    /// Reads the kernel's route and neighbour entry toward `dst` and, if
    /// it leaves through the uplink with a known next hop, the path.
    pub fn outer_path(&mut self, dst: std::net::SocketAddr, listen_port: u16) -> Option<tunnel::OuterPath> {
        let t = self.tables.load();
        let up = t.ports.get(t.uplink? as usize)?;
        let r = match self.route_cache.get(&dst.ip()) {
            Some(r) => (*r)?,
            None => {
                self.kernel_work.endpoint_lookups += 1;
                let r = self.netlink.route_get(dst.ip()).ok().flatten();
                self.route_cache.insert(dst.ip(), r);
                r?
            }
        };
        if r.oif != up.ifindex {
            return None;
        }
        let hop = r.gateway.unwrap_or(dst.ip());
        let mac = t.neigh.get(up.ifindex, hop)?;
        let src = std::net::SocketAddr::new(r.src?, listen_port);
        Some(tunnel::OuterPath {
            src_mac: up.mac,
            dst_mac: mac,
            src,
            dst,
        })
    }

    /// The uplink as the kernel sees it at this moment, for `subway health`:
    /// its link state (None: the interface is gone) and, for each of `dsts`,
    /// the interface the kernel's route to it leaves by (ifindex and name;
    /// None: no route). Asks afresh, unlike [`Dataplane::outer_path`]'s
    /// lookups, which are cached until a route event. None without an uplink.
    pub fn uplink_now(&mut self, dsts: &[std::net::IpAddr]) -> Result<Option<UplinkNow>> {
        let t = self.tables.load();
        let Some(up) = t.uplink.and_then(|u| t.ports.get(u as usize)) else {
            return Ok(None);
        };
        let link = self
            .netlink
            .link_state(up.ifindex)
            .map_err(|e| Error::io("reading the uplink's state", e))?;
        let mut routes = Vec::with_capacity(dsts.len());
        for dst in dsts {
            let r = self
                .netlink
                .route_get(*dst)
                .map_err(|e| Error::io(format!("looking up the route to {dst}"), e))?;
            routes.push(r.map(|r| {
                let name = if r.oif == up.ifindex {
                    up.name.clone()
                } else {
                    ifname(r.oif)
                };
                (r.oif, name)
            }));
        }
        Ok(Some(UplinkNow {
            name: up.name.clone(),
            ifindex: up.ifindex,
            link,
            routes,
        }))
    }

    /// Applies new peers and LAN subnets while traffic flows, as the
    /// [`RouteDiff`] between the running FIB and the new one plans it:
    /// nothing changes if the new FIB cannot be built; the new steering,
    /// kernel routes and fail-safe fence go in before the switch (undone if
    /// one fails); the workers switch at their next batch; what is gone is
    /// removed after. `fresh` lists peer ids that are new: their counters
    /// start at zero. The set of [Lan] interfaces cannot change here.
    pub fn apply(&mut self, cfg: DataplaneConfig, fresh: &[u32]) -> Result<RouteChanges> {
        self.apply_as(cfg, fresh, Build::Patch, Health::Running)
    }

    /// [`Dataplane::apply`], patching the running tables where the change
    /// allows ([`Build::Patch`]) or building them anew. The config is
    /// taken by value: it becomes the running one (10,000 peers are not
    /// copied on a reload).
    fn apply_as(
        &mut self,
        mut next: DataplaneConfig,
        fresh: &[u32],
        how: Build,
        health: Health,
    ) -> Result<RouteChanges> {
        let same_lans = next.lans.len() == self.running.lans.len()
            && next
                .lans
                .iter()
                .zip(&self.running.lans)
                .all(|(a, b)| a.ifname == b.ifname && a.vnet == b.vnet);
        if !same_lans {
            return Err(Error::NeedsRestart(
                "the [Lan] interfaces or their VNETs changed: that needs a restart (XDP and sockets are per interface)"
                    .into(),
            ));
        }
        // The last change's fence tidy is done first.
        self.undo.settle();
        // A peer's health is the running instance's (set_peers_up), not
        // the new config's.
        if health == Health::Running {
            let down: std::collections::HashSet<u32> =
                self.running.peers.iter().filter(|r| !r.up).map(|r| r.id).collect();
            for p in &mut next.peers {
                p.up = down.is_empty() || !down.contains(&p.id);
            }
        }
        let cfg = &next;
        let how = if self.rebuild { Build::Anew } else { how };
        let cur = self.tables.load_full();
        let t0 = std::time::Instant::now();
        // A change of peers alone is patched into the running tables (the
        // spare copies); anything else is built anew.
        let mut patch = match how {
            Build::Patch if cfg.lans == self.running.lans => {
                plan::peer_patch(&cur.fib, &cur.allowed, &self.running.peers, &cfg.peers, &self.fixed)
            }
            _ => None,
        };
        let (fib, allowed, diff, built, fence) = match &mut patch {
            Some(p) => {
                let count = |v6: bool| {
                    cur.fib
                        .routes()
                        .iter()
                        .filter(|r| r.prefix.addr().is_ipv6() == v6)
                        .count()
                };
                plan::capacity(
                    count(false) + p.added[0] - p.removed[0],
                    count(true) + p.added[1] - p.removed[1],
                )?;
                let diff = std::mem::take(&mut p.diff);
                // nft runs while the tables are patched.
                let fence = self.fence_start(&diff, &cur.fib, true);
                let fib = self.spare_fib.patched(&cur.fib, &p.fib);
                let allowed = self.spare_allowed.patched(&cur.allowed, &p.allowed);
                (fib, allowed, diff, None, fence)
            }
            None => {
                // The default VNET's configured routes go into the kernel
                // first: build_fib reads the kernel's routes and leaves
                // those to the config.
                let lan_routes = default_vnet_routes(&cfg.lans);
                self.undo.lan_routes_add(&lan_routes)?;
                let (fib, fixed) = build_fib(&mut self.netlink, &cfg.lans, &cur.ports, &cfg.peers)?;
                check_capacity(&fib)?;
                self.resolve_routers_first(&fib);
                let diff = RouteDiff::between(&cur.fib, &fib);
                let fence = self.fence_start(&diff, &fib, false);
                // Cryptokey routing changes only with the peers' AllowedIPs
                // (not with their health, endpoints or the kernel's routes).
                let same_claims = |a: &crate::config::PeerRoutes, b: &crate::config::PeerRoutes| {
                    a.id == b.id && a.vnet == b.vnet && a.allowed_ips == b.allowed_ips
                };
                let allowed = if cfg.peers.len() == self.running.peers.len()
                    && cfg
                        .peers
                        .iter()
                        .zip(&self.running.peers)
                        .all(|(a, b)| same_claims(a, b))
                {
                    cur.allowed.clone()
                } else {
                    Arc::new(allowed_ips(&cfg.peers))
                };
                // A build that changed nothing (a kernel route event that
                // is not ours to follow) keeps the running FIB, and its spare.
                let fib = if fib.same_as(&cur.fib) {
                    cur.fib.clone()
                } else {
                    Arc::new(fib)
                };
                (fib, allowed, diff, Some((lan_routes, fixed)), fence)
            }
        };
        let t_tables = t0.elapsed();
        let cur = self.tables.load_full();
        self.before_switch(&diff, &fib, &cur.fib, &cur.ports, fence)?;
        let t_kernel = t0.elapsed();
        self.undo.fail_open = cfg.fail_open;
        let peers = peer_rts(&cur.peers, &cfg.peers, fresh, &mut self.marks);
        // Rebuilt only when they changed: a route event re-applies the
        // running config, and the policies' counters and flow entries'
        // rule numbers belong to one build.
        let policies = if cfg.policies == self.running.policies {
            cur.policies.clone()
        } else {
            crate::policy::Policies::build(&cfg.policies, cfg.flows, &cur.policies)
        };
        let same_allowed = Arc::ptr_eq(&allowed, &cur.allowed);
        let same_fib = Arc::ptr_eq(&fib, &cur.fib);
        self.publish(|t| {
            t.fib = fib;
            t.allowed = allowed;
            t.peers = peers;
            t.policies = policies;
        });
        // What the workers read until now is the spare of what they read
        // next (a build leaves no spare: the next patch copies).
        match patch {
            Some(p) => {
                if !same_fib {
                    self.spare_fib.retire(cur.fib.clone(), p.fib);
                }
                if !same_allowed {
                    self.spare_allowed.retire(cur.allowed.clone(), p.allowed);
                }
            }
            None => {
                if !same_fib {
                    self.spare_fib.clear();
                }
                if !same_allowed {
                    self.spare_allowed.clear();
                }
            }
        }
        // After the switch nothing may fail the change: a failure to
        // remove what is gone is logged. The fence lets go of what is no
        // longer tunnelled off the change's time (KernelUndo::let_go),
        // after the kernel's routes.
        for (vnet, net) in &diff.unsteer {
            if let Err(e) = self.xdp.remove_route(*vnet, *net) {
                tracing::warn!("removing the steering entry of {net}: {e}");
            }
        }
        if let Err(e) = self.tun_routes(false, &diff.tun_del, true) {
            tracing::warn!("removing the kernel's routes of removed peer prefixes: {e}");
        }
        self.undo.let_go();
        let patched = built.is_none();
        if let Some((lan_routes, fixed)) = built {
            self.undo.lan_routes_prune(&lan_routes);
            self.fixed = fixed;
            if let Some(ev) = self.events.as_mut() {
                ev.set_lan_subnets(plan::default_lan_subnets(&self.tables.load().fib));
            }
        }
        self.rebuild = false;
        tracing::debug!(
            patched,
            tables_ms = t_tables.as_secs_f64() * 1e3,
            steer_and_kernel_ms = (t_kernel - t_tables).as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "applied"
        );
        let old = std::mem::replace(&mut self.running, next);
        free_elsewhere(old);
        Ok(diff.changes)
    }

    /// Make before break for the routers of non-default VNETs: a route
    /// moved to a router whose MAC is unknown would have its packets held
    /// by the control thread while it asks, and the hold is short. So the
    /// new routers are asked for first, and the switch waits for their
    /// answers, bounded by [`RESOLVE_FIRST_FOR`]. (The default VNET's
    /// slow path is the kernel, which queues while it resolves.)
    fn resolve_routers_first(&mut self, fib: &crate::fib::Fib) {
        let cur = self.tables.load_full();
        let unknown = |t: &Tables| -> Vec<(u32, std::net::IpAddr)> {
            fib.groups()
                .iter()
                .filter_map(|g| {
                    t.ports
                        .get(g.port as usize)
                        .filter(|p| p.vnet != 0)
                        .map(|p| (p.ifindex, g))
                })
                .flat_map(|(ifindex, g)| g.hops.iter().map(move |h| (ifindex, *h)))
                .filter(|(ifindex, h)| t.neigh.get(*ifindex, *h).is_none())
                .collect()
        };
        let wanted = unknown(&cur);
        if wanted.is_empty() {
            return;
        }
        for (ifindex, hop) in &wanted {
            if let Err(e) = self.netlink.resolve(*ifindex, *hop) {
                tracing::debug!("resolving the router {hop}: {e}");
            }
        }
        let deadline = std::time::Instant::now() + RESOLVE_FIRST_FOR;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
            if let Err(e) = self.refresh_neighbours() {
                tracing::debug!("re-reading the neighbours: {e}");
            }
            if unknown(&self.tables.load()).is_empty() {
                return;
            }
        }
        for (_, hop) in unknown(&self.tables.load()) {
            tracing::warn!(
                "the router {hop} did not answer ARP/NDP within {} ms: its routes are switched anyway (packets wait for it on the slow path)",
                RESOLVE_FIRST_FOR.as_millis()
            );
        }
    }

    /// Route groups: members of a group went up or down (`(peer, up)`);
    /// the FIB is rebuilt and applied like a reload, so the group's
    /// prefixes move to its healthy peers of the highest priority.
    pub fn set_peers_up(&mut self, states: &[(u32, bool)]) -> Result<RouteChanges> {
        let with_states = |mut cfg: DataplaneConfig| {
            for p in &mut cfg.peers {
                if let Some((_, up)) = states.iter().find(|s| s.0 == p.id) {
                    p.up = *up;
                }
            }
            cfg
        };
        let r = self.apply_as(with_states(self.running.clone()), &[], Build::Patch, Health::Given);
        if r.is_err() {
            // The health stands for the next change, which builds anew:
            // the running config no longer says what the tables hold.
            self.running = with_states(self.running.clone());
            self.rebuild = true;
        }
        r
    }

    /// The fail-safe fence's part of a live change, started first: the
    /// fence after the change (the default VNET's peer prefixes minus the
    /// LAN and local ones in them) and nft adding what it lacks, which runs
    /// in its own process while the change patches its tables, steers and
    /// routes ([`Dataplane::before_switch`] waits for it). The fence
    /// changes only when routes do. `fib` gives the pieces when none are
    /// kept: for a patch (`patched`, [`plan::peer_patch`]) the running FIB,
    /// the diff's prefixes then added and removed (a patch changes peers
    /// alone, never the LAN and local holes); for a build, the new FIB.
    fn fence_start(&mut self, diff: &RouteDiff, fib: &crate::fib::Fib, patched: bool) -> FenceStep {
        let t0 = std::time::Instant::now();
        let pieces = self.fence_pieces.take();
        if diff.steer.is_empty() && diff.unsteer.is_empty() {
            // No route changed: the pieces still hold.
            self.fence_pieces = pieces;
            return FenceStep::default();
        }
        let Some(cur) = &self.undo.fence else {
            return FenceStep::default();
        };
        let pieces = if patched {
            let mut p = pieces.unwrap_or_else(|| failsafe::Pieces::build(fib.routes()));
            for n in &diff.tun_del {
                p.remove(*n);
            }
            for n in &diff.tun_add {
                p.add(*n);
            }
            p
        } else {
            failsafe::Pieces::build(fib.routes())
        };
        let fence = cur.with_tunnelled(pieces.folded());
        let covering = match &mut self.undo.sets {
            Some(sets) if fence.tunnelled != cur.tunnelled => Some(sets.cover_start(&fence)),
            _ => None,
        };
        FenceStep {
            next: Some((fence, pieces, covering)),
            plan: t0.elapsed(),
        }
    }

    /// A live change's steps before the switch: the steering entries, the
    /// kernel's routes to the TUN, then the fail-safe fence's additions
    /// that [`Dataplane::fence_start`] started (one nft transaction: a new
    /// peer prefix is never routed by the kernel unfenced; what is gone
    /// leaves the fence after the switch). On a failure, what was done is
    /// undone and the error returned: nothing changed.
    fn before_switch(
        &mut self,
        diff: &RouteDiff,
        fib: &crate::fib::Fib,
        old: &crate::fib::Fib,
        ports: &[Port],
        fence: FenceStep,
    ) -> Result<()> {
        let mut done = 0;
        let mut result = Ok(());
        let t0 = std::time::Instant::now();
        for s in &diff.steer {
            if let Err(e) = self.xdp.set_route(s.key.0, s.key.1, steer(s.target, ports, fib)) {
                result = Err(e);
                break;
            }
            done += 1;
        }
        let t_steer = t0.elapsed();
        let routed = result.is_ok();
        if routed {
            result = self.tun_routes(true, &diff.tun_add, false);
        }
        let t_routes = t0.elapsed();
        // The fence's additions are waited for even if a step failed; then
        // nothing is replaced, and what they added is taken out again
        // (refused meanwhile: more, never less).
        let mut give_back = false;
        if let Some((next, pieces, covering)) = fence.next {
            // (A cover exists only with the sets and the running fence.)
            if let (Some(c), Some(sets), Some(running)) = (covering, self.undo.sets.as_mut(), self.undo.fence.as_ref())
            {
                if result.is_ok() {
                    result = sets.cover_finish(c, running);
                    if result.is_ok() {
                        self.undo.fence = Some(next);
                    }
                } else {
                    give_back = sets.cover_abandon(c);
                }
            }
            if result.is_ok() {
                self.fence_pieces = Some(pieces);
            }
        }
        if result.is_err() {
            if routed {
                let _ = self.tun_routes(false, &diff.tun_add, true);
            }
            for ((vnet, net), was) in diff.rollback(done) {
                let _ = match was {
                    Some(t) => self.xdp.set_route(vnet, net, steer(t, ports, old)),
                    None => self.xdp.remove_route(vnet, net),
                };
            }
            if give_back {
                self.undo.let_go();
            }
        }
        tracing::debug!(
            steer_ms = t_steer.as_secs_f64() * 1e3,
            routes_ms = (t_routes - t_steer).as_secs_f64() * 1e3,
            fence_plan_ms = fence.plan.as_secs_f64() * 1e3,
            fence_nft_wait_ms = (t0.elapsed() - t_routes).as_secs_f64() * 1e3,
            "before the switch"
        );
        result
    }

    /// Serves the packets of non-default VNETs that the workers handed to
    /// the control thread: those for a LAN host wait for its neighbour
    /// entry, those for a peer go to `to_peer(peer, packet)`.
    pub fn serve_punted(&mut self, to_peer: impl FnMut(u32, &[u8])) {
        self.slow.clear_punt_signal();
        let t = self.tables.load_full();
        self.punt.serve(&self.slow, &t, &mut self.netlink, to_peer);
    }

    /// How soon [`Dataplane::serve_punted`] wants to run again without
    /// anything arriving: packets held for a neighbour are retried.
    pub fn punt_deadline(&self) -> Option<std::time::Duration> {
        self.punt.holding().then_some(punt::RESOLVE_EVERY / 5)
    }

    pub fn punt_stats(&self) -> &punt::PuntStats {
        &self.punt.stats
    }

    /// Follows the uplink's addresses (DHCP or SLAAC renumbering): if they
    /// changed, the XDP program steers WireGuard to the new ones (added
    /// before the switch, old ones removed after) and the workers get them
    /// with the next tables. Returns the new addresses if they changed.
    pub fn follow_uplink_addresses(&mut self, listen_port: u16) -> Result<Option<Vec<std::net::IpAddr>>> {
        let cur = self.tables.load_full();
        let Some(up) = cur.uplink.and_then(|u| cur.ports.get(u as usize)) else {
            return Ok(None);
        };
        let now: Vec<std::net::IpAddr> = self
            .netlink
            .addresses(up.ifindex)
            .map_err(|e| Error::io(format!("addresses of {}", up.name), e))?
            .iter()
            .map(|n| n.addr())
            .collect();
        if now == cur.uplink_addrs {
            return Ok(None);
        }
        let keys = |a: &std::net::IpAddr| start::listen_keys(*a, listen_port, cur.source_ports);
        if listen_port != 0 {
            // All of the new addresses' entries or none (a full table
            // leaves nothing half-added behind; the next event retries).
            let new: Vec<_> = now
                .iter()
                .filter(|a| !cur.uplink_addrs.contains(a))
                .flat_map(keys)
                .collect();
            for (i, k) in new.iter().enumerate() {
                if let Err(e) = self.xdp.add_listen(*k) {
                    for added in &new[..i] {
                        let _ = self.xdp.remove_listen(*added);
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(uplink = %up.name, from = ?cur.uplink_addrs, to = ?now, "uplink addresses changed");
        self.forget_routes();
        let gone: Vec<std::net::IpAddr> = cur.uplink_addrs.iter().filter(|a| !now.contains(a)).copied().collect();
        self.publish(|t| t.uplink_addrs = now.clone());
        if listen_port != 0 {
            for a in &gone {
                for k in keys(a) {
                    if let Err(e) = self.xdp.remove_listen(k) {
                        tracing::warn!("unsteering the old uplink address {a}: {e}");
                    }
                }
            }
        }
        Ok(Some(now))
    }

    /// The fd that is readable when the kernel's neighbours or routes
    /// changed (see [`Dataplane::follow_kernel`]).
    pub fn kernel_events_fd(&self) -> Option<std::os::fd::RawFd> {
        self.events.as_ref().map(|e| e.fd())
    }

    /// The kernel's routes of `nets` through the TUN, added or deleted
    /// ([`kernel_routes`]), their events absorbed as they come.
    fn tun_routes(&mut self, add: bool, nets: &[ipnet::IpNet], force: bool) -> Result<()> {
        // Test hook: SUBWAY_TEST_FAIL_TUN_ROUTE=PREFIX makes a live change
        // that adds the kernel's route of PREFIX fail there, after its
        // fence additions went in, so that tests see it undone; production
        // never sets it.
        if add
            && let Ok(p) = std::env::var("SUBWAY_TEST_FAIL_TUN_ROUTE")
            && nets.iter().any(|n| n.to_string() == p)
        {
            return Err(Error::Kernel(format!(
                "ip route replace {p} dev {}: failed on purpose (SUBWAY_TEST_FAIL_TUN_ROUTE)",
                self.slow.name()
            )));
        }
        kernel_routes(
            &mut self.netlink,
            add,
            nets,
            self.slow.name(),
            force,
            self.events.as_mut(),
        )
    }

    /// Kernel changes read while subway changed its own routes, not yet
    /// followed: the control loop should not sleep before it follows them.
    pub fn kernel_events_held(&self) -> bool {
        self.events.as_ref().is_some_and(|e| e.holds())
    }

    /// Applies the kernel's neighbour changes to the workers' mirror, in
    /// one publication for all that arrived; rebuilds the FIB when a route
    /// it is built from changed, and forgets the cached routes to
    /// endpoints that a changed route covers. The whole table is re-read
    /// only when events were lost (or never subscribed). Returns whether
    /// the workers' neighbours changed.
    pub fn follow_kernel(&mut self) -> Result<bool> {
        self.neigh_changes.clear();
        let drained = match self.events.as_mut() {
            Some(ev) => ev.drain(&mut self.neigh_changes).inspect_err(|e| {
                tracing::warn!("neighbour and route events lost ({e}): re-reading the neighbour table")
            }),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        };
        match drained {
            Ok(news) => {
                if news.fib {
                    self.follow_kernel_routes();
                }
                self.forget_routes_in(&news);
            }
            Err(_) => {
                self.forget_routes();
                self.follow_kernel_routes();
                return self.refresh_neighbours();
            }
        }
        if self.neigh_changes.is_empty() {
            return Ok(false);
        }
        let cur = self.tables.load_full();
        let mut neigh = cur.neigh.clone();
        let mut changed = false;
        let uplink = cur.uplink.and_then(|u| cur.ports.get(u as usize)).map(|p| p.ifindex);
        for c in &self.neigh_changes {
            let on = match *c {
                netlink::NeighbourChange::Usable(n)
                    if cur.ports.iter().any(|p| p.ifindex == n.ifindex)
                        && neigh.get(n.ifindex, n.ip) != Some(n.mac) =>
                {
                    neigh.insert(n.ifindex, n.ip, n.mac);
                    Some(n.ifindex)
                }
                netlink::NeighbourChange::Unusable { ifindex, ip } if neigh.remove(ifindex, ip) => Some(ifindex),
                _ => None,
            };
            changed |= on.is_some();
            // The peers' outer paths use the uplink's neighbours only.
            if on.is_some() && on == uplink {
                self.paths_epoch += 1;
            }
        }
        if changed {
            self.publish(|t| t.neigh = neigh);
        }
        Ok(changed)
    }

    /// The kernel's routes (or our addresses) changed: the cached routes to
    /// the peers' endpoints are forgotten and every outer path is worked
    /// out again at the next publication.
    fn forget_routes(&mut self) {
        self.route_cache.clear();
        self.paths_epoch += 1;
    }

    /// Some of the kernel's routes changed: only the cached routes to
    /// endpoints inside them are forgotten (a route to a prefix decides
    /// only the lookups of addresses inside it), and the outer paths are
    /// worked out again only if there was one.
    fn forget_routes_in(&mut self, news: &netlink::RouteNews) {
        let before = self.route_cache.len();
        self.route_cache.retain(|ip, _| !news.touches(*ip));
        if self.route_cache.len() != before {
            self.paths_epoch += 1;
        }
    }

    /// A route changed in the kernel: the FIB is rebuilt against the
    /// running config (the default VNET's routes through LAN routers follow
    /// the kernel's) and applied like a reload, without loss.
    fn follow_kernel_routes(&mut self) {
        self.kernel_work.fib_rebuilds += 1;
        match self.apply_as(self.running.clone(), &[], Build::Anew, Health::Running) {
            Ok(ch) if ch != RouteChanges::default() => tracing::info!(
                added = ?ch.added, removed = ?ch.removed, retargeted = ?ch.retargeted,
                "followed the kernel's routes"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("the kernel's routes changed but the FIB could not follow: {e}");
                // The next change reads them again instead of patching.
                self.rebuild = true;
            }
        }
    }

    /// Re-reads the whole neighbour table (a dump) and publishes it if
    /// anything changed. Returns whether it did.
    fn refresh_neighbours(&mut self) -> Result<bool> {
        let cur = self.tables.load_full();
        let neigh = read_neighbours(&mut self.netlink, &cur.ports, &mut self.neigh_scratch)?;
        if neigh == cur.neigh {
            return Ok(false);
        }
        let mut next = (*cur).clone();
        next.neigh = neigh;
        self.tables.store(Arc::new(next));
        self.paths_epoch += 1;
        Ok(true)
    }

    /// Runs the XDP program on `frame` as if it arrived on `ifindex` (see
    /// [`XdpSteering::test_run`]): for tests of the classification.
    pub fn xdp_test_run(&self, frame: &[u8], ifindex: u32) -> Result<u32> {
        self.xdp.test_run(frame, ifindex)
    }

    /// `subway route explain` on the running instance: the XDP program
    /// runs on the probe's bytes (`BPF_PROG_TEST_RUN`: nothing is sent),
    /// then, if it steers them to a worker, the workers' decisions on the
    /// current tables ([`trace::trace`]). A probe from a peer is steered as
    /// the datagram that carries it.
    pub fn explain(
        &self,
        p: &trace::Probe,
        now: std::time::Duration,
        peer_name: &dyn Fn(u32) -> String,
    ) -> trace::Trace {
        let t = self.tables.load_full();
        let ingress = p.from.or_else(|| trace::ingress_of(&t, p.vnet, p.src));
        let (frame, port) = match ingress {
            Some(trace::Ingress::Lan(i)) => match t.ports.get(i as usize) {
                Some(port) => (trace::frame(p, port.mac), port),
                None => return trace::trace(&t, p, now, peer_name),
            },
            Some(trace::Ingress::Peer(id)) => match carrier(&t, id) {
                Some(c) => c,
                None => return trace::trace(&t, p, now, peer_name),
            },
            None => return trace::trace(&t, p, now, peer_name),
        };
        let before = self.xdp.counters().unwrap_or([0; XdpCounter::COUNT]);
        let action = self.xdp.test_run(&frame, port.ifindex);
        let after = self.xdp.counters().unwrap_or([0; XdpCounter::COUNT]);
        // The reason is the counter the run moved (with traffic flowing,
        // others move too: the one that fits the action is named).
        let moved = |prefix: &str| {
            XdpCounter::ALL
                .iter()
                .filter(|k| k.name().starts_with(prefix) && after[**k as usize] > before[**k as usize])
                .map(|k| k.name())
                .next()
                .unwrap_or("?")
        };
        let on = format!("XDP on {}", port.name);
        match action {
            Ok(4) => {
                let mut tr = trace::trace(&t, p, now, peer_name);
                tr.steps.insert(
                    0,
                    format!(
                        "{on}: redirected to the AF_XDP socket of its RX queue ({})",
                        moved("redirect_")
                    ),
                );
                tr
            }
            Ok(1) => trace::Trace {
                ingress,
                steps: vec![format!("{on}: dropped ({})", moved("drop_"))],
                outcome: trace::Outcome::XdpDrop(moved("drop_")),
            },
            Ok(_) => trace::Trace {
                ingress,
                steps: vec![format!("{on}: not steered, the kernel has it ({})", moved("pass_"))],
                outcome: trace::Outcome::XdpPass(moved("pass_")),
            },
            Err(e) => {
                let mut tr = trace::trace(&t, p, now, peer_name);
                tr.steps
                    .insert(0, format!("{on}: could not run the XDP program on the probe ({e})"));
                tr
            }
        }
    }

    /// The XDP program's counters, summed over CPUs.
    pub fn xdp_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let c = self.xdp.counters()?;
        Ok(XdpCounter::ALL.iter().map(|k| (k.name(), c[*k as usize])).collect())
    }

    /// A worker thread that has ended (it only ends when stopped, so this
    /// is a crash), if any.
    pub fn dead_worker(&self) -> Option<usize> {
        self.workers
            .iter()
            .find(|w| w.thread.as_ref().is_some_and(|t| t.is_finished()))
            .map(|w| w.info.id)
    }

    /// Stops cleanly (SIGINT, SIGTERM): as [`Dataplane::stop`], and the
    /// non-default VNETs' fence comes down too.
    pub fn stop_clean(&mut self) {
        self.undo.clean = true;
        self.stop();
    }

    /// Stops the workers and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.xdp.detach_all();
        self.undo.run();
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The uplink as the kernel sees it now ([`Dataplane::uplink_now`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkNow {
    pub name: String,
    pub ifindex: u32,
    /// None: the interface is gone.
    pub link: Option<netlink::LinkState>,
    /// Per destination asked about: the interface (ifindex, name) its
    /// route leaves by, None without a route.
    pub routes: Vec<Option<(u32, String)>>,
}

/// An interface's name, or `ifindex N` if it has none (any more).
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The datagram that carries a probe from peer `id`: from its endpoint to
/// the uplink's first address and our listen port, as a data message.
fn carrier(t: &Tables, id: u32) -> Option<(Vec<u8>, &Port)> {
    use crate::wire::{EtherType, ethernet, ipv4, ipv6, udp};
    let up = t.ports.get(t.uplink? as usize)?;
    let to = *t.uplink_addrs.first()?;
    let from = t.peers.get(id as usize)?.path.map(|p| p.dst.ip()).unwrap_or(match to {
        std::net::IpAddr::V4(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        std::net::IpAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    });
    let msg = 32 + 16;
    let l3 = if to.is_ipv6() { 40 } else { 20 };
    let mut f = vec![0u8; 14 + l3 + 8 + msg];
    let ethertype = if to.is_ipv6() { EtherType::IPV6 } else { EtherType::IPV4 };
    ethernet::emit(&mut f, up.mac, trace::PROBE_MAC, ethertype);
    match (from, to) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => ipv4::emit(&mut f[14..], s, d, 17, 64, 8 + msg),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => ipv6::emit(&mut f[14..], s, d, 17, 64, 8 + msg),
        _ => return None,
    }
    udp::emit(&mut f[14 + l3..], t.listen_port, t.listen_port, msg);
    f[14 + l3 + 8] = crate::wg::messages::TYPE_DATA;
    Some((f, up))
}

fn read_neighbours(nl: &mut Netlink, ports: &[Port], scratch: &mut Vec<Neighbour>) -> Result<NeighTable> {
    nl.neighbours(scratch)
        .map_err(|e| Error::io("dumping the neighbour table", e))?;
    let mut t = NeighTable::default();
    for n in scratch.iter().filter(|n| ports.iter().any(|p| p.ifindex == n.ifindex)) {
        t.insert(n.ifindex, n.ip, n.mac);
    }
    Ok(t)
}
