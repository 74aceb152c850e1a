//! The real `node-agent` binary on a node namespace between a client and three backends, with
//! real TCP and UDP sockets (see node_agent_tests::topology for the addresses).
use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::Duration,
};

use node_agent_tests::{
    agent::{Agent, binary, run_to_exit},
    backend::BackendServer,
    client::{Connection, tcp_spread, udp_spread},
    manifest::{service, write},
    topology::{Topology, backend_ip, web_slice},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const FRONTEND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), 80);
const BACKEND_PORT: u16 = 8080;
/// The bound for a manifest change to reach the datapath.
const PROGRAMMING_BOUND: Duration = Duration::from_secs(1);

/// Fields drop in order: the agent stops before the namespaces go.
struct Node {
    agent: Agent,
    servers: Vec<BackendServer>,
    manifests: tempfile::TempDir,
    topology: Topology,
}

fn start() -> Node {
    let topology = Topology::new(3).unwrap();
    let servers = topology.start_backends(BACKEND_PORT).unwrap();
    let manifests = tempfile::tempdir().unwrap();
    write(
        manifests.path(),
        "web.yaml",
        &service("web", VIP, &[("http", 80, "TCP"), ("echo", 80, "UDP")]),
    )
    .unwrap();
    write(
        manifests.path(),
        "web-slice.yaml",
        &web_slice(&[1, 2, 3], BACKEND_PORT),
    )
    .unwrap();
    let agent = Agent::start(
        &binary(),
        &topology.node,
        manifests.path(),
        &topology.node_devices(),
        &[],
    )
    .unwrap();
    Node {
        agent,
        servers,
        manifests,
        topology,
    }
}

/// Every one of `total` flows reached one of `backends`.
fn assert_all_reach(what: &str, counts: &BTreeMap<String, usize>, total: usize, backends: &[&str]) {
    let ok: usize = backends
        .iter()
        .map(|b| counts.get(*b).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        ok, total,
        "{what}: every flow must reach one of {backends:?}: {counts:?}"
    );
}

/// ... and each backend got at least 15% of them (with 100+ flows, a fair random choice misses
/// that by more than 6 standard deviations).
fn assert_spread(what: &str, counts: &BTreeMap<String, usize>, total: usize, backends: &[&str]) {
    assert_all_reach(what, counts, total, backends);
    for b in backends {
        let share = counts.get(*b).copied().unwrap_or(0) as f64 / total as f64;
        assert!(
            share >= 0.15,
            "{what}: {b} got {:.0}% of the flows: {counts:?}",
            share * 100.0
        );
    }
}

#[test]
fn tcp_and_udp_to_a_clusterip_spread_over_every_backend() {
    let mut node = start();
    let all = ["backend-1", "backend-2", "backend-3"];
    let tcp = node
        .topology
        .client
        .run(|| tcp_spread(FRONTEND, 300))
        .unwrap();
    assert_spread("TCP", &tcp, 300, &all);
    let udp = node
        .topology
        .client
        .run(|| udp_spread(FRONTEND, 300))
        .unwrap();
    assert_spread("UDP", &udp, 300, &all);

    let list = node.agent.lb_list().unwrap();
    for line in ["198.19.0.10:80/TCP", "198.19.0.10:80/UDP"] {
        let row = list
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in:\n{list}"));
        for i in 1..=3 {
            assert!(
                row.contains(&format!("{}:{BACKEND_PORT}", backend_ip(i))),
                "{row}"
            );
        }
    }

    let status = node.agent.stop().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    assert!(
        !node.agent.bpffs().exists(),
        "pins left at {}",
        node.agent.bpffs().display()
    );
}

