//! Compiles Services and EndpointSlices into the desired content of the datapath's maps.
//!
//! Pure: no I/O, and the same cluster, node and previous ids give the same maps, so it is
//! table-tested without a kernel. Invalid objects are refused one by one with a message naming
//! the object and the field; they never disturb the others.
//!
//! The Service semantics are kube-proxy's: which endpoints each kind of traffic may use
//! (traffic policies, terminating fallback), which frontends exist (ClusterIP, NodePort on each
//! node address, LoadBalancer ingress IPs, ExternalIPs), and when the datapath masquerades.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use node_common::{
    BACKENDS_MAX_ENTRIES, Backend, MAX_BACKENDS_PER_SERVICE, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REV_NAT_MAX_ENTRIES, RevNat, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY,
    SVC_ETP_LOCAL, SVC_EXTERNAL, SVC_SOURCE_RANGES, ServiceValue,
};

use super::state::{Frontend, MapState};
use crate::model::{Cluster, Ipv4Cidr, Node, ObjectError, ObjectName};

/// The label that links an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

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

/// The compiler's output: the maps' desired content, the ids it used, the health-check
/// servers externalTrafficPolicy Local asks for, and what it refused.
#[derive(Debug)]
pub struct Compiled {
    pub state: MapState,
    pub ids: Ids,
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub errors: Vec<ObjectError>,
}

/// A healthCheckNodePort: load balancers ask it whether this node has local endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectName,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// A valid Service: its ports and what applies to all of them.
struct ServiceSpecV {
    ports: Vec<ServicePort>,
    cluster_ip: Ipv4Addr,
    /// ExternalIPs and LoadBalancer ingress IPs (the latter with source ranges).
    external_ips: Vec<Ipv4Addr>,
    load_balancer_ips: Vec<Ipv4Addr>,
    source_ranges: Vec<Ipv4Cidr>,
    etp_local: bool,
    itp_local: bool,
    affinity_timeout: Option<u32>,
    health_check_node_port: Option<u16>,
}

/// One port of a valid Service.
struct ServicePort {
    /// `spec.ports[].name`, "" when unnamed; EndpointSlice ports are matched by it.
    name: String,
    port: u16,
    proto: u8,
    node_port: Option<u16>,
}

/// One port of a valid EndpointSlice.
struct SlicePort {
    name: String,
    port: u16,
    proto: u8,
}

