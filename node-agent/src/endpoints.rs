//! The built-in endpoints controller (standalone): the EndpointSlices of the Services with a
//! selector, made from the local pods they select as Kubernetes' EndpointSlice controller makes
//! them. Pure: the source tells it the Services, the kubelet its pods, and the proxy stages the
//! slices it hands back like any others, so readiness reaches the datapath with no API round
//! trip.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        core::v1::{ContainerPort, ObjectReference, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::model::ObjectName;

/// The value of `endpointslice.kubernetes.io/managed-by` on the slices made here.
pub const MANAGED_BY: &str = "node-agent";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The EndpointSlice controller's default `--max-endpoints-per-slice`.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What the kubelet knows of a pod on this node. A pod that has finished (phase Succeeded or
/// Failed) has no endpoints: it is set as `None`, like a pod that is gone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalPod {
    pub labels: BTreeMap<String, String>,
    pub ip: Option<Ipv4Addr>,
    /// The pod's Ready condition.
    pub ready: bool,
    /// The pod is being deleted (metadata.deletionTimestamp is set).
    pub terminating: bool,
    /// The ports of all its containers.
    pub ports: Vec<ContainerPort>,
}

impl LocalPod {
    /// What the controller uses of a pod the kubelet reports; None once it has finished.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Some(Self {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            ready,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            ports: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .cloned()
                .collect(),
        })
    }
}

/// What the controller uses of a Service with a selector.
#[derive(Debug, PartialEq)]
struct Selecting {
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
    publish_not_ready_addresses: bool,
}

impl Selecting {
    /// `None` for the Services the controller leaves alone: no selector (their EndpointSlices
    /// come from elsewhere), or ExternalName (no endpoints at all).
    fn of(service: &Service) -> Option<Self> {
        let spec = service.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
        Some(Self {
            selector,
            ports: spec.ports.clone().unwrap_or_default(),
            publish_not_ready_addresses: spec.publish_not_ready_addresses == Some(true),
        })
    }

    /// Every selector entry is among `labels`.
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The controller: the Services with a selector, the local pods, and the slices last handed
/// out for each Service.
#[derive(Debug)]
pub struct Endpoints {
    node_name: String,
    services: BTreeMap<ObjectName, Selecting>,
    pods: BTreeMap<ObjectName, LocalPod>,
    published: BTreeMap<ObjectName, BTreeMap<ObjectName, EndpointSlice>>,
    /// Services whose slices may have changed since the last `take_changes`.
    touched: BTreeSet<ObjectName>,
}

impl Endpoints {
    pub fn new(node_name: String) -> Self {
        Self {
            node_name,
            services: BTreeMap::new(),
            pods: BTreeMap::new(),
            published: BTreeMap::new(),
            touched: BTreeSet::new(),
        }
    }

    /// Takes in changed Services (`None`: deleted), as the source reports them.
    pub fn apply_services(&mut self, services: &BTreeMap<ObjectName, Option<Service>>) {
        for (name, service) in services {
            let new = service.as_ref().and_then(Selecting::of);
            if self.services.get(name) == new.as_ref() {
                continue;
            }
            self.touched.insert(name.clone());
            match new {
                Some(new) => self.services.insert(name.clone(), new),
                None => self.services.remove(name),
            };
        }
    }

    /// Sets what is known of a local pod (`None`: gone, or finished).
    pub fn set_pod(&mut self, pod: ObjectName, state: Option<LocalPod>) {
        let old = self.pods.get(&pod);
        if old == state.as_ref() {
            return;
        }
        // The Services that selected it, or select it now.
        let states = [old, state.as_ref()];
        for (service, selecting) in in_namespace(&self.services, &pod.namespace) {
            if states
                .iter()
                .flatten()
                .any(|p| selecting.selects(&p.labels))
            {
                self.touched.insert(service.clone());
            }
        }
        match state {
            Some(state) => self.pods.insert(pod, state),
            None => self.pods.remove(&pod),
        };
    }

