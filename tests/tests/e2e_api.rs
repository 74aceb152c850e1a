//! The real `node-agent` binary in API mode (`run --kubeconfig FILE --kubelet=false`) on a node
//! namespace between a client and three backends, following a fake Kubernetes API server that
//! runs in the node namespace: lists and watches (chunked JSON lines held open) of Services
//! and EndpointSlices over plain HTTP, from one history of events with etcd-like
//! resourceVersions.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use node_agent_tests::{
    agent::{Agent, HEALTH_BIND, binary, run_to_exit},
    backend::BackendServer,
    client::{http_get, tcp_spread},
    netns::Netns,
    topology::{Topology, backend_ip},
};
use serde_json::{Value, json};
use tokio::sync::watch;

const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LEGACY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const BACKEND_PORT: u16 = 8080;
const TOKEN: &str = "e2e-agent-token";
const SERVICES: &str = "/api/v1/services";
const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// How long a change may take from the API server to the maps, with room for a slow machine.
const WAIT: Duration = Duration::from_secs(10);

/// A watch event of the collection at `path`; `object` carries its resourceVersion.
struct Event {
    version: u64,
    path: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Clone)]
struct ApiState {
    history: watch::Sender<Vec<Event>>,
    /// Every request: method, path and query, and whether it carried the kubeconfig's token.
    requests: Arc<Mutex<Vec<(String, bool)>>>,
}

/// The fake API server, on its own runtime: stopping it drops the runtime, which closes the
/// listener and every watch held open, as an API server going away does.
struct FakeApi {
    addr: SocketAddr,
    state: ApiState,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApi {
    fn start(node: &Netns) -> Self {
        let listener = node
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = ApiState {
            history: watch::Sender::new(Vec::new()),
            requests: Arc::default(),
        };
        let app = Router::new()
            .route(SERVICES, get(|s, h, q| answer(SERVICES, s, h, q)))
            .route(
                ENDPOINT_SLICES,
                get(|s, h, q| answer(ENDPOINT_SLICES, s, h, q)),
            )
            .with_state(state.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    /// Records `kind` (ADDED, MODIFIED, DELETED) of `object` at the next resourceVersion:
    /// in the lists from now on, and sent to every watch.
    fn event(&self, path: &'static str, kind: &'static str, mut object: Value) {
        self.state.history.send_modify(|history| {
            // Versions up to 1000 are the cluster's past, before the first event.
            let version = 1000 + history.len() as u64 + 1;
            object["metadata"]["resourceVersion"] = version.to_string().into();
            history.push(Event {
                version,
                path,
                kind,
                object,
            });
        });
    }

    fn requests(&self) -> Vec<(String, bool)> {
        self.state.requests.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }

    /// A kubeconfig naming this server over plain HTTP, with a bearer token.
    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: node-agent\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: node-agent\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(&path, config).unwrap();
        path
    }
}

/// GET of a collection: its list at the latest resourceVersion, or with `watch=true` the
/// events after `resourceVersion`, one JSON line each, then held open for the next ones.
async fn answer(
    path: &'static str,
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    (state.requests.lock().unwrap()).push((format!("GET {path}?{query}"), authorized));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
    };
    let (kind, api_version) = match path {
        SERVICES => ("ServiceList", "v1"),
        _ => ("EndpointSliceList", "discovery.k8s.io/v1"),
    };
    if param("watch").as_deref() != Some("true") {
        let history = state.history.borrow();
        let mut items = BTreeMap::new();
        for e in history.iter().filter(|e| e.path == path) {
            let name = e.object["metadata"]["name"].to_string();
            match e.kind {
                "DELETED" => items.remove(&name),
                _ => items.insert(name, e.object.clone()),
            };
        }
        let version = history.last().map_or(1000, |e| e.version);
        let list = json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": version.to_string()},
            "items": items.into_values().collect::<Vec<_>>(),
        });
        return json_response(StatusCode::OK, list.to_string());
    }
    let Some(since) = param("resourceVersion").and_then(|v| v.parse::<u64>().ok()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "a watch needs a resourceVersion",
        );
    };
    let events = futures::stream::unfold(
        (state.history.subscribe(), since),
        move |(mut history, mut since)| async move {
            loop {
                let next = history
                    .borrow_and_update()
                    .iter()
                    .find(|e| e.path == path && e.version > since)
                    .map(|e| {
                        let line = json!({"type": e.kind, "object": e.object});
                        (e.version, format!("{line}\n"))
                    });
                if let Some((version, line)) = next {
                    since = version;
                    return Some((Ok::<_, std::io::Error>(Bytes::from(line)), (history, since)));
                }
                history.changed().await.ok()?;
            }
        },
    );
    let mut response = Response::new(Body::from_stream(events));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, body.to_string())
}

