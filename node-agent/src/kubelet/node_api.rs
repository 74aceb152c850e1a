//! The kubelet's side of the API in full-node mode: registering the Node (and keeping its
//! Ready condition), renewing its heartbeat Lease in `kube-node-lease`, and patching pod
//! status through the status subresource. The objects are built by pure functions; the
//! machine is read at the edge (`Machine::read`), and each call here is one API request or
//! two, with errors naming the object and the API server's reason.
use std::{collections::BTreeMap, fs, net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, Pod, PodStatus},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, Time},
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tracing::warn;

/// The namespace of the nodes' heartbeat Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long the Lease holds without renewal; the kubelet's default.
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the Lease is renewed: a quarter of its duration, as the kubelet does.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// The kubelet's default `maxPods`.
const MAX_PODS: &str = "110";
/// The kubelet's default hard eviction threshold (`memory.available<100Mi`), which the
/// allocatable memory leaves free.
const EVICTION_HARD_MEMORY: u64 = 100 << 20;

/// What the Node reports of the machine it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel_version: String,
    pub os_image: String,
}

impl Machine {
    /// Reads the machine from /proc and /sys (and /etc/os-release, whose absence leaves the
    /// OS image empty); errors name the file.
    pub fn read() -> anyhow::Result<Self> {
        let read = |path: &str| fs::read_to_string(path).with_context(|| format!("reading {path}"));
        let online = read("/sys/devices/system/cpu/online")?;
        let meminfo = read("/proc/meminfo")?;
        Ok(Machine {
            hostname: read("/proc/sys/kernel/hostname")?.trim().to_string(),
            cpus: cpu_count(&online)
                .with_context(|| format!("/sys/devices/system/cpu/online: {online:?}"))?,
            memory_bytes: mem_total(&meminfo).context("/proc/meminfo has no MemTotal")?,
            kernel_version: read("/proc/sys/kernel/osrelease")?.trim().to_string(),
            os_image: fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|text| pretty_name(&text))
                .unwrap_or_default(),
        })
    }
}

/// The number of CPUs in a kernel CPU list such as "0-3,6,8-9".
fn cpu_count(list: &str) -> Option<u32> {
    list.trim().split(',').try_fold(0, |count, range| {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
        Some(count + last.checked_sub(first)? + 1)
    })
}

/// MemTotal of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// PRETTY_NAME of /etc/os-release, unquoted.
fn pretty_name(os_release: &str) -> Option<String> {
    let value = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))?;
    Some(value.trim().trim_matches('"').to_string())
}

/// The container runtime as last seen: its `name://version` (CRI Version) while it answers,
/// else why not.
pub type RuntimeState = Result<String, String>;

/// The CRI runtime's `name://version`, as the kubelet reports it in nodeInfo.
pub fn runtime_version(version: &k8s_cri::v1::VersionResponse) -> String {
    format!("{}://{}", version.runtime_name, version.runtime_version)
}

