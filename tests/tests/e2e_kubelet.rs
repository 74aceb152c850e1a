//! The agent as a whole node: its embedded kubelet runs the manifest directory's pods on a real
//! containerd (the fixture's, in its own namespace) and feeds their readiness into the
//! datapath. Each test is one node started as on a machine: containerd with no CNI network
//! (the agent writes it for POD_CIDR), then `node-agent run`. Requests to Services come from
//! a client pod's own busybox (CRI ExecSync), as a workload makes them.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use k8s_cri::v1::ContainerState;
use k8s_openapi::api::core::v1::{
    ConfigMapKeySelector, ContainerStatus, EnvVar, EnvVarSource, NFSVolumeSource, Pod, Volume,
    VolumeMount,
};
use node_agent::cri::Cri;
use node_agent_tests::{
    agent::{Agent, binary, find_pod, is_ready},
    client::{WGET_STOP, tally_lines, wget_loop},
    containerd::{Containerd, cgroup_dirs, netns_inode},
    manifest::{
        CRASH, HTTPD, HttpdPod, READINESS_PERIOD, READY_FILE, selector_service, to_yaml, write,
    },
};

const POD_CIDR: &str = "10.88.0.0/24";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
const WEB: [&str; 3] = ["web-1", "web-2", "web-3"];
const WEB_LABELS: &[(&str, &str)] = &[("app", "web")];
/// From the agent's start until its pods run and are ready (a few seconds are expected).
const POD_START: Duration = Duration::from_secs(60);
/// What the datapath may take on top of a probe period to act on a readiness change.
const MARGIN: Duration = Duration::from_secs(1);
/// The kubelet's first CrashLoopBackOff delay, doubled on each crash.
const BACKOFF: Duration = Duration::from_secs(10);
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
// The labels the agent puts on its sandboxes and containers (see the plan's identity rules).
const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
const LABEL_MANAGED: &str = "node-agent.io/managed";

/// One node. Fields drop in order: the agent stops, then containerd removes the pods.
struct Node {
    agent: Agent,
    cri: Cri,
    rt: tokio::runtime::Runtime,
    manifests: tempfile::TempDir,
    containerd: Containerd,
}

impl Node {
    /// containerd, then the agent on a manifest directory holding `objects` (name, YAML),
    /// each in its file `NAME.yaml`.
    fn start(objects: &[(&str, String)]) -> Self {
        let containerd = Containerd::start_without_network().unwrap();
        let manifests = tempfile::tempdir().unwrap();
        for (name, yaml) in objects {
            write(manifests.path(), &format!("{name}.yaml"), yaml).unwrap();
        }
        let agent =
            Agent::start_node(&binary(), &containerd, manifests.path(), POD_CIDR, &[]).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cri = rt
            .block_on(Cri::connect(&containerd.endpoint(), POD_START))
            .unwrap();
        Self {
            agent,
            cri,
            rt,
            manifests,
            containerd,
        }
    }

    /// Waits until every pod of `names` is Ready.
    fn wait_ready(&self, names: &[&str], timeout: Duration) {
        let what = format!("{names:?} ready");
        self.agent
            .wait_pods(&what, timeout, |pods| {
                let ready = |n: &&str| find_pod(pods, n).is_some_and(is_ready);
                names.iter().all(ready).then_some(())
            })
            .unwrap();
    }

    /// The id of pod `pod`'s running httpd container, found by the labels the agent gives it.
    fn container_id(&mut self, pod: &str) -> String {
        let containers = self.rt.block_on(self.cri.list_containers(&[])).unwrap();
        let running: Vec<_> = containers
            .into_iter()
            .filter(|c| label(&c.labels, LABEL_POD_NAME) == Some(pod))
            .filter(|c| label(&c.labels, LABEL_CONTAINER_NAME) == Some(HTTPD))
            .filter(|c| c.state() == ContainerState::ContainerRunning)
            .collect();
        assert_eq!(running.len(), 1, "running httpd containers of {pod}");
        running[0].id.clone()
    }

