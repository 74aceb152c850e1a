//! `node-agent run`: the node fed from a manifest directory until SIGTERM: the datapath from
//! its Services and EndpointSlices, the kubelet from its Pods, and the built-in endpoints
//! controller between them. Or a Service proxy fed from the Kubernetes API.
use std::{
    collections::{BTreeMap, BTreeSet},
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

use k8s_openapi::api::core::v1::Pod;

use crate::{
    datapath::Datapath,
    endpoints::{Endpoints, LocalPod},
    health::{self, Health, ServiceHealthServers},
    kubelet::{self, Kubelet, PodChanges, cni},
    links, memory,
    metrics::{self, Metrics},
    model::{Changes, Ipv4Cidr, Node, ObjectName},
    proxy::Proxy,
    source::{
        api::{self, ApiConfig, Update},
        manifest::{self, ManifestDir, Watched},
    },
};

/// Where the node learns the cluster from.
pub enum Source {
    /// A manifest directory (standalone).
    Manifests(PathBuf),
    /// The Kubernetes API: Services and EndpointSlices only for now (the kubelet is not fed
    /// from it yet).
    Api(ApiConfig),
}

pub struct RunConfig {
    pub source: Source,
    pub devices: Vec<String>,
    pub health_bind: SocketAddr,
    pub metrics_bind: SocketAddr,
    pub bpffs: PathBuf,
    pub node: NodeConfig,
    /// None: Service proxy only.
    pub kubelet: Option<KubeletConfig>,
}

/// The embedded kubelet's runtime, pod network and directories.
pub struct KubeletConfig {
    pub cri_endpoint: String,
    /// The node's pod range: the agent writes the CNI network for it.
    pub pod_cidr: Option<Ipv4Cidr>,
    pub cni_conf_dir: PathBuf,
    pub root_dir: PathBuf,
    pub cgroup_root: String,
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

pub async fn run(mut config: RunConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(config.source, Source::Manifests(_)) || config.kubelet.is_none(),
        "the kubelet is not fed from the Kubernetes API yet: run with --kubelet=false"
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut ips = device_addresses(&config.devices)?;
    let pod_cidr = config.kubelet.as_ref().and_then(|k| k.pod_cidr);
    if let Some(cidr) = pod_cidr {
        // Pods are cluster traffic; with no device given, the node is its pod gateway.
        config.node.cluster_cidr.get_or_insert(cidr);
        if ips.is_empty() {
            ips.push(cni::gateway(cidr));
        }
    }
    let (node, datapath_config) = config.node.resolve(&ips);
    info!(node = %node.name, nodeport_ips = ?node.nodeport_ips, "node");
    let mut datapath = Datapath::load(&config.bpffs, &datapath_config)?;
    for device in &config.devices {
        datapath.attach(device)?;
    }
    info!(devices = ?config.devices, bpffs = %config.bpffs.display(), "datapath attached");
    let health = health::Health::default();
    health::serve(config.health_bind, health.clone()).await?;
    let metrics = Metrics::default();
    let (ask, mut scrapes) = mpsc::channel(4);
    let counters = datapath.service_counters()?;
    metrics::serve(config.metrics_bind, metrics.clone(), counters, ask).await?;

    let (kubelet_events, mut pod_events) = mpsc::unbounded_channel();
    let kubelet = match config.kubelet {
        Some(k) => {
            if let Some(cidr) = k.pod_cidr {
                let path = cni::write(&k.cni_conf_dir, cidr, &k.root_dir.join("ipam"))?;
                info!(pod_cidr = %cidr, cni_config = %path.display(), "pod network");
            }
            let settings = kubelet::Settings {
                cri_endpoint: k.cri_endpoint,
                node_name: node.name.clone(),
                host_ip: node.ips.first().copied(),
                sandbox: kubelet::spec::SandboxSettings {
                    cgroup_root: k.cgroup_root,
                    log_root: k.root_dir.join("logs"),
                },
                root_dir: k.root_dir,
            };
            Some(Kubelet::spawn(settings, kubelet_events))
        }
        None => None,
    };

    // Pod interfaces get the datapath as soon as they join the pod bridge, while the runtime
    // still sets the sandbox up.
    let (link_changed, mut link_changes) = mpsc::unbounded_channel();
    if kubelet.is_some() {
        links::watch(move || link_changed.send(()).is_ok())?;
    }

    let mut state = NodeState {
        endpoints: Endpoints::new(node.name.clone()),
        proxy: Proxy::new(node),
        datapath,
        health_checks: ServiceHealthServers::default(),
        kubelet,
        pods: BTreeMap::new(),
        pod_devices: BTreeSet::new(),
        health: health.clone(),
        metrics,
    };
    let dir = match config.source {
        Source::Manifests(dir) => dir,
        Source::Api(api) => {
            return follow_api(&api, state, &mut scrapes, &mut sigterm, &mut sigint).await;
        }
    };
    let (changed, mut changes) = mpsc::unbounded_channel();
    let _watcher = manifest::watch(&dir, changed)?;
    let mut manifests = ManifestDir::new(&dir);
    // The first load hands each file's objects on as soon as it is parsed.
    let (start, mut files) = (Instant::now(), 0);
    let mut first = PodChanges::default();
    let NodeState {
        endpoints, proxy, ..
    } = &mut state;
    manifests.load_each(&mut |loaded| {
        files += loaded.parsed;
        report(&loaded);
        let mut changes = loaded.changes;
        first.pods.append(&mut changes.pods);
        first.config_maps.append(&mut changes.config_maps);
        first.secrets.append(&mut changes.secrets);
        stage(endpoints, proxy, changes);
    })?;
    // The kubelet gets every pod at once: what it does not get now it may remove as left over.
    if let Some(kubelet) = &state.kubelet {
        kubelet.apply(first);
    }
    info!(
        files,
        elapsed_us = start.elapsed().as_micros() as u64,
        "manifests loaded"
    );
    memory::release();
    state.sync(files, None).await.context("first sync")?;
    memory::release();
    health.synced();

    loop {
        tokio::select! {
            Some(first) = changes.recv() => {
                // Seen now: the watcher hands complete writes on as they happen.
                let seen = Instant::now();
                // The watcher reports complete writes only, so nothing waits for a write to
                // finish: what is already queued is applied together, and that is all.
                let queued: Vec<Watched> = std::iter::once(first)
                    .chain(std::iter::from_fn(|| changes.try_recv().ok()))
                    .collect();
                match state.apply(&mut manifests, queued, seen).await {
                    Ok(()) => health.synced(),
                    Err(e) => error!("sync failed: {e:#}"),
                }
            }
            Some(()) = link_changes.recv() => {
                while link_changes.try_recv().is_ok() {}
                state.follow_pod_interfaces();
            }
            Some(first) = pod_events.recv() => {
                let seen = Instant::now();
                let queued: Vec<kubelet::Event> = std::iter::once(first)
                    .chain(std::iter::from_fn(|| pod_events.try_recv().ok()))
                    .collect();
                if let Err(e) = state.pods_changed(queued, seen).await {
                    error!("sync failed: {e:#}");
                }
            }
            Some(reply) = scrapes.recv() => {
                let _ = reply.send(metrics::service_ports(state.proxy.frontends()));
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping");
    drop(state);
    Ok(())
}

/// Follows the API server: each kind's changes are staged as they come and synced once every
/// kind has been listed, then after each batch. While the API server is unreachable nothing
/// changes: the datapath keeps the last state and `/healthz` reports how stale it is.
async fn follow_api(
    config: &ApiConfig,
    mut state: NodeState,
    scrapes: &mut mpsc::Receiver<metrics::Scrape>,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let (sender, mut updates) = mpsc::unbounded_channel();
    let client = api::client(config, sender.clone()).await?;
    api::watch_proxy(client, sender);
    let mut listed = BTreeSet::new();
    let mut synced = false;
    loop {
        tokio::select! {
            Some(first) = updates.recv() => {
                let seen = Instant::now();
                let mut staged = false;
                let queued = std::iter::once(first).chain(std::iter::from_fn(|| updates.try_recv().ok()));
                for update in queued.collect::<Vec<_>>() {
                    match update {
                        Update::Changes { kind, changes, listed: complete } => {
                            state.health.api_progress();
                            if complete {
                                listed.insert(kind);
                            }
                            staged |= !changes.is_empty();
                            stage(&mut state.endpoints, &mut state.proxy, changes);
                        }
                        Update::Reached => state.health.api_progress(),
                        Update::Failed { kind, error } => {
                            state.health.api_failed();
                            warn!("watching {kind}s failed (the datapath keeps the last state; retrying): {error}");
                        }
                    }
                }
                if listed.len() == api::PROXY_KINDS && (staged || !synced) {
                    // The first sync is not a change being programmed.
                    match state.sync(0, synced.then_some(seen)).await {
                        Ok(()) => {
                            synced = true;
                            state.health.synced();
                        }
                        Err(e) => error!("sync failed: {e:#}"),
                    }
                }
            }
            Some(reply) = scrapes.recv() => {
                let _ = reply.send(metrics::service_ports(state.proxy.frontends()));
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping");
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

/// Stages Service and EndpointSlice changes, with the endpoints the Services' selectors now
/// pick among the node's pods.
fn stage(endpoints: &mut Endpoints, proxy: &mut Proxy, mut changes: Changes) {
    endpoints.apply_services(&changes.services);
    changes.endpoint_slices.extend(endpoints.take_changes());
    proxy.stage(changes);
}

/// What a sync reads and writes: what the proxy has applied, the datapath and the
/// health-check servers.
struct NodeState {
    proxy: Proxy,
    datapath: Datapath,
    health_checks: ServiceHealthServers,
    /// None when the agent is a Service proxy only.
    kubelet: Option<Kubelet>,
    endpoints: Endpoints,
    /// The node's pods as the kubelet last reported them.
    pods: BTreeMap<ObjectName, Pod>,
    /// The pods' host-side interfaces the datapath is attached to.
    pod_devices: BTreeSet<String>,
    health: Health,
    metrics: Metrics,
}

impl NodeState {
    /// Reads the paths the watcher named (every manifest when it lost track), and writes the
    /// difference they make; the agent saw them at `seen`.
    async fn apply(
        &mut self,
        manifests: &mut ManifestDir,
        watched: Vec<Watched>,
        seen: Instant,
    ) -> anyhow::Result<()> {
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
            manifests.load()?
        } else {
            manifests.reload(paths)
        };
        report(&loaded);
        let files = loaded.parsed;
        let mut changes = loaded.changes;
        if let Some(kubelet) = &self.kubelet {
            kubelet.apply(PodChanges {
                pods: std::mem::take(&mut changes.pods),
                config_maps: std::mem::take(&mut changes.config_maps),
                secrets: std::mem::take(&mut changes.secrets),
            });
        }
        stage(&mut self.endpoints, &mut self.proxy, changes);
        self.sync(files, Some(seen)).await
    }

    /// Follows what the kubelet reported: pod statuses into the endpoints and `/pods`, pod
    /// interfaces into the datapath; the agent saw them at `seen`.
    async fn pods_changed(
        &mut self,
        events: Vec<kubelet::Event>,
        seen: Instant,
    ) -> anyhow::Result<()> {
        let mut attached = Vec::new();
        let mut changed = false;
        for event in events {
            match event {
                kubelet::Event::Pod(name, pod) => {
                    changed = true;
                    self.endpoints
                        .set_pod(name.clone(), pod.as_deref().and_then(LocalPod::from_pod));
                    match pod {
                        Some(pod) => self.pods.insert(name, *pod),
                        None => self.pods.remove(&name),
                    };
                }
                kubelet::Event::Network(done) => attached.push(done),
            }
        }
        if !attached.is_empty() {
            self.follow_pod_interfaces();
            for done in attached {
                let _ = done.send(());
            }
        }
        if !changed {
            return Ok(());
        }
        self.health.set_pods(self.pods.values().cloned().collect());
        let slices = self.endpoints.take_changes();
        if slices.is_empty() {
            return Ok(());
        }
        self.proxy.stage(Changes {
            endpoint_slices: slices,
            ..Default::default()
        });
        self.sync(0, Some(seen)).await
    }

    /// Attaches the datapath to pod interfaces that appeared on the pod bridge and lets go
    /// of those that left, so pods reach Services.
    fn follow_pod_interfaces(&mut self) {
        let ports: BTreeSet<String> = match links::bridge_ports(cni::BRIDGE) {
            Ok(ports) => ports.into_iter().collect(),
            Err(e) => {
                warn!("listing the ports of {}: {e}", cni::BRIDGE);
                return;
            }
        };
        for gone in self
            .pod_devices
            .difference(&ports)
            .cloned()
            .collect::<Vec<_>>()
        {
            self.datapath.detach(&gone);
            self.pod_devices.remove(&gone);
            debug!(device = %gone, "pod interface gone");
        }
        for new in ports
            .difference(&self.pod_devices)
            .cloned()
            .collect::<Vec<_>>()
        {
            match self.datapath.attach_pod(&new) {
                Ok(()) => {
                    debug!(device = %new, "datapath attached to pod interface");
                    self.pod_devices.insert(new);
                }
                Err(e) => warn!("pod interface {new}: {e:#}"),
            }
        }
    }

    /// Writes what was staged; `files` were read for it, and the agent saw the changes at
    /// `seen` (none for the first sync).
    async fn sync(&mut self, files: usize, seen: Option<Instant>) -> anyhow::Result<()> {
        let report = self.proxy.sync(&mut self.datapath)?;
        self.metrics.synced(&report, seen);
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
