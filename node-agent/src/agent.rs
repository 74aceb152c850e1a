//! `node-agent run`: the datapath fed from a manifest directory until SIGTERM.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::Datapath,
    health::{self, ServiceHealthServers},
    memory,
    model::{Ipv4Cidr, Node},
    proxy::Proxy,
    source::manifest::{self, ManifestDir, Watched},
};

pub struct RunConfig {
    pub manifests: PathBuf,
    pub devices: Vec<String>,
    pub health_bind: SocketAddr,
    pub bpffs: PathBuf,
    pub node: NodeConfig,
}

/// The node's identity and addressing, as given on the command line.
pub struct NodeConfig {
    pub name: String,
    /// Empty: the IPv4 addresses of the devices.
    pub ips: Vec<Ipv4Addr>,
    pub service_cidr: Option<Ipv4Cidr>,
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// Empty: every node IP.
    pub nodeport_addresses: Vec<Ipv4Cidr>,
}

impl NodeConfig {
    /// What the proxy and the datapath need to know of this node, given the addresses found
    /// on its devices.
    pub fn resolve(&self, device_ips: &[Ipv4Addr]) -> (Node, node_common::Config) {
        let ips = if self.ips.is_empty() {
            device_ips
        } else {
            &self.ips
        };
        let nodeport_ips = ips
            .iter()
            .copied()
            .filter(|ip| {
                self.nodeport_addresses.is_empty()
                    || self.nodeport_addresses.iter().any(|c| c.contains(*ip))
            })
            .collect();
        let cidr = |c: Option<Ipv4Cidr>| {
            c.map(|c| node_common::Cidr::new(c.address, c.prefix))
                .unwrap_or_default()
        };
        let config = node_common::Config {
            snat_address: ips
                .first()
                .map(|ip| u32::from_ne_bytes(ip.octets()))
                .unwrap_or(0),
            cluster_cidr: cidr(self.cluster_cidr),
            service_cidr: cidr(self.service_cidr),
        };
        (
            Node {
                name: self.name.clone(),
                ips: ips.to_vec(),
                nodeport_ips,
            },
            config,
        )
    }
}

/// The IPv4 addresses of `devices`, in the order given.
fn device_addresses(devices: &[String]) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut ips = Vec::new();
    for device in devices {
        for ifaddr in nix::ifaddrs::getifaddrs()?.filter(|a| &a.interface_name == device) {
            if let Some(ip) = ifaddr
                .address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip())
            {
                ips.push(ip);
            }
        }
    }
    Ok(ips)
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (node, datapath_config) = config.node.resolve(&device_addresses(&config.devices)?);
    info!(node = %node.name, nodeport_ips = ?node.nodeport_ips, "node");
    let mut datapath = Datapath::load(&config.bpffs, &datapath_config)?;
    for device in &config.devices {
        datapath.attach(device)?;
    }
    info!(devices = ?config.devices, bpffs = %config.bpffs.display(), "datapath attached");
    let health = health::Health::default();
    health::serve(config.health_bind, health.clone()).await?;

    let (changed, mut changes) = mpsc::unbounded_channel();
    let _watcher = manifest::watch(&config.manifests, changed)?;
    let mut state = NodeState {
        manifests: ManifestDir::new(&config.manifests),
        proxy: Proxy::new(node),
        datapath,
        health_checks: ServiceHealthServers::default(),
    };
    // The first load hands each file's objects to the proxy as soon as it is parsed.
    let (start, mut files) = (Instant::now(), 0);
    state.manifests.load_each(&mut |loaded| {
        files += loaded.parsed;
        report(&loaded);
        state.proxy.stage(loaded.changes);
    })?;
    info!(
        files,
        elapsed_us = start.elapsed().as_micros() as u64,
        "manifests loaded"
    );
    memory::release();
    state.sync(files).await.context("first sync")?;
    memory::release();
    health.synced();

    loop {
        tokio::select! {
            Some(first) = changes.recv() => {
                // The watcher reports complete writes only, so nothing waits for a write to
                // finish: what is already queued is applied together, and that is all.
                let queued: Vec<Watched> = std::iter::once(first)
                    .chain(std::iter::from_fn(|| changes.try_recv().ok()))
                    .collect();
                match state.apply(queued).await {
                    Ok(()) => health.synced(),
                    Err(e) => error!("sync failed: {e:#}"),
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping");
    drop(state);
    Ok(())
}

/// Logs what the source refused or skipped.
fn report(loaded: &manifest::Loaded) {
    for e in &loaded.errors {
        warn!("manifest refused: {e}");
    }
    for s in &loaded.skipped {
        debug!("manifest skipped (kind not used by node-agent): {s}");
    }
}

/// What a sync reads and writes: the manifests as last read, what the proxy has applied, the
/// datapath and the health-check servers.
struct NodeState {
    manifests: ManifestDir,
    proxy: Proxy,
    datapath: Datapath,
    health_checks: ServiceHealthServers,
}

impl NodeState {
    /// Reads the paths the watcher named (every manifest when it lost track), and writes the
    /// difference they make.
    async fn apply(&mut self, watched: Vec<Watched>) -> anyhow::Result<()> {
        let mut paths = BTreeSet::new();
        let mut everything = false;
        for w in watched {
            match w {
                Watched::Path(path) => {
                    paths.insert(path);
                }
                Watched::Everything => everything = true,
            }
        }
        let loaded = if everything {
            self.manifests.load()?
        } else {
            self.manifests.reload(paths)
        };
        report(&loaded);
        let files = loaded.parsed;
        self.proxy.stage(loaded.changes);
        self.sync(files).await
    }

    /// Writes what was staged; `files` were read for it.
    async fn sync(&mut self, files: usize) -> anyhow::Result<()> {
        let report = self.proxy.sync(&mut self.datapath)?;
        for e in &report.errors {
            warn!("object refused: {e}");
        }
        self.health_checks.reconcile(&report.health_checks).await;
        info!(
            files_parsed = files,
            writes = report.writes,
            elapsed_us = (report.compiled + report.written).as_micros() as u64,
            compile_us = report.compiled.as_micros() as u64,
            write_us = report.written.as_micros() as u64,
            "synced"
        );
        Ok(())
    }
}
