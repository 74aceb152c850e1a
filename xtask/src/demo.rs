//! `cargo xtask demo`: a standalone node. containerd runs in a network namespace of its own and
//! the real agent runs the pods and the Service of deploy/demo/node/ on it: the Service answers
//! from every pod, follows a pod's readiness, and a removed pod terminates gracefully.
//!
//! `cargo xtask demo --proxy`: the agent as a Service proxy only (no runtime), on a node
//! namespace between a client and three backend namespaces, fed the EndpointSlice file of
//! deploy/demo/proxy/ — what a node running a kubelet of its own uses.
use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use node_agent_tests::{
    agent::{Agent, find_pod, is_ready},
    client::{tally_lines, tcp_spread, udp_spread, wget_loop},
    containerd::Containerd,
    manifest::endpoint_slice,
    topology::{Topology, backend_ip},
};
use tempfile::TempDir;

const POD_CIDR: &str = "10.88.0.0/24";
/// The ClusterIP of deploy/demo/node/web-service.yaml.
const SERVICE_URL: &str = "http://10.96.0.10/";
const WEB: [&str; 3] = ["web-1", "web-2", "web-3"];
const PODS: [&str; 4] = ["client", "web-1", "web-2", "web-3"];
/// The web pods' container, and the file their readiness probe serves.
const HTTPD: &str = "httpd";
const READY_FILE: &str = "/www/ready";
/// From the agent's start until its pods are Ready (a few seconds are expected).
const POD_START: Duration = Duration::from_secs(60);
/// A readiness probe period (1 s) and the time for the agent to act on it.
const READINESS: Duration = Duration::from_secs(5);
/// Removal: preStop (1 s) and SIGTERM, within terminationGracePeriodSeconds (10 s).
const TERMINATION: Duration = Duration::from_secs(30);

