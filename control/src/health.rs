//! `subway health NAME`: can this box carry traffic now? keepalived's
//! `track_script` runs it, so the answer is quick and its reason one line.
//!
//! The control thread gathers the facts ([`gather`]: how long each worker
//! has stood still, the uplink and the routes to the peers' endpoints as
//! the kernel has them at this moment, the peers' latest handshakes) and
//! [`verdict`] judges them, a pure function, unit-tested below. Checks run
//! in a fixed order and the first that fails is the reason: workers (a box
//! whose worker stopped forwards nothing, whatever its uplink says), then
//! uplink (a dead uplink explains a missing handshake, not the other way
//! round), then handshake.

use crate::liveness::Liveness;
use crate::status::PeerStatus;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use subway_dataplane::Dataplane;
use subway_dataplane::netlink::LinkState;

/// How long a worker's loop may stand still when the request says nothing
/// (an idle worker turns at least every 50 ms).
pub const DEFAULT_STALL: Duration = Duration::from_millis(500);

/// The answer: `{"healthy": bool, "reason": "...", "checks": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    /// The first failing check's detail; null when healthy.
    pub reason: Option<String>,
    /// Every check, in the order they are judged.
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `workers`, `uplink` or `handshake`.
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

/// What the request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub stall: Duration,
    /// Some peer must have completed a handshake less than this many
    /// seconds ago (None: not checked).
    pub handshake_within_secs: Option<u64>,
}

impl Limits {
    pub fn new(handshake_within_secs: Option<u64>, stall_ms: Option<u64>) -> Limits {
        Limits {
            stall: stall_ms.map_or(DEFAULT_STALL, Duration::from_millis),
            handshake_within_secs,
        }
    }
}

/// The facts [`verdict`] judges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Input {
    pub workers: Vec<Worker>,
    /// The uplink, when there are peers to reach (None: routed mode or no
    /// peers yet); Err: the kernel could not be asked.
    pub uplink: Option<Result<Uplink, String>>,
    pub peers: Vec<Peer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub id: usize,
    /// How long its loop has been seen standing still.
    pub still: Duration,
    /// Its thread ended (only a crash ends it while the instance runs).
    pub dead: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    /// None: the interface is gone.
    pub link: Option<LinkState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The public key, base64.
    pub key: String,
    pub endpoint: Option<SocketAddr>,
    /// The interface (ifindex, name) the kernel's route to the endpoint
    /// leaves by; None without a route (or without an endpoint).
    pub route: Option<(u32, String)>,
    pub handshake_secs_ago: Option<u64>,
}

/// Reads the facts from the running instance: the workers' progress
/// (a look of its own, as a control round would), the uplink and the
/// routes toward `peers`' current endpoints, asked of the kernel now.
pub fn gather(dp: &mut Dataplane, liveness: &mut Liveness, peers: &[PeerStatus]) -> Input {
    let dead = dp.dead_worker();
    let workers = liveness
        .still(dp)
        .into_iter()
        .map(|(id, still)| Worker {
            id,
            still,
            dead: dead == Some(id),
        })
        .collect();
    let endpoints: Vec<Option<SocketAddr>> = peers
        .iter()
        .map(|p| p.endpoint.as_deref().and_then(|e| e.parse().ok()))
        .collect();
    let dsts: Vec<IpAddr> = endpoints.iter().flatten().map(|e| e.ip()).collect();
    let mut routes: Vec<Option<(u32, String)>> = Vec::new();
    let uplink = (!peers.is_empty()).then(|| match dp.uplink_now(&dsts) {
        Ok(Some(u)) => {
            routes = u.routes;
            Ok(Uplink {
                name: u.name,
                ifindex: u.ifindex,
                link: u.link,
            })
        }
        Ok(None) => Err("the instance has peers but no uplink".to_string()),
        Err(e) => Err(e.to_string()),
    });
    let mut routes = routes.into_iter();
    let peers = peers
        .iter()
        .zip(endpoints)
        .map(|(p, endpoint)| Peer {
            key: p.public_key.clone(),
            endpoint,
            route: endpoint.and_then(|_| routes.next().flatten()),
            handshake_secs_ago: p.latest_handshake_secs_ago,
        })
        .collect();
    Input { workers, uplink, peers }
}

