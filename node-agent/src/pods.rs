//! `node-agent pods`: the pods the running agent's kubelet reports (`GET /pods` on its health
//! server), as a table like `kubectl get pods` shows them, or as JSON.
use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, PodStatus};

/// How `node-agent pods` prints the pods.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    /// NAMESPACE NAME READY STATUS RESTARTS IP, like `kubectl get pods`.
    Table,
    /// The JSON array of v1 Pods.
    Json,
}

/// What `node-agent pods` prints: the pods of the agent whose health server is at `health`.
pub fn show(health: SocketAddr, output: Output) -> anyhow::Result<String> {
    let pods = fetch(health)?;
    Ok(match output {
        Output::Table => format_table(&pods),
        Output::Json => serde_json::to_string_pretty(&pods)? + "\n",
    })
}

/// The pods the agent whose health server is at `health` reports.
pub fn fetch(health: SocketAddr) -> anyhow::Result<Vec<Pod>> {
    let body = get(health, "/pods")?;
    serde_json::from_slice(&body)
        .with_context(|| format!("node-agent at {health}: GET /pods: not a list of pods"))
}

const COLUMNS: [&str; 6] = ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP"];

/// One line per pod: NAMESPACE NAME READY STATUS RESTARTS IP, aligned as kubectl aligns them.
pub fn format_table(pods: &[Pod]) -> String {
    let mut rows = vec![COLUMNS.map(String::from)];
    for pod in pods {
        let shown = Summary::of(pod);
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        rows.push([
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
            format!("{}/{}", shown.ready, shown.total),
            shown.status,
            shown.restarts.to_string(),
            ip.unwrap_or_else(|| "<none>".into()),
        ]);
    }
    // kubectl's tabwriter: columns at least 10 wide, 3 spaces apart, the last one not padded.
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .map(|w| (w + 3).max(10))
        .collect();
    let mut out = String::new();
    for row in rows {
        let (last, padded) = row.split_last().expect("rows have cells");
        for (cell, width) in padded.iter().zip(&widths) {
            let _ = write!(out, "{cell:<width$}");
        }
        out.push_str(last);
        out.push('\n');
    }
    out
}

/// The READY, STATUS and RESTARTS columns of a pod, computed as kubectl computes them.
#[derive(Debug, PartialEq)]
struct Summary {
    /// Ready app containers (and started sidecars), out of `total`.
    ready: usize,
    total: usize,
    status: String,
    /// The app containers' restarts; the init containers' while they run.
    restarts: i32,
}

impl Summary {
    fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let init_containers = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default();
        // Init containers that keep running beside the app containers.
        let sidecar = |name: &str| {
            init_containers
                .iter()
                .any(|c| c.name == name && c.restart_policy.as_deref() == Some("Always"))
        };
        let mut summary = Summary {
            ready: 0,
            total: spec.map_or(0, |s| s.containers.len())
                + init_containers.iter().filter(|c| sidecar(&c.name)).count(),
            status: (status.and_then(|s| s.reason.clone()))
                .filter(|r| !r.is_empty())
                .or_else(|| status.and_then(|s| s.phase.clone()))
                .unwrap_or_default(),
            restarts: 0,
        };

        let init_statuses = status
            .and_then(|s| s.init_container_statuses.as_deref())
            .unwrap_or_default();
        let mut initializing = false;
        for (i, container) in init_statuses.iter().enumerate() {
            summary.restarts += container.restart_count;
            let state = container.state.as_ref();
            let terminated = state.and_then(|s| s.terminated.as_ref());
            let waiting = state
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                .filter(|r| !r.is_empty() && *r != "PodInitializing");
            if terminated.is_some_and(|t| t.exit_code == 0) {
                continue;
            }
            if sidecar(&container.name) && container.started == Some(true) {
                summary.ready += usize::from(container.ready);
                continue;
            }
            summary.status = match (terminated, waiting) {
                (Some(terminated), _) => format!("Init:{}", terminated_reason(terminated)),
                (None, Some(reason)) => format!("Init:{reason}"),
                (None, None) => format!("Init:{i}/{}", init_containers.len()),
            };
            initializing = true;
            break;
        }

