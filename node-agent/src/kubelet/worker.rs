//! One pod's worker: brings the runtime to what the pod asks (sandbox, init containers in
//! order, containers, restarts, probes), publishes the status it computes, and on removal
//! terminates the pod gracefully and leaves nothing behind.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_cri::v1::{ContainerState as CriState, PodSandboxConfig, PodSandboxState};
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodStatus},
    apimachinery::pkg::apis::meta::v1::Time,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{
    PodRefs, Report, Settings, SpecError,
    actions::{self, Exit, Now, Run, RunState, Slot, Waiting},
    backoff::Backoff,
    cgroups,
    probe::{self, ProbeEvent, ProbeHandle, ProbeKind},
    spec::{self, ANNOTATION_CONTAINER_HASH, LABEL_CONTAINER_NAME, LABEL_POD_UID},
    status::{self, Observed},
    volumes::{self, Volumes},
};
use crate::{
    cri::{self, Cri},
    model::ObjectName,
};

/// How often a worker decides again with nothing else happening (the runtime's own changes
/// wake it through the manager's relist).
const RESYNC: Duration = Duration::from_secs(10);
/// The least time a container gets between SIGTERM and SIGKILL, as in the kubelet.
const MIN_GRACE: Duration = Duration::from_secs(2);
/// The grace period of a pod that no longer has a spec (one left by an earlier agent).
const ORPHAN_GRACE: Duration = Duration::from_secs(30);
/// How long a worker waits after a failed sync, doubling while the runtime keeps failing.
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The annotation the grace period is kept in on each container, for orphans.
pub const ANNOTATION_GRACE: &str = "io.kubernetes.pod.terminationGracePeriod";

/// What the manager keeps of a running worker.
pub struct Handle {
    pub uid: String,
    /// Some(pod) while it should run; None once it should terminate.
    pub desired: watch::Sender<Option<Arc<Pod>>>,
    /// Woken when the runtime changed under the pod.
    pub wake: Arc<Notify>,
}

struct Sandbox {
    id: String,
    ip: Option<Ipv4Addr>,
    config: PodSandboxConfig,
}

pub struct Worker {
    name: ObjectName,
    uid: String,
    cri: Cri,
    settings: Arc<Settings>,
    desired: watch::Receiver<Option<Arc<Pod>>>,
    /// The first sync looks for a sandbox an earlier agent started.
    adopt: bool,
    refs: watch::Receiver<Arc<PodRefs>>,
    wake: Arc<Notify>,
    reports: mpsc::UnboundedSender<Report>,
    sandbox: Option<Sandbox>,
    volumes: Option<Volumes>,
    backoff: Backoff,
    pull_backoff: Backoff,
    /// When each container's image pull last failed.
    pull_failed: HashMap<String, Instant>,
    /// What CRI said of containers that exited (their status no longer changes) or started.
    exits: HashMap<String, Exit>,
    starts: HashMap<String, Timestamp>,
    /// The running container of each name whose probes run, by container id.
    tracked: BTreeMap<String, Tracked>,
    probe_events: (
        mpsc::UnboundedSender<ProbeEvent>,
        mpsc::UnboundedReceiver<ProbeEvent>,
    ),
    ready: BTreeSet<String>,
    started: BTreeSet<String>,
    unhealthy: BTreeSet<String>,
    status: Option<PodStatus>,
    start_time: Timestamp,
    /// The pod as last asked for: what termination runs preStop hooks and grace from.
    pod: Option<Arc<Pod>>,
    sandbox_attempt: u32,
    /// When the pod was asked to go (its deletionTimestamp).
    deleted: Option<Timestamp>,
}

/// What every worker is given by the manager.
pub struct Shared {
    pub cri: Cri,
    pub settings: Arc<Settings>,
    pub refs: watch::Receiver<Arc<PodRefs>>,
    pub reports: mpsc::UnboundedSender<Report>,
}

