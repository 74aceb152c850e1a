//! kube-proxy's Service semantics end to end: the real agent on a node namespace between an
//! external client and three backends ("pods" of node-a in 198.18.8.0/21), real sockets.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use node_agent_tests::{
    agent::{Agent, binary},
    backend::BackendServer,
    client::{Connection, UdpFlow, http_get},
    manifest::{write, yaml},
    topology::{CLIENT_IP, NODE_IP, Topology, backend_ip},
};
use serde_json::{Value, json};

const NODE_NAME: &str = "node-a";
const NODE_FLAGS: &[&str] = &[
    "--node-name",
    NODE_NAME,
    "--cluster-cidr",
    "198.18.8.0/21",
    "--service-cidr",
    "198.19.0.0/16",
];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const BACKEND_PORT: u16 = 8080;
/// The bound for a manifest change to reach the datapath.
const PROGRAMMING_BOUND: Duration = Duration::from_secs(1);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Fields drop in order: the agent stops before the namespaces go.
struct Node {
    _agent: Agent,
    _servers: Vec<BackendServer>,
    manifests: tempfile::TempDir,
    topology: Topology,
}

impl Node {
    fn start(service: Value, endpoints: Vec<Value>) -> Node {
        let topology = Topology::new(3).unwrap();
        let _servers = topology.start_backends(BACKEND_PORT).unwrap();
        let manifests = tempfile::tempdir().unwrap();
        write(manifests.path(), "service.yaml", &yaml(service)).unwrap();
        write(manifests.path(), "endpoints.yaml", &slice(endpoints)).unwrap();
        let agent = Agent::start(
            &binary(),
            &topology.node,
            manifests.path(),
            &topology.node_devices(),
            NODE_FLAGS,
        )
        .unwrap();
        Node {
            _agent: agent,
            _servers,
            manifests,
            topology,
        }
    }

    fn set_endpoints(&self, endpoints: Vec<Value>) {
        write(self.manifests.path(), "endpoints.yaml", &slice(endpoints)).unwrap();
        thread::sleep(PROGRAMMING_BOUND);
    }

    /// `count` new TCP connections from the client: who answered each (or the error).
    fn connect(&self, to: SocketAddr, count: usize) -> Vec<Result<(String, String), ErrorKind>> {
        self.topology
            .client
            .run(move || {
                (0..count)
                    .map(|_| {
                        Connection::open(to)
                            .map(|c| (c.answer.backend, c.answer.seen))
                            .map_err(|e| e.kind())
                    })
                    .collect()
            })
            .unwrap()
    }
}

/// Service `web`: port 80 (TCP "http" and UDP "echo") to 8080, with `spec` merged in.
fn web(spec: Value, status: Value) -> Value {
    let mut service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": VIP.to_string(), "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": BACKEND_PORT},
            {"name": "echo", "port": 80, "protocol": "UDP", "targetPort": BACKEND_PORT}]},
        "status": status,
    });
    for (k, v) in spec.as_object().unwrap() {
        service["spec"][k] = v.clone();
    }
    service
}

/// NodePort ports for `web`.
fn node_ports(tcp: u16, udp: u16) -> Value {
    json!([
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": BACKEND_PORT, "nodePort": tcp},
        {"name": "echo", "port": 80, "protocol": "UDP", "targetPort": BACKEND_PORT, "nodePort": udp}])
}

/// Backend `i` as an endpoint with conditions, on `node`.
fn endpoint(i: usize, ready: bool, serving: bool, terminating: bool, node: &str) -> Value {
    json!({"addresses": [backend_ip(i).to_string()], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn ready(i: usize) -> Value {
    endpoint(i, true, true, false, NODE_NAME)
}

fn slice(endpoints: Vec<Value>) -> String {
    yaml(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}, {"name": "echo", "port": BACKEND_PORT, "protocol": "UDP"}],
        "endpoints": endpoints,
    }))
}

fn backends_of(answers: &[Result<(String, String), ErrorKind>]) -> BTreeSet<String> {
    answers
        .iter()
        .map(|a| {
            a.clone()
                .map(|(b, _)| b)
                .unwrap_or_else(|e| format!("error: {e}"))
        })
        .collect()
}

