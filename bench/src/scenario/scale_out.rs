//! `scale-out`: the aggregate encrypt rate of two subway gateways working
//! side by side (each with its own LAN traffic, as two gateways behind a
//! LAN router's ECMP route carry half the flows each) against one gateway
//! alone, in the same run. Each measurement is the encrypt rig of
//! `tunnel`: LAN frames in, ciphertext counted on the far wire.
//!
//! One gateway: its worker on core 0, its generator on core 1. Two: the
//! first as before, the second with its worker on core 1 and its
//! generator on core 0, both offered at once. On this 2-core VM every core
//! then runs a worker and a generator, so the aggregate cannot double here:
//! the figure says what sharing two cores costs, not what two boxes give
//! (on two boxes each gateway has its own cores and NIC queues, and the
//! aggregate is the sum of what each carries).

use super::rig::{Gen, offer, start_gw};
use super::tunnel::encrypt_rig;
use super::{Common, Params, date_stamp, need_root, parse_sizes, write_results};
use crate::frames::Size;
use crate::report::{self, Row};
use anyhow::{Result, anyhow};
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
    need_root("subway-bench scale-out")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let mut p = Params::base(if a.quick { 1.0 } else { a.duration }, &a.common.profile);
    p.trials = if a.quick { 1 } else { a.trials.max(1) };
    let rows = scale_out(&sizes, &p)?;
    write_results(
        &a.common.out.join(date_stamp()),
        "scale-out",
        &rows,
        "1 gateway",
        p.fwd_core,
    )
}

/// One gateway, then two at once, at each size, trials interleaved; the
/// median row of each.
pub(super) fn scale_out(sizes: &[Size], p: &Params) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for size in sizes {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for trial in 0..p.trials {
            eprintln!("scale-out size {} trial {}/{}", size.label(), trial + 1, p.trials);
            one.push(one_gateway(size, p)?);
            two.push(two_gateways(size, p)?);
        }
        rows.extend(report::median(one));
        rows.extend(report::median(two));
    }
    Ok(rows)
}

fn one_gateway(size: &Size, p: &Params) -> Result<Row> {
    let t = TwoSites::new()?;
    let ga = start_gw(&t, "subway", true, p)?;
    let (_ga, mac) = encrypt_rig(&t, ga, "subway", p)?;
    offer(&Gen::plain(&t.a, &mac), (&t.gwb, "wan0"), "1 gateway", size, p)
}

fn two_gateways(size: &Size, p: &Params) -> Result<Row> {
    let swapped = Params {
        fwd_core: p.gen_core,
        gen_core: p.fwd_core,
        ..p.clone()
    };
    let (t1, t2) = (TwoSites::new()?, TwoSites::new()?);
    let g1 = start_gw(&t1, "subway", true, p)?;
    let (_g1, m1) = encrypt_rig(&t1, g1, "subway", p)?;
    let g2 = start_gw(&t2, "subway", true, &swapped)?;
    let (_g2, m2) = encrypt_rig(&t2, g2, "subway", &swapped)?;
    let (r1, r2) = std::thread::scope(|s| {
        let a = s.spawn(|| offer(&Gen::plain(&t1.a, &m1), (&t1.gwb, "wan0"), "2 gateways", size, p));
        let b = s.spawn(|| offer(&Gen::plain(&t2.a, &m2), (&t2.gwb, "wan0"), "2 gateways", size, &swapped));
        (a.join(), b.join())
    });
    let (r1, r2) = (
        r1.map_err(|_| anyhow!("generator 1 panicked"))??,
        r2.map_err(|_| anyhow!("generator 2 panicked"))??,
    );
    // The two offers ran over the same window: rates add up.
    let seconds = r1.seconds.max(r2.seconds);
    let scale = |r: &Row| r.delivered as f64 * seconds / r.seconds;
    Ok(Row {
        contender: "2 gateways".into(),
        size: size.label(),
        sent: r1.sent + r2.sent,
        delivered: (scale(&r1) + scale(&r2)) as u64,
        seconds,
        mean_wire_bytes: r1.mean_wire_bytes,
        cpu_busy: r1.cpu_busy.iter().zip(&r2.cpu_busy).map(|(a, b)| a.max(*b)).collect(),
        cpu_busy_ns: r1
            .cpu_busy_ns
            .iter()
            .zip(&r2.cpu_busy_ns)
            .map(|(a, b)| a.max(*b))
            .collect(),
    })
}
