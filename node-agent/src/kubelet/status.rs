//! A pod's status computed as the kubelet computes it: phase, conditions, init and app
//! container statuses (state, lastState, restartCount, ready, started), IPs and QoS class.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

use super::{
    SpecError,
    actions::{Exit, Run, RunState, Waiting, restart_policy},
};

/// What the worker knows of its pod.
pub struct Observed<'a> {
    pub pod: &'a Pod,
    /// Why the pod cannot run at all (its spec, its volumes): it stays Pending with this reason.
    pub pod_error: Option<&'a SpecError>,
    /// The sandbox is ready, with this IP.
    pub sandbox_ip: Option<Ipv4Addr>,
    pub sandbox_ready: bool,
    /// The newest runtime container of each container, by name.
    pub runs: &'a BTreeMap<String, Run>,
    /// How the attempt before the newest ended, by name (lastState).
    pub last: &'a BTreeMap<String, Exit>,
    /// Containers that are not running, and why (backoff, image, config), by name.
    pub waiting: &'a BTreeMap<String, Waiting>,
    /// Running containers whose readiness holds (no readiness probe, or it succeeds).
    pub ready: &'a BTreeSet<String>,
    /// Running containers whose startup probe succeeded (or that have none).
    pub started: &'a BTreeSet<String>,
    /// An init container failed under restartPolicy Never.
    pub init_failed: bool,
    pub host_ip: Option<Ipv4Addr>,
    pub start_time: Timestamp,
    /// The status published before, whose condition transition times are kept.
    pub previous: Option<&'a PodStatus>,
    pub now: Timestamp,
}

pub fn pod_status(o: &Observed) -> PodStatus {
    let spec = o.pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.clone().unwrap_or_default();
    let initialized = inits.iter().all(|c| succeeded(o.runs.get(&c.name)));
    let init_statuses: Vec<ContainerStatus> = inits
        .iter()
        .map(|c| container_status(o, c, "PodInitializing", false))
        .collect();
    let app_statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| {
            let default = if initialized {
                "ContainerCreating"
            } else {
                "PodInitializing"
            };
            container_status(o, c, default, true)
        })
        .collect();
    let unready: Vec<&str> = app_statuses
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    let incomplete: Vec<&str> = inits
        .iter()
        .filter(|c| !succeeded(o.runs.get(&c.name)))
        .map(|c| c.name.as_str())
        .collect();
    let mut conditions = vec![
        condition(o, "PodScheduled", true, None),
        condition(o, "PodReadyToStartContainers", o.sandbox_ready, None),
        condition(
            o,
            "Initialized",
            incomplete.is_empty(),
            Some(("ContainersNotInitialized", "incomplete", &incomplete)),
        ),
        condition(
            o,
            "ContainersReady",
            unready.is_empty(),
            Some(("ContainersNotReady", "unready", &unready)),
        ),
        condition(
            o,
            "Ready",
            unready.is_empty(),
            Some(("ContainersNotReady", "unready", &unready)),
        ),
    ];
    conditions.sort_by_key(|c| condition_order(&c.type_));
    let ip = o.sandbox_ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase(o, &spec.containers, initialized).into()),
        conditions: Some(conditions),
        reason: o.pod_error.map(|e| e.reason.to_owned()),
        message: o.pod_error.map(|e| e.message.clone()),
        host_ip: o.host_ip.map(|ip| ip.to_string()),
        host_ips: o.host_ip.map(|ip| vec![HostIP { ip: ip.to_string() }]),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: Some(Time(o.start_time)),
        init_container_statuses: (!inits.is_empty()).then_some(init_statuses),
        container_statuses: Some(app_statuses),
        qos_class: Some(qos_class(&spec.containers, &inits).into()),
        ..Default::default()
    }
}

fn succeeded(run: Option<&Run>) -> bool {
    run.and_then(Run::exit).is_some_and(|e| e.code == 0)
}

