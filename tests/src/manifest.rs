//! Manifests as a user writes them, for the agent's manifest directory.
use std::{collections::BTreeMap, fs, io, net::Ipv4Addr, path::Path, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, ExecAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
        Pod, PodSpec, Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::json;

use crate::image;

/// A ClusterIP Service; ports are (name, port, protocol).
pub fn service(name: &str, cluster_ip: Ipv4Addr, ports: &[(&str, u16, &str)]) -> String {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto, "targetPort": n}))
        .collect();
    yaml(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip.to_string(), "ports": ports},
    }))
}

/// An EndpointSlice of `service` with one ready endpoint per address; ports are
/// (name, port, protocol).
pub fn endpoint_slice(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    addresses: &[Ipv4Addr],
) -> String {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    yaml(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    }))
}

/// The container of an `HttpdPod`.
pub const HTTPD: &str = "httpd";
/// Where an `HttpdPod` mounts its `events` directory.
pub const EVENTS: &str = "/events";
/// How often an `HttpdPod`'s readiness probe runs (one failure makes the pod unready).
pub const READINESS_PERIOD: Duration = Duration::from_secs(1);
/// The file an `HttpdPod` creates at start and its readiness probe reads.
pub const READY_FILE: &str = "/tmp/ready";
/// Run in an `HttpdPod`'s container (ExecSync), kills httpd: the container exits with 143.
pub const CRASH: &[&str] = &["sh", "-c", "kill $(cat /tmp/httpd.pid)"];

/// A busybox pod whose container `httpd` answers `GET /` on `port` with the pod's name (one
/// line). Its shell is PID 1 and httpd its child, so `CRASH` ends the container, and SIGTERM
/// ends it with 0 (appending `sigterm` to `EVENTS`/log when `events` is set).
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpdPod<'a> {
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub port: u16,
    /// A readiness exec probe reading `READY_FILE` every `READINESS_PERIOD`.
    pub readiness: bool,
    /// A shell command run as the preStop hook.
    pub pre_stop: Option<&'a str>,
    /// A shell command run by an init container `init` before httpd starts.
    pub init: Option<&'a str>,
    /// A host directory mounted at `EVENTS` (a hostPath volume).
    pub events: Option<&'a Path>,
}

impl HttpdPod<'_> {
    pub fn pod(&self) -> Pod {
        let script = format!(
            "mkdir -p /www && echo {name} > /www/index.html && touch {READY_FILE}\n\
             trap 'test -d {EVENTS} && echo sigterm >> {EVENTS}/log; exit 0' TERM\n\
             httpd -f -p {port} -h /www & echo $! > /tmp/httpd.pid\n\
             wait $!\n",
            name = self.name,
            port = self.port,
        );
        let exec = |command: &str| ExecAction {
            command: Some(shell(command)),
        };
        let mut container = busybox(HTTPD, &script);
        container.ports = Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: self.port.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]);
        container.readiness_probe = self.readiness.then(|| Probe {
            exec: Some(exec(&format!("cat {READY_FILE}"))),
            period_seconds: Some(READINESS_PERIOD.as_secs() as i32),
            failure_threshold: Some(1),
            success_threshold: Some(1),
            timeout_seconds: Some(1),
            ..Default::default()
        });
        container.lifecycle = self.pre_stop.map(|command| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(exec(command)),
                ..Default::default()
            }),
            ..Default::default()
        });
        let volumes = self.events.map(|dir| {
            container.volume_mounts = Some(vec![VolumeMount {
                name: "events".into(),
                mount_path: EVENTS.into(),
                ..Default::default()
            }]);
            vec![Volume {
                name: "events".into(),
                host_path: Some(HostPathVolumeSource {
                    path: dir.display().to_string(),
                    type_: Some("Directory".into()),
                }),
                ..Default::default()
            }]
        });
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.into()),
                namespace: Some("default".into()),
                labels: Some(string_map(self.labels)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                init_containers: self.init.map(|command| vec![busybox("init", command)]),
                containers: vec![container],
                volumes,
                termination_grace_period_seconds: Some(10),
                ..Default::default()
            }),
            status: None,
        }
    }

    pub fn yaml(&self) -> String {
        to_yaml(&self.pod())
    }
}

/// A container `name` of the local busybox image running `sh -c SCRIPT`.
pub fn busybox(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(image::BUSYBOX.into()),
        // The tag is `latest`, whose default policy (Always) would pull: no registry here.
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(shell(script)),
        ..Default::default()
    }
}

fn shell(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// A ClusterIP Service of the pods `selector` selects: `port`/TCP to their `target_port`.
pub fn selector_service(
    name: &str,
    cluster_ip: Ipv4Addr,
    selector: &[(&str, &str)],
    port: u16,
    target_port: u16,
) -> String {
    to_yaml(&Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.to_string()),
            selector: Some(string_map(selector)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: port.into(),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(target_port.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A Kubernetes object (with its apiVersion and kind), as YAML.
pub fn to_yaml(object: &impl k8s_openapi::serde::Serialize) -> String {
    serde_yaml::to_string(object).expect("a Kubernetes object is valid YAML")
}

/// Any object, as YAML.
pub fn yaml(value: serde_json::Value) -> String {
    serde_yaml::to_string(&value).expect("a JSON value is valid YAML")
}

/// Writes a manifest into `dir` through a rename, as editors and config tools do, so the agent
/// never reads half a file.
pub fn write(dir: &Path, name: &str, text: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(tmp, dir.join(name))
}
