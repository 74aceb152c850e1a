//! The embedded kubelet: the node's pods run through CRI v1 (containerd), each by its own
//! worker; their status feeds the built-in endpoints and `node-agent pods`.
//!
//! - `spec`: PodSpec → CRI sandbox and container configs (pure), and what makes a pod unrunnable.
//! - `volumes`: emptyDir, hostPath, configMap and secret volumes on disk, and their mounts.
//! - `probe`: startup, liveness and readiness probes (threshold state machines, and runners).
//! - `backoff`: the kubelet's restart and image-pull backoff.
//! - `cni`: the CNI network configuration for the node's pod range.
//! - `actions` decides what a pod's worker does next and `status` what the pod's status is,
//!   both pure; `worker` does it through CRI; `cgroups` cleans up after runc.
//!
//! The manager here starts a worker per pod, relists the runtime every second (the kubelet's
//! PLEG) to wake the workers whose containers changed, and removes pods an earlier agent left
//! that are no longer asked for.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::{cri::Cri, model::ObjectName};

pub mod actions;
pub mod backoff;
pub mod cgroups;
pub mod cni;
pub mod node_api;
pub mod probe;
pub mod spec;
pub mod status;
pub mod volumes;
pub mod worker;

/// How often the runtime is listed to notice containers that exited.
const RELIST: Duration = Duration::from_secs(1);
/// How long one attempt at reaching the runtime may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// What the kubelet needs to know of the node.
pub struct Settings {
    /// `unix://` path of the CRI runtime.
    pub cri_endpoint: String,
    pub node_name: String,
    pub host_ip: Option<Ipv4Addr>,
    /// Pod directories (volumes) go under `root_dir/pods/<uid>`.
    pub root_dir: PathBuf,
    pub sandbox: spec::SandboxSettings,
}

/// What the kubelet tells the agent.
pub enum Event {
    /// A pod with its status; None once it is gone from the node.
    Pod(ObjectName, Option<Box<Pod>>),
    /// Pod interfaces came or went: the datapath should follow, then answer.
    Network(oneshot::Sender<()>),
}

/// What workers tell the manager.
pub enum Report {
    Status(ObjectName, Box<Pod>),
    Network(oneshot::Sender<()>),
    /// The worker terminated its pod (this uid) and ended.
    Gone(ObjectName, String),
}

/// Changes to what the node should run.
#[derive(Default)]
pub struct PodChanges {
    pub pods: BTreeMap<ObjectName, Option<Pod>>,
    pub config_maps: BTreeMap<ObjectName, Option<ConfigMap>>,
    pub secrets: BTreeMap<ObjectName, Option<Secret>>,
}

/// The running kubelet: changes go in, events come out on the channel given to `spawn`.
pub struct Kubelet {
    changes: mpsc::UnboundedSender<PodChanges>,
}

impl Kubelet {
    /// Starts the kubelet: it reaches the runtime (retrying with backoff, saying so), then
    /// runs what it is given. Nothing is adopted or removed before the first `apply`.
    pub fn spawn(settings: Settings, events: mpsc::UnboundedSender<Event>) -> Self {
        let (changes, inputs) = mpsc::unbounded_channel();
        tokio::spawn(manage(settings, inputs, events));
        Self { changes }
    }

    pub fn apply(&self, changes: PodChanges) {
        let _ = self.changes.send(changes);
    }
}