    /// `cmd` in pod `pod`'s httpd container: its stdout, failing on a non-zero exit.
    fn exec(&mut self, pod: &str, cmd: &[impl AsRef<str>]) -> String {
        let id = self.container_id(pod);
        exec_in(&self.rt, &mut self.cri, &id, cmd)
    }

    /// `count` GETs of the Service from the client pod: who answered how often.
    fn requests(&mut self, count: usize) -> BTreeMap<String, usize> {
        let url = format!("http://{VIP}/");
        tally_lines(&self.exec("client", &wget_loop(&url, count, Duration::ZERO)))
    }

    /// The ids of every sandbox (ready or not) of pod `pod`.
    fn sandboxes(&mut self, pod: &str) -> Vec<String> {
        let sandboxes = self.rt.block_on(self.cri.list_pod_sandboxes(&[])).unwrap();
        sandboxes
            .into_iter()
            .filter(|s| label(&s.labels, LABEL_POD_NAME) == Some(pod))
            .map(|s| s.id)
            .collect()
    }

    /// What must not change while pods keep running: the agent's sandboxes and containers
    /// (by id) in the runtime, and every container's restartCount in the agent's status.
    fn running_state(&mut self) -> (BTreeSet<String>, BTreeMap<String, i32>) {
        let containers = self.rt.block_on(self.cri.list_containers(&[])).unwrap();
        let sandboxes = self.rt.block_on(self.cri.list_pod_sandboxes(&[])).unwrap();
        let managed = |labels: &_| label(labels, LABEL_MANAGED) == Some("true");
        let ids = containers
            .into_iter()
            .filter(|c| managed(&c.labels))
            .map(|c| format!("container {}", c.id))
            .chain(
                sandboxes
                    .into_iter()
                    .filter(|s| managed(&s.labels))
                    .map(|s| format!("sandbox {}", s.id)),
            )
            .collect();
        let restarts = self
            .agent
            .pods()
            .unwrap()
            .iter()
            .flat_map(|p| {
                let pod = p.metadata.name.clone().unwrap_or_default();
                container_statuses(p).map(move |c| (format!("{pod}/{}", c.name), c.restart_count))
            })
            .collect();
        (ids, restarts)
    }
}

fn exec_in(
    rt: &tokio::runtime::Runtime,
    cri: &mut Cri,
    id: &str,
    cmd: &[impl AsRef<str>],
) -> String {
    let cmd: Vec<&str> = cmd.iter().map(AsRef::as_ref).collect();
    let out = rt.block_on(cri.exec_sync(id, &cmd, EXEC_TIMEOUT)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.exit_code, 0, "{cmd:?} in {id}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn label<'a>(labels: &'a std::collections::HashMap<String, String>, key: &str) -> Option<&'a str> {
    labels.get(key).map(String::as_str)
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// The statuses of the pod's init and app containers.
fn container_statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    let init = status.and_then(|s| s.init_container_statuses.as_ref());
    let app = status.and_then(|s| s.container_statuses.as_ref());
    init.into_iter().chain(app).flatten()
}

/// The status of the pod's container (init or app) `name`.
fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    container_statuses(pod).find(|c| c.name == name)
}

fn restarts(pod: &Pod, name: &str) -> i32 {
    container(pod, name).map_or(-1, |c| c.restart_count)
}

fn running(pod: &Pod, name: &str) -> bool {
    container(pod, name)
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

fn waiting_reason<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    let state = container(pod, name)?.state.as_ref()?;
    state.waiting.as_ref()?.reason.as_deref()
}

/// The exit code of the container's current (terminated) state, else of its last one.
fn exit_code(pod: &Pod, name: &str) -> Option<i32> {
    let status = container(pod, name)?;
    let terminated = |s: &Option<k8s_openapi::api::core::v1::ContainerState>| {
        s.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
    };
    terminated(&status.state).or_else(|| terminated(&status.last_state))
}