/// How a worker begins.
pub enum Begin {
    /// Run a pod an earlier agent may have started: adopt its sandbox and containers.
    Adopt(Arc<Pod>),
    /// Run a pod first seen by this agent: nothing to adopt.
    New(Arc<Pod>),
    /// Remove what an earlier agent left for a pod nobody asks for any more.
    Remove,
}

impl Worker {
    pub fn spawn(name: ObjectName, uid: String, begin: Begin, shared: Shared) -> Handle {
        let (adopt, pod) = match begin {
            Begin::Adopt(pod) => (true, Some(pod)),
            Begin::New(pod) => (false, Some(pod)),
            Begin::Remove => (false, None),
        };
        let (desired_tx, desired) = watch::channel(pod);
        let wake = Arc::new(Notify::new());
        let worker = Worker {
            name,
            uid: uid.clone(),
            cri: shared.cri,
            settings: shared.settings,
            desired,
            refs: shared.refs,
            wake: wake.clone(),
            reports: shared.reports,
            adopt,
            sandbox: None,
            volumes: None,
            backoff: Backoff::crash_loop(),
            pull_backoff: Backoff::image_pull(),
            pull_failed: HashMap::new(),
            exits: HashMap::new(),
            starts: HashMap::new(),
            tracked: BTreeMap::new(),
            probe_events: mpsc::unbounded_channel(),
            ready: BTreeSet::new(),
            started: BTreeSet::new(),
            unhealthy: BTreeSet::new(),
            status: None,
            start_time: Timestamp::now(),
            pod: None,
            sandbox_attempt: 0,
            deleted: None,
        };
        tokio::spawn(worker.run());
        Handle {
            uid,
            desired: desired_tx,
            wake,
        }
    }

    async fn run(mut self) {
        let mut retry = RETRY;
        loop {
            let Some(pod) = self.desired.borrow_and_update().clone() else {
                break;
            };
            self.pod = Some(pod.clone());
            let wake_after = match self.sync(&pod).await {
                Ok(wake_after) => {
                    retry = RETRY;
                    wake_after.unwrap_or(RESYNC).min(RESYNC)
                }
                Err(e) => {
                    warn!(pod = %self.name, "sync failed, retrying in {retry:?}: {e:#}");
                    retry = (retry * 2).min(RETRY_MAX);
                    retry / 2
                }
            };
            tokio::select! {
                _ = self.desired.changed() => {}
                _ = self.refs.changed() => {}
                _ = self.wake.notified() => {}
                Some(event) = self.probe_events.1.recv() => self.probed(event),
                _ = tokio::time::sleep(wake_after) => {}
            }
            // Whatever else is queued is part of the same decision.
            while let Ok(event) = self.probe_events.1.try_recv() {
                self.probed(event);
            }
        }
        self.terminate().await;
    }

    fn probed(&mut self, event: ProbeEvent) {
        let current = self.tracked.get(&event.container).map(|t| &t.id);
        if current != Some(&event.container_id) {
            return;
        }
        let outcome = if event.healthy {
            "probe succeeded".to_owned()
        } else {
            format!("probe failed: {}", event.message)
        };
        info!(pod = %self.name, container = %event.container, probe = %event.kind, "{outcome}");
        let name = event.container;
        match (event.kind, event.healthy) {
            (ProbeKind::Readiness, true) => {
                self.ready.insert(name);
            }
            (ProbeKind::Readiness, false) => {
                self.ready.remove(&name);
            }
            (ProbeKind::Startup, true) => {
                self.started.insert(name);
            }
            (ProbeKind::Startup | ProbeKind::Liveness, false) => {
                self.unhealthy.insert(name);
            }
            (ProbeKind::Liveness, true) => {}
        }
    }

