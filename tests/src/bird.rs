//! [`Bird`]: BIRD 2 in a namespace with its own config, control socket
//! and pid file, ended by its pid on drop.

use crate::{Netns, Proc, unique, which, work_dir};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

pub struct Bird {
    pub proc: Proc,
    pub socket: std::path::PathBuf,
}

impl Bird {
    /// Writes `config` and runs `bird -f` in `ns`; waits for its socket.
    pub fn start(ns: &Netns, config: &str) -> Result<Bird> {
        let base = work_dir().join(unique("bird"));
        let conf = base.with_extension("conf");
        std::fs::write(&conf, config)?;
        let socket = base.with_extension("ctl");
        let pid = base.with_extension("pid");
        let bin = which("bird")?;
        let mut proc = ns.spawn(
            &[
                &bin,
                "-f",
                "-c",
                conf.to_str().unwrap(),
                "-s",
                socket.to_str().unwrap(),
                "-P",
                pid.to_str().unwrap(),
            ],
            &base.with_extension("log"),
        )?;
        let t0 = Instant::now();
        while !socket.exists() {
            if !proc.alive() || t0.elapsed() > Duration::from_secs(10) {
                bail!("bird did not start:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Bird { proc, socket })
    }

    /// `birdc show ...` and the like, against this instance.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let bin = which("birdc")?;
        let mut v = vec![bin.as_str(), "-s", self.socket.to_str().unwrap()];
        v.extend_from_slice(args);
        crate::host(&v)
    }
}
