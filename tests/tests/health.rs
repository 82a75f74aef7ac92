//! `subway health NAME`, run from the host as keepalived's track_script
//! would: exit status 0 when the box can carry traffic, else 1 and one
//! line naming the reason (a stopped worker, a dead uplink, a peer routed
//! around the uplink, no recent handshake, not running), always within
//! about a second.

use anyhow::{Context, Result, bail, ensure};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use subway_testkit::{Subway, TwoSites, ping_until, require_root, wait_until, workspace_bin};

/// What one `subway health` said.
#[derive(Debug)]
struct Said {
    code: Option<i32>,
    out: String,
    took: Duration,
}

/// Runs `subway health NAME ARGS...` on the host (the control socket is in
/// /run/subway). A run that outlives 5 s is killed (by its pid) and fails
/// the test: the command must never hang.
fn health(name: &str, args: &[&str]) -> Result<Said> {
    let bin = workspace_bin("subway")?;
    let t0 = Instant::now();
    let mut child = Command::new(&bin)
        .arg("health")
        .arg(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting subway health")?;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("subway health {name} {args:?} hung for 5 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    let out = child.wait_with_output()?;
    Ok(Said {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        took,
    })
}

/// Asserts that health said exactly `line` with exit status `code`, quickly.
fn expect(said: &Said, code: i32, line: &str) {
    assert_eq!(said.code, Some(code), "exit status of {said:?}");
    assert_eq!(said.out, format!("{line}\n"), "{said:?}");
    assert!(said.took < Duration::from_millis(1500), "took {:?}", said.took);
}

/// Waits until health says healthy (after a fault is undone).
fn until_healthy(name: &str) -> Result<()> {
    wait_until(&format!("{name} healthy again"), Duration::from_secs(5), || {
        Ok(health(name, &[])?.code == Some(0))
    })
}

#[test]
fn a_gateway_that_carries_traffic_is_healthy() -> Result<()> {
    if !require_root("a_gateway_that_carries_traffic_is_healthy") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    let said = health(&ga.name, &["--handshake-within", "10"])?;
    expect(&said, 0, &format!("{}: healthy", ga.name));
    // Every check ran and passed, the handshake one on a real handshake
    // (not on the grace of a fresh box).
    let said = health(&ga.name, &["--handshake-within", "10", "--json"])?;
    assert_eq!(said.code, Some(0), "{said:?}");
    let v: serde_json::Value = serde_json::from_str(&said.out).context("health --json")?;
    assert_eq!(v["healthy"], true, "{v:#}");
    assert!(v["reason"].is_null(), "{v:#}");
    let checks = v["checks"].as_array().context("no checks")?;
    let names: Vec<&str> = checks.iter().filter_map(|c| c["check"].as_str()).collect();
    assert_eq!(names, ["workers", "uplink", "handshake"], "{v:#}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{v:#}");
    let detail = |i: usize| checks[i]["detail"].as_str().unwrap_or("").to_string();
    assert!(detail(0).contains("1 worker(s) turning"), "{v:#}");
    assert_eq!(
        detail(1),
        "wan0 is up with carrier; 1 peer endpoint(s) routed through it"
    );
    assert!(
        detail(2).starts_with(&format!("peer {} completed a handshake", t.keys_b.1)),
        "{v:#}"
    );
    Ok(())
}

#[test]
fn a_stopped_worker_is_named_then_the_instance_is_not_running() -> Result<()> {
    if !require_root("a_stopped_worker_is_named_then_the_instance_is_not_running") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    // Worker 0 stops turning 1 s after start; the instance exits by itself
    // about 3 s later (liveness.rs).
    let mut ga = Subway::start_env(
        &t.gwa,
        &t.subway_config(true, false, ""),
        &[("SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS", "1")],
    )?;
    let name = ga.name.clone();
    let t0 = Instant::now();
    let mut named = None;
    while named.is_none() && t0.elapsed() < Duration::from_secs(8) {
        let said = health(&name, &[])?;
        if said.code != Some(0) {
            named = Some(said);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let said = named.with_context(|| format!("health never failed:\n{}", ga.proc.log_text()))?;
    // The first failure is the worker, answered by the running instance.
    assert_eq!(said.code, Some(1), "{said:?}");
    let prefix = format!("{name}: unhealthy: worker 0 made no progress for ");
    assert!(
        said.out.starts_with(&prefix) && said.out.ends_with(" ms (limit 500 ms)\n"),
        "{said:?}\n{}",
        ga.proc.log_text()
    );
    assert!(said.took < Duration::from_millis(1500), "took {:?}", said.took);
    let named_at = t0.elapsed();
    // Then the process ends on its own, and health says it is not running.
    wait_until("the wedged instance exits", Duration::from_secs(10), || {
        Ok(!ga.proc.alive())
    })?;
    eprintln!(
        "wedged worker: named {} ms after start ({}), the instance exited {} ms after start",
        named_at.as_millis(),
        said.out.trim(),
        t0.elapsed().as_millis()
    );
    let log = ga.proc.log_text();
    assert!(log.contains("worker 0 made no progress"), "{log}");
    expect(
        &health(&name, &[])?,
        1,
        &format!("{name}: not running: no control socket /run/subway/{name}.sock"),
    );
    Ok(())
}

#[test]
fn a_dead_uplink_is_named() -> Result<()> {
    if !require_root("a_dead_uplink_is_named") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let name = ga.name.clone();
    expect(&health(&name, &[])?, 0, &format!("{name}: healthy"));
    // Taken down on the box itself.
    t.gwa.run(&["ip", "link", "set", "wan0", "down"])?;
    expect(
        &health(&name, &[])?,
        1,
        &format!("{name}: unhealthy: uplink wan0 is down"),
    );
    t.gwa.run(&["ip", "link", "set", "wan0", "up"])?;
    until_healthy(&name).with_context(|| ga.proc.log_text())?;
    // The far end goes away: up, but no carrier.
    t.gwb.run(&["ip", "link", "set", "wan0", "down"])?;
    expect(
        &health(&name, &[])?,
        1,
        &format!("{name}: unhealthy: uplink wan0 has no carrier"),
    );
    t.gwb.run(&["ip", "link", "set", "wan0", "up"])?;
    until_healthy(&name).with_context(|| ga.proc.log_text())?;
    Ok(())
}

#[test]
fn a_peer_routed_around_the_uplink_is_named() -> Result<()> {
    if !require_root("a_peer_routed_around_the_uplink_is_named") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let name = ga.name.clone();
    expect(&health(&name, &[])?, 0, &format!("{name}: healthy"));
    // A more specific route sends the peer's endpoint out of the LAN.
    t.gwa.run(&["ip", "route", "add", "192.0.2.2/32", "dev", "lan0"])?;
    expect(
        &health(&name, &[])?,
        1,
        &format!(
            "{name}: unhealthy: no route to peer {} at 192.0.2.2:51820 through the uplink wan0 \
             (the kernel routes it via lan0)",
            t.keys_b.1
        ),
    );
    t.gwa.run(&["ip", "route", "del", "192.0.2.2/32", "dev", "lan0"])?;
    expect(&health(&name, &[])?, 0, &format!("{name}: healthy"));
    Ok(())
}

#[test]
fn a_missing_handshake_is_forgiven_for_the_limit_then_named() -> Result<()> {
    if !require_root("a_missing_handshake_is_forgiven_for_the_limit_then_named") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    // A alone: B never answers, so no handshake ever completes.
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let t0 = Instant::now();
    let name = ga.name.clone();
    let fresh = health(&name, &["--handshake-within", "2", "--json"])?;
    ensure!(
        t0.elapsed() < Duration::from_secs(1),
        "too slow to ask within the first second ({:?})",
        t0.elapsed()
    );
    assert_eq!(fresh.code, Some(0), "{fresh:?}");
    let v: serde_json::Value = serde_json::from_str(&fresh.out)?;
    assert_eq!(v["checks"][2]["check"], "handshake", "{v:#}");
    assert!(
        v["checks"][2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("waiting for the first round trip")),
        "{v:#}"
    );
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed()));
    expect(
        &health(&name, &["--handshake-within", "2"])?,
        1,
        &format!("{name}: unhealthy: no peer completed a handshake within the last 2 s (latest: never)"),
    );
    // Without the limit, the same box is healthy: nothing else is wrong.
    expect(&health(&name, &[])?, 0, &format!("{name}: healthy"));
    Ok(())
}

#[test]
fn a_stopped_or_killed_instance_is_not_running() -> Result<()> {
    if !require_root("a_stopped_or_killed_instance_is_not_running") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let mut ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let name = ga.name.clone();
    let sock = format!("/run/subway/{name}.sock");
    expect(&health(&name, &[])?, 0, &format!("{name}: healthy"));
    let pid = ga.proc.pid().to_string();
    // SIGSTOP (to the child we started, by its pid): the socket accepts,
    // nobody answers; health gives up after its 1 s deadline.
    t.gwa.run(&["kill", "-STOP", &pid])?;
    let said = health(&name, &[]);
    t.gwa.run(&["kill", "-CONT", &pid])?;
    let said = said?;
    assert_eq!(said.code, Some(1), "{said:?}");
    assert_eq!(
        said.out,
        format!("{name}: not running: no answer on {sock} within 1000 ms (the control thread is wedged or stopped)\n")
    );
    assert!(
        said.took >= Duration::from_millis(900) && said.took < Duration::from_millis(1500),
        "took {:?}",
        said.took
    );
    until_healthy(&name).with_context(|| ga.proc.log_text())?;
    // SIGKILL: the socket file stays behind and refuses connections.
    t.gwa.run(&["kill", "-KILL", &pid])?;
    wait_until("the killed instance is gone", Duration::from_secs(5), || {
        Ok(!ga.proc.alive())
    })?;
    expect(
        &health(&name, &[])?,
        1,
        &format!("{name}: not running: {sock} refuses connections (a stale socket: the process is gone)"),
    );
    let _ = std::fs::remove_file(&sock);
    // And a name nothing ever ran under.
    let never = format!("{name}-never");
    expect(
        &health(&never, &[])?,
        1,
        &format!("{never}: not running: no control socket /run/subway/{never}.sock"),
    );
    Ok(())
}
