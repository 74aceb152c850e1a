//! Startup, liveness and readiness probes, as the kubelet's prober runs them.
//!
//! - `probe_specs`: a container's probes with the Kubernetes defaults, named ports resolved.
//! - `ProbeTracker`: the pure threshold state machine of one probe.
//! - `probe_once`: one exec, httpGet or tcpSocket check (exec through the `Exec` trait, so
//!   tests need no runtime).
//! - `spawn`: a container's probe loops, reporting each result change as a `ProbeEvent`.
use std::{
    fmt,
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinSet,
    time::{MissedTickBehavior, timeout},
};

use super::SpecError;
use crate::cri::Cri;

/// The reason given to a container whose probes the agent cannot run.
const REASON: &str = "CreateContainerConfigError";
/// The kubelet's User-Agent for HTTP probes.
const USER_AGENT: &str = "kube-probe/1.34";
/// Extra time given to the runtime's own exec timeout: the probe's timeout is enforced here,
/// the runtime's only kills a command whose cancellation got lost.
const EXEC_TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// How much of a failed command's output a message keeps.
const MAX_OUTPUT: usize = 1024;
/// The longest HTTP status line read before the response is called malformed.
const MAX_STATUS_LINE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    /// The Container field holding this probe.
    fn field(self) -> &'static str {
        match self {
            Self::Startup => "startupProbe",
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Startup => "Startup",
            Self::Liveness => "Liveness",
            Self::Readiness => "Readiness",
        })
    }
}

/// One probe of a container, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A command run in the container; exit code 0 is success.
    Exec(Vec<String>),
    /// GET `http://host:port{path}` (host defaults to the pod IP); status 200..400 is success.
    Http {
        host: Option<Ipv4Addr>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A TCP connection to host:port (host defaults to the pod IP).
    Tcp { host: Option<Ipv4Addr>, port: u16 },
}

/// The container's probes (startup, liveness, readiness, those it has), or why the agent
/// cannot run one of them.
pub fn probe_specs(container: &Container) -> Result<Vec<ProbeSpec>, SpecError> {
    [
        (ProbeKind::Startup, &container.startup_probe),
        (ProbeKind::Liveness, &container.liveness_probe),
        (ProbeKind::Readiness, &container.readiness_probe),
    ]
    .into_iter()
    .filter_map(|(kind, probe)| Some((kind, probe.as_ref()?)))
    .map(|(kind, probe)| {
        let field = format!("spec.containers[{}].{}", container.name, kind.field());
        probe_spec(container, kind, probe, &field)
    })
    .collect()
}

fn probe_spec(
    container: &Container,
    kind: ProbeKind,
    probe: &Probe,
    field: &str,
) -> Result<ProbeSpec, SpecError> {
    let action = match (&probe.exec, &probe.http_get, &probe.tcp_socket, &probe.grpc) {
        (Some(exec), None, None, None) => match exec.command.as_deref() {
            Some(command) if !command.is_empty() => Action::Exec(command.to_vec()),
            _ => return Err(invalid(field, "exec.command", "required value")),
        },
        (None, Some(http), None, None) => http_action(container, http, field)?,
        (None, None, Some(tcp), None) => Action::Tcp {
            host: host(tcp.host.as_deref(), field, "tcpSocket.host")?,
            port: port(container, &tcp.port, field, "tcpSocket.port")?,
        },
        (None, None, None, Some(_)) => {
            return Err(invalid(field, "grpc", "gRPC probes are not supported"));
        }
        (None, None, None, None) => {
            return Err(SpecError::new(
                REASON,
                format!("{field}: must specify a handler type"),
            ));
        }
        _ => {
            return Err(SpecError::new(
                REASON,
                format!("{field}: may not specify more than 1 handler type"),
            ));
        }
    };
    let number = |name, value, default| count(field, name, value, default);
    let success_threshold = number("successThreshold", probe.success_threshold, 1)?;
    if kind != ProbeKind::Readiness && success_threshold != 1 {
        return Err(invalid(field, "successThreshold", "must be 1"));
    }
    let secs = |name, value, default| number(name, value, default).map(u64::from);
    Ok(ProbeSpec {
        kind,
        action,
        initial_delay: Duration::from_secs(secs(
            "initialDelaySeconds",
            probe.initial_delay_seconds,
            0,
        )?),
        period: Duration::from_secs(secs("periodSeconds", probe.period_seconds, 10)?),
        timeout: Duration::from_secs(secs("timeoutSeconds", probe.timeout_seconds, 1)?),
        success_threshold,
        failure_threshold: number("failureThreshold", probe.failure_threshold, 3)?,
    })
}