/// A Service as the API server returns it: defaulted fields, uid, status.
fn service(name: &str, ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("0b7e3c1a-{name}"),
            "creationTimestamp": "2026-11-23T10:00:00Z", "labels": {"app": name},
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": BACKEND_PORT}],
        },
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice the endpointslice controller writes for Service `service`, with the
/// backends `backends` (1-based) ready.
fn endpoint_slice(service: &str, backends: &[usize]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|&i| {
            json!({
                "addresses": [backend_ip(i).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{i}"),
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("{service}-{i}"),
                              "uid": format!("5d1f9a2e-{service}-{i}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x7k2p"), "generateName": format!("{service}-"),
            "namespace": "default", "uid": format!("9c4d2b7f-{service}"),
            "creationTimestamp": "2026-11-23T10:00:01Z",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": format!("0b7e3c1a-{service}"),
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
    })
}

/// The `lb list` row of `frontend` (VIP:port/protocol), if any.
fn row<'a>(list: &'a str, frontend: &str) -> Option<&'a str> {
    list.lines().find(|l| l.starts_with(frontend))
}

/// The backends (1-based) a row names.
fn backends_of(row: &str) -> Vec<usize> {
    (1..=3)
        .filter(|&i| row.contains(&format!("{}:{BACKEND_PORT}", backend_ip(i))))
        .collect()
}

