//! PNG plots of a run, drawn by gnuplot (installed by setup.sh) from the
//! same numbers as the tables. Without gnuplot the tables are still
//! written and the plots are skipped with a note.

use crate::latency::FlowStats;
use crate::report::Row;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn gnuplot(dir: &Path, name: &str, script: &str) -> std::io::Result<Option<PathBuf>> {
    let gp = dir.join(format!("{name}.gp"));
    std::fs::write(&gp, script)?;
    // Run in `dir`: the script names its data files and output there.
    match std::process::Command::new("gnuplot")
        .arg(format!("{name}.gp"))
        .current_dir(dir)
        .output()
    {
        Ok(o) if o.status.success() => Ok(Some(dir.join(format!("{name}.png")))),
        Ok(o) => Err(std::io::Error::other(format!(
            "gnuplot {}: {}",
            gp.display(),
            String::from_utf8_lossy(&o.stderr)
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A table of `value(row)` by size (rows) and contender (columns), in the
/// order they first appear; `?` where a contender has no row for a size.
fn by_size(rows: &[Row], contenders: &[String], value: impl Fn(&Row) -> f64) -> String {
    let mut sizes: Vec<&str> = Vec::new();
    for r in rows {
        if !sizes.contains(&r.size.as_str()) {
            sizes.push(&r.size);
        }
    }
    let mut s = String::new();
    for size in sizes {
        let _ = write!(s, "{size}");
        for c in contenders {
            match rows.iter().find(|r| r.size == size && &r.contender == c) {
                Some(r) => {
                    let _ = write!(s, " {:.4}", value(r));
                }
                None => s.push_str(" ?"),
            }
        }
        s.push('\n');
    }
    s
}

fn contenders_of(sets: &[&[Row]]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in sets.iter().flat_map(|s| s.iter()) {
        if !v.contains(&r.contender) {
            v.push(r.contender.clone());
        }
    }
    v
}

/// Throughput (Mpps and Gbit/s) against packet size, one line per
/// contender, encrypt and decrypt side by side: `throughput.png`.
pub fn throughput(dir: &Path, encrypt: &[Row], decrypt: &[Row]) -> std::io::Result<Option<PathBuf>> {
    let contenders = contenders_of(&[encrypt, decrypt]);
    let files = [
        ("enc_mpps.dat", by_size(encrypt, &contenders, Row::mpps)),
        ("dec_mpps.dat", by_size(decrypt, &contenders, Row::mpps)),
        ("enc_gbps.dat", by_size(encrypt, &contenders, Row::gbps)),
        ("dec_gbps.dat", by_size(decrypt, &contenders, Row::gbps)),
    ];
    for (f, body) in &files {
        std::fs::write(dir.join(f), body)?;
    }
    let mut script = String::from(
        "set terminal png size 1400,900 font ',11'\nset output 'throughput.png'\nset datafile missing '?'\n\
         set multiplot layout 2,2 title 'WireGuard gateway throughput by packet size (inner frame bytes)'\n\
         set key top left\nset grid ytics\nset yrange [0:*]\nset style data linespoints\n",
    );
    for (file, title, unit) in [
        ("enc_mpps.dat", "encrypt (LAN to tunnel)", "Mpps"),
        ("dec_mpps.dat", "decrypt (tunnel to LAN)", "Mpps"),
        ("enc_gbps.dat", "encrypt", "Gbit/s"),
        ("dec_gbps.dat", "decrypt", "Gbit/s"),
    ] {
        let _ = writeln!(script, "set title '{title}'\nset ylabel '{unit}'");
        let plots: Vec<String> = contenders
            .iter()
            .enumerate()
            .map(|(i, c)| format!("'{file}' using {}:xtic(1) title '{c}' lw 2 pt 7", i + 2))
            .collect();
        let _ = writeln!(script, "plot {}", plots.join(", "));
    }
    script.push_str("unset multiplot\n");
    gnuplot(dir, "throughput", &script)
}

/// One-way latency percentiles per contender and size at a fixed load:
/// `latency.png` (log scale).
pub fn latency(dir: &Path, stats: &[(String, String, FlowStats)], rate: u64) -> std::io::Result<Option<PathBuf>> {
    let mut dat = String::from("# label p50 p90 p99 p99.9\n");
    for (c, size, s) in stats {
        let _ = writeln!(
            dat,
            "\"{c} {size}B\" {:.1} {:.1} {:.1} {:.1}",
            s.p50_us.max(0.1),
            s.p90_us.max(0.1),
            s.p99_us.max(0.1),
            s.p999_us.max(0.1)
        );
    }
    std::fs::write(dir.join("latency.dat"), dat)?;
    let script = format!(
        "set terminal png size 1200,600 font ',11'\nset output 'latency.png'\n\
         set title 'One-way latency through two gateways at {rate} packets/s (percentiles)'\n\
         set style data histogram\nset style histogram clustered gap 1\nset style fill solid 0.8 border -1\n\
         set logscale y\nset ylabel 'microseconds'\nset grid ytics\nset key top left\nset xtics rotate by -20\n\
         plot 'latency.dat' using 2:xtic(1) title 'p50', '' using 3 title 'p90', '' using 4 title 'p99', '' using 5 title 'p99.9'\n"
    );
    gnuplot(dir, "latency", &script)
}
