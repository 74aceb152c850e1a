//! The cluster as the agent learns it: changes to Kubernetes objects from any source, keyed
//! by name.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};

/// `namespace/name`, the identity of a namespaced object. Cheap to clone: the proxy keeps it in
/// several indexes for every object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What changed since the source last reported (kube-rs watcher style): each object applied,
/// with its new version, or deleted (`None`). An object applied again unchanged is allowed;
/// the proxy notices that nothing it uses changed. The proxy uses Services and EndpointSlices;
/// the kubelet Pods and the ConfigMaps and Secrets they reference.
#[derive(Debug, Default)]
pub struct Changes {
    pub services: BTreeMap<ObjectName, Option<Service>>,
    pub endpoint_slices: BTreeMap<ObjectName, Option<EndpointSlice>>,
    pub pods: BTreeMap<ObjectName, Option<Pod>>,
    pub config_maps: BTreeMap<ObjectName, Option<ConfigMap>>,
    pub secrets: BTreeMap<ObjectName, Option<Secret>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.pods.is_empty()
            && self.config_maps.is_empty()
            && self.secrets.is_empty()
    }

    /// These changes followed by `later` ones.
    pub fn extend(&mut self, later: Changes) {
        self.services.extend(later.services);
        self.endpoint_slices.extend(later.endpoint_slices);
        self.pods.extend(later.pods);
        self.config_maps.extend(later.config_maps);
        self.secrets.extend(later.secrets);
    }
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
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// The first address of the prefix (`10.88.0.0` for `10.88.0.7/24`).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn name(name: &str) -> ObjectName {
        ObjectName::new("default", name)
    }

    #[test]
    fn later_changes_win_for_every_kind() {
        let mut changes = Changes::default();
        assert!(changes.is_empty());
        changes.pods.insert(name("web"), Some(Pod::default()));
        assert!(!changes.is_empty());
        changes
            .secrets
            .insert(name("creds"), Some(Secret::default()));
        let mut later = Changes::default();
        later.pods.insert(name("web"), None);
        later
            .config_maps
            .insert(name("cfg"), Some(ConfigMap::default()));
        changes.extend(later);
        assert_eq!(changes.pods, BTreeMap::from([(name("web"), None)]));
        assert_eq!(changes.config_maps.len(), 1);
        assert_eq!(changes.secrets.len(), 1);
        for only in [
            Changes {
                config_maps: BTreeMap::from([(name("c"), None)]),
                ..Default::default()
            },
            Changes {
                secrets: BTreeMap::from([(name("s"), None)]),
                ..Default::default()
            },
        ] {
            assert!(!only.is_empty());
        }
    }
}