#[test]
fn nodeport_from_an_external_client_is_masqueraded_and_answered() {
    let node = Node::start(
        web(
            json!({"type": "NodePort", "ports": node_ports(30080, 30080)}),
            json!(null),
        ),
        vec![ready(1), ready(2), ready(3)],
    );
    let answers = node.connect(addr(NODE_IP, 30080), 60);
    assert!(
        answers.iter().all(|a| a
            .as_ref()
            .is_ok_and(|(_, seen)| *seen == NODE_IP.to_string())),
        "{answers:?}"
    );
    assert_eq!(backends_of(&answers).len(), 3, "{answers:?}");
    let udp = node
        .topology
        .client
        .run(|| UdpFlow::open(addr(NODE_IP, 30080))?.ask())
        .unwrap()
        .unwrap();
    assert_eq!(
        udp.seen,
        NODE_IP.to_string(),
        "UDP NodePort traffic is masqueraded too"
    );
    // The reply path carries a whole exchange, not just the greeting.
    let echoed = node
        .topology
        .client
        .run(|| Connection::open(addr(NODE_IP, 30080))?.echo("round trip"))
        .unwrap()
        .unwrap();
    assert_eq!(echoed, "round trip");
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() {
    let service = web(
        json!({"type": "LoadBalancer", "ports": node_ports(30081, 30081), "loadBalancerSourceRanges": ["198.18.1.0/24"]}),
        json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}),
    );
    let node = Node::start(service, vec![ready(1), ready(2), ready(3)]);
    let blocked = Ipv4Addr::new(198, 18, 3, 2);
    node.topology.add_client_address(blocked).unwrap();

    let allowed = node.connect(addr(LB_IP, 80), 10);
    assert!(
        allowed.iter().all(Result::is_ok),
        "a listed source is admitted: {allowed:?}"
    );
    let refused = node
        .topology
        .client
        .run(move || Connection::open_from(blocked, addr(LB_IP, 80)).map(|c| c.answer))
        .unwrap();
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(ErrorKind::TimedOut),
        "an unlisted source is dropped"
    );
    let node_port = node
        .topology
        .client
        .run(move || Connection::open_from(blocked, addr(NODE_IP, 30081)).map(|c| c.answer))
        .unwrap();
    assert!(
        node_port.is_ok(),
        "source ranges do not apply to the NodePort: {node_port:?}"
    );
}

#[test]
fn session_affinity_pins_a_client_until_the_timeout_and_follows_backend_changes() {
    let sticky = |timeout: u32| json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}});
    let node = Node::start(
        web(sticky(1), json!(null)),
        vec![ready(1), ready(2), ready(3)],
    );
    let answers = node.connect(addr(VIP, 80), 100);
    assert_eq!(
        backends_of(&answers).len(),
        1,
        "100 connections from one client hit one backend: {answers:?}"
    );

    // After the timeout a new connection chooses afresh: over rounds, the choices spread.
    let mut chosen = BTreeSet::new();
    for _ in 0..7 {
        thread::sleep(Duration::from_millis(2200));
        let round = node.connect(addr(VIP, 80), 3);
        assert_eq!(
            backends_of(&round).len(),
            1,
            "within the timeout a client stays put: {round:?}"
        );
        chosen.extend(backends_of(&round));
    }
    assert!(
        chosen.len() >= 2,
        "after timeouts new connections spread, got only {chosen:?}"
    );

    // A long timeout: affinity survives an unrelated backend change and goes with its backend.
    write(
        node.manifests.path(),
        "service.yaml",
        &yaml(web(sticky(300), json!(null))),
    )
    .unwrap();
    let pinned = backends_of(&node.connect(addr(VIP, 80), 5));
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    let pinned: usize = pinned
        .first()
        .unwrap()
        .trim_start_matches("backend-")
        .parse()
        .unwrap();
    let other = if pinned == 1 { 2 } else { 1 };
    node.set_endpoints((1..=3).filter(|&i| i != other).map(ready).collect());
    assert_eq!(
        backends_of(&node.connect(addr(VIP, 80), 10)),
        BTreeSet::from([format!("backend-{pinned}")])
    );
    node.set_endpoints((1..=3).filter(|&i| i != pinned).map(ready).collect());
    let moved = backends_of(&node.connect(addr(VIP, 80), 10));
    assert_eq!(
        moved.len(),
        1,
        "the client sticks to its new backend: {moved:?}"
    );
    assert!(
        !moved.contains(&format!("backend-{pinned}")),
        "affinity to a removed backend is dropped"
    );
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_reports_local_endpoints() {
    let service = web(
        json!({"type": "LoadBalancer", "ports": node_ports(30082, 30082), "externalTrafficPolicy": "Local", "healthCheckNodePort": 32082}),
        json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}),
    );
    let node = Node::start(
        service,
        vec![ready(1), endpoint(2, true, true, false, "node-b")],
    );
    let answers = node.connect(addr(NODE_IP, 30082), 20);
    for answer in &answers {
        assert_eq!(
            answer,
            &Ok(("backend-1".to_owned(), CLIENT_IP.to_string())),
            "only the local endpoint, client address kept"
        );
    }
    let health = || {
        node.topology
            .client
            .run(|| http_get(addr(NODE_IP, 32082), "/"))
            .unwrap()
            .unwrap()
    };
    let (code, body) = health();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["localEndpoints"],
        1,
        "{body}"
    );

    node.set_endpoints(vec![
        endpoint(1, true, true, false, "node-b"),
        endpoint(2, true, true, false, "node-b"),
    ]);
    let (code, body) = health();
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["localEndpoints"],
        0,
        "{body}"
    );
    let dropped = node.connect(addr(NODE_IP, 30082), 2);
    assert!(
        dropped.iter().all(|a| *a == Err(ErrorKind::TimedOut)),
        "no local endpoint: external traffic is dropped: {dropped:?}"
    );

    node.set_endpoints(vec![ready(3)]);
    assert_eq!(health().0, 200);
    assert_eq!(
        backends_of(&node.connect(addr(LB_IP, 80), 5)),
        BTreeSet::from(["backend-3".to_owned()])
    );
}

