//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | bench | images`.
mod bench;
mod demo;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (Debian packages, nightly rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object (as embedded in the release agent) and print where it is.
    BuildEbpf,
    /// Run every test: unit, golden-packet and end-to-end (needs root).
    Test,
    /// Run a standalone node (containerd + the agent + deploy/demo/node/) and show its Service
    /// answering from every pod (needs root).
    Demo {
        /// Instead: the agent as a Service proxy only, between a client and 3 backend namespaces.
        #[arg(long)]
        proxy: bool,
    },
    /// Measure node-agent against kube-proxy's iptables and nftables modes, and its embedded
    /// kubelet's pod start against the raw CRI calls it needs (needs root).
    Bench(bench::BenchArgs),
    /// Build the local OCI images (pause, busybox) as archives for `ctr images import`.
    Images {
        /// Default: target/images in the workspace.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::run()?;
            println!("{}", build_ebpf(&root)?.display());
            Ok(())
        }
        Task::Test => {
            setup::run()?;
            // The end-to-end tests start the agent binary the way a user does: build it first.
            cargo(&root, &["build", "--package", "node-agent"])?;
            cargo(&root, &["test"])
        }
        Task::Demo { proxy } => {
            setup::run()?;
            cargo(&root, &["build", "--release", "--package", "node-agent"])?;
            let agent = root.join("target/release/node-agent");
            if proxy {
                demo::proxy(&agent, &root.join("deploy/demo/proxy"))
            } else {
                demo::node(&agent, &root.join("deploy/demo/node"))
            }
        }
        Task::Bench(args) => {
            setup::run()?;
            // The agent and the raw CRI bench linking its CRI client, in one build: they share
            // one build of node-agent's library (built apart, each gets its own feature set).
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "node-agent",
                    "--package",
                    "node-agent-tests",
                    "--bin",
                    "node-agent",
                    "--example",
                    bench::RAW_CRI_EXAMPLE,
                ],
            )?;
            bench::run(&root.join("target/release/node-agent"), args)
        }
        Task::Images { out } => {
            setup::run()?;
            for archive in
                node_agent_tests::image::build_all(&out.unwrap_or(root.join("target/images")))?
            {
                println!("{}", archive.display());
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new(env!("CARGO")).args(args).current_dir(root))
}

/// Runs `command`, failing unless it exits 0.
fn exec(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the release agent and returns the eBPF object its build script produced: the very
/// file the agent embeds (cargo reports the build script's OUT_DIR in its JSON messages).
fn build_ebpf(root: &Path) -> anyhow::Result<PathBuf> {
    let mut child = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "node-agent",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out_dir = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?)?;
        let is_agent = message["package_id"]
            .as_str()
            .is_some_and(|id| id.contains("/node-agent#"));
        if message["reason"] == "build-script-executed" && is_agent {
            out_dir = message["out_dir"].as_str().map(PathBuf::from);
        }
    }
    if !child.wait()?.success() {
        bail!("building node-agent failed");
    }
    let object = out_dir
        .context("cargo did not report node-agent's build script")?
        .join("node-ebpf");
    if !object.exists() {
        bail!("{} is missing", object.display());
    }
    Ok(object)
}