/// An endpoint address with its conditions.
#[derive(Clone, Copy)]
struct Endpoint {
    ip: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

struct SliceEndpoints {
    ports: Vec<SlicePort>,
    endpoints: Vec<Endpoint>,
}

/// The backends of one Service port, with the conditions of the endpoint behind each.
type PortEndpoints = Vec<(Backend, Endpoint)>;

/// The backends a kind of traffic may use (KEP-1669): the ready ones, or, when none is ready,
/// those still serving while they terminate. Never non-serving ones.
fn usable(endpoints: &PortEndpoints, local_only: bool) -> BTreeSet<Backend> {
    let pool = || endpoints.iter().filter(|(_, e)| !local_only || e.local);
    let ready: BTreeSet<Backend> = pool().filter(|(_, e)| e.ready).map(|(b, _)| *b).collect();
    if !ready.is_empty() {
        return ready;
    }
    pool()
        .filter(|(_, e)| e.serving && e.terminating)
        .map(|(b, _)| *b)
        .collect()
}

pub fn compile(cluster: &Cluster, node: &Node, previous: &Ids) -> Compiled {
    let mut errors = Vec::new();
    let slices = slices_by_service(cluster, node, &mut errors);
    let mut out = Emitter {
        state: MapState::default(),
        ids: Ids {
            backends: IdTable::after(&previous.backends),
            rev_nat: IdTable::after(&previous.rev_nat),
        },
        node,
        previous,
        owners: BTreeMap::new(),
        errors,
    };
    let mut health_checks = BTreeMap::new();

    for (name, service) in &cluster.services {
        let spec = match service_spec(service) {
            Ok(Some(spec)) => spec,
            Ok(None) => continue,
            Err(reason) => {
                out.errors.push(ObjectError::new("Service", name, reason));
                continue;
            }
        };
        out.state.cluster_ips.insert(spec.cluster_ip);
        let mut local_ready = BTreeSet::new();
        for port in &spec.ports {
            let endpoints = endpoints_of(port, slices.get(name));
            local_ready.extend(
                endpoints
                    .iter()
                    .filter(|(_, e)| e.local && e.ready)
                    .map(|(b, _)| b.ip()),
            );
            let all = usable(&endpoints, false);
            let local = usable(&endpoints, true);
            // kube-proxy's "cluster policy": what traffic from inside the cluster uses.
            let internal = if spec.itp_local { &local } else { &all };
            let at = |ip, number| Frontend {
                ip,
                port: number,
                proto: port.proto,
            };
            let common = Common {
                name,
                spec: &spec,
                any_endpoints: !all.is_empty(),
            };
            out.frontend(
                &common,
                at(spec.cluster_ip, port.port),
                0,
                internal,
                None,
                &[],
            );
            // NodePort, LoadBalancer and ExternalIP frontends; only LoadBalancer IPs check
            // source ranges.
            let no_ranges: &[Ipv4Cidr] = &[];
            let external = (spec
                .external_ips
                .iter()
                .map(|&ip| (at(ip, port.port), no_ranges)))
            .chain(
                spec.load_balancer_ips
                    .iter()
                    .map(|&ip| (at(ip, port.port), &spec.source_ranges[..])),
            )
            .chain(port.node_port.into_iter().flat_map(|n| {
                node.nodeport_ips
                    .iter()
                    .map(move |&ip| (at(ip, n), no_ranges))
            }));
            for (fe, ranges) in external.collect::<Vec<_>>() {
                if spec.etp_local {
                    out.frontend(
                        &common,
                        fe,
                        SVC_EXTERNAL | SVC_ETP_LOCAL,
                        &local,
                        Some(internal),
                        ranges,
                    );
                } else {
                    out.frontend(&common, fe, SVC_EXTERNAL, &all, None, ranges);
                }
            }
        }
        if let Some(port) = spec.health_check_node_port.filter(|_| spec.etp_local) {
            health_checks.insert(
                port,
                HealthCheck {
                    service: name.clone(),
                    local_endpoints: local_ready.len(),
                },
            );
        }
    }
    Compiled {
        state: out.state,
        ids: out.ids,
        health_checks,
        errors: out.errors,
    }
}

/// What every frontend of one Service shares.
struct Common<'a> {
    name: &'a ObjectName,
    spec: &'a ServiceSpecV,
    /// Whether the Service has usable endpoints anywhere: an empty scope then drops (a Local
    /// policy with no local endpoint) instead of rejecting (no endpoints at all).
    any_endpoints: bool,
}

/// Writes frontends into the desired state, allocating ids and refusing conflicts.
struct Emitter<'a> {
    state: MapState,
    ids: Ids,
    node: &'a Node,
    previous: &'a Ids,
    /// Which Service holds each frontend: the first one keeps it.
    owners: BTreeMap<Frontend, ObjectName>,
    errors: Vec<ObjectError>,
}

