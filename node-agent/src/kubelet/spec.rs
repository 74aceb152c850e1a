//! See kubelet/mod.rs.