/// The kubelet's getPhase.
fn phase(o: &Observed, containers: &[Container], initialized: bool) -> &'static str {
    if o.init_failed {
        return "Failed";
    }
    if o.pod_error.is_some() || !initialized {
        return "Pending";
    }
    let (mut waiting, mut running, mut stopped, mut failed) = (0, 0, 0, 0);
    for c in containers {
        match o.runs.get(&c.name).map(|r| &r.state) {
            Some(RunState::Running { .. }) => running += 1,
            Some(RunState::Exited(exit)) => {
                stopped += 1;
                if exit.code != 0 {
                    failed += 1;
                }
            }
            // Waiting to be restarted after an exit counts as stopped, as in the kubelet.
            Some(RunState::Created) | None if o.last.contains_key(&c.name) => stopped += 1,
            Some(RunState::Created) | None => waiting += 1,
        }
    }
    match restart_policy(o.pod) {
        _ if waiting > 0 => "Pending",
        _ if running > 0 => "Running",
        "Always" if stopped > 0 => "Running",
        "OnFailure" if failed > 0 => "Running",
        "Never" if failed > 0 => "Failed",
        _ if stopped > 0 => "Succeeded",
        _ => "Pending",
    }
}

fn container_status(
    o: &Observed,
    c: &Container,
    default_waiting: &str,
    app: bool,
) -> ContainerStatus {
    let run = o.runs.get(&c.name);
    let waiting = o.waiting.get(&c.name);
    let id = run.map(|r| format!("containerd://{}", r.id));
    let terminated = |e: &Exit, id: Option<String>| ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: id,
            exit_code: e.code,
            reason: Some(e.reason.clone()).filter(|r| !r.is_empty()),
            message: Some(e.message.clone()).filter(|m| !m.is_empty()),
            started_at: e.started.map(Time),
            finished_at: Some(Time(e.finished)),
            signal: None,
        }),
        ..Default::default()
    };
    let waiting_state = |w: Option<&Waiting>| ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(w.map_or(default_waiting, |w| w.reason.as_str()).to_owned()),
            message: w.map(|w| w.message.clone()).filter(|m| !m.is_empty()),
        }),
        ..Default::default()
    };
    let previous = o.last.get(&c.name).map(|e| terminated(e, None));
    let (state, last_state) = match run.map(|r| &r.state) {
        Some(RunState::Running { started }) => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started)),
                }),
                ..Default::default()
            },
            previous,
        ),
        // An exited container waiting to restart shows Waiting, its exit as lastState.
        Some(RunState::Exited(exit)) if waiting.is_some() => {
            (waiting_state(waiting), Some(terminated(exit, id.clone())))
        }
        Some(RunState::Exited(exit)) => (terminated(exit, id.clone()), previous),
        Some(RunState::Created) | None => (waiting_state(waiting), previous),
    };
    let running = run.is_some_and(Run::running);
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: run.map(|r| r.image_ref.clone()).unwrap_or_default(),
        container_id: id,
        restart_count: run.map_or(0, |r| r.attempt as i32),
        ready: running && o.ready.contains(&c.name),
        started: app.then_some(running && o.started.contains(&c.name)),
        state: Some(state),
        last_state: Some(last_state.unwrap_or_default()),
        ..Default::default()
    }
}

/// A condition; when false with `why` = (reason, adjective, containers), the kubelet's
/// message `containers with unready status: [a b]`. Its transition time is kept from the
/// previous status while its value holds.
fn condition(
    o: &Observed,
    type_: &str,
    holds: bool,
    why: Option<(&str, &str, &[&str])>,
) -> PodCondition {
    let status = if holds { "True" } else { "False" };
    let since = o
        .previous
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(o.now));
    let (reason, message) = match why {
        Some((reason, adjective, names)) if !holds => (
            Some(reason.to_owned()),
            Some(format!(
                "containers with {adjective} status: [{}]",
                names.join(" ")
            )),
        ),
        _ => (None, None),
    };
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        last_transition_time: Some(since),
        reason,
        message,
        ..Default::default()
    }
}

