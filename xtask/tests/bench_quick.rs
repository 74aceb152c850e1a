//! `cargo xtask bench --quick` end to end: every mode at every scale produced sane figures,
//! the plot was drawn, and the kubelet's pod starts were timed. This checks the harness,
//! never a speed.
use std::process::Command;

use serde_json::Value;

const MODES: [&str; 5] = [
    "no-nat",
    "node-agent",
    "iptables-legacy",
    "iptables-nft",
    "nftables",
];

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
    assert_eq!(report["skipped"], serde_json::json!([]));
    let results = report["results"].as_array().unwrap();
    for scale in [1, 100] {
        for mode in MODES {
            let row = results
                .iter()
                .find(|r| r["services"] == scale && r["mode"] == mode)
                .unwrap_or_else(|| panic!("no result for {mode} at {scale}"));
            check_row(row, mode, scale);
        }
    }
    let svg = std::fs::read_to_string(out.path().join("bench.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    for mode in MODES {
        assert!(svg.contains(mode), "{mode} missing from the plot's legend");
    }
    check_kubelet(&report["kubelet"]);
}

/// The CRI calls a pod start needs, in the order the raw run makes them.
const CRI_CALLS: [&str; 5] = [
    "ImageStatus",
    "RunPodSandbox",
    "PodSandboxStatus",
    "CreateContainer",
    "StartContainer",
];
const PHASES: [&str; 4] = [
    "written → pod added",
    "pod added → sandbox running",
    "sandbox running → container started",
    "container started → Ready in /pods",
];
/// --quick's pods one after another, and at once.
const ONE_BY_ONE: u64 = 3;
const AT_ONCE: u64 = 10;

/// The p50 and p90 of a figure in ms, checked: `samples` of them, ordered, positive and less
/// than the bench's longest timeout.
fn spread(figure: &Value, samples: u64, what: &str) -> (f64, f64) {
    let (p50, p90) = (
        figure["p50"].as_f64().unwrap(),
        figure["p90"].as_f64().unwrap(),
    );
    assert!(
        p50 > 0.0 && p90 >= p50 && p90 < 180_000.0,
        "{what}: {figure}"
    );
    assert_eq!(figure["samples"], samples, "{what}");
    (p50, p90)
}

/// Named steps, in order; each at least 0 and, pod by pod a part of the whole, a median no
/// larger than the whole's.
fn check_steps(steps: &Value, names: &[&str], samples: u64, whole_p50: f64, what: &str) {
    let steps = steps
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {steps}"));
    let got: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(got, names, "{what}");
    for step in steps {
        let ms = &step["ms"];
        let p50 = ms["p50"].as_f64().unwrap();
        assert!(
            p50 >= 0.0 && p50 <= whole_p50 && ms["p90"].as_f64().unwrap() >= p50,
            "{what}, {}: {ms} (whole p50 {whole_p50})",
            step["name"]
        );
        assert_eq!(ms["samples"], samples, "{what}, {}", step["name"]);
    }
}

