//! A network namespace that exists as long as its guard.
use std::{fs::File, os::fd::AsFd as _, path::Path, process::Command, thread};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = crate::unique(tag);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread inside the namespace. Sockets it creates stay in the namespace
    /// wherever they are used afterwards.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        run_in(Path::new(&self.path()), f)
    }

    /// Runs a command inside the namespace (`ip netns exec`), failing on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veths inside it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Runs `f` on a thread inside the namespace at `path` (a /run/netns file), as `Netns::run`.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    thread::spawn(move || setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map(|()| f()))
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", path.display()))?
        .with_context(|| format!("entering netns {}", path.display()))
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