    /// The slices of the Services touched since the last call that changed: new or changed
    /// ones as `Some`, those that no longer exist as `None`.
    pub fn take_changes(&mut self) -> BTreeMap<ObjectName, Option<EndpointSlice>> {
        let mut changes = BTreeMap::new();
        for service in std::mem::take(&mut self.touched) {
            let wanted = match self.services.get(&service) {
                Some(selecting) => self.slices(&service, selecting),
                None => BTreeMap::new(),
            };
            let before = self.published.remove(&service).unwrap_or_default();
            for name in before.keys().filter(|n| !wanted.contains_key(*n)) {
                changes.insert(name.clone(), None);
            }
            for (name, slice) in &wanted {
                if before.get(name) != Some(slice) {
                    changes.insert(name.clone(), Some(slice.clone()));
                }
            }
            if !wanted.is_empty() {
                self.published.insert(service, wanted);
            }
        }
        changes
    }

    /// The slices `service` should have: its selected pods grouped by the ports they resolve
    /// to, at most `MAX_ENDPOINTS_PER_SLICE` to a slice. None when it selects no pod.
    fn slices(
        &self,
        service: &ObjectName,
        selecting: &Selecting,
    ) -> BTreeMap<ObjectName, EndpointSlice> {
        // Keyed by each Service port's resolved target port (None: the pod has no such port).
        let mut groups: BTreeMap<Vec<Option<i32>>, Vec<Endpoint>> = BTreeMap::new();
        for (pod, state) in in_namespace(&self.pods, &service.namespace) {
            let Some(ip) = state.ip.filter(|_| selecting.selects(&state.labels)) else {
                continue;
            };
            let ports = selecting
                .ports
                .iter()
                .map(|p| target_port(p, &state.ports))
                .collect();
            let endpoint = self.endpoint(pod, state, ip, selecting.publish_not_ready_addresses);
            groups.entry(ports).or_default().push(endpoint);
        }
        let chunks = groups.iter().flat_map(|(resolved, endpoints)| {
            endpoints
                .chunks(MAX_ENDPOINTS_PER_SLICE)
                .map(move |chunk| (resolved, chunk))
        });
        chunks
            .enumerate()
            .map(|(i, (resolved, endpoints))| {
                let name = match i {
                    0 => format!("{}-{MANAGED_BY}", service.name),
                    i => format!("{}-{MANAGED_BY}-{}", service.name, i + 1),
                };
                let name = ObjectName {
                    namespace: service.namespace.clone(),
                    name: name.into(),
                };
                let ports = selecting.ports.iter().zip(resolved);
                let ports = ports.filter_map(|(p, resolved)| {
                    resolved.map(|port| EndpointPort {
                        name: Some(p.name.clone().unwrap_or_default()),
                        protocol: Some(protocol(p.protocol.as_deref()).into()),
                        port: Some(port),
                        app_protocol: p.app_protocol.clone(),
                    })
                });
                let slice = EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(name.name.to_string()),
                        namespace: Some(name.namespace.to_string()),
                        labels: Some(BTreeMap::from([
                            (SERVICE_NAME_LABEL.into(), service.name.to_string()),
                            (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                        ])),
                        ..ObjectMeta::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Some(endpoints.to_vec()),
                    ports: Some(ports.collect()),
                };
                (name, slice)
            })
            .collect()
    }

    fn endpoint(
        &self,
        pod: &ObjectName,
        state: &LocalPod,
        ip: Ipv4Addr,
        publish_not_ready: bool,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (state.ready && !state.terminating)),
                serving: Some(state.ready),
                terminating: Some(state.terminating),
            }),
            node_name: Some(self.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.to_string()),
                name: Some(pod.name.to_string()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }
}

/// The entries of `map` in `namespace`.
fn in_namespace<'a, V>(
    map: &'a BTreeMap<ObjectName, V>,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a ObjectName, &'a V)> {
    let start = ObjectName {
        namespace: namespace.into(),
        name: "".into(),
    };
    map.range(start..)
        .take_while(move |(name, _)| &*name.namespace == namespace)
}

