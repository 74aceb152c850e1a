//! The embedded kubelet's speed goals (issue 5): a pod start through the agent against the
//! raw CRI calls it needs, and many pods started at once. Each part runs on a containerd of its
//! own (the test fixture, in a namespace of its own); the agent is the release binary in
//! kubelet mode, as a node runs it. The pods are the e2e's busybox httpd pod, with no
//! readiness probe: Ready as soon as its container runs.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use node_agent_tests::{
    agent::{Agent, HEALTH_BIND},
    client::http_get,
    containerd::Containerd,
    manifest::{HttpdPod, write, yaml},
};
use serde_json::json;

use super::{
    Progress, Skipped,
    stats::{Spread, spread},
};

const POD_CIDR: &str = "10.88.0.0/24";
const PORT: u16 = 8080;
/// How often `GET /pods` is asked while one pod starts...
const POLL_ONE: Duration = Duration::from_millis(2);
/// ...and while many do: each answer serializes every pod, CPU the pods' start needs too.
const POLL_MANY: Duration = Duration::from_millis(20);
const ONE_TIMEOUT: Duration = Duration::from_secs(60);
const MANY_TIMEOUT: Duration = Duration::from_secs(180);
/// Pod start within this many times the raw CRI calls it needs (median against median).
const GOAL_RATIO: f64 = 1.25;
/// Pods started at once all Ready within this, on the project's 2-core machine.
const GOAL_AT_ONCE_MS: f64 = 15_000.0;

/// The example of the tests crate timing the raw CRI calls (`cargo xtask bench` builds it).
pub const RAW_CRI_EXAMPLE: &str = "kubelet_bench";
/// The modes, as `skipped` names them.
const RAW_CRI: &str = "kubelet raw CRI";
const POD_START: &str = "kubelet pod start";
const AT_ONCE: &str = "kubelet pods at once";

/// What the agent logs at info level as a pod starts, in order.
const MARKS: [&str; 3] = ["pod added", "sandbox running", "container started"];
/// The spans between the manifest write, the `MARKS` and Ready.
const PHASES: [&str; 4] = [
    "written → pod added",
    "pod added → sandbox running",
    "sandbox running → container started",
    "container started → Ready in /pods",
];

pub struct Plan {
    /// Pods started one after another (raw CRI and through the agent).
    pub one_by_one: usize,
    /// Pods in one manifest, started together.
    pub at_once: usize,
}

#[derive(serde::Serialize)]
pub struct Figures {
    pub raw_cri: Option<RawCri>,
    pub pod_start: Option<PodStart>,
    pub pods_at_once: Option<AtOnce>,
}

/// A named step of a pod start and its duration, ms.
#[derive(serde::Serialize, Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub ms: Spread,
}

/// The CRI calls of a pod start, with no agent in between.
#[derive(serde::Serialize, Debug, PartialEq)]
pub struct RawCri {
    pub pods: usize,
    /// Each pod's calls added up, ms.
    pub sum_ms: Spread,
    /// Each call, in the order made.
    pub calls: Vec<Step>,
}

/// Pods started through the agent one after another.
#[derive(serde::Serialize, Debug, PartialEq)]
pub struct PodStart {
    pub pods: usize,
    /// From the manifest written until the pod is Ready in `GET /pods`, ms.
    pub ready_ms: Spread,
    /// Against the raw CRI sum, p50 to p50 and p90 to p90 (None without raw figures).
    pub ratio_p50: Option<f64>,
    pub ratio_p90: Option<f64>,
    pub goal_ratio: f64,
    pub goal_met: Option<bool>,
    /// Where the time went, from the agent's log (None when it lacks a mark).
    pub phases: Option<Vec<Step>>,
}

/// Pods written in one manifest, started together.
#[derive(serde::Serialize, Debug, PartialEq)]
pub struct AtOnce {
    pub pods: usize,
    /// Until the last pod was Ready, ms.
    pub all_ready_ms: f64,
    pub first_ready_ms: f64,
    /// Until each pod was Ready, ms.
    pub ready_ms: Spread,
    pub goal_ms: f64,
    pub goal_met: bool,
    pub phases: Option<Vec<Step>>,
}

