//! What a sink saw of a rate-limited flow: loss, duplicates, reordering
//! and one-way latency percentiles.
//!
//! The generator sends packet `seq` when `(seq + 1) / rate` seconds have
//! passed since `t0` (its pacer releases a packet once the elapsed time
//! allows one more; it never runs ahead, and a paced loop on an idle core
//! is within a microsecond or two of it), so a packet's latency is its
//! kernel receive timestamp at the sink minus that scheduled send time. Both clocks are
//! the same host's CLOCK_REALTIME. This works for sealed packets too,
//! whose payload cannot carry a send time.

/// Size of one sink record: seq u64, flow u32, receive time u64 (LE).
pub const RECORD: usize = 20;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowStats {
    pub sent: u64,
    pub received: u64,
    /// Sequence numbers below `sent` never received.
    pub lost: u64,
    pub duplicates: u64,
    /// Arrivals after a higher sequence number.
    pub reordered: u64,
    /// Datagrams that are not of this flow (a sequence number beyond it).
    pub stray: u64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Analyses sink records of a flow of `sent` packets paced at `rate`
/// packets/s from `t0_ns` (CLOCK_REALTIME).
pub fn analyze(records: &[u8], sent: u64, t0_ns: u64, rate: u64) -> FlowStats {
    let mut s = FlowStats {
        sent,
        ..Default::default()
    };
    let mut seen = vec![false; sent as usize];
    let mut lat = Vec::with_capacity(records.len() / RECORD);
    let mut highest: Option<u64> = None;
    for r in records.chunks_exact(RECORD) {
        let seq = u64::from_le_bytes(r[0..8].try_into().unwrap());
        let ts = u64::from_le_bytes(r[12..20].try_into().unwrap());
        let Some(x) = seen.get_mut(seq as usize) else {
            s.stray += 1;
            continue;
        };
        s.received += 1;
        if *x {
            s.duplicates += 1;
            continue;
        }
        *x = true;
        if highest.is_some_and(|h| seq < h) {
            s.reordered += 1;
        }
        highest = highest.max(Some(seq));
        if rate > 0 && ts > 0 {
            let sched = t0_ns as f64 + (seq + 1) as f64 * 1e9 / rate as f64;
            lat.push(((ts as f64 - sched) / 1e3).max(0.0));
        }
    }
    s.lost = seen.iter().filter(|x| !**x).count() as u64;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    s.p50_us = pct(0.50);
    s.p90_us = pct(0.90);
    s.p99_us = pct(0.99);
    s.p999_us = pct(0.999);
    s.max_us = lat.last().copied().unwrap_or(0.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, ts: u64) -> Vec<u8> {
        let mut v = seq.to_le_bytes().to_vec();
        v.extend(0u32.to_le_bytes());
        v.extend(ts.to_le_bytes());
        v
    }

    #[test]
    fn loss_duplicates_reordering_and_percentiles() {
        // 1000 packets/s from t0 = 1 s: packet n leaves at 1 s + (n + 1) ms.
        let t0 = 1_000_000_000u64;
        let mut r = Vec::new();
        // 0..100 arrive 50 us late, except 10 (10 ms late), 7 is lost,
        // 20 comes twice, 31 arrives after 32.
        for seq in 0..100u64 {
            if seq == 7 || seq == 31 {
                continue;
            }
            let late = if seq == 10 { 10_000_000 } else { 50_000 };
            let due = t0 + (seq + 1) * 1_000_000;
            r.extend(rec(seq, due + late));
            if seq == 20 {
                r.extend(rec(seq, due + late));
            }
            if seq == 32 {
                r.extend(rec(31, t0 + 32 * 1_000_000 + 1_100_000));
            }
        }
        r.extend(rec(5000, t0)); // not of this flow
        let s = analyze(&r, 100, t0, 1000);
        assert_eq!(
            (s.received, s.lost, s.duplicates, s.reordered, s.stray),
            (100, 1, 1, 1, 1)
        );
        assert!((s.p50_us - 50.0).abs() < 0.5, "{s:?}");
        assert!((s.max_us - 10_000.0).abs() < 0.5, "{s:?}");
        assert!(s.p99_us >= 50.0 && s.p99_us <= 10_000.0, "{s:?}");
    }
}
