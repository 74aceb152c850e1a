//! kube-proxy's packet-flow scenarios (pkg/proxy/iptables/proxier_test.go, runPacketFlowTests)
//! as golden packets through BPF_PROG_TEST_RUN: the same Services and endpoints, the same node
//! addressing, and a row per scenario with kube-proxy's name, source, destination, expected
//! endpoints (or DROP / REJECT) and masquerade.
mod golden;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use golden::{Fixture, L4, Packet, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, read};
use node_agent::model::Node;
use node_agent_tests::manifest::yaml;
use node_common::{Cidr, Config};
use serde_json::{Value, json};

// kube-proxy's test constants.
const TEST_HOSTNAME: &str = "test-hostname";
const TEST_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const TEST_NODE_IP_ALT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
const TEST_EXTERNAL_CLIENT: &str = "203.0.113.2";
const TEST_EXTERNAL_CLIENT_BLOCKED: &str = "203.0.113.130";
/// kube-proxy's tests detect local (pod) traffic by this cluster CIDR.
const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 0), 8);
const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 30, 0, 0), 16);

/// One scenario: kube-proxy's packetFlowTest.
struct Flow {
    name: &'static str,
    source: &'static str,
    dest: &'static str,
    port: u16,
    proto: L4,
    /// "ip:port, ip:port" (any of them, and each reachable), "DROP", "REJECT", or "" (untouched).
    output: &'static str,
    masq: bool,
}

/// What the datapath did with a packet.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    To { endpoint: SocketAddrV4, masq: bool },
    Drop,
    Reject,
    Untouched,
}

const ALL_NODE_IPS: &[Ipv4Addr] = &[TEST_NODE_IP, TEST_NODE_IP_ALT];

/// The kube-proxy tests' node, serving NodePorts on `nodeport_ips`; `local_detector`: pod
/// traffic is told apart by the cluster CIDR (kube-proxy's LocalTrafficDetector).
fn node_fixture(manifests: Vec<Value>, nodeport_ips: &[Ipv4Addr], local_detector: bool) -> Fixture {
    let files: Vec<(String, String)> = manifests
        .into_iter()
        .enumerate()
        .map(|(i, m)| (format!("{i:02}.yaml"), yaml(m)))
        .collect();
    let files: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let node = Node {
        name: TEST_HOSTNAME.into(),
        ips: ALL_NODE_IPS.to_vec(),
        nodeport_ips: nodeport_ips.to_vec(),
    };
    let config = Config {
        snat_address: u32::from_ne_bytes(TEST_NODE_IP.octets()),
        cluster_cidr: if local_detector {
            Cidr::new(CLUSTER_CIDR.0, CLUSTER_CIDR.1)
        } else {
            Cidr::default()
        },
        service_cidr: Cidr::new(SERVICE_CIDR.0, SERVICE_CIDR.1),
    };
    Fixture::for_node(&files, &node, &config)
}

/// Sends `tries` new TCP flows of `flow` and returns the distinct outcomes.
fn outcomes(fixture: &mut Fixture, flow: &Flow, first_port: u16, tries: u16) -> BTreeSet<Outcome> {
    let source: Ipv4Addr = flow.source.parse().unwrap();
    let dest: Ipv4Addr = flow.dest.parse().unwrap();
    (0..tries)
        .map(|i| {
            let packet = Packet::new(
                flow.proto,
                SocketAddrV4::new(source, first_port + i),
                SocketAddrV4::new(dest, flow.port),
            );
            let input = packet.frame();
            let (action, output) = fixture.run(&input);
            match action {
                TC_ACT_SHOT => Outcome::Drop,
                TC_ACT_REDIRECT => {
                    assert_eq!(
                        output,
                        packet.port_unreachable(),
                        "{}: a REJECT is an ICMP port unreachable",
                        flow.name
                    );
                    Outcome::Reject
                }
                TC_ACT_OK if output == input => Outcome::Untouched,
                TC_ACT_OK => {
                    let seen = read(&output);
                    // Masquerading takes a new source port (32768-60999; flows here
                    // start at 10000), so it shows even when the client is the node.
                    let masq = seen.src != packet.src;
                    assert!(
                        !masq || *seen.src.ip() == TEST_NODE_IP,
                        "{}: source rewritten to {}",
                        flow.name,
                        seen.src
                    );
                    Outcome::To {
                        endpoint: seen.dst,
                        masq,
                    }
                }
                other => panic!("{}: TC action {other}", flow.name),
            }
        })
        .collect()
}