/// Measures every kubelet mode; one that cannot run is recorded in `skipped`.
pub fn run(
    agent_binary: &Path,
    plan: &Plan,
    progress: &Progress,
    skipped: &mut Skipped,
) -> Figures {
    progress.say(format_args!(
        "{RAW_CRI} and {POD_START}: {} pods one after another, in turn",
        plan.one_by_one
    ));
    let (raw, started) = one_by_one(agent_binary, plan.one_by_one, progress, skipped);
    let raw_cri = raw.and_then(|pods| {
        raw_figures(&pods)
            .map_err(|e| skipped.kubelet(progress, RAW_CRI, format!("{e:#}")))
            .ok()
    });
    let pod_start = started.map(|s| pod_start_figures(&s.runs, raw_cri.as_ref(), s.phases));
    progress.say(format_args!("{AT_ONCE}: {} pods", plan.at_once));
    let pods_at_once = at_once(agent_binary, plan.at_once)
        .map_err(|e| skipped.kubelet(progress, AT_ONCE, format!("{e:#}")))
        .ok();
    Figures {
        raw_cri,
        pod_start,
        pods_at_once,
    }
}

/// Each pod's CRI calls, in order, and how long each took (ms).
type Calls = Vec<(String, f64)>;

/// Pods started through the agent, and where their time went.
struct AgentStarts {
    runs: Vec<PodRun>,
    phases: Option<Vec<Step>>,
}

/// `pods` pods one after another, on raw CRI and through the agent in turn (who goes first
/// alternates), each on a containerd of its own: a busy moment of the machine hits both
/// alike. A side that fails is recorded in `skipped` and the other goes on.
fn one_by_one(
    agent_binary: &Path,
    pods: usize,
    progress: &Progress,
    skipped: &mut Skipped,
) -> (Option<Vec<Calls>>, Option<AgentStarts>) {
    let mut failed = |mode, e: anyhow::Error| skipped.kubelet(progress, mode, format!("{e:#}"));
    let mut raw = RawCriRun::start(agent_binary)
        .map_err(|e| failed(RAW_CRI, e))
        .ok();
    let mut node = Node::start(agent_binary)
        .map_err(|e| failed(POD_START, e))
        .ok();
    let (mut calls, mut runs) = (Vec::with_capacity(pods), Vec::with_capacity(pods));
    for i in 0..pods {
        let name = format!("bench-{i}");
        for raw_turn in [i % 2 == 0, i % 2 == 1] {
            if raw_turn && let Some(r) = &mut raw {
                match r.start_pod(&name) {
                    Ok(c) => {
                        let sum: f64 = c.iter().map(|(_, ms)| ms).sum();
                        progress.say(format_args!("{RAW_CRI}: {name} in {sum:.1} ms of calls"));
                        calls.push(c);
                    }
                    Err(e) => {
                        failed(RAW_CRI, e);
                        raw = None;
                    }
                }
            } else if !raw_turn && let Some(n) = &node {
                match n.start_one(&name) {
                    Ok(run) => {
                        progress.say(format_args!(
                            "{POD_START}: {name} Ready after {:.1} ms",
                            run.ready_ms()
                        ));
                        runs.push(run);
                    }
                    Err(e) => {
                        failed(POD_START, e);
                        node = None;
                    }
                }
            }
        }
    }
    let started = node.map(|n| AgentStarts {
        phases: n.phases(&runs),
        runs,
    });
    (raw.map(|_| calls), started)
}

/// The `RAW_CRI_EXAMPLE` of the tests crate, built next to the agent (in release, as the agent
/// is): it links node-agent's CRI client, which xtask must not. Dropped, it ends its stdin and
/// waits while the example's fixture removes its pods.
struct RawCriRun {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl RawCriRun {
    fn start(agent_binary: &Path) -> anyhow::Result<Self> {
        let example = agent_binary
            .with_file_name("examples")
            .join(RAW_CRI_EXAMPLE);
        let mut child = Command::new(&example)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", example.display()))?;
        let mut run = Self {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().context("piped stdout")?),
            child,
        };
        let first = run.line()?;
        if first != "ready" {
            bail!("{RAW_CRI_EXAMPLE} said {first:?}, not \"ready\"");
        }
        Ok(run)
    }

