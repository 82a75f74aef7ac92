//! [`Subway`]: a running `subway run` in a namespace, started from a config
//! text, asked through its control socket, stopped on drop.

use crate::{Netns, Proc, host, unique, work_dir, workspace_bin};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running `subway run` inside a namespace. Stopped on drop.
pub struct Subway {
    pub name: String,
    pub config: PathBuf,
    pub proc: Proc,
}

impl Subway {
    /// Writes `config_text` to `<unique name>.conf` and runs subway with it
    /// in `ns`, waiting until its control socket answers.
    pub fn start(ns: &Netns, config_text: &str) -> Result<Subway> {
        Self::start_bin(ns, config_text, &workspace_bin("subway")?)
    }

    /// As [`Subway::start`], with extra environment variables.
    pub fn start_env(ns: &Netns, config_text: &str, env: &[(&str, &str)]) -> Result<Subway> {
        Self::start_inner(ns, config_text, &workspace_bin("subway")?, env)
    }

    /// As [`Subway::start`], with a given binary.
    pub fn start_bin(ns: &Netns, config_text: &str, bin: &Path) -> Result<Subway> {
        Self::start_inner(ns, config_text, bin, &[])
    }

    /// As [`Subway::start`], under a given instance name (a restart after
    /// a crash uses the name of the instance that crashed).
    pub fn start_as(ns: &Netns, name: &str, config_text: &str) -> Result<Subway> {
        Self::start_named(ns, name.to_string(), config_text, &workspace_bin("subway")?, &[])
    }

    fn start_inner(ns: &Netns, config_text: &str, bin: &Path, env: &[(&str, &str)]) -> Result<Subway> {
        Self::start_named(ns, unique("gw"), config_text, bin, env)
    }

    fn start_named(ns: &Netns, name: String, config_text: &str, bin: &Path, env: &[(&str, &str)]) -> Result<Subway> {
        Self::launch(ns, name, config_text, &[bin.to_str().unwrap()], env)
    }

    /// As [`Subway::start`], under a launcher (`setpriv ... --`) and with
    /// extra environment variables.
    pub fn start_under(ns: &Netns, launcher: &[&str], config_text: &str, env: &[(&str, &str)]) -> Result<Subway> {
        let bin = workspace_bin("subway")?;
        let mut cmd: Vec<&str> = launcher.to_vec();
        cmd.push(bin.to_str().unwrap());
        Self::launch(ns, unique("gw"), config_text, &cmd, env)
    }

    fn launch(ns: &Netns, name: String, config_text: &str, cmd: &[&str], env: &[(&str, &str)]) -> Result<Subway> {
        let dir = work_dir();
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, config_text)?;
        let log = dir.join(format!("{name}.log"));
        let mut args = cmd.to_vec();
        args.extend_from_slice(&["run", "--config", config.to_str().unwrap()]);
        let mut proc = ns.spawn_env(&args, &log, env)?;
        let sock = PathBuf::from(format!("/run/subway/{name}.sock"));
        let t0 = Instant::now();
        loop {
            if !proc.alive() {
                bail!("subway exited during start-up:\n{}", proc.log_text());
            }
            if sock.exists()
                && std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && proc.log_text().contains("subway is running")
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("subway did not become ready in 30 s:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Subway { name, config, proc })
    }

    /// `subway show NAME --json`.
    pub fn show(&self) -> Result<Value> {
        let bin = workspace_bin("subway")?;
        let out = host(&[bin.to_str().unwrap(), "show", &self.name, "--json"])?;
        serde_json::from_str(&out).context("subway show --json printed invalid JSON")
    }

    /// What to print when a test fails: `show` and the log.
    pub fn diag(&self) -> String {
        format!(
            "{}: {}\n{} log:\n{}",
            self.name,
            self.show().map(|v| v.to_string()).unwrap_or_default(),
            self.name,
            self.proc.log_text()
        )
    }

    /// A total counter from `show`.
    pub fn total(&self, counter: &str) -> Result<u64> {
        self.show()?["totals"][counter]
            .as_u64()
            .ok_or_else(|| anyhow!("no counter {counter}"))
    }

    /// An XDP program counter from `show`.
    pub fn xdp(&self, counter: &str) -> Result<u64> {
        self.show()?["xdp"][counter]
            .as_u64()
            .ok_or_else(|| anyhow!("no XDP counter {counter}"))
    }

    /// SIGTERM and wait; returns the exit status and the log.
    pub fn stop(mut self) -> (Option<std::process::ExitStatus>, String) {
        self.proc.stop(Duration::from_secs(10))
    }

    /// Runs `subway ARGS...` against this instance (from the host: the
    /// control socket is in /run/subway) and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let bin = workspace_bin("subway")?;
        let mut v = vec![bin.to_str().unwrap()];
        v.extend_from_slice(args);
        host(&v)
    }
}
