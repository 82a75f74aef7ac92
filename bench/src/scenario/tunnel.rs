//! `tunnel`: a WireGuard gateway, subway against wireguard-go and
//! boringtun-cli (kernel forwarding + TUN), packets/s at each size; the
//! baseline is the last contender named (wireguard-go by default).
//!
//! Encrypt: LAN frames in, ciphertext counted on the far wire (the far
//! gateway's kernel drops it unread). Decrypt: the generator is the
//! gateway's peer, replaying packets it sealed before the clock started,
//! with fresh counters; plaintext counted on the LAN wire.
//!
//! Contenders may carry variants of subway: `+capture-all` and
//! `+capture-none` run a `subway capture` through the measurement (every
//! frame, or a filter no frame matches) written to /dev/null;
//! `+policy-N` gives the measured gateway a [Policy] of N rules (default
//! deny, the generator's traffic allowed by the last two); `+flows-100k`
//! has the generator send 100,000 flows round-robin.

use super::rig::{CaptureRun, Gen, Gw, neigh_to_sink, offer, pin_standard, start_gw, variant_flows};
use super::{Common, Params, date_stamp, need_root, parse_sizes, search_loss_free, write_results};
use crate::frames::Size;
use crate::report::{self, Row};
use anyhow::{Context, Result, bail};
use std::time::Duration;
use subway_testkit::TwoSites;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// encrypt, decrypt, or both (comma-separated).
    #[arg(long, default_value = "encrypt,decrypt")]
    direction: String,
    /// Sizes (wire bytes of the inner frame) or imix, comma-separated.
    #[arg(long, default_value = "64,512,1420")]
    sizes: String,
    /// Contenders, comma-separated: subway, boringtun-cli, wireguard-go,
    /// and subway with variants: +capture-all / +capture-none (while
    /// `subway capture` runs, taking every frame / a filter none
    /// matches), +policy-N ([Policy] of N rules), +flows-100k (100,000
    /// flows), e.g. subway+policy-1000+flows-100k.
    #[arg(long, default_value = "subway,boringtun-cli,wireguard-go")]
    contenders: String,
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    trials: usize,
    #[arg(long, default_value_t = 0)]
    fwd_core: usize,
    #[arg(long, default_value_t = 1)]
    gen_core: usize,
    /// Smoke test: 64 bytes only, 1 second.
    #[arg(long)]
    quick: bool,
    /// Search for the highest offered rate with loss under 0.1% (an
    /// RFC 2544-style binary search, 7 probes) instead of saturating.
    #[arg(long)]
    search: bool,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench tunnel")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let p = Params {
        duration: if a.quick { 1.0 } else { a.duration },
        count: 50_000_000,
        rate: 0,
        fwd_core: a.fwd_core,
        gen_core: a.gen_core,
        trials: if a.quick { 1 } else { a.trials.max(1) },
        tuning: String::new(),
        napi_on_forwarder: false,
        flows: 1,
        search: a.search,
        profile: a.common.profile,
    };
    let contenders: Vec<&str> = a.contenders.split(',').map(str::trim).collect();
    let baseline = contenders.last().copied().unwrap_or("wireguard-go");
    let dir = a.common.out.join(date_stamp());
    for d in a.direction.split(',').map(str::trim) {
        let decrypt = match d {
            "encrypt" => false,
            "decrypt" => true,
            other => bail!("--direction {other}: encrypt or decrypt"),
        };
        let rows = tunnel(&sizes, &contenders, decrypt, &p)?;
        write_results(&dir, &format!("tunnel-{d}"), &rows, baseline, a.fwd_core)?;
    }
    Ok(())
}

/// Every contender at each size in one direction, trials interleaved
/// across contenders; the median row of each.
pub(super) fn tunnel(sizes: &[Size], contenders: &[&str], decrypt: bool, p: &Params) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for size in sizes {
        // Trials outside, contenders inside: a slow spell of the shared
        // machine lands on every contender, not on one.
        let mut by_contender: Vec<Vec<Row>> = vec![Vec::new(); contenders.len()];
        for trial in 0..p.trials {
            for (ci, c) in contenders.iter().enumerate() {
                let trials = &mut by_contender[ci];
                let what = if decrypt { "decrypt" } else { "encrypt" };
                eprintln!("{what} size {} {c} trial {}/{}", size.label(), trial + 1, p.trials);
                let t = TwoSites::new()?;
                let ga = start_gw(&t, c, true, p)?;
                let (p, extra) = &variant_flows(c, p);
                if decrypt {
                    trials.push(decrypt_once(&t, &ga, c, size, p, extra)?);
                    continue;
                }
                let (ga, gw_mac) = encrypt_rig(&t, ga, c, p)?;
                let mut gen_plain = Gen::plain(&t.a, &gw_mac);
                gen_plain.extra.extend(extra.iter().cloned());
                let capture = CaptureRun::start(&ga, c, p)?;
                let row = if p.search {
                    search_loss_free(
                        |rate| offer(&gen_plain, (&t.gwb, "wan0"), c, size, &Params { rate, ..p.clone() }),
                        7,
                    )?
                } else {
                    offer(&gen_plain, (&t.gwb, "wan0"), c, size, p)?
                };
                if let Some(cap) = capture {
                    eprintln!("                 capture: {}", cap.finish());
                }
                if let Gw::Subway(s) = &ga
                    && let Ok(v) = s.show()
                {
                    eprintln!("                 subway: {} {}", v["totals"]["tunnel_tx"], v["xsk"]);
                }
                trials.push(row);
            }
        }
        for trials in by_contender {
            rows.extend(report::median(trials));
        }
    }
    Ok(rows)
}