    /// Starts pod `name`: its CRI calls and their times.
    fn start_pod(&mut self, name: &str) -> anyhow::Result<Calls> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{name}")?;
        stdin.flush()?;
        let line = self.line()?;
        serde_json::from_str(&line).with_context(|| format!("{RAW_CRI_EXAMPLE} printed {line:?}"))
    }

    /// The example's next line; its end (it failed, saying why on stderr) is an error.
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("{RAW_CRI_EXAMPLE} ended ({status}): see its error above");
        }
        Ok(line.trim_end().to_owned())
    }
}

impl Drop for RawCriRun {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Err(e) = self.child.wait() {
            eprintln!("cleanup: waiting for {RAW_CRI_EXAMPLE}: {e}");
        }
    }
}

/// The raw CRI calls of each pod start, summed up.
fn raw_figures(pods: &[Calls]) -> anyhow::Result<RawCri> {
    let Some(first) = pods.first() else {
        bail!("no pods were started");
    };
    let order: Vec<&str> = first.iter().map(|(call, _)| call.as_str()).collect();
    if let Some(other) = pods.iter().find(|calls| {
        let names: Vec<&str> = calls.iter().map(|(call, _)| call.as_str()).collect();
        names != order
    }) {
        bail!("pods made different calls: {order:?} and {other:?}");
    }
    let sums: Vec<f64> = pods
        .iter()
        .map(|c| c.iter().map(|(_, ms)| ms).sum())
        .collect();
    let calls = order
        .iter()
        .enumerate()
        .map(|(i, name)| Step {
            name: (*name).to_owned(),
            ms: spread(&pods.iter().map(|c| c[i].1).collect::<Vec<_>>()),
        })
        .collect();
    Ok(RawCri {
        pods: pods.len(),
        sum_ms: spread(&sums),
        calls,
    })
}

/// One pod's start: when its manifest was written and when it was first seen Ready, as unix
/// seconds (the agent's log has wall-clock times).
#[derive(Clone, Debug, PartialEq)]
struct PodRun {
    name: String,
    written: f64,
    ready: f64,
}

impl PodRun {
    fn ready_ms(&self) -> f64 {
        (self.ready - self.written) * 1e3
    }
}

fn pod_start_figures(runs: &[PodRun], raw: Option<&RawCri>, phases: Option<Vec<Step>>) -> PodStart {
    let ready_ms = spread(&runs.iter().map(PodRun::ready_ms).collect::<Vec<_>>());
    let ratio_p50 = raw.map(|r| ready_ms.p50 / r.sum_ms.p50);
    PodStart {
        pods: runs.len(),
        ready_ms,
        ratio_p50,
        ratio_p90: raw.map(|r| ready_ms.p90 / r.sum_ms.p90),
        goal_ratio: GOAL_RATIO,
        goal_met: ratio_p50.map(|r| r <= GOAL_RATIO),
        phases,
    }
}

