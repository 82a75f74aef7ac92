//! `queues`: one peer through 1 and then 2 RX queues and workers, encrypt
//! direction: LAN frames in on one or two queues (a generator per queue,
//! as a NIC's RSS spreads a LAN's flows), ciphertext for the one peer
//! counted on the far wire. Reports the delivered rate and what matters on
//! a box this small: the workers' own CPU time per packet (their threads'
//! utime + stime over the offer, from /proc), which should stay flat as
//! workers are added if nothing is shared between them but the session's
//! counter (reserved per batch).
//!
//! On this 2-core VM the two generators and the two workers share the two
//! cores, so the rate cannot double here; ns per packet per worker says
//! what a box with a core per worker would do.

use super::rig::{Gen, offer, start_gw};
use super::tunnel::encrypt_rig;
use super::{Common, Params, date_stamp, need_root, parse_sizes};
use crate::frames::Size;
use anyhow::{Context, Result};
use subway_testkit::TwoSites;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sizes (wire bytes of the inner frame), comma-separated.
    #[arg(long, default_value = "64,1420")]
    sizes: String,
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Smoke test: 64 bytes only, 1 second.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    common: Common,
}

/// CPU time (ns) of a process's threads whose name starts with `prefix`.
fn threads_cpu_ns(pid: u32, prefix: &str) -> u64 {
    let tick_ns = 1_000_000_000 / 100; // USER_HZ
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
        .map(|s| {
            let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields after the name: state is [0], utime [11], stime [12].
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) * tick_ns
        })
        .sum()
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench queues")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let p = Params::base(if a.quick { 1.0 } else { a.duration }, &a.common.profile);
    let mut md = String::from(
        "| size | queues / workers | delivered Mpps | vs 1 queue | workers' CPU ns/pkt | packets sealed per worker |\n|---|---:|---:|---:|---:|---|\n",
    );
    for size in &sizes {
        let mut base = None;
        for trial in 0..a.trials.max(1) {
            for q in [1u32, 2] {
                eprintln!(
                    "queues {q} size {} trial {}/{}",
                    size.label(),
                    trial + 1,
                    a.trials.max(1)
                );
                let (mpps, ns, per) = once(q, size, &p)?;
                if q == 1 {
                    base = Some(mpps);
                }
                let vs = base.map_or(String::from("-"), |b| format!("{:.2}x", mpps / b));
                md += &format!("| {} | {q} | {mpps:.3} | {vs} | {ns:.0} | {per:?} |\n", size.label());
            }
        }
    }
    println!("\n{md}");
    let dir = a.common.out.join(date_stamp());
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("queues.md"), &md)?;
    eprintln!("results written to {}", dir.display());
    Ok(())
}

/// One measurement with `q` queues: (delivered Mpps, workers' CPU ns per
/// packet they sealed, tunnel_tx per worker).
fn once(q: u32, size: &Size, p: &Params) -> Result<(f64, f64, Vec<u64>)> {
    let t = TwoSites::with_queues(q)?;
    let cores = if q == 1 { "0".to_string() } else { "0,1".to_string() };
    // start_gw pins site A's worker to fwd_core; with two queues the
    // workers take cores 0 and 1 ([Tuning] Cores, round-robin).
    let ga = if q == 1 {
        start_gw(&t, "subway", true, p)?
    } else {
        let cfg = t.subway_config(true, false, "") + &format!("\n[Tuning]\nCores = {cores}\n");
        super::rig::Gw::Subway(subway_testkit::Subway::start_bin(
            &t.gwa,
            &cfg,
            &subway_testkit::profile_bin("subway", &p.profile)?,
        )?)
    };
    let (ga, mac) = encrypt_rig(&t, ga, "subway", p)?;
    let super::rig::Gw::Subway(s) = &ga else {
        unreachable!("subway")
    };
    let pid = s.proc.pid();
    let tx0 = per_worker(s, "tunnel_tx")?;
    let cpu0 = threads_cpu_ns(pid, "subway-w");
    // A generator per queue, each on its own core.
    let rows: Vec<Result<crate::report::Row>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..q)
            .map(|i| {
                let (t, mac) = (&t, &mac);
                sc.spawn(move || {
                    let mut g = Gen::plain(&t.a, mac);
                    g.extra.extend(["--queue".to_string(), i.to_string()]);
                    let pi = Params {
                        gen_core: if q == 1 { p.gen_core } else { i as usize },
                        ..p.clone()
                    };
                    offer(&g, (&t.gwb, "wan0"), "subway", size, &pi)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = threads_cpu_ns(pid, "subway-w") - cpu0;
    let tx1 = per_worker(s, "tunnel_tx")?;
    let rows: Vec<crate::report::Row> = rows.into_iter().collect::<Result<_>>()?;
    // Every generator's window counts the one sink: the first one's count
    // is the total over (nearly) the same window.
    let r = &rows[0];
    let delivered = r.delivered as f64;
    let per: Vec<u64> = tx1.iter().zip(&tx0).map(|(a, b)| a - b).collect();
    let sealed: u64 = per.iter().sum();
    Ok((delivered / r.seconds / 1e6, cpu as f64 / sealed.max(1) as f64, per))
}

fn per_worker(s: &subway_testkit::Subway, k: &str) -> Result<Vec<u64>> {
    let v = s.show().context("subway show")?;
    Ok(v["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["counters"][k].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default())
}
