//! [`Capture`]: tcpdump on an interface of a namespace, to see what went
//! over the wire.

use crate::{Netns, Proc, host, unique, which, work_dir};
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// tcpdump on an interface of a namespace, writing what matches a filter
/// to a pcap file; ended by its pid.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns` and waits until tcpdump listens.
    pub fn start(ns: &Netns, ifname: &str, filter: &str) -> Result<Capture> {
        let file = work_dir().join(format!("{}.pcap", unique("cap")));
        let log = file.with_extension("log");
        let bin = which("tcpdump")?;
        let mut proc = ns.spawn(
            &[
                &bin,
                "-Z",
                "root",
                "-i",
                ifname,
                "-nn",
                "-U",
                "-s",
                "128",
                "-w",
                file.to_str().unwrap(),
                filter,
            ],
            &log,
        )?;
        let t0 = Instant::now();
        while !proc.log_text().contains("listening on") {
            if !proc.alive() || t0.elapsed() > Duration::from_secs(10) {
                bail!("tcpdump did not start:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture { proc, file })
    }

    /// The packets captured so far, one tcpdump line each.
    pub fn packets(&self) -> Result<Vec<String>> {
        let out = host(&["tcpdump", "-nn", "-r", self.file.to_str().unwrap()])?;
        Ok(out.lines().map(String::from).collect())
    }

    /// Stops tcpdump and returns what it captured.
    pub fn finish(mut self) -> Result<Vec<String>> {
        // SIGTERM flushes the file (-U writes per packet anyway).
        self.proc.stop(Duration::from_secs(3));
        self.packets()
    }
}

/// The destination ports of the UDP datagrams to `dst` in tcpdump lines
/// (what [`Capture::packets`] returns), with how many went to each: which
/// flows a capture point saw.
pub fn udp_ports_to(lines: &[String], dst: &str) -> std::collections::BTreeMap<u16, u32> {
    ports_after(lines, &format!("> {dst}."), ':')
}

/// The source ports of the UDP datagrams from `src` in tcpdump lines, with
/// how many came from each: which ports a sender spread its datagrams over.
pub fn udp_ports_from(lines: &[String], src: &str) -> std::collections::BTreeMap<u16, u32> {
    ports_after(lines, &format!(" {src}."), ' ')
}

/// The port that follows `marker` (up to `end`) in each line, counted.
fn ports_after(lines: &[String], marker: &str, end: char) -> std::collections::BTreeMap<u16, u32> {
    let mut ports = std::collections::BTreeMap::new();
    for l in lines {
        if let Some(rest) = l.split(marker).nth(1)
            && let Some(port) = rest.split(end).next().and_then(|p| p.parse().ok())
        {
            *ports.entry(port).or_insert(0) += 1;
        }
    }
    ports
}