fn check_kubelet(kubelet: &Value) {
    let raw = &kubelet["raw_cri"];
    assert_eq!(raw["pods"], ONE_BY_ONE, "raw CRI: {raw}");
    let (raw_p50, raw_p90) = spread(&raw["sum_ms"], ONE_BY_ONE, "raw CRI sum");
    check_steps(&raw["calls"], &CRI_CALLS, ONE_BY_ONE, raw_p50, "raw CRI");

    let start = &kubelet["pod_start"];
    assert_eq!(start["pods"], ONE_BY_ONE, "pod start: {start}");
    let (p50, p90) = spread(&start["ready_ms"], ONE_BY_ONE, "pod start");
    let ratio_p50 = start["ratio_p50"].as_f64().unwrap();
    assert!((ratio_p50 - p50 / raw_p50).abs() < 1e-9, "{start}");
    assert!((start["ratio_p90"].as_f64().unwrap() - p90 / raw_p90).abs() < 1e-9);
    assert_eq!(start["goal_ratio"], 1.25);
    assert_eq!(start["goal_met"], ratio_p50 <= 1.25);
    check_steps(&start["phases"], &PHASES, ONE_BY_ONE, p50, "pod start");

    let burst = &kubelet["pods_at_once"];
    assert_eq!(burst["pods"], AT_ONCE, "pods at once: {burst}");
    let (p50, _) = spread(&burst["ready_ms"], AT_ONCE, "pods at once");
    let (first, all) = (
        burst["first_ready_ms"].as_f64().unwrap(),
        burst["all_ready_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < first && first <= p50 && p50 <= all, "{burst}");
    assert_eq!(burst["goal_ms"], 15_000.0);
    assert_eq!(burst["goal_met"], all < 15_000.0);
    check_steps(&burst["phases"], &PHASES, AT_ONCE, all, "pods at once");
}

fn check_row(row: &Value, mode: &str, scale: u64) {
    let at = format!("{mode} at {scale}");
    for figure in ["tcp_crr", "tcp_rr", "udp_rr"] {
        let f = &row[figure];
        let (p50, p99, rate) = (
            f["p50"].as_f64().unwrap(),
            f["p99"].as_f64().unwrap(),
            f["rate"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50 && rate > 0.0, "{at} {figure}: {f}");
        // Two measured rounds of 100: the warm-up round is not counted.
        assert_eq!(f["samples"], 200, "{at} {figure}");
    }
    let programming = row["programming_p50_ms"].as_object().unwrap();
    let kinds: Vec<&str> = programming.keys().map(String::as_str).collect();
    let want: &[&str] = match mode {
        "no-nat" => &[],
        "node-agent" => &["manifest change"],
        _ => &["partial sync"],
    };
    assert_eq!(kinds, want, "{at}");
    assert!(
        programming.values().all(|v| v.as_f64().unwrap() > 0.0),
        "{at}: {programming:?}"
    );
    let full_sync = row["full_sync_ms"].as_f64();
    if mode == "no-nat" {
        assert_eq!(full_sync, None, "{at}");
        assert!(row["agent"].is_null(), "{at}");
        return;
    }
    // Sane: positive and under the agent's own 30 s start timeout.
    assert!(
        full_sync.is_some_and(|ms| ms > 0.0 && ms < 30_000.0),
        "{at}: full sync {full_sync:?}"
    );
    let agent = &row["agent"];
    if mode != "node-agent" {
        assert!(agent.is_null(), "{at}");
        return;
    }
    let logged = agent["logged_sync_ms"].as_f64().unwrap();
    assert!(
        logged > 0.0 && logged <= full_sync.unwrap(),
        "{at}: the agent's own sync ({logged} ms) is part of its startup ({full_sync:?} ms)"
    );
    for when in ["rss_after_sync", "rss_after_run"] {
        let (rss, hwm) = (
            agent[when]["vm_rss_kb"].as_u64().unwrap(),
            agent[when]["vm_hwm_kb"].as_u64().unwrap(),
        );
        assert!(rss > 1000 && hwm >= rss, "{at} {when}: {}", agent[when]);
    }
    let maps = agent["map_memlock_bytes"].as_object().unwrap();
    assert!(maps.len() >= 5, "{at}: {maps:?}");
    // An empty LPM trie (SOURCE_RANGES) is charged nothing: only the total must be positive.
    let total: u64 = maps.values().map(|b| b.as_u64().unwrap()).sum();
    assert!(total > 0, "{at}: {maps:?}");
    assert_eq!(agent["map_memlock_total_bytes"], total, "{at}");
    let packets = agent["packet_cost_ns"].as_object().unwrap();
    let kinds: Vec<&str> = packets.keys().map(String::as_str).collect();
    assert_eq!(kinds, ["established", "new flow", "unrelated"], "{at}");
    for (kind, p) in packets {
        let (p50, p99) = (p["p50"].as_f64().unwrap(), p["p99"].as_f64().unwrap());
        // Nanoseconds of one program run: more than nothing, far less than a millisecond.
        assert!(p50 > 0.0 && p99 >= p50 && p50 < 1e6, "{at} {kind}: {p}");
        assert_eq!(p["samples"], 500, "{at} {kind}");
    }
}