fn condition_order(type_: &str) -> usize {
    [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .position(|t| *t == type_)
    .unwrap_or(usize::MAX)
}

/// Guaranteed when every container sets cpu and memory limits equal to its requests,
/// BestEffort when none sets any, else Burstable.
fn qos_class(containers: &[Container], inits: &[Container]) -> &'static str {
    let all: Vec<&Container> = containers.iter().chain(inits).collect();
    let (mut any, mut guaranteed) = (false, true);
    for c in &all {
        let r = c.resources.clone().unwrap_or_default();
        let (requests, limits) = (r.requests.unwrap_or_default(), r.limits.unwrap_or_default());
        any |= !requests.is_empty() || !limits.is_empty();
        for resource in ["cpu", "memory"] {
            let limit = limits.get(resource);
            let request = requests.get(resource).or(limit);
            guaranteed &= limit.is_some() && request == limit;
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    const WEB: &str = "
metadata: {name: web, namespace: default}
spec:
  containers:
  - {name: a, image: busybox}
  - {name: b, image: busybox}
";
    const WITH_INIT: &str = "
metadata: {name: web, namespace: default}
spec:
  restartPolicy: Never
  initContainers:
  - {name: setup, image: busybox}
  containers:
  - {name: a, image: busybox}
";

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn running(name: &str, attempt: u32) -> (String, Run) {
        (
            name.into(),
            Run {
                id: format!("id-{name}-{attempt}"),
                attempt,
                hash: String::new(),
                image_ref: "sha256:1".into(),
                state: RunState::Running { started: t(1) },
            },
        )
    }

    fn exited(name: &str, attempt: u32, code: i32) -> (String, Run) {
        let (name, mut run) = running(name, attempt);
        run.state = RunState::Exited(exit(code));
        (name, run)
    }

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: String::new(),
            started: Some(t(1)),
            finished: t(5),
        }
    }

    struct Case {
        pod: Pod,
        runs: BTreeMap<String, Run>,
        last: BTreeMap<String, Exit>,
        waiting: BTreeMap<String, Waiting>,
        ready: BTreeSet<String>,
        init_failed: bool,
        pod_error: Option<SpecError>,
    }

    impl Case {
        fn new(yaml: &str, runs: &[(String, Run)]) -> Self {
            Self {
                pod: pod(yaml),
                runs: runs.iter().cloned().collect(),
                last: BTreeMap::new(),
                waiting: BTreeMap::new(),
                ready: BTreeSet::new(),
                init_failed: false,
                pod_error: None,
            }
        }

        fn status(&self) -> PodStatus {
            let started = self.runs.keys().cloned().collect();
            pod_status(&Observed {
                pod: &self.pod,
                pod_error: self.pod_error.as_ref(),
                sandbox_ip: Some(Ipv4Addr::new(10, 88, 0, 5)),
                sandbox_ready: true,
                runs: &self.runs,
                last: &self.last,
                waiting: &self.waiting,
                ready: &self.ready,
                started: &started,
                init_failed: self.init_failed,
                host_ip: None,
                start_time: t(0),
                previous: None,
                now: t(10),
            })
        }
    }

    fn condition_of<'a>(s: &'a PodStatus, type_: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    fn state(s: &PodStatus, i: usize) -> ContainerState {
        s.container_statuses.as_ref().unwrap()[i]
            .state
            .clone()
            .unwrap()
    }

    #[test]
    fn phase_follows_the_kubelet() {
        let cases: Vec<(&str, Case, &str)> = vec![
            ("nothing started", Case::new(WEB, &[]), "Pending"),
            (
                "one of two running",
                Case::new(WEB, &[running("a", 0)]),
                "Pending",
            ),
            (
                "both running",
                Case::new(WEB, &[running("a", 0), running("b", 0)]),
                "Running",
            ),
            (
                "Always: exited, to be restarted",
                Case::new(WEB, &[exited("a", 0, 0), exited("b", 0, 1)]),
                "Running",
            ),
            (
                "Never: init failed",
                Case {
                    init_failed: true,
                    ..Case::new(WITH_INIT, &[exited("setup", 0, 1)])
                },
                "Failed",
            ),
            (
                "init running",
                Case::new(WITH_INIT, &[running("setup", 0)]),
                "Pending",
            ),
            (
                "Never: all done",
                Case::new(WITH_INIT, &[exited("setup", 0, 0), exited("a", 0, 0)]),
                "Succeeded",
            ),
            (
                "Never: app failed",
                Case::new(WITH_INIT, &[exited("setup", 0, 0), exited("a", 0, 2)]),
                "Failed",
            ),
            (
                "spec error",
                Case {
                    pod_error: Some(SpecError::new("FailedMount", "configmap \"x\" not found")),
                    ..Case::new(WEB, &[])
                },
                "Pending",
            ),
        ];
        for (name, case, phase) in cases {
            assert_eq!(case.status().phase.as_deref(), Some(phase), "{name}");
        }
    }

    #[test]
    fn ready_needs_every_container_running_and_ready() {
        let mut case = Case::new(WEB, &[running("a", 0), running("b", 0)]);
        case.ready = ["a".to_string()].into();
        let s = case.status();
        let ready = condition_of(&s, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        case.ready.insert("b".into());
        assert_eq!(condition_of(&case.status(), "Ready").status, "True");
        assert_eq!(
            condition_of(&case.status(), "ContainersReady").status,
            "True"
        );
    }

    #[test]
    fn crash_loop_shows_waiting_with_the_exit_as_last_state() {
        let mut case = Case::new(WEB, &[exited("a", 3, 137), running("b", 0)]);
        case.waiting.insert(
            "a".into(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 40s restarting failed container=a".into(),
            },
        );
        let s = case.status();
        let a = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(a.restart_count, 3);
        assert_eq!(
            a.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = a.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 137);
        assert_eq!(last.container_id.as_deref(), Some("containerd://id-a-3"));
        assert!(!a.ready);
    }

    #[test]
    fn running_container_keeps_its_previous_exit() {
        let mut case = Case::new(WEB, &[running("a", 1), running("b", 0)]);
        case.last.insert("a".into(), exit(1));
        let s = case.status();
        assert!(state(&s, 0).running.is_some());
        let a = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            a.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
    }

    #[test]
    fn waiting_reasons_before_start() {
        let s = Case::new(WITH_INIT, &[running("setup", 0)]).status();
        assert_eq!(
            state(&s, 0).waiting.unwrap().reason.as_deref(),
            Some("PodInitializing")
        );
        let init = condition_of(&s, "Initialized");
        assert_eq!(init.status, "False");
        assert_eq!(
            init.message.as_deref(),
            Some("containers with incomplete status: [setup]")
        );
        let s = Case::new(WEB, &[]).status();
        assert_eq!(
            state(&s, 0).waiting.unwrap().reason.as_deref(),
            Some("ContainerCreating")
        );
    }

    #[test]
    fn transition_times_hold_while_the_value_holds() {
        let case = Case::new(WEB, &[running("a", 0), running("b", 0)]);
        let first = case.status();
        let ready_at = condition_of(&first, "Ready").last_transition_time.clone();
        let started = case.runs.keys().cloned().collect();
        let later = pod_status(&Observed {
            pod: &case.pod,
            pod_error: None,
            sandbox_ip: None,
            sandbox_ready: true,
            runs: &case.runs,
            last: &case.last,
            waiting: &case.waiting,
            ready: &case.ready,
            started: &started,
            init_failed: false,
            host_ip: None,
            start_time: t(0),
            previous: Some(&first),
            now: t(60),
        });
        assert_eq!(condition_of(&later, "Ready").last_transition_time, ready_at);
        assert_eq!(later.pod_ip, None);
    }

    #[test]
    fn qos_classes() {
        let c = |yaml: &str| -> Container { serde_yaml::from_str(yaml).unwrap() };
        let none = c("{name: a}");
        let limited = c("{name: a, resources: {limits: {cpu: '1', memory: 1Gi}}}");
        let requests = c("{name: a, resources: {requests: {cpu: 100m}}}");
        assert_eq!(qos_class(std::slice::from_ref(&none), &[]), "BestEffort");
        assert_eq!(qos_class(std::slice::from_ref(&limited), &[]), "Guaranteed");
        assert_eq!(qos_class(&[limited, requests], &[]), "Burstable");
        assert_eq!(
            qos_class(&[none], &[c("{name: i, resources: {limits: {cpu: '1'}}}")]),
            "Burstable"
        );
    }
}
