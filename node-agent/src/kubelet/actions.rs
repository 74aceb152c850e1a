//! What a pod worker does next (the kubelet's computePodActions), decided from the pod's spec,
//! what the runtime holds and the restart backoff: which init container runs, which containers
//! start or are killed, and which wait out a CrashLoopBackOff.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod};

use super::backoff::Backoff;

/// The newest runtime container for one of the pod's containers.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// CRI container id.
    pub id: String,
    /// CRI attempt: the container's restart count.
    pub attempt: u32,
    /// `spec::container_hash` of the spec it was created from.
    pub hash: String,
    pub image_ref: String,
    pub state: RunState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    Created,
    Running { started: Timestamp },
    Exited(Exit),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    pub code: i32,
    /// The runtime's reason (`Completed`, `Error`, `OOMKilled`).
    pub reason: String,
    pub message: String,
    pub started: Option<Timestamp>,
    pub finished: Timestamp,
}

impl Run {
    pub fn running(&self) -> bool {
        matches!(self.state, RunState::Running { .. })
    }

    pub fn exit(&self) -> Option<&Exit> {
        match &self.state {
            RunState::Exited(exit) => Some(exit),
            _ => None,
        }
    }
}

/// Why a container shows Waiting instead of starting now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// Init or app container, and its index in the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Init(usize),
    App(usize),
}

impl Slot {
    pub fn container(self, pod: &Pod) -> &Container {
        let spec = pod.spec.as_ref().expect("validated pods have a spec");
        match self {
            Slot::Init(i) => &spec.init_containers.as_ref().expect("an init container")[i],
            Slot::App(i) => &spec.containers[i],
        }
    }
}

/// What to do now.
#[derive(Debug, Default, PartialEq)]
pub struct Actions {
    /// Running containers to stop, with why (a failed liveness probe, a changed spec).
    pub kill: Vec<(String, String)>,
    /// Containers to create and start, in this order.
    pub start: Vec<Slot>,
    /// Containers held back by their restart backoff.
    pub waiting: BTreeMap<String, Waiting>,
    /// When a backoff ends and the worker should decide again.
    pub wake_after: Option<Duration>,
    /// An init container failed under restartPolicy Never: the pod has failed for good.
    pub init_failed: bool,
}

/// Now, on both clocks: CRI reports wall-clock times, the backoff counts in `Instant`s.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub wall: Timestamp,
    pub instant: Instant,
}

impl Now {
    pub fn get() -> Self {
        Self {
            wall: Timestamp::now(),
            instant: Instant::now(),
        }
    }

    /// `at` on the monotonic clock (never later than now).
    pub fn instant_of(&self, at: Timestamp) -> Instant {
        let ago = self.wall.duration_since(at).unsigned_abs();
        self.instant.checked_sub(ago).unwrap_or(self.instant)
    }
}

/// The pod's restart policy: `Always` unless the spec says otherwise.
pub fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether a container that exited with `code` is started again under `policy`.
fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// Decides the next step for `pod` given its containers' newest `runs` (by name), the
/// containers whose startup or liveness probe failed (`unhealthy`, by name), their `hashes`
/// (by name, of the spec as it is now), the restart `backoff` (keyed by container name; a
/// restart that goes ahead is recorded in it) and `now`.
pub fn decide(
    pod: &Pod,
    runs: &BTreeMap<String, Run>,
    unhealthy: &BTreeSet<String>,
    hashes: &BTreeMap<String, String>,
    backoff: &mut Backoff,
    now: Now,
) -> Actions {
    let mut actions = Actions::default();
    let Some(spec) = pod.spec.as_ref() else {
        return actions;
    };
    let policy = restart_policy(pod);
    // Init containers run one at a time, in order, each to success.
    for (i, init) in spec.init_containers.iter().flatten().enumerate() {
        match runs.get(&init.name) {
            None => {
                actions.start.push(Slot::Init(i));
                return actions;
            }
            Some(run) => match &run.state {
                RunState::Created => {
                    actions.start.push(Slot::Init(i));
                    return actions;
                }
                RunState::Running { .. } => return actions,
                RunState::Exited(exit) if exit.code == 0 => {}
                RunState::Exited(exit) => {
                    if policy == "Never" {
                        actions.init_failed = true;
                    } else {
                        restart(&mut actions, &init.name, Slot::Init(i), exit, backoff, now);
                    }
                    return actions;
                }
            },
        }
    }
    for (i, container) in spec.containers.iter().enumerate() {
        let name = &container.name;
        let Some(run) = runs.get(name) else {
            actions.start.push(Slot::App(i));
            continue;
        };
        match &run.state {
            RunState::Created => actions.start.push(Slot::App(i)),
            RunState::Running { .. } => {
                if unhealthy.contains(name) {
                    actions
                        .kill
                        .push((name.clone(), "failed probe, will be restarted".into()));
                } else if hashes.get(name).is_some_and(|h| *h != run.hash) {
                    actions.kill.push((
                        name.clone(),
                        "container spec changed, will be restarted".into(),
                    ));
                }
            }
            RunState::Exited(exit) if restarts(policy, exit.code) => {
                restart(&mut actions, name, Slot::App(i), exit, backoff, now)
            }
            RunState::Exited(_) => {}
        }
    }
    actions
}

