//! Pod cgroups: where a pod's sandbox and containers go, and removing what runc leaves behind
//! (the pod-level directories) once the pod is gone.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use tracing::warn;

/// How long a cgroup may stay busy (its last tasks exiting) before removal gives up.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup parent of a pod's sandbox and containers, the kubelet's cgroupfs layout.
pub fn pod_parent(cgroup_root: &str, uid: &str) -> String {
    format!("{}/pod{uid}", cgroup_root.trim_end_matches('/'))
}

/// Removes the pod's cgroup directories in every mounted hierarchy, deepest first.
pub fn remove_pod(cgroup_root: &str, uid: &str) {
    let parent = pod_parent(cgroup_root, uid);
    for hierarchy in hierarchies() {
        let top = hierarchy.join(parent.trim_start_matches('/'));
        for dir in deepest_first(&top) {
            let deadline = Instant::now() + REMOVE_TIMEOUT;
            while let Err(e) = fs::remove_dir(&dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    warn!("removing cgroup {}: {e}", dir.display());
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The mount points of cgroup (v1) and cgroup2 filesystems.
fn hierarchies() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&mountinfo, &["cgroup", "cgroup2"])
}

/// Mount points in `mountinfo` (proc(5) format) of filesystems of `types`.
fn mount_points(mountinfo: &str, types: &[&str]) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(separator + 1)?;
            let point = fields.get(4)?;
            types.contains(fstype).then(|| PathBuf::from(point))
        })
        .collect()
}

fn deepest_first(top: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut todo = vec![top.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        todo.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
        dirs.push(dir);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup_mounts_of_both_versions() {
        let mountinfo = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw
26 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
27 25 0:25 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw
28 1 0:26 / /sys/fs/bpf rw - bpf bpf rw";
        assert_eq!(
            mount_points(mountinfo, &["cgroup", "cgroup2"]),
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    #[test]
    fn pod_parent_is_under_the_root() {
        assert_eq!(pod_parent("/kubepods/", "u1"), "/kubepods/podu1");
        assert_eq!(pod_parent("/kubepods", "u1"), "/kubepods/podu1");
    }

    #[test]
    fn removes_nested_directories_deepest_first() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("podu1");
        fs::create_dir_all(top.join("a/b")).unwrap();
        fs::create_dir_all(top.join("c")).unwrap();
        let order = deepest_first(&top);
        assert_eq!(order.first().unwrap(), &top.join("a/b"));
        assert_eq!(order.last().unwrap(), &top);
        for d in order {
            fs::remove_dir(d).unwrap();
        }
        assert!(!top.exists());
    }
}