/// Site A's gateway `ga` (started) ready for an encrypt measurement: the
/// tunnel up with real traffic, then site A's next hop for the far gateway
/// pointed at a MAC nobody has, so that the far gateway's wire counts the
/// ciphertext and its kernel drops it at once (its decryption costs
/// nothing and only site A is measured). Returns `ga` and its LAN MAC.
pub(super) fn encrypt_rig(t: &TwoSites, ga: Gw, c: &str, p: &Params) -> Result<(Gw, String)> {
    let gb = start_gw(t, c, false, p)?;
    subway_testkit::ping_until(&t.a, "10.2.0.2", 20).with_context(|| format!("{c}: the tunnel did not come up"))?;
    neigh_to_sink(&t.gwa, "192.0.2.2", "wan0")?;
    // No RPS here: the gateway's ingress (the kernel's receive and TUN
    // write for the standard implementations, XDP and the AF_XDP copy for
    // subway) runs on the sending core in both cases, and core `fwd_core`
    // is left to the gateway process.
    if std::env::var_os("SUBWAY_BENCH_RPS").is_some() {
        t.gwa.sh(&format!(
            "echo {:x} > /sys/class/net/lan0/queues/rx-0/rps_cpus",
            1u64 << p.fwd_core
        ))?;
    }
    // The far gateway has done its part (the handshake): gone, it costs
    // the measured core nothing (subway's XDP program on its wire would
    // otherwise run for every frame).
    drop(gb);
    pin_standard(&ga, p.fwd_core);
    std::thread::sleep(Duration::from_millis(400));
    let gw_mac = t.gwa.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
    Ok((ga, gw_mac))
}

/// Packets a decrypt-direction probe seals in advance at most (one UMEM
/// frame each, 2 KiB: 2 GiB); a probe ends at this count or its duration.
const DECRYPT_MAX_PACKETS: u64 = 1 << 20;

/// One decrypt-direction measurement of gateway A (`ga`, already started):
/// the generator in site B's gateway namespace is A's peer B (B's key and
/// address), handshakes with A, and replays sealed packets to A's uplink;
/// what A delivers on its LAN is counted on host a's wire. A resolves
/// host a to a MAC nobody has, so a's kernel drops the plaintext unread
/// (no replies to encrypt back).
fn decrypt_once(t: &TwoSites, ga: &Gw, c: &str, size: &Size, p: &Params, extra: &[String]) -> Result<Row> {
    neigh_to_sink(&t.gwa, "10.1.0.2", "lan0")?;
    pin_standard(ga, p.fwd_core);
    std::thread::sleep(Duration::from_millis(400));
    let wan_mac = t.gwa.run(&["cat", "/sys/class/net/wan0/address"])?.trim().to_string();
    let g = Gen {
        ns: &t.gwb,
        iface: "wan0",
        dst_mac: wan_mac,
        src_ip: "10.2.0.2",
        dst_ip: "10.1.0.2",
        extra: [
            "--wg-key",
            &t.keys_b.0,
            "--wg-peer",
            &t.keys_a.1,
            "--wg-listen",
            "192.0.2.2:51820",
            "--wg-endpoint",
            "192.0.2.1:51820",
        ]
        .map(String::from)
        .into_iter()
        .chain(extra.iter().cloned())
        .collect(),
    };
    let count = |rate: u64| -> u64 {
        let by_time = if rate == 0 {
            u64::MAX
        } else {
            (rate as f64 * p.duration) as u64 + 1
        };
        p.count.min(DECRYPT_MAX_PACKETS).min(by_time)
    };
    let capture = CaptureRun::start(ga, c, p)?;
    let row = if p.search {
        search_loss_free(
            |rate| {
                offer(
                    &g,
                    (&t.a, "eth0"),
                    c,
                    size,
                    &Params {
                        rate,
                        count: count(rate),
                        ..p.clone()
                    },
                )
            },
            7,
        )?
    } else {
        offer(
            &g,
            (&t.a, "eth0"),
            c,
            size,
            &Params {
                count: count(p.rate),
                ..p.clone()
            },
        )?
    };
    if let Some(cap) = capture {
        eprintln!("                 capture: {}", cap.finish());
    }
    if let Gw::Subway(s) = ga
        && let Ok(v) = s.show()
    {
        eprintln!(
            "                 subway: tunnel_rx {} drops {}",
            v["totals"]["tunnel_rx"],
            v["totals"]
                .as_object()
                .map(|m| m
                    .iter()
                    .filter(|(k, v)| k.starts_with("drop_") && v.as_u64() > Some(0))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
    }
    Ok(row)
}
