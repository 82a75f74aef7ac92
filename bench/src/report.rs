//! Result rows, printed as a Markdown table and written as CSV.

use std::fmt::Write as _;

#[derive(Clone, Debug)]
pub struct Row {
    pub contender: String,
    pub size: String,
    pub sent: u64,
    pub delivered: u64,
    pub seconds: f64,
    pub mean_wire_bytes: f64,
    pub cpu_busy: Vec<f64>,
    /// Busy nanoseconds of each core over the same window.
    pub cpu_busy_ns: Vec<f64>,
}

impl Row {
    pub fn mpps(&self) -> f64 {
        self.delivered as f64 / self.seconds / 1e6
    }
    pub fn gbps(&self) -> f64 {
        self.delivered as f64 * self.mean_wire_bytes * 8.0 / self.seconds / 1e9
    }
    /// Nanoseconds of `core`'s time per delivered packet: the per-core
    /// cost, steadier than a rate on a shared, noisy machine.
    pub fn ns_per_pkt(&self, core: usize) -> f64 {
        let busy = self.cpu_busy_ns.get(core).copied().unwrap_or(0.0);
        if self.delivered == 0 {
            0.0
        } else {
            busy / self.delivered as f64
        }
    }
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            100.0 * (self.sent.saturating_sub(self.delivered)) as f64 / self.sent as f64
        }
    }
}

/// The median row (by delivered rate) of repeated trials.
pub fn median(mut trials: Vec<Row>) -> Option<Row> {
    trials.sort_by(|a, b| a.mpps().total_cmp(&b.mpps()));
    let n = trials.len();
    if n == 0 { None } else { Some(trials.swap_remove(n / 2)) }
}

/// `fwd_core` is the forwarder's core, whose ns/packet is shown.
pub fn markdown(rows: &[Row], baseline: &str, fwd_core: usize) -> String {
    let mut s = String::new();
    let ncpu = rows.iter().map(|r| r.cpu_busy.len()).max().unwrap_or(0);
    let cpu_hdr: String = (0..ncpu).map(|i| format!(" cpu{i} busy |")).collect();
    let cpu_sep: String = (0..ncpu).map(|_| "---:|").collect();
    let _ = writeln!(
        s,
        "| size | contender | offered Mpps | delivered Mpps | Gbit/s | loss | vs {baseline} | cpu{fwd_core} ns/pkt |{cpu_hdr}"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|{cpu_sep}");
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.size == r.size && b.contender == baseline)
            .map(|b| b.mpps())
            .unwrap_or(0.0);
        let ratio = if base > 0.0 {
            format!("{:.2}x", r.mpps() / base)
        } else {
            "-".into()
        };
        let cpus: String = r.cpu_busy.iter().map(|c| format!(" {c:.0}% |")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.2} | {:.1}% | {} | {:.0} |{}",
            r.size,
            r.contender,
            r.sent as f64 / r.seconds / 1e6,
            r.mpps(),
            r.gbps(),
            r.loss_pct(),
            ratio,
            r.ns_per_pkt(fwd_core),
            cpus
        );
    }
    s
}

pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from("contender,size,sent,delivered,seconds,mpps,gbps,loss_pct,cpu_busy\n");
    for r in rows {
        let cpus: Vec<String> = r.cpu_busy.iter().map(|c| format!("{c:.1}")).collect();
        let _ = writeln!(
            s,
            "{},{},{},{},{:.3},{:.4},{:.4},{:.2},{}",
            r.contender,
            r.size,
            r.sent,
            r.delivered,
            r.seconds,
            r.mpps(),
            r.gbps(),
            r.loss_pct(),
            cpus.join(";")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_against_the_baseline() {
        let row = |c: &str, d: u64| Row {
            contender: c.into(),
            size: "64".into(),
            sent: 1000,
            delivered: d,
            seconds: 1.0,
            mean_wire_bytes: 64.0,
            cpu_busy: vec![50.0, 100.0],
            cpu_busy_ns: vec![0.5e9, 1e9],
        };
        let rows = vec![row("kernel", 400), row("subway", 800)];
        let md = markdown(&rows, "kernel", 0);
        assert!(
            md.contains("| 64 | subway | 0.001 | 0.001 | 0.00 | 20.0% | 2.00x | 625000 | 50% | 100% |"),
            "{md}"
        );
        assert_eq!(median(rows.clone()).unwrap().delivered, 800);
        assert!(csv(&rows).lines().nth(2).unwrap().starts_with("subway,64,1000,800,"));
    }
}
