//! The README's first command after set-up, `control/dist/demo.sh`, as a
//! new user runs it: it must pass, show traffic both ways through the
//! tunnel and what `subway show` says, and leave nothing behind.

use anyhow::{Result, bail};
use subway_testkit::{require_root, workspace_bin};

#[test]
fn the_demo_shows_two_sites_talking_and_leaves_nothing_behind() -> Result<()> {
    if !require_root("the_demo_shows_two_sites_talking_and_leaves_nothing_behind") {
        return Ok(());
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/dist/demo.sh");
    let t0 = std::time::Instant::now();
    let child = std::process::Command::new(&script)
        .env("SUBWAY", workspace_bin("subway")?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("demo.sh failed ({}):\n{text}", out.status);
    }
    eprintln!("demo.sh ran in {:.1} s", t0.elapsed().as_secs_f64());
    for want in [
        "5 packets transmitted, 5 received",
        "== subway show",
        "fast path true",
        "redirect_route=",
        "demo: done",
    ] {
        assert!(text.contains(want), "the demo's output lacks {want:?}:\n{text}");
    }
    // Both pings went through: two "5 received" lines.
    assert_eq!(text.matches("5 packets transmitted, 5 received").count(), 2, "{text}");
    // Its namespaces are gone.
    let left = subway_testkit::host(&["ip", "netns", "list"])?;
    let prefix = format!("sd{pid}");
    assert!(!left.contains(&prefix), "the demo left namespaces behind:\n{left}");
    Ok(())
}