fn http_action(
    container: &Container,
    http: &HTTPGetAction,
    field: &str,
) -> Result<Action, SpecError> {
    match http.scheme.as_deref() {
        None | Some("HTTP") => {}
        Some(scheme) => {
            let message = format!("{scheme:?} is not supported (only \"HTTP\")");
            return Err(invalid(field, "httpGet.scheme", message));
        }
    }
    match http.protocol.as_deref() {
        None | Some("HTTP/1.1") => {}
        Some(protocol) => {
            let message = format!("{protocol:?} is not supported (only \"HTTP/1.1\")");
            return Err(invalid(field, "httpGet.protocol", message));
        }
    }
    let headers = http.http_headers.iter().flatten();
    for header in headers.clone() {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if header.name.is_empty() || !header.name.chars().all(token) {
            let message = format!("{:?} is not a valid HTTP header name", header.name);
            return Err(invalid(field, "httpGet.httpHeaders", message));
        }
        if header.value.contains(['\r', '\n']) {
            let message = format!("the value of {:?} contains a line break", header.name);
            return Err(invalid(field, "httpGet.httpHeaders", message));
        }
    }
    let path = http.path.as_deref().unwrap_or_default();
    Ok(Action::Http {
        host: host(http.host.as_deref(), field, "httpGet.host")?,
        port: port(container, &http.port, field, "httpGet.port")?,
        path: if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        },
        headers: headers.map(|h| (h.name.clone(), h.value.clone())).collect(),
    })
}

/// A probe's host: an IPv4 address (the agent runs no resolver for probes), None for the pod IP.
fn host(host: Option<&str>, field: &str, name: &str) -> Result<Option<Ipv4Addr>, SpecError> {
    match host {
        None | Some("") => Ok(None),
        Some(host) => host
            .parse()
            .map(Some)
            .map_err(|_| invalid(field, name, format!("{host:?} is not an IPv4 address"))),
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(
    container: &Container,
    port: &IntOrString,
    field: &str,
    name: &str,
) -> Result<u16, SpecError> {
    let number = match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(port_name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(port_name))
                .ok_or_else(|| {
                    invalid(
                        field,
                        name,
                        format!("no container port named {port_name:?}"),
                    )
                })?
                .container_port
        }
    };
    u16::try_from(number)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| {
            invalid(
                field,
                name,
                format!("{number} is not a port number (1-65535)"),
            )
        })
}

/// A count or a number of seconds: unset or 0 takes the default (as the API server defaults
/// them), negative is invalid.
fn count(field: &str, name: &str, value: Option<i32>, default: u32) -> Result<u32, SpecError> {
    match value {
        None | Some(0) => Ok(default),
        Some(value) => u32::try_from(value).map_err(|_| {
            invalid(
                field,
                name,
                format!("{value} must be greater than or equal to 0"),
            )
        }),
    }
}

fn invalid(field: &str, name: &str, message: impl fmt::Display) -> SpecError {
    SpecError::new(REASON, format!("{field}.{name}: {message}"))
}

/// One probe's result as the kubelet's prober worker keeps it: a result changes only once
/// `success_threshold` consecutive successes, or `failure_threshold` consecutive failures, are
/// seen. Readiness starts failed (not ready until it first succeeds), liveness succeeded, and
/// startup undecided: not started, yet its first crossing of the failure threshold is a change
/// (it restarts the container).
#[derive(Clone, Debug)]
pub struct ProbeTracker {
    kind: ProbeKind,
    success_threshold: u32,
    failure_threshold: u32,
    /// None: startup not decided yet.
    result: Option<bool>,
    /// The last run's result and how many runs in a row had it.
    last: Option<bool>,
    run: u32,
}

impl ProbeTracker {
    pub fn new(spec: &ProbeSpec) -> Self {
        Self {
            kind: spec.kind,
            success_threshold: spec.success_threshold,
            failure_threshold: spec.failure_threshold,
            result: match spec.kind {
                ProbeKind::Startup => None,
                ProbeKind::Liveness => Some(true),
                ProbeKind::Readiness => Some(false),
            },
            last: None,
            run: 0,
        }
    }

    /// Records one probe run; returns the new result when it changed.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        if self.last == Some(success) {
            self.run += 1;
        } else {
            self.last = Some(success);
            self.run = 1;
        }
        let threshold = if success {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.run < threshold || self.result == Some(success) {
            return None;
        }
        self.result = Some(success);
        self.result
    }

    /// Whether probing stops: a startup probe once decided (started, or to be restarted), a
    /// liveness probe once failed (the container is restarted, a new one gets new probes).
    fn finished(&self) -> bool {
        match self.kind {
            ProbeKind::Startup => self.result.is_some(),
            ProbeKind::Liveness => self.result == Some(false),
            ProbeKind::Readiness => false,
        }
    }
}

/// What one probe run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The container failed the check: counts towards the failure threshold.
    Failure(String),
    /// The check could not be made (the runtime's exec failed): the kubelet discards it.
    Error(String),
}

/// Runs a command in the probed container: its exit code and its output.
pub trait Exec {
    fn exec(
        &mut self,
        cmd: &[String],
        timeout: Duration,
    ) -> impl Future<Output = anyhow::Result<(i32, String)>> + Send;
}

