//! Compiles Services and EndpointSlices into the desired content of the datapath's maps.
//!
//! Pure: no I/O, and the same cluster with the same previous ids gives the same maps, so it is
//! table-tested without a kernel. Invalid objects are refused one by one with a message naming
//! the object and the field; they never disturb the others.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use node_common::{
    BACKENDS_MAX_ENTRIES, Backend, MAX_BACKENDS_PER_SERVICE, PROTO_TCP, PROTO_UDP,
    REV_NAT_MAX_ENTRIES, RevNat, ServiceValue,
};

use super::state::{Frontend, MapState};
use crate::model::{Cluster, ObjectError, ObjectName};

/// The label that links an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ids handed out to backends and frontends. They live as long as their object, and a freed id
/// is not handed out again soon, so a conntrack entry that outlives its backend can never land
/// on another one.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    backends: IdTable<Backend>,
    rev_nat: IdTable<Frontend>,
}

#[derive(Clone, Debug)]
struct IdTable<K> {
    ids: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
    last: u32,
}

impl<K> Default for IdTable<K> {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
            last: 0,
        }
    }
}

impl<K: Ord + Copy> IdTable<K> {
    /// A table with no ids yet that continues counting where `previous` stopped.
    fn after(previous: &Self) -> Self {
        Self {
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
            last: previous.last,
        }
    }

    /// The id `key` had before, or the next one free in both tables (ids start at 1; 0 means
    /// none). `None` when `capacity` ids are in use.
    fn get(&mut self, key: K, previous: &Self, max_id: u32, capacity: u32) -> Option<u32> {
        if let Some(&id) = self.ids.get(&key) {
            return Some(id);
        }
        let id = match previous.ids.get(&key) {
            Some(&id) => id,
            None => {
                if self.used.len() as u32 >= capacity {
                    return None;
                }
                let mut id = self.last;
                loop {
                    id = if id >= max_id { 1 } else { id + 1 };
                    if !self.used.contains(&id) && !previous.used.contains(&id) {
                        break;
                    }
                }
                self.last = id;
                id
            }
        };
        self.ids.insert(key, id);
        self.used.insert(id);
        Some(id)
    }
}

/// The compiler's output: the maps' desired content, the ids it used, and what it refused.
#[derive(Debug)]
pub struct Compiled {
    pub state: MapState,
    pub ids: Ids,
    pub errors: Vec<ObjectError>,
}

/// One port of a valid Service.
struct ServicePort {
    /// `spec.ports[].name`, "" when unnamed; EndpointSlice ports are matched by it.
    name: String,
    frontend: Frontend,
}

/// One port of a valid EndpointSlice, with the addresses of its ready endpoints.
struct SlicePort {
    name: String,
    port: u16,
    proto: u8,
}

struct SliceBackends {
    ports: Vec<SlicePort>,
    ready: Vec<Ipv4Addr>,
}