    /// One decision and what it takes; returns when to decide again at the latest.
    async fn sync(&mut self, pod: &Arc<Pod>) -> anyhow::Result<Option<Duration>> {
        let refs = self.refs.borrow().clone();
        if let Err(e) = spec::validate(pod) {
            self.publish(pod, Some(&e), &Observation::default(), false);
            return Ok(None);
        }
        if self.volumes.is_none() {
            match volumes::prepare(&self.pod_dir(), pod, &refs) {
                Ok(v) => self.volumes = Some(v),
                Err(e) => {
                    self.publish(pod, Some(&e), &Observation::default(), false);
                    return Ok(Some(Duration::from_secs(2)));
                }
            }
        }
        let mut containers = self
            .cri
            .list_containers(&[(LABEL_POD_UID, &self.uid)])
            .await?;
        if !self.sandbox_ready(pod).await? {
            self.create_sandbox(pod, &containers).await?;
            containers.clear();
        }
        let sandbox_id = self
            .sandbox
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        containers.retain(|c| c.pod_sandbox_id == sandbox_id);
        let observed = self.observe(containers).await?;
        let runs = &observed.runs;
        for container in &pod.spec.as_ref().expect("validated").containers {
            match runs.get(&container.name) {
                Some(run) if run.running() => self.track(container, run),
                _ => {}
            }
        }
        let hashes = all_containers(pod)
            .map(|c| (c.name.clone(), spec::container_hash(c)))
            .collect();
        let now = Now::get();
        let decided = actions::decide(pod, runs, &self.unhealthy, &hashes, &mut self.backoff, now);
        let mut waiting = decided.waiting.clone();
        let mut wake_after = decided.wake_after;
        let grace = grace_period(pod);
        for (name, why) in &decided.kill {
            if let Some(run) = runs.get(name) {
                info!(pod = %self.name, container = %name, "killing: {why}");
                self.cri.stop_container(&run.id, grace).await?;
                self.forget_probes(name);
                self.unhealthy.remove(name);
            }
        }
        let mut started = false;
        for slot in &decided.start {
            let container = slot.container(pod);
            let attempt = runs.get(&container.name).map_or(0, |r| r.attempt + 1);
            match self.start(pod, &refs, *slot, attempt).await {
                Ok(()) => started = true,
                Err(Start::Waiting(w, retry)) => {
                    waiting.insert(container.name.clone(), w);
                    if let Some(retry) = retry {
                        wake_after = Some(wake_after.map_or(retry, |w| w.min(retry)));
                    }
                }
                Err(Start::Failed(e)) => return Err(e),
            }
        }
        if !decided.kill.is_empty() || started {
            // Decide again on what the runtime now holds.
            return Ok(Some(Duration::ZERO));
        }
        let observed = Observation {
            waiting,
            ..observed
        };
        self.publish(pod, None, &observed, decided.init_failed);
        self.backoff.gc(now.instant);
        self.pull_backoff.gc(now.instant);
        Ok(wake_after)
    }

    /// Whether the pod's sandbox is up; a sandbox that died (or one left by an earlier agent
    /// that is not ready) is stopped and removed so a new one is made.
    async fn sandbox_ready(&mut self, pod: &Pod) -> anyhow::Result<bool> {
        if self.sandbox.is_none() {
            if !self.adopt {
                return Ok(false);
            }
            // Adopt the newest ready sandbox an earlier agent made for this pod.
            let mut ours = self
                .cri
                .list_pod_sandboxes(&[(LABEL_POD_UID, &self.uid)])
                .await?;
            ours.sort_by_key(|s| std::cmp::Reverse(s.created_at));
            for sandbox in ours {
                if self.sandbox.is_none() && sandbox.state() == PodSandboxState::SandboxReady {
                    let status = self.cri.pod_sandbox_status(&sandbox.id).await?;
                    info!(pod = %self.name, sandbox = %sandbox.id, "adopted running sandbox");
                    self.sandbox = Some(Sandbox {
                        id: sandbox.id,
                        ip: self.pod_ip(pod, &status),
                        config: spec::sandbox_config(
                            pod,
                            &self.uid,
                            sandbox.metadata.map_or(0, |m| m.attempt),
                            &self.settings.sandbox,
                        ),
                    });
                    self.start_time = Timestamp::from_nanosecond(i128::from(status.created_at))
                        .unwrap_or(self.start_time);
                    self.attach_network().await;
                } else {
                    self.remove_sandbox(&sandbox.id).await?;
                }
            }
            // Adopted, or found nothing to adopt: from now on a missing sandbox is made anew.
            self.adopt = false;
            return Ok(self.sandbox.is_some());
        }
        let id = self
            .sandbox
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        // A runtime that does not answer says nothing of the sandbox: the sync is retried.
        match self.cri.pod_sandbox_status(&id).await {
            Ok(s) if s.state() == PodSandboxState::SandboxReady => return Ok(true),
            Ok(_) => {}
            Err(e) if cri::not_found(&e) => {}
            Err(e) => return Err(e),
        }
        warn!(pod = %self.name, sandbox = %id, "sandbox is not ready: making a new one");
        self.remove_sandbox(&id).await?;
        self.sandbox = None;
        Ok(false)
    }