        if !initializing || condition(status, "Initialized") {
            summary.restarts = 0;
            let mut running = false;
            let app_statuses = status
                .and_then(|s| s.container_statuses.as_deref())
                .unwrap_or_default();
            // Backwards: the first container's reason is the one shown.
            for container in app_statuses.iter().rev() {
                summary.restarts += container.restart_count;
                let state = container.state.as_ref();
                let waiting = state
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.as_deref())
                    .filter(|r| !r.is_empty());
                if let Some(reason) = waiting {
                    summary.status = reason.to_owned();
                } else if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
                    summary.status = terminated_reason(terminated);
                } else if container.ready && state.is_some_and(|s| s.running.is_some()) {
                    running = true;
                    summary.ready += 1;
                }
            }
            // A container completed while another still runs: the pod runs.
            if summary.status == "Completed" && running {
                summary.status = if condition(status, "Ready") {
                    "Running".into()
                } else {
                    "NotReady".into()
                };
            }
        }

        let phase = status.and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            && !matches!(phase, Some("Succeeded" | "Failed"))
        {
            summary.status = "Terminating".into();
        }
        summary
    }
}

/// Why a container ended: its reason, else the signal or exit code.
fn terminated_reason(terminated: &ContainerStateTerminated) -> String {
    match (terminated.reason.as_deref(), terminated.signal) {
        (Some(reason), _) if !reason.is_empty() => reason.to_owned(),
        (_, Some(signal)) if signal != 0 => format!("Signal:{signal}"),
        _ => format!("ExitCode:{}", terminated.exit_code),
    }
}

