//! `subway capture` as an operator uses it: tcpdump on lan0 or wan0
//! cannot see what AF_XDP forwards, so the workers copy it. A ping and
//! TCP through the tunnel to a stock wireguard-go far side; the files are
//! read by tcpdump itself (`-r FILE` and `-r -`), with filters honoured,
//! the plaintext on the LAN side and only WireGuard datagrams on the
//! uplink.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;
use subway_testkit::{
    Subway, TwoSites, host, ping, ping_until, require_root, tcp_echo, unique, work_dir, workspace_bin,
};

/// `subway capture NAME ARGS...` running in the background.
struct Running {
    child: std::process::Child,
    file: std::path::PathBuf,
}

fn capture(name: &str, args: &[&str]) -> Result<Running> {
    let file = work_dir().join(format!("{}.pcapng", unique("subway-cap")));
    let bin = workspace_bin("subway")?;
    let child = Command::new(bin)
        .args(["capture", name, "-w", file.to_str().unwrap()])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()?;
    // Until the instance has the tap in place (it answers first).
    std::thread::sleep(Duration::from_millis(300));
    Ok(Running { child, file })
}

impl Running {
    /// Waits for the capture to end by itself; (tcpdump's lines, stderr).
    fn finish(self) -> Result<(Vec<String>, String)> {
        let out = self.child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        anyhow::ensure!(out.status.success(), "subway capture failed: {err}");
        let text = host(&["tcpdump", "-nn", "-r", self.file.to_str().unwrap()])
            .with_context(|| format!("tcpdump could not read the capture ({err})"))?;
        let _ = std::fs::remove_file(&self.file);
        Ok((text.lines().map(String::from).collect(), err))
    }
}

fn count(lines: &[String], pat: &str) -> usize {
    lines.iter().filter(|l| l.contains(pat)).count()
}

