//! The cluster as the agent knows it: Kubernetes objects from any source, keyed by name.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// `namespace/name`, the identity of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the proxy compiles into the datapath.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    // Shared with the source, which keeps them between loads: a sync copies no object.
    pub services: BTreeMap<ObjectName, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectName, Arc<EndpointSlice>>,
}

/// An object the agent refused, and why: `Service default/web: spec.ports[0].port: ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// Kind and name, e.g. `Service default/web`.
    pub object: String,
    pub reason: String,
}

impl ObjectError {
    pub fn new(kind: &str, name: &ObjectName, reason: impl Into<String>) -> Self {
        Self {
            object: format!("{kind} {name}"),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// This node, as the proxy sees it.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// Endpoints with this `nodeName` are local.
    pub name: String,
    /// All the node's addresses.
    pub ips: Vec<Ipv4Addr>,
    /// The addresses NodePorts are served on (the node IPs allowed by --nodeport-addresses).
    pub nodeport_ips: Vec<Ipv4Addr>,
}

/// An IPv4 prefix such as `10.244.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.address) & mask
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    /// `a.b.c.d/n`; a bare address is a /32.
    fn from_str(s: &str) -> Result<Self, String> {
        let (address, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let address = address
            .trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let prefix = prefix
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR"))?;
        Ok(Self { address, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}