/// Every (reason, message) the status gives: the pod's, its unmet conditions', and its
/// containers' waiting and terminated states'.
fn reasons(pod: &Pod) -> Vec<(String, String)> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let pair = |r: &Option<String>, m: &Option<String>| {
        r.clone().map(|r| (r, m.clone().unwrap_or_default()))
    };
    let mut all: Vec<_> = pair(&status.reason, &status.message).into_iter().collect();
    for c in status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.status != "True")
    {
        all.extend(pair(&c.reason, &c.message));
    }
    for c in container_statuses(pod) {
        if let Some(state) = &c.state {
            if let Some(w) = &state.waiting {
                all.extend(pair(&w.reason, &w.message));
            }
            if let Some(t) = &state.terminated {
                all.extend(pair(&t.reason, &t.message));
            }
        }
    }
    all
}

/// Pod `name`'s row of the `node-agent pods` table: NAMESPACE NAME READY STATUS RESTARTS IP.
fn table_row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|columns| columns.get(1) == Some(&name))
        .unwrap_or_default()
}

/// The STATUS column of `node-agent pods` for pod `name`.
fn table_status(table: &str, name: &str) -> Option<String> {
    table_row(table, name).get(3).map(|s| (*s).to_owned())
}

/// Polls `done` until it holds, for up to `timeout`.
fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Every request answered, by one of `expected`, and each of them answered some.
fn assert_answered_by(
    what: &str,
    answers: &BTreeMap<String, usize>,
    total: usize,
    expected: &[&str],
) {
    let by_expected: usize = expected.iter().filter_map(|e| answers.get(*e)).sum();
    assert_eq!(
        by_expected, total,
        "{what}: every request answered by {expected:?}: {answers:?}"
    );
    for e in expected {
        assert!(
            answers.contains_key(*e),
            "{what}: {e} never answered: {answers:?}"
        );
    }
}

fn web_pod<'a>(name: &'a str, events: &'a Path) -> HttpdPod<'a> {
    HttpdPod {
        name,
        labels: WEB_LABELS,
        port: PORT,
        readiness: true,
        pre_stop: Some("echo prestop >> /events/log"),
        events: Some(events),
        ..Default::default()
    }
}

fn client_pod() -> String {
    let labels = &[("app", "client")];
    HttpdPod {
        name: "client",
        labels,
        port: PORT,
        ..Default::default()
    }
    .yaml()
}

