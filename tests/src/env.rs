//! The host the tests run on: unique names, the root check, commands run
//! on the host, programs on PATH, this workspace's binaries and where test
//! logs and configs go.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when running as root. Tests that need root print why they skip.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns false (and says so) when the test cannot run here. In CI
/// (`CI` set), which runs as root, a missing root is a failure: a green
/// run must not hide tests that did not run.
pub fn require_root(test: &str) -> bool {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs root, and CI is expected to run as root");
        }
        eprintln!("SKIP {test}: needs root (network namespaces, XDP, AF_XDP); CI runs as root");
        // test.sh counts these (libtest hides a passing test's output).
        if let Some(path) = std::env::var_os("SUBWAY_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{test}");
            }
        }
        return false;
    }
    true
}

/// `out`'s stdout if it succeeded, else an error naming `what` with its
/// stderr and stdout.
pub(crate) fn check(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command on the host and returns its stdout, or an error with stderr.
pub fn host(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    check(out, &args.join(" "))
}

/// The path of a program on PATH (or in ~/.cargo/bin).
pub fn which(prog: &str) -> Result<String> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = format!("{}:{home}/.cargo/bin", std::env::var("PATH").unwrap_or_default());
    for d in path.split(':') {
        let p = Path::new(d).join(prog);
        if p.is_file() {
            return Ok(p.to_string_lossy().into_owned());
        }
    }
    bail!("{prog} is not installed: run ./setup.sh")
}

/// Where test logs and configs go.
pub fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join("subway-tests");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// A binary of this workspace: `$SUBWAY_BIN_DIR/NAME`, else the newest of
/// target/{debug,release}/NAME. Build them first with `cargo build --bins`.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    if let Ok(d) = std::env::var("SUBWAY_BIN_DIR") {
        return Ok(PathBuf::from(d).join(name));
    }
    let cands = ["debug", "release"].map(|p| target_dir().join(p).join(name));
    cands
        .iter()
        .filter_map(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, p.clone()))
        })
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("{name} is not built: run `cargo build --bins` (./test.sh does)"))
}

/// A binary from one build profile ("debug" or "release"), for benchmarks
/// that must not measure a debug build by accident.
pub fn profile_bin(name: &str, profile: &str) -> Result<PathBuf> {
    let p = target_dir().join(profile).join(name);
    if !p.exists() {
        bail!("{} is not built: run `cargo build --{profile} --bins`", p.display());
    }
    Ok(p)
}

/// The seconds into the (UTC) day of a line that starts with an RFC 3339
/// time (`2026-12-02T16:14:18.337568`, as subway's log and `ip -ts
/// monitor` print it; a leading `[` is skipped).
pub fn log_time(line: &str) -> Option<f64> {
    let line = line.trim_start_matches('[');
    let t = line.get(11..26)?;
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let s: f64 = t.get(6..)?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Now, in seconds into the UTC day (to compare with [`log_time`]).
pub fn wall_time_of_day() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() % 86400) as f64 + d.subsec_nanos() as f64 * 1e-9
}