    async fn create_sandbox(
        &mut self,
        pod: &Pod,
        containers: &[k8s_cri::v1::Container],
    ) -> anyhow::Result<()> {
        for c in containers {
            self.cri.stop_container(&c.id, MIN_GRACE).await?;
            self.cri.remove_container(&c.id).await?;
        }
        let config =
            spec::sandbox_config(pod, &self.uid, self.sandbox_attempt, &self.settings.sandbox);
        self.sandbox_attempt += 1;
        // The runtime writes container logs there but does not make it.
        std::fs::create_dir_all(&config.log_directory)?;
        let id = self.cri.run_pod_sandbox(config.clone()).await?;
        let status = self.cri.pod_sandbox_status(&id).await?;
        let ip = self.pod_ip(pod, &status);
        info!(pod = %self.name, sandbox = %id, ip = ?ip, "sandbox running");
        // The datapath attaches to the pod's interface before any container can send.
        self.attach_network().await;
        self.sandbox = Some(Sandbox { id, ip, config });
        self.forget_all_probes();
        Ok(())
    }

    /// The sandbox's address; a pod on the node's network has the node's.
    fn pod_ip(&self, pod: &Pod, status: &k8s_cri::v1::PodSandboxStatus) -> Option<Ipv4Addr> {
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let ip = status.network.as_ref().and_then(|n| n.ip.parse().ok());
        if host_network {
            ip.or(self.settings.host_ip)
        } else {
            ip
        }
    }

    /// Asks the agent to follow the pod interfaces, and waits until it has.
    async fn attach_network(&self) {
        let (done, attached) = oneshot::channel();
        if self.reports.send(Report::Network(done)).is_ok() {
            let _ = attached.await;
        }
    }

    /// The newest container of each name (runs) and how the one before it ended (last);
    /// older ones are removed, as the kubelet's garbage collector keeps one dead container.
    async fn observe(
        &mut self,
        mut containers: Vec<k8s_cri::v1::Container>,
    ) -> anyhow::Result<Observation> {
        containers.sort_by_key(|c| std::cmp::Reverse(c.metadata.as_ref().map_or(0, |m| m.attempt)));
        let mut runs = BTreeMap::new();
        let mut last = BTreeMap::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for c in containers {
            let name = c
                .labels
                .get(LABEL_CONTAINER_NAME)
                .cloned()
                .unwrap_or_else(|| {
                    c.metadata
                        .as_ref()
                        .map(|m| m.name.clone())
                        .unwrap_or_default()
                });
            let rank = seen.entry(name.clone()).or_default();
            *rank += 1;
            match *rank {
                1 => {
                    let run = self.run_of(&c).await?;
                    runs.insert(name, run);
                }
                2 => {
                    if let Some(exit) = self.run_of(&c).await?.exit() {
                        last.insert(name, exit.clone());
                    }
                }
                _ => {
                    self.cri.remove_container(&c.id).await?;
                    self.exits.remove(&c.id);
                }
            }
        }
        Ok(Observation {
            runs,
            last,
            waiting: BTreeMap::new(),
        })
    }