pub fn compile(cluster: &Cluster, previous: &Ids) -> Compiled {
    let mut errors = Vec::new();
    let slices = slices_by_service(cluster, &mut errors);
    let mut state = MapState::default();
    let mut ids = Ids {
        backends: IdTable::after(&previous.backends),
        rev_nat: IdTable::after(&previous.rev_nat),
    };
    let mut owners: BTreeMap<Frontend, &ObjectName> = BTreeMap::new();

    for (name, service) in &cluster.services {
        let ports = match service_ports(service) {
            Ok(ports) => ports,
            Err(reason) => {
                errors.push(ObjectError::new("Service", name, reason));
                continue;
            }
        };
        for port in ports {
            let frontend = port.frontend;
            if let Some(owner) = owners.get(&frontend) {
                errors.push(ObjectError::new(
                    "Service",
                    name,
                    format!("{frontend} is already used by Service {owner}; ignoring this port"),
                ));
                continue;
            }
            owners.insert(frontend, name);

            let mut backends: Vec<Backend> =
                backends_of(&port, slices.get(name)).into_iter().collect();
            if backends.len() > MAX_BACKENDS_PER_SERVICE {
                errors.push(ObjectError::new(
                    "Service",
                    name,
                    format!(
                        "{frontend} has {} ready backends, more than the {MAX_BACKENDS_PER_SERVICE} a Service port can hold; using the first {MAX_BACKENDS_PER_SERVICE}",
                        backends.len()
                    ),
                ));
                backends.truncate(MAX_BACKENDS_PER_SERVICE);
            }

            let Some(rev_nat_id) = ids.rev_nat.get(
                frontend,
                &previous.rev_nat,
                u32::from(u16::MAX),
                REV_NAT_MAX_ENTRIES,
            ) else {
                errors.push(ObjectError::new(
                    "Service",
                    name,
                    format!("{frontend}: the reverse-NAT map is full"),
                ));
                continue;
            };
            let rev_nat_id = rev_nat_id as u16;
            let mut slots = Vec::with_capacity(backends.len());
            for backend in backends {
                match ids
                    .backends
                    .get(backend, &previous.backends, u32::MAX, BACKENDS_MAX_ENTRIES)
                {
                    Some(id) => slots.push((id, backend)),
                    None => errors.push(ObjectError::new(
                        "Service",
                        name,
                        format!(
                            "{frontend}: the backend map is full; {}:{} left out",
                            backend.ip(),
                            backend.host_port()
                        ),
                    )),
                }
            }
            state
                .rev_nat
                .insert(rev_nat_id, RevNat::new(frontend.ip, frontend.port));
            state.services.insert(
                frontend.key(0),
                ServiceValue {
                    backend_id: 0,
                    count: slots.len() as u16,
                    rev_nat_id,
                },
            );
            for (slot, (id, backend)) in (1..).zip(slots) {
                state.backends.insert(id, backend);
                state.services.insert(
                    frontend.key(slot),
                    ServiceValue {
                        backend_id: id,
                        count: 0,
                        rev_nat_id,
                    },
                );
            }
        }
    }
    Compiled { state, ids, errors }
}

/// The backends of one Service port: every ready endpoint address of the Service's slices, at
/// the slice port with the same name and protocol. Sorted and deduplicated, so slots are stable.
fn backends_of(port: &ServicePort, slices: Option<&Vec<SliceBackends>>) -> BTreeSet<Backend> {
    let mut backends = BTreeSet::new();
    for slice in slices.into_iter().flatten() {
        for p in slice
            .ports
            .iter()
            .filter(|p| p.name == port.name && p.proto == port.frontend.proto)
        {
            backends.extend(
                slice
                    .ready
                    .iter()
                    .map(|&ip| Backend::new(ip, p.port, p.proto)),
            );
        }
    }
    backends
}

/// The valid IPv4 EndpointSlices, grouped by the Service they belong to.
fn slices_by_service(
    cluster: &Cluster,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<ObjectName, Vec<SliceBackends>> {
    let mut by_service: BTreeMap<ObjectName, Vec<SliceBackends>> = BTreeMap::new();
    for (name, slice) in &cluster.endpoint_slices {
        // Slices not managed for a Service, and IPv6/FQDN slices, are not ours to program.
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        if slice.address_type != "IPv4" {
            continue;
        }
        match slice_backends(slice) {
            Ok(backends) => by_service
                .entry(ObjectName {
                    namespace: name.namespace.clone(),
                    name: service.clone(),
                })
                .or_default()
                .push(backends),
            Err(reason) => errors.push(ObjectError::new("EndpointSlice", name, reason)),
        }
    }
    by_service
}

fn slice_backends(slice: &EndpointSlice) -> Result<SliceBackends, String> {
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = p.port else {
            return Err(format!("ports[{i}].port: missing"));
        };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            port: port_number(number).map_err(|e| format!("ports[{i}].port: {e}"))?,
            proto: protocol(p.protocol.as_deref())
                .map_err(|e| format!("ports[{i}].protocol: {e}"))?,
        });
    }
    let mut ready = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        let mut addresses = Vec::with_capacity(endpoint.addresses.len());
        for (j, address) in endpoint.addresses.iter().enumerate() {
            addresses.push(address.parse::<Ipv4Addr>().map_err(|_| {
                format!("endpoints[{i}].addresses[{j}]: {address:?} is not an IPv4 address")
            })?);
        }
        // Kubernetes: a missing `ready` condition means ready.
        if endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false) {
            ready.extend(addresses);
        }
    }
    Ok(SliceBackends { ports, ready })
}