#[test]
fn removing_an_endpoint_moves_new_flows_within_a_second_and_keeps_established_ones() {
    let node = start();
    // A long-lived connection on a backend that stays.
    let mut long_lived = node
        .topology
        .client
        .run(|| {
            loop {
                let conn = Connection::open(FRONTEND).unwrap();
                if conn.answer.backend != "backend-3" {
                    break conn;
                }
            }
        })
        .unwrap();
    let removed_before = node.servers[2].tcp_accepted();

    write(
        node.manifests.path(),
        "web-slice.yaml",
        &web_slice(&[1, 2], BACKEND_PORT),
    )
    .unwrap();
    thread::sleep(PROGRAMMING_BOUND);

    let tcp = node
        .topology
        .client
        .run(|| tcp_spread(FRONTEND, 100))
        .unwrap();
    assert_spread("TCP after removal", &tcp, 100, &["backend-1", "backend-2"]);
    assert_eq!(
        node.servers[2].tcp_accepted(),
        removed_before,
        "backend-3 still accepted connections"
    );
    let udp = node
        .topology
        .client
        .run(|| udp_spread(FRONTEND, 100))
        .unwrap();
    assert_spread("UDP after removal", &udp, 100, &["backend-1", "backend-2"]);
    assert_eq!(long_lived.echo("still there?").unwrap(), "still there?");
}

#[test]
fn deleting_the_service_stops_all_traffic_to_its_clusterip() {
    let node = start();
    assert_eq!(
        node.topology
            .client
            .run(|| tcp_spread(FRONTEND, 10))
            .unwrap()
            .values()
            .sum::<usize>(),
        10
    );
    let accepted = |n: &Node| {
        n.servers
            .iter()
            .map(BackendServer::tcp_accepted)
            .sum::<usize>()
    };
    let before = accepted(&node);

    fs::remove_file(node.manifests.path().join("web.yaml")).unwrap();
    thread::sleep(PROGRAMMING_BOUND);

    // Unanswered attempts wait out their timeout (the node rate-limits its ICMP errors): keep few.
    let tcp = node
        .topology
        .client
        .run(|| tcp_spread(FRONTEND, 5))
        .unwrap();
    assert!(
        tcp.keys().all(|k| k.starts_with("error")),
        "connections still answered: {tcp:?}"
    );
    let udp = node
        .topology
        .client
        .run(|| udp_spread(FRONTEND, 5))
        .unwrap();
    assert!(
        udp.keys().all(|k| k.starts_with("error")),
        "datagrams still answered: {udp:?}"
    );
    assert_eq!(
        accepted(&node),
        before,
        "a backend accepted a connection to the deleted Service"
    );
    assert!(!node.agent.lb_list().unwrap().contains("198.19.0.10"));
}

#[test]
fn a_malformed_manifest_is_reported_and_everything_else_keeps_working() {
    let mut node = start();
    let dir = node.manifests.path();
    write(
        dir,
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
    )
    .unwrap();
    write(
        dir,
        "bad-port.yaml",
        &service(
            "bad-port",
            Ipv4Addr::new(198, 19, 0, 11),
            &[("http", 0, "TCP")],
        ),
    )
    .unwrap();

    let wait = Duration::from_secs(5);
    let logs = || node.agent.logs().join("\n");
    assert!(
        node.agent
            .wait_for_log(&["broken.yaml", "invalid YAML"], wait)
            .is_some(),
        "{}",
        logs()
    );
    assert!(
        node.agent
            .wait_for_log(
                &[
                    "Service default/bad-port",
                    "spec.ports[0].port",
                    "0 is not in 1-65535"
                ],
                wait
            )
            .is_some(),
        "{}",
        logs()
    );
    assert!(node.agent.is_running());
    let tcp = node
        .topology
        .client
        .run(|| tcp_spread(FRONTEND, 30))
        .unwrap();
    assert_all_reach(
        "TCP with a malformed neighbour",
        &tcp,
        30,
        &["backend-1", "backend-2", "backend-3"],
    );
}

#[test]
fn a_missing_device_fails_the_start_clearly_and_leaves_no_pins() {
    let topology = Topology::new(0).unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let bpffs = Path::new("/sys/fs/bpf").join(node_agent_tests::unique("pins"));
    let dir = manifests.path().to_str().unwrap();
    let args = [
        "run",
        "--manifests",
        dir,
        "--devices",
        "nc,nosuch0",
        "--health-bind",
        "127.0.0.1:10256",
        "--bpffs",
    ];
    let out = run_to_exit(
        &binary(),
        &topology.node,
        &[&args[..], &[bpffs.to_str().unwrap()]].concat(),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("nosuch0"),
        "the error names the device: {stderr}"
    );
    assert!(!bpffs.exists(), "pins left at {}", bpffs.display());
}