/// Polls `lb list` until `check` holds, for up to `WAIT`; the list that satisfied it.
fn wait_lb(agent: &Agent, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = agent.lb_list().unwrap();
        if check(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}\nlb list:\n{list}\nnode-agent log:\n{}",
            agent.logs().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Each of 30 connections to `vip`:80 reached one of `backends` (1-based).
fn assert_traffic(topology: &Topology, vip: Ipv4Addr, backends: &[usize]) {
    let counts = (topology.client)
        .run(move || tcp_spread(SocketAddr::from((vip, 80)), 30))
        .unwrap();
    let names: Vec<String> = backends.iter().map(|i| format!("backend-{i}")).collect();
    let reached: usize = names.iter().filter_map(|n| counts.get(n)).sum();
    assert_eq!(
        reached, 30,
        "{vip}: every flow must reach {names:?}: {counts:?}"
    );
}

/// Fields drop in order: the agent stops before the API server and the namespaces go.
struct Node {
    agent: Agent,
    api: FakeApi,
    _servers: Vec<BackendServer>,
    _kubeconfig: tempfile::TempDir,
    topology: Topology,
}

#[test]
fn the_agent_follows_the_api_server_and_keeps_the_maps_through_an_outage() {
    let topology = Topology::new(3).unwrap();
    let servers = topology.start_backends(BACKEND_PORT).unwrap();
    let api = FakeApi::start(&topology.node);
    api.event(SERVICES, "ADDED", service("web", WEB));
    api.event(SERVICES, "ADDED", service("legacy", LEGACY));
    api.event(ENDPOINT_SLICES, "ADDED", endpoint_slice("web", &[1, 2, 3]));
    api.event(ENDPOINT_SLICES, "ADDED", endpoint_slice("legacy", &[3]));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let args: Vec<OsString> = vec![
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--kubelet=false".into(),
        "--devices".into(),
        topology.node_devices().join(",").into(),
    ];
    // Healthy once both kinds were listed and synced.
    let agent = Agent::start_with(&binary(), &topology.node, args).unwrap();
    let mut node = Node {
        agent,
        api,
        _servers: servers,
        _kubeconfig: dir,
        topology,
    };

    let web = "198.19.0.10:80/TCP";
    let legacy = "198.19.0.11:80/TCP";
    let list = node.agent.lb_list().unwrap();
    assert_eq!(
        row(&list, web).map(backends_of),
        Some(vec![1, 2, 3]),
        "{list}"
    );
    assert_eq!(row(&list, legacy).map(backends_of), Some(vec![3]), "{list}");
    assert_traffic(&node.topology, WEB, &[1, 2, 3]);
    assert_traffic(&node.topology, LEGACY, &[3]);

    // Backend 3 goes from web's slice: a MODIFIED event on the watch held open.
    (node.api).event(ENDPOINT_SLICES, "MODIFIED", endpoint_slice("web", &[1, 2]));
    wait_lb(&node.agent, "web without backend 3", |list| {
        row(list, web).map(backends_of) == Some(vec![1, 2])
    });
    assert_traffic(&node.topology, WEB, &[1, 2]);

    (node.api).event(SERVICES, "DELETED", service("legacy", LEGACY));
    let before = wait_lb(&node.agent, "legacy's frontend removed", |list| {
        row(list, legacy).is_none() && row(list, web).is_some()
    });

    // The agent used the kubeconfig's token, listed each kind and then watched it.
    let requests = node.api.requests();
    assert!(requests.iter().all(|(_, token)| *token), "{requests:?}");
    for path in [SERVICES, ENDPOINT_SLICES] {
        let of_path = || (requests.iter()).filter(|(r, _)| r.starts_with(&format!("GET {path}?")));
        let watches = of_path().filter(|(r, _)| r.contains("watch=true")).count();
        assert_eq!(
            of_path().count() - watches,
            1,
            "one list of {path}: {requests:?}"
        );
        assert!(watches >= 1, "no watch of {path}: {requests:?}");
    }

    // The API server goes away: its watches end and reconnecting is refused.
    node.api.stop();
    for kind in ["Services", "EndpointSlices"] {
        assert!(
            node.agent
                .wait_for_log(&[&format!("watching {kind} failed")], WAIT)
                .is_some(),
            "no failure logged for {kind}:\n{}",
            node.agent.logs().join("\n")
        );
    }
    assert!(node.agent.is_running());
    assert_eq!(
        node.agent.lb_list().unwrap(),
        before,
        "the outage changed the maps"
    );
    assert_traffic(&node.topology, WEB, &[1, 2]);
    let healthz = (node.topology.node)
        .run(|| http_get(HEALTH_BIND.parse().unwrap(), "/healthz"))
        .unwrap()
        .unwrap();
    assert_eq!(healthz.0, 200, "stale only after 60 s: {healthz:?}");
}

#[test]
fn a_missing_kubeconfig_fails_the_start_naming_the_file() {
    let topology = Topology::new(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kubeconfig");
    let bpffs = Path::new("/sys/fs/bpf").join(node_agent_tests::unique("pins"));
    let out = run_to_exit(
        &binary(),
        &topology.node,
        &[
            "run",
            "--kubeconfig",
            missing.to_str().unwrap(),
            "--kubelet=false",
            "--devices",
            &topology.node_devices().join(","),
            "--health-bind",
            HEALTH_BIND,
            "--bpffs",
            bpffs.to_str().unwrap(),
        ],
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(missing.to_str().unwrap()),
        "the error names the file: {stderr}"
    );
    assert!(!bpffs.exists(), "pins left at {}", bpffs.display());
}
