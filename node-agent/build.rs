//! Builds node-ebpf for the BPF target so the agent binary carries its datapath inside it.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "node-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../node-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
