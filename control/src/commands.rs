//! The commands a user runs against an instance or a config file, besides
//! `subway run` (daemon.rs): check, fence, down, show, reload, route,
//! health.
//! Each is a client of the control socket (ctl.rs, protocol.rs) or of the
//! kernel's fail-safe state, never of a running instance's memory.

use crate::health::Health;
use crate::protocol::{Request, RouteQuery};
use crate::status::Status;
use crate::{ctl, local};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn check(path: &Path) -> Result<()> {
    let cfg = crate::load(path)?;
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

pub fn fence(path: &Path) -> Result<()> {
    let cfg = crate::load(path)?;
    let mut dcfg = crate::dataplane_config(&cfg);
    dcfg.listen_port = cfg.interface.listen_port.unwrap_or(0);
    let f = subway_dataplane::fence_for_config(&dcfg)?;
    subway_dataplane::failsafe::install(&f)?;
    println!("{}: installed: {}", cfg.name, f.summary());
    Ok(())
}

pub fn down(name: &str) -> Result<()> {
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

pub fn route(name: Option<String>, q: RouteQuery, as_json: bool) -> Result<()> {
    let name = instance_name(name)?;
    let v = ctl::ask(&name, &Request::Route { query: q.clone() })?;
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
                "{} in VNET {}, from {}:",
                v["packet"].as_str().unwrap_or("?"),
                v["vnet"].as_str().unwrap_or("?"),
                v["from"].as_str().unwrap_or("nowhere")
            );
            for (i, step) in v["steps"].as_array().into_iter().flatten().enumerate() {
                println!("  {}. {}", i + 1, step.as_str().unwrap_or("?"));
            }
            match v["counter"].as_str() {
                Some(c) => println!("  => {} (counted as {c})", v["verdict"].as_str().unwrap_or("?")),
                None => println!("  => {}", v["verdict"].as_str().unwrap_or("?")),
            }
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

pub fn reload(name: Option<String>) -> Result<()> {
    let name = instance_name(name)?;
    let v = ctl::ask(&name, &Request::Reload)?;
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
        ("policies_changed", "[Policy] changed in VNET"),
    ] {
        println!("  {what}: {}", list(k));
    }
    Ok(())
}

pub fn doctor(config: Option<&Path>, as_json: bool) -> Result<()> {
    use crate::doctor::{Facts, Level, advise, plan};
    let ifaces: Vec<(String, String)> = match config {
        Some(path) => {
            let cfg = crate::load(path)?;
            let mut v: Vec<(String, String)> = cfg
                .lans
                .iter()
                .map(|l| (l.interface.clone(), "lan".to_string()))
                .collect();
            if let Some((u, _)) = &cfg.interface.uplink {
                match v.iter_mut().find(|(n, _)| n == u) {
                    Some(x) => x.1 = "uplink+lan".into(),
                    None => v.push((u.clone(), "uplink".into())),
                }
            }
            v
        }
        None => {
            let mut v: Vec<(String, String)> = std::fs::read_dir("/sys/class/net")?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .map(|n| (n, String::new()))
                .collect();
            v.sort();
            v
        }
    };
    let facts = Facts::read(&ifaces);
    let findings = advise(&facts);
    let p = plan(&facts);
    let errors = findings.iter().any(|x| x.level == Level::Error);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"findings": findings, "plan": p, "facts": facts}))?
        );
    } else {
        for x in &findings {
            let tag = match x.level {
                Level::Error => "ERROR",
                Level::Warning => "WARN ",
                Level::Info => "INFO ",
            };
            println!(
                "{tag} {}
      fix: {}",
                x.what, x.fix
            );
        }
        if findings.is_empty() {
            println!("no findings");
        }
        println!(
            "
proposed tuning ({} cores):",
            facts.cores
        );
        for w in &p.why {
            println!("  - {w}");
        }
        print!("{}", p.tuning());
    }
    if errors {
        bail!("errors found (above)");
    }
    Ok(())
}

