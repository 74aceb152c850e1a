// The library target exists so node-agent can name this crate as a build-dependency: cargo then
// rebuilds the embedded eBPF object whenever node-common (the shared ABI) changes.
#![no_std]
