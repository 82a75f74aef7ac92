//! Prometheus metrics: the running instance serves the numbers of
//! `subway show --json` as text exposition on `[Metrics] Listen` (loopback
//! unless configured otherwise). Rendered from the same JSON, so the two
//! always agree.

use serde_json::Value;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(MetricsServer { listener })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// Answers pending scrapes with `body()`.
    pub fn serve(&self, body: impl Fn() -> String) {
        while let Ok((mut s, _)) = self.listener.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n]);
            let reply = if line.starts_with("GET /metrics") || line.starts_with("GET / ") {
                let b = body();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                    b.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = s.write_all(reply.as_bytes());
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Prometheus text from `subway show --json`.
pub fn render(show: &Value) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "subway_uptime_seconds",
        "gauge",
        "Seconds since the instance started.",
    );
    let _ = writeln!(o, "subway_uptime_seconds {}", show["uptime_secs"].as_u64().unwrap_or(0));
    family(
        &mut o,
        "subway_worker_packets_total",
        "counter",
        "Per-worker counters by name (packets, bytes, drops and slow-path hand-offs by reason).",
    );
    for w in show["workers"].as_array().into_iter().flatten() {
        for (k, v) in w["counters"].as_object().into_iter().flatten() {
            let _ = writeln!(
                o,
                "subway_worker_packets_total{{worker=\"{}\",counter=\"{}\"}} {}",
                w["id"],
                label(k),
                v
            );
        }
    }
    family(
        &mut o,
        "subway_xdp_packets_total",
        "counter",
        "XDP program decisions by action and reason.",
    );
    for (k, v) in show["xdp"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "subway_xdp_packets_total{{reason=\"{}\"}} {}", label(k), v);
    }
    family(
        &mut o,
        "subway_xsk_events_total",
        "counter",
        "The kernel's AF_XDP socket counters, summed.",
    );
    for (k, v) in show["xsk"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "subway_xsk_events_total{{counter=\"{}\"}} {}", label(k), v);
    }
    family(
        &mut o,
        "subway_control_events_total",
        "counter",
        "Control-path events and refusals by name.",
    );
    for (k, v) in show["control"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "subway_control_events_total{{event=\"{}\"}} {}", label(k), v);
    }
    for (field, help) in [
        ("rx_bytes", "Bytes received from the peer (inner packets)."),
        ("tx_bytes", "Bytes sent to the peer (inner packets)."),
        ("rx_packets", "Packets received from the peer."),
        ("tx_packets", "Packets sent to the peer."),
        ("handshakes", "Handshakes completed with the peer."),
    ] {
        let name = format!("subway_peer_{field}_total");
        family(&mut o, &name, "counter", help);
        for p in show["peers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "{name}{{peer=\"{}\"}} {}",
                label(p["public_key"].as_str().unwrap_or("")),
                p[field].as_u64().unwrap_or(0)
            );
        }
    }
    family(
        &mut o,
        "subway_peer_last_handshake_age_seconds",
        "gauge",
        "Seconds since the latest handshake with the peer.",
    );
    for p in show["peers"].as_array().into_iter().flatten() {
        if let Some(age) = p["latest_handshake_secs_ago"].as_u64() {
            let _ = writeln!(
                o,
                "subway_peer_last_handshake_age_seconds{{peer=\"{}\"}} {age}",
                label(p["public_key"].as_str().unwrap_or(""))
            );
        }
    }
    family(
        &mut o,
        "subway_worker_batch_size_average",
        "gauge",
        "Frames per non-empty RX batch since start, per worker.",
    );
    for w in show["workers"].as_array().into_iter().flatten() {
        let c = &w["counters"];
        let (pkts, batches) = (
            c["rx_packets"].as_u64().unwrap_or(0),
            c["rx_batches"].as_u64().unwrap_or(0),
        );
        let avg = if batches == 0 {
            0.0
        } else {
            pkts as f64 / batches as f64
        };
        let _ = writeln!(o, "subway_worker_batch_size_average{{worker=\"{}\"}} {avg:.2}", w["id"]);
    }
    family(
        &mut o,
        "subway_reloads_total",
        "counter",
        "Live configuration changes (subway reload, SIGHUP, wg set) by result.",
    );
    for result in ["ok", "failed"] {
        let n = show["reloads"][result].as_u64().unwrap_or(0);
        let _ = writeln!(o, "subway_reloads_total{{result=\"{result}\"}} {n}");
    }
    family(
        &mut o,
        "subway_vnet_slow_path_total",
        "counter",
        "Non-default VNET packets the control thread finished or dropped, by outcome.",
    );
    for (k, v) in show["vnet_slow_path"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "subway_vnet_slow_path_total{{outcome=\"{}\"}} {}", label(k), v);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_every_counter_with_labels() {
        let show = json!({
            "uptime_secs": 7,
            "workers": [{"id": 0, "counters": {"rx_packets": 5, "drop_wg_replayed": 1}}],
            "xdp": {"redirect_route": 9},
            "xsk": {"rx_ring_full": 0},
            "control": {"wg_bad_mac1": 2},
            "peers": [{"public_key": "K=", "rx_bytes": 100, "tx_bytes": 200, "rx_packets": 1, "tx_packets": 2, "handshakes": 3, "latest_handshake_secs_ago": 4}],
        });
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
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
        assert!(t.contains("# TYPE subway_worker_packets_total counter"));
    }
}
