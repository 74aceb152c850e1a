//! The prerequisites, installed idempotently: each step checks first and says what it does.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::exec;

/// Debian packages: LLVM 22 to build bpf-linker; iproute2 and ethtool for the namespace tests;
/// iptables (legacy and nf_tables backends) and nftables for the kube-proxy baselines of the
/// benchmark; containerd, runc, the CNI plugins (in /usr/lib/cni), busybox-static (the test
/// image's userland) and protoc (k8s-cri's build script) for the CRI tests.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libxml2-dev",
    "iproute2",
    "ethtool",
    "iptables",
    "nftables",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "protobuf-compiler",
    // The local pause image is a static C program.
    "gcc",
    "libc6-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    ebpf_toolchain()?;
    bpf_linker()
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The eBPF crate's pinned nightly and its components, as node-ebpf/rust-toolchain.toml
/// names them: rustup reads that file in node-ebpf and installs only what is missing. A dated
/// toolchain never updates another (a plain `nightly` update brings an LLVM bpf-linker
/// cannot read).
fn ebpf_toolchain() -> anyhow::Result<()> {
    let mut install = Command::new("rustup");
    install
        .args(["toolchain", "install"])
        .current_dir(crate::workspace_root().join("node-ebpf"))
        // Set for us by cargo's rustup proxy; it would override the toolchain file.
        .env_remove("RUSTUP_TOOLCHAIN");
    exec(&mut install)
}

fn bpf_linker() -> anyhow::Result<()> {
    if output("bpf-linker", &["--version"]).is_ok_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (about a minute)"
    ));
    // /usr/bin/llvm-config is LLVM 14: put LLVM 22's first.
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
}

fn say(what: &str) {
    eprintln!("setup: {what}");
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
