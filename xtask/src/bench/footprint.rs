//! What node-agent costs besides packets: its memory, its maps' kernel memory and how long its
//! own first sync took (read from its log).
use std::{collections::BTreeMap, fs, path::Path};

use anyhow::Context as _;

use super::bpf::PinnedMap;

/// Resident memory now and at its peak, from /proc/PID/status.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Rss {
    pub vm_rss_kb: u64,
    pub vm_hwm_kb: u64,
}

pub fn rss(pid: u32) -> anyhow::Result<Rss> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path)?;
    let field = |name| status_kb(&status, name).with_context(|| format!("no {name} in {path}"));
    Ok(Rss {
        vm_rss_kb: field("VmRSS")?,
        vm_hwm_kb: field("VmHWM")?,
    })
}

fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// The kernel memory (memlock) of every map pinned under `pin_dir`, by pin name.
pub fn map_memory(pin_dir: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))? {
        let entry = entry?;
        let memlock = PinnedMap::open(&entry.path())?.memlock()?;
        maps.insert(entry.file_name().to_string_lossy().into_owned(), memlock);
    }
    Ok(maps)
}

/// `elapsed_us` of the agent's first "synced" log line.
pub fn logged_sync_us(logs: &[String]) -> Option<u64> {
    logs.iter().filter(|l| l.contains(" synced")).find_map(|l| {
        l.split_once("elapsed_us=")?
            .1
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_in_kb() {
        let status = "Name:\tnode-agent\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t    6789 kB\nThreads:\t3\n";
        for (field, want) in [
            ("VmRSS", Some(6789)),
            ("VmHWM", Some(12345)),
            ("Threads", None),
            ("VmSwap", None),
        ] {
            assert_eq!(status_kb(status, field), want, "{field}");
        }
    }

    #[test]
    fn first_synced_line() {
        let logs = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        for (lines, want) in [
            (
                logs(&[
                    "2026-11-23T12:00:00Z  INFO node_agent::agent: datapath attached",
                    "2026-11-23T12:00:01Z  INFO node_agent::agent: synced services=2 writes=9 elapsed_us=1234",
                    "2026-11-23T12:00:02Z  INFO node_agent::agent: synced services=2 writes=1 elapsed_us=7",
                ]),
                Some(1234),
            ),
            (logs(&["INFO node_agent::agent: node name=n"]), None),
        ] {
            assert_eq!(logged_sync_us(&lines), want);
        }
    }
}
