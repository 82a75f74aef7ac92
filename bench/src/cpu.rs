//! CPU time per core from /proc/stat, to report how busy each core was
//! during a run (the generator, the forwarder and softirqs share them).

#[derive(Clone, Debug, Default)]
pub struct CpuTimes {
    /// Per core: (busy jiffies, total jiffies).
    pub cores: Vec<(u64, u64)>,
}

impl CpuTimes {
    pub fn now() -> CpuTimes {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cores = s
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(|c| c.is_ascii_digit()))
            .map(|l| {
                let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal: time the
                // hypervisor stole is not time this core spent on us.
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                let steal = v.get(7).copied().unwrap_or(0);
                (total - idle - steal, total)
            })
            .collect();
        CpuTimes { cores }
    }

    /// Busy time of each core since `earlier`, in nanoseconds.
    pub fn busy_ns_since(&self, earlier: &CpuTimes) -> Vec<f64> {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.cores
            .iter()
            .zip(&earlier.cores)
            .map(|((b1, _), (b0, _))| b1.saturating_sub(*b0) as f64 * 1e9 / hz)
            .collect()
    }

    /// Busy percentage of each core since `earlier`.
    pub fn busy_since(&self, earlier: &CpuTimes) -> Vec<f64> {
        self.cores
            .iter()
            .zip(&earlier.cores)
            .map(|((b1, t1), (b0, t0))| {
                let dt = t1.saturating_sub(*t0).max(1);
                100.0 * b1.saturating_sub(*b0) as f64 / dt as f64
            })
            .collect()
    }
}

/// CPU time (ns) of a process's threads whose name starts with `prefix`.
pub fn threads_cpu_ns(pid: u32, prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            s.split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .is_some_and(|(n, _)| n.starts_with(prefix))
        })
        .map(|s| stat_cpu_ns(&s))
        .sum()
}

/// CPU time (ns) of a process's main thread (subway's control thread):
/// the scheduler's own count (schedstat, to the nanosecond) where the
/// kernel has it, else utime + stime (to the 10 ms tick).
pub fn main_thread_cpu_ns(pid: u32) -> u64 {
    let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
    sched.unwrap_or_else(|| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).map_or(0, |s| stat_cpu_ns(&s))
    })
}

/// utime + stime of one /proc/.../stat line, in ns.
fn stat_cpu_ns(stat: &str) -> u64 {
    let tick_ns = 1_000_000_000 / 100; // USER_HZ
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state is [0], utime [11], stime [12].
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) * tick_ns
}
