//! A containerd of the test's own: its own network namespace, root, state, socket, CNI
//! config dir and pod cgroup root, with the local pause and busybox images imported, and a
//! root dir for a kubelet (the agent) using it. Drop removes what it and its pods left: tasks,
//! shims, mounts, directories and pod cgroups.
//!
//! containerd 1.6 creates its CNI conf dir (mode 0700) if missing and watches it: a conflist
//! written there later turns NetworkReady true within milliseconds. The watcher reloads on
//! write, remove and rename-away events only: a file moved in from another directory goes
//! unnoticed, and a conf dir removed and made again is no longer watched.
//!
//! Ready for `ctr` when `start` returns; the CRI plugin may still answer "not initialized"
//! for a moment, which is what a CRI client waits out (node_agent::cri::Cri::connect).
use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    mount::{MntFlags, umount2},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{agent::in_netns, image, netns::Netns};

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Where runc (cgroupfs driver) puts pod cgroups: one hierarchy per controller (cgroup v1
/// here) or a single unified one.
const CGROUP_FS: &str = "/sys/fs/cgroup";

pub struct Containerd {
    child: Child,
    dir: PathBuf,
    /// The cgroup every pod of this containerd goes under, e.g. `/na123-4-pods`.
    cgroup_root: String,
    logs: Arc<Mutex<Vec<String>>>,
    /// Declared last: deleted after Drop removed everything living in it.
    netns: Netns,
}

impl Containerd {
    /// Starts containerd with a bridge + host-local CNI network for pods in `pod_subnet`.
    pub fn start(pod_subnet: &str) -> anyhow::Result<Self> {
        Self::start_with(Some(pod_subnet))
    }

    /// Starts containerd with an empty CNI conf dir: NetworkReady stays false until someone
    /// writes a network there.
    pub fn start_without_network() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    fn start_with(pod_subnet: Option<&str>) -> anyhow::Result<Self> {
        let netns = Netns::new("ctrd")?;
        let dir = std::env::temp_dir().join(crate::unique("containerd"));
        for sub in ["root", "state", "opt", "kubelet"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        if let Some(subnet) = pod_subnet {
            bridge_network(&dir.join("cni/conf"), &dir.join("cni/ipam"), subnet)?;
        }
        fs::write(dir.join("config.toml"), config_toml(&dir))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut containerd = Self {
            child: spawn(&dir, &netns, &logs)?,
            cgroup_root: format!("/{}", crate::unique("pods")),
            dir,
            logs,
            netns,
        };
        containerd.wait_socket()?;
        for archive in image::build_all(&containerd.dir.join("images"))? {
            containerd
                .ctr(
                    &["images", "import"],
                    &[archive.to_str().expect("utf-8 path")],
                )
                .with_context(|| format!("importing {}", archive.display()))?;
        }
        Ok(containerd)
    }

    /// Stops containerd (SIGTERM: pods keep running in their shims) and starts it again
    /// `down` later, as a node restarts its runtime; returns once its socket is back.
    pub fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.stop();
        thread::sleep(down);
        self.child = spawn(&self.dir, &self.netns, &self.logs)?;
        self.wait_socket()
    }

    /// The CRI endpoint, as a kubelet's `--container-runtime-endpoint` names it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// containerd's CNI conf dir (`--cni-conf-dir` of an agent that writes the network).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/conf")
    }

    /// The root dir of a kubelet using this containerd (the agent's `--root-dir`): Drop
    /// unmounts and removes whatever is left there.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    /// The cgroup every pod of this containerd goes under, e.g. `/na123-4-pods` (the agent's
    /// `--cgroup-root`). Drop kills what runs there and removes it.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// The pod cgroup of a container process, from its `/proc/PID/cgroup`: the parent of the
    /// container's own cgroup (containerd puts a container at `<cgroup parent>/<id>`).
    pub fn pod_cgroup(&self, proc_cgroup: &str) -> Option<String> {
        let root = format!("{}/", self.cgroup_root);
        proc_cgroup
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .find(|path| path.starts_with(&root))
            .and_then(|path| Some(path.rsplit_once('/')?.0.to_owned()))
    }

    /// The network namespaces containerd holds for pod sandboxes, by inode (as a pod's
    /// `readlink /proc/self/ns/net` shows it: see `netns_inode`).
    pub fn pod_netns(&self) -> Vec<u64> {
        let dir = self.dir.join("state/io.containerd.grpc.v1.cri/netns");
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::metadata(e.path()).ok())
            .map(|m| m.ino())
            .collect()
    }

    /// The namespace containerd, the CNI bridge and the pods' host ends live in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// A cgroup parent for a pod sandbox, under this containerd's pod cgroup root.
    pub fn cgroup_parent(&self, pod: &str) -> String {
        format!("{}/{pod}", self.cgroup_root)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn wait_socket(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.socket().exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd exited with {status}:\n{}",
                    self.logs().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd made no socket within {START_TIMEOUT:?}:\n{}",
                    self.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `ctr --address SOCK -n k8s.io ARGS..`: stdout, failing on a non-zero exit.
    fn ctr(&self, command: &[&str], args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io"])
            .args(command)
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Tasks (pods' processes) a failed test left: killed and deleted, with their containers.
    fn remove_tasks(&self) {
        let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"], &[]) else {
            return;
        };
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL"], &[id]);
        }
        for id in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["tasks", "rm", "-f"], &[id]);
        }
        if let Ok(containers) = self.ctr(&["containers", "ls", "-q"], &[]) {
            for id in containers.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["containers", "rm"], &[id]);
            }
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// This containerd's pod cgroup directories in every hierarchy, deepest first.
    fn pod_cgroups(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let mut todo = cgroup_dirs(&self.cgroup_root);
        while let Some(dir) = todo.pop() {
            todo.extend(
                fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
            dirs.push(dir);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        dirs
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.remove_tasks();
        }
        self.stop();
        // Shims outlive containerd (they are reparented): ours name our socket.
        let socket = self.socket().display().to_string();
        for pid in processes_naming(&socket) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Whatever still runs in our pod cgroups was started by our runc.
        let cgroups = self.pod_cgroups();
        for cgroup in &cgroups {
            let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Rootfs overlays, shm and pod netns mounts, deepest first.
        let mut mounts = mounts_under(&self.dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            if let Err(e) = umount2(mount.as_str(), MntFlags::MNT_DETACH) {
                eprintln!("cleanup: umount {mount}: {e}");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: removing {}: {e}", self.dir.display());
        }
        // runc leaves pod-level cgroups behind; a cgroup is removable once its tasks exited.
        for cgroup in cgroups {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = fs::remove_dir(&cgroup) {
                if Instant::now() > deadline {
                    eprintln!("cleanup: removing {}: {e}", cgroup.display());
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The directories of `cgroup` (a path as /proc/PID/cgroup names it) in every hierarchy:
/// none once it is removed.
pub fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    fs::read_dir(CGROUP_FS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join(cgroup.trim_start_matches('/')))
        .filter(|p| p.is_dir())
        .collect()
}

/// The inode of a namespace link as `readlink /proc/PID/ns/net` prints it (`net:[4026532]`).
pub fn netns_inode(link: &str) -> Option<u64> {
    link.trim()
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// containerd with the config in `dir`, in `netns`, its stderr lines collected in `logs`.
fn spawn(dir: &Path, netns: &Netns, logs: &Arc<Mutex<Vec<String>>>) -> anyhow::Result<Child> {
    let mut command = in_netns(Path::new("containerd"), Path::new(&netns.path()))?;
    command
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .context("starting containerd (Debian package containerd; cargo xtask setup)")?;
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = logs.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Ok(child)
}

/// containerd 1.6's config: everything under `dir`, cgroupfs, overlayfs, CNI from Debian's
/// /usr/lib/cni, and the local pause image as the sandbox image.
fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    let pause = image::PAUSE;
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Without CAP_SYS_RESOURCE, raising a score fails every RunPodSandbox.
  restrict_oom_score_adj = true
  # Pod netns mounts under our state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d}/cni/conf"
"#
    )
}

/// A bridge + host-local CNI network for pods in `subnet`, its IPAM state kept in `ipam`.
fn bridge_network(conf_dir: &Path, ipam: &Path, subnet: &str) -> anyhow::Result<()> {
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "node-agent-test",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": ipam,
            },
        }],
    });
    fs::create_dir_all(conf_dir)?;
    let path = conf_dir.join("10-bridge.conflist");
    fs::write(&path, serde_json::to_vec_pretty(&conf)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Mount points at or under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// PIDs whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}
