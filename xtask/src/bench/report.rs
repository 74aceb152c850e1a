//! One result row per mode and scale: report.json's content and the summary table.
use std::collections::BTreeMap;

use super::{
    footprint::Rss,
    stats::{Percentiles, Summary},
};

#[derive(serde::Serialize)]
pub struct Row {
    pub services: usize,
    pub mode: &'static str,
    pub tcp_crr: Summary,
    pub tcp_rr: Summary,
    pub udp_rr: Summary,
    /// Programming latency p50 by kind, ms.
    pub programming_p50_ms: BTreeMap<&'static str, f64>,
    /// Until every Service is in the datapath: node-agent from its spawn until /healthz
    /// answered 200, kube-proxy's modes the cold-start restore. None for the no-NAT floor.
    pub full_sync_ms: Option<f64>,
    pub agent: Option<AgentFigures>,
}

/// node-agent's own figures.
#[derive(serde::Serialize)]
pub struct AgentFigures {
    /// The `elapsed_us` its first "synced" log line reported, ms.
    pub logged_sync_ms: f64,
    pub rss_after_sync: Rss,
    pub rss_after_run: Rss,
    /// Kernel memory (memlock) per pinned map, bytes.
    pub map_memlock_bytes: BTreeMap<String, u64>,
    pub map_memlock_total_bytes: u64,
    /// tc_ingress's run time per packet through BPF_PROG_TEST_RUN, ns, by kind of packet.
    pub packet_cost_ns: BTreeMap<&'static str, Percentiles>,
}

/// The kinds of packet timed through BPF_PROG_TEST_RUN, as the table shows them.
pub const PACKETS: [&str; 3] = ["established", "new flow", "unrelated"];

pub const HEADER: &str = "services  mode              CRR p50  CRR p99   conn/s   RR p50  UDP p50 | full sync  prog p50 |  RSS/HWM MiB  maps MiB | pkt ns est/new/other (p50)";
pub const UNITS: &str = "                                µs       µs                µs       µs |        ms        ms |";

pub fn table_row(row: &Row) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mib = |kb: u64| kb as f64 / 1024.0;
    let programming = row.programming_p50_ms.values().next().copied();
    let agent = row.agent.as_ref().map_or_else(
        || format!("{:>12} {:>9} | -", "-", "-"),
        |a| {
            let packets: Vec<String> = PACKETS
                .iter()
                .map(|k| {
                    a.packet_cost_ns
                        .get(k)
                        .map_or("-".into(), |p| format!("{:.0}", p.p50))
                })
                .collect();
            format!(
                "{:>12} {:>9.1} | {}",
                format!(
                    "{:.1}/{:.1}",
                    mib(a.rss_after_run.vm_rss_kb),
                    mib(a.rss_after_run.vm_hwm_kb)
                ),
                a.map_memlock_total_bytes as f64 / (1 << 20) as f64,
                packets.join("/")
            )
        },
    );
    format!(
        "{:>8}  {:<16} {:>8.1} {:>8.1} {:>8.0} {:>8.1} {:>8.1} | {:>9} {:>9} | {agent}",
        row.services,
        row.mode,
        row.tcp_crr.p50,
        row.tcp_crr.p99,
        row.tcp_crr.rate,
        row.tcp_rr.p50,
        row.udp_rr.p50,
        ms(row.full_sync_ms),
        ms(programming),
    )
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A row with every figure, for the tests of what reads rows.
    pub fn row(services: usize, mode: &'static str, crr_p50: f64) -> Row {
        let s = |p50: f64| Summary {
            p50,
            p99: p50 * 2.0,
            rate: 1e6 / p50,
            samples: 10,
        };
        let rss = Rss {
            vm_rss_kb: 2048,
            vm_hwm_kb: 4096,
        };
        let p = |p50| Percentiles {
            p50,
            p99: p50,
            samples: 10,
        };
        Row {
            services,
            mode,
            tcp_crr: s(crr_p50),
            tcp_rr: s(20.0),
            udp_rr: s(30.0),
            programming_p50_ms: [("manifest change", 12.5)].into(),
            full_sync_ms: Some(80.25),
            agent: Some(AgentFigures {
                logged_sync_ms: 60.0,
                rss_after_sync: rss,
                rss_after_run: rss,
                map_memlock_bytes: [("SERVICES".to_owned(), 3 << 20)].into(),
                map_memlock_total_bytes: 3 << 20,
                packet_cost_ns: [
                    ("established", p(41.0)),
                    ("new flow", p(300.0)),
                    ("unrelated", p(9.0)),
                ]
                .into(),
            }),
        }
    }

    #[test]
    fn table_rows_show_every_figure_or_a_dash() {
        let full = table_row(&row(1000, "node-agent", 180.0));
        for want in [
            "1000",
            "node-agent",
            "180.0",
            "360.0",
            "5556",
            "80.2",
            "12.5",
            "2.0/4.0",
            "3.0",
            "41/300/9",
        ] {
            assert!(full.contains(want), "{want} missing from {full}");
        }
        let mut floor = row(1, "no-nat", 170.0);
        floor.agent = None;
        floor.full_sync_ms = None;
        floor.programming_p50_ms.clear();
        let floor = table_row(&floor);
        assert!(floor.ends_with("|            -         - | -"), "{floor}");
        assert_eq!(floor.matches(" - ").count() + 1, 5, "{floor}");
        assert_eq!(full.find('|'), floor.find('|'), "columns line up");
    }
}
