//! Compiles Services and EndpointSlices into the desired content of the datapath's maps,
//! incrementally: a change recompiles only the Services it touches.
//!
//! Pure: no I/O, and the same changes on the same compiler give the same maps, so it is
//! table-tested without a kernel. Invalid objects are refused one by one with a message naming
//! the object and the field; they never disturb the others.
//!
//! The Service semantics are kube-proxy's: which endpoints each kind of traffic may use
//! (traffic policies, terminating fallback), which frontends exist (ClusterIP, NodePort on each
//! node address, LoadBalancer ingress IPs, ExternalIPs), and when the datapath masquerades.
//!
//! What Services share stays global: a frontend claimed by several Services belongs to the
//! first by name (the others are recompiled when it changes hands), backend and ClusterIP
//! entries are counted by their users and removed with the last one, and ids come from tables
//! that outlive any one Service.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use node_common::{
    BACKENDS_MAX_ENTRIES, Backend, CLUSTER_IPS_MAX_ENTRIES, MARK_VALUE_MASK,
    MAX_BACKENDS_PER_SERVICE, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REV_NAT_MAX_ENTRIES, RevNat,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_ETP_LOCAL, SVC_EXTERNAL,
    SVC_SOURCE_RANGES, ServiceKey, ServiceValue,
};

use super::state::{Frontend, MapOp, MapState};
use crate::model::{Changes, Ipv4Cidr, Node, ObjectError, ObjectName};

/// The label that links an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Ids handed out to keys (backends, frontends) and counted holders. An id lives as long as
/// someone holds its key, and a freed id is not handed out again soon, so a conntrack entry
/// that outlives its backend can never land on another one. A key nobody holds keeps its id
/// until `sweep` (the end of a sync), so a key moving between Services keeps it.
#[derive(Debug)]
struct IdTable<K> {
    /// Each key's id and how many hold it.
    ids: BTreeMap<K, (u32, u32)>,
    used: BTreeSet<u32>,
    /// Keys given an id since `new_sync`: they were not in the maps before.
    fresh: BTreeSet<K>,
    /// Keys whose last holder let go since the last sweep.
    released: BTreeSet<K>,
    /// Services that could not hold a key because the table was full.
    starved: BTreeSet<ObjectName>,
    last: u32,
    max_id: u32,
    capacity: u32,
}

impl<K: Ord + Copy> IdTable<K> {
    fn new(max_id: u32, capacity: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
            fresh: BTreeSet::new(),
            released: BTreeSet::new(),
            starved: BTreeSet::new(),
            last: 0,
            max_id,
            capacity,
        }
    }

    /// Holds `key`: the id it has, or the next one free (ids start at 1; 0 means none).
    /// `None` when `capacity` ids are in use.
    fn hold(&mut self, key: K) -> Option<u32> {
        if let Some((id, holders)) = self.ids.get_mut(&key) {
            *holders += 1;
            return Some(*id);
        }
        if self.used.len() as u32 >= self.capacity {
            return None;
        }
        let mut id = self.last;
        loop {
            id = if id >= self.max_id { 1 } else { id + 1 };
            if !self.used.contains(&id) {
                break;
            }
        }
        self.last = id;
        self.used.insert(id);
        self.ids.insert(key, (id, 1));
        self.fresh.insert(key);
        Some(id)
    }

    fn release(&mut self, key: K) {
        let (_, holders) = self.ids.get_mut(&key).expect("released a key never held");
        *holders -= 1;
        if *holders == 0 {
            self.released.insert(key);
        }
    }

    /// The id of `key` while someone holds it.
    fn held(&self, key: &K) -> Option<u32> {
        self.ids
            .get(key)
            .filter(|(_, holders)| *holders > 0)
            .map(|(id, _)| *id)
    }

    /// The id `key` had when the sync began.
    fn held_before(&self, key: &K) -> Option<u32> {
        (!self.fresh.contains(key))
            .then(|| self.ids.get(key).map(|(id, _)| *id))
            .flatten()
    }

    /// Frees the ids nobody holds any more.
    fn sweep(&mut self) {
        for key in std::mem::take(&mut self.released) {
            if let Some(&(id, 0)) = self.ids.get(&key) {
                self.ids.remove(&key);
                self.used.remove(&id);
            }
        }
    }

    fn new_sync(&mut self) {
        self.fresh.clear();
    }

    /// A Service the table was full for, when it has room again: one at a time, since
    /// each may fill it.
    fn next_starved(&mut self) -> Option<ObjectName> {
        if self.used.len() as u32 >= self.capacity {
            return None;
        }
        self.starved.pop_first()
    }
}

/// A healthCheckNodePort: load balancers ask it whether this node has local endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectName,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// A frontend a Service holds, with its reverse-NAT id and the Service port it serves
/// (`spec.ports[].port`: the NodePort frontends of port 80 serve port 80).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldFrontend<'a> {
    pub rev_nat_id: u32,
    pub service: &'a ObjectName,
    pub port: u16,
    pub frontend: Frontend,
}