/// A pod's UID: its `metadata.uid`, else one derived from the pod as written (as the kubelet
/// does for static pods), so a restarted agent finds the pods it started and a changed pod
/// is a new pod.
pub fn pod_uid(pod: &Pod) -> String {
    if let Some(uid) = pod.metadata.uid.as_ref().filter(|u| !u.is_empty()) {
        return uid.clone();
    }
    let mut pod = pod.clone();
    pod.status = None;
    let json = serde_json::to_vec(&pod).unwrap_or_default();
    // Two independent halves: the pod as written, and its name (two pods never share one).
    let name = format!(
        "{}/{}",
        spec::pod_namespace(&pod),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let (a, b) = (spec::stable_hash(&json), spec::stable_hash(name.as_bytes()));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

struct Entry {
    name: ObjectName,
    handle: worker::Handle,
    terminating: bool,
    /// Left by an earlier agent, asked for by nobody: its removal is not reported.
    orphan: bool,
}

struct Manager {
    settings: Arc<Settings>,
    cri: Cri,
    refs: PodRefs,
    refs_tx: watch::Sender<Arc<PodRefs>>,
    /// Workers by pod uid.
    workers: BTreeMap<String, Entry>,
    /// The uid of the pod asked for under each name.
    names: BTreeMap<ObjectName, String>,
    /// Pods waiting for the previous pod of the same name to terminate.
    pending: BTreeMap<ObjectName, Pod>,
    reports: mpsc::UnboundedSender<Report>,
    /// What the last relist saw of each pod uid's containers and sandboxes.
    seen: HashMap<String, Vec<(String, i32)>>,
    applied: bool,
    /// The runtime was listed once: every pod an earlier agent left is known.
    relisted: bool,
    reachable: bool,
}

async fn manage(
    settings: Settings,
    mut inputs: mpsc::UnboundedReceiver<PodChanges>,
    events: mpsc::UnboundedSender<Event>,
) {
    let cri = connect(&settings.cri_endpoint).await;
    let (reports, mut from_workers) = mpsc::unbounded_channel();
    let (refs_tx, _) = watch::channel(Arc::new(PodRefs::default()));
    let mut m = Manager {
        settings: Arc::new(settings),
        cri,
        refs: PodRefs::default(),
        refs_tx,
        workers: BTreeMap::new(),
        names: BTreeMap::new(),
        pending: BTreeMap::new(),
        reports,
        seen: HashMap::new(),
        applied: false,
        relisted: false,
        reachable: true,
    };
    let mut relist = tokio::time::interval(RELIST);
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(changes) = inputs.recv() => m.apply(changes),
            Some(report) = from_workers.recv() => match report {
                Report::Status(name, pod) => { let _ = events.send(Event::Pod(name, Some(pod))); }
                Report::Network(done) => { let _ = events.send(Event::Network(done)); }
                Report::Gone(name, uid) => {
                    if m.gone(&uid) {
                        let _ = events.send(Event::Pod(name, None));
                    }
                }
            },
            _ = relist.tick(), if m.applied => m.relist().await,
            else => break,
        }
    }
}