/// Judges `input`. `active`: this box is the one meant to carry traffic
/// (a standby box is not expected to hold sessions), since `active_since`.
pub fn verdict(input: &Input, limits: &Limits, active: bool, active_since: Instant, now: Instant) -> Health {
    let checks = vec![
        workers(input, limits),
        uplink(input),
        handshake(input, limits, active, now.saturating_duration_since(active_since)),
    ];
    let reason = checks.iter().find(|c| !c.ok).map(|c| c.detail.clone());
    Health {
        healthy: reason.is_none(),
        reason,
        checks,
    }
}

fn check(name: &str, ok: bool, detail: String) -> Check {
    Check {
        check: name.into(),
        ok,
        detail,
    }
}

/// The first of `problems`, and how many more there are.
fn first_of(mut problems: Vec<String>) -> Option<String> {
    let more = problems.len().checked_sub(1)?;
    let mut first = problems.swap_remove(0);
    if more > 0 {
        first += &format!(" (and {more} more)");
    }
    Some(first)
}

fn workers(input: &Input, limits: &Limits) -> Check {
    let limit = limits.stall.as_millis();
    if input.workers.is_empty() {
        return check("workers", false, "no workers".into());
    }
    let problems: Vec<String> = input
        .workers
        .iter()
        .filter_map(|w| {
            if w.dead {
                Some(format!("worker {} stopped (its thread ended)", w.id))
            } else if w.still > limits.stall {
                Some(format!(
                    "worker {} made no progress for {} ms (limit {limit} ms)",
                    w.id,
                    w.still.as_millis()
                ))
            } else {
                None
            }
        })
        .collect();
    match first_of(problems) {
        Some(p) => check("workers", false, p),
        None => {
            let longest = input.workers.iter().map(|w| w.still).max().unwrap_or_default();
            check(
                "workers",
                true,
                format!(
                    "{} worker(s) turning (longest still {} ms, limit {limit} ms)",
                    input.workers.len(),
                    longest.as_millis()
                ),
            )
        }
    }
}

fn uplink(input: &Input) -> Check {
    let u = match &input.uplink {
        None => return check("uplink", true, "not checked: no peers".into()),
        Some(Err(e)) => {
            return check(
                "uplink",
                false,
                format!("could not ask the kernel about the uplink: {e}"),
            );
        }
        Some(Ok(u)) => u,
    };
    let name = &u.name;
    match &u.link {
        None => return check("uplink", false, format!("uplink {name} is gone")),
        Some(l) if !l.up => return check("uplink", false, format!("uplink {name} is down")),
        Some(l) if !l.carrier => return check("uplink", false, format!("uplink {name} has no carrier")),
        Some(_) => {}
    }
    let with_endpoint: Vec<&Peer> = input.peers.iter().filter(|p| p.endpoint.is_some()).collect();
    let problems: Vec<String> = with_endpoint
        .iter()
        .filter_map(|p| {
            let endpoint = p.endpoint?;
            let how = match &p.route {
                Some((ifindex, _)) if *ifindex == u.ifindex => return None,
                Some((_, other)) => format!("the kernel routes it via {other}"),
                None => "the kernel has no route to it".into(),
            };
            Some(format!(
                "no route to peer {} at {endpoint} through the uplink {name} ({how})",
                p.key
            ))
        })
        .collect();
    match first_of(problems) {
        Some(p) => check("uplink", false, p),
        None => check(
            "uplink",
            true,
            format!(
                "{name} is up with carrier; {} peer endpoint(s) routed through it",
                with_endpoint.len()
            ),
        ),
    }
}

