//! The cluster as the agent knows it: Kubernetes objects from any source, keyed by name.
use std::{collections::BTreeMap, fmt};

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
    pub services: BTreeMap<ObjectName, Service>,
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
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