pub fn drain(name: Option<String>, undo: bool) -> Result<()> {
    let name = instance_name(name)?;
    let v = ctl::ask(&name, &Request::Drain { undo })?;
    let routes: Vec<&str> = v["withdrawn"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
        .collect();
    if undo {
        println!("{name}: exporting again (table {})", v["table"]);
    } else {
        println!(
            "{name}: drained: {} route(s) withdrawn from table {} ({}); still forwarding",
            routes.len(),
            v["table"],
            if routes.is_empty() {
                "none".to_string()
            } else {
                routes.join(", ")
            }
        );
    }
    Ok(())
}

/// `subway show --watch`: the text status once a second, led by each
/// peer's rates since the previous second (the workers' rates are in
/// the status itself).
pub fn watch(name: Option<String>) -> Result<()> {
    let name = instance_name(name)?;
    let mut prev: Option<(Status, std::time::Instant)> = None;
    loop {
        let v = ctl::ask(&name, &Request::Show)?;
        let st: Status = serde_json::from_value(v).context("the instance's status is not what this subway reads")?;
        let now = std::time::Instant::now();
        let mut out = String::from("\x1b[H\x1b[2J");
        if let Some((p, at)) = &prev {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            out += &format!("{name}: per peer, last {secs:.1} s\n");
            for peer in &st.peers {
                let Some(old) = p.peers.iter().find(|o| o.public_key == peer.public_key) else {
                    continue;
                };
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                out += &format!(
                    "  {}  rx {:.0} pps {:.1} Mbit/s  tx {:.0} pps {:.1} Mbit/s\n",
                    peer.public_key,
                    rate(peer.rx_packets, old.rx_packets),
                    rate(peer.rx_bytes, old.rx_bytes) * 8.0 / 1e6,
                    rate(peer.tx_packets, old.tx_packets),
                    rate(peer.tx_bytes, old.tx_bytes) * 8.0 / 1e6,
                );
            }
        }
        out += &st.to_string();
        print!("{out}");
        use std::io::Write;
        std::io::stdout().flush()?;
        prev = Some((st, now));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

pub fn show(name: Option<String>, as_json: bool) -> Result<()> {
    let name = instance_name(name)?;
    let v = ctl::ask(&name, &Request::Show)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let st: Status = serde_json::from_value(v).context("the instance's status is not what this subway reads")?;
    print!("{st}");
    Ok(())
}

/// How long `subway health` waits for the instance, all told: keepalived
/// runs it every few seconds, and a control thread that cannot answer
/// within a second is wedged.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// `subway health NAME`: prints one line (or the JSON) and returns whether
/// the instance can carry traffic; the exit status follows it.
pub fn health(name: &str, handshake_within_secs: Option<u64>, stall_ms: Option<u64>, as_json: bool) -> bool {
    let req = Request::Health {
        handshake_within_secs,
        stall_ms,
    };
    let failed = |reason: String| Health {
        healthy: false,
        reason: Some(reason),
        checks: Vec::new(),
    };
    let (h, not_running) = match ctl::request_within(name, &req, HEALTH_TIMEOUT) {
        Err(e) => match not_running(name, &e) {
            Some(why) => (failed(format!("not running: {why}")), Some(why)),
            None => (failed(format!("cannot ask the instance: {e}")), None),
        },
        Ok(reply) if reply.trim().is_empty() => (
            failed("the instance closed the connection without answering".into()),
            None,
        ),
        Ok(reply) => {
            let h = match serde_json::from_str::<Value>(&reply) {
                Ok(v) if v.get("error").is_some() => failed(format!(
                    "the instance cannot answer: {}",
                    v["error"].as_str().unwrap_or("error")
                )),
                Ok(v) => serde_json::from_value(v)
                    .unwrap_or_else(|e| failed(format!("the instance's answer is not what this subway reads ({e})"))),
                Err(e) => failed(format!("the instance sent invalid JSON ({e})")),
            };
            (h, None)
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
    } else if let Some(why) = not_running {
        println!("{name}: not running: {why}");
    } else if h.healthy {
        println!("{name}: healthy");
    } else {
        println!("{name}: unhealthy: {}", h.reason.as_deref().unwrap_or("?"));
    }
    h.healthy
}

/// Why instance `name` is not running, if `e` (from its control socket)
/// says so: no socket, a stale one, or no answer in time.
fn not_running(name: &str, e: &std::io::Error) -> Option<String> {
    let path = ctl::socket_path(name);
    let path = path.display();
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => Some(format!("no control socket {path}")),
        ConnectionRefused => Some(format!(
            "{path} refuses connections (a stale socket: the process is gone)"
        )),
        TimedOut | WouldBlock => Some(format!(
            "no answer on {path} within {} ms (the control thread is wedged or stopped)",
            HEALTH_TIMEOUT.as_millis()
        )),
        _ => None,
    }
}
