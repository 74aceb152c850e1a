//! The real `node-agent` binary, started inside a namespace as a user would start it (as a
//! proxy on given devices, or as a whole node on a containerd fixture), and stopped (SIGTERM,
//! then SIGKILL) by its PID when the guard drops. Its pods stay for the containerd fixture to
//! remove, as a kubelet's pods outlive the kubelet.
use std::{
    ffi::OsString,
    fs::{self, File},
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use k8s_openapi::api::core::v1::Pod;

use crate::{
    client::http_get,
    containerd::Containerd,
    netns::{Netns, run_in},
};

/// Where the agents started here serve /healthz and /pods (in their own namespace).
pub const HEALTH_BIND: &str = "127.0.0.1:10256";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Agent {
    child: Child,
    /// From spawning the process until /healthz first answered 200.
    synced_after: Duration,
    /// Every run's stderr, in order.
    logs: Arc<Mutex<Vec<String>>>,
    bpffs: PathBuf,
    binary: PathBuf,
    /// The node namespace (a /run/netns path) and the whole command line: `restart` runs the
    /// same agent again.
    netns: PathBuf,
    args: Vec<OsString>,
}

/// The agent binary: `NODE_AGENT_BIN`, or the one cargo built next to this test executable.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NODE_AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/node-agent
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("node-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p node-agent; cargo xtask test does)",
        bin.display()
    );
    bin
}

impl Agent {
    /// `BINARY run` in `node` with `extra` flags, waiting until /healthz answers 200.
    pub fn start(
        binary: &Path,
        node: &Netns,
        manifests: &Path,
        devices: &[String],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = manifests_args(manifests);
        args.extend(["--devices".into(), devices.join(",").into()]);
        args.extend(extra.iter().map(OsString::from));
        Self::start_with(binary, node, args)
    }

    /// `BINARY run ARGS` in `node`, whatever the source (e.g. `--kubeconfig FILE
    /// --kubelet=false --devices …`), waiting until /healthz answers 200.
    pub fn start_with(binary: &Path, node: &Netns, args: Vec<OsString>) -> anyhow::Result<Self> {
        Self::launch(binary, Path::new(&node.path()), args)
    }