pub fn node(agent_binary: &Path, manifests: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let containerd = Containerd::start_without_network()?;
    say(&format!(
        "containerd in network namespace {}, with local pause and busybox images (no registry)",
        containerd.netns().name()
    ));
    let dir = copy_manifests(manifests)?;
    say(&format!(
        "node-agent run --manifests {} --cri-endpoint {} --pod-cidr {POD_CIDR} \
         --cni-conf-dir {} --root-dir {} --cgroup-root {}",
        dir.path().display(),
        containerd.endpoint(),
        containerd.cni_conf_dir().display(),
        containerd.root_dir().display(),
        containerd.cgroup_root(),
    ));
    let agent = Agent::start_node(agent_binary, &containerd, dir.path(), POD_CIDR, &[])?;
    let conflist = containerd.cni_conf_dir().join("10-node-agent.conflist");
    println!(
        "   pod network written to {}: bridge na0, host-local on {POD_CIDR}",
        conflist.display()
    );
    let agent_started = Instant::now();
    agent.wait_pods("every pod Ready", POD_START, |pods| {
        PODS.iter()
            .all(|name| find_pod(pods, name).is_some_and(is_ready))
            .then_some(())
    })?;
    println!(
        "   4 pods Ready {:.1} s after the agent was healthy",
        agent_started.elapsed().as_secs_f64()
    );
    say("node-agent pods");
    print!("{}", agent.pods_table()?);
    say("node-agent lb list");
    print!("{}", agent.lb_list()?);

    let ctr = Ctr::new(&containerd)?;
    let client = container_id(&agent, "client", "client")?;
    let requests = |count: usize, expected: &[&str]| -> anyhow::Result<()> {
        let output = ctr.exec(&client, &wget_loop(SERVICE_URL, count, Duration::ZERO))?;
        let answers = tally_lines(&output);
        println!("   {count} requests answered by: {}", summary(&answers));
        check_answers(&answers, count, expected)
    };
    say(&format!(
        "300 requests from pod client to {SERVICE_URL} (busybox wget, a new connection each)"
    ));
    requests(300, &WEB)?;

    let web2 = container_id(&agent, "web-2", HTTPD)?;
    let web2_backend = format!("{}:", pod_ip(&agent, "web-2")?);
    say(&format!(
        "web-2's readiness probe fails (rm {READY_FILE} in its container): it leaves the Service"
    ));
    ctr.exec(&web2, &["rm", READY_FILE])?;
    let failed = Instant::now();
    agent.wait_pod("web-2", "not Ready", READINESS, |p| !is_ready(p))?;
    wait_lb(&agent, "web-2 out of the Service", |lb| {
        !lb.contains(&web2_backend)
    })?;
    println!(
        "   web-2 not Ready and out of the Service {:.1} s later",
        failed.elapsed().as_secs_f64()
    );
    print!("{}", agent.pods_table()?);
    print!("{}", agent.lb_list()?);
    requests(60, &["web-1", "web-3"])?;
    say("web-2's probe passes again: it returns");
    ctr.exec(&web2, &["sh", "-c", &format!("echo ok > {READY_FILE}")])?;
    let passed = Instant::now();
    agent.wait_pod("web-2", "Ready again", READINESS, is_ready)?;
    wait_lb(&agent, "web-2 back in the Service", |lb| {
        lb.contains(&web2_backend)
    })?;
    println!(
        "   web-2 Ready and back in the Service {:.1} s later",
        passed.elapsed().as_secs_f64()
    );
    requests(60, &WEB)?;

    say("web-1.yaml removed: web-1 terminates gracefully (preStop hook, then SIGTERM)");
    let held = ctr.containers_of("web-1")?;
    fs::remove_file(dir.path().join("web-1.yaml"))?;
    follow_termination(&agent, "web-1")?;
    let gone = Instant::now();
    while ctr.containers_of("web-1")? > 0 {
        if gone.elapsed() > Duration::from_secs(5) {
            bail!("web-1's sandbox or container still in containerd 5 s after the pod went");
        }
        thread::sleep(Duration::from_millis(100));
    }
    println!("   containerd holds none of web-1's {held} containers (sandbox and httpd) any more");
    print!("{}", agent.pods_table()?);
    requests(60, &["web-2", "web-3"])?;

    say(&format!(
        "done in {:.1} s; stopping node-agent (SIGTERM), then containerd, its pods and namespace",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Prints each change of pod `name` from its removal until it is gone from the node's pods.
fn follow_termination(agent: &Agent, name: &str) -> anyhow::Result<()> {
    let removed = Instant::now();
    let mut last = String::new();
    loop {
        let pods = agent.pods()?;
        let now = match find_pod(&pods, name) {
            Some(pod) => termination_state(pod),
            None => "gone from the node's pods".into(),
        };
        if now != last {
            println!(
                "   {:4.1} s  {name}: {now}",
                removed.elapsed().as_secs_f64()
            );
            last = now;
        }
        if find_pod(&pods, name).is_none() {
            return Ok(());
        }
        if removed.elapsed() > TERMINATION {
            bail!("{name} still listed {TERMINATION:?} after its file was removed");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Where a terminating web pod is: its httpd's exit, else whether it is asked to go.
fn termination_state(pod: &Pod) -> String {
    let terminated = container_status(pod, HTTPD)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    match terminated {
        Some(t) => format!(
            "httpd exited with code {} ({})",
            t.exit_code,
            t.reason.as_deref().unwrap_or("no reason")
        ),
        None if pod.metadata.deletion_timestamp.is_some() => {
            "Terminating: out of the Service, preStop hook running, then SIGTERM".into()
        }
        None => "Running".into(),
    }
}

/// Polls `node-agent lb list` until `done` holds for it.
fn wait_lb(agent: &Agent, what: &str, done: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + READINESS;
    loop {
        let list = agent.lb_list()?;
        if done(&list) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {READINESS:?}:\n{list}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn container_status<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find(|c| c.name == container)
}

/// The runtime's id of `container` of pod `pod`, from the status the agent reports
/// (`containerID: containerd://<id>`).
fn container_id(agent: &Agent, pod: &str, container: &str) -> anyhow::Result<String> {
    let pods = agent.pods()?;
    let id = find_pod(&pods, pod)
        .and_then(|p| container_status(p, container))
        .and_then(|c| c.container_id.as_deref())
        .with_context(|| format!("pod {pod} reports no container {container}"))?;
    Ok(id.strip_prefix("containerd://").unwrap_or(id).to_owned())
}

fn pod_ip(agent: &Agent, pod: &str) -> anyhow::Result<String> {
    let pods = agent.pods()?;
    find_pod(&pods, pod)
        .and_then(|p| p.status.as_ref()?.pod_ip.clone())
        .with_context(|| format!("pod {pod} reports no IP"))
}

/// "web-1 98, web-2 101, web-3 101".
fn summary(answers: &BTreeMap<String, usize>) -> String {
    let counts: Vec<String> = answers.iter().map(|(k, n)| format!("{k} {n}")).collect();
    counts.join(", ")
}

/// Every request answered by one of `expected`, and each of them answered some.
fn check_answers(
    answers: &BTreeMap<String, usize>,
    total: usize,
    expected: &[&str],
) -> anyhow::Result<()> {
    let by_expected: usize = expected.iter().filter_map(|e| answers.get(*e)).sum();
    let silent: Vec<&&str> = expected
        .iter()
        .filter(|e| !answers.contains_key(**e))
        .collect();
    if by_expected != total || !silent.is_empty() {
        bail!("expected every request answered by each of {expected:?}, got {answers:?}");
    }
    Ok(())
}

/// `ctr` on the demo's containerd, whose CRI containers live in its `k8s.io` namespace: the
/// runtime's exec, without a CRI client (xtask does not link the agent).
struct Ctr {
    address: PathBuf,
    /// Where `ctr` makes the FIFOs of an exec's stdio.
    fifos: TempDir,
}

impl Ctr {
    fn new(containerd: &Containerd) -> anyhow::Result<Self> {
        let endpoint = containerd.endpoint();
        let address = endpoint.strip_prefix("unix://").unwrap_or(&endpoint);
        Ok(Self {
            address: address.into(),
            fifos: tempfile::tempdir()?,
        })
    }

    /// Runs `cmd` in `container` to its end: its stdout, failing on a non-zero exit.
    fn exec(&self, container: &str, cmd: &[impl AsRef<str>]) -> anyhow::Result<String> {
        let exec_id = node_agent_tests::unique("exec");
        let mut args = vec!["tasks", "exec", "--exec-id", &exec_id, "--fifo-dir"];
        args.push(self.fifos.path().to_str().context("a UTF-8 temp dir")?);
        args.push(container);
        args.extend(cmd.iter().map(AsRef::as_ref));
        self.run(&args)
    }

    /// How many containerd containers (sandboxes and containers) pod `pod` has.
    fn containers_of(&self, pod: &str) -> anyhow::Result<usize> {
        let filter = format!("labels.\"io.kubernetes.pod.name\"=={pod}");
        let ids = self.run(&["containers", "ls", "-q", &filter])?;
        Ok(ids.lines().filter(|l| !l.is_empty()).count())
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The demo's manifests, copied to a directory of its own that the demo may change.
fn copy_manifests(manifests: &Path) -> anyhow::Result<TempDir> {
    let dir = tempfile::tempdir()?;
    for entry in fs::read_dir(manifests).with_context(|| format!("{}", manifests.display()))? {
        let path = entry?.path();
        fs::copy(&path, dir.path().join(path.file_name().expect("a file")))?;
    }
    Ok(dir)
}

fn say(what: &str) {
    println!("== {what}");
}

const FRONTEND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)), 80);
const ENDPOINTS_FILE: &str = "web-endpoints.yaml";

pub fn proxy(agent_binary: &Path, manifests: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    say(
        "topology: client 198.18.1.2 → node (node-agent) → backend-1..3 at 198.18.11-13.2, each in its own netns",
    );
    let topology = Topology::new(3)?;
    let _servers = topology.start_backends(8080)?;
    let dir = copy_manifests(manifests)?;
    say(&format!(
        "node-agent run --kubelet=false --manifests {} --devices {}",
        dir.path().display(),
        topology.node_devices().join(",")
    ));
    let agent = Agent::start(
        agent_binary,
        &topology.node,
        dir.path(),
        &topology.node_devices(),
        &["--kubelet=false"],
    )?;
    say("node-agent lb list");
    print!("{}", agent.lb_list()?);

    say(&format!(
        "300 TCP connections and 300 UDP flows to {FRONTEND}:"
    ));
    let tcp = topology.client.run(|| tcp_spread(FRONTEND, 300))?;
    println!("   TCP: {}", summary(&tcp));
    let udp = topology.client.run(|| udp_spread(FRONTEND, 300))?;
    println!("   UDP: {}", summary(&udp));

    say(&format!(
        "removing backend-3 ({}) from {ENDPOINTS_FILE}",
        backend_ip(3)
    ));
    let ports = [("http", 8080, "TCP"), ("echo", 8080, "UDP")];
    fs::write(
        dir.path().join(ENDPOINTS_FILE),
        endpoint_slice("web-1", "web", &ports, &[backend_ip(1), backend_ip(2)]),
    )?;
    thread::sleep(Duration::from_millis(300));
    print!("{}", agent.lb_list()?);
    let tcp = topology.client.run(|| tcp_spread(FRONTEND, 300))?;
    println!("   TCP: {}", summary(&tcp));
    say(&format!(
        "done in {:.1} s; stopping the agent and removing the namespaces",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    use serde::de::DeserializeOwned;

    use super::*;

    fn manifest<T: DeserializeOwned>(file: &str) -> T {
        let path = crate::workspace_root().join("deploy/demo/node").join(file);
        let text = fs::read_to_string(&path).unwrap();
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// What the demo counts on is what deploy/demo/node/ says: the ClusterIP, a file per pod,
    /// the web pods selected by the Service, their httpd container and the readiness file its
    /// probe and script share.
    #[test]
    fn demo_matches_its_manifests() {
        let service: Service = manifest("web-service.yaml");
        let spec = service.spec.unwrap();
        let cluster_ip = spec.cluster_ip.unwrap();
        assert_eq!(SERVICE_URL, format!("http://{cluster_ip}/"));
        let selector = spec.selector.unwrap();
        for name in PODS {
            let pod: Pod = manifest(&format!("{name}.yaml"));
            assert_eq!(pod.metadata.name.as_deref(), Some(name));
            let labels = pod.metadata.labels.unwrap_or_default();
            let selected = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            assert_eq!(selected, WEB.contains(&name), "{name} selected by web");
            if !selected {
                continue;
            }
            let container = &pod.spec.unwrap().containers[0];
            assert_eq!(container.name, HTTPD);
            let probe = container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref());
            assert_eq!(probe.and_then(|h| h.path.as_deref()), Some("/ready"));
        }
        let config: ConfigMap = manifest("web-config.yaml");
        let script = &config.data.unwrap()["serve.sh"];
        assert!(script.contains(&format!("> {READY_FILE}")), "{script}");
        assert!(script.contains("-h /www"), "{script}");
    }
}