/// Three web pods behind a selector Service and a client pod: the Service reaches every ready
/// pod, readiness steers it within a probe period, an agent restart disturbs neither pods nor
/// traffic, and a removed pod terminates gracefully and leaves nothing behind.
#[test]
fn service_follows_pods_through_readiness_agent_restart_and_removal() {
    let events = tempfile::tempdir().unwrap();
    let mut objects = vec![
        ("web", selector_service("web", VIP, WEB_LABELS, 80, PORT)),
        ("client", client_pod()),
    ];
    for name in WEB {
        let dir = events.path().join(name);
        fs::create_dir(&dir).unwrap();
        objects.push((name, web_pod(name, &dir).yaml()));
    }
    let started = Instant::now();
    let mut node = Node::start(&objects);
    let conflist = node
        .containerd
        .cni_conf_dir()
        .join("10-node-agent.conflist");
    assert!(conflist.exists(), "the agent writes {}", conflist.display());
    node.wait_ready(&["web-1", "web-2", "web-3", "client"], POD_START);
    eprintln!(
        "4 pods ready {:?} after the agent's start",
        started.elapsed()
    );
    for pod in node.agent.pods().unwrap() {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        assert!(
            ip.as_deref().is_some_and(|ip| ip.starts_with("10.88.0.")),
            "{ip:?}"
        );
    }

    let answers = node.requests(300);
    assert_answered_by("300 requests", &answers, 300, &WEB);

    // Readiness: web-2's probe fails, and within a period it gets no new connection.
    node.exec("web-2", &["rm", READY_FILE]);
    let unready = Instant::now();
    let bound = READINESS_PERIOD + MARGIN;
    node.agent
        .wait_pod("web-2", "not ready", bound, |p| !is_ready(p))
        .unwrap();
    thread::sleep(bound.saturating_sub(unready.elapsed()));
    let answers = node.requests(60);
    assert_answered_by("web-2 unready", &answers, 60, &["web-1", "web-3"]);
    node.exec("web-2", &["touch", READY_FILE]);
    let ready = Instant::now();
    node.agent
        .wait_pod("web-2", "ready again", bound, is_ready)
        .unwrap();
    thread::sleep(bound.saturating_sub(ready.elapsed()));
    let answers = node.requests(60);
    assert_answered_by("web-2 ready again", &answers, 60, &WEB);

    // An agent restart: pods adopted (same sandboxes, containers and restartCounts), and
    // requests through the Service answered around it. While no agent runs (~0.3 s) the
    // datapath is gone, so a request in that gap may fail: a restart that drops nothing is
    // issue 8's; here the Service must keep answering from every pod across it.
    let before = node.running_state();
    assert_eq!(before.0.len(), 8, "4 sandboxes, 4 containers: {before:?}");
    assert_eq!(before.1.len(), 4, "4 containers' restartCounts: {before:?}");
    let client = node.container_id("client");
    let endpoint = node.containerd.endpoint();
    let traffic = node.rt.spawn(async move {
        let mut cri = Cri::connect(&endpoint, EXEC_TIMEOUT).await?;
        let url = format!("http://{VIP}/");
        let cmd = wget_loop(&url, 2000, Duration::from_millis(50));
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        cri.exec_sync(&client, &cmd, EXEC_TIMEOUT).await
    });
    thread::sleep(Duration::from_secs(1));
    let restarting = Instant::now();
    node.agent.restart().unwrap();
    eprintln!(
        "agent healthy again {:?} after SIGTERM",
        restarting.elapsed()
    );
    node.wait_ready(&["web-1", "web-2", "web-3", "client"], POD_START);
    thread::sleep(Duration::from_secs(1));
    node.exec("client", &["touch", WGET_STOP]);
    let out = node.rt.block_on(traffic).unwrap().unwrap();
    let mut answers = tally_lines(&String::from_utf8_lossy(&out.stdout));
    let failed = answers.remove("error").unwrap_or(0);
    let total = answers.values().sum();
    assert!(
        total >= 10 && failed <= 2,
        "requests across the restart: {answers:?}, {failed} failed"
    );
    assert_answered_by("across the agent restart", &answers, total, &WEB);
    assert_eq!(node.running_state(), before, "pods after the agent restart");
    let answers = node.requests(300);
    assert_answered_by("after the agent restart", &answers, 300, &WEB);

    // Removal: preStop, SIGTERM, the exit code in the status, then nothing left.
    let sandboxes = node.sandboxes("web-1");
    assert_eq!(sandboxes.len(), 1, "web-1's sandboxes: {sandboxes:?}");
    let netns = netns_inode(&node.exec("web-1", &["readlink", "/proc/self/ns/net"])).unwrap();
    assert!(node.containerd.pod_netns().contains(&netns));
    let proc_cgroup = node.exec("web-1", &["cat", "/proc/self/cgroup"]);
    let cgroup = node.containerd.pod_cgroup(&proc_cgroup).unwrap();
    fs::remove_file(node.manifests.path().join("web-1.yaml")).unwrap();
    let removed = Instant::now();
    // Polled as fast as the CLI answers: the exit code shows between the container's exit
    // and the pod's removal.
    let mut exit = None;
    loop {
        let pods = node.agent.pods().unwrap();
        let Some(pod) = find_pod(&pods, "web-1") else {
            break;
        };
        exit = exit_code(pod, HTTPD).or(exit);
        let waited = removed.elapsed();
        assert!(
            waited < Duration::from_secs(30),
            "web-1 still listed after {waited:?}"
        );
    }
    eprintln!("web-1 gone {:?} after its file", removed.elapsed());
    assert_eq!(
        exit,
        Some(0),
        "web-1's httpd seen terminated by SIGTERM (exit code 0) before the pod went"
    );
    let log = fs::read_to_string(events.path().join("web-1/log")).unwrap();
    assert_eq!(log, "prestop\nsigterm\n", "preStop ran, then SIGTERM");
    eventually("web-1's sandbox removed", Duration::from_secs(5), || {
        node.sandboxes("web-1").is_empty()
    });
    eventually("web-1's cgroup removed", Duration::from_secs(5), || {
        cgroup_dirs(&cgroup).is_empty()
    });
    eventually("web-1's netns removed", Duration::from_secs(5), || {
        !node.containerd.pod_netns().contains(&netns)
    });
    let answers = node.requests(60);
    assert_answered_by("web-1 removed", &answers, 60, &["web-2", "web-3"]);
}