/// The Node this agent registers as `name`: its labels, addresses, capacity and allocatable,
/// nodeInfo and the Ready condition (True while the runtime answers), heartbeat `now`, last
/// changed at `ready_since`.
pub fn node(
    name: &str,
    host_ip: Option<Ipv4Addr>,
    machine: &Machine,
    runtime: &RuntimeState,
    now: Timestamp,
    ready_since: Timestamp,
) -> Node {
    let labels = [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", std::env::consts::OS),
        ("kubernetes.io/arch", go_arch()),
    ];
    let mut addresses: Vec<NodeAddress> = host_ip
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        })
        .into_iter()
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: machine.hostname.clone(),
    });
    let capacity = resources(machine.cpus, machine.memory_bytes);
    let allocatable = resources(
        machine.cpus,
        machine.memory_bytes.saturating_sub(EVICTION_HARD_MEMORY),
    );
    let (status, reason, message) = match runtime {
        Ok(_) => (
            "True",
            "KubeletReady",
            "kubelet is posting ready status".into(),
        ),
        Err(why) => (
            "False",
            "KubeletNotReady",
            format!("container runtime is down: {why}"),
        ),
    };
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(addresses),
            capacity: Some(capacity),
            allocatable: Some(allocatable),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(Time(ready_since)),
            }]),
            node_info: Some(NodeSystemInfo {
                architecture: go_arch().into(),
                operating_system: std::env::consts::OS.into(),
                kernel_version: machine.kernel_version.clone(),
                os_image: machine.os_image.clone(),
                container_runtime_version: runtime.clone().unwrap_or_default(),
                kubelet_version: concat!("v", env!("CARGO_PKG_VERSION")).into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The architecture as Kubernetes (Go) names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn resources(cpus: u32, memory_bytes: u64) -> BTreeMap<String, Quantity> {
    [
        ("cpu", cpus.to_string()),
        ("memory", format!("{}Ki", memory_bytes / 1024)),
        ("pods", MAX_PODS.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect()
}

/// Registers `node`: creates it, or when it exists already patches its status. Returns the
/// Node's `spec.podCIDR` (None until the controller-manager assigns one).
pub async fn register(client: Client, node: &Node) -> anyhow::Result<Option<String>> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let nodes: Api<Node> = Api::all(client.clone());
    let registered = match nodes.create(&PostParams::default(), node).await {
        Ok(created) => created,
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            patch_node_status(client, node).await?
        }
        Err(e) => return Err(e).with_context(|| format!("registering Node {name}")),
    };
    Ok(registered.spec.and_then(|spec| spec.pod_cidr))
}

/// Patches the status of the registered `node` (its conditions merge by type, as the
/// kubelet's do, so conditions others own stay) and returns the Node.
pub async fn patch_node_status(client: Client, node: &Node) -> anyhow::Result<Node> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({"status": node.status});
    Api::<Node>::all(client)
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .with_context(|| format!("patching the status of Node {name}"))
}

/// The Lease `node_name` holds, renewed at `now`.
fn lease_spec(node_name: &str, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(node_name.into()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    }
}

/// Renews the node's heartbeat Lease at `now`: creates it, or replaces its spec (the
/// resourceVersion read makes a concurrent change a conflict rather than lost).
pub async fn renew_lease(client: Client, node_name: &str, now: Timestamp) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let context = || format!("renewing Lease {LEASE_NAMESPACE}/{node_name}");
    let spec = lease_spec(node_name, now);
    match leases.get_opt(node_name).await.with_context(context)? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node_name.into()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            lease.spec = Some(spec);
            leases
                .replace(node_name, &PostParams::default(), &lease)
                .await
        }
    }
    .with_context(context)?;
    Ok(())
}

/// Renews the node's Lease every [`LEASE_RENEW`], logging failures; runs until dropped.
pub async fn run_lease(client: Client, node_name: String) {
    let mut every = tokio::time::interval(LEASE_RENEW);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = renew_lease(client.clone(), &node_name, Timestamp::now()).await {
            warn!("{e:#}");
        }
    }
}