/// A valid Service: its ports and what applies to all of them.
#[derive(Debug, PartialEq)]
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
#[derive(Debug, PartialEq)]
struct ServicePort {
    /// `spec.ports[].name`, "" when unnamed; EndpointSlice ports are matched by it.
    name: Arc<str>,
    port: u16,
    proto: u8,
    node_port: Option<u16>,
}

/// One port of a valid EndpointSlice.
#[derive(Debug, PartialEq)]
struct SlicePort {
    name: Arc<str>,
    port: u16,
    proto: u8,
}

/// An endpoint address with its conditions.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Endpoint {
    ip: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// A valid IPv4 EndpointSlice of a Service: all the proxy keeps of it.
#[derive(Debug, PartialEq)]
struct SliceEndpoints {
    service: ObjectName,
    ports: Box<[SlicePort]>,
    endpoints: Box<[Endpoint]>,
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

/// A Service as last applied: valid (`None` for headless and ExternalName ones) or refused.
/// Boxed, as the other values the compiler keeps per object: a map's nodes then hold small
/// values, and 100k Services cost less.
type ServiceInput = Result<Option<Box<ServiceSpecV>>, String>;

/// One thing a Service's output puts in the maps or holds of what is shared.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// A frontend it asks for, whether it holds it or another Service does.
    Claim(Frontend),
    /// A frontend whose reverse-NAT id it holds, and the Service port it serves.
    Held(Frontend, u16),
    Service(ServiceKey, ServiceValue),
    RevNat(u32, RevNat),
    SourceRange(u32, Ipv4Cidr),
    /// A backend, once for each slot naming it.
    Backend(u32, Backend),
    ClusterIp(Ipv4Addr),
    HealthCheck(u16),
}

/// What one Service compiled to: one allocation per Service.
#[derive(Debug, Default)]
struct Output(Box<[Entry]>);

impl Entry {
    /// The map write that puts it in place, if it is a map entry.
    fn put(&self) -> Option<MapOp> {
        match *self {
            Entry::Service(key, value) => Some(MapOp::PutService(key, value)),
            Entry::RevNat(id, rev_nat) => Some(MapOp::PutRevNat(id, rev_nat)),
            Entry::SourceRange(id, cidr) => Some(MapOp::PutSourceRange(id, cidr)),
            Entry::Backend(id, backend) => Some(MapOp::PutBackend(id, backend)),
            Entry::ClusterIp(ip) => Some(MapOp::PutClusterIp(ip)),
            Entry::Claim(_) | Entry::Held(..) | Entry::HealthCheck(_) => None,
        }
    }
}

impl Output {
    fn add_to(&self, state: &mut MapState) {
        for op in self.0.iter().filter_map(Entry::put) {
            state.apply(&op);
        }
    }
}

/// What Services share: frontends, ids, the Services to recompile.
#[derive(Debug)]
struct Shared {
    /// (frontend, a Service that asks for it): the first by name holds it.
    claims: BTreeSet<(Frontend, ObjectName)>,
    backends: IdTable<Backend>,
    rev_nat: IdTable<Frontend>,
    cluster_ips: IdTable<Ipv4Addr>,
    /// Services to recompile in this sync.
    touched: BTreeSet<ObjectName>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            claims: BTreeSet::new(),
            backends: IdTable::new(u32::MAX, BACKENDS_MAX_ENTRIES),
            rev_nat: IdTable::new(MARK_VALUE_MASK, REV_NAT_MAX_ENTRIES),
            cluster_ips: IdTable::new(u32::MAX, CLUSTER_IPS_MAX_ENTRIES),
            touched: BTreeSet::new(),
        }
    }
}

impl Shared {
    /// `name` asks for `frontend`: `Err` names the Service that holds it instead.
    fn claim(&mut self, frontend: Frontend, name: &ObjectName) -> Result<(), ObjectName> {
        if !self.claims.insert((frontend, name.clone())) {
            // Twice by the same Service (two ports, or an ExternalIP that is its ClusterIP).
            return Err(name.clone());
        }
        if let Some(first) = self.first_claimant(frontend).filter(|n| *n != name) {
            return Err(first.clone());
        }
        // `name` sorts first now: the claimant after it held the frontend until now, and gives
        // it up when recompiled.
        let previous = self
            .claims
            .range((frontend, name.clone())..)
            .nth(1)
            .filter(|(f, _)| *f == frontend)
            .map(|(_, previous)| previous.clone());
        self.touched.extend(previous);
        Ok(())
    }

    fn first_claimant(&self, frontend: Frontend) -> Option<&ObjectName> {
        self.claims
            .range((frontend, ObjectName::default())..)
            .next()
            .filter(|(f, _)| *f == frontend)
            .map(|(_, name)| name)
    }