/// A container that crashes is restarted at once, then after 10 s, then 20 s
/// (CrashLoopBackOff meanwhile), and its restartCount counts them.
#[test]
fn crashed_container_restarts_with_doubling_backoff() {
    let crashy = HttpdPod {
        name: "crashy",
        port: PORT,
        ..Default::default()
    };
    let mut node = Node::start(&[("crashy", crashy.yaml())]);
    let up = |count: i32| move |p: &Pod| running(p, HTTPD) && restarts(p, HTTPD) == count;
    node.agent
        .wait_pod("crashy", "running", POD_START, up(0))
        .unwrap();

    let mut backoff = Duration::ZERO;
    for restart in 1..=3 {
        node.exec("crashy", CRASH);
        let crashed = Instant::now();
        if !backoff.is_zero() {
            let pod = node
                .agent
                .wait_pod("crashy", "in CrashLoopBackOff", backoff / 2, |p| {
                    waiting_reason(p, HTTPD) == Some("CrashLoopBackOff")
                })
                .unwrap();
            assert_eq!(exit_code(&pod, HTTPD), Some(143), "the crash's exit code");
            let table = node.agent.pods_table().unwrap();
            assert_eq!(
                table_status(&table, "crashy").as_deref(),
                Some("CrashLoopBackOff"),
                "{table}"
            );
        }
        let what = format!("restart {restart}");
        let pod = node
            .agent
            .wait_pod(
                "crashy",
                &what,
                backoff + Duration::from_secs(5),
                up(restart),
            )
            .unwrap();
        eprintln!(
            "restart {restart} seen {:?} after the crash",
            crashed.elapsed()
        );
        let status = container(&pod, HTTPD).unwrap();
        let last = status
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref());
        let last = last.expect("lastState.terminated");
        assert_eq!(
            (last.exit_code, last.reason.as_deref()),
            (143, Some("Error"))
        );
        // The agent's own times, whole seconds: a gap of at least `backoff` can't show less.
        let state = status.state.as_ref().and_then(|s| s.running.as_ref());
        let started = state
            .and_then(|r| r.started_at.as_ref())
            .expect("startedAt");
        let finished = last.finished_at.as_ref().expect("finishedAt");
        let gap = started.0.as_second() - finished.0.as_second();
        assert!(
            gap >= backoff.as_secs() as i64,
            "restart {restart} {gap} s after the crash, backoff {backoff:?}"
        );
        backoff = if backoff.is_zero() {
            BACKOFF
        } else {
            backoff * 2
        };
    }
    let table = node.agent.pods_table().unwrap();
    assert_eq!(
        table_row(&table, "crashy").get(..5),
        Some(&["default", "crashy", "1/1", "Running", "3"][..]),
        "{table}"
    );
}

/// An init container that fails keeps its pod Pending (Init:CrashLoopBackOff once retried)
/// and its app container never starts; one that succeeds lets its pod run.
#[test]
fn failing_init_container_keeps_pod_pending() {
    let fails = HttpdPod {
        name: "init-fails",
        port: PORT,
        init: Some("exit 3"),
        ..Default::default()
    };
    let succeeds = HttpdPod {
        name: "init-ok",
        init: Some("true"),
        ..fails
    };
    let mut node = Node::start(&[("init-fails", fails.yaml()), ("init-ok", succeeds.yaml())]);
    node.wait_ready(&["init-ok"], POD_START);
    // Retried under restartPolicy Always: failed twice, it waits out its backoff.
    let pod = node
        .agent
        .wait_pod("init-fails", "init in CrashLoopBackOff", POD_START, |p| {
            waiting_reason(p, "init") == Some("CrashLoopBackOff")
                && restarts(p, "init") >= 1
                && exit_code(p, "init") == Some(3)
        })
        .unwrap();
    assert_eq!(phase(&pod), "Pending");
    let initialized = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    let initialized = initialized
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Initialized");
    assert_eq!(initialized.map(|c| c.status.as_str()), Some("False"));
    assert_eq!(waiting_reason(&pod, HTTPD), Some("PodInitializing"));
    let table = node.agent.pods_table().unwrap();
    let status = table_status(&table, "init-fails");
    assert_eq!(status.as_deref(), Some("Init:CrashLoopBackOff"), "{table}");
    let containers = node.rt.block_on(node.cri.list_containers(&[])).unwrap();
    let app = containers.iter().find(|c| {
        label(&c.labels, LABEL_POD_NAME) == Some("init-fails")
            && label(&c.labels, LABEL_CONTAINER_NAME) == Some(HTTPD)
    });
    assert!(app.is_none(), "init-fails' httpd was created: {app:?}");
}

