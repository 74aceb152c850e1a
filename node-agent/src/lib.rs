//! node-agent: an eBPF kube-proxy replacement (and, later, an embedded kubelet) for one node.
//!
//! sources (manifest directory) → model → proxy (compile → diff) → datapath (eBPF maps).
pub mod agent;
pub mod cri;
pub mod datapath;
pub mod endpoints;
pub mod health;
pub mod kubelet;
pub mod lb;
pub mod memory;
pub mod model;
pub mod pods;
pub mod proxy;
pub mod source;
