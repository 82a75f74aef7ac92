//! [`Keepalived`]: keepalived (VRRP only) in a namespace with its own
//! config and pid files, ended by its pid on drop.

use crate::{Netns, Proc, unique, which, work_dir};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

pub struct Keepalived {
    pub proc: Proc,
}

impl Keepalived {
    /// Writes `config` and runs `keepalived --vrrp` in the foreground in
    /// `ns`, logging to its console; waits until it has read the config.
    pub fn start(ns: &Netns, config: &str) -> Result<Keepalived> {
        let base = work_dir().join(unique("ka"));
        let conf = base.with_extension("conf");
        std::fs::write(&conf, config)?;
        let pid = |what: &str| base.with_extension(what).to_string_lossy().into_owned();
        let (p, v, c) = (pid("pid"), pid("vrrp.pid"), pid("checkers.pid"));
        let bin = which("keepalived")?;
        let args = [
            bin.as_str(),
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--vrrp",
            "--use-file",
            conf.to_str().unwrap(),
            "--pid",
            &p,
            "--vrrp_pid",
            &v,
            "--checkers_pid",
            &c,
        ];
        let mut proc = ns.spawn(&args, &base.with_extension("log"))?;
        let t0 = Instant::now();
        while !std::path::Path::new(&v).exists() {
            if !proc.alive() || t0.elapsed() > Duration::from_secs(10) {
                bail!("keepalived did not start:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Keepalived { proc })
    }
}