#[test]
fn terminating_endpoints_serve_only_while_no_endpoint_is_ready() {
    let terminating = vec![
        endpoint(1, false, true, true, NODE_NAME),
        endpoint(2, false, false, true, NODE_NAME),
    ];
    let node = Node::start(web(json!({}), json!(null)), terminating.clone());
    assert_eq!(
        backends_of(&node.connect(addr(VIP, 80), 20)),
        BTreeSet::from(["backend-1".to_owned()]),
        "serving, never non-serving"
    );
    node.set_endpoints([terminating, vec![ready(3)]].concat());
    assert_eq!(
        backends_of(&node.connect(addr(VIP, 80), 20)),
        BTreeSet::from(["backend-3".to_owned()]),
        "ready ones win"
    );
}

#[test]
fn a_service_without_endpoints_refuses_connections_at_once() {
    let node = Node::start(
        web(
            json!({"type": "NodePort", "ports": node_ports(30083, 30083)}),
            json!(null),
        ),
        vec![],
    );
    for to in [addr(VIP, 80), addr(NODE_IP, 30083)] {
        let answers = node.connect(to, 3);
        assert!(
            answers
                .iter()
                .all(|a| *a == Err(ErrorKind::ConnectionRefused)),
            "{to}: {answers:?}"
        );
    }
    let udp = node
        .topology
        .client
        .run(|| UdpFlow::open(addr(VIP, 80))?.ask())
        .unwrap();
    assert_eq!(udp.map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
}

#[test]
fn pods_keep_their_address_and_a_pod_reaches_itself_through_its_service() {
    let node = Node::start(web(json!({}), json!(null)), vec![ready(1)]);
    let from_backend = |i: usize| {
        node.topology.backends[i - 1]
            .run(|| Connection::open(addr(VIP, 80)).map(|c| c.answer))
            .unwrap()
            .unwrap()
    };
    let other_pod = from_backend(2);
    assert_eq!(
        (other_pod.backend.as_str(), other_pod.seen),
        ("backend-1", backend_ip(2).to_string()),
        "pod source kept"
    );
    let hairpin = from_backend(1);
    assert_eq!(
        (hairpin.backend.as_str(), hairpin.seen),
        ("backend-1", NODE_IP.to_string()),
        "hairpin is masqueraded"
    );
}

#[test]
fn a_udp_flow_moves_to_a_live_backend_when_its_backend_goes() {
    let node = Node::start(
        web(json!({}), json!(null)),
        vec![ready(1), ready(2), ready(3)],
    );
    let flow = node
        .topology
        .client
        .run(|| UdpFlow::open(addr(VIP, 80)))
        .unwrap()
        .unwrap();
    let first = flow.ask().unwrap().backend;
    assert_eq!(
        flow.ask().unwrap().backend,
        first,
        "a flow stays on its backend"
    );
    let gone: usize = first.trim_start_matches("backend-").parse().unwrap();
    node.set_endpoints((1..=3).filter(|&i| i != gone).map(ready).collect());
    let next = flow.ask().expect("the next datagram is answered");
    assert_ne!(next.backend, first);
}

#[test]
fn clusterip_traffic_from_outside_the_pod_range_is_masqueraded() {
    let node = Node::start(
        web(json!({}), json!(null)),
        vec![ready(1), ready(2), ready(3)],
    );
    let answers = node.connect(addr(VIP, 80), 30);
    assert!(
        answers.iter().all(|a| a
            .as_ref()
            .is_ok_and(|(_, seen)| *seen == NODE_IP.to_string())),
        "{answers:?}"
    );
}