    async fn run_of(&mut self, c: &k8s_cri::v1::Container) -> anyhow::Result<Run> {
        let state = match c.state() {
            CriState::ContainerCreated => RunState::Created,
            CriState::ContainerRunning => {
                let started = match self.starts.get(&c.id) {
                    Some(t) => *t,
                    None => {
                        let s = self.cri.container_status(&c.id).await?;
                        let t = nanos(s.started_at).unwrap_or_else(Timestamp::now);
                        self.starts.insert(c.id.clone(), t);
                        t
                    }
                };
                RunState::Running { started }
            }
            CriState::ContainerExited | CriState::ContainerUnknown => {
                let exit = match self.exits.get(&c.id) {
                    Some(e) => e.clone(),
                    None => {
                        let s = self.cri.container_status(&c.id).await?;
                        let exit = Exit {
                            code: s.exit_code,
                            reason: s.reason,
                            message: s.message,
                            started: nanos(s.started_at),
                            finished: nanos(s.finished_at).unwrap_or_else(Timestamp::now),
                        };
                        self.starts.remove(&c.id);
                        self.exits.insert(c.id.clone(), exit.clone());
                        exit
                    }
                };
                RunState::Exited(exit)
            }
        };
        Ok(Run {
            id: c.id.clone(),
            attempt: c.metadata.as_ref().map_or(0, |m| m.attempt),
            hash: c
                .annotations
                .get(ANNOTATION_CONTAINER_HASH)
                .cloned()
                .unwrap_or_default(),
            image_ref: c.image_ref.clone(),
            state,
        })
    }

    /// Pulls the image as the policy says, creates and starts one container, and starts its
    /// probes.
    async fn start(
        &mut self,
        pod: &Pod,
        refs: &PodRefs,
        slot: Slot,
        attempt: u32,
    ) -> Result<(), Start> {
        let container = slot.container(pod).clone();
        let sandbox = self.sandbox.as_ref().expect("a sandbox before containers");
        let (sandbox_id, sandbox_config, ip) =
            (sandbox.id.clone(), sandbox.config.clone(), sandbox.ip);
        self.ensure_image(&container, &sandbox_config).await?;
        let downward = spec::Downward {
            pod_ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
            node_name: self.settings.node_name.clone(),
        };
        let volumes = self.volumes.as_ref().expect("volumes before containers");
        let mounts = volumes::mounts(&container, volumes).map_err(Start::spec)?;
        if matches!(slot, Slot::App(_)) {
            probe::probe_specs(&container).map_err(Start::spec)?;
        }
        let mut config =
            spec::container_config(pod, &self.uid, &container, attempt, refs, &downward, mounts)
                .map_err(Start::spec)?;
        config.annotations.insert(
            ANNOTATION_GRACE.into(),
            grace_period(pod).as_secs().to_string(),
        );
        let id = self
            .cri
            .create_container(&sandbox_id, config, &sandbox_config)
            .await
            .map_err(|e| Start::waiting("CreateContainerError", format!("{e:#}")))?;
        if let Err(e) = self.cri.start_container(&id).await {
            // Its exit is what the next decision restarts, with backoff.
            warn!(pod = %self.name, container = %container.name, "{e:#}");
            return Ok(());
        }
        info!(pod = %self.name, container = %container.name, attempt, "container started");
        self.forget_probes(&container.name);
        self.unhealthy.remove(&container.name);
        Ok(())
    }