fn expected(flow: &Flow) -> BTreeSet<Outcome> {
    match flow.output {
        "DROP" => BTreeSet::from([Outcome::Drop]),
        "REJECT" => BTreeSet::from([Outcome::Reject]),
        "" => BTreeSet::from([Outcome::Untouched]),
        endpoints => endpoints
            .split(", ")
            .map(|e| Outcome::To {
                endpoint: e.parse().unwrap(),
                masq: flow.masq,
            })
            .collect(),
    }
}

/// Runs every flow against one fixture and reports all mismatches at once.
fn run_packet_flow_tests(test: &str, fixture: &mut Fixture, flows: &[Flow]) {
    let mut failures = Vec::new();
    for (i, flow) in flows.iter().enumerate() {
        let want = expected(flow);
        // Enough new flows that every one of several endpoints shows up (miss odds < 1e-8).
        let tries = if want.len() > 1 { 40 } else { 3 };
        let got = outcomes(fixture, flow, 10_000 + 100 * i as u16, tries);
        if got != want {
            failures.push(format!(
                "{test} / {}: got {got:?}, want {want:?}",
                flow.name
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

// Object builders, shaped like the kube-proxy tests' makeTestService / makeTestEndpointSlice.

fn service(ns: &str, name: &str, spec: Value, status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec, "status": status})
}

/// An EndpointSlice of `svc` with TCP `ports` (name, port) and `endpoints` as JSON objects.
fn slice(ns: &str, svc: &str, ports: &[(&str, u16)], endpoints: Vec<Value>) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    slice_with(ns, svc, Value::from(ports), endpoints)
}

fn slice_with(ns: &str, svc: &str, ports: Value, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn ep(ip: &str) -> Value {
    json!({"addresses": [ip]})
}

fn ep_node(ip: &str, node: &str) -> Value {
    json!({"addresses": [ip], "nodeName": node})
}

fn ep_on(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

const SVC_IP: &str = "172.30.0.41";
const LB_IP1: &str = "1.2.3.4";
const LB_IP2: &str = "5.6.7.8";
const EXTERNAL_IP: &str = "192.168.99.11";

/// A kube-proxy test Service; `spec` is merged over a ClusterIP of `cluster_ip`.
fn svc(ns: &str, name: &str, cluster_ip: &str, ports: Value, spec: Value, status: Value) -> Value {
    let mut s = json!({"clusterIP": cluster_ip, "ports": ports});
    for (k, v) in spec.as_object().unwrap() {
        s[k] = v.clone();
    }
    service(ns, name, s, status)
}

fn tcp(
    source: &'static str,
    dest: &'static str,
    port: u16,
    output: &'static str,
    masq: bool,
    name: &'static str,
) -> Flow {
    Flow {
        name,
        source,
        dest,
        port,
        proto: L4::Syn,
        output,
        masq,
    }
}

#[test]
fn cluster_ip_general() {
    let mut f = node_fixture(
        vec![
            svc(
                "ns1",
                "svc1",
                "172.30.0.41",
                json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
                json!({}),
                json!(null),
            ),
            svc(
                "ns2",
                "svc2",
                "172.30.0.42",
                json!([
                    {"name": "http", "port": 80, "protocol": "TCP"},
                    {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443},
                    {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
                    {"name": "dns-sctp", "port": 53, "protocol": "SCTP"}]),
                json!({}),
                json!(null),
            ),
            slice_with(
                "ns1",
                "svc1",
                json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
                vec![ep_node("10.180.0.1", TEST_HOSTNAME)],
            ),
            slice_with(
                "ns2",
                "svc2",
                json!([
                    {"name": "http", "port": 80, "protocol": "TCP"},
                    {"name": "https", "port": 8443, "protocol": "TCP"},
                    {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                    {"name": "dns-sctp", "port": 53, "protocol": "SCTP"}]),
                vec![
                    ep_node("10.180.0.1", TEST_HOSTNAME),
                    ep_node("10.180.2.1", "node2"),
                ],
            ),
        ],
        ALL_NODE_IPS,
        true,
    );
    let flows = [
        tcp(
            "10.180.0.2",
            "172.30.0.41",
            80,
            "10.180.0.1:80",
            false,
            "simple clusterIP",
        ),
        tcp(
            "10.180.0.1",
            "172.30.0.41",
            80,
            "10.180.0.1:80",
            true,
            "hairpin to cluster IP",
        ),
        tcp(
            "10.180.0.2",
            "172.30.0.42",
            80,
            "10.180.0.1:80, 10.180.2.1:80",
            false,
            "clusterIP with multiple endpoints",
        ),
        tcp(
            "10.180.0.2",
            "172.30.0.42",
            443,
            "10.180.0.1:8443, 10.180.2.1:8443",
            false,
            "clusterIP with TargetPort",
        ),
        tcp(
            "10.180.0.2",
            "172.30.0.42",
            53,
            "10.180.0.1:5353, 10.180.2.1:5353",
            false,
            "clusterIP with TCP, UDP, and SCTP on same port (TCP)",
        ),
        Flow {
            proto: L4::Udp,
            ..tcp(
                "10.180.0.2",
                "172.30.0.42",
                53,
                "10.180.0.1:53, 10.180.2.1:53",
                false,
                "clusterIP with TCP, UDP, and SCTP on same port (UDP)",
            )
        },
        Flow {
            proto: L4::Sctp,
            ..tcp(
                "10.180.0.2",
                "172.30.0.42",
                53,
                "10.180.0.1:53, 10.180.2.1:53",
                false,
                "clusterIP with TCP, UDP, and SCTP on same port (SCTP)",
            )
        },
        // Where kube-proxy's modes differ, its nftables mode: unserved ports of a ClusterIP
        // reject, unallocated addresses of the service range drop (iptables mode leaves both).
        Flow {
            proto: L4::Udp,
            ..tcp(
                "10.180.0.2",
                "172.30.0.42",
                80,
                "REJECT",
                false,
                "TCP-only port does not match UDP traffic",
            )
        },
        tcp(
            "10.180.0.2",
            "172.30.0.41",
            443,
            "REJECT",
            false,
            "svc1 does not accept svc2's ports",
        ),
        tcp(
            "10.180.0.2",
            "172.30.0.50",
            80,
            "DROP",
            false,
            "packet to unallocated cluster ip",
        ),
    ];
    run_packet_flow_tests("TestClusterIPGeneral", &mut f, &flows);
}

#[test]
fn load_balancer() {
    let mut f = node_fixture(
        vec![
            svc(
                "ns1",
                "svc1",
                SVC_IP,
                json!([{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]),
                json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["192.168.0.0/24", " 203.0.113.0/25"]}),
                json!({"loadBalancer": {"ingress": [{"ip": LB_IP1}, {"ip": LB_IP2}]}}),
            ),
            slice("ns1", "svc1", &[("p80", 80)], vec![ep("10.180.0.1")]),
        ],
        ALL_NODE_IPS,
        true,
    );
    let node = "192.168.0.2";
    let flows = [
        tcp(
            "10.0.0.2",
            SVC_IP,
            80,
            "10.180.0.1:80",
            false,
            "pod to cluster IP",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            node,
            3001,
            "10.180.0.1:80",
            true,
            "external to nodePort",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT_BLOCKED,
            node,
            3001,
            "10.180.0.1:80",
            true,
            "nodePort bypasses LoadBalancerSourceRanges",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            LB_IP1,
            80,
            "10.180.0.1:80",
            true,
            "accepted external to LB1",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            LB_IP2,
            80,
            "10.180.0.1:80",
            true,
            "accepted external to LB2",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT_BLOCKED,
            LB_IP1,
            80,
            "DROP",
            false,
            "blocked external to LB1",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT_BLOCKED,
            LB_IP2,
            80,
            "DROP",
            false,
            "blocked external to LB2",
        ),
        tcp(
            "10.0.0.2",
            LB_IP1,
            80,
            "DROP",
            false,
            "pod to LB1 (blocked by LoadBalancerSourceRanges)",
        ),
        tcp(
            "10.0.0.2",
            LB_IP2,
            80,
            "DROP",
            false,
            "pod to LB2 (blocked by LoadBalancerSourceRanges)",
        ),
        tcp(
            node,
            LB_IP1,
            80,
            "10.180.0.1:80",
            true,
            "node to LB1 (allowed by LoadBalancerSourceRanges)",
        ),
        tcp(
            node,
            LB_IP2,
            80,
            "10.180.0.1:80",
            true,
            "node to LB2 (allowed by LoadBalancerSourceRanges)",
        ),
        tcp(
            LB_IP1,
            LB_IP1,
            80,
            "10.180.0.1:80",
            true,
            "same node to LB1, SNATted to LB1 (implicitly allowed)",
        ),
        tcp(
            LB_IP2,
            LB_IP2,
            80,
            "10.180.0.1:80",
            true,
            "same node to LB2, SNATted to LB2 (implicitly allowed)",
        ),
    ];
    run_packet_flow_tests("TestLoadBalancer", &mut f, &flows);
}

/// TestNodePorts' IPv4 cases. Its localhost rows are not ported: NodePorts on 127.0.0.1
/// (--localhost-nodeports) are not supported.
#[test]
fn node_ports() {
    let manifests = || {
        vec![
            svc(
                "ns1",
                "svc1",
                SVC_IP,
                json!([{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]),
                json!({"type": "NodePort"}),
                json!(null),
            ),
            slice(
                "ns1",
                "svc1",
                &[("p80", 80)],
                vec![ep("10.180.0.1"), ep_node("10.180.2.1", TEST_HOSTNAME)],
            ),
        ]
    };
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let node = "192.168.0.2";
    let basic = [
        tcp("10.0.0.2", SVC_IP, 80, both, false, "pod to cluster IP"),
        tcp(
            TEST_EXTERNAL_CLIENT,
            node,
            3001,
            both,
            true,
            "external to nodePort",
        ),
        tcp(node, node, 3001, both, true, "node to nodePort"),
    ];
    // nodePortAddresses nil: every node IP serves NodePorts.
    let mut f = node_fixture(manifests(), ALL_NODE_IPS, true);
    run_packet_flow_tests("TestNodePorts/ipv4", &mut f, &basic);
    run_packet_flow_tests(
        "TestNodePorts/ipv4",
        &mut f,
        &[tcp(
            TEST_EXTERNAL_CLIENT,
            "192.168.1.2",
            3001,
            both,
            true,
            "external to nodePort on secondary IP",
        )],
    );
    // nodePortAddresses 192.168.0.0/24: the secondary node IP does not.
    let mut f = node_fixture(manifests(), &[TEST_NODE_IP], true);
    run_packet_flow_tests(
        "TestNodePorts/ipv4, localhost in nodeport-addresses",
        &mut f,
        &basic,
    );
    run_packet_flow_tests(
        "TestNodePorts/ipv4, localhost in nodeport-addresses",
        &mut f,
        &[tcp(
            TEST_EXTERNAL_CLIENT,
            "192.168.1.2",
            3001,
            "",
            false,
            "secondary nodeIP ignores NodePorts",
        )],
    );
}

fn traffic_policy_service(policy: &str) -> Vec<Value> {
    vec![
        svc(
            "ns1",
            "svc1",
            SVC_IP,
            json!([{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001, "targetPort": 80}]),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": policy, "externalIPs": [EXTERNAL_IP], "healthCheckNodePort": 30000}),
            json!({"loadBalancer": {"ingress": [{"ip": LB_IP1}]}}),
        ),
        slice(
            "ns1",
            "svc1",
            &[("p80", 80)],
            vec![ep("10.180.0.1"), ep_node("10.180.2.1", TEST_HOSTNAME)],
        ),
    ]
}

#[test]
fn external_traffic_policy_local() {
    let mut f = node_fixture(traffic_policy_service("Local"), ALL_NODE_IPS, true);
    let (both, local, node) = (
        "10.180.0.1:80, 10.180.2.1:80",
        "10.180.2.1:80",
        "192.168.0.2",
    );
    let flows = [
        tcp(
            "10.0.0.2",
            SVC_IP,
            80,
            both,
            false,
            "pod to cluster IP hits both endpoints, unmasqueraded",
        ),
        tcp(
            "10.0.0.2",
            EXTERNAL_IP,
            80,
            both,
            false,
            "pod to external IP hits both endpoints, unmasqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            EXTERNAL_IP,
            80,
            local,
            false,
            "external to external IP hits only local endpoint, unmasqueraded",
        ),
        tcp(
            "10.0.0.2",
            LB_IP1,
            80,
            both,
            false,
            "pod to LB IP hits only both endpoints, unmasqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            LB_IP1,
            80,
            local,
            false,
            "external to LB IP hits only local endpoint, unmasqueraded",
        ),
        tcp(
            "10.0.0.2",
            node,
            3001,
            both,
            false,
            "pod to NodePort hits both endpoints, unmasqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            node,
            3001,
            local,
            false,
            "external to NodePort hits only local endpoint, unmasqueraded",
        ),
    ];
    run_packet_flow_tests("TestExternalTrafficPolicyLocal", &mut f, &flows);
}

#[test]
fn external_traffic_policy_cluster() {
    let mut f = node_fixture(traffic_policy_service("Cluster"), ALL_NODE_IPS, true);
    let (both, node) = ("10.180.0.1:80, 10.180.2.1:80", "192.168.0.2");
    let flows = [
        tcp(
            "10.0.0.2",
            SVC_IP,
            80,
            both,
            false,
            "pod to cluster IP hits both endpoints, unmasqueraded",
        ),
        tcp(
            "10.0.0.2",
            EXTERNAL_IP,
            80,
            both,
            true,
            "pod to external IP hits both endpoints, masqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            EXTERNAL_IP,
            80,
            both,
            true,
            "external to external IP hits both endpoints, masqueraded",
        ),
        tcp(
            "10.0.0.2",
            LB_IP1,
            80,
            both,
            true,
            "pod to LB IP hits both endpoints, masqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            LB_IP1,
            80,
            both,
            true,
            "external to LB IP hits both endpoints, masqueraded",
        ),
        tcp(
            "10.0.0.2",
            node,
            3001,
            both,
            true,
            "pod to NodePort hits both endpoints, masqueraded",
        ),
        tcp(
            TEST_EXTERNAL_CLIENT,
            node,
            3001,
            both,
            true,
            "external to NodePort hits both endpoints, masqueraded",
        ),
    ];
    run_packet_flow_tests("TestExternalTrafficPolicyCluster", &mut f, &flows);
}

#[test]
fn internal_traffic_policy() {
    let service = |policy: &str| {
        svc(
            "ns1",
            "svc1",
            "172.30.1.1",
            json!([{"name": "", "port": 80, "protocol": "TCP"}]),
            json!({"internalTrafficPolicy": policy}),
            json!(null),
        )
    };
    /// (case, policy, endpoints as (ip, nodeName), flow)
    type Case = (
        &'static str,
        &'static str,
        [(&'static str, &'static str); 3],
        Flow,
    );
    let cases: [Case; 4] = [
        (
            "internalTrafficPolicy is cluster",
            "Cluster",
            [
                ("10.0.1.1", TEST_HOSTNAME),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "10.0.0.2",
                "172.30.1.1",
                80,
                "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80",
                false,
                "pod to ClusterIP hits all endpoints",
            ),
        ),
        (
            "internalTrafficPolicy is local and there is one local endpoint",
            "Local",
            [
                ("10.0.1.1", TEST_HOSTNAME),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "10.0.0.2",
                "172.30.1.1",
                80,
                "10.0.1.1:80",
                false,
                "pod to ClusterIP hits only local endpoint",
            ),
        ),
        (
            "internalTrafficPolicy is local and there are multiple local endpoints",
            "Local",
            [
                ("10.0.1.1", TEST_HOSTNAME),
                ("10.0.1.2", TEST_HOSTNAME),
                ("10.0.1.3", "node2"),
            ],
            tcp(
                "10.0.0.2",
                "172.30.1.1",
                80,
                "10.0.1.1:80, 10.0.1.2:80",
                false,
                "pod to ClusterIP hits all local endpoints",
            ),
        ),
        (
            "internalTrafficPolicy is local and there are no local endpoints",
            "Local",
            [
                ("10.0.1.1", "node0"),
                ("10.0.1.2", "node1"),
                ("10.0.1.3", "node2"),
            ],
            tcp("10.0.0.2", "172.30.1.1", 80, "DROP", false, "no endpoints"),
        ),
    ];
    for (case, policy, endpoints, flow) in cases {
        let endpoints = endpoints
            .iter()
            .map(|(ip, node)| ep_on(ip, node, true, true, false))
            .collect();
        let mut f = node_fixture(
            vec![
                service(policy),
                slice("ns1", "svc1", &[("", 80)], endpoints),
            ],
            ALL_NODE_IPS,
            true,
        );
        run_packet_flow_tests(
            &format!("TestInternalTrafficPolicy/{case}"),
            &mut f,
            &[flow],
        );
        let mut f = node_fixture(vec![service(policy)], ALL_NODE_IPS, true);
        let deleted = tcp(
            "10.0.0.2",
            "172.30.1.1",
            80,
            "REJECT",
            false,
            "endpoints deleted",
        );
        run_packet_flow_tests(
            &format!("TestInternalTrafficPolicy/{case}"),
            &mut f,
            &[deleted],
        );
    }
}

/// A TestTerminatingEndpointsTrafficPolicy* case list: an LB Service with the traffic
/// `policy`, each case's endpoints and flows, then the same Service with its endpoints deleted.
fn run_terminating_endpoints(test: &str, policy: &str, cases: Vec<(&str, Vec<Value>, [Flow; 2])>) {
    let service = || {
        svc(
            "ns1",
            "svc1",
            "172.30.1.1",
            json!([{"name": "", "port": 80, "protocol": "TCP", "targetPort": 80}]),
            json!({"type": "LoadBalancer", "externalTrafficPolicy": policy, "healthCheckNodePort": 30000}),
            json!({"loadBalancer": {"ingress": [{"ip": LB_IP1}]}}),
        )
    };
    for (case, endpoints, flows) in cases {
        let mut f = node_fixture(
            vec![service(), slice("ns1", "svc1", &[("", 80)], endpoints)],
            ALL_NODE_IPS,
            true,
        );
        run_packet_flow_tests(&format!("{test}/{case}"), &mut f, &flows);
        let mut f = node_fixture(vec![service()], ALL_NODE_IPS, true);
        let deleted = [
            tcp(
                "10.0.0.2",
                "172.30.1.1",
                80,
                "REJECT",
                false,
                "pod to clusterIP after endpoints deleted",
            ),
            tcp(
                TEST_EXTERNAL_CLIENT,
                LB_IP1,
                80,
                "REJECT",
                false,
                "external to LB after endpoints deleted",
            ),
        ];
        run_packet_flow_tests(&format!("{test}/{case}"), &mut f, &deleted);
    }
}

#[test]
fn terminating_endpoints_traffic_policy_local() {
    let here = TEST_HOSTNAME;
    let cases: Vec<(&str, Vec<Value>, [Flow; 2])> = vec![
        (
            "ready endpoints exist",
            vec![
                ep_on("10.0.1.1", here, true, true, false),
                ep_on("10.0.1.2", here, true, true, false),
                ep_on("10.0.1.3", here, false, true, true),
                ep_on("10.0.1.4", here, false, false, true),
                ep_on("10.0.1.5", "node-1", true, true, false),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "10.0.1.1:80, 10.0.1.2:80",
                    false,
                    "external to LB",
                ),
            ],
        ),
        (
            "only terminating endpoints exist",
            vec![
                ep_on("10.0.1.2", here, false, true, true),
                ep_on("10.0.1.3", here, false, true, true),
                ep_on("10.0.1.4", here, false, false, true),
                ep_on("10.0.1.5", "node-1", true, true, false),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "10.0.1.2:80, 10.0.1.3:80",
                    false,
                    "external to LB",
                ),
            ],
        ),
        (
            "terminating endpoints on remote node",
            vec![ep_on("10.0.1.5", "node-1", false, true, true)],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "DROP",
                    false,
                    "external to LB, no locally-usable endpoints",
                ),
            ],
        ),
        (
            "no usable endpoints on any node",
            vec![
                ep_on("10.0.1.5", here, false, false, true),
                ep_on("10.0.1.5", "node-1", false, false, true),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "REJECT",
                    false,
                    "pod to clusterIP, no usable endpoints",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "REJECT",
                    false,
                    "external to LB, no usable endpoints",
                ),
            ],
        ),
    ];
    run_terminating_endpoints("TestTerminatingEndpointsTrafficPolicyLocal", "Local", cases);
}

#[test]
fn terminating_endpoints_traffic_policy_cluster() {
    let (here, there) = (TEST_HOSTNAME, "another-node");
    let cases: Vec<(&str, Vec<Value>, [Flow; 2])> = vec![
        (
            "ready endpoints exist",
            vec![
                ep_on("10.0.1.1", here, true, true, false),
                ep_on("10.0.1.2", here, true, true, false),
                ep_on("10.0.1.3", there, false, true, true),
                ep_on("10.0.1.4", there, false, false, true),
                ep_on("10.0.1.5", there, true, true, false),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    true,
                    "external to LB",
                ),
            ],
        ),
        (
            "only terminating endpoints exist",
            vec![
                ep_on("10.0.1.2", here, false, true, true),
                ep_on("10.0.1.3", here, false, true, true),
                ep_on("10.0.1.4", there, false, false, true),
                ep_on("10.0.1.5", there, false, true, true),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                    true,
                    "external to LB",
                ),
            ],
        ),
        (
            "terminating endpoints on remote node",
            vec![ep_on("10.0.1.5", "node-1", false, true, true)],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "10.0.1.5:80",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "10.0.1.5:80",
                    true,
                    "external to LB",
                ),
            ],
        ),
        (
            "no usable endpoints on any node",
            vec![
                ep_on("10.0.1.5", here, false, false, true),
                ep_on("10.0.1.5", "node-1", false, false, true),
            ],
            [
                tcp(
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "REJECT",
                    false,
                    "pod to clusterIP",
                ),
                tcp(
                    TEST_EXTERNAL_CLIENT,
                    LB_IP1,
                    80,
                    "REJECT",
                    false,
                    "external to LB",
                ),
            ],
        ),
    ];
    run_terminating_endpoints(
        "TestTerminatingEndpointsTrafficPolicyCluster",
        "Cluster",
        cases,
    );
}