impl Emitter<'_> {
    /// One frontend: its master and slots in scope EXTERNAL (and, given `internal`, the
    /// backends sources inside the cluster use, in scope INTERNAL), its reverse-NAT entry and
    /// its source ranges.
    fn frontend(
        &mut self,
        common: &Common,
        frontend: Frontend,
        flags: u16,
        backends: &BTreeSet<Backend>,
        internal: Option<&BTreeSet<Backend>>,
        source_ranges: &[Ipv4Cidr],
    ) {
        let name = common.name;
        if let Some(owner) = self.owners.get(&frontend) {
            let reason = format!("{frontend} is already used by Service {owner}; ignoring it here");
            self.errors.push(ObjectError::new("Service", name, reason));
            return;
        }
        self.owners.insert(frontend, name.clone());
        let Some(rev_nat_id) = self.ids.rev_nat.get(
            frontend,
            &self.previous.rev_nat,
            u32::from(u16::MAX),
            REV_NAT_MAX_ENTRIES,
        ) else {
            self.errors.push(ObjectError::new(
                "Service",
                name,
                format!("{frontend}: the reverse-NAT map is full"),
            ));
            return;
        };
        let rev_nat_id = rev_nat_id as u16;
        self.state
            .rev_nat
            .insert(rev_nat_id, RevNat::new(frontend.ip, frontend.port));
        let mut flags = flags;
        if !source_ranges.is_empty() {
            flags |= SVC_SOURCE_RANGES;
            let ranges = &mut self.state.source_ranges;
            ranges.extend(source_ranges.iter().map(|&c| (rev_nat_id, c)));
            // Like kube-proxy: when the node may connect, so may the LB IP itself (the node's
            // own connections to it are assumed SNATed to it on the way back in).
            if source_ranges
                .iter()
                .any(|c| self.node.ips.iter().any(|&ip| c.contains(ip)))
            {
                ranges.insert((
                    rev_nat_id,
                    Ipv4Cidr {
                        address: frontend.ip,
                        prefix: 32,
                    },
                ));
            }
        }
        let affinity_timeout = common.spec.affinity_timeout.unwrap_or(0);
        if common.spec.affinity_timeout.is_some() {
            flags |= SVC_AFFINITY;
        }
        let master = ServiceValue {
            flags,
            rev_nat_id,
            affinity_timeout,
            ..Default::default()
        };
        self.scope(common, frontend, SCOPE_EXTERNAL, master, backends);
        if let Some(internal) = internal {
            self.scope(common, frontend, SCOPE_INTERNAL, master, internal);
        }
    }

    fn scope(
        &mut self,
        common: &Common,
        frontend: Frontend,
        scope: u8,
        master: ServiceValue,
        backends: &BTreeSet<Backend>,
    ) {
        let name = common.name;
        let mut backends: Vec<Backend> = backends.iter().copied().collect();
        if backends.len() > MAX_BACKENDS_PER_SERVICE {
            self.errors.push(ObjectError::new(
                "Service",
                name,
                format!(
                    "{frontend} has {} ready backends, more than the {MAX_BACKENDS_PER_SERVICE} a Service port can hold; using the first {MAX_BACKENDS_PER_SERVICE}",
                    backends.len()
                ),
            ));
            backends.truncate(MAX_BACKENDS_PER_SERVICE);
        }
        let mut slots = Vec::with_capacity(backends.len());
        for backend in backends {
            match self.ids.backends.get(
                backend,
                &self.previous.backends,
                u32::MAX,
                BACKENDS_MAX_ENTRIES,
            ) {
                Some(id) => slots.push((id, backend)),
                None => self.errors.push(ObjectError::new(
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
        let mut flags = master.flags;
        if slots.is_empty() && common.any_endpoints {
            flags |= SVC_DROP_WHEN_EMPTY;
        }
        self.state.services.insert(
            frontend.key(scope, 0),
            ServiceValue {
                count: slots.len() as u16,
                flags,
                ..master
            },
        );
        for (slot, (id, backend)) in (1..).zip(slots) {
            self.state.backends.insert(id, backend);
            let value = ServiceValue {
                backend_id: id,
                rev_nat_id: master.rev_nat_id,
                ..Default::default()
            };
            self.state.services.insert(frontend.key(scope, slot), value);
        }
    }
}

/// The endpoints of one Service port: every endpoint address of the Service's slices, at the
/// slice port with the same name and protocol; sorted and deduplicated, so slots are stable.
fn endpoints_of(port: &ServicePort, slices: Option<&Vec<SliceEndpoints>>) -> PortEndpoints {
    let mut seen = BTreeMap::new();
    for slice in slices.into_iter().flatten() {
        for p in slice
            .ports
            .iter()
            .filter(|p| p.name == port.name && p.proto == port.proto)
        {
            for e in &slice.endpoints {
                seen.entry(Backend::new(e.ip, p.port, p.proto))
                    .or_insert(*e);
            }
        }
    }
    seen.into_iter().collect()
}

/// The valid IPv4 EndpointSlices, grouped by the Service they belong to.
fn slices_by_service(
    cluster: &Cluster,
    node: &Node,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<ObjectName, Vec<SliceEndpoints>> {
    let mut by_service: BTreeMap<ObjectName, Vec<SliceEndpoints>> = BTreeMap::new();
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
        match slice_endpoints(slice, node) {
            Ok(endpoints) => by_service
                .entry(ObjectName {
                    namespace: name.namespace.clone(),
                    name: service.clone(),
                })
                .or_default()
                .push(endpoints),
            Err(reason) => errors.push(ObjectError::new("EndpointSlice", name, reason)),
        }
    }
    by_service
}

fn slice_endpoints(slice: &EndpointSlice, node: &Node) -> Result<SliceEndpoints, String> {
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
    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        let conditions = endpoint.conditions.as_ref();
        // Kubernetes: ready absent means ready; serving absent means "same as ready".
        let ready = conditions.and_then(|c| c.ready) != Some(false);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let local =
            !node.name.is_empty() && endpoint.node_name.as_deref() == Some(node.name.as_str());
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let ip = address.parse::<Ipv4Addr>().map_err(|_| {
                format!("endpoints[{i}].addresses[{j}]: {address:?} is not an IPv4 address")
            })?;
            endpoints.push(Endpoint {
                ip,
                ready,
                serving,
                terminating,
                local,
            });
        }
    }
    Ok(SliceEndpoints { ports, endpoints })
}

/// A Service with a ClusterIP, validated; `None` for headless and ExternalName Services.
fn service_spec(service: &Service) -> Result<Option<ServiceSpecV>, String> {
    let Some(spec) = &service.spec else {
        return Err("spec: missing".into());
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Ok(None);
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => return Ok(None),
        Some(ip) => ipv4("spec.clusterIP", ip)?,
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("spec.ports: a Service needs at least one port".into());
    }
    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let ports = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let node_port = match p.node_port.filter(|_| node_ports) {
                Some(n) => {
                    Some(port_number(n).map_err(|e| format!("spec.ports[{i}].nodePort: {e}"))?)
                }
                None => None,
            };
            Ok(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(p.port).map_err(|e| format!("spec.ports[{i}].port: {e}"))?,
                proto: protocol(p.protocol.as_deref())
                    .map_err(|e| format!("spec.ports[{i}].protocol: {e}"))?,
                node_port,
            })
        })
        .collect::<Result<_, String>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| ipv4(&format!("spec.externalIPs[{i}]"), ip))
        .collect::<Result<_, _>>()?;
    let mut load_balancer_ips = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ingress) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer delivers to the node itself, not to this IP.
            if let Some(ip) = ingress
                .ip
                .as_deref()
                .filter(|_| ingress.ip_mode.as_deref() != Some("Proxy"))
            {
                load_balancer_ips.push(ipv4(&format!("status.loadBalancer.ingress[{i}].ip"), ip)?);
            }
        }
    }
    let source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            r.parse::<Ipv4Cidr>()
                .map_err(|e| format!("spec.loadBalancerSourceRanges[{i}]: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(ServiceSpecV {
        ports,
        cluster_ip,
        external_ips,
        load_balancer_ips,
        source_ranges,
        etp_local: spec.external_traffic_policy.as_deref() == Some("Local") && type_ != "ClusterIP",
        itp_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout: affinity_timeout(spec)?,
        health_check_node_port: spec
            .health_check_node_port
            .map(|p| port_number(p).map_err(|e| format!("spec.healthCheckNodePort: {e}")))
            .transpose()?,
    }))
}

