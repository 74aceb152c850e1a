//! node-agent: an eBPF kube-proxy replacement and an embedded kubelet for one node.
//!
//! sources (manifest directory) → model → proxy (compile → diff) → datapath (eBPF maps);
//! Pods → kubelet (CRI workers) → pod status → endpoints → proxy.
pub mod agent;
pub mod cleanup;
pub mod config;
pub mod cri;
pub mod datapath;
pub mod endpoints;
pub mod health;
pub mod kubelet;
pub mod lb;
pub mod links;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pods;
pub mod proxy;
pub mod rbac;
pub mod source;
