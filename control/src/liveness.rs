//! Liveness: systemd learns that the instance is ready, that it stops, and
//! (with `WatchdogSec=`) that it is alive, through sd_notify. The watchdog
//! is fed only from the control thread's loop and only while every worker
//! turns its loop, so a wedged control thread or worker gets the process
//! restarted. A worker that stops turning for [`WORKER_STALL_LIMIT`] makes
//! the instance exit on its own too (with or without systemd): its RX queue
//! would otherwise be redirected into a socket nobody reads, a silent black
//! hole; after the exit XDP is gone and the fail-safe table holds.
//! `subway health` reads the same clocks ([`Liveness::still`]) against a
//! shorter limit of its own.

use std::time::{Duration, Instant};
use subway_dataplane::Dataplane;

/// How long a worker may go without turning its loop (it turns at least
/// every 50 ms when idle).
pub const WORKER_STALL_LIMIT: Duration = Duration::from_secs(3);

pub struct Liveness {
    /// Each worker's last heartbeat and when it last moved.
    workers: Vec<(u64, Instant)>,
    /// Half the watchdog interval systemd asked for, if it asked.
    feed_every: Option<Duration>,
    last_feed: Option<Instant>,
}

impl Liveness {
    /// Reads the watchdog interval from the environment systemd set.
    pub fn new(dp: &Dataplane) -> Liveness {
        let now = Instant::now();
        let feed_every = sd_notify::watchdog_enabled().map(|d| d / 2);
        if let Some(d) = feed_every {
            tracing::info!(
                "systemd watchdog: fed every {} ms while every worker turns",
                d.as_millis()
            );
        }
        Liveness {
            workers: dp.workers().iter().map(|w| (w.stats.heartbeat(), now)).collect(),
            feed_every,
            last_feed: None,
        }
    }

    /// How often the watchdog wants feeding, if systemd asked for one.
    pub fn feed_every(&self) -> Option<Duration> {
        self.feed_every
    }

    /// Tells systemd the instance is up (Type=notify).
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
    }

    /// Tells systemd the instance is stopping.
    pub fn stopping() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }

    /// Notes the workers' progress (a heartbeat that moved since the last
    /// look restarts that worker's clock) and returns, by worker id, how
    /// long each has been seen standing still. A look is the only clock:
    /// a worker that stopped just after one is seen still from the next
    /// (the control thread looks every round, at least once a second).
    pub fn still(&mut self, dp: &Dataplane) -> Vec<(usize, Duration)> {
        let now = Instant::now();
        dp.workers()
            .iter()
            .zip(self.workers.iter_mut())
            .map(|(w, (last, since))| {
                let beat = w.stats.heartbeat();
                if beat != *last {
                    *last = beat;
                    *since = now;
                }
                (w.info.id, now.duration_since(*since))
            })
            .collect()
    }

    /// Called once per control round: notes the workers' progress, feeds
    /// the watchdog when everyone moved, and names a worker that stopped.
    pub fn check(&mut self, dp: &Dataplane) -> Result<(), String> {
        let stalled = self.still(dp).into_iter().find(|(_, d)| *d > WORKER_STALL_LIMIT);
        let now = Instant::now();
        if let Some((id, for_)) = stalled {
            return Err(format!(
                "worker {id} made no progress for {} ms; exiting so that its queue is not a black hole \
                 (XDP goes with the process, the fail-safe table stays)",
                for_.as_millis()
            ));
        }
        // Everyone turned within the last interval: feed.
        if let Some(every) = self.feed_every
            && self.last_feed.is_none_or(|t| now.duration_since(t) >= every)
            && self
                .workers
                .iter()
                .all(|(_, since)| now.duration_since(*since) < every.max(Duration::from_millis(200)))
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            self.last_feed = Some(now);
        }
        Ok(())
    }
}