/// Exec through CRI `ExecSync` in one container.
#[derive(Clone)]
struct ContainerExec {
    cri: Cri,
    container_id: String,
}

impl Exec for ContainerExec {
    async fn exec(&mut self, cmd: &[String], timeout: Duration) -> anyhow::Result<(i32, String)> {
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let response = self
            .cri
            .exec_sync(&self.container_id, &cmd, timeout + EXEC_TIMEOUT_SLACK)
            .await?;
        let mut output = response.stdout;
        output.extend_from_slice(&response.stderr);
        Ok((
            response.exit_code,
            String::from_utf8_lossy(&output).into_owned(),
        ))
    }
}

/// Runs one check against a container at `pod_ip`, bounded by `timeout`. Failure messages
/// read like the kubelet's.
pub async fn probe_once(
    action: &Action,
    pod_ip: Ipv4Addr,
    timeout: Duration,
    exec: &mut impl Exec,
) -> Outcome {
    match action {
        Action::Exec(cmd) => run_command(cmd, timeout, exec).await,
        Action::Http {
            host,
            port,
            path,
            headers,
        } => {
            let addr = SocketAddrV4::new(host.unwrap_or(pod_ip), *port);
            http_get(addr, path, headers, timeout).await
        }
        Action::Tcp { host, port } => {
            let addr = SocketAddrV4::new(host.unwrap_or(pod_ip), *port);
            match tokio::time::timeout(timeout, connect(addr)).await {
                Err(_) => Outcome::Failure(format!("dial tcp {addr}: i/o timeout")),
                Ok(Err(e)) => Outcome::Failure(e),
                Ok(Ok(_)) => Outcome::Success,
            }
        }
    }
}

async fn run_command(cmd: &[String], limit: Duration, exec: &mut impl Exec) -> Outcome {
    let shown = cmd.join(" ");
    match timeout(limit, exec.exec(cmd, limit)).await {
        Err(_) => Outcome::Failure(format!("command {shown:?} timed out")),
        Ok(Err(e)) => Outcome::Error(format!("command {shown:?}: {e:#}")),
        Ok(Ok((0, _))) => Outcome::Success,
        Ok(Ok((code, output))) => {
            let output: String = output.trim().chars().take(MAX_OUTPUT).collect();
            Outcome::Failure(if output.is_empty() {
                format!("command {shown:?} exited with {code}")
            } else {
                format!("command {shown:?} exited with {code}: {output}")
            })
        }
    }
}

async fn http_get(
    addr: SocketAddrV4,
    path: &str,
    headers: &[(String, String)],
    limit: Duration,
) -> Outcome {
    let url = format!("http://{addr}{path}");
    let request = http_request(addr, path, headers);
    match timeout(limit, http_status(addr, &request)).await {
        Err(_) => Outcome::Failure(format!("Get {url:?}: context deadline exceeded")),
        Ok(Err(e)) => Outcome::Failure(format!("Get {url:?}: {e}")),
        Ok(Ok(status)) if (200..400).contains(&status) => Outcome::Success,
        Ok(Ok(status)) => Outcome::Failure(format!("HTTP probe failed with statuscode: {status}")),
    }
}

/// The GET request the kubelet sends: the probe's headers, a Host, User-Agent and Accept
/// unless the probe sets them (an empty Accept removes it), and no keep-alive.
fn http_request(addr: SocketAddrV4, path: &str, headers: &[(String, String)]) -> Vec<u8> {
    let named = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
    let host = named("Host").map_or_else(|| addr.to_string(), |(_, v)| v.clone());
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        let empty_accept = name.eq_ignore_ascii_case("Accept") && value.is_empty();
        if !name.eq_ignore_ascii_case("Host") && !empty_accept {
            request += &format!("{name}: {value}\r\n");
        }
    }
    if named("User-Agent").is_none() {
        request += &format!("User-Agent: {USER_AGENT}\r\n");
    }
    if named("Accept").is_none() {
        request += "Accept: */*\r\n";
    }
    request += "Connection: close\r\n\r\n";
    request.into_bytes()
}

/// Sends `request` and reads the response's status code.
async fn http_status(addr: SocketAddrV4, request: &[u8]) -> Result<u16, String> {
    let mut stream = connect(addr).await?;
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    let mut response = Vec::with_capacity(256);
    loop {
        if let Some(end) = response.windows(2).position(|w| w == b"\r\n") {
            return status_code(&response[..end]);
        }
        if response.len() > MAX_STATUS_LINE {
            return Err("malformed HTTP response: status line too long".into());
        }
        if stream
            .read_buf(&mut response)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("EOF".into());
        }
    }
}

