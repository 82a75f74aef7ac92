//! `tune`: which [Tuning] settings win on this box: batch size, ring size,
//! need_wakeup vs busy poll vs spinning, idle spin, the worker's core, XDP
//! driver vs generic mode, copy vs zero-copy. Routed mode at 64 bytes (the
//! AF_XDP path without crypto, where the knobs matter), one change at a
//! time against the defaults, which are the baseline; the defaults run
//! twice, and their spread is the noise a winner must beat.

use super::routed::routed_subway;
use super::{Common, Params, date_stamp, need_root};
use crate::frames::Size;
use crate::report::{self, Row};
use anyhow::{Result, bail};
use subway_testkit::profile_bin;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench tune")?;
    let dir = a.common.out.join(date_stamp());
    std::fs::create_dir_all(&dir)?;
    let md = tune(a.quick, &a.common.profile)?;
    println!("\n{md}");
    std::fs::write(dir.join("tune.md"), &md)?;
    eprintln!("results written to {}", dir.display());
    Ok(())
}

/// The tuning sweep: one [Tuning] change at a time against the defaults,
/// routed mode, 64 bytes, saturating; the median of trials.
pub(super) fn tune(quick: bool, profile: &str) -> Result<String> {
    let subway = profile_bin("subway", profile)?;
    let settings: Vec<(&str, String)> = vec![
        (
            "defaults (BatchSize 64, RingSize 2048, NeedWakeup, IdleSpin 512, XDP auto)",
            String::new(),
        ),
        ("BatchSize = 16", "BatchSize = 16".into()),
        ("BatchSize = 32", "BatchSize = 32".into()),
        ("BatchSize = 128", "BatchSize = 128".into()),
        ("RingSize = 512", "RingSize = 512".into()),
        ("RingSize = 4096", "RingSize = 4096".into()),
        ("NeedWakeup = false (always kick)", "NeedWakeup = false".into()),
        ("BusyPoll = true", "BusyPoll = true".into()),
        ("IdleSpin = 0", "IdleSpin = 0".into()),
        ("IdleSpin = 4096", "IdleSpin = 4096".into()),
        ("XdpMode = generic", "XdpMode = generic".into()),
        ("XdpMode = driver", "XdpMode = driver".into()),
        ("XskMode = zero-copy", "XskMode = zero-copy".into()),
        ("worker on the generator's core", "@same-core".into()),
    ];
    let mut settings = if quick { settings[..2].to_vec() } else { settings };
    // The defaults once more, last in every round: how far apart two runs
    // of the same thing are on this box is the noise every ratio carries.
    if !quick {
        settings.push(("defaults, again (noise check)", String::new()));
    }
    let trials = if quick { 1 } else { 3 };
    let size = Size::Fixed(64);
    // Rounds of every setting in turn (interleaved, so that a slow phase
    // of the machine does not land on one setting), then medians.
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); settings.len()];
    let mut errors: Vec<Option<String>> = vec![None; settings.len()];
    for round in 0..trials {
        for (i, (label, tuning)) in settings.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            let (fwd_core, tuning) = match tuning.as_str() {
                "@same-core" => (1, String::new()),
                t => (0, t.to_string()),
            };
            let p = Params {
                count: 20_000_000,
                fwd_core,
                trials,
                tuning,
                ..Params::base(if quick { 1.0 } else { 2.0 }, profile)
            };
            eprintln!("tune round {}/{trials}: {label}", round + 1);
            match routed_subway(&size, label, &p, &subway) {
                Ok(r) => rows[i].push(r),
                Err(e) => {
                    // The reason is the log's last "subway:" line, or the first.
                    let text = format!("{e:#}");
                    let why = text
                        .lines()
                        .rev()
                        .find(|l| l.contains("subway:") || l.contains("ERROR"))
                        .or_else(|| text.lines().next())
                        .unwrap_or("failed")
                        .trim()
                        .to_string();
                    errors[i] = Some(why);
                }
            }
        }
    }
    // Only a setting this box cannot offer may fail (zero-copy on a driver
    // without it, refused by subway with its reason): any other failure is
    // a broken run, and the sweep says so instead of making it a row.
    for ((label, _), err) in settings.iter().zip(&errors) {
        if let Some(why) = err
            && !label.starts_with("XskMode = zero-copy")
        {
            bail!("tune: {label} failed: {why}");
        }
    }
    let results: Vec<(&str, Result<Row, String>)> = settings
        .iter()
        .zip(rows)
        .zip(errors)
        .map(|(((label, _), rows), err)| {
            (
                *label,
                report::median(rows).ok_or(err.unwrap_or_else(|| "no result".into())),
            )
        })
        .collect();
    let rate_of = |label: &str| {
        results
            .iter()
            .find(|(l, _)| l.starts_with(label))
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|r| r.mpps())
            .unwrap_or(0.0)
    };
    let base = rate_of("defaults (");
    let again = rate_of("defaults, again");
    let noise = if base > 0.0 && again > 0.0 {
        (again / base - 1.0).abs()
    } else {
        0.0
    };
    let mut md = format!(
        "Tuning sweep: subway routed mode (AF_XDP, no crypto), 64-byte frames, saturating, one change at a time, \
         median of {trials} interleaved rounds (ns/pkt: the worker's core; the generator's core for that row, \
         so it includes the generator):\n\n\
         | setting | delivered Mpps | vs defaults | loss | worker core ns/pkt |\n|---|---:|---:|---:|---:|\n",
    );
    let mut best: Option<(&str, f64)> = None;
    for (label, r) in &results {
        match r {
            Ok(r) => {
                md += &format!(
                    "| {label} | {:.3} | {:.2}x | {:.1}% | {:.0} |\n",
                    r.mpps(),
                    if base > 0.0 { r.mpps() / base } else { 0.0 },
                    r.loss_pct(),
                    r.ns_per_pkt(if label.contains("generator's core") { 1 } else { 0 })
                );
                if !label.starts_with("defaults") && best.is_none_or(|(_, m)| r.mpps() > m) {
                    best = Some((label, r.mpps()));
                }
            }
            Err(e) => md += &format!("| {label} | failed | | | {} |\n", e.replace('|', "/")),
        }
    }
    // A setting wins only if it beats both runs of the defaults by more
    // than the spread between those two runs (and at least 5%).
    let bar = base.max(again) * (1.0 + noise.max(0.05));
    md += &format!(
        "\nThe defaults measured twice differ by {:.0}%: that is this box's noise for one setting.\n",
        noise * 100.0
    );
    match best {
        _ if quick => md += "\nQuick run: one round, no noise check, no winner.\n",
        Some((label, m)) if m > bar => {
            md += &format!(
                "Winner on this box: **{label}** ({m:.3} Mpps, {:.2}x the defaults), beyond the noise.\n",
                if base > 0.0 { m / base } else { 0.0 }
            )
        }
        Some((label, m)) => {
            md += &format!(
                "No setting beats the defaults by more than the noise (best: {label}, {m:.3} Mpps): keep the defaults here.\n"
            )
        }
        None => {}
    }
    Ok(md)
}