/// Pods the agent cannot run each get their reason and a message naming what is wrong; a good
/// pod in the same directory runs.
#[test]
fn unrunnable_pods_get_reasons_and_others_run() {
    let base = |name| HttpdPod {
        name,
        port: PORT,
        ..Default::default()
    };
    let mut unknown_volume = base("unknown-volume").pod();
    let spec = unknown_volume.spec.as_mut().unwrap();
    spec.volumes = Some(vec![Volume {
        name: "data".into(),
        nfs: Some(NFSVolumeSource {
            server: "192.0.2.1".into(),
            path: "/export".into(),
            read_only: None,
        }),
        ..Default::default()
    }]);
    spec.containers[0].volume_mounts = Some(vec![VolumeMount {
        name: "data".into(),
        mount_path: "/data".into(),
        ..Default::default()
    }]);
    let mut missing_config_map = base("missing-configmap").pod();
    let spec = missing_config_map.spec.as_mut().unwrap();
    spec.containers[0].env = Some(vec![EnvVar {
        name: "GREETING".into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: "absent".into(),
                key: "greeting".into(),
                optional: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    let bad_image_name = "Bad Image::name";
    let mut bad_image = base("bad-image").pod();
    bad_image.spec.as_mut().unwrap().containers[0].image = Some(bad_image_name.into());
    // No registry is reachable: the pull fails, and is retried with backoff.
    let missing_image = "node-agent.local/absent:1.0";
    let mut unpullable = base("unpullable").pod();
    unpullable.spec.as_mut().unwrap().containers[0].image = Some(missing_image.into());
    let mut duplicate = base("duplicate-names").pod();
    let spec = duplicate.spec.as_mut().unwrap();
    spec.containers.push(spec.containers[0].clone());
    let good = HttpdPod {
        readiness: true,
        ..base("good")
    };
    let mut node = Node::start(&[
        ("unknown-volume", to_yaml(&unknown_volume)),
        ("missing-configmap", to_yaml(&missing_config_map)),
        ("bad-image", to_yaml(&bad_image)),
        ("duplicate-names", to_yaml(&duplicate)),
        ("unpullable", to_yaml(&unpullable)),
        ("good", good.yaml()),
    ]);

    // (pod, the kubelet's reason if it has one, what the message must name)
    let expected = [
        ("unknown-volume", None, "data"),
        (
            "missing-configmap",
            Some("CreateContainerConfigError"),
            "absent",
        ),
        ("bad-image", Some("InvalidImageName"), bad_image_name),
        ("duplicate-names", None, HTTPD),
        ("unpullable", Some("ImagePullBackOff"), missing_image),
    ];
    let fits = |pod: &Pod, reason: Option<&str>, named: &str| {
        reasons(pod)
            .iter()
            .any(|(r, m)| !r.is_empty() && reason.is_none_or(|w| r == w) && m.contains(named))
    };
    let pods = node
        .agent
        .wait_pods("every bad pod's reason", POD_START, |pods| {
            let explained = expected.iter().all(|(name, reason, named)| {
                find_pod(pods, name).is_some_and(|p| fits(p, *reason, named))
            });
            explained.then(|| pods.to_vec())
        })
        .unwrap();
    let table = node.agent.pods_table().unwrap();
    for (name, _, _) in expected {
        let pod = find_pod(&pods, name).unwrap();
        assert!(
            !is_ready(pod) && phase(pod) != "Running",
            "{name}: {:?}",
            pod.status
        );
        let status = table_status(&table, name).unwrap_or_default();
        assert!(
            reasons(pod).iter().any(|(r, _)| *r == status),
            "{name}: STATUS {status} is one of its reasons {:?}\n{table}",
            reasons(pod)
        );
    }
    node.wait_ready(&["good"], POD_START);
    let pods = node.agent.pods().unwrap();
    let good = find_pod(&pods, "good").unwrap();
    assert_eq!(restarts(good, HTTPD), 0);
    node.container_id("good"); // running in the runtime, by the agent's labels
}

/// What a pod's spec asks of its container arrives in it: a ConfigMap volume (files with their
/// modes), a Secret in the environment, an emptyDir, and CPU and memory limits in its cgroups.
#[test]
fn config_maps_secrets_and_resources_reach_the_container() {
    let config = "apiVersion: v1
kind: ConfigMap
metadata: {name: app-config}
data: {greeting: hello, 'app.conf': 'port=8080'}
";
    let secret = "apiVersion: v1
kind: Secret
metadata: {name: app-secret}
stringData: {token: s3cr3t}
";
    let mut pod = HttpdPod {
        name: "configured",
        port: PORT,
        ..Default::default()
    }
    .pod();
    let spec = pod.spec.as_mut().unwrap();
    spec.volumes = Some(serde_json::from_value(serde_json::json!([
        {"name": "config", "configMap": {"name": "app-config", "defaultMode": 0o640,
            "items": [{"key": "app.conf", "path": "conf/app.conf", "mode": 0o600}, {"key": "greeting", "path": "greeting"}]}},
        {"name": "scratch", "emptyDir": {}},
    ])).unwrap());
    let c = &mut spec.containers[0];
    c.volume_mounts = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "config", "mountPath": "/etc/app"},
            {"name": "scratch", "mountPath": "/scratch"},
        ]))
        .unwrap(),
    );
    c.env = Some(serde_json::from_value(serde_json::json!([
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "token"}}},
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
        {"name": "MESSAGE", "value": "$(GREETING) from $(POD)"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ])).unwrap());
    c.resources = Some(
        serde_json::from_value(serde_json::json!(
            {"limits": {"cpu": "500m", "memory": "64Mi"}}
        ))
        .unwrap(),
    );
    let mut node = Node::start(&[
        ("config", config.into()),
        ("secret", secret.into()),
        ("configured", to_yaml(&pod)),
    ]);
    node.wait_ready(&["configured"], POD_START);
    let exec = |node: &mut Node, script: &str| node.exec("configured", &["sh", "-c", script]);
    assert_eq!(exec(&mut node, "cat /etc/app/conf/app.conf"), "port=8080");
    assert_eq!(exec(&mut node, "cat /etc/app/greeting"), "hello");
    assert_eq!(
        exec(
            &mut node,
            "stat -L -c %a /etc/app/conf/app.conf /etc/app/greeting"
        ),
        "600\n640\n"
    );
    assert_eq!(exec(&mut node, "echo $TOKEN"), "s3cr3t\n");
    // Defined after MESSAGE: left as written, as the kubelet does.
    assert_eq!(exec(&mut node, "echo $MESSAGE"), "hello from $(POD)\n");
    exec(&mut node, "echo kept > /scratch/file && cat /scratch/file");
    assert_eq!(
        exec(&mut node, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"),
        format!("{}\n", 64 * 1024 * 1024)
    );
    assert_eq!(
        exec(
            &mut node,
            "cat /sys/fs/cgroup/cpu*/cpu.cfs_quota_us | head -n 1"
        ),
        "50000\n"
    );
}

