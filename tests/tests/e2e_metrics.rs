//! The real `node-agent` binary with `--metrics-bind` on a node namespace between a client and
//! two backends: traffic to a ClusterIP shows in that Service's counters on `GET /metrics`,
//! and syncs in kube-proxy's histograms (see node_agent_tests::topology for the addresses).
use std::{
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use node_agent_tests::{
    agent::{Agent, HEALTH_BIND, binary},
    client::{http_get, tcp_spread, udp_spread},
    manifest::{service, write},
    netns::Netns,
    topology::{Topology, web_slice},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), 80);
const BACKEND_PORT: u16 = 8080;
/// Not the default, so the flag is what puts the server there.
const METRICS_BIND: &str = "127.0.0.1:19249";

/// `GET path` on `addr` inside the node's namespace, as a scraper on the node would.
fn get(node: &Netns, addr: &str, path: &'static str) -> (u16, String) {
    let addr: SocketAddr = addr.parse().unwrap();
    node.run(move || http_get(addr, path))
        .unwrap()
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

fn scrape(node: &Netns) -> String {
    let (code, body) = get(node, METRICS_BIND, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "an OpenMetrics exposition:\n{body}"
    );
    body
}

/// The value of the one sample whose name and labels are `series`.
fn sample(body: &str, series: &str) -> u64 {
    let values: Vec<u64> = body
        .lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .collect();
    assert_eq!(values.len(), 1, "one sample of {series} in:\n{body}");
    values[0]
}

fn service_series(metric: &str, protocol: &str) -> String {
    format!(r#"{metric}{{namespace="default",service="web",port="80",protocol="{protocol}"}}"#)
}

#[test]
fn service_counters_grow_with_the_traffic_sent_and_syncs_are_observed() {
    let topology = Topology::new(2).unwrap();
    let _servers = topology.start_backends(BACKEND_PORT).unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let web = service("web", VIP, &[("http", 80, "TCP"), ("echo", 80, "UDP")]);
    write(manifests.path(), "web.yaml", &web).unwrap();
    write(
        manifests.path(),
        "web-slice.yaml",
        &web_slice(&[1, 2], BACKEND_PORT),
    )
    .unwrap();
    let mut agent = Agent::start(
        &binary(),
        &topology.node,
        manifests.path(),
        &topology.node_devices(),
        &["--metrics-bind", METRICS_BIND],
    )
    .unwrap();
    assert_eq!(get(&topology.node, HEALTH_BIND, "/livez").0, 200);

    let before = scrape(&topology.node);
    assert!(
        sample(&before, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1,
        "the first sync is observed:\n{before}"
    );
    assert!(sample(&before, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1);
    assert!(sample(&before, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1);
    let packets = |body: &str, protocol| {
        sample(
            body,
            &service_series("node_agent_service_packets_total", protocol),
        )
    };
    let bytes = |body: &str, protocol| {
        sample(
            body,
            &service_series("node_agent_service_bytes_total", protocol),
        )
    };

    // Each UDP flow is one "hello" datagram (IP + UDP headers + 5 bytes, the Ethernet header
    // aside); each TCP connection at least its SYN, the handshake's ACK and a FIN (40 bytes
    // of headers each).
    const FLOWS: usize = 40;
    let client = &topology.client;
    let udp = client.run(|| udp_spread(FRONTEND, FLOWS)).unwrap();
    assert_eq!(udp.values().sum::<usize>(), FLOWS, "{udp:?}");
    assert!(!udp.keys().any(|k| k.starts_with("error")), "{udp:?}");
    let tcp = client.run(|| tcp_spread(FRONTEND, FLOWS)).unwrap();
    assert!(!tcp.keys().any(|k| k.starts_with("error")), "{tcp:?}");

    let after = scrape(&topology.node);
    let grown = |count: &dyn Fn(&str) -> u64| count(&after) - count(&before);
    let flows = FLOWS as u64;
    let udp_packets = grown(&|b| packets(b, "UDP"));
    let udp_bytes = grown(&|b| bytes(b, "UDP"));
    assert!(
        udp_packets >= flows,
        "UDP packets grew by {udp_packets}:\n{after}"
    );
    assert!(
        udp_bytes >= flows * (20 + 8 + 5),
        "UDP bytes grew by {udp_bytes}:\n{after}"
    );
    let tcp_packets = grown(&|b| packets(b, "TCP"));
    let tcp_bytes = grown(&|b| bytes(b, "TCP"));
    assert!(
        tcp_packets >= 3 * flows,
        "TCP packets grew by {tcp_packets}:\n{after}"
    );
    assert!(
        tcp_bytes >= 3 * flows * 40,
        "TCP bytes grew by {tcp_bytes}:\n{after}"
    );

    // A manifest change is programmed: its latency observed, its EndpointSlice counted.
    let programmed =
        |body: &str| sample(body, "kubeproxy_network_programming_duration_seconds_count");
    let endpoint_changes =
        |body: &str| sample(body, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    write(
        manifests.path(),
        "web-slice.yaml",
        &web_slice(&[1], BACKEND_PORT),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let changed = loop {
        let body = scrape(&topology.node);
        if programmed(&body) > programmed(&after) || Instant::now() > deadline {
            break body;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(programmed(&changed) > programmed(&after), "{changed}");
    assert!(
        endpoint_changes(&changed) > endpoint_changes(&after),
        "{changed}"
    );
    assert!(
        sample(
            &changed,
            "kubeproxy_sync_proxy_rules_duration_seconds_count"
        ) > sample(&after, "kubeproxy_sync_proxy_rules_duration_seconds_count")
    );

    let status = agent.stop().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
}