/// The pod port a Service port sends to: its targetPort number, the container port of that
/// name and the same protocol, or the Service port when targetPort is unset (as the API server
/// defaults it). `None` when the pod has no port of that name.
fn target_port(port: &ServicePort, pod_ports: &[ContainerPort]) -> Option<i32> {
    match &port.target_port {
        None | Some(IntOrString::Int(0)) => Some(port.port),
        Some(IntOrString::String(name)) if name.is_empty() => Some(port.port),
        Some(IntOrString::Int(number)) => Some(*number),
        Some(IntOrString::String(name)) => pod_ports
            .iter()
            .find(|p| {
                p.name.as_ref() == Some(name)
                    && protocol(p.protocol.as_deref()) == protocol(port.protocol.as_deref())
            })
            .map(|p| p.container_port),
    }
}

/// A port's protocol; TCP when unset (the API server's default).
fn protocol(protocol: Option<&str>) -> &str {
    protocol.unwrap_or("TCP")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        model::{Changes, Node},
        proxy::Compiler,
    };

    fn name(namespace: &str, name: &str) -> ObjectName {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Service `default/<svc>` with `spec` (ClusterIP 10.96.0.10 unless given).
    fn service(svc: &str, spec: Value) -> (ObjectName, Option<Service>) {
        let mut object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10"},
        });
        for (k, v) in spec.as_object().unwrap() {
            object["spec"][k] = v.clone();
        }
        (
            name("default", svc),
            Some(serde_json::from_value(object).unwrap()),
        )
    }

    /// A ready, not terminating pod `default/<pod>` labelled `app: <app>`, with container
    /// ports (name, port, protocol).
    fn pod(pod: &str, app: &str, ip: &str, ports: &[(&str, i32, &str)]) -> (ObjectName, LocalPod) {
        let ports = ports
            .iter()
            .map(|(name, port, protocol)| ContainerPort {
                name: Some(name.to_string()),
                container_port: *port,
                protocol: Some(protocol.to_string()),
                ..ContainerPort::default()
            })
            .collect();
        let state = LocalPod {
            labels: BTreeMap::from([("app".into(), app.into())]),
            ip: ip.parse().ok(),
            ready: true,
            terminating: false,
            ports,
        };
        (name("default", pod), state)
    }

    fn with(
        (name, mut state): (ObjectName, LocalPod),
        change: impl FnOnce(&mut LocalPod),
    ) -> (ObjectName, LocalPod) {
        change(&mut state);
        (name, state)
    }

    /// Each slice as one line: `name ports | ip(pod conditions) ...`, or `name deleted`.
    fn lines(changes: &BTreeMap<ObjectName, Option<EndpointSlice>>) -> Vec<String> {
        changes
            .iter()
            .map(|(name, slice)| {
                let Some(slice) = slice else {
                    return format!("{name} deleted");
                };
                let ports: Vec<String> = (slice.ports.iter().flatten())
                    .map(|p| {
                        let (name, proto) = (p.name.as_deref().unwrap(), p.protocol.as_deref());
                        format!("{name}:{}/{}", p.port.unwrap(), proto.unwrap())
                    })
                    .collect();
                let endpoints: Vec<String> = (slice.endpoints.iter().flatten())
                    .map(|e| {
                        let c = e.conditions.as_ref().unwrap();
                        let conditions: Vec<&str> = [
                            (c.ready, "ready"),
                            (c.serving, "serving"),
                            (c.terminating, "terminating"),
                        ]
                        .into_iter()
                        .filter_map(|(set, word)| set.unwrap().then_some(word))
                        .collect();
                        let pod = e.target_ref.as_ref().unwrap().name.as_deref().unwrap();
                        format!("{}({pod} {})", e.addresses[0], conditions.join(","))
                    })
                    .collect();
                format!("{name} {} | {}", ports.join(" "), endpoints.join(" "))
            })
            .collect()
    }

    fn controller(
        services: Vec<(ObjectName, Option<Service>)>,
        pods: Vec<(ObjectName, LocalPod)>,
    ) -> Endpoints {
        let mut endpoints = Endpoints::new("node-a".into());
        endpoints.apply_services(&services.into_iter().collect());
        for (name, state) in pods {
            endpoints.set_pod(name, Some(state));
        }
        endpoints
    }

    #[test]
    fn slices_table() {
        let http = json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
        let web_port = [("http", 8080, "TCP")];
        let cases: Vec<(&str, Vec<_>, Vec<_>, Vec<&str>)> = vec![
            (
                "selected pods by labels and namespace; pods without IP skipped",
                vec![service("web", http.clone())],
                vec![
                    pod("a", "web", "10.244.0.2", &web_port),
                    pod("b", "web", "10.244.0.3", &web_port),
                    pod("c", "db", "10.244.0.4", &web_port),
                    pod("d", "web", "", &web_port),
                    (
                        name("other", "e"),
                        pod("e", "web", "10.244.0.5", &web_port).1,
                    ),
                ],
                vec![
                    "default/web-node-agent http:8080/TCP | 10.244.0.2(a ready,serving) 10.244.0.3(b ready,serving)",
                ],
            ),
            (
                "every selector entry must match",
                vec![service(
                    "web",
                    json!({"selector": {"app": "web", "tier": "front"}, "ports": [{"port": 80}]}),
                )],
                vec![
                    pod("a", "web", "10.244.0.2", &[]),
                    with(pod("b", "web", "10.244.0.3", &[]), |p| {
                        p.labels.insert("tier".into(), "front".into());
                    }),
                ],
                vec!["default/web-node-agent :80/TCP | 10.244.0.3(b ready,serving)"],
            ),
            (
                "not ready, terminating, and terminating while ready",
                vec![service("web", http.clone())],
                vec![
                    with(pod("a", "web", "10.244.0.2", &web_port), |p| {
                        p.ready = false
                    }),
                    with(pod("b", "web", "10.244.0.3", &web_port), |p| {
                        p.terminating = true
                    }),
                    with(pod("c", "web", "10.244.0.4", &web_port), |p| {
                        (p.ready, p.terminating) = (false, true)
                    }),
                ],
                vec![
                    "default/web-node-agent http:8080/TCP | 10.244.0.2(a ) 10.244.0.3(b serving,terminating) 10.244.0.4(c terminating)",
                ],
            ),
            (
                "publishNotReadyAddresses: every endpoint ready",
                vec![service(
                    "web",
                    json!({"selector": {"app": "web"}, "ports": [{"port": 80}], "publishNotReadyAddresses": true}),
                )],
                vec![with(pod("a", "web", "10.244.0.2", &[]), |p| {
                    p.ready = false
                })],
                vec!["default/web-node-agent :80/TCP | 10.244.0.2(a ready)"],
            ),
            (
                "targetPort: number, unset, 0 and named with the protocol",
                vec![service(
                    "dns",
                    json!({"selector": {"app": "dns"}, "ports": [
                        {"name": "a", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                        {"name": "b", "port": 53, "targetPort": "dns"},
                        {"name": "c", "port": 80, "targetPort": 8080},
                        {"name": "d", "port": 81},
                        {"name": "e", "port": 82, "targetPort": 0},
                    ]}),
                )],
                vec![pod(
                    "a",
                    "dns",
                    "10.244.0.2",
                    &[("dns", 5353, "UDP"), ("dns", 5300, "TCP")],
                )],
                vec![
                    "default/dns-node-agent a:5353/UDP b:5300/TCP c:8080/TCP d:81/TCP e:82/TCP | 10.244.0.2(a ready,serving)",
                ],
            ),
            (
                "pods resolving a named port differently, or not at all, are in different slices",
                vec![service(
                    "web",
                    json!({"selector": {"app": "web"}, "ports": [
                        {"name": "http", "port": 80, "targetPort": "http"},
                        {"name": "metrics", "port": 9090, "targetPort": "metrics"},
                    ]}),
                )],
                vec![
                    pod(
                        "a",
                        "web",
                        "10.244.0.2",
                        &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
                    ),
                    pod(
                        "b",
                        "web",
                        "10.244.0.3",
                        &[("http", 8081, "TCP"), ("metrics", 9100, "TCP")],
                    ),
                    pod(
                        "c",
                        "web",
                        "10.244.0.4",
                        &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
                    ),
                    // The name matches but not the protocol: not resolved.
                    pod(
                        "d",
                        "web",
                        "10.244.0.5",
                        &[("http", 8080, "TCP"), ("metrics", 9100, "UDP")],
                    ),
                ],
                vec![
                    "default/web-node-agent http:8080/TCP | 10.244.0.5(d ready,serving)",
                    "default/web-node-agent-2 http:8080/TCP metrics:9100/TCP | 10.244.0.2(a ready,serving) 10.244.0.4(c ready,serving)",
                    "default/web-node-agent-3 http:8081/TCP metrics:9100/TCP | 10.244.0.3(b ready,serving)",
                ],
            ),
            (
                "Services the controller leaves alone: no selector, an empty one, ExternalName",
                vec![
                    service("a", json!({"ports": [{"port": 80}]})),
                    service("b", json!({"selector": {}, "ports": [{"port": 80}]})),
                    service(
                        "c",
                        json!({"type": "ExternalName", "externalName": "example.com", "selector": {"app": "web"}}),
                    ),
                ],
                vec![pod("a", "web", "10.244.0.2", &[])],
                vec![],
            ),
            (
                "a Service selecting no pod has no slice",
                vec![service("web", http.clone())],
                vec![pod("a", "db", "10.244.0.2", &web_port)],
                vec![],
            ),
        ];
        for (what, services, pods, want) in cases {
            let got = controller(services, pods).take_changes();
            assert_eq!(lines(&got), want, "{what}");
        }
    }

    #[test]
    fn a_slice_is_the_controllers_endpoint_slice() {
        let mut endpoints = controller(
            vec![service(
                "web",
                json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]}),
            )],
            vec![pod("a", "web", "10.244.0.2", &[])],
        );
        let changes = endpoints.take_changes();
        let slice = changes[&name("default", "web-node-agent")]
            .as_ref()
            .unwrap();
        assert_eq!(
            serde_json::to_value(slice).unwrap(),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-node-agent", "namespace": "default", "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "node-agent",
                }},
                "addressType": "IPv4",
                "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"}],
                "endpoints": [{
                    "addresses": ["10.244.0.2"],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node-a",
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "a"},
                }],
            })
        );
    }

    #[test]
    fn at_most_100_endpoints_to_a_slice() {
        let pods = (0..150)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    "web",
                    &format!("10.244.{}.{}", i / 200, i % 200 + 1),
                    &[],
                )
            })
            .collect();
        let mut endpoints = controller(
            vec![service(
                "web",
                json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}),
            )],
            pods,
        );
        let changes = endpoints.take_changes();
        let sizes: Vec<(String, usize)> = changes
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    s.as_ref().unwrap().endpoints.as_ref().unwrap().len(),
                )
            })
            .collect();
        assert_eq!(
            sizes,
            [
                ("default/web-node-agent".into(), 100),
                ("default/web-node-agent-2".into(), 50)
            ]
        );
    }

    #[test]
    fn only_what_changed_since_the_last_call_is_reported() {
        let http = json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
        let (a, ready_a) = pod("a", "web", "10.244.0.2", &[]);
        let (b, ready_b) = pod("b", "web", "10.244.0.3", &[]);
        let mut endpoints = controller(vec![service("web", http.clone())], vec![]);
        assert_eq!(lines(&endpoints.take_changes()), Vec::<String>::new());

        endpoints.set_pod(a.clone(), Some(ready_a.clone()));
        endpoints.set_pod(b.clone(), Some(ready_b.clone()));
        assert_eq!(
            lines(&endpoints.take_changes()),
            [
                "default/web-node-agent http:8080/TCP | 10.244.0.2(a ready,serving) 10.244.0.3(b ready,serving)"
            ]
        );
        assert!(endpoints.take_changes().is_empty(), "nothing new");

        // The same state again, the Service applied again unchanged, a pod no Service selects.
        endpoints.set_pod(a.clone(), Some(ready_a.clone()));
        endpoints.apply_services(&BTreeMap::from([service("web", http.clone())]));
        let (c, db) = pod("c", "db", "10.244.0.4", &[]);
        endpoints.set_pod(c.clone(), Some(db.clone()));
        endpoints.set_pod(c, None);
        assert!(endpoints.take_changes().is_empty(), "nothing changed");

        // Readiness lost: the slice changes.
        let not_ready = LocalPod {
            ready: false,
            ..ready_a.clone()
        };
        endpoints.set_pod(a.clone(), Some(not_ready));
        assert_eq!(
            lines(&endpoints.take_changes()),
            ["default/web-node-agent http:8080/TCP | 10.244.0.2(a ) 10.244.0.3(b ready,serving)"]
        );

        // Relabelled away from the Service: it leaves the slice.
        let relabelled = LocalPod {
            labels: BTreeMap::from([("app".into(), "other".into())]),
            ..ready_a.clone()
        };
        endpoints.set_pod(a.clone(), Some(relabelled));
        assert_eq!(
            lines(&endpoints.take_changes()),
            ["default/web-node-agent http:8080/TCP | 10.244.0.3(b ready,serving)"]
        );

        // The last pod goes: the slice is deleted.
        endpoints.set_pod(b.clone(), None);
        assert_eq!(
            lines(&endpoints.take_changes()),
            ["default/web-node-agent deleted"]
        );

        // Back; then the Service loses its selector, then comes back and is deleted.
        endpoints.set_pod(b.clone(), Some(ready_b));
        assert_eq!(endpoints.take_changes().len(), 1);
        endpoints.apply_services(&BTreeMap::from([service(
            "web",
            json!({"ports": [{"port": 80}]}),
        )]));
        assert_eq!(
            lines(&endpoints.take_changes()),
            ["default/web-node-agent deleted"]
        );
        endpoints.apply_services(&BTreeMap::from([service("web", http)]));
        assert_eq!(endpoints.take_changes().len(), 1);
        endpoints.apply_services(&BTreeMap::from([(name("default", "web"), None)]));
        assert_eq!(
            lines(&endpoints.take_changes()),
            ["default/web-node-agent deleted"]
        );
    }

    #[test]
    fn a_slice_group_gone_renames_the_others() {
        let svc = json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
        let mut endpoints = controller(
            vec![service("web", svc)],
            vec![
                pod("a", "web", "10.244.0.2", &[("http", 8080, "TCP")]),
                pod("b", "web", "10.244.0.3", &[("http", 8081, "TCP")]),
            ],
        );
        assert_eq!(endpoints.take_changes().len(), 2);
        endpoints.set_pod(name("default", "a"), None);
        assert_eq!(
            lines(&endpoints.take_changes()),
            [
                "default/web-node-agent http:8081/TCP | 10.244.0.3(b ready,serving)",
                "default/web-node-agent-2 deleted",
            ]
        );
    }

    /// The slices go through the proxy's compiler as they are: the Service gets its ready
    /// pods as backends, and loses one as soon as it is not ready.
    #[test]
    fn the_proxy_compiles_the_slices() {
        let ip = Ipv4Addr::new(192, 0, 2, 1);
        let mut compiler = Compiler::new(Node {
            name: "node-a".into(),
            ips: vec![ip],
            nodeport_ips: vec![ip],
        });
        let services: BTreeMap<_, _> = [service(
            "web",
            json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
        )]
        .into();
        let mut endpoints = controller(
            vec![],
            vec![
                pod("a", "web", "10.244.0.2", &[("http", 8080, "TCP")]),
                pod("b", "web", "10.244.0.3", &[("http", 8080, "TCP")]),
            ],
        );
        endpoints.apply_services(&services);
        let mut sync = |services, endpoints: &mut Endpoints| {
            compiler.stage(Changes {
                services,
                endpoint_slices: endpoints.take_changes(),
                ..Changes::default()
            });
            let update = compiler.commit();
            assert_eq!(update.errors, []);
            crate::lb::rows(&compiler.state())
                .iter()
                .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sync(services, &mut endpoints),
            ["10.96.0.10:80/TCP 10.244.0.2:8080/TCP 10.244.0.3:8080/TCP"]
        );
        let (a, state) = pod("a", "web", "10.244.0.2", &[("http", 8080, "TCP")]);
        endpoints.set_pod(
            a,
            Some(LocalPod {
                ready: false,
                ..state
            }),
        );
        assert_eq!(
            sync(BTreeMap::new(), &mut endpoints),
            ["10.96.0.10:80/TCP 10.244.0.3:8080/TCP"]
        );
        endpoints.set_pod(name("default", "b"), None);
        assert_eq!(
            sync(BTreeMap::new(), &mut endpoints),
            ["10.96.0.10:80/TCP (none: reject)"]
        );
    }
}