    /// Lets go of all `output` held for `name`; the next claimant of a frontend it held is
    /// recompiled to take it.
    fn release(&mut self, name: &ObjectName, output: &Output) {
        for entry in &output.0 {
            match *entry {
                Entry::Claim(frontend) => {
                    // The first claimant holds the frontend (or is about to): the next
                    // one takes it over.
                    let first = self.first_claimant(frontend) == Some(name);
                    self.claims.remove(&(frontend, name.clone()));
                    if let Some(next) = self.first_claimant(frontend).filter(|_| first) {
                        self.touched.insert(next.clone());
                    }
                }
                Entry::Held(frontend, _) => self.rev_nat.release(frontend),
                Entry::Backend(_, backend) => self.backends.release(backend),
                Entry::ClusterIp(ip) => self.cluster_ips.release(ip),
                Entry::Service(..)
                | Entry::RevNat(..)
                | Entry::SourceRange(..)
                | Entry::HealthCheck(_) => {}
            }
        }
    }
}

/// The compiler: the objects as last applied (in the compact form compiling needs), what each
/// Service compiled to, and what Services share.
#[derive(Debug)]
pub struct Compiler {
    node: Node,
    services: BTreeMap<ObjectName, ServiceInput>,
    slices: BTreeMap<ObjectName, Box<SliceEndpoints>>,
    /// (Service, one of its slices), for the slices of a Service in name order.
    slices_of: BTreeSet<(ObjectName, ObjectName)>,
    outputs: BTreeMap<ObjectName, Output>,
    /// Every Service's healthCheckNodePort (by port, then Service).
    health_checks: BTreeMap<(u16, ObjectName), HealthCheck>,
    shared: Shared,
    /// EndpointSlices refused since the last commit.
    slice_errors: Vec<ObjectError>,
}

/// What a commit changed: the maps' content before and after it, over the entries it touched
/// (`proxy::diff` orders the writes between them), and what it refused.
#[derive(Debug, Default)]
pub struct Update {
    pub before: MapState,
    pub after: MapState,
    /// Objects refused, in the order compiled: EndpointSlices, then Services by name.
    pub errors: Vec<ObjectError>,
}

