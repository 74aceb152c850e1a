//! `cargo xtask bench --quick` end to end: every mode at every scale produced sane figures.
//! This checks the harness, never a speed.
use std::process::Command;

use serde_json::Value;

#[test]
fn quick_bench_measures_every_mode() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--quick", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "xtask bench --quick failed: {status}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let results = report["results"].as_array().unwrap();
    let modes = [
        "no-nat",
        "node-agent",
        "iptables-legacy",
        "iptables-nft",
        "nftables",
    ];
    for scale in [1, 100] {
        for mode in modes {
            let row = results
                .iter()
                .find(|r| r["services"] == scale && r["mode"] == mode)
                .unwrap_or_else(|| panic!("no result for {mode} at {scale}"));
            for figure in ["tcp_crr", "tcp_rr", "udp_rr"] {
                let f = &row[figure];
                let (p50, p99, rate) = (
                    f["p50"].as_f64().unwrap(),
                    f["p99"].as_f64().unwrap(),
                    f["rate"].as_f64().unwrap(),
                );
                assert!(
                    p50 > 0.0 && p99 >= p50 && rate > 0.0,
                    "{mode} {scale} {figure}: {f}"
                );
                assert_eq!(f["samples"], 200, "{mode} {scale} {figure}");
            }
            let programming = row["programming_p50_ms"].as_object().unwrap();
            let kinds: Vec<&str> = programming.keys().map(String::as_str).collect();
            let want: &[&str] = match mode {
                "no-nat" => &[],
                "node-agent" => &["manifest change"],
                _ => &["full sync", "partial sync"],
            };
            assert_eq!(kinds, want, "{mode} {scale}");
            assert!(
                programming.values().all(|v| v.as_f64().unwrap() > 0.0),
                "{mode} {scale}: {programming:?}"
            );
        }
    }
}
