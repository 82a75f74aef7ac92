//! [`Proc`]: a background process started in a namespace, ended by its pid
//! on drop.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// A background process, ended by its pid on drop.
pub struct Proc {
    pub(crate) child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status
    /// (None if it had to be killed) and the log.
    pub fn stop(&mut self, grace: Duration) -> (Option<std::process::ExitStatus>, String) {
        let mut status = None;
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child we started, by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) if t0.elapsed() < grace => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        (status, std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