impl Compiler {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeSet::new(),
            outputs: BTreeMap::new(),
            health_checks: BTreeMap::new(),
            shared: Shared::default(),
            slice_errors: Vec::new(),
        }
    }

    /// Takes in changed objects and notes the Services they touch; only what the compiler
    /// uses is kept of them.
    pub fn stage(&mut self, changes: Changes) {
        for (name, slice) in changes.endpoint_slices {
            let new = match slice.map(|s| slice_endpoints(&name, &s, &self.node)) {
                Some(Ok(new)) => new,
                Some(Err(reason)) => {
                    let error = ObjectError::new("EndpointSlice", &name, reason);
                    self.slice_errors.push(error);
                    None
                }
                None => None,
            };
            if self.slices.get(&name) == new.as_ref() {
                continue;
            }
            if let Some(old) = self.slices.remove(&name) {
                self.slices_of.remove(&(old.service.clone(), name.clone()));
                self.shared.touched.insert(old.service);
            }
            if let Some(new) = new {
                self.slices_of.insert((new.service.clone(), name.clone()));
                self.shared.touched.insert(new.service.clone());
                self.slices.insert(name, new);
            }
        }
        for (name, service) in changes.services {
            let new = service.map(|s| service_spec(&s).map(|spec| spec.map(Box::new)));
            if self.services.get(&name) == new.as_ref() {
                continue;
            }
            self.shared.touched.insert(name.clone());
            match new {
                Some(new) => self.services.insert(name, new),
                None => self.services.remove(&name),
            };
        }
    }

    /// Recompiles the Services touched since the last commit, and those whose share of
    /// frontends or ids changed because of them.
    pub fn commit(&mut self) -> Update {
        let mut update = Update {
            errors: std::mem::take(&mut self.slice_errors),
            ..Default::default()
        };
        let mut errors = BTreeMap::new();
        let mut recompiled = BTreeSet::new();
        loop {
            while let Some(name) = self.shared.touched.pop_first() {
                let old = self.recompile(&name, &mut errors);
                // What it held before this commit: not what an earlier round of it held.
                if recompiled.insert(name)
                    && let Some(old) = old
                {
                    old.add_to(&mut update.before);
                }
            }
            // Ids freed: the Services a full table left something out of get another try.
            let shared = &mut self.shared;
            shared.rev_nat.sweep();
            shared.backends.sweep();
            shared.cluster_ips.sweep();
            let retry = [
                shared.rev_nat.next_starved(),
                shared.backends.next_starved(),
                shared.cluster_ips.next_starved(),
            ];
            if retry.iter().all(Option::is_none) {
                break;
            }
            shared.touched.extend(retry.into_iter().flatten());
        }
        for name in &recompiled {
            if let Some(output) = self.outputs.get(name) {
                output.add_to(&mut update.after);
            }
        }
        // Shared entries: in the maps while anyone holds them, whoever that is.
        let Update { before, after, .. } = &mut update;
        let shared = &mut self.shared;
        for (&id, backend) in &before.backends {
            if shared.backends.held(backend) == Some(id) {
                after.backends.insert(id, *backend);
            }
        }
        for (&id, backend) in &after.backends {
            if shared.backends.held_before(backend) == Some(id) {
                before.backends.insert(id, *backend);
            }
        }
        after.cluster_ips.extend(
            before
                .cluster_ips
                .iter()
                .filter(|ip| shared.cluster_ips.held(ip).is_some()),
        );
        before.cluster_ips.extend(
            after
                .cluster_ips
                .iter()
                .filter(|ip| shared.cluster_ips.held_before(ip).is_some()),
        );
        shared.backends.new_sync();
        shared.rev_nat.new_sync();
        shared.cluster_ips.new_sync();
        update.errors.extend(errors.into_values().flatten());
        update
    }

    /// The maps' full desired content.
    pub fn state(&self) -> MapState {
        let mut state = MapState::default();
        for output in self.outputs.values() {
            output.add_to(&mut state);
        }
        state
    }

    /// Every frontend a Service holds, by Service name.
    pub fn frontends(&self) -> impl Iterator<Item = HeldFrontend<'_>> {
        self.outputs.iter().flat_map(move |(service, output)| {
            output.0.iter().filter_map(move |entry| match *entry {
                Entry::Held(frontend, port) => Some(HeldFrontend {
                    rev_nat_id: self.shared.rev_nat.held(&frontend)?,
                    service,
                    port,
                    frontend,
                }),
                _ => None,
            })
        })
    }

    /// The healthCheckNodePort servers the Services ask for, by port (the last Service by name
    /// when several ask for one).
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.health_checks
            .iter()
            .map(|((port, _), check)| (*port, check.clone()))
            .collect()
    }

    /// Compiles `name` again; its previous output, if it had one.
    fn recompile(
        &mut self,
        name: &ObjectName,
        errors: &mut BTreeMap<ObjectName, Vec<ObjectError>>,
    ) -> Option<Output> {
        let shared = &mut self.shared;
        shared.rev_nat.starved.remove(name);
        shared.backends.starved.remove(name);
        shared.cluster_ips.starved.remove(name);
        let old = self.outputs.remove(name);
        if let Some(old) = &old {
            self.shared.release(name, old);
            for entry in &old.0 {
                if let Entry::HealthCheck(port) = entry {
                    self.health_checks.remove(&(*port, name.clone()));
                }
            }
        }
        errors.remove(name);
        let spec = match self.services.get(name) {
            Some(Ok(Some(spec))) => spec,
            Some(Err(reason)) => {
                errors.insert(
                    name.clone(),
                    vec![ObjectError::new("Service", name, reason.clone())],
                );
                return old;
            }
            Some(Ok(None)) | None => return old,
        };
        let slices = self
            .slices_of
            .range((name.clone(), ObjectName::default())..)
            .take_while(|(service, _)| service == name)
            .map(|(_, slice)| &*self.slices[slice]);
        let mut out = Emitter {
            name,
            spec,
            node: &self.node,
            shared: &mut self.shared,
            entries: Vec::new(),
            errors: Vec::new(),
            any_endpoints: false,
        };
        let local_ready = out.service(slices.collect());
        if let Some(port) = spec.health_check_node_port.filter(|_| spec.etp_local) {
            let check = HealthCheck {
                service: name.clone(),
                local_endpoints: local_ready,
            };
            self.health_checks.insert((port, name.clone()), check);
            out.entries.push(Entry::HealthCheck(port));
        }
        if !out.errors.is_empty() {
            errors.insert(name.clone(), out.errors);
        }
        let output = Output(out.entries.into_boxed_slice());
        self.outputs.insert(name.clone(), output);
        old
    }
}

/// Compiles one Service: claims its frontends and writes their entries into its output.
struct Emitter<'a> {
    name: &'a ObjectName,
    spec: &'a ServiceSpecV,
    node: &'a Node,
    shared: &'a mut Shared,
    entries: Vec<Entry>,
    errors: Vec<ObjectError>,
    /// Whether the Service has usable endpoints anywhere: an empty scope then drops (a Local
    /// policy with no local endpoint) instead of rejecting (no endpoints at all).
    any_endpoints: bool,
}