fn affinity_timeout(spec: &ServiceSpec) -> Result<Option<u32>, String> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
        Some(t @ 1..=86_400) => Ok(Some(t as u32)),
        Some(t) => Err(format!(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is not in 1-86400"
        )),
    }
}

fn ipv4(field: &str, ip: &str) -> Result<Ipv4Addr, String> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(ip),
        Ok(IpAddr::V6(_)) => Err(format!("{field}: {ip}: IPv6 is not supported yet")),
        Err(_) => Err(format!("{field}: {ip:?} is not an IP address")),
    }
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
        "SCTP" => Ok(PROTO_SCTP),
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
        service_with(svc, cluster_ip, ports, json!({}), json!(null))
    }

    /// A Service with more `spec` fields (merged over the basic ones) and a `status`.
    fn service_with(
        svc: &str,
        cluster_ip: &str,
        ports: &[(&str, i32, &str)],
        spec: serde_json::Value,
        status: serde_json::Value,
    ) -> (ObjectName, Service) {
        let ports: Vec<_> = ports
            .iter()
            .map(
                |(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": "x"}),
            )
            .collect();
        let mut obj = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": ports},
            "status": status,
        });
        for (k, v) in spec.as_object().unwrap() {
            obj["spec"][k] = v.clone();
        }
        (name(svc), serde_json::from_value(obj).unwrap())
    }

    /// An EndpointSlice of `svc`: ports are (name, port, protocol), endpoints (address, ready).
    fn slice(
        slice: &str,
        svc: &str,
        ports: &[(&str, i32, &str)],
        endpoints: &[(&str, Option<bool>)],
    ) -> (ObjectName, EndpointSlice) {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}}))
            .collect();
        slice_of(slice, svc, ports, endpoints)
    }

    /// An endpoint with all its conditions, on `node`.
    fn endpoint(
        address: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
        node: &str,
    ) -> serde_json::Value {
        json!({"addresses": [address], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn slice_of(
        slice: &str,
        svc: &str,
        ports: &[(&str, i32, &str)],
        endpoints: Vec<serde_json::Value>,
    ) -> (ObjectName, EndpointSlice) {
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
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
            services: services.into_iter().map(|(n, s)| (n, s.into())).collect(),
            endpoint_slices: slices.into_iter().map(|(n, s)| (n, s.into())).collect(),
        }
    }

    /// What the compiled maps say, as `node-agent lb list` rows with spacing folded.
    fn table(state: &MapState) -> Vec<String> {
        crate::lb::rows(state)
            .iter()
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// The node the tables compile for.
    fn node() -> Node {
        let ip = Ipv4Addr::new(192, 0, 2, 1);
        Node {
            name: "node-a".into(),
            ips: vec![ip],
            nodeport_ips: vec![ip],
        }
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
                vec!["10.96.0.10:80/TCP 10.0.0.1:8080/TCP 10.0.0.2:8080/TCP"],
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
                vec!["10.96.0.10:80/TCP 10.0.0.2:8080/TCP"],
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
                    "10.96.0.53:53/TCP 10.0.0.1:5353/TCP",
                    "10.96.0.53:53/UDP 10.0.0.1:5300/UDP 10.0.0.2:5300/UDP",
                ],
                vec![],
            ),
            (
                "no endpoints: a master entry with no slots",
                cluster(vec![service("web", "10.96.0.10", &http)], vec![]),
                vec!["10.96.0.10:80/TCP (none: reject)"],
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
                vec!["10.96.0.10:80/TCP 10.0.0.1:8080/TCP"],
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
                vec!["10.96.0.10:80/TCP (none: reject)"],
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
                vec!["10.96.0.10:80/TCP 10.0.0.1:8080/TCP"],
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
                vec!["10.96.0.10:80/TCP 10.0.0.1:8080/TCP"],
                vec![
                    "Service default/b: 10.96.0.10:80/TCP is already used by Service default/a; ignoring it here",
                ],
            ),
            (
                "NodePort: the ClusterIP, and every node IP at the nodePort",
                cluster(
                    vec![service_with(
                        "np",
                        "10.96.0.20",
                        &http,
                        json!({"type": "NodePort",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}),
                        json!(null),
                    )],
                    vec![slice("np-1", "np", &http_ep, &[("10.0.0.1", None)])],
                ),
                vec![
                    "10.96.0.20:80/TCP 10.0.0.1:8080/TCP",
                    "192.0.2.1:30080/TCP 10.0.0.1:8080/TCP [external]",
                ],
                vec![],
            ),
            (
                "LoadBalancer: ingress IPs check source ranges (ipMode Proxy ignored; the LB IP itself allowed as a range holds the node); ExternalIPs do not",
                cluster(
                    vec![service_with(
                        "lb",
                        "10.96.0.21",
                        &http,
                        json!({"type": "LoadBalancer", "externalIPs": ["198.51.100.7"],
                               "loadBalancerSourceRanges": ["203.0.113.0/24", " 192.0.2.0/25 "],
                               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30081}]}),
                        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"}]}}),
                    )],
                    vec![slice("lb-1", "lb", &http_ep, &[("10.0.0.1", None)])],
                ),
                vec![
                    "10.96.0.21:80/TCP 10.0.0.1:8080/TCP",
                    "192.0.2.1:30081/TCP 10.0.0.1:8080/TCP [external]",
                    "198.51.100.1:80/TCP 10.0.0.1:8080/TCP [external sources=192.0.2.0/25,198.51.100.1/32,203.0.113.0/24]",
                    "198.51.100.7:80/TCP 10.0.0.1:8080/TCP [external]",
                ],
                vec![],
            ),
            (
                "externalTrafficPolicy Local: external sources use local endpoints, cluster sources all",
                cluster(
                    vec![service_with(
                        "etp",
                        "10.96.0.22",
                        &http,
                        json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30082}]}),
                        json!(null),
                    )],
                    vec![slice_of(
                        "etp-1",
                        "etp",
                        &http_ep,
                        vec![
                            endpoint("10.0.0.1", true, true, false, "node-a"),
                            endpoint("10.0.0.2", true, true, false, "node-b"),
                        ],
                    )],
                ),
                vec![
                    "10.96.0.22:80/TCP 10.0.0.1:8080/TCP 10.0.0.2:8080/TCP",
                    "192.0.2.1:30082/TCP 10.0.0.1:8080/TCP [external eTP=Local]",
                    "192.0.2.1:30082/TCP (internal) 10.0.0.1:8080/TCP 10.0.0.2:8080/TCP [external eTP=Local]",
                ],
                vec![],
            ),
            (
                "externalTrafficPolicy Local with no local endpoint: external traffic is dropped",
                cluster(
                    vec![service_with(
                        "etp",
                        "10.96.0.23",
                        &http,
                        json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30083}]}),
                        json!(null),
                    )],
                    vec![slice_of(
                        "etp-1",
                        "etp",
                        &http_ep,
                        vec![endpoint("10.0.0.2", true, true, false, "node-b")],
                    )],
                ),
                vec![
                    "10.96.0.23:80/TCP 10.0.0.2:8080/TCP",
                    "192.0.2.1:30083/TCP (none: drop) [external eTP=Local]",
                    "192.0.2.1:30083/TCP (internal) 10.0.0.2:8080/TCP [external eTP=Local]",
                ],
                vec![],
            ),
            (
                "internalTrafficPolicy Local: the ClusterIP uses local endpoints only, and drops without one",
                cluster(
                    vec![
                        service_with(
                            "itp",
                            "10.96.0.24",
                            &http,
                            json!({"internalTrafficPolicy": "Local"}),
                            json!(null),
                        ),
                        service_with(
                            "itp-none",
                            "10.96.0.25",
                            &http,
                            json!({"internalTrafficPolicy": "Local"}),
                            json!(null),
                        ),
                    ],
                    vec![
                        slice_of(
                            "itp-1",
                            "itp",
                            &http_ep,
                            vec![
                                endpoint("10.0.0.1", true, true, false, "node-a"),
                                endpoint("10.0.0.2", true, true, false, "node-b"),
                            ],
                        ),
                        slice_of(
                            "itp-none-1",
                            "itp-none",
                            &http_ep,
                            vec![endpoint("10.0.0.2", true, true, false, "node-b")],
                        ),
                    ],
                ),
                vec![
                    "10.96.0.24:80/TCP 10.0.0.1:8080/TCP",
                    "10.96.0.25:80/TCP (none: drop)",
                ],
                vec![],
            ),
            (
                "terminating endpoints serve only when none is ready, and never when not serving",
                cluster(
                    vec![
                        service("term", "10.96.0.26", &http),
                        service("mixed", "10.96.0.27", &http),
                    ],
                    vec![
                        slice_of(
                            "term-1",
                            "term",
                            &http_ep,
                            vec![
                                endpoint("10.0.0.1", false, true, true, "node-b"),
                                endpoint("10.0.0.2", false, false, true, "node-b"),
                            ],
                        ),
                        slice_of(
                            "mixed-1",
                            "mixed",
                            &http_ep,
                            vec![
                                endpoint("10.0.0.1", false, true, true, "node-b"),
                                endpoint("10.0.0.3", true, true, false, "node-b"),
                            ],
                        ),
                    ],
                ),
                vec![
                    "10.96.0.26:80/TCP 10.0.0.1:8080/TCP",
                    "10.96.0.27:80/TCP 10.0.0.3:8080/TCP",
                ],
                vec![],
            ),
            (
                "sessionAffinity ClientIP: the default timeout and an explicit one",
                cluster(
                    vec![
                        service_with(
                            "sticky",
                            "10.96.0.28",
                            &http,
                            json!({"sessionAffinity": "ClientIP"}),
                            json!(null),
                        ),
                        service_with(
                            "brief",
                            "10.96.0.29",
                            &http,
                            json!({"sessionAffinity": "ClientIP",
                            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                            json!(null),
                        ),
                    ],
                    vec![],
                ),
                vec![
                    "10.96.0.28:80/TCP (none: reject) [affinity=10800s]",
                    "10.96.0.29:80/TCP (none: reject) [affinity=60s]",
                ],
                vec![],
            ),
            (
                "a source range that is not a CIDR, and a NodePort or ExternalIP claimed twice",
                cluster(
                    vec![
                        service_with(
                            "a",
                            "10.96.0.30",
                            &http,
                            json!({"type": "NodePort", "externalIPs": ["198.51.100.9"],
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30090}]}),
                            json!(null),
                        ),
                        service_with(
                            "b",
                            "10.96.0.31",
                            &http,
                            json!({"type": "NodePort", "externalIPs": ["198.51.100.9"],
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30090}]}),
                            json!(null),
                        ),
                        service_with(
                            "bad-range",
                            "10.96.0.32",
                            &http,
                            json!({"type": "LoadBalancer",
                            "loadBalancerSourceRanges": ["10.0.0.0/33"]}),
                            json!(null),
                        ),
                    ],
                    vec![],
                ),
                vec![
                    "10.96.0.30:80/TCP (none: reject)",
                    "10.96.0.31:80/TCP (none: reject)",
                    "192.0.2.1:30090/TCP (none: reject) [external]",
                    "198.51.100.9:80/TCP (none: reject) [external]",
                ],
                vec![
                    "Service default/b: 198.51.100.9:80/TCP is already used by Service default/a; ignoring it here",
                    "Service default/b: 192.0.2.1:30090/TCP is already used by Service default/a; ignoring it here",
                    "Service default/bad-range: spec.loadBalancerSourceRanges[0]: \"10.0.0.0/33\" is not an IPv4 CIDR",
                ],
            ),
        ];
        for (name, cluster, want, want_errors) in cases {
            let out = compile(&cluster, &node(), &Ids::default());
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
        let out = compile(&c, &node(), &Ids::default());
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
            &node(),
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
        let second = compile(
            &with(&[("10.0.0.1", None), ("10.0.0.3", None)]),
            &node(),
            &first.ids,
        );
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
        let out = compile(&c, &node(), &Ids::default());
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

    #[test]
    fn health_check_node_port_counts_ready_local_endpoints_for_etp_local_only() {
        let lb = |svc: &str, ip: &str, etp: &str, hc: i32| {
            service_with(
                svc,
                ip,
                &[("http", 80, "TCP")],
                json!({"type": "LoadBalancer", "externalTrafficPolicy": etp,
                "healthCheckNodePort": hc, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": hc + 1}]}),
                json!(null),
            )
        };
        let c = cluster(
            vec![
                lb("local", "10.96.0.40", "Local", 31000),
                lb("cluster", "10.96.0.41", "Cluster", 31010),
            ],
            vec![slice_of(
                "local-1",
                "local",
                &[("http", 8080, "TCP")],
                vec![
                    endpoint("10.0.0.1", true, true, false, "node-a"),
                    endpoint("10.0.0.2", false, true, true, "node-a"),
                    endpoint("10.0.0.3", true, true, false, "node-b"),
                ],
            )],
        );
        let out = compile(&c, &node(), &Ids::default());
        let want = BTreeMap::from([(
            31000,
            HealthCheck {
                service: name("local"),
                local_endpoints: 1,
            },
        )]);
        assert_eq!(out.health_checks, want);
    }
}