/// The code of an `HTTP/1.x NNN reason` status line.
fn status_code(line: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let version = words.next().unwrap_or_default();
    match words.next().map(str::parse::<u16>) {
        Some(Ok(code)) if version.starts_with("HTTP/1.") && (100..1000).contains(&code) => Ok(code),
        _ => Err(format!("malformed HTTP status line {line:?}")),
    }
}

/// A TCP connection, or the error as Go's dialer words it (the kubelet's messages).
async fn connect(addr: SocketAddrV4) -> Result<TcpStream, String> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: connect: {e}"))
}

/// A change of one probe's result, for the pod worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEvent {
    pub container: String,
    pub container_id: String,
    pub kind: ProbeKind,
    /// Startup: started; liveness: alive (false: restart it); readiness: ready.
    pub healthy: bool,
    /// Why the probe failed (the last run's message); empty on success.
    pub message: String,
}

/// A container's running probes; dropping it stops them.
pub struct ProbeHandle {
    _tasks: JoinSet<()>,
}

/// Starts the container's probes. Each waits `initial_delay` from the container's start
/// (`started_at`: an adopted container may have started long ago), then runs every `period`;
/// liveness and readiness wait until the startup probe (if any) has succeeded, and stop if it
/// fails. Every change of a result is sent on `events` as soon as it happens; a container whose
/// liveness or startup probe failed is probed no more (its replacement gets new probes).
pub fn spawn(
    container: String,
    container_id: String,
    pod_ip: Ipv4Addr,
    started_at: std::time::Instant,
    specs: Vec<ProbeSpec>,
    cri: Cri,
    events: mpsc::UnboundedSender<ProbeEvent>,
) -> ProbeHandle {
    let exec = ContainerExec {
        cri,
        container_id: container_id.clone(),
    };
    let target = Target {
        container,
        container_id,
        pod_ip,
        started_at: started_at.into(),
    };
    spawn_with(target, specs, exec, events)
}

/// The probed container.
#[derive(Clone)]
struct Target {
    container: String,
    container_id: String,
    pod_ip: Ipv4Addr,
    started_at: tokio::time::Instant,
}

fn spawn_with<E: Exec + Clone + Send + 'static>(
    target: Target,
    specs: Vec<ProbeSpec>,
    exec: E,
    events: mpsc::UnboundedSender<ProbeEvent>,
) -> ProbeHandle {
    let has_startup = specs.iter().any(|s| s.kind == ProbeKind::Startup);
    let (started_tx, started_rx) = watch::channel(!has_startup);
    let mut started_tx = Some(started_tx);
    let mut tasks = JoinSet::new();
    for spec in specs {
        let decides = match spec.kind {
            ProbeKind::Startup => started_tx.take(),
            ProbeKind::Liveness | ProbeKind::Readiness => None,
        };
        let started = decides.map_or_else(|| Started::Waits(started_rx.clone()), Started::Decides);
        let probe = run(target.clone(), spec, exec.clone(), started, events.clone());
        tasks.spawn(probe);
    }
    ProbeHandle { _tasks: tasks }
}

/// How a probe relates to the container having started: the startup probe decides it, the
/// others wait for it (and give up if the startup probe fails).
enum Started {
    Decides(watch::Sender<bool>),
    Waits(watch::Receiver<bool>),
}