/// Reaches the runtime, retrying with backoff and saying so, and waits until it is ready.
async fn connect(endpoint: &str) -> Cri {
    let mut delay = Duration::from_secs(1);
    loop {
        let attempt = async {
            let mut cri = Cri::connect(endpoint, CONNECT_TIMEOUT).await?;
            cri.wait_ready(CONNECT_TIMEOUT).await?;
            anyhow::Ok(cri)
        };
        match attempt.await {
            Ok(mut cri) => {
                let version = cri
                    .version()
                    .await
                    .map(|v| format!("{} {}", v.runtime_name, v.runtime_version));
                info!(endpoint, runtime = %version.unwrap_or_default(), "CRI runtime ready");
                return cri;
            }
            Err(e) => {
                warn!("{e:#}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }
}

impl Manager {
    fn apply(&mut self, changes: PodChanges) {
        self.applied = true;
        if !changes.config_maps.is_empty() || !changes.secrets.is_empty() {
            for (name, cm) in changes.config_maps {
                match cm {
                    Some(cm) => self.refs.config_maps.insert(name, cm),
                    None => self.refs.config_maps.remove(&name),
                };
            }
            for (name, secret) in changes.secrets {
                match secret {
                    Some(secret) => self.refs.secrets.insert(name, secret),
                    None => self.refs.secrets.remove(&name),
                };
            }
            self.refs_tx.send_replace(Arc::new(self.refs.clone()));
        }
        for (name, pod) in changes.pods {
            self.pending.remove(&name);
            let current = self
                .names
                .get(&name)
                .and_then(|uid| self.workers.get_mut(uid));
            match (pod, current) {
                (Some(pod), None) => self.start(name, pod),
                (Some(pod), Some(entry)) => {
                    if entry.handle.uid == pod_uid(&pod) && !entry.terminating {
                        entry.handle.desired.send_replace(Some(Arc::new(pod)));
                    } else {
                        // A pod replaced under the same name starts once the old one is gone.
                        entry.terminating = true;
                        entry.handle.desired.send_replace(None);
                        self.pending.insert(name, pod);
                    }
                }
                (None, Some(entry)) => {
                    entry.terminating = true;
                    entry.handle.desired.send_replace(None);
                }
                (None, None) => {}
            }
        }
    }

    fn start(&mut self, name: ObjectName, pod: Pod) {
        let uid = pod_uid(&pod);
        if self.workers.get(&uid).is_some_and(|e| e.orphan) {
            // Asked for again while its leftovers are being removed: it starts afresh after.
            self.pending.insert(name, pod);
            return;
        }
        info!(pod = %name, uid, "pod added");
        // Only the pods of the first load can have been started by an earlier agent.
        let begin = if self.relisted {
            worker::Begin::New(Arc::new(pod))
        } else {
            worker::Begin::Adopt(Arc::new(pod))
        };
        let handle = self.worker(name.clone(), uid.clone(), begin);
        self.names.insert(name.clone(), uid.clone());
        self.workers.insert(
            uid,
            Entry {
                name,
                handle,
                terminating: false,
                orphan: false,
            },
        );
    }

    fn worker(&self, name: ObjectName, uid: String, begin: worker::Begin) -> worker::Handle {
        let shared = worker::Shared {
            cri: self.cri.clone(),
            settings: self.settings.clone(),
            refs: self.refs_tx.subscribe(),
            reports: self.reports.clone(),
        };
        worker::Worker::spawn(name, uid, begin, shared)
    }

    /// The worker of `uid` ended; true when its pod's removal is news to the agent.
    fn gone(&mut self, uid: &str) -> bool {
        self.seen.remove(uid);
        let Some(entry) = self.workers.remove(uid) else {
            return false;
        };
        if entry.orphan {
            if let Some(pod) = self.pending.remove(&entry.name) {
                self.start(entry.name, pod);
            }
            return false;
        }
        if self.names.get(&entry.name).is_some_and(|u| u == uid) {
            self.names.remove(&entry.name);
        }
        if let Some(pod) = self.pending.remove(&entry.name) {
            self.start(entry.name, pod);
        }
        true
    }

    /// Lists what the runtime runs for the agent: wakes the workers whose pods changed, and
    /// removes pods no worker owns (left by an earlier agent and no longer asked for).
    async fn relist(&mut self) {
        let managed = [(spec::LABEL_MANAGED, "true")];
        let listed = async {
            let containers = self.cri.list_containers(&managed).await?;
            let sandboxes = self.cri.list_pod_sandboxes(&managed).await?;
            anyhow::Ok((containers, sandboxes))
        };
        let (containers, sandboxes) = match listed.await {
            Ok(listed) => {
                if !self.reachable {
                    info!(endpoint = %self.settings.cri_endpoint, "CRI runtime answers again");
                    self.reachable = true;
                }
                listed
            }
            Err(e) => {
                if self.reachable {
                    warn!("CRI runtime unreachable, retrying every {RELIST:?}: {e:#}");
                    self.reachable = false;
                }
                return;
            }
        };
        let mut now: HashMap<String, Vec<(String, i32)>> = HashMap::new();
        let mut names: HashMap<String, ObjectName> = HashMap::new();
        let pods = containers
            .iter()
            .map(|c| (&c.labels, c.id.clone(), c.state))
            .chain(sandboxes.iter().map(|s| (&s.labels, s.id.clone(), s.state)));
        for (labels, id, state) in pods {
            let Some(uid) = labels.get(spec::LABEL_POD_UID) else {
                continue;
            };
            now.entry(uid.clone()).or_default().push((id, state));
            let label = |key| labels.get(key).map_or("", String::as_str);
            names.entry(uid.clone()).or_insert_with(|| {
                ObjectName::new(
                    label(spec::LABEL_POD_NAMESPACE),
                    label(spec::LABEL_POD_NAME),
                )
            });
        }
        for (uid, mut state) in now {
            state.sort();
            if self.seen.get(&uid) == Some(&state) {
                continue;
            }
            self.seen.insert(uid.clone(), state);
            if let Some(entry) = self.workers.get(&uid) {
                entry.handle.wake.notify_one();
                continue;
            }
            let name = names.remove(&uid).unwrap_or_default();
            info!(pod = %name, uid, "removing a pod no longer asked for");
            let handle = self.worker(name.clone(), uid.clone(), worker::Begin::Remove);
            self.workers.insert(
                uid,
                Entry {
                    name,
                    handle,
                    terminating: true,
                    orphan: true,
                },
            );
        }
        self.relisted = true;
    }
}

/// The ConfigMaps and Secrets pods may reference (env, envFrom, volumes), by namespace/name.
#[derive(Clone, Debug, Default)]
pub struct PodRefs {
    pub config_maps: BTreeMap<ObjectName, ConfigMap>,
    pub secrets: BTreeMap<ObjectName, Secret>,
}

/// Why a pod, or one of its containers, cannot run: a kubelet reason (`CreateContainerConfigError`,
/// `InvalidImageName`, ...) and a message naming the field and the missing or bad value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub reason: &'static str,
    pub message: String,
}

impl SpecError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for SpecError {}