fn handshake(input: &Input, limits: &Limits, active: bool, active_for: Duration) -> Check {
    let Some(limit) = limits.handshake_within_secs else {
        return check("handshake", true, "not checked: no --handshake-within".into());
    };
    if input.peers.is_empty() {
        return check("handshake", true, "not checked: no peers".into());
    }
    if !active {
        return check("handshake", true, "not checked: this box is standby".into());
    }
    let latest = input
        .peers
        .iter()
        .filter_map(|p| Some((p.handshake_secs_ago?, &p.key)))
        .min_by_key(|(ago, _)| *ago);
    // Whole seconds, rounded down: an age shown as N is under `limit`
    // exactly when the real age is.
    if let Some((ago, key)) = latest
        && ago < limit
    {
        return check(
            "handshake",
            true,
            format!("peer {key} completed a handshake {ago} s ago (limit {limit} s)"),
        );
    }
    if active_for < Duration::from_secs(limit) {
        return check(
            "handshake",
            true,
            format!(
                "no handshake within {limit} s yet, but active for only {} s: waiting for the first round trip",
                active_for.as_secs()
            ),
        );
    }
    let latest = latest.map_or("never".to_string(), |(ago, key)| format!("{ago} s ago, peer {key}"));
    check(
        "handshake",
        false,
        format!("no peer completed a handshake within the last {limit} s (latest: {latest})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn up(up: bool, carrier: bool) -> Option<LinkState> {
        Some(LinkState {
            name: "wan0".into(),
            up,
            carrier,
        })
    }

    /// A healthy gateway: two workers that turn, wan0 (ifindex 3) up,
    /// one peer routed through it, a handshake 5 s ago.
    fn good() -> Input {
        Input {
            workers: vec![
                Worker {
                    id: 0,
                    still: Duration::from_millis(20),
                    dead: false,
                },
                Worker {
                    id: 1,
                    still: Duration::ZERO,
                    dead: false,
                },
            ],
            uplink: Some(Ok(Uplink {
                name: "wan0".into(),
                ifindex: 3,
                link: up(true, true),
            })),
            peers: vec![Peer {
                key: KEY.into(),
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                route: Some((3, "wan0".into())),
                handshake_secs_ago: Some(5),
            }],
        }
    }

    fn judge(input: &Input, handshake_within_secs: Option<u64>, active: bool, active_for_secs: u64) -> Health {
        let now = Instant::now();
        let since = now.checked_sub(Duration::from_secs(active_for_secs)).unwrap();
        verdict(input, &Limits::new(handshake_within_secs, None), active, since, now)
    }

    fn reason(h: &Health) -> &str {
        h.reason.as_deref().unwrap_or("")
    }

    #[test]
    fn a_box_that_can_carry_traffic_is_healthy_and_every_check_is_listed_in_order() {
        let h = judge(&good(), Some(10), true, 3600);
        assert!(h.healthy, "{h:?}");
        assert_eq!(h.reason, None);
        let names: Vec<&str> = h.checks.iter().map(|c| c.check.as_str()).collect();
        assert_eq!(names, ["workers", "uplink", "handshake"]);
        assert!(h.checks.iter().all(|c| c.ok));
        assert_eq!(
            h.checks[0].detail,
            "2 worker(s) turning (longest still 20 ms, limit 500 ms)"
        );
        assert_eq!(
            h.checks[1].detail,
            "wan0 is up with carrier; 1 peer endpoint(s) routed through it"
        );
        assert_eq!(
            h.checks[2].detail,
            format!("peer {KEY} completed a handshake 5 s ago (limit 10 s)")
        );
        // The JSON has the documented shape.
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["healthy"], true);
        assert!(v["reason"].is_null());
        assert_eq!(v["checks"][1]["check"], "uplink");
        assert_eq!(v["checks"][1]["ok"], true);
    }

    #[test]
    fn a_stalled_or_dead_worker_is_named_against_the_stall_limit() {
        let mut i = good();
        i.workers[1].still = Duration::from_millis(812);
        let h = judge(&i, None, true, 3600);
        assert!(!h.healthy);
        assert_eq!(reason(&h), "worker 1 made no progress for 812 ms (limit 500 ms)");
        // The limit is the request's.
        let now = Instant::now();
        let lax = verdict(&i, &Limits::new(None, Some(1000)), true, now, now);
        assert!(lax.healthy, "{lax:?}");
        // At the limit is still fine; over it is not.
        i.workers[1].still = DEFAULT_STALL;
        assert!(judge(&i, None, true, 3600).healthy);
        i.workers[0].dead = true;
        assert_eq!(
            reason(&judge(&i, None, true, 3600)),
            "worker 0 stopped (its thread ended)"
        );
        i.workers[1].still = Duration::from_secs(2);
        assert_eq!(
            reason(&judge(&i, None, true, 3600)),
            "worker 0 stopped (its thread ended) (and 1 more)"
        );
        i.workers.clear();
        assert_eq!(reason(&judge(&i, None, true, 3600)), "no workers");
    }

    #[test]
    fn an_uplink_down_without_carrier_gone_or_unknown_is_named() {
        let mut i = good();
        let set = |i: &mut Input, link| {
            if let Some(Ok(u)) = i.uplink.as_mut() {
                u.link = link;
            }
        };
        set(&mut i, up(false, false));
        assert_eq!(reason(&judge(&i, None, true, 3600)), "uplink wan0 is down");
        set(&mut i, up(true, false));
        assert_eq!(reason(&judge(&i, None, true, 3600)), "uplink wan0 has no carrier");
        set(&mut i, None);
        assert_eq!(reason(&judge(&i, None, true, 3600)), "uplink wan0 is gone");
        i.uplink = Some(Err("netlink: Permission denied".into()));
        assert_eq!(
            reason(&judge(&i, None, true, 3600)),
            "could not ask the kernel about the uplink: netlink: Permission denied"
        );
    }

    #[test]
    fn a_peer_endpoint_not_routed_through_the_uplink_is_named() {
        let mut i = good();
        i.peers[0].route = None;
        assert_eq!(
            reason(&judge(&i, None, true, 3600)),
            format!(
                "no route to peer {KEY} at 192.0.2.2:51820 through the uplink wan0 (the kernel has no route to it)"
            )
        );
        i.peers[0].route = Some((2, "lan0".into()));
        assert_eq!(
            reason(&judge(&i, None, true, 3600)),
            format!(
                "no route to peer {KEY} at 192.0.2.2:51820 through the uplink wan0 (the kernel routes it via lan0)"
            )
        );
        // A peer without an endpoint (it has not called yet) is not asked about.
        i.peers[0].endpoint = None;
        let h = judge(&i, None, true, 3600);
        assert!(h.healthy, "{h:?}");
        assert_eq!(
            h.checks[1].detail,
            "wan0 is up with carrier; 0 peer endpoint(s) routed through it"
        );
    }

    #[test]
    fn the_handshake_limit_holds_after_the_grace_of_a_fresh_active_box() {
        let mut i = good();
        i.peers[0].handshake_secs_ago = Some(30);
        let stale = judge(&i, Some(10), true, 3600);
        assert!(!stale.healthy);
        assert_eq!(
            reason(&stale),
            format!("no peer completed a handshake within the last 10 s (latest: 30 s ago, peer {KEY})")
        );
        // Ages are whole seconds rounded down: 9 is within 10, 10 is not.
        i.peers[0].handshake_secs_ago = Some(9);
        assert!(judge(&i, Some(10), true, 3600).healthy);
        i.peers[0].handshake_secs_ago = Some(10);
        assert!(!judge(&i, Some(10), true, 3600).healthy);
        // Never: fine for the limit's first seconds of being active, then not.
        i.peers[0].handshake_secs_ago = None;
        let fresh = judge(&i, Some(2), true, 1);
        assert!(fresh.healthy, "{fresh:?}");
        assert!(fresh.checks[2].detail.contains("waiting for the first round trip"));
        assert_eq!(
            reason(&judge(&i, Some(2), true, 2)),
            "no peer completed a handshake within the last 2 s (latest: never)"
        );
        // The freshest of several peers counts.
        let mut other = i.peers[0].clone();
        other.key = "other".into();
        other.handshake_secs_ago = Some(1);
        i.peers.push(other);
        assert!(judge(&i, Some(2), true, 3600).healthy);
    }

    #[test]
    fn the_handshake_is_not_asked_of_a_standby_box_nor_without_a_limit_or_peers() {
        let mut i = good();
        i.peers[0].handshake_secs_ago = None;
        let standby = judge(&i, Some(10), false, 3600);
        assert!(standby.healthy, "{standby:?}");
        assert_eq!(standby.checks[2].detail, "not checked: this box is standby");
        assert_eq!(
            judge(&i, None, true, 3600).checks[2].detail,
            "not checked: no --handshake-within"
        );
        // Routed mode: no peers, no uplink to check.
        i.peers.clear();
        i.uplink = None;
        let routed = judge(&i, Some(10), true, 3600);
        assert!(routed.healthy, "{routed:?}");
        assert_eq!(routed.checks[1].detail, "not checked: no peers");
        assert_eq!(routed.checks[2].detail, "not checked: no peers");
    }

    #[test]
    fn the_reason_is_the_first_failing_check_workers_then_uplink_then_handshake() {
        let mut i = good();
        i.workers[0].still = Duration::from_secs(1);
        i.uplink = Some(Ok(Uplink {
            name: "wan0".into(),
            ifindex: 3,
            link: up(false, false),
        }));
        i.peers[0].handshake_secs_ago = None;
        let h = judge(&i, Some(10), true, 3600);
        assert_eq!(reason(&h), "worker 0 made no progress for 1000 ms (limit 500 ms)");
        // Every failure is listed all the same.
        assert_eq!(h.checks.iter().filter(|c| !c.ok).count(), 3);
        i.workers[0].still = Duration::ZERO;
        assert_eq!(reason(&judge(&i, Some(10), true, 3600)), "uplink wan0 is down");
        i.uplink = good().uplink;
        assert_eq!(
            reason(&judge(&i, Some(10), true, 3600)),
            "no peer completed a handshake within the last 10 s (latest: never)"
        );
    }
}
