//! What the scenarios share to set up and drive a measurement: the
//! generator (subway-pktgen in a namespace) and the wire counter that
//! serves as the sink, and gateways of each kind at the two sites of a
//! `TwoSites` topology, pinned like subway's workers.

use super::Params;
use crate::cpu::CpuTimes;
use crate::frames::Size;
use crate::report::Row;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::time::Duration;
use subway_testkit::{Netns, Subway, TwoSites, profile_bin};

/// Destination used by the generator. The gateway resolves it to a MAC
/// that is not b's: b's veth counts every frame (rx_packets, our sink
/// counter) and its kernel drops it at once as "other host", so the sink
/// costs next to nothing on the forwarder's core.
pub(super) const SINK_IP: &str = "10.2.0.99";
pub(super) const SINK_MAC: &str = "02:00:00:00:00:99";

/// Points `ns`'s neighbour entry for `ip` on `dev` at [`SINK_MAC`], a MAC
/// nobody has: the frames still cross the wire, where they are counted,
/// and the receiving kernel drops them unread (nothing answers them).
pub(super) fn neigh_to_sink(ns: &Netns, ip: &str, dev: &str) -> Result<()> {
    ns.run(&[
        "ip",
        "neigh",
        "replace",
        ip,
        "lladdr",
        SINK_MAC,
        "dev",
        dev,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// Where the generator runs and what it sends.
pub(super) struct Gen<'a> {
    pub(super) ns: &'a Netns,
    pub(super) iface: &'a str,
    pub(super) dst_mac: String,
    pub(super) src_ip: &'a str,
    pub(super) dst_ip: &'a str,
    /// Extra pktgen arguments (the decrypt direction's WireGuard peer).
    pub(super) extra: Vec<String>,
}

impl<'a> Gen<'a> {
    /// Plain UDP from a LAN host (its eth0, from 10.1.0.2 to SINK_IP).
    pub(super) fn plain(ns: &'a Netns, gw_mac: &str) -> Gen<'a> {
        Gen {
            ns,
            iface: "eth0",
            dst_mac: gw_mac.to_string(),
            src_ip: "10.1.0.2",
            dst_ip: SINK_IP,
            extra: Vec::new(),
        }
    }
}

/// subway-pktgen's command line for this generator, size and parameters.
pub(super) fn pktgen_args(g: &Gen, size: &Size, p: &Params) -> Result<Vec<String>> {
    let pktgen = profile_bin("subway-pktgen", &p.profile)?;
    let mut args: Vec<String> = [
        pktgen.to_str().unwrap(),
        "--iface",
        g.iface,
        "--dst-mac",
        &g.dst_mac,
        "--src-ip",
        g.src_ip,
        "--dst-ip",
        g.dst_ip,
        "--size",
        &size.label(),
        "--duration",
        &p.duration.to_string(),
        "--count",
        &p.count.to_string(),
        "--rate",
        &p.rate.to_string(),
        "--core",
        &p.gen_core.to_string(),
        "--flows",
        &p.flows.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(g.extra.iter().cloned());
    Ok(args)
}

/// Runs the generator and counts what reaches the `sink` interface. CPU
/// time is counted from the moment the generator starts sending.
pub(super) fn offer(g: &Gen, sink: (&Netns, &str), contender: &str, size: &Size, p: &Params) -> Result<Row> {
    use std::io::{BufRead, Read};
    let before = sink.0.if_stat(sink.1, "rx_packets")?;
    let mut args: Vec<String> = vec!["netns".into(), "exec".into(), g.ns.name.clone()];
    args.extend(pktgen_args(g, size, p)?);
    let child = std::process::Command::new("ip")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting subway-pktgen")?;
    // Reaped on every path (an early return would leave it running).
    let mut child = Reap(child);
    let mut err = std::io::BufReader::new(child.0.stderr.take().context("no stderr")?);
    let mut line = String::new();
    let mut log = String::new();
    // CPU time counts from "sending" to "sent": not the sealing before,
    // nor the draining and teardown after.
    let mut window = (None, None);
    while err.read_line(&mut line)? > 0 {
        log += &line;
        match line.trim() {
            "sending" => window.0 = Some(CpuTimes::now()),
            "sent" => {
                window.1 = Some(CpuTimes::now());
                break;
            }
            _ => {}
        }
        line.clear();
    }
    let mut out = String::new();
    child.0.stdout.take().context("no stdout")?.read_to_string(&mut out)?;
    err.read_to_string(&mut log)?;
    let status = child.0.wait()?;
    if !status.success() {
        bail!("subway-pktgen failed ({status}):\n{log}");
    }
    let (Some(cpu0), Some(cpu1)) = window else {
        bail!("subway-pktgen did not report its send window:\n{log}");
    };
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.0.if_stat(sink.1, "rx_packets")? - before;
    let g: Value = serde_json::from_str(out.trim()).with_context(|| format!("pktgen printed {out}"))?;
    let row = Row {
        contender: contender.to_string(),
        size: size.label(),
        sent: g["sent"].as_u64().unwrap_or(0),
        delivered,
        seconds: g["seconds"].as_f64().unwrap_or(p.duration),
        mean_wire_bytes: size.mean_wire_bytes(),
        cpu_busy: cpu1.busy_since(&cpu0),
        cpu_busy_ns: cpu1.busy_ns_since(&cpu0),
    };
    eprintln!(
        "  {contender:>8} {:>5}: offered {:.3} Mpps, delivered {:.3} Mpps ({:.1}% loss)",
        row.size,
        row.sent as f64 / row.seconds / 1e6,
        row.mpps(),
        row.loss_pct()
    );
    Ok(row)
}

/// A child process killed and reaped when dropped, so that no error path
/// leaves it running.
pub(super) struct Reap(pub(super) std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One gateway contender at site A (the one measured) with the same kind at
/// site B (for the handshake). Returns the guards to keep alive.
pub(super) enum Gw {
    Subway(Subway),
    Standard(subway_testkit::WgPeer),
}

pub(super) fn start_gw(t: &TwoSites, impl_: &str, for_a: bool, p: &Params) -> Result<Gw> {
    Ok(match base_impl(impl_) {
        "subway" => {
            // Site A's worker on the forwarder core, site B's on the other.
            let core = if for_a { p.fwd_core } else { p.gen_core };
            let mut cfg = t.subway_config(for_a, false, "")
                + &format!("\n[Tuning]\nCores = {core}\n{}\n", p.tuning.replace(';', "\n"));
            if for_a {
                cfg += &variant_config(impl_)?;
            }
            Gw::Subway(Subway::start_bin(
                if for_a { &t.gwa } else { &t.gwb },
                &cfg,
                &profile_bin("subway", &p.profile)?,
            )?)
        }
        other => Gw::Standard(t.standard(other, for_a)?),
    })
}

/// Gateways of kind `c` at both sites, each on one core (as subway's
/// workers are pinned), with the tunnel up.
pub(super) fn two_gateways(t: &TwoSites, c: &str, p: &Params) -> Result<(Gw, Gw)> {
    let ga = start_gw(t, c, true, p)?;
    let gb = start_gw(t, c, false, p)?;
    pin_standard(&ga, p.fwd_core);
    pin_standard(&gb, p.gen_core);
    subway_testkit::ping_until(&t.a, "10.2.0.2", 20).with_context(|| format!("{c}: the tunnel did not come up"))?;
    Ok((ga, gb))
}

/// Pins every thread of a userspace WireGuard to the forwarder core.
pub(super) fn pin_standard(gw: &Gw, core: usize) {
    if let Gw::Standard(w) = gw {
        for pid in std::iter::once(w.proc.pid()).chain(child_pids(w.proc.pid())) {
            let _ = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
                .output();
        }
    }
}

/// Direct children of `pid` (the program behind `ip netns exec`).
fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// The implementation behind a contender: `subway+capture-all` is subway.
pub(super) fn base_impl(contender: &str) -> &str {
    contender.split('+').next().unwrap_or(contender)
}

/// A contender's variants: `subway+policy-1000+flows-100k` has two.
fn variants(contender: &str) -> impl Iterator<Item = &str> {
    contender.split('+').skip(1)
}

/// Rules for `+policy-N`: two for ping (the rig checks the tunnel with
/// it), N-4 that match none of the generator's packets (different hosts,
/// TCP, ports), then the two that allow its traffic, each direction;
/// default deny. The classifier's cost does not depend on
/// where the matching rule is; a linear scan's would (this is its worst
/// case).
fn policy_rules(n: usize) -> String {
    let mut s = String::from("\n[Policy]\nDefault = deny\nRule = allow proto icmp\nRule = allow proto icmpv6\n");
    for i in 0..n.saturating_sub(4) {
        s += &format!(
            "Rule = deny from 172.16.{}.{}/32 to 192.168.{}.0/24 proto tcp port {}\n",
            (i / 250) % 250,
            i % 250 + 1,
            i % 200,
            1000 + i
        );
    }
    s += "Rule = allow in lan0 from 10.1.0.0/24 to 10.2.0.0/16 proto udp\n";
    s += "Rule = allow from 10.2.0.0/16 to 10.1.0.0/24 proto udp\n";
    s
}

/// Config lines a contender's variants add to the measured gateway's.
pub(super) fn variant_config(contender: &str) -> Result<String> {
    let mut out = String::new();
    for v in variants(contender) {
        if let Some(n) = v.strip_prefix("policy-") {
            out += &policy_rules(n.parse().with_context(|| format!("+{v}: policy-N with a number"))?);
        } else if !matches!(v, "capture-all" | "capture-none" | "flows-100k") {
            bail!("contender variant +{v}: use +capture-all, +capture-none, +policy-N or +flows-100k");
        }
    }
    Ok(out)
}

/// The generator's flows for a contender: `+flows-100k` sends 100,000
/// flows (1000 source ports x 100 destination ports), round-robin.
pub(super) fn variant_flows(contender: &str, p: &Params) -> (Params, Vec<String>) {
    if variants(contender).any(|v| v == "flows-100k") {
        let p = Params {
            flows: 1000,
            ..p.clone()
        };
        (p, vec!["--dst-ports".into(), "100".into()])
    } else {
        (p.clone(), Vec::new())
    }
}

/// `subway capture` running against a measured gateway (the contenders
/// `subway+capture-all`, every frame, and `subway+capture-none`, a filter
/// nothing matches), written to /dev/null; SIGINT and reaped at the end.
pub(super) struct CaptureRun {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl CaptureRun {
    /// Starts the capture a contender asks for, if any.
    pub(super) fn start(gw: &Gw, contender: &str, p: &Params) -> Result<Option<CaptureRun>> {
        let filter = if variants(contender).any(|v| v == "capture-all") {
            ""
        } else if variants(contender).any(|v| v == "capture-none") {
            "host 203.0.113.9"
        } else {
            return Ok(None);
        };
        let Gw::Subway(s) = gw else {
            bail!("{contender}: only subway has `subway capture`")
        };
        let log = subway_testkit::work_dir().join(format!("{}.log", subway_testkit::unique("bench-capture")));
        let child = std::process::Command::new(profile_bin("subway", &p.profile)?)
            .args(["capture", &s.name, "-w", "/dev/null", filter])
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let t0 = std::time::Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("Ctrl-C") {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("subway capture did not start: {}", std::fs::read_to_string(&log)?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(CaptureRun {
            child: Some(child),
            log,
        }))
    }

    /// Ends the capture (as Ctrl-C does) and returns its summary.
    pub(super) fn finish(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let t0 = std::time::Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().skip(1).collect::<Vec<_>>().join("; ")
    }
}

impl Drop for CaptureRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