    /// Starts following a running container (just started, or adopted): its probes, and
    /// what holds while it has none.
    fn track(&mut self, container: &Container, run: &Run) {
        if self
            .tracked
            .get(&container.name)
            .is_some_and(|t| t.id == run.id)
        {
            return;
        }
        self.forget_probes(&container.name);
        // Refused before the container was created, so none here.
        let specs = probe::probe_specs(container).unwrap_or_default();
        let has = |kind: ProbeKind| specs.iter().any(|s| s.kind == kind);
        if !has(ProbeKind::Readiness) {
            self.ready.insert(container.name.clone());
        }
        if !has(ProbeKind::Startup) {
            self.started.insert(container.name.clone());
        }
        let ip = self.sandbox.as_ref().and_then(|s| s.ip);
        let probes = match (specs.is_empty(), ip, &run.state) {
            (false, Some(ip), RunState::Running { started }) => Some(probe::spawn(
                container.name.clone(),
                run.id.clone(),
                ip,
                Now::get().instant_of(*started),
                specs,
                self.cri.clone(),
                self.probe_events.0.clone(),
            )),
            _ => None,
        };
        self.tracked.insert(
            container.name.clone(),
            Tracked {
                id: run.id.clone(),
                _probes: probes,
            },
        );
    }

    /// The image as `imagePullPolicy` wants it: Never and IfNotPresent use what is there,
    /// Always (the default for `:latest` or no tag) and a missing image pull, with backoff.
    async fn ensure_image(
        &mut self,
        container: &Container,
        sandbox: &PodSandboxConfig,
    ) -> Result<(), Start> {
        let image = container.image.clone().unwrap_or_default();
        let policy = pull_policy(container);
        let present = self
            .cri
            .image_status(&image)
            .await
            .map_err(Start::Failed)?
            .is_some();
        match (policy.as_str(), present) {
            ("Never", false) => {
                return Err(Start::waiting(
                    "ErrImageNeverPull",
                    format!("Container image \"{image}\" is not present with pull policy of Never"),
                ));
            }
            ("Never" | "IfNotPresent", true) => return Ok(()),
            _ => {}
        }
        let now = Instant::now();
        let key = &container.name;
        if let Some(failed) = self.pull_failed.get(key)
            && let Some(remaining) = self.pull_backoff.in_backoff_since(key, *failed, now)
        {
            return Err(Start::Waiting(
                Waiting {
                    reason: "ImagePullBackOff".into(),
                    message: format!("Back-off pulling image \"{image}\""),
                },
                Some(remaining),
            ));
        }
        match self.cri.pull_image(&image, sandbox).await {
            Ok(_) => {
                self.pull_failed.remove(key);
                self.pull_backoff.forget(key);
                Ok(())
            }
            Err(e) => {
                self.pull_backoff.next(key, now, now);
                self.pull_failed.insert(key.clone(), now);
                // Decided again soon, to show ImagePullBackOff while the backoff runs.
                Err(Start::Waiting(
                    Waiting {
                        reason: "ErrImagePull".into(),
                        message: format!("{e:#}"),
                    },
                    Some(Duration::from_secs(1)),
                ))
            }
        }
    }

    fn publish(
        &mut self,
        pod: &Pod,
        pod_error: Option<&SpecError>,
        observed: &Observation,
        init_failed: bool,
    ) {
        let ready: BTreeSet<String> = self
            .ready
            .iter()
            .filter(|n| observed.runs.get(*n).is_some_and(Run::running))
            .cloned()
            .collect();
        let status = status::pod_status(&Observed {
            pod,
            pod_error,
            sandbox_ip: self.sandbox.as_ref().and_then(|s| s.ip),
            sandbox_ready: self.sandbox.is_some(),
            runs: &observed.runs,
            last: &observed.last,
            waiting: &observed.waiting,
            ready: &ready,
            started: &self.started,
            init_failed,
            host_ip: self.settings.host_ip,
            start_time: self.start_time,
            previous: self.status.as_ref(),
            now: Timestamp::now(),
        });
        if self.status.as_ref() != Some(&status) {
            self.status = Some(status);
            self.report(pod);
        }
    }