/// A failing liveness probe restarts its container (and only its container): the restart
/// count grows, the killed attempt is the last state, the pod keeps its sandbox and IP.
#[test]
fn failed_liveness_probe_restarts_the_container() {
    let mut pod = HttpdPod {
        name: "lively",
        port: PORT,
        ..Default::default()
    }
    .pod();
    pod.spec.as_mut().unwrap().containers[0].liveness_probe = Some(
        serde_json::from_value(serde_json::json!({
            "exec": {"command": ["cat", READY_FILE]},
            "periodSeconds": 1,
            "failureThreshold": 2,
        }))
        .unwrap(),
    );
    let mut node = Node::start(&[("lively", to_yaml(&pod))]);
    node.wait_ready(&["lively"], POD_START);
    let sandboxes = node.sandboxes("lively");
    let first = node.container_id("lively");
    node.exec("lively", &["rm", READY_FILE]);
    // Two failures a period apart, then SIGTERM (the script exits 0) and an immediate restart.
    let pod = node
        .agent
        .wait_pod(
            "lively",
            "restarted by its liveness probe",
            POD_START,
            |p| restarts(p, HTTPD) == 1 && running(p, HTTPD) && is_ready(p),
        )
        .unwrap();
    let last = container(&pod, HTTPD)
        .and_then(|c| c.last_state.as_ref()?.terminated.clone())
        .expect("the killed attempt as lastState");
    assert_eq!(last.exit_code, 0, "{last:?}");
    assert_ne!(node.container_id("lively"), first);
    assert_eq!(node.sandboxes("lively"), sandboxes);
    assert!(
        node.agent
            .wait_for_log(&["lively", "killing", "failed probe"], Duration::ZERO)
            .is_some()
    );
}

