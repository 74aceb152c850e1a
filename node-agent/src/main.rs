use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use clap::{Parser, Subcommand};
use node_agent::{agent, datapath, lb, model::Ipv4Cidr, pods};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: node_agent::memory::Allocator = mimalloc::MiMalloc;

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
        #[command(flatten)]
        node: NodeArgs,
    },
    /// The pods the running agent's kubelet reports, with their status.
    Pods {
        /// Address of the running agent's health server.
        #[arg(long, default_value = "127.0.0.1:10256")]
        health_bind: SocketAddr,
        #[arg(short, long, value_enum, default_value_t = pods::Output::Table)]
        output: pods::Output,
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

/// The node's identity and addressing (kube-proxy's flags of the same names).
#[derive(clap::Args)]
struct NodeArgs {
    /// Endpoints with this nodeName are local (traffic policies Local). Default: the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// The node's IPv4 addresses, comma-separated; the first is the masquerade address.
    /// Default: the addresses of --devices.
    #[arg(long, value_delimiter = ',')]
    node_ips: Vec<Ipv4Addr>,
    /// The ClusterIP range: packets to an address in it that no Service uses are dropped.
    #[arg(long)]
    service_cidr: Option<Ipv4Cidr>,
    /// The pod range: sources in it are cluster traffic (not masqueraded to ClusterIPs, and
    /// sent to all endpoints under externalTrafficPolicy Local).
    #[arg(long)]
    cluster_cidr: Option<Ipv4Cidr>,
    /// CIDRs whose node IPs serve NodePorts, comma-separated. Default: every node IP.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<Ipv4Cidr>,
}

impl NodeArgs {
    fn into_config(self) -> anyhow::Result<agent::NodeConfig> {
        let name = match self.node_name {
            Some(name) => name,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        Ok(agent::NodeConfig {
            name,
            ips: self.node_ips,
            service_cidr: self.service_cidr,
            cluster_cidr: self.cluster_cidr,
            nodeport_addresses: self.nodeport_addresses,
        })
    }
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
            node,
        } => {
            let config = agent::RunConfig {
                manifests,
                devices,
                health_bind,
                bpffs: bpffs.dir,
                node: node.into_config()?,
            };
            tokio::runtime::Runtime::new()?.block_on(agent::run(config))
        }
        Command::Pods {
            health_bind,
            output,
        } => {
            print!("{}", pods::show(health_bind, output)?);
            Ok(())
        }
        Command::Lb {
            command: LbCommand::List { bpffs },
        } => {
            print!("{}", lb::format_list(&datapath::read_pinned(&bpffs.dir)?));
            Ok(())
        }
    }
}