    /// Sends the pod with its status (and deletionTimestamp when terminating).
    fn report(&self, pod: &Pod) {
        let mut pod = pod.clone();
        pod.metadata.uid = Some(self.uid.clone());
        pod.metadata.deletion_timestamp = self.deleted.map(Time);
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = Some(self.settings.node_name.clone());
        }
        pod.status = self.status.clone();
        let _ = self
            .reports
            .send(Report::Status(self.name.clone(), Box::new(pod)));
    }

    fn forget_probes(&mut self, name: &str) {
        self.tracked.remove(name);
        self.ready.remove(name);
        self.started.remove(name);
    }

    fn forget_all_probes(&mut self) {
        self.tracked.clear();
        self.ready.clear();
        self.started.clear();
        self.unhealthy.clear();
    }

    fn pod_dir(&self) -> PathBuf {
        self.settings.root_dir.join("pods").join(&self.uid)
    }

    fn log_dir(&self) -> PathBuf {
        spec::log_directory(
            &self.settings.sandbox,
            &self.name.namespace,
            &self.name.name,
            &self.uid,
        )
    }

    /// The pod is removed: it shows as terminating, each running container gets its preStop
    /// hook and SIGTERM with what is left of the grace period, then the sandbox, containers,
    /// cgroups and volumes go, and the pod leaves the node's list.
    async fn terminate(mut self) {
        let pod = self.pod.take();
        self.deleted = Some(Timestamp::now());
        if let Some(pod) = pod.as_deref() {
            self.report(pod);
        }
        self.forget_all_probes();
        let grace = pod.as_deref().map(grace_period);
        let deadline = Instant::now() + grace.unwrap_or(ORPHAN_GRACE);
        let containers = match self
            .cri
            .list_containers(&[(LABEL_POD_UID, &self.uid)])
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(pod = %self.name, "terminating: {e:#}");
                Vec::new()
            }
        };
        let mut stops = tokio::task::JoinSet::new();
        for c in containers
            .into_iter()
            .filter(|c| c.state() == CriState::ContainerRunning)
        {
            let name = c
                .labels
                .get(LABEL_CONTAINER_NAME)
                .cloned()
                .unwrap_or_default();
            let pre_stop = pod.as_deref().and_then(|p| pre_stop(p, &name));
            // An orphan's grace period is the one its containers were created with.
            let deadline = match grace {
                Some(_) => deadline,
                None => {
                    let seconds = c
                        .annotations
                        .get(ANNOTATION_GRACE)
                        .and_then(|g| g.parse().ok());
                    Instant::now() + seconds.map_or(ORPHAN_GRACE, Duration::from_secs)
                }
            };
            let (mut cri, pod_name) = (self.cri.clone(), self.name.clone());
            stops.spawn(async move {
                if let Some(command) = pre_stop {
                    let args: Vec<&str> = command.iter().map(String::as_str).collect();
                    let left = deadline.saturating_duration_since(Instant::now());
                    match cri.exec_sync(&c.id, &args, left).await {
                        Ok(r) if r.exit_code == 0 => {
                            info!(pod = %pod_name, container = %name, "preStop hook ran")
                        }
                        Ok(r) => warn!(pod = %pod_name, container = %name,
                            "preStop hook exited with {}", r.exit_code),
                        Err(e) => warn!(pod = %pod_name, container = %name, "preStop hook: {e:#}"),
                    }
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(MIN_GRACE);
                if let Err(e) = cri.stop_container(&c.id, left).await {
                    warn!(pod = %pod_name, container = %name, "stopping: {e:#}");
                }
                match cri.container_status(&c.id).await {
                    Ok(s) => info!(pod = %pod_name, container = %name, exit_code = s.exit_code,
                        reason = %s.reason, "container terminated"),
                    Err(e) => warn!(pod = %pod_name, container = %name, "{e:#}"),
                }
            });
        }
        stops.join_all().await;
        // The last status shows how each container ended.
        if let Some(pod) = pod.as_deref()
            && let Err(e) = self.publish_final(pod).await
        {
            warn!(pod = %self.name, "{e:#}");
        }
        if let Err(e) = self.remove_all().await {
            warn!(pod = %self.name, "removing the pod's sandbox and containers: {e:#}");
        }
        cgroups::remove_pod(&self.settings.sandbox.cgroup_root, &self.uid);
        for dir in [self.pod_dir(), self.log_dir()] {
            if let Err(e) = volumes::remove(&dir) {
                warn!(pod = %self.name, "removing {}: {e}", dir.display());
            }
        }
        info!(pod = %self.name, uid = %self.uid, "pod removed");
        // The datapath lets go of the pod's interface.
        let (done, _) = oneshot::channel();
        let _ = self.reports.send(Report::Network(done));
        let _ = self
            .reports
            .send(Report::Gone(self.name.clone(), self.uid.clone()));
    }

    async fn publish_final(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let mut containers = self
            .cri
            .list_containers(&[(LABEL_POD_UID, &self.uid)])
            .await?;
        let sandbox = self
            .sandbox
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        containers.retain(|c| c.pod_sandbox_id == sandbox);
        let observed = self.observe(containers).await?;
        self.publish(pod, None, &observed, false);
        Ok(())
    }

    async fn remove_all(&mut self) -> anyhow::Result<()> {
        for s in self
            .cri
            .list_pod_sandboxes(&[(LABEL_POD_UID, &self.uid)])
            .await?
        {
            self.remove_sandbox(&s.id).await?;
        }
        for c in self
            .cri
            .list_containers(&[(LABEL_POD_UID, &self.uid)])
            .await?
        {
            self.cri.remove_container(&c.id).await?;
        }
        Ok(())
    }

    /// Stops and removes a sandbox with its containers (CNI tears its network down).
    async fn remove_sandbox(&mut self, id: &str) -> anyhow::Result<()> {
        let done = |r: anyhow::Result<()>| match r {
            Err(e) if cri::not_found(&e) => Ok(()),
            r => r,
        };
        done(self.cri.stop_pod_sandbox(id).await)?;
        done(self.cri.remove_pod_sandbox(id).await)
    }
}

