//! The embedded kubelet: the node's pods run through CRI v1 (containerd), each by its own
//! worker; their status feeds the built-in endpoints and `node-agent pods`.
//!
//! - `spec`: PodSpec → CRI sandbox and container configs (pure), and what makes a pod unrunnable.
//! - `volumes`: emptyDir, hostPath, configMap and secret volumes on disk, and their mounts.
//! - `probe`: startup, liveness and readiness probes (threshold state machines, and runners).
//! - `backoff`: the kubelet's restart and image-pull backoff.
//! - `cni`: the CNI network configuration for the node's pod range.
use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use crate::model::ObjectName;

pub mod backoff;
pub mod cni;
pub mod probe;
pub mod spec;
pub mod volumes;

/// The ConfigMaps and Secrets pods may reference (env, envFrom, volumes), by namespace/name.
#[derive(Clone, Debug, Default)]
pub struct PodRefs {
    pub config_maps: BTreeMap<ObjectName, ConfigMap>,
    pub secrets: BTreeMap<ObjectName, Secret>,
}

/// Why a pod, or one of its containers, cannot run: a kubelet reason (`CreateContainerConfigError`,
/// `InvalidImageName`, ...) and a message naming the field and the missing or bad value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub reason: &'static str,
    pub message: String,
}

impl SpecError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for SpecError {}
