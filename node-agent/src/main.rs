use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use node_agent::{agent, datapath, lb};
use tracing_subscriber::EnvFilter;

/// An eBPF Service proxy (kube-proxy replacement) for one Kubernetes node.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath from a manifest directory and keep it in sync until SIGTERM.
    Run {
        /// Directory of Service and EndpointSlice manifests (*.yaml, *.yml, *.json).
        #[arg(long)]
        manifests: PathBuf,
        /// Devices to attach the TC ingress program to, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// Address of the /healthz server.
        #[arg(long, default_value = "127.0.0.1:10256")]
        health_bind: SocketAddr,
        #[command(flatten)]
        bpffs: Bpffs,
    },
    /// Inspect the load-balancing maps.
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
}

#[derive(Subcommand)]
enum LbCommand {
    /// Each Service frontend (VIP:port/protocol) with its backends.
    List {
        #[command(flatten)]
        bpffs: Bpffs,
    },
}

#[derive(clap::Args)]
struct Bpffs {
    /// Where the datapath's maps are pinned.
    #[arg(long = "bpffs", default_value = "/sys/fs/bpf/node-agent")]
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            devices,
            health_bind,
            bpffs,
        } => {
            let config = agent::RunConfig {
                manifests,
                devices,
                health_bind,
                bpffs: bpffs.dir,
            };
            tokio::runtime::Runtime::new()?.block_on(agent::run(config))
        }
        Command::Lb {
            command: LbCommand::List { bpffs },
        } => {
            print!("{}", lb::format_list(&datapath::read_pinned(&bpffs.dir)?));
            Ok(())
        }
    }
}