/// A container followed by its worker, and its probes (stopped on drop).
struct Tracked {
    id: String,
    _probes: Option<ProbeHandle>,
}

/// The pod's containers as the runtime holds them, and why those not running wait.
#[derive(Default)]
struct Observation {
    runs: BTreeMap<String, Run>,
    last: BTreeMap<String, Exit>,
    waiting: BTreeMap<String, Waiting>,
}

/// Why a container did not start.
enum Start {
    /// It waits, with the reason the status shows, and when to try again.
    Waiting(Waiting, Option<Duration>),
    /// The runtime failed: the sync is retried.
    Failed(anyhow::Error),
}

impl Start {
    fn waiting(reason: &str, message: String) -> Self {
        Start::Waiting(
            Waiting {
                reason: reason.into(),
                message,
            },
            Some(Duration::from_secs(2)),
        )
    }

    fn spec(e: SpecError) -> Self {
        Start::waiting(e.reason, e.message)
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.map(|s| s.containers.iter()).into_iter().flatten())
}

fn grace_period(pod: &Pod) -> Duration {
    let seconds = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(seconds.max(0) as u64)
}

/// `imagePullPolicy`, defaulted as the API server does: Always for `:latest` or no tag.
fn pull_policy(container: &Container) -> String {
    if let Some(policy) = &container.image_pull_policy {
        return policy.clone();
    }
    let image = container.image.as_deref().unwrap_or_default();
    let name = image.rsplit('/').next().unwrap_or(image);
    let untagged_or_latest = !name.contains(':') || name.ends_with(":latest");
    if untagged_or_latest && !image.contains('@') {
        "Always".into()
    } else {
        "IfNotPresent".into()
    }
}

/// The container's preStop exec command.
fn pre_stop(pod: &Pod, container: &str) -> Option<Vec<String>> {
    all_containers(pod)
        .find(|c| c.name == container)?
        .lifecycle
        .as_ref()?
        .pre_stop
        .as_ref()?
        .exec
        .as_ref()?
        .command
        .clone()
}

fn nanos(n: i64) -> Option<Timestamp> {
    (n > 0).then(|| Timestamp::from_nanosecond(i128::from(n)).ok())?
}
