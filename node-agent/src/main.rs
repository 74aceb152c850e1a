use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource};
use node_agent::{
    agent, cleanup, config, datapath, lb, model::Ipv4Cidr, pods, source::api::ApiConfig,
};
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
// Parsed once, at start: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the node from a manifest directory until SIGTERM: its pods through the container
    /// runtime, its Services in the datapath. Or, from the Kubernetes API (--kubeconfig, or
    /// in-cluster when neither is given in a pod), a Service proxy (--kubelet=false).
    Run(RunArgs),
    /// The pods the running agent's kubelet reports, with their status.
    Pods {
        /// Address of the running agent's health server.
        #[arg(long, default_value = "127.0.0.1:10256")]
        health_bind: SocketAddr,
        #[arg(short, long, value_enum, default_value_t = pods::Output::Table)]
        output: pods::Output,
    },
    /// Remove kube-proxy's iptables and nftables rules (as `kube-proxy --cleanup`), when
    /// taking over a node from it.
    CleanupKubeProxy,
    /// Inspect the load-balancing maps.
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A NodeAgentConfiguration file (KubeProxyConfiguration / KubeletConfiguration field
    /// names); flags given on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of Service, EndpointSlice, Pod, ConfigMap and Secret manifests
    /// (*.yaml, *.yml, *.json); or staticPodPath in --config.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Follow the Kubernetes API server this kubeconfig names (its current context).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Node devices to attach the datapath to, comma-separated (pod interfaces are found
    /// on their own).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Address of the /healthz and /livez server.
    #[arg(long, default_value = "127.0.0.1:10256")]
    health_bind: SocketAddr,
    /// Address of the Prometheus /metrics server.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind: SocketAddr,
    #[command(flatten)]
    bpffs: Bpffs,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    kubelet: KubeletArgs,
}

impl RunArgs {
    /// The settings `run` uses: these flags over the --config file; `matches` (the `run`
    /// subcommand's) tell which flags were given on the command line.
    fn into_config(self, matches: &clap::ArgMatches) -> anyhow::Result<agent::RunConfig> {
        let source = match self.kubeconfig {
            Some(path) => agent::Source::Api(ApiConfig::Kubeconfig(path)),
            None => agent::Source::Manifests(self.manifests.unwrap_or_default()),
        };
        let flags = agent::RunConfig {
            source,
            devices: self.devices,
            health_bind: self.health_bind,
            metrics_bind: self.metrics_bind,
            bpffs: self.bpffs.dir,
            node: self.node.into_config()?,
            kubelet: self.kubelet.into_config(),
        };
        let file = self.config.as_deref().map(config::load).transpose()?;
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mut run = config::effective(flags, file.unwrap_or_default(), given)
            .map_err(anyhow::Error::msg)?;
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        config::in_cluster_unless_given(&mut run, in_cluster).map_err(anyhow::Error::msg)?;
        Ok(run)
    }
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

/// The embedded kubelet (the kubelet's flags of the same names where it has them).
#[derive(clap::Args)]
struct KubeletArgs {
    /// Run the node's pods; false: a Service proxy only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kubelet: bool,
    /// The CRI runtime's socket.
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    cri_endpoint: String,
    /// The node's pod range: the agent writes the CNI network (bridge + host-local) for it.
    #[arg(long)]
    pod_cidr: Option<Ipv4Cidr>,
    /// Where the runtime reads CNI networks from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Pod volumes, logs and IPAM state.
    #[arg(long, default_value = "/var/lib/node-agent")]
    root_dir: PathBuf,
    /// The cgroup pods go under (cgroupfs driver).
    #[arg(long, default_value = "/kubepods")]
    cgroup_root: String,
}

impl KubeletArgs {
    fn into_config(self) -> Option<agent::KubeletConfig> {
        self.kubelet.then_some(agent::KubeletConfig {
            cri_endpoint: self.cri_endpoint,
            pod_cidr: self.pod_cidr,
            cni_conf_dir: self.cni_conf_dir,
            root_dir: self.root_dir,
            cgroup_root: self.cgroup_root,
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
    let matches = Cli::command().get_matches();
    match Cli::from_arg_matches(&matches)?.command {
        Command::Run(args) => {
            let run = matches
                .subcommand_matches("run")
                .expect("the run subcommand");
            let config = args.into_config(run)?;
            tokio::runtime::Runtime::new()?.block_on(agent::run(config))
        }
        Command::Pods {
            health_bind,
            output,
        } => {
            print!("{}", pods::show(health_bind, output)?);
            Ok(())
        }
        Command::CleanupKubeProxy => cleanup::kube_proxy(),
        Command::Lb {
            command: LbCommand::List { bpffs },
        } => {
            print!("{}", lb::format_list(&datapath::read_pinned(&bpffs.dir)?));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id `config::effective` asks about is a `run` argument (clap panics on others in
    /// debug builds), and a flag given on the command line wins over the file.
    #[test]
    fn config_file_under_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(
            &file,
            "staticPodPath: /etc/kubernetes/manifests\nclusterCIDR: 10.244.0.0/16\n\
             podCIDR: 10.244.1.0/24\nhostnameOverride: n1\n",
        )
        .unwrap();
        let matches = Cli::command().get_matches_from([
            "node-agent".as_ref(),
            "run".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
            "--cluster-cidr".as_ref(),
            "10.0.0.0/8".as_ref(),
        ]);
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("not run");
        };
        let config = args
            .into_config(matches.subcommand_matches("run").unwrap())
            .unwrap();
        assert!(matches!(
            &config.source,
            agent::Source::Manifests(d) if d == &PathBuf::from("/etc/kubernetes/manifests")
        ));
        assert_eq!(config.node.cluster_cidr, "10.0.0.0/8".parse().ok());
        assert_eq!(config.node.name, "n1");
        assert_eq!(
            config.kubelet.unwrap().pod_cidr,
            "10.244.1.0/24".parse().ok()
        );
    }
}
