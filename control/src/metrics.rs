//! Prometheus metrics: the running instance serves the numbers of
//! `subway show --json` as text exposition on `[Metrics] Listen` (loopback
//! unless configured otherwise). Rendered from the same typed [`Status`],
//! so the two always agree.

use crate::status::{Counters, PeerStatus, Status};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Scrape connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection's whole life (headers, the render, the reply), at most.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for the control thread to render.
const RENDER_TIMEOUT: Duration = Duration::from_millis(500);

/// The metrics endpoint: HTTP (hyper) on a thread of its own, so that no
/// client, idle or slow, ever reaches the control thread. A scrape asks
/// the control thread for the numbers through a channel and waits at most
/// [`RENDER_TIMEOUT`]; the control thread answers between its rounds.
pub struct MetricsServer {
    requests: mpsc::Receiver<oneshot::Sender<String>>,
    /// Readable when a scrape waits: wakes the control thread's poll.
    wake: Arc<OwnedFd>,
}

/// Makes the control thread's poll return (an eventfd write; never blocks).
fn ring(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write from a live u64 to our eventfd.
    unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

type Body = http_body_util::Full<bytes::Bytes>;

fn reply(status: u16, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::from(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn scrape(
    req: hyper::Request<hyper::body::Incoming>,
    ask: mpsc::Sender<oneshot::Sender<String>>,
    wake: Arc<OwnedFd>,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    if req.method() != hyper::Method::GET || !matches!(req.uri().path(), "/metrics" | "/") {
        return Ok(reply(404, String::new()));
    }
    let (tx, rx) = oneshot::channel();
    if ask.try_send(tx).is_err() {
        return Ok(reply(503, "subway: too many scrapes waiting\n".into()));
    }
    ring(&wake);
    Ok(match tokio::time::timeout(RENDER_TIMEOUT, rx).await {
        Ok(Ok(body)) => reply(200, body),
        _ => reply(503, "subway: the control thread did not answer in time\n".into()),
    })
}

async fn accept_loop(listener: std::net::TcpListener, ask: mpsc::Sender<oneshot::Sender<String>>, wake: Arc<OwnedFd>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Over the cap the connection is closed at once.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let ask = ask.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| scrape(req, ask.clone(), wake.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

impl MetricsServer {
    /// Binds `addr` (errors are the caller's: a port in use is a config
    /// error) and starts the serving thread.
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (ask, requests) = mpsc::channel(MAX_CONNECTIONS);
        // SAFETY: eventfd(2) with valid flags; the fd is owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("subway-metrics".into())
            .spawn(move || rt.block_on(accept_loop(listener, ask, thread_wake)))?;
        Ok(MetricsServer { requests, wake })
    }

    /// Readable while scrapes wait (for the control loop's poll set).
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Answers the scrapes waiting for numbers with `body()` (called by
    /// the control thread each round; returns at once when none wait).
    pub fn serve(&mut self, body: impl Fn() -> String) {
        let mut n = 0u64;
        // SAFETY: an 8-byte read into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        while let Ok(tx) = self.requests.try_recv() {
            let _ = tx.send(body());
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Prometheus text from the instance's [`Status`].
pub fn render(show: &Status) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "subway_uptime_seconds",
        "gauge",
        "Seconds since the instance started.",
    );
    let _ = writeln!(o, "subway_uptime_seconds {}", show.uptime_secs);
    if !show.policies.is_empty() {
        for (name, help, of_rule, of_default) in [
            (
                "subway_policy_rule_packets_total",
                "Packets a [Policy] rule decided (with the packets of the flows it allowed); rule=\"default\" is the VNET's default action.",
                (|r: &crate::status::RuleStatus| r.packets) as fn(&crate::status::RuleStatus) -> u64,
                (|p: &crate::status::PolicyStatus| p.default_packets) as fn(&crate::status::PolicyStatus) -> u64,
            ),
            (
                "subway_policy_rule_bytes_total",
                "Bytes a [Policy] rule decided.",
                |r| r.bytes,
                |p| p.default_bytes,
            ),
        ] {
            family(&mut o, name, "counter", help);
            for p in &show.policies {
                let vnet = label(&p.vnet);
                for r in &p.rules {
                    let _ = writeln!(
                        o,
                        "{name}{{vnet=\"{vnet}\",rule=\"{}\"}} {}",
                        label(&r.rule),
                        of_rule(r)
                    );
                }
                let _ = writeln!(o, "{name}{{vnet=\"{vnet}\",rule=\"default\"}} {}", of_default(p));
            }
        }
    }
    if let Some(fl) = &show.flows {
        family(&mut o, "subway_flows", "gauge", "Flows in [Policy]'s flow table.");
        let _ = writeln!(o, "subway_flows {}", fl.flows);
        family(&mut o, "subway_flows_capacity", "gauge", "Slots of the flow table.");
        let _ = writeln!(o, "subway_flows_capacity {}", fl.capacity);
        family(
            &mut o,
            "subway_flows_evicted_total",
            "counter",
            "Flows pushed out of a full flow table before their timeout.",
        );
        let _ = writeln!(o, "subway_flows_evicted_total {}", fl.evicted);
    }
    if let Some(e) = &show.export {
        family(
            &mut o,
            "subway_export_routes",
            "gauge",
            "Routes in the table exported to a routing daemon (0 while drained).",
        );
        let _ = writeln!(o, "subway_export_routes {}", e.routes.len());
    }
    if let Some(r) = &show.ha {
        family(
            &mut o,
            "subway_ha_active",
            "gauge",
            "1 while this box is the active one of its HA pair, 0 while standby.",
        );
        let _ = writeln!(o, "subway_ha_active {}", (r.role == "active") as u8);
        family(
            &mut o,
            "subway_ha_role_changes_total",
            "counter",
            "Changes of HA role since start.",
        );
        let _ = writeln!(o, "subway_ha_role_changes_total {}", r.changes);
    }
    family(
        &mut o,
        "subway_worker_packets_total",
        "counter",
        "Per-worker counters by name (packets, bytes, drops and slow-path hand-offs by reason).",
    );
    for w in &show.workers {
        for (k, v) in &w.counters {
            let _ = writeln!(
                o,
                "subway_worker_packets_total{{worker=\"{}\",counter=\"{}\"}} {v}",
                w.id,
                label(k)
            );
        }
    }
    let by_label = |o: &mut String, name: &str, kind: &str, help: &str, key: &str, c: &Counters| {
        family(o, name, kind, help);
        for (k, v) in c {
            let _ = writeln!(o, "{name}{{{key}=\"{}\"}} {v}", label(k));
        }
    };
    by_label(
        &mut o,
        "subway_xdp_packets_total",
        "counter",
        "XDP program decisions by action and reason.",
        "reason",
        &show.xdp,
    );
    by_label(
        &mut o,
        "subway_xsk_events_total",
        "counter",
        "The kernel's AF_XDP socket counters, summed.",
        "counter",
        &show.xsk,
    );
    by_label(
        &mut o,
        "subway_control_events_total",
        "counter",
        "Control-path events and refusals by name.",
        "event",
        &show.control,
    );
    type Field = (&'static str, &'static str, fn(&PeerStatus) -> u64);
    let fields: [Field; 5] = [
        ("rx_bytes", "Bytes received from the peer (inner packets).", |p| {
            p.rx_bytes
        }),
        ("tx_bytes", "Bytes sent to the peer (inner packets).", |p| p.tx_bytes),
        ("rx_packets", "Packets received from the peer.", |p| p.rx_packets),
        ("tx_packets", "Packets sent to the peer.", |p| p.tx_packets),
        ("handshakes", "Handshakes completed with the peer.", |p| p.handshakes),
    ];
    for (field, help, get) in fields {
        let name = format!("subway_peer_{field}_total");
        family(&mut o, &name, "counter", help);
        for p in &show.peers {
            let _ = writeln!(o, "{name}{{peer=\"{}\"}} {}", label(&p.public_key), get(p));
        }
    }
    if show.peers.iter().any(|p| p.probe.is_some()) {
        family(
            &mut o,
            "subway_peer_up",
            "gauge",
            "Route group members: 1 while the peer answers its probes, 0 while it is down.",
        );
        for p in &show.peers {
            if let Some(pr) = &p.probe {
                let _ = writeln!(o, "subway_peer_up{{peer=\"{}\"}} {}", label(&p.public_key), pr.up as u8);
            }
        }
        family(
            &mut o,
            "subway_peer_health_changes_total",
            "counter",
            "Route group members: changes between up and down (each moves the group's prefixes).",
        );
        for p in &show.peers {
            if let Some(pr) = &p.probe {
                let _ = writeln!(
                    o,
                    "subway_peer_health_changes_total{{peer=\"{}\"}} {}",
                    label(&p.public_key),
                    pr.changes
                );
            }
        }
    }
    family(
        &mut o,
        "subway_peer_last_handshake_age_seconds",
        "gauge",
        "Seconds since the latest handshake with the peer.",
    );
    for p in &show.peers {
        if let Some(age) = p.latest_handshake_secs_ago {
            let _ = writeln!(
                o,
                "subway_peer_last_handshake_age_seconds{{peer=\"{}\"}} {age}",
                label(&p.public_key)
            );
        }
    }
    family(
        &mut o,
        "subway_worker_batch_size_average",
        "gauge",
        "Frames per non-empty RX batch since start, per worker.",
    );
    for w in &show.workers {
        let c = |k: &str| w.counters.get(k).copied().unwrap_or(0);
        let (pkts, batches) = (c("rx_packets"), c("rx_batches"));
        let avg = if batches == 0 {
            0.0
        } else {
            pkts as f64 / batches as f64
        };
        let _ = writeln!(o, "subway_worker_batch_size_average{{worker=\"{}\"}} {avg:.2}", w.id);
    }
    family(
        &mut o,
        "subway_reloads_total",
        "counter",
        "Live configuration changes (subway reload, SIGHUP, wg set) by result.",
    );
    for (result, n) in [("ok", show.reloads.ok), ("failed", show.reloads.failed)] {
        let _ = writeln!(o, "subway_reloads_total{{result=\"{result}\"}} {n}");
    }
    by_label(
        &mut o,
        "subway_vnet_slow_path_total",
        "counter",
        "Non-default VNET packets the control thread finished or dropped, by outcome.",
        "outcome",
        &show.vnet_slow_path,
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::WorkerStatus;

    #[test]
    fn renders_every_counter_with_labels() {
        let c = |kv: &[(&str, u64)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect::<Counters>();
        let show = Status {
            uptime_secs: 7,
            workers: vec![WorkerStatus {
                id: 0,
                counters: c(&[("rx_packets", 5), ("drop_wg_replayed", 1)]),
                ..Default::default()
            }],
            xdp: c(&[("redirect_route", 9)]),
            xsk: c(&[("rx_ring_full", 0)]),
            control: c(&[("wg_bad_mac1", 2)]),
            peers: vec![PeerStatus {
                public_key: "K=".into(),
                rx_bytes: 100,
                tx_bytes: 200,
                rx_packets: 1,
                tx_packets: 2,
                handshakes: 3,
                latest_handshake_secs_ago: Some(4),
                probe: Some(crate::probe::ProbeStatus {
                    up: false,
                    changes: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ha: Some(crate::ha::RoleStatus {
                role: "active".into(),
                changes: 2,
                ..Default::default()
            }),
            policies: vec![crate::status::PolicyStatus {
                vnet: "red".into(),
                rules: vec![crate::status::RuleStatus {
                    rule: "line 9: allow proto \"x\"".into(),
                    packets: 11,
                    bytes: 1100,
                }],
                default_packets: 5,
                ..Default::default()
            }],
            flows: Some(crate::status::FlowStatus {
                flows: 3,
                evicted: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = render(&show);
        for line in [
            "subway_uptime_seconds 7",
            "subway_worker_packets_total{worker=\"0\",counter=\"rx_packets\"} 5",
            "subway_worker_packets_total{worker=\"0\",counter=\"drop_wg_replayed\"} 1",
            "subway_xdp_packets_total{reason=\"redirect_route\"} 9",
            "subway_control_events_total{event=\"wg_bad_mac1\"} 2",
            "subway_peer_tx_bytes_total{peer=\"K=\"} 200",
            "subway_peer_handshakes_total{peer=\"K=\"} 3",
            "subway_peer_last_handshake_age_seconds{peer=\"K=\"} 4",
            "subway_ha_active 1",
            "subway_ha_role_changes_total 2",
            "subway_peer_up{peer=\"K=\"} 0",
            "subway_peer_health_changes_total{peer=\"K=\"} 3",
            "subway_policy_rule_packets_total{vnet=\"red\",rule=\"line 9: allow proto \\\"x\\\"\"} 11",
            "subway_policy_rule_bytes_total{vnet=\"red\",rule=\"line 9: allow proto \\\"x\\\"\"} 1100",
            "subway_policy_rule_packets_total{vnet=\"red\",rule=\"default\"} 5",
            "subway_flows 3",
            "subway_flows_evicted_total 1",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
        assert!(t.contains("# TYPE subway_worker_packets_total counter"));
    }
}