/// The ports of a Service that has a ClusterIP; none for headless and ExternalName Services.
fn service_ports(service: &Service) -> Result<Vec<ServicePort>, String> {
    let Some(spec) = &service.spec else {
        return Err("spec: missing".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => return Ok(Vec::new()),
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                return Err(format!(
                    "spec.clusterIP: {ip}: IPv6 Services are not supported yet"
                ));
            }
            Err(_) => return Err(format!("spec.clusterIP: {ip:?} is not an IP address")),
        },
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("spec.ports: a Service needs at least one port".into());
    }
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                frontend: Frontend {
                    ip,
                    port: port_number(p.port).map_err(|e| format!("spec.ports[{i}].port: {e}"))?,
                    proto: protocol(p.protocol.as_deref())
                        .map_err(|e| format!("spec.ports[{i}].protocol: {e}"))?,
                },
            })
        })
        .collect()
}

fn port_number(port: i32) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{port} is not in 1-65535")),
    }
}

/// Kubernetes protocol names; absent means TCP.
fn protocol(name: Option<&str>) -> Result<u8, String> {
    match name.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        "SCTP" => Err("SCTP is not supported yet".into()),
        other => Err(format!("{other:?} is not TCP, UDP or SCTP")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn name(name: &str) -> ObjectName {
        ObjectName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// A Service as a user writes it: ports are (name, port, protocol).
    fn service(svc: &str, cluster_ip: &str, ports: &[(&str, i32, &str)]) -> (ObjectName, Service) {
        let ports: Vec<_> = ports
            .iter()
            .map(
                |(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": "x"}),
            )
            .collect();
        let obj = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": ports},
        });
        (name(svc), serde_json::from_value(obj).unwrap())
    }

    /// An EndpointSlice of `svc`: ports are (name, port, protocol), endpoints (address, ready).
    fn slice(
        slice: &str,
        svc: &str,
        ports: &[(&str, i32, &str)],
        endpoints: &[(&str, Option<bool>)],
    ) -> (ObjectName, EndpointSlice) {
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
            .collect();
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}}))
            .collect();
        let obj = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice, "namespace": "default", "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        });
        (name(slice), serde_json::from_value(obj).unwrap())
    }

    fn cluster(
        services: Vec<(ObjectName, Service)>,
        slices: Vec<(ObjectName, EndpointSlice)>,
    ) -> Cluster {
        Cluster {
            services: services.into_iter().collect(),
            endpoint_slices: slices.into_iter().collect(),
        }
    }

    /// What the compiled maps say, readably: "frontend -> [backend ip:port, ...]" per frontend,
    /// in slot order.
    fn table(state: &MapState) -> Vec<String> {
        state
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, master)| {
                let backends: Vec<String> = (1..=master.count)
                    .map(|slot| {
                        let id = state.services[&k.with_slot(slot)].backend_id;
                        let b = state.backends[&id];
                        format!("{}:{}", b.ip(), b.host_port())
                    })
                    .collect();
                format!("{} -> [{}]", Frontend::of(k), backends.join(", "))
            })
            .collect()
    }

    #[test]
    fn compile_table() {
        let http = [("http", 80, "TCP")];
        let http_ep = [("http", 8080, "TCP")];
        let cases: Vec<(&str, Cluster, Vec<&str>, Vec<&str>)> = vec![
            (
                "ClusterIP with two ready endpoints",
                cluster(
                    vec![service("web", "10.96.0.10", &http)],
                    vec![slice(
                        "web-1",
                        "web",
                        &http_ep,
                        &[("10.0.0.1", Some(true)), ("10.0.0.2", None)],
                    )],
                ),
                vec!["10.96.0.10:80/TCP -> [10.0.0.1:8080, 10.0.0.2:8080]"],
                vec![],
            ),
            (
                "not-ready endpoints are excluded",
                cluster(
                    vec![service("web", "10.96.0.10", &http)],
                    vec![slice(
                        "web-1",
                        "web",
                        &http_ep,
                        &[("10.0.0.1", Some(false)), ("10.0.0.2", Some(true))],
                    )],
                ),
                vec!["10.96.0.10:80/TCP -> [10.0.0.2:8080]"],
                vec![],
            ),
            (
                "ports are matched by name and protocol across slices",
                cluster(
                    vec![service(
                        "dns",
                        "10.96.0.53",
                        &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
                    )],
                    vec![
                        slice(
                            "dns-1",
                            "dns",
                            &[("dns-tcp", 5353, "TCP"), ("dns", 5300, "UDP")],
                            &[("10.0.0.1", None)],
                        ),
                        slice(
                            "dns-2",
                            "dns",
                            &[("dns", 5300, "UDP")],
                            &[("10.0.0.2", None)],
                        ),
                    ],
                ),
                vec![
                    "10.96.0.53:53/TCP -> [10.0.0.1:5353]",
                    "10.96.0.53:53/UDP -> [10.0.0.1:5300, 10.0.0.2:5300]",
                ],
                vec![],
            ),
            (
                "no endpoints: a master entry with no slots",
                cluster(vec![service("web", "10.96.0.10", &http)], vec![]),
                vec!["10.96.0.10:80/TCP -> []"],
                vec![],
            ),
            (
                "an endpoint listed twice is one backend",
                cluster(
                    vec![service("web", "10.96.0.10", &http)],
                    vec![
                        slice("web-1", "web", &http_ep, &[("10.0.0.1", None)]),
                        slice("web-2", "web", &http_ep, &[("10.0.0.1", None)]),
                    ],
                ),
                vec!["10.96.0.10:80/TCP -> [10.0.0.1:8080]"],
                vec![],
            ),
            (
                "headless Services are not programmed",
                cluster(
                    vec![service("db", "None", &http)],
                    vec![slice("db-1", "db", &http_ep, &[("10.0.0.1", None)])],
                ),
                vec![],
                vec![],
            ),
            (
                "invalid Services are refused by field; the others are programmed",
                cluster(
                    vec![
                        service("zero", "10.96.0.1", &[("http", 0, "TCP")]),
                        service("huge", "10.96.0.2", &[("http", 70000, "TCP")]),
                        service("badip", "10.96.0.300", &http),
                        service("noports", "10.96.0.4", &[]),
                        service("web", "10.96.0.10", &http),
                    ],
                    vec![],
                ),
                vec!["10.96.0.10:80/TCP -> []"],
                vec![
                    "Service default/badip: spec.clusterIP: \"10.96.0.300\" is not an IP address",
                    "Service default/huge: spec.ports[0].port: 70000 is not in 1-65535",
                    "Service default/noports: spec.ports: a Service needs at least one port",
                    "Service default/zero: spec.ports[0].port: 0 is not in 1-65535",
                ],
            ),
            (
                "an invalid EndpointSlice is refused; its Service stays programmed",
                cluster(
                    vec![service("web", "10.96.0.10", &http)],
                    vec![
                        slice("web-bad", "web", &http_ep, &[("10.0.0.999", None)]),
                        slice("web-ok", "web", &http_ep, &[("10.0.0.1", None)]),
                    ],
                ),
                vec!["10.96.0.10:80/TCP -> [10.0.0.1:8080]"],
                vec![
                    "EndpointSlice default/web-bad: endpoints[0].addresses[0]: \"10.0.0.999\" is not an IPv4 address",
                ],
            ),
            (
                "two Services claiming one frontend: the first keeps it",
                cluster(
                    vec![
                        service("a", "10.96.0.10", &http),
                        service("b", "10.96.0.10", &http),
                    ],
                    vec![
                        slice("a-1", "a", &http_ep, &[("10.0.0.1", None)]),
                        slice("b-1", "b", &http_ep, &[("10.0.0.2", None)]),
                    ],
                ),
                vec!["10.96.0.10:80/TCP -> [10.0.0.1:8080]"],
                vec![
                    "Service default/b: 10.96.0.10:80/TCP is already used by Service default/a; ignoring this port",
                ],
            ),
        ];
        for (name, cluster, want, want_errors) in cases {
            let out = compile(&cluster, &Ids::default());
            assert_eq!(table(&out.state), want, "{name}");
            let errors: Vec<String> = out.errors.iter().map(ToString::to_string).collect();
            assert_eq!(errors, want_errors, "{name}");
        }
    }

    #[test]
    fn services_sharing_a_backend_share_its_entry() {
        let c = cluster(
            vec![
                service("a", "10.96.0.10", &[("", 80, "TCP")]),
                service("b", "10.96.0.11", &[("", 80, "TCP")]),
            ],
            vec![
                slice("a-1", "a", &[("", 8080, "TCP")], &[("10.0.0.1", None)]),
                slice("b-1", "b", &[("", 8080, "TCP")], &[("10.0.0.1", None)]),
            ],
        );
        let out = compile(&c, &Ids::default());
        assert_eq!(out.state.backends.len(), 1);
        let ids: BTreeSet<u32> = out
            .state
            .services
            .values()
            .filter(|v| v.backend_id != 0)
            .map(|v| v.backend_id)
            .collect();
        assert_eq!(ids.len(), 1, "both Services' slots name the one backend");
        assert_eq!(
            out.state.rev_nat.len(),
            2,
            "each frontend has its own reverse-NAT entry"
        );
    }

    #[test]
    fn ids_are_stable_and_not_reused_soon() {
        let ep = [("", 8080, "TCP")];
        let with = |eps: &[(&str, Option<bool>)]| {
            cluster(
                vec![service("web", "10.96.0.10", &[("", 80, "TCP")])],
                vec![slice("web-1", "web", &ep, eps)],
            )
        };
        let first = compile(
            &with(&[("10.0.0.1", None), ("10.0.0.2", None)]),
            &Ids::default(),
        );
        let id_of = |out: &Compiled, ip: &str| {
            let ip: Ipv4Addr = ip.parse().unwrap();
            out.state
                .backends
                .iter()
                .find(|(_, b)| b.ip() == ip)
                .map(|(&id, _)| id)
        };
        let one = id_of(&first, "10.0.0.1").unwrap();
        let two = id_of(&first, "10.0.0.2").unwrap();
        // 10.0.0.2 goes, 10.0.0.3 arrives: 10.0.0.1 keeps its id, 10.0.0.3 does not get 10.0.0.2's.
        let second = compile(&with(&[("10.0.0.1", None), ("10.0.0.3", None)]), &first.ids);
        assert_eq!(id_of(&second, "10.0.0.1"), Some(one));
        let three = id_of(&second, "10.0.0.3").unwrap();
        assert_ne!(three, two);
        assert_ne!(three, one);
        assert_eq!(
            second.state.rev_nat.keys().collect::<Vec<_>>(),
            first.state.rev_nat.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn oversized_endpoint_slice_is_reported_not_silently_truncated() {
        let n = MAX_BACKENDS_PER_SERVICE + 10;
        let addresses: Vec<String> = (0..n)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let eps: Vec<(&str, Option<bool>)> = addresses.iter().map(|a| (a.as_str(), None)).collect();
        let c = cluster(
            vec![service("big", "10.96.0.10", &[("", 80, "TCP")])],
            vec![slice("big-1", "big", &[("", 8080, "TCP")], &eps)],
        );
        let out = compile(&c, &Ids::default());
        let master = out
            .state
            .services
            .iter()
            .find(|(k, _)| k.slot == 0)
            .unwrap()
            .1;
        assert_eq!(usize::from(master.count), MAX_BACKENDS_PER_SERVICE);
        assert_eq!(out.errors.len(), 1);
        let error = out.errors[0].to_string();
        assert!(
            error.starts_with("Service default/big: 10.96.0.10:80/TCP has 4106 ready backends"),
            "{error}"
        );
    }
}
