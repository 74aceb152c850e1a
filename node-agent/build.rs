//! Builds node-ebpf for the BPF target so the agent binary carries its datapath inside it.
use aya_build::{Package, Toolchain};

/// node-ebpf's pinned compiler (see that file for why).
const TOOLCHAIN_FILE: &str = include_str!("../node-ebpf/rust-toolchain.toml");

fn main() -> anyhow::Result<()> {
    let channel = TOOLCHAIN_FILE
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .ok_or_else(|| anyhow::anyhow!("node-ebpf/rust-toolchain.toml names no channel"))?;
    println!("cargo:rerun-if-changed=../node-ebpf/rust-toolchain.toml");
    let ebpf = Package {
        name: "node-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../node-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(channel))
}