    /// `BINARY run` as a whole node (the embedded kubelet) on `containerd`, in its namespace:
    /// no --devices (the agent finds its pods' interfaces), the agent writes the CNI network
    /// for `pod_cidr`, and its pods live under the fixture's root dir and cgroup root.
    pub fn start_node(
        binary: &Path,
        containerd: &Containerd,
        manifests: &Path,
        pod_cidr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = manifests_args(manifests);
        args.extend(
            [
                "--kubelet=true",
                "--cri-endpoint",
                &containerd.endpoint(),
                "--pod-cidr",
                pod_cidr,
                "--cgroup-root",
                containerd.cgroup_root(),
            ]
            .map(OsString::from),
        );
        args.extend([
            "--cni-conf-dir".into(),
            containerd.cni_conf_dir().into(),
            "--root-dir".into(),
            containerd.root_dir().into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        Self::launch(binary, Path::new(&containerd.netns().path()), args)
    }

    /// Spawns `BINARY run` with `run_args` plus this fixture's health address and a fresh
    /// bpffs directory, and waits until it is healthy.
    fn launch(binary: &Path, netns: &Path, run_args: Vec<OsString>) -> anyhow::Result<Self> {
        let bpffs = Path::new("/sys/fs/bpf").join(crate::unique("pins"));
        let mut args = vec![OsString::from("run")];
        args.extend(run_args);
        args.extend(["--health-bind".into(), HEALTH_BIND.into(), "--bpffs".into()]);
        args.push(bpffs.clone().into());
        let logs = Arc::new(Mutex::new(Vec::new()));
        let spawned = Instant::now();
        let mut agent = Self {
            child: spawn(binary, netns, &args, &logs)?,
            synced_after: Duration::ZERO,
            logs,
            bpffs,
            binary: binary.to_owned(),
            netns: netns.to_owned(),
            args,
        };
        agent.wait_healthy()?;
        agent.synced_after = spawned.elapsed();
        Ok(agent)
    }

    /// Stops the agent (SIGTERM) if it runs and starts it again with the same flags and bpffs,
    /// as a node restarts its agent; returns once /healthz answers again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            let status = self.stop()?;
            if !status.success() {
                bail!(
                    "node-agent exited with {status} on SIGTERM:\n{}",
                    self.logs().join("\n")
                );
            }
        }
        let spawned = Instant::now();
        self.child = spawn(&self.binary, &self.netns, &self.args, &self.logs)?;
        self.wait_healthy()?;
        self.synced_after = spawned.elapsed();
        Ok(())
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "node-agent exited with {status} before it was healthy:\n{}",
                    self.logs().join("\n")
                );
            }
            let healthz = || http_get(HEALTH_BIND.parse().expect("an address"), "/healthz");
            if run_in(&self.netns, healthz)?.is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node-agent not healthy after {START_TIMEOUT:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            // Finely: the time to healthy is the agent's startup figure in the benchmark.
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a log line containing every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .logs()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// From spawning the agent until its first sync was in the maps (/healthz 200, polled
    /// every 5 ms).
    pub fn synced_after(&self) -> Duration {
        self.synced_after
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// `node-agent lb list` against this agent's pins.
    pub fn lb_list(&self) -> anyhow::Result<String> {
        let out = Command::new(&self.binary)
            .args(["lb", "list", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!("lb list failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The node's pods as the agent reports them: `BINARY pods -o json`, run in the node's
    /// namespace as a user would.
    pub fn pods(&self) -> anyhow::Result<Vec<Pod>> {
        let json = self.pods_command(&["-o", "json"])?;
        serde_json::from_str(&json).with_context(|| format!("node-agent pods -o json: {json}"))
    }

    /// `BINARY pods`: the table a user reads (NAMESPACE NAME READY STATUS RESTARTS IP).
    pub fn pods_table(&self) -> anyhow::Result<String> {
        self.pods_command(&[])
    }

    fn pods_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = in_netns(&self.binary, &self.netns)?;
        let out = command
            .args(["pods", "--health-bind", HEALTH_BIND])
            .args(args)
            .output()
            .context("running node-agent pods")?;
        if !out.status.success() {
            bail!(
                "node-agent pods failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Polls `pods()` until `check` returns something, for up to `timeout`. The error names
    /// `what`, shows the last list and the agent's log.
    pub fn wait_pods<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[Pod]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let pods = self.pods();
            if let Some(found) = pods.as_deref().ok().and_then(&mut check) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                let last = match pods {
                    Ok(pods) => serde_json::to_string_pretty(&pods)?,
                    Err(e) => format!("{e:#}"),
                };
                bail!(
                    "{what}: not within {timeout:?}\nlast pods: {last}\nnode-agent log:\n{}",
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until pod `name` (any namespace) satisfies `check`, and returns it.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Pod) -> bool,
    ) -> anyhow::Result<Pod> {
        self.wait_pods(&format!("pod {name}: {what}"), timeout, |pods| {
            find_pod(pods, name).filter(|p| check(p)).cloned()
        })
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node-agent did not exit within 10 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.is_running() && self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Pins a killed agent left behind, and whatever it keeps across restarts.
        if let Err(e) = fs::remove_dir_all(&self.bpffs)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: removing {}: {e}", self.bpffs.display());
        }
    }
}

/// Whether `pod`'s Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Pod `name` of `pods`, in any namespace.
pub fn find_pod<'a>(pods: &'a [Pod], name: &str) -> Option<&'a Pod> {
    pods.iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
}

/// `--manifests DIR`: the source of the agents started from a manifest directory.
fn manifests_args(manifests: &Path) -> Vec<OsString> {
    vec!["--manifests".into(), manifests.into()]
}

/// Spawns `BINARY ARGS` in the namespace at `netns`, its stderr echoed and kept in `logs`.
fn spawn(
    binary: &Path,
    netns: &Path,
    args: &[OsString],
    logs: &Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<Child> {
    let mut child = in_netns(binary, netns)?
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting node-agent")?;
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = logs.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[node-agent] {line}");
            sink.lock().unwrap().push(line);
        }
    });
    Ok(child)
}

/// `BINARY ARGS` run to its end inside `node`, as a user would run a one-shot command there.
pub fn run_to_exit(binary: &Path, node: &Netns, args: &[&str]) -> anyhow::Result<Output> {
    Ok(in_netns(binary, Path::new(&node.path()))?
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?)
}

/// A command that runs `binary` inside the network namespace at `netns` (a /run/netns path).
pub(crate) fn in_netns(binary: &Path, netns: &Path) -> anyhow::Result<Command> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let mut command = Command::new(binary);
    command.stdin(Stdio::null());
    // SAFETY: setns is async-signal-safe; it moves only the child into the node namespace
    // (not `ip netns exec`, which would hide bpffs behind a fresh /sys). The closure owns the
    // file, so it stays open as long as the command.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}