/// TestInternalExternalMasquerade's "base" and "no LocalTrafficDetector" cases (the latter:
/// no --cluster-cidr). Its masqueradeAll cases have no counterpart: there is no
/// --masquerade-all.
#[test]
fn internal_external_masquerade() {
    let lb = |ns: &str, ip: &str, node_port: u16, hc: u16, spec: Value, ingress: &str| {
        let mut spec = spec;
        spec["type"] = json!("LoadBalancer");
        spec["healthCheckNodePort"] = json!(hc);
        svc(
            ns,
            ns.replace("ns", "svc").as_str(),
            ip,
            json!([{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": node_port}]),
            spec,
            json!({"loadBalancer": {"ingress": [{"ip": ingress}]}}),
        )
    };
    let endpoints = |ns: &str, last: u8| {
        slice(
            ns,
            &ns.replace("ns", "svc"),
            &[("p80", 80)],
            vec![
                ep_node(&format!("10.180.0.{last}"), TEST_HOSTNAME),
                ep_node(&format!("10.180.1.{last}"), "remote"),
            ],
        )
    };
    let manifests = || {
        vec![
            lb("ns1", "172.30.0.41", 3001, 30001, json!({}), "1.2.3.4"),
            lb(
                "ns2",
                "172.30.0.42",
                3002,
                30002,
                json!({"externalTrafficPolicy": "Local"}),
                "5.6.7.8",
            ),
            lb(
                "ns3",
                "172.30.0.43",
                3003,
                30003,
                json!({"internalTrafficPolicy": "Local"}),
                "9.10.11.12",
            ),
            endpoints("ns1", 1),
            endpoints("ns2", 2),
            endpoints("ns3", 3),
        ]
    };
    let (pod, node, ext) = ("10.0.0.2", "192.168.0.2", TEST_EXTERNAL_CLIENT);
    let (s1, s2, s3) = (
        "10.180.0.1:80, 10.180.1.1:80",
        "10.180.0.2:80, 10.180.1.2:80",
        "10.180.0.3:80, 10.180.1.3:80",
    );
    let base = [
        tcp(pod, "172.30.0.41", 80, s1, false, "pod to ClusterIP"),
        tcp(pod, node, 3001, s1, true, "pod to NodePort"),
        tcp(pod, "1.2.3.4", 80, s1, true, "pod to LB"),
        tcp(node, "172.30.0.41", 80, s1, true, "node to ClusterIP"),
        tcp(node, node, 3001, s1, true, "node to NodePort"),
        tcp(node, "1.2.3.4", 80, s1, true, "node to LB"),
        tcp(ext, "172.30.0.41", 80, s1, true, "external to ClusterIP"),
        tcp(ext, node, 3001, s1, true, "external to NodePort"),
        tcp(ext, "1.2.3.4", 80, s1, true, "external to LB"),
        tcp(
            pod,
            "172.30.0.42",
            80,
            s2,
            false,
            "pod to ClusterIP with eTP:Local",
        ),
        tcp(pod, node, 3002, s2, false, "pod to NodePort with eTP:Local"),
        tcp(pod, "5.6.7.8", 80, s2, false, "pod to LB with eTP:Local"),
        tcp(
            node,
            "172.30.0.42",
            80,
            s2,
            true,
            "node to ClusterIP with eTP:Local",
        ),
        tcp(
            node,
            node,
            3001,
            s1,
            true,
            "node to NodePort with eTP:Local",
        ),
        tcp(node, "5.6.7.8", 80, s2, true, "node to LB with eTP:Local"),
        tcp(
            ext,
            "172.30.0.42",
            80,
            s2,
            true,
            "external to ClusterIP with eTP:Local",
        ),
        tcp(
            ext,
            node,
            3002,
            "10.180.0.2:80",
            false,
            "external to NodePort with eTP:Local",
        ),
        tcp(
            ext,
            "5.6.7.8",
            80,
            "10.180.0.2:80",
            false,
            "external to LB with eTP:Local",
        ),
        tcp(
            pod,
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            false,
            "pod to ClusterIP with iTP:Local",
        ),
        tcp(pod, node, 3003, s3, true, "pod to NodePort with iTP:Local"),
        tcp(pod, "9.10.11.12", 80, s3, true, "pod to LB with iTP:Local"),
        tcp(
            node,
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            true,
            "node to ClusterIP with iTP:Local",
        ),
        tcp(
            node,
            node,
            3003,
            s3,
            true,
            "node to NodePort with iTP:Local",
        ),
        tcp(
            node,
            "9.10.11.12",
            80,
            s3,
            true,
            "node to LB with iTP:Local",
        ),
        tcp(
            ext,
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            true,
            "external to ClusterIP with iTP:Local",
        ),
        tcp(
            ext,
            node,
            3003,
            s3,
            true,
            "external to NodePort with iTP:Local",
        ),
        tcp(
            ext,
            "9.10.11.12",
            80,
            s3,
            true,
            "external to LB with iTP:Local",
        ),
    ];
    let mut f = node_fixture(manifests(), ALL_NODE_IPS, true);
    run_packet_flow_tests("TestInternalExternalMasquerade/base", &mut f, &base);

    // No LocalTrafficDetector: ClusterIP traffic is assumed to come from pods (no masquerade),
    // and pods get no eTP:Local short-circuit.
    let unmasqueraded = [
        "node to ClusterIP",
        "node to ClusterIP with eTP:Local",
        "node to ClusterIP with iTP:Local",
        "external to ClusterIP",
        "external to ClusterIP with eTP:Local",
        "external to ClusterIP with iTP:Local",
    ];
    let local_only = ["pod to NodePort with eTP:Local", "pod to LB with eTP:Local"];
    let no_detector: Vec<Flow> = base
        .into_iter()
        .map(|flow| match flow.name {
            n if unmasqueraded.contains(&n) => Flow {
                masq: false,
                ..flow
            },
            n if local_only.contains(&n) => Flow {
                output: "10.180.0.2:80",
                ..flow
            },
            _ => flow,
        })
        .collect();
    let mut f = node_fixture(manifests(), ALL_NODE_IPS, false);
    run_packet_flow_tests(
        "TestInternalExternalMasquerade/no LocalTrafficDetector",
        &mut f,
        &no_detector,
    );
}

#[test]
fn no_endpoints_reject() {
    let service = svc(
        "ns1",
        "svc1",
        "172.30.0.41",
        json!([{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]),
        json!({"type": "LoadBalancer", "externalIPs": [EXTERNAL_IP]}),
        json!({"loadBalancer": {"ingress": [{"ip": LB_IP1}]}}),
    );
    let mut f = node_fixture(vec![service], ALL_NODE_IPS, true);
    let (pod, node, ext) = ("10.0.0.2", "192.168.0.2", TEST_EXTERNAL_CLIENT);
    let flows = [
        tcp(
            pod,
            "172.30.0.41",
            80,
            "REJECT",
            false,
            "pod to cluster IP with no endpoints",
        ),
        tcp(
            ext,
            EXTERNAL_IP,
            80,
            "REJECT",
            false,
            "external to external IP with no endpoints",
        ),
        tcp(
            pod,
            node,
            3001,
            "REJECT",
            false,
            "pod to NodePort with no endpoints",
        ),
        tcp(
            ext,
            node,
            3001,
            "REJECT",
            false,
            "external to NodePort with no endpoints",
        ),
        tcp(
            pod,
            LB_IP1,
            80,
            "REJECT",
            false,
            "pod to LoadBalancer IP with no endpoints",
        ),
        tcp(
            ext,
            LB_IP1,
            80,
            "REJECT",
            false,
            "external to LoadBalancer IP with no endpoints",
        ),
    ];
    run_packet_flow_tests("TestNoEndpointsReject", &mut f, &flows);
}
