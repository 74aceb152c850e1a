//! What the agent asks of the API server, per mode: deploy/kubernetes's Roles grant exactly
//! this (a test compares them), so a change to the calls the agent makes updates both.

/// Access to one resource: its API group ("" for core), name (with a subresource after a '/')
/// and verbs; `namespace` for a namespaced Role, None for a ClusterRole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiAccess {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub namespace: Option<&'static str>,
}

const fn cluster(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
) -> ApiAccess {
    ApiAccess {
        group,
        resource,
        verbs,
        namespace: None,
    }
}

/// Both modes: the proxy watches Services, their EndpointSlices (all namespaces) and its own
/// Node (list/watch with a name field selector, get at start).
pub const PROXY: &[ApiAccess] = &[
    cluster("", "services", &["list", "watch"]),
    cluster("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    cluster("", "nodes", &["get", "list", "watch"]),
];

/// Full-node mode (`--kubelet=true`) on top of [`PROXY`], as the kubelet: the Pods bound to
/// this node and the ConfigMaps/Secrets they use, mirror pods for static pods (create,
/// delete), pod status through its subresource, the Node's registration and status, its
/// heartbeat Lease, and Events (kube-rs's recorder patches a repeated Event's series).
pub const KUBELET: &[ApiAccess] = &[
    cluster("", "pods", &["get", "list", "watch", "create", "delete"]),
    cluster("", "pods/status", &["patch"]),
    cluster("", "configmaps", &["get", "list", "watch"]),
    cluster("", "secrets", &["get", "list", "watch"]),
    cluster("", "nodes", &["create", "patch"]),
    cluster("", "nodes/status", &["patch"]),
    cluster("events.k8s.io", "events", &["create", "patch"]),
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        namespace: Some("kube-node-lease"),
    },
];
