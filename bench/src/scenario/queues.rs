//! `queues`: one peer through 1 and then 2 RX queues and workers, in both
//! directions. Encrypt: LAN frames in on one or two queues (a generator
//! per queue, as a NIC's RSS spreads a LAN's flows), ciphertext for the one
//! peer counted on the far wire. Decrypt: the far gateway (subway, same
//! queues) opens what the near one sealed, on its queues; plaintext counted
//! on the far LAN's wire. Reports the delivered rate and what matters on
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

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench queues")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let p = Params::base(if a.quick { 1.0 } else { a.duration }, &a.common.profile);
    queues(&sizes, &p, a.trials, &a.common.out.join(date_stamp()))
}

/// The table for `sizes`, 1 then 2 queues, `trials` times; printed and
/// written to queues.md in `dir`. An error if nothing was delivered or a
/// worker of two sealed nothing (one peer did not spread).
pub(super) fn queues(sizes: &[Size], p: &Params, trials: usize, dir: &std::path::Path) -> Result<()> {
    let mut md = String::from(
        "| direction | size | queues / workers | delivered Mpps | vs 1 queue | workers' CPU ns/pkt | packets sealed or opened per worker |\n|---|---|---:|---:|---:|---:|---|\n",
    );
    let mut failed = None;
    for (decrypt, dir_name) in [(false, "encrypt"), (true, "decrypt")] {
        for size in sizes {
            let mut base = None;
            for trial in 0..trials.max(1) {
                for q in [1u32, 2] {
                    eprintln!(
                        "queues {q} {dir_name} size {} trial {}/{}",
                        size.label(),
                        trial + 1,
                        trials.max(1)
                    );
                    let (mpps, ns, per) = once(q, size, p, decrypt)?;
                    if q == 1 {
                        base = Some(mpps);
                    }
                    if mpps <= 0.0 || per.len() != q as usize || per.contains(&0) {
                        failed = Some(format!(
                            "{dir_name}, {q} queue(s), {}: per worker {per:?}",
                            size.label()
                        ));
                    }
                    let vs = base.map_or(String::from("-"), |b| format!("{:.2}x", mpps / b));
                    md += &format!(
                        "| {dir_name} | {} | {q} | {mpps:.3} | {vs} | {ns:.0} | {per:?} |\n",
                        size.label()
                    );
                }
            }
        }
    }
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("queues.md"), &md)?;
    eprintln!("results written to {}", dir.display());
    if let Some(f) = failed {
        anyhow::bail!("a worker carried nothing: {f}");
    }
    Ok(())
}

/// One measurement with `q` queues: (delivered Mpps, the measured
/// gateway's workers' CPU ns per packet they sealed or opened, sealed or
/// opened per worker).
///
/// Encrypt: site A's gateway is measured; ciphertext is counted on the far
/// wire (gateway B is stopped after the handshake, its kernel drops it).
/// Decrypt: site B's gateway is measured: A (also subway, the same queues
/// and workers) seals the LAN frames, B opens them on its queues (veth
/// delivers on the queue A's worker sent from) and forwards them to a
/// neighbour entry on its LAN, counted on host b's wire.
fn once(q: u32, size: &Size, p: &Params, decrypt: bool) -> Result<(f64, f64, Vec<u64>)> {
    let t = TwoSites::with_queues(q)?;
    let cores = if q == 1 { "0".to_string() } else { "0,1".to_string() };
    // Both gateways' workers on the same cores: with two queues, cores 0
    // and 1 ([Tuning] Cores, round-robin).
    let start = |for_a: bool| -> Result<subway_testkit::Subway> {
        let cfg = t.subway_config(for_a, false, "") + &format!("\n[Tuning]\nCores = {cores}\n");
        subway_testkit::Subway::start_bin(
            if for_a { &t.gwa } else { &t.gwb },
            &cfg,
            &subway_testkit::profile_bin("subway", &p.profile)?,
        )
    };
    let (_keep, measured, mac, sink, counter);
    if decrypt {
        let ga = start(true)?;
        let gb = start(false)?;
        subway_testkit::ping_until(&t.a, "10.2.0.2", 20).context("the tunnel did not come up")?;
        super::rig::neigh_to_sink(&t.gwb, super::rig::SINK_IP, "lan0")?;
        mac = t.gwa.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
        (_keep, measured, sink, counter) = (Some(ga), gb, (&t.b, "eth0"), "tunnel_rx");
    } else {
        let ga = if q == 1 {
            start_gw(&t, "subway", true, p)?
        } else {
            super::rig::Gw::Subway(start(true)?)
        };
        let (ga, m) = encrypt_rig(&t, ga, "subway", p)?;
        let super::rig::Gw::Subway(s) = ga else {
            unreachable!("subway")
        };
        mac = m;
        (_keep, measured, sink, counter) = (None, s, (&t.gwb, "wan0"), "tunnel_tx");
    }
    let s = &measured;
    let pid = s.proc.pid();
    let n0 = per_worker(s, counter)?;
    let cpu0 = crate::cpu::threads_cpu_ns(pid, "subway-w");
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
                    offer(&g, sink, "subway", size, &pi)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = crate::cpu::threads_cpu_ns(pid, "subway-w") - cpu0;
    let n1 = per_worker(s, counter)?;
    let rows: Vec<crate::report::Row> = rows.into_iter().collect::<Result<_>>()?;
    // Every generator's window counts the one sink: the first one's count
    // is the total over (nearly) the same window.
    let r = &rows[0];
    let delivered = r.delivered as f64;
    let per: Vec<u64> = n1.iter().zip(&n0).map(|(a, b)| a - b).collect();
    let done: u64 = per.iter().sum();
    Ok((delivered / r.seconds / 1e6, cpu as f64 / done.max(1) as f64, per))
}

/// Worker counter `k` of a gateway, per worker (`subway show`).
pub(super) fn per_worker(s: &subway_testkit::Subway, k: &str) -> Result<Vec<u64>> {
    let v = s.show().context("subway show")?;
    Ok(v["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["counters"][k].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default())
}