impl Emitter<'_> {
    fn error(&mut self, reason: String) {
        self.errors
            .push(ObjectError::new("Service", self.name, reason));
    }

    /// Every port's frontends; how many ready endpoints the Service has on this node.
    fn service(&mut self, slices: Vec<&SliceEndpoints>) -> usize {
        let spec = self.spec;
        let node = self.node;
        match self.shared.cluster_ips.hold(spec.cluster_ip) {
            Some(_) => self.entries.push(Entry::ClusterIp(spec.cluster_ip)),
            None => {
                self.error(format!(
                    "spec.clusterIP: {}: the ClusterIP map is full",
                    spec.cluster_ip
                ));
                self.shared.cluster_ips.starved.insert(self.name.clone());
            }
        }
        let mut local_ready = BTreeSet::new();
        for port in &spec.ports {
            let endpoints = endpoints_of(port, &slices);
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
            self.any_endpoints = !all.is_empty();
            let cluster_ip = at(spec.cluster_ip, port.port);
            self.frontend(cluster_ip, port.port, 0, internal, None, &[]);
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
                    let flags = SVC_EXTERNAL | SVC_ETP_LOCAL;
                    self.frontend(fe, port.port, flags, &local, Some(internal), ranges);
                } else {
                    self.frontend(fe, port.port, SVC_EXTERNAL, &all, None, ranges);
                }
            }
        }
        local_ready.len()
    }

    /// One frontend of `service_port`: its master and slots in scope EXTERNAL (and, given
    /// `internal`, the backends sources inside the cluster use, in scope INTERNAL), its
    /// reverse-NAT entry and its source ranges.
    fn frontend(
        &mut self,
        frontend: Frontend,
        service_port: u16,
        flags: u16,
        backends: &BTreeSet<Backend>,
        internal: Option<&BTreeSet<Backend>>,
        source_ranges: &[Ipv4Cidr],
    ) {
        if !self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Claim(f) if *f == frontend))
        {
            self.entries.push(Entry::Claim(frontend));
        }
        if let Err(owner) = self.shared.claim(frontend, self.name) {
            self.error(format!(
                "{frontend} is already used by Service {owner}; ignoring it here"
            ));
            return;
        }
        let Some(rev_nat_id) = self.shared.rev_nat.hold(frontend) else {
            self.error(format!("{frontend}: the reverse-NAT map is full"));
            self.shared.rev_nat.starved.insert(self.name.clone());
            return;
        };
        self.entries.push(Entry::Held(frontend, service_port));
        let rev_nat = RevNat::new(frontend.ip, frontend.port);
        self.entries.push(Entry::RevNat(rev_nat_id, rev_nat));
        let mut flags = flags;
        if !source_ranges.is_empty() {
            flags |= SVC_SOURCE_RANGES;
            let ranges = &mut self.entries;
            ranges.extend(
                source_ranges
                    .iter()
                    .map(|&c| Entry::SourceRange(rev_nat_id, c)),
            );
            // Like kube-proxy: when the node may connect, so may the LB IP itself (the node's
            // own connections to it are assumed SNATed to it on the way back in).
            if source_ranges
                .iter()
                .any(|c| self.node.ips.iter().any(|&ip| c.contains(ip)))
            {
                ranges.push(Entry::SourceRange(
                    rev_nat_id,
                    Ipv4Cidr {
                        address: frontend.ip,
                        prefix: 32,
                    },
                ));
            }
        }
        let affinity_timeout = self.spec.affinity_timeout.unwrap_or(0);
        if self.spec.affinity_timeout.is_some() {
            flags |= SVC_AFFINITY;
        }
        let master = ServiceValue {
            flags,
            rev_nat_id,
            affinity_timeout,
            ..Default::default()
        };
        self.scope(frontend, SCOPE_EXTERNAL, master, backends);
        if let Some(internal) = internal {
            self.scope(frontend, SCOPE_INTERNAL, master, internal);
        }
    }

    fn scope(
        &mut self,
        frontend: Frontend,
        scope: u8,
        master: ServiceValue,
        backends: &BTreeSet<Backend>,
    ) {
        let mut backends: Vec<Backend> = backends.iter().copied().collect();
        if backends.len() > MAX_BACKENDS_PER_SERVICE {
            self.error(format!(
                "{frontend} has {} ready backends, more than the {MAX_BACKENDS_PER_SERVICE} a Service port can hold; using the first {MAX_BACKENDS_PER_SERVICE}",
                backends.len()
            ));
            backends.truncate(MAX_BACKENDS_PER_SERVICE);
        }
        let mut slots = Vec::with_capacity(backends.len());
        for backend in backends {
            match self.shared.backends.hold(backend) {
                Some(id) => slots.push((id, backend)),
                None => {
                    self.error(format!(
                        "{frontend}: the backend map is full; {}:{} left out",
                        backend.ip(),
                        backend.host_port()
                    ));
                    self.shared.backends.starved.insert(self.name.clone());
                }
            }
        }
        let mut flags = master.flags;
        if slots.is_empty() && self.any_endpoints {
            flags |= SVC_DROP_WHEN_EMPTY;
        }
        self.entries.push(Entry::Service(
            frontend.key(scope, 0),
            ServiceValue {
                count: slots.len() as u16,
                flags,
                ..master
            },
        ));
        for (slot, (id, backend)) in (1..).zip(slots) {
            self.entries.push(Entry::Backend(id, backend));
            let value = ServiceValue {
                backend_id: id,
                rev_nat_id: master.rev_nat_id,
                ..Default::default()
            };
            self.entries
                .push(Entry::Service(frontend.key(scope, slot), value));
        }
    }
}

