//! Test fixtures for node-agent: network namespaces and veths, backend servers, the agent
//! process, manifests, locally built OCI images and a containerd. Every fixture cleans up on Drop, also when a test fails.
pub mod agent;
pub mod backend;
pub mod client;
pub mod containerd;
pub mod image;
pub mod manifest;
pub mod netns;
pub mod topology;

/// Names unique to this process, for namespaces, pins and directories.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "na{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