/// Whether the pod's condition `type_` is True.
fn condition(status: Option<&PodStatus>, type_: &str) -> bool {
    status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET path` from the HTTP server at `addr` (HTTP/1.1, one request): the body of its 200
/// answer.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| anyhow!("no node-agent answering at {addr}: {}", describe(&e)))?;
    let mut answer = Vec::new();
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .and_then(|()| {
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
            )
        })
        .and_then(|()| stream.read_to_end(&mut answer))
        .map_err(|e| anyhow!("node-agent at {addr}: GET {path}: {}", describe(&e)))?;
    body(&answer).map_err(|reason| anyhow!("node-agent at {addr}: GET {path}: {reason}"))
}

/// An I/O error as a person reads it: `connection refused`, not `os error 111`.
fn describe(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        kind @ (ConnectionRefused | ConnectionReset | TimedOut | WouldBlock | HostUnreachable
        | NetworkUnreachable | AddrNotAvailable) => kind.to_string(),
        _ => e.to_string(),
    }
}

/// The body of a whole HTTP/1.1 answer (the connection closed after it), when its status is
/// 200 OK.
fn body(answer: &[u8]) -> Result<Vec<u8>, String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer ends before its headers do")?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    let body = &answer[end + 4..];
    let length = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim())
    });
    match length {
        None => Ok(body.to_vec()),
        Some(length) => {
            let length: usize = length
                .parse()
                .map_err(|_| format!("Content-Length {length:?} is not a number"))?;
            match body.get(..length) {
                Some(body) => Ok(body.to_vec()),
                None => Err(format!(
                    "the answer ends after {} of its {length} bytes",
                    body.len()
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use serde_json::{Value, json};

    use super::*;

    /// Pod `default/<name>` with app containers `app`, `b`, ... as `spec.containers` needs.
    fn pod(spec: Value, status: Value) -> Pod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "app"}]);
        }
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn running(name: &str, ready: bool, restarts: i32) -> Value {
        json!({"name": name, "image": "busybox", "imageID": "", "ready": ready, "restartCount": restarts,
               "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}})
    }

    fn waiting(name: &str, reason: &str, restarts: i32) -> Value {
        json!({"name": name, "image": "busybox", "imageID": "", "ready": false, "restartCount": restarts,
               "state": {"waiting": {"reason": reason}}})
    }

    fn terminated(name: &str, exit_code: i32, reason: Option<&str>, restarts: i32) -> Value {
        json!({"name": name, "image": "busybox", "imageID": "", "ready": false, "restartCount": restarts,
               "state": {"terminated": {"exitCode": exit_code, "reason": reason}}})
    }

    fn two() -> Value {
        json!({"containers": [{"name": "app"}, {"name": "b"}]})
    }

    fn init_two() -> Value {
        json!({"initContainers": [{"name": "i0"}, {"name": "i1"}], "containers": [{"name": "app"}]})
    }

    fn conditions(types: &[&str]) -> Value {
        types
            .iter()
            .map(|t| json!({"type": t, "status": "True"}))
            .collect()
    }

    #[test]
    fn summary_table() {
        let cases = [
            (
                "running and ready",
                pod(
                    two(),
                    json!({"phase": "Running", "podIP": "10.88.0.2",
                        "containerStatuses": [running("app", true, 1), running("b", true, 2)]}),
                ),
                ("2/2", "Running", 3),
            ),
            (
                "a container crash-looping",
                pod(
                    two(),
                    json!({"phase": "Running", "containerStatuses": [
                        running("app", true, 0), waiting("b", "CrashLoopBackOff", 5)]}),
                ),
                ("1/2", "CrashLoopBackOff", 5),
            ),
            (
                "the first container's reason is shown",
                pod(
                    two(),
                    json!({"phase": "Pending", "containerStatuses": [
                        waiting("app", "ErrImagePull", 0), terminated("b", 1, Some("Error"), 0)]}),
                ),
                ("0/2", "ErrImagePull", 0),
            ),
            (
                "terminated without a reason: the exit code or the signal",
                pod(
                    two(),
                    json!({"phase": "Running", "containerStatuses": [
                        terminated("app", 137, None, 0), running("b", true, 0)]}),
                ),
                ("1/2", "ExitCode:137", 0),
            ),
            (
                "the second init container running",
                pod(
                    init_two(),
                    json!({"phase": "Pending",
                        "initContainerStatuses": [terminated("i0", 0, Some("Completed"), 0), running("i1", false, 1)],
                        "containerStatuses": [waiting("app", "PodInitializing", 0)]}),
                ),
                ("0/1", "Init:1/2", 1),
            ),
            (
                "waiting for PodInitializing is no reason",
                pod(
                    init_two(),
                    json!({"phase": "Pending",
                        "initContainerStatuses": [waiting("i0", "PodInitializing", 0), waiting("i1", "PodInitializing", 0)]}),
                ),
                ("0/1", "Init:0/2", 0),
            ),
            (
                "an init container crash-looping: its reason and its restarts",
                pod(
                    init_two(),
                    json!({"phase": "Pending",
                        "initContainerStatuses": [waiting("i0", "CrashLoopBackOff", 3), waiting("i1", "PodInitializing", 0)],
                        "containerStatuses": [waiting("app", "PodInitializing", 0)]}),
                ),
                ("0/1", "Init:CrashLoopBackOff", 3),
            ),
            (
                "an init container failed",
                pod(
                    init_two(),
                    json!({"phase": "Failed",
                        "initContainerStatuses": [terminated("i0", 1, Some("Error"), 0)]}),
                ),
                ("0/1", "Init:Error", 0),
            ),
            (
                "an init container failed without a reason",
                pod(
                    init_two(),
                    json!({"phase": "Pending",
                        "initContainerStatuses": [terminated("i0", 2, None, 0)]}),
                ),
                ("0/1", "Init:ExitCode:2", 0),
            ),
            (
                "initialized: the app containers count",
                pod(
                    init_two(),
                    json!({"phase": "Running", "conditions": conditions(&["Initialized"]),
                        "initContainerStatuses": [terminated("i0", 0, Some("Completed"), 4), terminated("i1", 0, Some("Completed"), 0)],
                        "containerStatuses": [running("app", true, 1)]}),
                ),
                ("1/1", "Running", 1),
            ),
            (
                "a running sidecar counts as a container",
                pod(
                    json!({"initContainers": [{"name": "log", "restartPolicy": "Always"}], "containers": [{"name": "app"}]}),
                    json!({"phase": "Running",
                        "initContainerStatuses": [started(running("log", true, 0))],
                        "containerStatuses": [running("app", true, 0)]}),
                ),
                ("2/2", "Running", 0),
            ),
            (
                "the pod's reason over its phase",
                pod(json!({}), json!({"phase": "Failed", "reason": "Evicted"})),
                ("0/1", "Evicted", 0),
            ),
            (
                "completed",
                pod(
                    json!({}),
                    json!({"phase": "Succeeded", "containerStatuses": [terminated("app", 0, Some("Completed"), 0)]}),
                ),
                ("0/1", "Completed", 0),
            ),
            (
                "one completed, one running and the pod not ready",
                pod(
                    two(),
                    json!({"phase": "Running", "containerStatuses": [
                        terminated("app", 0, Some("Completed"), 0), running("b", true, 0)]}),
                ),
                ("1/2", "NotReady", 0),
            ),
            (
                "one completed, one running and the pod ready",
                pod(
                    two(),
                    json!({"phase": "Running", "conditions": conditions(&["Ready"]), "containerStatuses": [
                        terminated("app", 0, Some("Completed"), 0), running("b", true, 0)]}),
                ),
                ("1/2", "Running", 0),
            ),
            ("no status yet", pod(json!({}), Value::Null), ("0/1", "", 0)),
        ];
        for (what, pod, (ready, status, restarts)) in cases {
            let got = Summary::of(&pod);
            let got = (
                format!("{}/{}", got.ready, got.total),
                got.status,
                got.restarts,
            );
            assert_eq!(
                got,
                (ready.to_owned(), status.to_owned(), restarts),
                "{what}"
            );
        }
    }

    fn started(mut status: Value) -> Value {
        status["started"] = json!(true);
        status
    }

    #[test]
    fn terminating_pods_say_so_until_they_are_done() {
        let mut pod = pod(
            json!({}),
            json!({"phase": "Running", "containerStatuses": [running("app", true, 0)]}),
        );
        pod.metadata.deletion_timestamp =
            serde_json::from_value(json!("2025-01-01T00:00:00Z")).unwrap();
        assert_eq!(Summary::of(&pod).status, "Terminating");
        // Done: what it ended as.
        pod.status = serde_json::from_value(json!({"phase": "Succeeded",
            "containerStatuses": [terminated("app", 0, Some("Completed"), 0)]}))
        .unwrap();
        assert_eq!(Summary::of(&pod).status, "Completed");
    }

    #[test]
    fn the_table_is_aligned_like_kubectl() {
        let mut web = pod(
            two(),
            json!({"phase": "Running", "podIP": "10.88.0.2",
                "containerStatuses": [running("app", true, 0), running("b", true, 12)]}),
        );
        web.metadata.name = Some("web-with-a-long-name".into());
        let mut init = pod(
            init_two(),
            json!({"phase": "Pending", "initContainerStatuses": [waiting("i0", "CrashLoopBackOff", 3)]}),
        );
        init.metadata.namespace = Some("kube-system".into());
        assert_eq!(
            format_table(&[web, init]),
            "\
NAMESPACE     NAME                   READY     STATUS                  RESTARTS   IP
default       web-with-a-long-name   2/2       Running                 12         10.88.0.2
kube-system   p                      0/1       Init:CrashLoopBackOff   3          <none>
"
        );
        assert_eq!(
            format_table(&[]),
            "NAMESPACE   NAME      READY     STATUS    RESTARTS   IP\n"
        );
    }

    #[test]
    fn nothing_listening_is_a_clear_error() {
        // A port just freed: nothing listens on it.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let error = show(addr, Output::Table).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("no node-agent answering at {addr}: connection refused")
        );
    }

    /// A server answering `answer` to one request, on loopback.
    fn answering(answer: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0; 1024];
            let _ = stream.read(&mut request);
            stream.write_all(&answer).unwrap();
        });
        addr
    }

    #[test]
    fn answers_other_than_a_list_of_pods_are_errors() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                "GET /pods: answered \"HTTP/1.1 404 Not Found\"",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[]",
                "GET /pods: the answer ends after 2 of its 10 bytes",
            ),
            (
                b"HTTP/1.1 200 OK\r\n",
                "GET /pods: the answer ends before its headers do",
            ),
            (
                b"HTTP/1.1 200 OK\r\n\r\n{\"kind\": \"Pod\"}",
                "GET /pods: not a list of pods",
            ),
        ];
        for (answer, want) in cases {
            let addr = answering(answer.to_vec());
            let error = fetch(addr).unwrap_err().to_string();
            assert_eq!(error, format!("node-agent at {addr}: {want}"));
        }
    }

    #[test]
    fn json_output_is_the_array_of_pods() {
        let pods = r#"[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}}]"#;
        // Read up to its Content-Length.
        let addr = answering(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{pods}trailing",
                pods.len()
            )
            .into_bytes(),
        );
        let printed = show(addr, Output::Json).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&printed).unwrap(),
            json!([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}}])
        );
    }
}