/// The endpoints of one Service port: every endpoint address of the Service's slices, at the
/// slice port with the same name and protocol; sorted and deduplicated, so slots are stable.
fn endpoints_of(port: &ServicePort, slices: &[&SliceEndpoints]) -> PortEndpoints {
    let mut seen = BTreeMap::new();
    for slice in slices {
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

/// What the proxy uses of an EndpointSlice: `None` for slices not managed for a Service, and
/// IPv6/FQDN slices, which are not ours to program.
fn slice_endpoints(
    name: &ObjectName,
    slice: &EndpointSlice,
    node: &Node,
) -> Result<Option<Box<SliceEndpoints>>, String> {
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return Ok(None);
    };
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = p.port else {
            return Err(format!("ports[{i}].port: missing"));
        };
        ports.push(SlicePort {
            name: p.name.as_deref().unwrap_or_default().into(),
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
    let service = ObjectName {
        namespace: name.namespace.clone(),
        name: service.as_str().into(),
    };
    Ok(Some(Box::new(SliceEndpoints {
        service,
        ports: ports.into(),
        endpoints: endpoints.into(),
    })))
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
                name: p.name.as_deref().unwrap_or_default().into(),
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
    use crate::proxy::diff;

    fn name(name: &str) -> ObjectName {
        ObjectName::new("default", name)
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
    ) -> Changes {
        Changes {
            services: services.into_iter().map(|(n, s)| (n, Some(s))).collect(),
            endpoint_slices: slices.into_iter().map(|(n, s)| (n, Some(s))).collect(),
            ..Changes::default()
        }
    }

    /// A fresh compiler's maps, errors and health checks for `cluster`.
    struct Compiled {
        state: MapState,
        errors: Vec<ObjectError>,
        health_checks: BTreeMap<u16, HealthCheck>,
    }

    fn compile(cluster: Changes, node: &Node) -> Compiled {
        let mut compiler = Compiler::new(node.clone());
        compiler.stage(cluster);
        let update = compiler.commit();
        assert_eq!(update.before, MapState::default(), "nothing before");
        assert_eq!(update.after, compiler.state(), "everything is new");
        Compiled {
            state: compiler.state(),
            errors: update.errors,
            health_checks: compiler.health_checks(),
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
        let cases: Vec<(&str, Changes, Vec<&str>, Vec<&str>)> = vec![
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
            let out = compile(cluster, &node());
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
        let out = compile(c, &node());
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

    /// What metrics label a frontend's counters with: the Service holding it and the Service
    /// port it serves, never the Service that only asked for it.
    #[test]
    fn frontends_name_the_service_port_they_serve() {
        let ports = json!([
            {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]);
        let a = service_with(
            "a",
            "10.96.0.10",
            &[],
            json!({"type": "NodePort", "ports": ports}),
            json!(null),
        );
        // b asks for a's ClusterIP:80 as an ExternalIP: a keeps it.
        let b = service_with(
            "b",
            "10.96.0.11",
            &[("", 80, "TCP")],
            json!({"externalIPs": ["10.96.0.10"]}),
            json!(null),
        );
        let mut compiler = Compiler::new(node());
        compiler.stage(cluster(vec![a, b], vec![]));
        compiler.commit();
        let state = compiler.state();
        let mut got = Vec::new();
        for held in compiler.frontends() {
            assert_eq!(
                state.rev_nat.get(&held.rev_nat_id),
                Some(&RevNat::new(held.frontend.ip, held.frontend.port)),
                "{}: the id is the frontend's reverse-NAT entry",
                held.frontend
            );
            got.push(format!(
                "{} {} {}",
                held.service.name, held.port, held.frontend
            ));
        }
        got.sort();
        assert_eq!(
            got,
            [
                "a 53 10.96.0.10:53/UDP",
                "a 80 10.96.0.10:80/TCP",
                "a 80 192.0.2.1:30080/TCP",
                "b 80 10.96.0.11:80/TCP",
            ]
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
        let mut compiler = Compiler::new(node());
        let mut step = |cluster: Changes| {
            compiler.stage(cluster);
            compiler.commit();
            compiler.state()
        };
        let first = step(with(&[("10.0.0.1", None), ("10.0.0.2", None)]));
        let id_of = |state: &MapState, ip: &str| {
            let ip: Ipv4Addr = ip.parse().unwrap();
            state
                .backends
                .iter()
                .find(|(_, b)| b.ip() == ip)
                .map(|(&id, _)| id)
        };
        let one = id_of(&first, "10.0.0.1").unwrap();
        let two = id_of(&first, "10.0.0.2").unwrap();
        // 10.0.0.2 goes, 10.0.0.3 arrives: 10.0.0.1 keeps its id, 10.0.0.3 does not get 10.0.0.2's.
        let second = step(with(&[("10.0.0.1", None), ("10.0.0.3", None)]));
        assert_eq!(id_of(&second, "10.0.0.1"), Some(one));
        let three = id_of(&second, "10.0.0.3").unwrap();
        assert_ne!(three, two);
        assert_ne!(three, one);
        assert_eq!(
            second.rev_nat.keys().collect::<Vec<_>>(),
            first.rev_nat.keys().collect::<Vec<_>>()
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
        let out = compile(c, &node());
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
        let out = compile(c, &node());
        let want = BTreeMap::from([(
            31000,
            HealthCheck {
                service: name("local"),
                local_endpoints: 1,
            },
        )]);
        assert_eq!(out.health_checks, want);
    }

    #[test]
    fn a_full_id_table_refuses_then_serves_the_starved_once_ids_are_freed() {
        let mut table = IdTable::new(4, 2);
        let (one, two, three) = (1u8, 2u8, 3u8);
        assert_eq!(table.hold(one), Some(1));
        assert_eq!(table.hold(two), Some(2));
        assert_eq!(table.hold(one), Some(1), "held again: same id, no new one");
        assert_eq!(table.hold(three), None, "full");
        table.starved.insert(name("waiting"));
        assert_eq!(table.next_starved(), None, "no room yet");
        table.release(two);
        assert_eq!(table.held(&two), None);
        table.sweep();
        assert_eq!(table.next_starved(), Some(name("waiting")));
        assert_eq!(table.hold(three), Some(3), "not the id just freed");
        table.release(one);
        table.release(one);
        table.sweep();
        assert_eq!(table.hold(two), Some(4));
        assert_eq!(table.hold(one), None, "full again");
    }

    /// A tiny deterministic generator (xorshift): reproducible random clusters, no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[self.below(from.len())]
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    const SERVICES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    const SLICES: [&str; 8] = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"];

    /// A random Service `svc`: few addresses and ports, so frontends collide.
    fn random_service(rng: &mut Rng, svc: &str) -> (ObjectName, Service) {
        let cluster_ip = *rng.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "None", "x"]);
        let all_ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
        let ports = match rng.below(3) {
            0 => &all_ports[..1],
            1 => &all_ports[1..],
            _ => &all_ports[..],
        };
        let node_port = |rng: &mut Rng| *rng.pick(&[30001, 30002]);
        let kind = *rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
        let port_json: Vec<_> = ports
            .iter()
            .map(|(n, p, proto)| {
                let mut port = json!({"name": n, "port": p, "protocol": proto});
                if kind != "ClusterIP" {
                    port["nodePort"] = json!(node_port(rng));
                }
                port
            })
            .collect();
        let mut spec = json!({"type": kind, "ports": port_json});
        if rng.chance(30) {
            spec["externalIPs"] = json!([rng.pick(&["198.51.100.1", "198.51.100.2"])]);
        }
        if kind != "ClusterIP" && rng.chance(40) {
            spec["externalTrafficPolicy"] = json!("Local");
            spec["healthCheckNodePort"] = json!(rng.pick(&[31000, 31001]));
        }
        if rng.chance(20) {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        if rng.chance(20) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        let mut status = json!(null);
        if kind == "LoadBalancer" {
            if rng.chance(50) {
                spec["loadBalancerSourceRanges"] =
                    json!([rng.pick(&["203.0.113.0/24", "192.0.2.0/24"])]);
            }
            status = json!({"loadBalancer": {"ingress": [{"ip": rng.pick(&["198.51.100.10", "198.51.100.11"])}]}});
        }
        service_with(svc, cluster_ip, ports, spec, status)
    }

    /// A random EndpointSlice `name` of one of the Services (relabelled at random).
    fn random_slice(rng: &mut Rng, name: &str) -> (ObjectName, EndpointSlice) {
        let svc = *rng.pick(&SERVICES);
        let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
        let ports = if rng.chance(50) {
            &ports[..]
        } else {
            &ports[..1]
        };
        let endpoints = (0..rng.below(4))
            .map(|_| {
                let address = *rng.pick(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "bad"]);
                let (ready, terminating) = (rng.chance(70), rng.chance(30));
                let node = *rng.pick(&["node-a", "node-b"]);
                endpoint(address, ready, rng.chance(80), terminating, node)
            })
            .collect();
        slice_of(name, svc, ports, endpoints)
    }

    /// What the maps hold, with ids left out: each frontend's backends and flags, the
    /// ClusterIPs, and which backends and reverse-NAT entries exist.
    fn content(state: &MapState) -> (Vec<String>, Vec<String>) {
        let shared = state
            .cluster_ips
            .iter()
            .map(|ip| format!("ClusterIP {ip}"))
            .chain(
                state
                    .backends
                    .values()
                    .map(|b| format!("backend {}:{}", b.ip(), b.host_port())),
            )
            .chain(
                state
                    .rev_nat
                    .values()
                    .map(|r| format!("reverse NAT {:?}", r)),
            )
            .collect::<BTreeSet<_>>();
        (table(state), shared.into_iter().collect())
    }

    /// What must hold between any two writes: every entry names what exists.
    fn consistent(state: &MapState) -> Result<(), String> {
        for (key, value) in &state.services {
            if !state.rev_nat.contains_key(&value.rev_nat_id) {
                return Err(format!("{key:?} names a missing reverse-NAT entry"));
            }
            if key.slot == 0 {
                if let Some(slot) =
                    (1..=value.count).find(|&s| !state.services.contains_key(&key.with_slot(s)))
                {
                    return Err(format!("{key:?} counts missing slot {slot}"));
                }
                let ranges = state
                    .source_ranges
                    .iter()
                    .any(|(id, _)| *id == value.rev_nat_id);
                if value.flags & SVC_SOURCE_RANGES != 0 && !ranges {
                    return Err(format!("{key:?} checks source ranges not written"));
                }
            } else if !state.backends.contains_key(&value.backend_id) {
                return Err(format!("{key:?} names a missing backend"));
            }
        }
        Ok(())
    }

    #[test]
    fn random_changes_applied_incrementally_give_what_a_fresh_compile_gives() {
        for seed in 1..=200 {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(seed));
            let mut compiler = Compiler::new(node());
            let (mut services, mut slices) = (BTreeMap::new(), BTreeMap::new());
            // What the datapath holds, write after write; every id ever given, and to what.
            let mut maps = MapState::default();
            let mut backend_ids: BTreeMap<u32, Backend> = BTreeMap::new();
            let mut rev_nat_ids: BTreeMap<u32, RevNat> = BTreeMap::new();
            for step in 0..30 {
                let at = format!("seed {seed} step {step}");
                let mut changes = Changes::default();
                for _ in 0..=rng.below(3) {
                    if rng.chance(50) {
                        let svc = *rng.pick(&SERVICES);
                        let new = rng.chance(75).then(|| random_service(&mut rng, svc));
                        changes.services.insert(name(svc), new.map(|(_, s)| s));
                    } else {
                        let slice = *rng.pick(&SLICES);
                        let new = rng.chance(75).then(|| random_slice(&mut rng, slice));
                        changes
                            .endpoint_slices
                            .insert(name(slice), new.map(|(_, s)| s));
                    }
                }
                for (name, service) in &changes.services {
                    match service {
                        Some(s) => services.insert(name.clone(), s.clone()),
                        None => services.remove(name),
                    };
                }
                for (name, slice) in &changes.endpoint_slices {
                    match slice {
                        Some(s) => slices.insert(name.clone(), s.clone()),
                        None => slices.remove(name),
                    };
                }
                let before_step = maps.clone();
                compiler.stage(changes);
                let update = compiler.commit();
                for (key, value) in &update.before.services {
                    assert_eq!(
                        maps.services.get(key),
                        Some(value),
                        "{at}: before is what the maps hold"
                    );
                }
                for op in diff(&update.before, &update.after) {
                    maps.apply(&op);
                    if let Err(e) = consistent(&maps) {
                        panic!("{at}: after {op}: {e}");
                    }
                }
                assert_eq!(
                    maps,
                    compiler.state(),
                    "{at}: the writes reach the compiler's state"
                );

                let fresh = compile(
                    cluster(
                        services
                            .iter()
                            .map(|(n, s)| (n.clone(), s.clone()))
                            .collect(),
                        slices.iter().map(|(n, s)| (n.clone(), s.clone())).collect(),
                    ),
                    &node(),
                );
                assert_eq!(
                    content(&maps),
                    content(&fresh.state),
                    "{at}: as compiled from scratch"
                );
                assert_eq!(compiler.health_checks(), fresh.health_checks, "{at}");
                let fresh_errors: BTreeSet<String> =
                    fresh.errors.iter().map(ToString::to_string).collect();
                for e in &update.errors {
                    assert!(
                        fresh_errors.contains(&e.to_string()),
                        "{at}: {e} not in {fresh_errors:?}"
                    );
                }

                // Ids: kept while their backend or frontend lives, never given to another.
                for (id, backend) in &maps.backends {
                    let first = *backend_ids.entry(*id).or_insert(*backend);
                    assert_eq!(first, *backend, "{at}: backend id {id} reused");
                    if let Some((old, _)) = before_step.backends.iter().find(|(_, b)| *b == backend)
                    {
                        assert_eq!(old, id, "{at}: {backend:?} changed id");
                    }
                }
                for (id, rev_nat) in &maps.rev_nat {
                    let first = *rev_nat_ids.entry(*id).or_insert(*rev_nat);
                    assert_eq!(first, *rev_nat, "{at}: reverse-NAT id {id} reused");
                }
                for (key, value) in &maps.services {
                    if let Some(old) = before_step.services.get(key) {
                        assert_eq!(old.rev_nat_id, value.rev_nat_id, "{at}: {key:?} changed id");
                    }
                }
            }
        }
    }
}
