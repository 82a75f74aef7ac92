//! `crypto`: the crypto-only ceiling, data messages sealed and opened per
//! second by one core (subway's session: ChaCha20-Poly1305 from ring, no
//! packet I/O). No contender: it is the bound the tunnel's rates are
//! measured against. Needs no root.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    #[arg(long, default_value_t = 0)]
    core: usize,
}

pub fn run(a: Args) -> Result<()> {
    let md = crypto_md(&crypto(&[64, 512, 1420], a.secs, a.core));
    println!("{md}");
    Ok(())
}

/// The crypto ceiling per size: (size label, seal/s, open/s), pinned to `core`.
pub(super) fn crypto(sizes: &[usize], secs: f64, core: usize) -> Vec<(usize, f64, f64)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            core_affinity::set_for_current(core_affinity::CoreId { id: core });
            sizes
                .iter()
                .map(|&size| {
                    // Wire size of the inner frame -> its IP packet.
                    let (seal, open) = crate::ceiling::crypto_rates(size - 4 - 14, secs);
                    eprintln!(
                        "crypto {size}: seal {:.3} Mpps, open {:.3} Mpps",
                        seal / 1e6,
                        open / 1e6
                    );
                    (size, seal, open)
                })
                .collect()
        })
        .join()
        .unwrap_or_default()
    })
}

pub(super) fn crypto_md(rows: &[(usize, f64, f64)]) -> String {
    let mut md = String::from(
        "Crypto-only ceiling of one core (subway's session: ChaCha20-Poly1305 from ring, no packet I/O):\n\n\
         | size | seal Mpps | open Mpps | seal Gbit/s | open Gbit/s |\n|---|---:|---:|---:|---:|\n",
    );
    for (size, seal, open) in rows {
        let bits = *size as f64 * 8.0 / 1e9;
        md += &format!(
            "| {size} | {:.3} | {:.3} | {:.2} | {:.2} |\n",
            seal / 1e6,
            open / 1e6,
            seal * bits,
            open * bits
        );
    }
    md
}