#[test]
fn capture_shows_plaintext_on_the_lan_and_wireguard_on_the_uplink_with_filters() -> Result<()> {
    if !require_root("capture_shows_plaintext_on_the_lan_and_wireguard_on_the_uplink_with_filters") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _b = t.standard_b("wireguard-go")?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    let name = ga.name.clone();

    // 1. `icmp` on every port: the plaintext echo requests arriving on
    // lan0 and the replies leaving it; the datagrams on the uplink are
    // UDP and do not match.
    let run = capture(&name, &["--duration", "3", "icmp"])?;
    ping(&t.a, "10.2.0.2", 5)?;
    let (lines, err) = run.finish()?;
    assert_eq!(count(&lines, "10.1.0.2 > 10.2.0.2: ICMP echo request"), 5, "{lines:#?}");
    assert_eq!(count(&lines, "10.2.0.2 > 10.1.0.2: ICMP echo reply"), 5, "{lines:#?}");
    assert_eq!(lines.len(), 10, "only ICMP: {lines:#?}");
    assert!(err.contains("10 packets captured"), "{err}");
    assert!(err.contains("0 packets dropped"), "{err}");

    // 2. `port 443` while TCP runs to 443 and to 22: both directions of
    // the first, nothing of the second.
    let run = capture(&name, &["--duration", "4", "--inner", "port", "443"])?;
    for port in [443u16, 22] {
        let dst: SocketAddr = format!("10.2.0.2:{port}").parse()?;
        tcp_echo(&t.a, &t.b, dst, 200_000)?;
    }
    let (lines, _) = run.finish()?;
    assert!(
        count(&lines, "10.1.0.2.") > 20 && count(&lines, "> 10.2.0.2.443:") > 10,
        "{lines:#?}"
    );
    assert!(
        count(&lines, "10.2.0.2.443 > 10.1.0.2.") > 10,
        "replies missing: {lines:#?}"
    );
    assert_eq!(
        count(&lines, ".22:") + count(&lines, ".22 >"),
        0,
        "port 22 leaked: {lines:#?}"
    );
    assert_eq!(count(&lines, "UDP"), 0, "{lines:#?}");

    // 3. The uplink (--outer), streamed into tcpdump (`-w - | tcpdump -r -`):
    // WireGuard datagrams between the gateways, never the plaintext.
    let bin = workspace_bin("subway")?;
    let piped = std::thread::scope(|s| -> Result<String> {
        let pinger = s.spawn(|| ping(&t.a, "10.2.0.2", 60));
        let out = host(&[
            "sh",
            "-c",
            &format!(
                "{} capture {name} --outer -c 8 --duration 10 -w - | tcpdump -nn -r -",
                bin.display()
            ),
        ]);
        pinger.join().unwrap()?;
        out
    })?;
    let lines: Vec<String> = piped.lines().map(String::from).collect();
    assert_eq!(lines.len(), 8, "{piped}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("192.0.2.1.51820 > 192.0.2.2.51820") || l.contains("192.0.2.2.51820 > 192.0.2.1.51820")),
        "{piped}"
    );
    assert!(!piped.contains("10.1.0.2"), "plaintext on the uplink: {piped}");

    // 4. --peer with B's key takes its frames; with another key, refused.
    let run = capture(&name, &["--duration", "2", "--peer", &t.keys_b.1, "icmp"])?;
    ping(&t.a, "10.2.0.2", 3)?;
    let (lines, _) = run.finish()?;
    assert_eq!(lines.len(), 6, "{lines:#?}");

    // 5. Mistakes are refused with what to do, and leave no tap behind.
    let refused = |args: &[&str]| -> Result<String> {
        let mut v = vec!["capture", name.as_str(), "-w", "/dev/null"];
        v.extend_from_slice(args);
        let out = Command::new(&bin).args(&v).output()?;
        anyhow::ensure!(!out.status.success(), "{v:?} was accepted");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let e = refused(&["port", "fish"])?;
    assert!(e.contains("port fish"), "{e}");
    let e = refused(&["-i", "eth9"])?;
    assert!(
        e.contains("eth9 is not one of this instance's ports (lan0, wan0)"),
        "{e}"
    );
    let e = refused(&["--peer", &t.keys_a.1])?;
    assert!(e.contains("no peer has the public key"), "{e}");
    let e = refused(&["-i", "lan0", "--outer"])?;
    assert!(e.contains("--outer"), "{e}");
    // The instance kept forwarding and can capture again.
    let run = capture(&name, &["-c", "2", "icmp"])?;
    ping(&t.a, "10.2.0.2", 1)?;
    let (lines, _) = run.finish()?;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    Ok(())
}

#[test]
fn ctrl_c_ends_a_capture_with_a_complete_file_and_a_vanished_reader_ends_it_too() -> Result<()> {
    if !require_root("ctrl_c_ends_a_capture_with_a_complete_file_and_a_vanished_reader_ends_it_too") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    // No count, no duration: runs until interrupted.
    let run = capture(&ga.name, &["-i", "lan0"])?;
    ping(&t.a, "10.2.0.2", 2)?;
    // SAFETY: signalling a child we started, by its pid.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGINT) };
    let (lines, err) = run.finish()?;
    assert_eq!(count(&lines, "ICMP echo"), 4, "{lines:#?}");
    assert!(err.contains("packets captured"), "{err}");
    // A reader that goes away (`| head -c 1`) ends the capture: the next
    // one is accepted (one capture at a time).
    let bin = workspace_bin("subway")?;
    std::thread::scope(|s| {
        let pinger = s.spawn(|| ping(&t.a, "10.2.0.2", 60));
        let _ = host(&[
            "sh",
            "-c",
            &format!("{} capture {} -w - | head -c 1 > /dev/null", bin.display(), ga.name),
        ]);
        let _ = pinger.join();
    });
    let mut ok = false;
    for _ in 0..50 {
        let out = Command::new(&bin)
            .args(["capture", &ga.name, "--duration", "0.1", "-w", "/dev/null"])
            .output()?;
        if out.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the abandoned capture was never ended");
    assert_eq!(ga.show()?["workers"].as_array().map(|w| w.len()), Some(1));
    Ok(())
}