/// Patches `pod`'s status through its status subresource unless it equals `last_sent`;
/// returns whether it sent. The patch carries the pod's UID so that a pod recreated under
/// the same name is not given its predecessor's status.
pub async fn patch_pod_status(
    client: Client,
    pod: &Pod,
    last_sent: Option<&PodStatus>,
) -> anyhow::Result<bool> {
    if pod.status.as_ref() == last_sent {
        return Ok(false);
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({"metadata": {"uid": pod.metadata.uid}, "status": pod.status});
    Api::<Pod>::namespaced(client, namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .with_context(|| format!("patching the status of Pod {namespace}/{name}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock::{self, Handle};

    use super::*;

    type Server = Handle<Request<Body>, Response<Body>>;

    fn client() -> (Client, Server) {
        let (transport, server) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(transport, "default"), server)
    }

    /// Answers the next request with `status` and `body` after checking its method and
    /// path; returns its query and JSON body (Null when empty).
    async fn serve(
        server: &mut Server,
        method: Method,
        path: &str,
        status: StatusCode,
        body: Value,
    ) -> (String, Value) {
        let (request, respond) = pin!(server).next_request().await.expect("a request");
        assert_eq!(request.method(), method, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        let query = request.uri().query().unwrap_or_default().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        if method == Method::PATCH {
            let expected = "application/strategic-merge-patch+json";
            assert_eq!(content_type.as_deref(), Some(expected));
        }
        let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *response.status_mut() = status;
        respond.send_response(response);
        (query, sent)
    }

    fn api_status(code: StatusCode, reason: &str, message: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": reason, "message": message, "code": code.as_u16()})
    }

    fn machine() -> Machine {
        Machine {
            hostname: "worker-1".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            kernel_version: "6.18.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn worker_node(runtime: &RuntimeState) -> Node {
        let ip = Some(Ipv4Addr::new(10, 0, 0, 7));
        node("worker-1", ip, &machine(), runtime, at(30), at(0))
    }

    #[test]
    fn machine_files_parse() {
        for (list, cpus) in [
            ("0-3\n", Some(4)),
            ("0\n", Some(1)),
            ("0-3,6,8-9", Some(7)),
            ("", None),
            ("3-1", None),
            ("a-b", None),
        ] {
            assert_eq!(cpu_count(list), cpus, "{list:?}");
        }
        let meminfo = "MemTotal:        8048576 kB\nMemFree:  1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(8_048_576 * 1024));
        assert_eq!(mem_total("MemFree:  1000 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        let os_release =
            "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            pretty_name(os_release).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("NAME=x\n"), None);
    }

    #[test]
    fn this_machine_reads() {
        let machine = Machine::read().unwrap();
        assert!(machine.cpus >= 1, "{machine:?}");
        assert!(machine.memory_bytes > EVICTION_HARD_MEMORY, "{machine:?}");
        assert!(!machine.hostname.is_empty(), "{machine:?}");
        assert!(!machine.kernel_version.is_empty(), "{machine:?}");
    }

    /// (runtime state, Ready status, reason, message contains, containerRuntimeVersion)
    #[test]
    fn the_node_reports_the_machine_and_is_ready_while_the_runtime_answers() {
        let cases: [(RuntimeState, &str, &str, &str, &str); 2] = [
            (
                Ok("containerd://2.1.4".into()),
                "True",
                "KubeletReady",
                "ready",
                "containerd://2.1.4",
            ),
            (
                Err("connection refused".into()),
                "False",
                "KubeletNotReady",
                "container runtime is down: connection refused",
                "",
            ),
        ];
        for (runtime, ready, reason, message, version) in cases {
            let node = serde_json::to_value(worker_node(&runtime)).unwrap();
            let labels = &node["metadata"]["labels"];
            assert_eq!(labels["kubernetes.io/hostname"], "worker-1");
            assert_eq!(labels["kubernetes.io/os"], "linux");
            assert_eq!(labels["kubernetes.io/arch"], go_arch());
            let status = &node["status"];
            assert_eq!(
                status["addresses"],
                json!([{"type": "InternalIP", "address": "10.0.0.7"},
                       {"type": "Hostname", "address": "worker-1"}])
            );
            assert_eq!(
                status["capacity"],
                json!({"cpu": "4", "memory": "8388608Ki", "pods": "110"})
            );
            assert_eq!(
                status["allocatable"],
                json!({"cpu": "4", "memory": "8286208Ki", "pods": "110"})
            );
            let condition = &status["conditions"][0];
            assert_eq!(condition["type"], "Ready");
            assert_eq!(condition["status"], ready);
            assert_eq!(condition["reason"], reason);
            let text = condition["message"].as_str().unwrap();
            assert!(text.contains(message), "{text}");
            assert_eq!(condition["lastHeartbeatTime"], "2023-11-14T22:13:50Z");
            assert_eq!(condition["lastTransitionTime"], "2023-11-14T22:13:20Z");
            let info = &status["nodeInfo"];
            assert_eq!(info["containerRuntimeVersion"], version);
            assert_eq!(
                info["kubeletVersion"],
                concat!("v", env!("CARGO_PKG_VERSION"))
            );
            assert_eq!(info["kernelVersion"], "6.18.0");
            assert_eq!(info["osImage"], "Debian GNU/Linux 12 (bookworm)");
            assert_eq!(info["operatingSystem"], "linux");
        }
        let no_ip = node("n", None, &machine(), &Ok(String::new()), at(0), at(0));
        let addresses = no_ip.status.unwrap().addresses.unwrap();
        assert_eq!(addresses.len(), 1);
        assert_eq!(addresses[0].type_, "Hostname");
    }

    #[tokio::test]
    async fn register_creates_the_node_on_a_fresh_cluster() {
        let (client, mut server) = client();
        let node = worker_node(&Ok("containerd://2.1.4".into()));
        let registering = tokio::spawn(async move { register(client, &node).await });
        let created = json!({"apiVersion": "v1", "kind": "Node",
                             "metadata": {"name": "worker-1", "uid": "u1"}, "spec": {}});
        let (_, sent) = serve(
            &mut server,
            Method::POST,
            "/api/v1/nodes",
            StatusCode::CREATED,
            created,
        )
        .await;
        assert_eq!(sent["metadata"]["name"], "worker-1");
        assert_eq!(sent["status"]["conditions"][0]["status"], "True");
        assert_eq!(sent["status"]["capacity"]["cpu"], "4");
        assert_eq!(registering.await.unwrap().unwrap(), None);
    }

    #[tokio::test]
    async fn register_patches_the_status_of_an_existing_node_and_returns_its_pod_cidr() {
        let (client, mut server) = client();
        let node = worker_node(&Err("connection refused".into()));
        let registering = tokio::spawn(async move { register(client, &node).await });
        let exists = api_status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            "nodes \"worker-1\" already exists",
        );
        serve(
            &mut server,
            Method::POST,
            "/api/v1/nodes",
            StatusCode::CONFLICT,
            exists,
        )
        .await;
        let existing = json!({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": "worker-1"},
                              "spec": {"podCIDR": "10.244.3.0/24"}});
        let (_, sent) = serve(
            &mut server,
            Method::PATCH,
            "/api/v1/nodes/worker-1/status",
            StatusCode::OK,
            existing,
        )
        .await;
        let condition = &sent["status"]["conditions"][0];
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "KubeletNotReady");
        assert_eq!(sent["status"]["addresses"][0]["address"], "10.0.0.7");
        assert_eq!(
            registering.await.unwrap().unwrap().as_deref(),
            Some("10.244.3.0/24")
        );
    }

    #[tokio::test]
    async fn a_forbidden_registration_names_the_node_and_the_reason() {
        let (client, mut server) = client();
        let node = worker_node(&Ok("containerd://2.1.4".into()));
        let registering = tokio::spawn(async move { register(client, &node).await });
        let message =
            "nodes is forbidden: User \"system:anonymous\" cannot create resource \"nodes\"";
        serve(
            &mut server,
            Method::POST,
            "/api/v1/nodes",
            StatusCode::FORBIDDEN,
            api_status(StatusCode::FORBIDDEN, "Forbidden", message),
        )
        .await;
        let error = format!("{:#}", registering.await.unwrap().unwrap_err());
        assert!(error.contains("registering Node worker-1"), "{error}");
        assert!(
            error.contains("cannot create resource \"nodes\""),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_lease_is_created_then_renewed() {
        let (client, mut server) = client();
        let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
        let lease_path = format!("{path}/worker-1");
        let stored = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "worker-1", "namespace": "kube-node-lease",
                         "resourceVersion": "5"},
            "spec": {"holderIdentity": "worker-1", "leaseDurationSeconds": 40,
                     "renewTime": "2023-11-14T22:13:20.000000Z"}});

        let first = tokio::spawn(renew_lease(client.clone(), "worker-1", at(0)));
        let missing = api_status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "leases.coordination.k8s.io \"worker-1\" not found",
        );
        serve(
            &mut server,
            Method::GET,
            &lease_path,
            StatusCode::NOT_FOUND,
            missing,
        )
        .await;
        let (_, sent) = serve(
            &mut server,
            Method::POST,
            path,
            StatusCode::CREATED,
            stored.clone(),
        )
        .await;
        first.await.unwrap().unwrap();
        assert_eq!(sent["metadata"]["name"], "worker-1");
        assert_eq!(sent["metadata"]["namespace"], "kube-node-lease");
        assert_eq!(sent["spec"]["holderIdentity"], "worker-1");
        assert_eq!(sent["spec"]["leaseDurationSeconds"], 40);
        assert_eq!(sent["spec"]["renewTime"], "2023-11-14T22:13:20.000000Z");

        let second = tokio::spawn(renew_lease(client, "worker-1", at(10)));
        serve(
            &mut server,
            Method::GET,
            &lease_path,
            StatusCode::OK,
            stored.clone(),
        )
        .await;
        let (_, sent) = serve(
            &mut server,
            Method::PUT,
            &lease_path,
            StatusCode::OK,
            stored,
        )
        .await;
        second.await.unwrap().unwrap();
        assert_eq!(sent["metadata"]["resourceVersion"], "5");
        assert_eq!(sent["spec"]["holderIdentity"], "worker-1");
        assert_eq!(sent["spec"]["leaseDurationSeconds"], 40);
        assert_eq!(sent["spec"]["renewTime"], "2023-11-14T22:13:30.000000Z");
    }

    #[tokio::test]
    async fn a_pod_status_is_patched_once_until_it_changes() {
        let (client, mut server) = client();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web-0", "uid": "9f1c"},
            "status": {"phase": "Running", "podIP": "10.244.3.9",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let sending = pod.clone();
        let sender = client.clone();
        let patching = tokio::spawn(async move { patch_pod_status(sender, &sending, None).await });
        let (_, sent) = serve(
            &mut server,
            Method::PATCH,
            "/api/v1/namespaces/shop/pods/web-0/status",
            StatusCode::OK,
            serde_json::to_value(&pod).unwrap(),
        )
        .await;
        assert!(patching.await.unwrap().unwrap());
        assert_eq!(sent["metadata"], json!({"uid": "9f1c"}));
        assert_eq!(sent["status"]["phase"], "Running");
        assert_eq!(sent["status"]["podIP"], "10.244.3.9");
        assert_eq!(sent["status"]["conditions"][0]["type"], "Ready");

        // Unchanged: no request (one would never be answered, and time out).
        let sent_before = pod.status.clone();
        let unchanged = patch_pod_status(client, &pod, sent_before.as_ref());
        let patched = tokio::time::timeout(Duration::from_secs(5), unchanged).await;
        assert!(!patched.expect("no request").unwrap());
    }

    #[tokio::test]
    async fn a_forbidden_patch_names_the_pod_and_the_reason() {
        let (client, mut server) = client();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web-0"},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let patching = tokio::spawn(async move { patch_pod_status(client, &pod, None).await });
        let message = "pods \"web-0\" is forbidden: User \"system:serviceaccount:kube-system:node-agent\" cannot patch resource \"pods/status\"";
        serve(
            &mut server,
            Method::PATCH,
            "/api/v1/namespaces/shop/pods/web-0/status",
            StatusCode::FORBIDDEN,
            api_status(StatusCode::FORBIDDEN, "Forbidden", message),
        )
        .await;
        let error = format!("{:#}", patching.await.unwrap().unwrap_err());
        assert!(
            error.contains("patching the status of Pod shop/web-0"),
            "{error}"
        );
        assert!(
            error.contains("cannot patch resource \"pods/status\""),
            "{error}"
        );
    }
}
