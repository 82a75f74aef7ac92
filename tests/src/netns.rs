//! Network namespaces: [`Netns`] (commands and processes inside, deleted
//! on drop), the veth pairs that join them, and threads that run inside
//! one.

use crate::env::check;
use crate::{Proc, host, unique};
use anyhow::{Context, Result, anyhow, bail};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `sw<pid>x<n><role>` with loopback up.
    pub fn new(role: &str) -> Result<Netns> {
        let name = format!("{}{role}", unique("sw"));
        host(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs a command inside; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cmd(args)
            .output()
            .with_context(|| format!("running {} in {}", args[0], self.name))?;
        check(out, &format!("[{}] {}", self.name, args.join(" ")))
    }

    /// Runs a shell snippet inside.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Waits (up to 5 s) until no IPv6 address inside is tentative, and
    /// says whether that came: links' link-local addresses finish
    /// duplicate address detection a second or two after the links come
    /// up, and a new LAN address rightly makes subway rebuild its FIB.
    /// A test or benchmark that counts subway's work settles first.
    pub fn settle_dad(&self) -> bool {
        for _ in 0..100 {
            if self
                .run(&["ip", "-6", "addr", "show", "tentative"])
                .is_ok_and(|o| o.trim().is_empty())
            {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// Runs a command inside and returns its raw output, success or not.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.cmd(args)
            .output()
            .with_context(|| format!("running {} in {}", args[0], self.name))
    }

    /// Starts a background process inside, ended (by its pid) on drop.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<Proc> {
        self.spawn_env(args, log, &[])
    }

    /// As [`Netns::spawn`], with extra environment variables.
    pub fn spawn_env(&self, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Result<Proc> {
        let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = self
            .cmd(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {} in {}", args[0], self.name))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Sets a sysctl inside.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// Counter `stat` (rx_packets, tx_bytes, ...) of interface `ifname`.
    pub fn if_stat(&self, ifname: &str, stat: &str) -> Result<u64> {
        let s = self.run(&["cat", &format!("/sys/class/net/{ifname}/statistics/{stat}")])?;
        s.trim().parse().context("parsing an interface counter")
    }

    /// Runs `f` on a thread that has joined this namespace (sockets made
    /// there live in it).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a thread of our own with a valid netns fd;
                // it affects only this thread, which ends with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Joins `a:a_if` and `b:b_if` with a veth pair created directly in the
/// two namespaces, both ends up. Transmit checksum offload is turned off
/// on both ends: a veth otherwise hands on partial checksums that a
/// userspace forwarder copies as they are (see environment.md).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    veth_queues(a, a_if, b, b_if, 1)
}

/// [`veth`] with `queues` RX and TX queues on each end (a multi-queue NIC
/// as veth can play one: a frame arrives on the queue it was sent from).
pub fn veth_queues(a: &Netns, a_if: &str, b: &Netns, b_if: &str, queues: u32) -> Result<()> {
    let q = queues.max(1).to_string();
    host(&[
        "ip",
        "link",
        "add",
        a_if,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "netns",
        &a.name,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "netns",
        &b.name,
    ])?;
    for (ns, i) in [(a, a_if), (b, b_if)] {
        ns.run(&["ip", "link", "set", i, "up"])?;
        ns.run(&["ethtool", "-K", i, "tx", "off"])?;
    }
    Ok(())
}

/// Is any XDP program attached to `ifname` in `ns`?
pub fn xdp_attached(ns: &Netns, ifname: &str) -> Result<bool> {
    let s = ns.run(&["ip", "-d", "link", "show", "dev", ifname])?;
    Ok(s.contains("prog/xdp") || s.contains(" xdp"))
}

/// Runs `f` on a new thread that has joined namespace `name` (sockets made
/// there live in it); unlike [`Netns::enter`], not bound to a scope.
pub(crate) fn in_netns<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        let path = format!("/var/run/netns/{name}");
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a thread of our own with a valid netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {name}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}
