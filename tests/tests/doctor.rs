//! `subway doctor` on the test namespaces' veths, as an operator runs it
//! on a gateway box with its config: exactly the findings a veth box has
//! (no zero-copy, one RX queue, the tunnel's MTU), each with its fix, and
//! with a multi-queue veth, a queue-to-core plan.

use anyhow::Result;
use subway_testkit::{Netns, TwoSites, require_root, work_dir, workspace_bin};

fn doctor(ns: &Netns, config: &std::path::Path) -> Result<(bool, serde_json::Value)> {
    let bin = workspace_bin("subway")?;
    let out = ns.output(&[
        bin.to_str().unwrap(),
        "doctor",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((out.status.success(), v))
}

#[test]
fn the_doctor_reports_a_veth_boxs_findings_and_plans_queues_and_cores() -> Result<()> {
    if !require_root("the_doctor_reports_a_veth_boxs_findings_and_plans_queues_and_cores") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let cfg = work_dir().join(format!("{}.conf", subway_testkit::unique("doc")));
    std::fs::write(&cfg, t.subway_config(true, false, ""))?;
    let (ok, v) = doctor(&t.gwa, &cfg)?;
    assert!(ok, "warnings only must exit 0: {v}");
    let findings: Vec<(String, String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["level"].as_str().unwrap_or("").to_string(),
                f["what"].as_str().unwrap_or("").to_string(),
                f["fix"].as_str().unwrap_or("").to_string(),
            )
        })
        // The clock is the machine's, not the namespace's.
        .filter(|f| !f.1.contains("clock"))
        .collect();
    let has = |level: &str, what: &str| findings.iter().filter(|f| f.0 == level && f.1.contains(what)).count();
    assert_eq!(has("info", "lan0: veth has no AF_XDP zero-copy"), 1, "{findings:#?}");
    assert_eq!(has("info", "wan0: veth has no AF_XDP zero-copy"), 1, "{findings:#?}");
    assert_eq!(has("warning", "lan0: one RX queue"), 1, "{findings:#?}");
    assert_eq!(has("warning", "wan0: one RX queue"), 1, "{findings:#?}");
    assert_eq!(has("info", "MTU 1500 + 80"), 1, "{findings:#?}");
    assert_eq!(findings.len(), 5, "exactly those: {findings:#?}");
    assert!(findings.iter().all(|f| !f.2.is_empty()), "every finding has a fix");
    assert_eq!(v["plan"]["queues"], serde_json::json!([0]), "{v}");

    // A LAN with 2 RX queues: both served, one worker per core.
    t.gwa
        .sh("ip link add lanq numrxqueues 2 numtxqueues 2 type veth peer name lanqp && ip link set lanq up")?;
    let cfg2 = work_dir().join(format!("{}.conf", subway_testkit::unique("doc")));
    std::fs::write(
        &cfg2,
        t.subway_config(true, false, "")
            .replace("Interface = lan0", "Interface = lanq"),
    )?;
    let (_, v) = doctor(&t.gwa, &cfg2)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    assert_eq!(v["plan"]["queues"].as_array().map(|a| a.len()), Some(cores), "{v}");
    assert_eq!(v["plan"]["cores"].as_array().map(|a| a.len()), Some(cores), "{v}");
    // Text mode names the [Tuning] to paste.
    let bin = workspace_bin("subway")?;
    let text = t
        .gwa
        .run(&[bin.to_str().unwrap(), "doctor", "--config", cfg2.to_str().unwrap()])?;
    assert!(text.contains("[Tuning]\nQueues = "), "{text}");
    Ok(())
}