/// Restarts an exited container now, unless its backoff since the exit still runs: then it
/// waits in CrashLoopBackOff and the worker is woken when the backoff ends.
fn restart(
    actions: &mut Actions,
    name: &str,
    slot: Slot,
    exit: &Exit,
    backoff: &mut Backoff,
    now: Now,
) {
    let finished = now.instant_of(exit.finished);
    if let Some(remaining) = backoff.in_backoff_since(name, finished, now.instant) {
        let delay = backoff.delay(name).unwrap_or(remaining);
        actions.waiting.insert(
            name.to_owned(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {} restarting failed container={name}",
                    humanize(delay)
                ),
            },
        );
        actions.wake_after = Some(actions.wake_after.map_or(remaining, |w| w.min(remaining)));
    } else {
        backoff.next(name, finished, now.instant);
        actions.start.push(slot);
    }
}

/// `10s`, `1m20s`, `5m0s`: Go's duration format, as kubelet messages show it.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "
metadata: {name: web, namespace: default}
spec:
  restartPolicy: RESTART
  initContainers:
  - {name: setup, image: busybox}
  containers:
  - {name: a, image: busybox}
  - {name: b, image: busybox}
";

    fn pod(policy: &str) -> Pod {
        serde_yaml::from_str(&POD.replace("RESTART", policy)).unwrap()
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn run(attempt: u32, state: RunState) -> Run {
        Run {
            id: format!("c{attempt}"),
            attempt,
            hash: "h".into(),
            image_ref: String::new(),
            state,
        }
    }

    fn running() -> RunState {
        RunState::Running { started: at(0) }
    }

    fn exited(code: i32, finished: i64) -> RunState {
        RunState::Exited(Exit {
            code,
            reason: String::new(),
            message: String::new(),
            started: Some(at(0)),
            finished: at(finished),
        })
    }

    struct Node {
        backoff: Backoff,
        base: Instant,
    }

    impl Node {
        fn new() -> Self {
            Self {
                backoff: Backoff::crash_loop(),
                base: Instant::now(),
            }
        }

        /// Decides at second `now` (wall and monotonic clocks agree).
        fn decide(
            &mut self,
            pod: &Pod,
            runs: &[(&str, Run)],
            unhealthy: &[&str],
            now: i64,
        ) -> Actions {
            let runs = runs
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect();
            let unhealthy = unhealthy.iter().map(|n| n.to_string()).collect();
            let hashes = ["setup", "a", "b"]
                .iter()
                .map(|n| (n.to_string(), "h".to_string()))
                .collect();
            let now = Now {
                wall: at(now),
                instant: self.base + Duration::from_secs(now as u64 + 1000),
            };
            decide(pod, &runs, &unhealthy, &hashes, &mut self.backoff, now)
        }
    }

    #[test]
    fn init_containers_run_one_at_a_time_before_the_app() {
        let mut node = Node::new();
        let p = pod("Always");
        assert_eq!(node.decide(&p, &[], &[], 0).start, [Slot::Init(0)]);
        let a = node.decide(&p, &[("setup", run(0, running()))], &[], 1);
        assert!(a.start.is_empty() && a.kill.is_empty());
        let a = node.decide(&p, &[("setup", run(0, exited(0, 2)))], &[], 3);
        assert_eq!(a.start, [Slot::App(0), Slot::App(1)]);
    }

    #[test]
    fn failed_init_container_restarts_with_backoff_or_fails_the_pod() {
        let mut node = Node::new();
        let p = pod("Always");
        // First failure: restarted at once; the second within 10 s of the exit waits.
        let a = node.decide(&p, &[("setup", run(0, exited(1, 5)))], &[], 5);
        assert_eq!(a.start, [Slot::Init(0)]);
        let a = node.decide(&p, &[("setup", run(1, exited(1, 6)))], &[], 7);
        assert!(a.start.is_empty());
        assert_eq!(a.waiting["setup"].reason, "CrashLoopBackOff");
        assert_eq!(a.wake_after, Some(Duration::from_secs(9)));

        let a = Node::new().decide(&pod("Never"), &[("setup", run(0, exited(1, 5)))], &[], 5);
        assert!(a.init_failed);
        assert!(a.start.is_empty());
    }

    #[test]
    fn crash_loop_backoff_doubles_then_resets_after_ten_minutes() {
        let mut node = Node::new();
        let p = pod("Always");
        let done = ("setup", run(0, exited(0, 0)));
        let b = ("b", run(0, running()));
        let mut now = 10;
        let mut waits = Vec::new();
        for attempt in 0..6 {
            // The container crashes right after each start.
            let crashed = ("a", run(attempt, exited(1, now)));
            let a = node.decide(&p, &[done.clone(), crashed.clone(), b.clone()], &[], now);
            let wait = a.wake_after.map_or(0, |w| w.as_secs());
            if wait > 0 {
                assert!(a.start.is_empty());
                assert!(
                    a.waiting["a"]
                        .message
                        .contains("restarting failed container=a")
                );
                now += wait as i64;
                let a = node.decide(&p, &[done.clone(), crashed, b.clone()], &[], now);
                assert_eq!(a.start, [Slot::App(0)], "after {wait} s");
            } else {
                assert_eq!(a.start, [Slot::App(0)]);
            }
            waits.push(wait);
            now += 1;
        }
        assert_eq!(waits, [0, 10, 20, 40, 80, 160]);
        // Ten minutes after the last restart the backoff is forgotten.
        now += 601;
        let crashed = ("a", run(6, exited(1, now)));
        let a = node.decide(&p, &[done, crashed, b], &[], now);
        assert_eq!(a.start, [Slot::App(0)]);
    }

    #[test]
    fn restart_policy_decides_which_exits_restart() {
        let done = ("setup", run(0, exited(0, 0)));
        for (policy, code, restarts) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 2, true),
            ("Never", 1, false),
        ] {
            let a = Node::new().decide(
                &pod(policy),
                &[
                    done.clone(),
                    ("a", run(0, exited(code, 5))),
                    ("b", run(0, running())),
                ],
                &[],
                5,
            );
            assert_eq!(!a.start.is_empty(), restarts, "{policy} exit {code}");
        }
    }

    #[test]
    fn unhealthy_or_changed_containers_are_killed() {
        let mut node = Node::new();
        let p = pod("Always");
        let done = ("setup", run(0, exited(0, 0)));
        let a = node.decide(
            &p,
            &[
                done.clone(),
                ("a", run(0, running())),
                ("b", run(0, running())),
            ],
            &["a"],
            5,
        );
        assert_eq!(a.kill.len(), 1);
        assert_eq!(a.kill[0].0, "a");
        let mut changed = run(0, running());
        changed.hash = "old".into();
        let a = node.decide(
            &p,
            &[done, ("a", run(0, running())), ("b", changed)],
            &[],
            5,
        );
        assert_eq!(a.kill[0].0, "b");
        assert!(a.kill[0].1.contains("spec changed"));
    }
}