async fn run(
    target: Target,
    spec: ProbeSpec,
    mut exec: impl Exec,
    mut started: Started,
    events: mpsc::UnboundedSender<ProbeEvent>,
) {
    tokio::time::sleep_until(target.started_at + spec.initial_delay).await;
    if let Started::Waits(started) = &mut started
        && started.wait_for(|s| *s).await.is_err()
    {
        return;
    }
    let mut tracker = ProbeTracker::new(&spec);
    let mut ticks = tokio::time::interval(spec.period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (success, message) =
            match probe_once(&spec.action, target.pod_ip, spec.timeout, &mut exec).await {
                Outcome::Success => (true, String::new()),
                Outcome::Failure(message) => (false, message),
                Outcome::Error(message) => {
                    tracing::debug!(
                        "{} probe of container {} ({}) errored: {message}",
                        spec.kind,
                        target.container,
                        target.container_id
                    );
                    continue;
                }
            };
        if let Some(healthy) = tracker.record(success) {
            let event = ProbeEvent {
                container: target.container.clone(),
                container_id: target.container_id.clone(),
                kind: spec.kind,
                healthy,
                message,
            };
            if events.send(event).is_err() {
                return;
            }
            // After the event, so the startup success reaches the worker before the readiness
            // result it unblocks.
            if let Started::Decides(started) = &started {
                started.send_replace(healthy);
            }
        }
        if tracker.finished() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicI32, AtomicU32, Ordering},
        },
        time::Instant,
    };

    use serde_json::json;
    use tokio::{net::TcpListener, task::JoinHandle};

    use super::*;

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
    /// Only a bound against a hung test: nothing here is expected to take long.
    const BOUND: Duration = Duration::from_secs(10);

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).expect("a valid Container")
    }

    fn spec(kind: ProbeKind, action: Action) -> ProbeSpec {
        ProbeSpec {
            kind,
            action,
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }
    }

    #[test]
    fn probe_specs_apply_defaults_and_resolve_named_ports() {
        let web = container(json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9000}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "healthz",
                "httpHeaders": [{"name": "X-Probe", "value": "yes"}]}},
            "livenessProbe": {"tcpSocket": {"port": "admin", "host": "10.0.0.1"},
                "initialDelaySeconds": 5, "periodSeconds": 2, "timeoutSeconds": 3,
                "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["cat", "/tmp/started"]}, "periodSeconds": 0,
                "failureThreshold": 30},
        }));
        let secs = Duration::from_secs;
        assert_eq!(
            probe_specs(&web),
            Ok(vec![
                ProbeSpec {
                    period: secs(10),
                    failure_threshold: 30,
                    ..spec(
                        ProbeKind::Startup,
                        Action::Exec(vec!["cat".into(), "/tmp/started".into()])
                    )
                },
                ProbeSpec {
                    initial_delay: secs(5),
                    period: secs(2),
                    timeout: secs(3),
                    failure_threshold: 1,
                    ..spec(
                        ProbeKind::Liveness,
                        Action::Tcp {
                            host: Some(Ipv4Addr::new(10, 0, 0, 1)),
                            port: 9000
                        }
                    )
                },
                spec(
                    ProbeKind::Readiness,
                    Action::Http {
                        host: None,
                        port: 8080,
                        path: "/healthz".into(),
                        headers: vec![("X-Probe".into(), "yes".into())],
                    }
                ),
            ])
        );
        assert_eq!(
            probe_specs(&container(json!({"name": "plain"}))),
            Ok(vec![])
        );
    }

    #[test]
    fn probe_specs_reject_what_cannot_run() {
        let field = "spec.containers[web]";
        let cases = [
            (
                json!({"readinessProbe": {"httpGet": {"port": "http"}}}),
                r#"readinessProbe.httpGet.port: no container port named "http""#,
            ),
            (
                json!({"livenessProbe": {"tcpSocket": {"port": 70000}}}),
                "livenessProbe.tcpSocket.port: 70000 is not a port number (1-65535)",
            ),
            (
                json!({"livenessProbe": {"httpGet": {"port": 80, "scheme": "HTTPS"}}}),
                r#"livenessProbe.httpGet.scheme: "HTTPS" is not supported (only "HTTP")"#,
            ),
            (
                json!({"livenessProbe": {"httpGet": {"port": 80, "host": "example.com"}}}),
                r#"livenessProbe.httpGet.host: "example.com" is not an IPv4 address"#,
            ),
            (
                json!({"readinessProbe": {"httpGet": {"port": 80,
                    "httpHeaders": [{"name": "X", "value": "a\r\nEvil: 1"}]}}}),
                r#"readinessProbe.httpGet.httpHeaders: the value of "X" contains a line break"#,
            ),
            (
                json!({"readinessProbe": {"httpGet": {"port": 80,
                    "httpHeaders": [{"name": "Bad Name", "value": "1"}]}}}),
                r#"readinessProbe.httpGet.httpHeaders: "Bad Name" is not a valid HTTP header name"#,
            ),
            (
                json!({"startupProbe": {"grpc": {"port": 9090}}}),
                "startupProbe.grpc: gRPC probes are not supported",
            ),
            (
                json!({"startupProbe": {"periodSeconds": 5}}),
                "startupProbe: must specify a handler type",
            ),
            (
                json!({"readinessProbe": {"exec": {"command": ["true"]},
                    "tcpSocket": {"port": 80}}}),
                "readinessProbe: may not specify more than 1 handler type",
            ),
            (
                json!({"readinessProbe": {"exec": {"command": []}}}),
                "readinessProbe.exec.command: required value",
            ),
            (
                json!({"livenessProbe": {"exec": {"command": ["true"]}, "successThreshold": 2}}),
                "livenessProbe.successThreshold: must be 1",
            ),
            (
                json!({"startupProbe": {"exec": {"command": ["true"]}, "successThreshold": 3}}),
                "startupProbe.successThreshold: must be 1",
            ),
            (
                json!({"readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": -1}}),
                "readinessProbe.periodSeconds: -1 must be greater than or equal to 0",
            ),
        ];
        for (mut probes, want) in cases {
            probes["name"] = json!("web");
            assert_eq!(
                probe_specs(&container(probes)),
                Err(SpecError::new(REASON, format!("{field}.{want}"))),
                "{want}"
            );
        }
        // A readiness probe may require several successes.
        let ready = container(json!({"name": "web",
            "readinessProbe": {"exec": {"command": ["true"]}, "successThreshold": 2}}));
        assert_eq!(probe_specs(&ready).unwrap()[0].success_threshold, 2);
    }

    #[test]
    fn kinds_display_as_the_kubelet() {
        let kinds = [
            ProbeKind::Startup,
            ProbeKind::Liveness,
            ProbeKind::Readiness,
        ];
        assert_eq!(
            kinds.map(|k| k.to_string()),
            ["Startup", "Liveness", "Readiness"]
        );
    }

    #[test]
    fn tracker_changes_only_at_the_thresholds() {
        use ProbeKind::*;
        // (kind, successThreshold, failureThreshold, runs (S/F), changes per run (./T/F),
        // finished afterwards)
        let cases = [
            (Readiness, 1, 3, "FFFFF", ".....", false),
            (Readiness, 1, 3, "FS", ".T", false),
            (Readiness, 1, 3, "SFFSFFFS", "T.....FT", false),
            (Readiness, 2, 1, "SFSSSF", "...T.F", false),
            (Readiness, 3, 3, "SSFSSS", ".....T", false),
            (Liveness, 1, 3, "SSSS", "....", false),
            (Liveness, 1, 3, "FFSFF", ".....", false),
            (Liveness, 1, 3, "FFSFFF", ".....F", true),
            (Liveness, 1, 1, "F", "F", true),
            (Startup, 1, 3, "FFS", "..T", true),
            (Startup, 1, 3, "FF", "..", false),
            (Startup, 1, 3, "FFF", "..F", true),
            (Startup, 1, 1, "S", "T", true),
        ];
        for (kind, success, failure, runs, want, finished) in cases {
            let mut tracker = ProbeTracker::new(&ProbeSpec {
                success_threshold: success,
                failure_threshold: failure,
                ..spec(kind, Action::Exec(vec!["true".into()]))
            });
            let changes: String = runs
                .chars()
                .map(|run| match tracker.record(run == 'S') {
                    None => '.',
                    Some(true) => 'T',
                    Some(false) => 'F',
                })
                .collect();
            let case = format!("{kind} {success}/{failure} {runs}");
            assert_eq!(changes, want, "{case}");
            assert_eq!(tracker.finished(), finished, "{case}");
        }
    }

    /// What a fake command does: exit, fail to run, or (None) never return.
    type Answer = Option<anyhow::Result<(i32, String)>>;

    /// An `Exec` answering from a closure.
    #[derive(Clone)]
    struct FakeExec<F>(F);

    impl<F> Exec for FakeExec<F>
    where
        F: FnMut(&[String]) -> Answer + Send,
    {
        fn exec(
            &mut self,
            cmd: &[String],
            _timeout: Duration,
        ) -> impl Future<Output = anyhow::Result<(i32, String)>> + Send {
            let answer = (self.0)(cmd);
            async move {
                match answer {
                    Some(answer) => answer,
                    None => std::future::pending().await,
                }
            }
        }
    }

    /// An exec that no probe of the test may call.
    fn no_exec() -> FakeExec<impl FnMut(&[String]) -> Answer> {
        FakeExec(|cmd: &[String]| panic!("unexpected exec {cmd:?}"))
    }

    #[tokio::test]
    async fn exec_probes_judge_the_exit_code() {
        let ready = Action::Exec(vec!["cat".into(), "/tmp/ready".into()]);
        let limit = Duration::from_millis(100);
        let cases = [
            (Some(Ok((0, "ok\n".to_owned()))), Outcome::Success),
            (
                Some(Ok((1, String::new()))),
                Outcome::Failure(r#"command "cat /tmp/ready" exited with 1"#.into()),
            ),
            (
                Some(Ok((1, "cat: can't open '/tmp/ready'\n".to_owned()))),
                Outcome::Failure(
                    r#"command "cat /tmp/ready" exited with 1: cat: can't open '/tmp/ready'"#
                        .into(),
                ),
            ),
            (
                Some(Err(anyhow::anyhow!("CRI ExecSync: container not running"))),
                Outcome::Error(
                    r#"command "cat /tmp/ready": CRI ExecSync: container not running"#.into(),
                ),
            ),
            (
                None,
                Outcome::Failure(r#"command "cat /tmp/ready" timed out"#.into()),
            ),
        ];
        for (answer, want) in cases {
            let mut answer = Some(answer);
            let mut exec = FakeExec(move |cmd: &[String]| {
                assert_eq!(cmd, ["cat", "/tmp/ready"]);
                answer.take().expect("one exec")
            });
            let started = Instant::now();
            assert_eq!(probe_once(&ready, LOOPBACK, limit, &mut exec).await, want);
            assert!(started.elapsed() < BOUND);
        }
    }

    /// A one-connection HTTP server answering `status`: its port, and the request it read.
    async fn http_server(status: &'static str) -> (u16, JoinHandle<String>) {
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                assert_ne!(stream.read_buf(&mut request).await.unwrap(), 0, "EOF");
            }
            let response = format!("{status}\r\nContent-Length: 0\r\n\r\n");
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (port, server)
    }

    fn http(port: u16, headers: &[(&str, &str)]) -> Action {
        Action::Http {
            host: None,
            port,
            path: "/healthz".into(),
            headers: headers.iter().map(|&(n, v)| (n.into(), v.into())).collect(),
        }
    }

    #[tokio::test]
    async fn http_probe_sends_the_kubelets_request() {
        let (port, server) = http_server("HTTP/1.1 200 OK").await;
        let action = http(port, &[("X-Probe", "yes")]);
        let limit = Duration::from_secs(1);
        assert_eq!(
            probe_once(&action, LOOPBACK, limit, &mut no_exec()).await,
            Outcome::Success
        );
        assert_eq!(
            server.await.unwrap(),
            format!(
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Probe: yes\r\n\
                 User-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            )
        );
    }

    #[test]
    fn http_request_lets_the_probe_override_headers() {
        let addr = SocketAddrV4::new(LOOPBACK, 80);
        let headers = [
            ("host", "web.example"),
            ("User-Agent", "custom"),
            ("Accept", ""),
            ("X-Twice", "1"),
            ("X-Twice", "2"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()));
        assert_eq!(
            String::from_utf8(http_request(addr, "/", &headers)).unwrap(),
            "GET / HTTP/1.1\r\nHost: web.example\r\nUser-Agent: custom\r\nX-Twice: 1\r\n\
             X-Twice: 2\r\nConnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn http_probe_judges_the_status() {
        let cases = [
            ("HTTP/1.1 204 No Content", Outcome::Success),
            ("HTTP/1.0 302 Found", Outcome::Success),
            ("HTTP/1.1 399 Whatever", Outcome::Success),
            (
                "HTTP/1.1 400 Bad Request",
                Outcome::Failure("HTTP probe failed with statuscode: 400".into()),
            ),
            (
                "HTTP/1.1 503 Service Unavailable",
                Outcome::Failure("HTTP probe failed with statuscode: 503".into()),
            ),
        ];
        for (status, want) in cases {
            let (port, _server) = http_server(status).await;
            let limit = Duration::from_secs(1);
            assert_eq!(
                probe_once(&http(port, &[]), LOOPBACK, limit, &mut no_exec()).await,
                want,
                "{status}"
            );
        }
        let (port, _server) = http_server("SSH-2.0-OpenSSH").await;
        let limit = Duration::from_secs(1);
        assert_eq!(
            probe_once(&http(port, &[]), LOOPBACK, limit, &mut no_exec()).await,
            Outcome::Failure(format!(
                r#"Get "http://127.0.0.1:{port}/healthz": malformed HTTP status line "SSH-2.0-OpenSSH""#
            ))
        );
    }

    /// A loopback port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn http_probe_fails_on_a_refused_connection() {
        let port = closed_port().await;
        let limit = Duration::from_secs(1);
        let outcome = probe_once(&http(port, &[]), LOOPBACK, limit, &mut no_exec()).await;
        let Outcome::Failure(message) = outcome else {
            panic!("{outcome:?}")
        };
        let prefix = format!(
            r#"Get "http://127.0.0.1:{port}/healthz": dial tcp 127.0.0.1:{port}: connect: "#
        );
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.contains("refused"), "{message}");
    }

    #[tokio::test]
    async fn http_probe_times_out_when_nothing_answers() {
        // Connections are accepted by the kernel (the listener's backlog) but never answered.
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let limit = Duration::from_millis(200);
        assert_eq!(
            probe_once(&http(port, &[]), LOOPBACK, limit, &mut no_exec()).await,
            Outcome::Failure(format!(
                r#"Get "http://127.0.0.1:{port}/healthz": context deadline exceeded"#
            ))
        );
        assert!(started.elapsed() < BOUND);
        drop(listener);
    }

    #[tokio::test]
    async fn tcp_probe_connects() {
        let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
        let open = listener.local_addr().unwrap().port();
        let limit = Duration::from_secs(1);
        let tcp = |port| Action::Tcp { host: None, port };
        assert_eq!(
            probe_once(&tcp(open), LOOPBACK, limit, &mut no_exec()).await,
            Outcome::Success
        );
        // The probe's own host wins over the pod IP.
        let elsewhere = Action::Tcp {
            host: Some(LOOPBACK),
            port: open,
        };
        let pod_ip = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(
            probe_once(&elsewhere, pod_ip, limit, &mut no_exec()).await,
            Outcome::Success
        );
        let closed = closed_port().await;
        let outcome = probe_once(&tcp(closed), LOOPBACK, limit, &mut no_exec()).await;
        let Outcome::Failure(message) = outcome else {
            panic!("{outcome:?}")
        };
        let prefix = format!("dial tcp 127.0.0.1:{closed}: connect: ");
        assert!(message.starts_with(&prefix), "{message}");
        drop(listener);
    }

    fn target() -> Target {
        Target {
            container: "web".into(),
            container_id: "c1".into(),
            pod_ip: LOOPBACK,
            started_at: tokio::time::Instant::now(),
        }
    }

    fn exec_spec(kind: ProbeKind, command: &str, failure_threshold: u32) -> ProbeSpec {
        ProbeSpec {
            period: Duration::from_millis(5),
            failure_threshold,
            ..spec(kind, Action::Exec(vec![command.into()]))
        }
    }

    fn event(kind: ProbeKind, healthy: bool, message: &str) -> ProbeEvent {
        ProbeEvent {
            container: "web".into(),
            container_id: "c1".into(),
            kind,
            healthy,
            message: message.into(),
        }
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<T> {
        timeout(BOUND, rx.recv()).await.expect("within the bound")
    }

    #[tokio::test]
    async fn startup_gates_liveness_and_readiness() {
        let (calls_tx, mut calls) = mpsc::unbounded_channel();
        let startups = Arc::new(AtomicU32::new(0));
        let exec = FakeExec(move |cmd: &[String]| {
            calls_tx.send(cmd[0].clone()).unwrap();
            let code = match cmd[0].as_str() {
                // Starts on the third try.
                "startup" => i32::from(startups.fetch_add(1, Ordering::SeqCst) < 2),
                "live" => 1,
                _ => 0,
            };
            Some(Ok((code, String::new())))
        });
        let specs = vec![
            exec_spec(ProbeKind::Startup, "startup", 5),
            exec_spec(ProbeKind::Liveness, "live", 2),
            exec_spec(ProbeKind::Readiness, "ready", 3),
        ];
        let (tx, mut events) = mpsc::unbounded_channel();
        let _handle = spawn_with(target(), specs, exec, tx);

        assert_eq!(
            next(&mut events).await,
            Some(event(ProbeKind::Startup, true, ""))
        );
        let mut after = vec![next(&mut events).await, next(&mut events).await];
        after.sort_by_key(|e| e.as_ref().map(|e| e.kind));
        assert_eq!(
            after,
            [
                Some(event(
                    ProbeKind::Liveness,
                    false,
                    r#"command "live" exited with 1"#
                )),
                Some(event(ProbeKind::Readiness, true, "")),
            ]
        );
        // Readiness keeps running; startup stopped once started, liveness once failed.
        let mut seen = Vec::new();
        while seen.iter().filter(|c| *c == "ready").count() < 6 {
            seen.push(next(&mut calls).await.unwrap());
        }
        assert_eq!(seen[..3], ["startup", "startup", "startup"]);
        let count = |name: &str| seen.iter().filter(|c| *c == name).count();
        assert_eq!((count("startup"), count("live")), (3, 2), "{seen:?}");
    }

    #[tokio::test]
    async fn a_failed_startup_stops_all_probes() {
        let (calls_tx, mut calls) = mpsc::unbounded_channel();
        let exec = FakeExec(move |cmd: &[String]| {
            calls_tx.send(cmd[0].clone()).unwrap();
            Some(Ok((1, String::new())))
        });
        let specs = vec![
            exec_spec(ProbeKind::Readiness, "ready", 3),
            exec_spec(ProbeKind::Startup, "startup", 2),
            exec_spec(ProbeKind::Liveness, "live", 3),
        ];
        let (tx, mut events) = mpsc::unbounded_channel();
        let _handle = spawn_with(target(), specs, exec, tx);
        assert_eq!(
            next(&mut events).await,
            Some(event(
                ProbeKind::Startup,
                false,
                r#"command "startup" exited with 1"#
            ))
        );
        // Every probe task has ended (they held the only senders).
        assert_eq!(next(&mut events).await, None);
        let mut seen = Vec::new();
        while let Ok(call) = calls.try_recv() {
            seen.push(call);
        }
        assert_eq!(seen, ["startup", "startup"]);
    }

    #[tokio::test]
    async fn readiness_follows_the_probe_both_ways() {
        let exit_code = Arc::new(AtomicI32::new(0));
        let code = exit_code.clone();
        let exec = FakeExec(move |_: &[String]| {
            Some(Ok((code.load(Ordering::SeqCst), "not yet".to_owned())))
        });
        let specs = vec![exec_spec(ProbeKind::Readiness, "ready", 1)];
        let (tx, mut events) = mpsc::unbounded_channel();
        let handle = spawn_with(target(), specs, exec, tx);
        let ready = event(ProbeKind::Readiness, true, "");
        assert_eq!(next(&mut events).await, Some(ready.clone()));
        exit_code.store(1, Ordering::SeqCst);
        assert_eq!(
            next(&mut events).await,
            Some(event(
                ProbeKind::Readiness,
                false,
                r#"command "ready" exited with 1: not yet"#
            ))
        );
        exit_code.store(0, Ordering::SeqCst);
        assert_eq!(next(&mut events).await, Some(ready));
        // Dropping the handle stops the probes.
        drop(handle);
        assert_eq!(next(&mut events).await, None);
    }
}