/// containerd going away is said, pods keep running, and once it is back the agent uses it
/// again: a pod added afterwards starts.
#[test]
fn runtime_restart_is_survived() {
    let steady = HttpdPod {
        name: "steady",
        port: PORT,
        ..Default::default()
    };
    let mut node = Node::start(&[("steady", steady.yaml())]);
    node.wait_ready(&["steady"], POD_START);
    let before = node.running_state();
    node.containerd.restart(Duration::from_secs(3)).unwrap();
    assert!(
        node.agent
            .wait_for_log(&["CRI runtime unreachable"], Duration::ZERO)
            .is_some(),
        "the outage is said:\n{}",
        node.agent.logs().join("\n")
    );
    let back = node
        .agent
        .wait_for_log(&["CRI runtime answers again"], POD_START);
    assert!(back.is_some(), "{}", node.agent.logs().join("\n"));
    let late = HttpdPod {
        name: "late",
        port: PORT,
        ..Default::default()
    };
    write(node.manifests.path(), "late.yaml", &late.yaml()).unwrap();
    node.wait_ready(&["steady", "late"], POD_START);
    node.cri = node
        .rt
        .block_on(Cri::connect(&node.containerd.endpoint(), POD_START))
        .unwrap();
    let (ids, restarts) = node.running_state();
    assert!(
        before.0.is_subset(&ids),
        "steady's sandbox and container kept"
    );
    assert_eq!(restarts.get("steady/httpd"), Some(&0));
}

/// A pod whose file went while the agent was down is removed when it comes back, as left
/// over; the pod still asked for is adopted untouched.
#[test]
fn pod_removed_while_the_agent_was_down_is_cleaned_up() {
    let pod = |name| HttpdPod {
        name,
        port: PORT,
        ..Default::default()
    };
    let mut node = Node::start(&[("keep", pod("keep").yaml()), ("gone", pod("gone").yaml())]);
    node.wait_ready(&["keep", "gone"], POD_START);
    let kept = node.container_id("keep");
    let status = node.agent.stop().unwrap();
    assert!(status.success(), "{status}");
    fs::remove_file(node.manifests.path().join("gone.yaml")).unwrap();
    node.agent.restart().unwrap();
    let removed = node
        .agent
        .wait_for_log(&["removing a pod no longer asked for", "gone"], POD_START);
    assert!(removed.is_some(), "{}", node.agent.logs().join("\n"));
    let deadline = Instant::now() + POD_START;
    while !node.sandboxes("gone").is_empty() {
        assert!(Instant::now() < deadline, "gone's sandbox is still there");
        thread::sleep(Duration::from_millis(100));
    }
    node.wait_ready(&["keep"], POD_START);
    assert_eq!(node.container_id("keep"), kept);
    let pods = node.agent.pods().unwrap();
    assert!(find_pod(&pods, "gone").is_none());
}
