//! The real `node-agent` binary, started inside a namespace as a user would start it, and
//! stopped (SIGTERM, then SIGKILL) by its PID when the guard drops.
use std::{
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

use crate::{client::http_get, netns::Netns};

const HEALTH_BIND: &str = "127.0.0.1:10256";
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Agent {
    child: Child,
    /// From spawning the process until /healthz first answered 200.
    synced_after: Duration,
    logs: Arc<Mutex<Vec<String>>>,
    bpffs: PathBuf,
    binary: PathBuf,
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
        let bpffs = Path::new("/sys/fs/bpf").join(crate::unique("pins"));
        let netns = File::open(node.path())?;
        let mut command = in_netns(binary, &netns);
        command
            .args(["run", "--manifests"])
            .arg(manifests)
            .args([
                "--devices",
                &devices.join(","),
                "--health-bind",
                HEALTH_BIND,
                "--bpffs",
            ])
            .arg(&bpffs)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command.spawn().context("starting node-agent")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[node-agent] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut agent = Self {
            child,
            synced_after: Duration::ZERO,
            logs,
            bpffs,
            binary: binary.to_owned(),
        };
        agent.wait_healthy(node)?;
        agent.synced_after = spawned.elapsed();
        Ok(agent)
    }

    fn wait_healthy(&mut self, node: &Netns) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "node-agent exited with {status} before it was healthy:\n{}",
                    self.logs().join("\n")
                );
            }
            let healthz = || http_get(HEALTH_BIND.parse().expect("an address"), "/healthz");
            if node.run(healthz)?.is_ok_and(|(code, _)| code == 200) {
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
        // Pins a killed agent left behind.
        if let Ok(entries) = fs::read_dir(&self.bpffs) {
            entries
                .flatten()
                .for_each(|e| drop(fs::remove_file(e.path())));
            let _ = fs::remove_dir(&self.bpffs);
        }
    }
}

/// `BINARY ARGS` run to its end inside `node`, as a user would run a one-shot command there.
pub fn run_to_exit(binary: &Path, node: &Netns, args: &[&str]) -> anyhow::Result<Output> {
    let netns = File::open(node.path())?;
    Ok(in_netns(binary, &netns)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?)
}

/// A command that runs `binary` inside the network namespace `netns` (an open /run/netns file
/// that must outlive the spawn).
pub(crate) fn in_netns(binary: &Path, netns: &File) -> Command {
    let mut command = Command::new(binary);
    command.stdin(Stdio::null());
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; it moves only the child into the node namespace
    // (not `ip netns exec`, which would hide bpffs behind a fresh /sys).
    unsafe {
        command.pre_exec(move || {
            if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}