/// `pods` pods written in one `kind: List` manifest, until every one is Ready.
fn at_once(agent_binary: &Path, pods: usize) -> anyhow::Result<AtOnce> {
    let node = Node::start(agent_binary)?;
    let names: Vec<String> = (0..pods).map(|i| format!("burst-{i}")).collect();
    let items = names
        .iter()
        .map(|name| {
            let pod = HttpdPod {
                name,
                port: PORT,
                ..Default::default()
            }
            .pod();
            serde_json::to_value(pod)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let list = yaml(json!({"apiVersion": "v1", "kind": "List", "items": items}));
    let runs = node.write_and_wait("burst.yaml", list, names, POLL_MANY, MANY_TIMEOUT)?;
    let phases = node.phases(&runs);
    Ok(at_once_figures(&runs, phases))
}

fn at_once_figures(runs: &[PodRun], phases: Option<Vec<Step>>) -> AtOnce {
    let ready: Vec<f64> = runs.iter().map(PodRun::ready_ms).collect();
    let all_ready_ms = ready.iter().copied().fold(0.0, f64::max);
    AtOnce {
        pods: runs.len(),
        all_ready_ms,
        first_ready_ms: ready.iter().copied().fold(f64::INFINITY, f64::min),
        ready_ms: spread(&ready),
        goal_ms: GOAL_AT_ONCE_MS,
        goal_met: all_ready_ms < GOAL_AT_ONCE_MS,
        phases,
    }
}

/// A fresh containerd and the agent in kubelet mode on it, with an empty manifest directory.
/// Fields drop in order: the agent stops, then containerd removes the pods.
struct Node {
    agent: Agent,
    manifests: tempfile::TempDir,
    containerd: Containerd,
}

impl Node {
    fn start(agent_binary: &Path) -> anyhow::Result<Self> {
        let containerd = Containerd::start_without_network()?;
        let manifests = tempfile::tempdir()?;
        let agent = Agent::start_node(agent_binary, &containerd, manifests.path(), POD_CIDR, &[])?;
        Ok(Self {
            agent,
            manifests,
            containerd,
        })
    }

    /// Writes pod `name`'s manifest and waits until it is Ready.
    fn start_one(&self, name: &str) -> anyhow::Result<PodRun> {
        let text = HttpdPod {
            name,
            port: PORT,
            ..Default::default()
        }
        .yaml();
        let file = format!("{name}.yaml");
        let mut runs =
            self.write_and_wait(&file, text, vec![name.into()], POLL_ONE, ONE_TIMEOUT)?;
        Ok(runs.remove(0))
    }

    /// Writes manifest `file`, then polls `GET /pods` every `poll` (from inside the agent's
    /// namespace) until every pod of `names` was Ready once.
    fn write_and_wait(
        &self,
        file: &str,
        text: String,
        names: Vec<String>,
        poll: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Vec<PodRun>> {
        let (dir, file): (PathBuf, String) = (self.manifests.path().into(), file.into());
        self.containerd.netns().run(move || {
            let health = HEALTH_BIND.parse().expect("an address");
            write(&dir, &file, &text)?;
            let (start, written) = (Instant::now(), unix_now());
            let mut ready: BTreeMap<String, f64> = BTreeMap::new();
            loop {
                // Refused or unparsable answers are polled again until the timeout.
                if let Ok((200, body)) = http_get(health, "/pods")
                    && let Ok(now_ready) = ready_pods(&body)
                {
                    let at = written + start.elapsed().as_secs_f64();
                    for name in now_ready.into_iter().filter(|n| names.contains(n)) {
                        ready.entry(name).or_insert(at);
                    }
                }
                if ready.len() == names.len() {
                    break;
                }
                if start.elapsed() > timeout {
                    let waiting: Vec<&String> =
                        names.iter().filter(|n| !ready.contains_key(*n)).collect();
                    bail!("pods {waiting:?} not Ready within {timeout:?} of {file} written");
                }
                thread::sleep(poll);
            }
            Ok(names
                .into_iter()
                .map(|name| PodRun {
                    ready: ready[&name],
                    name,
                    written,
                })
                .collect())
        })?
    }

    /// Where the pods' start went, from the agent's log; None (and why, on stderr) when a
    /// pod lacks a mark.
    fn phases(&self, runs: &[PodRun]) -> Option<Vec<Step>> {
        phases(&self.agent.logs(), runs)
            .inspect_err(|e| eprintln!("bench: no breakdown of the pod start: {e}"))
            .ok()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The names of the Ready pods in a `GET /pods` answer (a JSON array of v1 Pods). Only the
/// fields read are parsed: polled every 2 ms, the poll takes little of the CPU pods start on.
fn ready_pods(body: &str) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Pod {
        metadata: Metadata,
        status: Option<Status>,
    }
    #[derive(serde::Deserialize)]
    struct Metadata {
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Status {
        conditions: Option<Vec<Condition>>,
    }
    #[derive(serde::Deserialize)]
    struct Condition {
        #[serde(rename = "type")]
        type_: String,
        status: String,
    }
    let pods: Vec<Pod> = serde_json::from_str(body)?;
    Ok(pods
        .into_iter()
        .filter(|pod| {
            let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .map(|pod| pod.metadata.name)
        .collect())
}

/// Each `PHASES` span across `runs`, from the first log line of each `MARKS` naming the pod.
fn phases(logs: &[String], runs: &[PodRun]) -> Result<Vec<Step>, String> {
    let mut spans: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    for run in runs {
        let field = format!("pod=default/{}", run.name);
        let mut times = vec![run.written];
        for mark in MARKS {
            let line = logs
                .iter()
                .find(|l| l.contains(mark) && l.split_whitespace().any(|w| w == field))
                .ok_or_else(|| format!("no {mark:?} logged for {}", run.name))?;
            times.push(log_time(line).ok_or_else(|| format!("no time in {line:?}"))?);
        }
        times.push(run.ready);
        for (span, pair) in spans.iter_mut().zip(times.windows(2)) {
            span.push((pair[1] - pair[0]) * 1e3);
        }
    }
    Ok(PHASES
        .iter()
        .zip(spans)
        .map(|(name, ms)| Step {
            name: (*name).to_owned(),
            ms: spread(&ms),
        })
        .collect())
}

/// The time a log line starts with (`2025-11-23T15:04:00.123456Z`, UTC), as unix seconds.
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|n| n.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.splitn(3, ':');
    let (h, min) = (
        hms.next()?.parse::<f64>().ok()?,
        hms.next()?.parse::<f64>().ok()?,
    );
    let s: f64 = hms.next()?.parse().ok()?;
    Some(days_from_civil(y, m, d) as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The kubelet part of the summary table.
pub fn table(f: &Figures) -> String {
    let mut lines = vec![format!(
        "{:<44} {:>5} {:>9} {:>9}",
        "kubelet", "pods", "p50 ms", "p90 ms"
    )];
    let row = |what: &str, pods: Option<usize>, ms: &Spread, note: String| {
        let pods = pods.map_or(String::new(), |p| p.to_string());
        format!("{what:<44} {pods:>5} {:>9.1} {:>9.1}{note}", ms.p50, ms.p90)
    };
    let steps = |lines: &mut Vec<String>, steps: &[Step]| {
        for step in steps {
            lines.push(row(
                &format!("  {}", step.name),
                None,
                &step.ms,
                String::new(),
            ));
        }
    };
    match &f.raw_cri {
        Some(raw) => {
            lines.push(row(
                "raw CRI calls of a pod start (sum)",
                Some(raw.pods),
                &raw.sum_ms,
                String::new(),
            ));
            steps(&mut lines, &raw.calls);
        }
        None => lines.push("raw CRI calls of a pod start: skipped".into()),
    }
    match &f.pod_start {
        Some(p) => {
            let note = match (p.ratio_p50, p.ratio_p90, p.goal_met) {
                (Some(r50), Some(r90), Some(met)) => format!(
                    "   {r50:.2}× / {r90:.2}× raw (goal ≤ {}×: {})",
                    p.goal_ratio,
                    verdict(met)
                ),
                _ => String::new(),
            };
            lines.push(row(
                "node-agent: manifest written → pod Ready",
                Some(p.pods),
                &p.ready_ms,
                note,
            ));
            steps(&mut lines, p.phases.as_deref().unwrap_or_default());
        }
        None => lines.push("node-agent pod start: skipped".into()),
    }
    match &f.pods_at_once {
        Some(a) => {
            lines.push(format!(
                "{:<44} {:>5} {:>9.1} {:>9}   (goal < {:.0} ms: {})",
                "node-agent: pods at once → all Ready",
                a.pods,
                a.all_ready_ms,
                "",
                a.goal_ms,
                verdict(a.goal_met)
            ));
            lines.push(row(
                "  written → each pod Ready",
                None,
                &a.ready_ms,
                format!("   (first {:.1} ms)", a.first_ready_ms),
            ));
            steps(&mut lines, a.phases.as_deref().unwrap_or_default());
        }
        None => lines.push("node-agent pods at once: skipped".into()),
    }
    lines.join("\n")
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, written: f64, ready: f64) -> PodRun {
        PodRun {
            name: name.into(),
            written,
            ready,
        }
    }

    fn calls(pairs: &[(&str, f64)]) -> Calls {
        pairs.iter().map(|&(c, ms)| (c.to_owned(), ms)).collect()
    }

    #[test]
    fn raw_figures_sum_each_pod_and_keep_the_call_order() {
        let pods = [
            [
                ("ImageStatus", 1.0),
                ("RunPodSandbox", 100.0),
                ("StartContainer", 20.0),
            ],
            [
                ("ImageStatus", 3.0),
                ("RunPodSandbox", 80.0),
                ("StartContainer", 40.0),
            ],
            [
                ("ImageStatus", 2.0),
                ("RunPodSandbox", 90.0),
                ("StartContainer", 30.0),
            ],
        ]
        .map(|p| calls(&p));
        let raw = raw_figures(&pods).unwrap();
        assert_eq!(raw.pods, 3);
        assert_eq!((raw.sum_ms.p50, raw.sum_ms.p90), (122.0, 122.0));
        let got: Vec<(&str, f64)> = raw.calls.iter().map(|s| (&*s.name, s.ms.p50)).collect();
        assert_eq!(
            got,
            [
                ("ImageStatus", 2.0),
                ("RunPodSandbox", 90.0),
                ("StartContainer", 30.0)
            ]
        );
    }

    #[test]
    fn raw_figures_refuse_no_pods_and_pods_making_other_calls() {
        let other = [
            calls(&[("ImageStatus", 1.0)]),
            calls(&[("RunPodSandbox", 1.0)]),
        ];
        for (pods, want) in [(&[][..], "no pods"), (&other[..], "different calls")] {
            let e = raw_figures(pods).unwrap_err().to_string();
            assert!(e.contains(want), "{pods:?}: {e}");
        }
    }

    #[test]
    fn ready_pods_are_those_with_a_true_ready_condition() {
        let body = json!([
            {"metadata": {"name": "a"}, "status": {"conditions": [
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "b"}, "status": {"conditions": [
                {"type": "Ready", "status": "False"}]}},
            {"metadata": {"name": "c"}, "status": {"phase": "Pending"}},
            {"metadata": {"name": "d"}},
            {"metadata": {"name": "e"}, "status": {"conditions": null}},
        ]);
        assert_eq!(ready_pods(&body.to_string()).unwrap(), ["a"]);
        assert!(ready_pods("not json").is_err());
    }

    #[test]
    fn log_times_are_unix_seconds() {
        for (line, want) in [
            ("1970-01-01T00:00:00Z  INFO x: y", Some(0.0)),
            ("2000-03-01T00:00:00Z  INFO", Some(951_868_800.0)),
            (
                "2025-11-23T15:04:00.250000Z  INFO node_agent: pod added pod=default/a",
                Some(1_763_910_240.25),
            ),
            ("2024-02-29T23:59:59.5Z", Some(1_709_251_199.5)),
            ("not a time", None),
            ("2025-11-23T15:04:00", None),
        ] {
            assert_eq!(log_time(line), want, "{line}");
        }
    }

    #[test]
    fn phases_span_the_log_marks_of_each_pod() {
        let t0 = 1_763_910_240.0;
        let logs: Vec<String> = [
            "2025-11-23T15:04:00.002000Z  INFO node_agent::kubelet: pod added pod=default/a-1 uid=u",
            "2025-11-23T15:04:00.004000Z  INFO node_agent::kubelet: pod added pod=default/a uid=u",
            "2025-11-23T15:04:00.104000Z  INFO node_agent::kubelet::worker: sandbox running pod=default/a sandbox=s",
            "2025-11-23T15:04:00.144000Z  INFO node_agent::kubelet::worker: container started pod=default/a container=httpd attempt=0",
            "2025-11-23T15:04:00.150000Z  INFO node_agent::kubelet::worker: container started pod=default/a container=httpd attempt=1",
        ]
        .map(String::from)
        .into();
        let steps = phases(&logs, &[run("a", t0, t0 + 0.154)]).unwrap();
        let got: Vec<(&str, i64)> = steps
            .iter()
            .map(|s| (&*s.name, (s.ms.p50 * 10.0).round() as i64))
            .collect();
        assert_eq!(
            got,
            [
                ("written → pod added", 40),
                ("pod added → sandbox running", 1000),
                ("sandbox running → container started", 400),
                ("container started → Ready in /pods", 100),
            ]
        );
        let missing = phases(&logs, &[run("a-1", t0, t0 + 1.0)]).unwrap_err();
        assert!(
            missing.contains("sandbox running") && missing.contains("a-1"),
            "{missing}"
        );
    }

    #[test]
    fn pod_start_is_compared_with_the_raw_sum() {
        let runs: Vec<PodRun> = [0.12, 0.1, 0.2]
            .iter()
            .enumerate()
            .map(|(i, s)| run(&format!("p{i}"), 10.0, 10.0 + s))
            .collect();
        let s = |p50, p90| Spread {
            p50,
            p90,
            samples: 3,
        };
        let raw = RawCri {
            pods: 3,
            sum_ms: s(100.0, 160.0),
            calls: Vec::new(),
        };
        let p = pod_start_figures(&runs, Some(&raw), None);
        assert_eq!(p.pods, 3);
        assert!((p.ready_ms.p50 - 120.0).abs() < 1e-6, "{:?}", p.ready_ms);
        assert!((p.ratio_p50.unwrap() - 1.2).abs() < 1e-6);
        assert!((p.ratio_p90.unwrap() - 0.75).abs() < 1e-6);
        assert_eq!(p.goal_met, Some(true));
        let alone = pod_start_figures(&runs, None, None);
        assert_eq!((alone.ratio_p50, alone.goal_met), (None, None));
    }

    #[test]
    fn at_once_is_until_the_last_pod_is_ready() {
        let runs = [run("a", 5.0, 9.0), run("b", 5.0, 21.0), run("c", 5.0, 6.5)];
        let a = at_once_figures(&runs, None);
        assert_eq!(a.pods, 3);
        assert_eq!((a.first_ready_ms, a.all_ready_ms), (1500.0, 16_000.0));
        assert_eq!(a.ready_ms.p50, 4000.0);
        assert!(!a.goal_met);
    }

    #[test]
    fn the_table_shows_each_mode_or_that_it_was_skipped() {
        let s = |p50: f64| Spread {
            p50,
            p90: p50 + 1.0,
            samples: 2,
        };
        let step = |name: &str, ms| Step {
            name: name.into(),
            ms: s(ms),
        };
        let figures = Figures {
            raw_cri: Some(RawCri {
                pods: 2,
                sum_ms: s(100.0),
                calls: vec![step("RunPodSandbox", 70.0), step("StartContainer", 30.0)],
            }),
            pod_start: Some(PodStart {
                pods: 2,
                ready_ms: s(130.0),
                ratio_p50: Some(1.3),
                ratio_p90: Some(1.297),
                goal_ratio: GOAL_RATIO,
                goal_met: Some(false),
                phases: Some(vec![step("pod added → sandbox running", 90.0)]),
            }),
            pods_at_once: None,
        };
        let table = table(&figures);
        for want in [
            "raw CRI calls of a pod start (sum)",
            "  RunPodSandbox",
            "70.0",
            "71.0",
            "130.0",
            "1.30× / 1.30× raw (goal ≤ 1.25×: MISSED)",
            "  pod added → sandbox running",
            "node-agent pods at once: skipped",
        ] {
            assert!(table.contains(want), "{want} missing from\n{table}");
        }
        assert_eq!(table.lines().count(), 7, "{table}");
    }
}
