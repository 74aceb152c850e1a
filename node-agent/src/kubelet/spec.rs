//! PodSpec → CRI: the sandbox and container configs the kubelet would send, and what makes a
//! pod unrunnable before anything starts. Pure: ConfigMaps and Secrets come in `PodRefs`, the
//! pod IP and node name in `Downward`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
};

use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PortMapping, Protocol,
};
use k8s_openapi::{
    api::core::v1::{
        ConfigMap, Container, ContainerPort, EnvVarSource, Pod, PodSpec, Secret, SecurityContext,
    },
    apimachinery::pkg::api::resource::Quantity,
};

use super::{PodRefs, SpecError, volumes};
use crate::model::ObjectName;

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// On every sandbox and container the agent starts, so it adopts them after a restart.
pub const LABEL_MANAGED: &str = "node-agent.io/managed";
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const ANNOTATION_CONTAINER_HASH: &str = "io.kubernetes.container.hash";

/// A pod spec the agent cannot run (the API server would have refused it).
pub const INVALID_POD_SPEC: &str = "InvalidPodSpec";
pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";
/// A container whose config cannot be made now (a missing ConfigMap, Secret or key).
pub const CREATE_CONTAINER_CONFIG_ERROR: &str = "CreateContainerConfigError";

/// The CFS period the kubelet uses for CPU limits (100 ms).
const CPU_PERIOD: i64 = 100_000;
/// The kubelet's bounds on CPU shares and quota (cgroup v1).
const MIN_SHARES: i64 = 2;
const MAX_SHARES: i64 = 262_144;
const MIN_QUOTA: i64 = 1_000;

/// Node-wide settings of the pod sandboxes.
#[derive(Clone, Debug)]
pub struct SandboxSettings {
    /// The cgroup parent of all pods, e.g. `/kubepods`.
    pub cgroup_root: String,
    /// Pod logs go to `log_root/<namespace>_<name>_<uid>`.
    pub log_root: PathBuf,
}

/// What a container's environment may ask of the pod that only the node knows.
#[derive(Clone, Debug, Default)]
pub struct Downward {
    pub pod_ip: String,
    pub node_name: String,
}

/// The pod's namespace; a manifest without one is in `default`, as `kubectl apply` puts it.
pub fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// Every container of the pod with its field path, init containers first.
fn containers(spec: &PodSpec) -> impl Iterator<Item = (String, &Container)> {
    let init = spec.init_containers.iter().flatten().enumerate();
    let app = spec.containers.iter().enumerate();
    init.map(|(i, c)| (format!("spec.initContainers[{i}]"), c))
        .chain(app.map(|(i, c)| (format!("spec.containers[{i}]"), c)))
}

/// What makes the whole pod unrunnable, found before anything starts: the first problem, with
/// the field path in the message.
pub fn validate(pod: &Pod) -> Result<(), SpecError> {
    let invalid = |message: String| SpecError::new(INVALID_POD_SPEC, message);
    let name = pod_name(pod);
    if !is_dns_subdomain(name) {
        return Err(invalid(format!(
            "metadata.name: invalid pod name {name:?}: must be a lowercase RFC 1123 subdomain"
        )));
    }
    let namespace = pod_namespace(pod);
    if !is_dns_label(namespace) {
        return Err(invalid(format!(
            "metadata.namespace: invalid namespace {namespace:?}: must be a lowercase RFC 1123 label"
        )));
    }
    let Some(spec) = pod.spec.as_ref().filter(|spec| !spec.containers.is_empty()) else {
        return Err(invalid(
            "spec.containers: Required value: a pod needs at least one container".into(),
        ));
    };

    let mut volume_names = BTreeSet::new();
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        let path = format!("spec.volumes[{i}]");
        // Volume names become directory names on the host.
        if !is_dns_label(&volume.name) {
            return Err(invalid(format!(
                "{path}.name: invalid volume name {:?}: must be a lowercase RFC 1123 label",
                volume.name
            )));
        }
        if !volume_names.insert(volume.name.as_str()) {
            return Err(invalid(format!(
                "{path}.name: duplicate volume name {:?}",
                volume.name
            )));
        }
        volumes::validate(&path, volume)?;
    }

    let mut container_names = BTreeSet::new();
    for (path, container) in containers(spec) {
        let name = &container.name;
        // Container names become log file directories.
        if !is_dns_label(name) {
            return Err(invalid(format!(
                "{path}.name: invalid container name {name:?}: must be a lowercase RFC 1123 label"
            )));
        }
        if !container_names.insert(name.as_str()) {
            return Err(invalid(format!(
                "{path}.name: duplicate container name {name:?}"
            )));
        }
        validate_container(&path, container, &volume_names)?;
    }
    Ok(())
}

/// One container's image, pull policy, ports, resources and volume mounts.
fn validate_container(
    path: &str,
    container: &Container,
    volume_names: &BTreeSet<&str>,
) -> Result<(), SpecError> {
    let invalid = |message: String| SpecError::new(INVALID_POD_SPEC, message);
    let image = container.image.as_deref().unwrap_or_default();
    image_reference(image).map_err(|reason| {
        SpecError::new(
            INVALID_IMAGE_NAME,
            format!("{path}.image: couldn't parse image name {image:?}: {reason}"),
        )
    })?;
    if let Some(policy) = container.image_pull_policy.as_deref()
        && !matches!(policy, "Always" | "IfNotPresent" | "Never")
    {
        return Err(invalid(format!(
            "{path}.imagePullPolicy: Unsupported value: {policy:?}: supported values: \
             \"Always\", \"IfNotPresent\", \"Never\""
        )));
    }
    for (j, port) in container.ports.iter().flatten().enumerate() {
        validate_port(&format!("{path}.ports[{j}]"), port).map_err(invalid)?;
    }
    linux_resources(path, container)?;
    let mut mount_paths = BTreeSet::new();
    for (j, mount) in container.volume_mounts.iter().flatten().enumerate() {
        let path = format!("{path}.volumeMounts[{j}]");
        if !volume_names.contains(mount.name.as_str()) {
            return Err(invalid(format!(
                "{path}.name: no volume named {:?} in spec.volumes",
                mount.name
            )));
        }
        if !mount.mount_path.starts_with('/') {
            return Err(invalid(format!(
                "{path}.mountPath: invalid path {:?}: must be absolute",
                mount.mount_path
            )));
        }
        if !mount_paths.insert(mount.mount_path.as_str()) {
            return Err(invalid(format!(
                "{path}.mountPath: {:?} is mounted twice",
                mount.mount_path
            )));
        }
        volumes::sub_path(mount).map_err(|e| invalid(format!("{path}.subPath: {e}")))?;
        volumes::propagation(mount)
            .map_err(|e| invalid(format!("{path}.mountPropagation: {e}")))?;
    }
    Ok(())
}

fn validate_port(path: &str, port: &ContainerPort) -> Result<(), String> {
    let range = |field: &str, value: i32, min: i32| {
        if (min..=65535).contains(&value) {
            Ok(())
        } else {
            Err(format!(
                "{path}.{field}: Invalid value: {value}: must be between {min} and 65535, inclusive"
            ))
        }
    };
    range("containerPort", port.container_port, 1)?;
    // 0 is "no host port".
    range("hostPort", port.host_port.unwrap_or(0), 0)?;
    protocol(port)
        .map(|_| ())
        .map_err(|e| format!("{path}.protocol: {e}"))
}

fn protocol(port: &ContainerPort) -> Result<Protocol, String> {
    match port.protocol.as_deref() {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!(
            "Unsupported value: {other:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
        )),
    }
}

/// The sandbox config of one attempt at running the pod.
pub fn sandbox_config(
    pod: &Pod,
    uid: &str,
    attempt: u32,
    settings: &SandboxSettings,
) -> PodSandboxConfig {
    let (name, namespace) = (pod_name(pod), pod_namespace(pod));
    let empty = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let mut labels = to_hash_map(&pod.metadata.labels);
    labels.extend(identity_labels(pod, uid));
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| {
            Some(PortMapping {
                // `validate` refused other protocols.
                protocol: protocol(port).unwrap_or(Protocol::Tcp) as i32,
                container_port: port.container_port,
                host_port: port.host_port.filter(|&p| p > 0)?,
                host_ip: port.host_ip.clone().unwrap_or_default(),
            })
        })
        .collect();
    let dns_config = spec.dns_config.as_ref().map(|dns| DnsConfig {
        servers: dns.nameservers.clone().unwrap_or_default(),
        searches: dns.searches.clone().unwrap_or_default(),
        options: (dns.options.iter().flatten())
            .filter_map(|o| {
                let name = o.name.as_deref()?;
                Some(match &o.value {
                    Some(value) => format!("{name}:{value}"),
                    None => name.to_owned(),
                })
            })
            .collect(),
    });
    let sysctls = (spec.security_context.iter())
        .flat_map(|sc| sc.sysctls.iter().flatten())
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            attempt,
        }),
        hostname: hostname(spec.hostname.as_deref().unwrap_or(name)),
        log_directory: log_directory(settings, namespace, name, uid)
            .to_string_lossy()
            .into_owned(),
        dns_config,
        port_mappings,
        labels,
        annotations: to_hash_map(&pod.metadata.annotations),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("{}/pod{uid}", settings.cgroup_root.trim_end_matches('/')),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(spec)),
                // containerd refuses a privileged container in an unprivileged sandbox.
                privileged: containers(spec).any(|(_, c)| privileged(c.security_context.as_ref())),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// As the kubelet: at most 63 characters, not ending in `-` or `.`.
fn hostname(name: &str) -> String {
    let cut = name
        .char_indices()
        .nth(63)
        .map_or(name, |(i, _)| &name[..i]);
    cut.trim_end_matches(['-', '.']).to_owned()
}

/// The kubelet's namespaces: network and IPC shared by the pod, PID per container unless the
/// pod shares it; each the node's when the pod asks for the host's.
fn namespace_options(spec: &PodSpec) -> NamespaceOption {
    let mode = |host: Option<bool>, otherwise: NamespaceMode| {
        if host == Some(true) {
            NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    let pid = if spec.share_process_namespace == Some(true) {
        NamespaceMode::Pod
    } else {
        NamespaceMode::Container
    };
    NamespaceOption {
        network: mode(spec.host_network, NamespaceMode::Pod),
        pid: mode(spec.host_pid, pid),
        ipc: mode(spec.host_ipc, NamespaceMode::Pod),
        ..Default::default()
    }
}

fn privileged(sc: Option<&SecurityContext>) -> bool {
    sc.and_then(|sc| sc.privileged) == Some(true)
}

fn to_hash_map(map: &Option<BTreeMap<String, String>>) -> HashMap<String, String> {
    map.iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The labels that let the agent recognise its own sandboxes and containers.
fn identity_labels(pod: &Pod, uid: &str) -> [(String, String); 4] {
    [
        (LABEL_POD_NAME.into(), pod_name(pod).into()),
        (LABEL_POD_NAMESPACE.into(), pod_namespace(pod).into()),
        (LABEL_POD_UID.into(), uid.into()),
        (LABEL_MANAGED.into(), "true".into()),
    ]
}

/// The config of one attempt at running `container` (an init or an app container) in the
/// pod's sandbox, with the mounts `volumes::mounts` made.
pub fn container_config(
    pod: &Pod,
    uid: &str,
    container: &Container,
    attempt: u32,
    refs: &PodRefs,
    downward: &Downward,
    mounts: Vec<Mount>,
) -> Result<ContainerConfig, SpecError> {
    let empty = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let path = containers(spec)
        .find(|(_, c)| c.name == container.name)
        .map_or_else(
            || format!("container {:?}", container.name),
            |(path, _)| path,
        );
    let env = environment(pod, uid, container, refs, downward)?;
    let expand_all = |words: &Option<Vec<String>>| {
        (words.iter().flatten())
            .map(|word| expand(word, |name| env.get(name)))
            .collect()
    };
    let (command, args) = (expand_all(&container.command), expand_all(&container.args));
    let image = container.image.clone().unwrap_or_default();
    let mut labels: HashMap<_, _> = identity_labels(pod, uid).into();
    labels.insert(LABEL_CONTAINER_NAME.into(), container.name.clone());
    let mut annotations = to_hash_map(&pod.metadata.annotations);
    annotations.insert(ANNOTATION_RESTART_COUNT.into(), attempt.to_string());
    annotations.insert(ANNOTATION_CONTAINER_HASH.into(), container_hash(container));
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: image.clone(),
            user_specified_image: image,
            ..Default::default()
        }),
        command,
        args,
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: (env.0.into_iter())
            .map(|(key, value)| KeyValue { key, value })
            .collect(),
        mounts,
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", container.name),
        stdin: container.stdin == Some(true),
        stdin_once: container.stdin_once == Some(true),
        tty: container.tty == Some(true),
        linux: Some(LinuxContainerConfig {
            resources: Some(linux_resources(&path, container)?),
            security_context: Some(security_context(pod, uid, spec, container)?),
        }),
        ..Default::default()
    })
}

/// A stable hash of the container spec (FNV-1a 64 of its JSON: k8s-openapi writes fields in a
/// fixed order and maps sorted), so a changed spec is noticed after an agent restart too.
pub fn container_hash(container: &Container) -> String {
    let json = serde_json::to_vec(container).expect("a Container always serializes to JSON");
    format!("{:016x}", stable_hash(&json))
}

/// FNV-1a 64: the same on every build and platform, unlike std's hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where the runtime writes a pod's container logs: `log_root/<namespace>_<name>_<uid>`.
pub fn log_directory(
    settings: &SandboxSettings,
    namespace: &str,
    name: &str,
    uid: &str,
) -> PathBuf {
    settings.log_root.join(format!("{namespace}_{name}_{uid}"))
}

/// A container's environment, in the order names are first defined; a later definition
/// replaces the value.
#[derive(Debug, Default)]
struct Env(Vec<(String, String)>);

impl Env {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: String, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

/// As the kubelet: `envFrom` sources first, then `env`, whose values may refer to the names
/// defined before them.
fn environment(
    pod: &Pod,
    uid: &str,
    container: &Container,
    refs: &PodRefs,
    downward: &Downward,
) -> Result<Env, SpecError> {
    let namespace = pod_namespace(pod);
    let config_error = |message: String| SpecError::new(CREATE_CONTAINER_CONFIG_ERROR, message);
    let mut env = Env::default();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &source.config_map_ref {
            match config_map(refs, namespace, &r.name) {
                Some(cm) => {
                    for (key, value) in cm.data.iter().flatten() {
                        env.set(format!("{prefix}{key}"), value.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_error(not_found("configmap", &r.name))),
            }
        }
        if let Some(r) = &source.secret_ref {
            match secret(refs, namespace, &r.name) {
                Some(secret) => {
                    for (key, value) in secret_data(secret) {
                        env.set(format!("{prefix}{key}"), text(value));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(config_error(not_found("secret", &r.name))),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (var.value.as_deref(), &var.value_from) {
            (Some(value), _) if !value.is_empty() => expand(value, |name| env.get(name)),
            (_, Some(source)) => {
                match env_source(pod, uid, &var.name, source, refs, downward)? {
                    Some(value) => value,
                    // An optional reference to something missing defines nothing.
                    None => continue,
                }
            }
            _ => String::new(),
        };
        env.set(var.name.clone(), value);
    }
    Ok(env)
}

/// The value of one `valueFrom`, `None` when it is optional and missing.
fn env_source(
    pod: &Pod,
    uid: &str,
    var: &str,
    source: &EnvVarSource,
    refs: &PodRefs,
    downward: &Downward,
) -> Result<Option<String>, SpecError> {
    let namespace = pod_namespace(pod);
    let config_error = |message: String| SpecError::new(CREATE_CONTAINER_CONFIG_ERROR, message);
    if let Some(field) = &source.field_ref {
        let path = &field.field_path;
        return field_value(pod, uid, path, downward)
            .map(Some)
            .ok_or_else(|| config_error(format!("unsupported fieldPath: {path}")));
    }
    // (kind, object, name, key, optional, the object's value of the key if the object exists)
    let (kind, object, name, key, optional, value) = if let Some(r) = &source.config_map_key_ref {
        let cm = config_map(refs, namespace, &r.name);
        let value = cm.map(|cm| cm.data.as_ref().and_then(|data| data.get(&r.key)).cloned());
        ("configmap", "ConfigMap", &r.name, &r.key, r.optional, value)
    } else if let Some(r) = &source.secret_key_ref {
        let secret = secret(refs, namespace, &r.name);
        let value = secret.map(|s| secret_data(s).get(r.key.as_str()).map(|v| text(v)));
        ("secret", "Secret", &r.name, &r.key, r.optional, value)
    } else {
        return Err(config_error(format!(
            "env {var:?}: only value, fieldRef, configMapKeyRef and secretKeyRef are supported"
        )));
    };
    match value {
        Some(Some(value)) => Ok(Some(value)),
        _ if optional == Some(true) => Ok(None),
        None => Err(config_error(not_found(kind, name))),
        Some(None) => Err(config_error(format!(
            "couldn't find key {key} in {object} {namespace}/{name}"
        ))),
    }
}

/// A `fieldRef` value, `None` for a field the downward API does not offer here.
fn field_value(pod: &Pod, uid: &str, path: &str, downward: &Downward) -> Option<String> {
    // `metadata.labels['key']`: a missing key is an empty value.
    let subscript = |field: &str, map: &Option<BTreeMap<String, String>>| {
        let key = path
            .strip_prefix(field)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => pod_name(pod).to_owned(),
        "metadata.namespace" => pod_namespace(pod).to_owned(),
        "metadata.uid" => uid.to_owned(),
        "spec.nodeName" => downward.node_name.clone(),
        "status.podIP" | "status.podIPs" => downward.pod_ip.clone(),
        _ => subscript("metadata.labels", &pod.metadata.labels)
            .or_else(|| subscript("metadata.annotations", &pod.metadata.annotations))?,
    };
    Some(value)
}

/// Expands `$(NAME)` as the kubelet does: a defined name gives its value, an undefined one
/// stays as written, and `$$` is a literal `$`.
fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(')
            && let Some(end) = tail.find(')')
        {
            let name = &tail[..end];
            match lookup(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[at..at + end + 3]),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

pub(super) fn config_map<'a>(
    refs: &'a PodRefs,
    namespace: &str,
    name: &str,
) -> Option<&'a ConfigMap> {
    refs.config_maps.get(&object_name(namespace, name))
}

pub(super) fn secret<'a>(refs: &'a PodRefs, namespace: &str, name: &str) -> Option<&'a Secret> {
    refs.secrets.get(&object_name(namespace, name))
}

fn object_name(namespace: &str, name: &str) -> ObjectName {
    ObjectName {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// The API server's wording: `configmap "app-config" not found`.
pub(super) fn not_found(kind: &str, name: &str) -> String {
    format!("{kind} {name:?} not found")
}

/// A Secret's keys and values: `data` (decoded already) and `stringData`, which the API server
/// would have merged over `data`.
pub(super) fn secret_data(secret: &Secret) -> BTreeMap<&str, &[u8]> {
    let data = (secret.data.iter().flatten()).map(|(k, v)| (k.as_str(), v.0.as_slice()));
    let string_data =
        (secret.string_data.iter().flatten()).map(|(k, v)| (k.as_str(), v.as_bytes()));
    data.chain(string_data).collect()
}

/// Bytes as an environment value (the kubelet does not check them either).
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// CPU and memory, as the kubelet turns them into cgroup settings. `path` names the container
/// in errors.
fn linux_resources(
    path: &str,
    container: &Container,
) -> Result<LinuxContainerResources, SpecError> {
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let amount = |list: &str,
                  quantities: Option<&BTreeMap<String, Quantity>>,
                  resource: &str,
                  scale: u32| {
        let Some(Quantity(text)) = quantities.and_then(|q| q.get(resource)) else {
            return Ok(None);
        };
        quantity(text, scale).map(Some).map_err(|e| {
            SpecError::new(
                INVALID_POD_SPEC,
                format!("{path}.resources.{list}.{resource}: {e}"),
            )
        })
    };
    let milli_cpu_limit = amount("limits", limits, "cpu", 3)?;
    // The API server defaults a missing request to the limit.
    let milli_cpu_request = amount("requests", requests, "cpu", 3)?.or(milli_cpu_limit);
    let memory_limit = amount("limits", limits, "memory", 0)?;
    // Unused by cgroups, but a bad value is still a bad spec.
    amount("requests", requests, "memory", 0)?;
    Ok(LinuxContainerResources {
        cpu_period: milli_cpu_limit.map_or(0, |_| CPU_PERIOD),
        cpu_quota: milli_cpu_limit.map_or(0, cpu_quota),
        cpu_shares: cpu_shares(milli_cpu_request.unwrap_or(0)),
        memory_limit_in_bytes: memory_limit.unwrap_or(0),
        ..Default::default()
    })
}

/// The kubelet's MilliCPUToShares: a pod without a request gets the minimum.
fn cpu_shares(milli_cpu: i64) -> i64 {
    (milli_cpu.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES)
}

/// The kubelet's MilliCPUToQuota: a limit of 0 is no limit.
fn cpu_quota(milli_cpu: i64) -> i64 {
    if milli_cpu == 0 {
        return 0;
    }
    (milli_cpu.saturating_mul(CPU_PERIOD) / 1000).max(MIN_QUOTA)
}

/// A Kubernetes quantity times `10^scale`, rounded up as the API rounds (`MilliValue` is scale
/// 3, `Value` scale 0): `500m`, `2`, `1.5`, `128Mi`, `1G`, `1e3`.
fn quantity(text: &str, scale: u32) -> Result<i64, String> {
    let invalid = || format!("invalid quantity {text:?}");
    let (negative, value) = parse_quantity(text).ok_or_else(invalid)?;
    if negative && value.digits != 0 {
        return Err(format!(
            "quantity {text:?} must be greater than or equal to 0"
        ));
    }
    value
        .scaled_ceil(scale)
        .ok_or_else(|| format!("quantity {text:?} is too large"))
}

/// A non-negative quantity, exactly: `digits × 10^exp10 × 2^exp2`.
#[derive(Debug, PartialEq, Eq)]
struct QuantityValue {
    digits: u128,
    exp10: i32,
    exp2: u32,
}

impl QuantityValue {
    fn scaled_ceil(&self, scale: u32) -> Option<i64> {
        if self.digits == 0 {
            return Some(0);
        }
        let value = self.digits.checked_mul(1 << self.exp2)?;
        let exp = self.exp10.checked_add(i32::try_from(scale).ok()?)?;
        let scaled = if exp >= 0 {
            value.checked_mul(10u128.checked_pow(exp.unsigned_abs())?)?
        } else {
            match 10u128.checked_pow(exp.unsigned_abs()) {
                Some(divisor) => value.div_ceil(divisor),
                // Smaller than any unit, but not zero.
                None => 1,
            }
        };
        i64::try_from(scaled).ok()
    }
}

/// `[+-]number[suffix]`: the sign, and the value without it.
fn parse_quantity(text: &str) -> Option<(bool, QuantityValue)> {
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let mut digits = 0u128;
    for d in int.bytes().chain(frac.bytes()) {
        digits = digits.checked_mul(10)?.checked_add(u128::from(d - b'0'))?;
    }
    let mut exp10 = -i32::try_from(frac.len()).ok()?;
    let mut exp2 = 0;
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = "KMGTPE".find(&suffix[..1])? as u32 + 1;
            exp2 = 10 * power;
        }
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            if !exponent
                .trim_start_matches(['+', '-'])
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                return None;
            }
            exp10 = exp10.checked_add(exponent.parse().ok()?)?;
        }
    }
    Some((
        negative,
        QuantityValue {
            digits,
            exp10,
            exp2,
        },
    ))
}

/// runAsUser, runAsGroup and runAsNonRoot (the container's over the pod's), privileged,
/// readOnlyRootFilesystem, capabilities and allowPrivilegeEscalation.
fn security_context(
    pod: &Pod,
    uid: &str,
    spec: &PodSpec,
    container: &Container,
) -> Result<LinuxContainerSecurityContext, SpecError> {
    let pod_sc = spec.security_context.as_ref();
    let sc = container.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|p| p.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|p| p.run_as_group));
    let run_as_non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|p| p.run_as_non_root));
    // The image's own user is not known here; an explicit root user is.
    if run_as_non_root == Some(true) && run_as_user == Some(0) {
        return Err(SpecError::new(
            CREATE_CONTAINER_CONFIG_ERROR,
            format!(
                "container's runAsUser breaks non-root policy (pod: \"{}_{}({uid})\", container: {})",
                pod_name(pod),
                pod_namespace(pod),
                container.name
            ),
        ));
    }
    let capabilities = sc
        .and_then(|s| s.capabilities.as_ref())
        .map(|caps| Capability {
            add_capabilities: caps.add.clone().unwrap_or_default(),
            drop_capabilities: caps.drop.clone().unwrap_or_default(),
            ..Default::default()
        });
    Ok(LinuxContainerSecurityContext {
        capabilities,
        privileged: privileged(sc),
        namespace_options: Some(namespace_options(spec)),
        run_as_user: run_as_user.map(|value| Int64Value { value }),
        run_as_group: run_as_group.map(|value| Int64Value { value }),
        readonly_rootfs: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
        supplemental_groups: pod_sc
            .and_then(|p| p.supplemental_groups.clone())
            .unwrap_or_default(),
        no_new_privs: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        ..Default::default()
    })
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Checks an image reference as the kubelet's parser (Docker's reference grammar) does;
/// the error is that parser's reason.
fn image_reference(image: &str) -> Result<(), &'static str> {
    const FORMAT: &str = "invalid reference format";
    if image.is_empty() {
        return Err("repository name must have at least one component");
    }
    if image.len() == 64
        && image
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("invalid repository name: cannot specify 64-byte hexadecimal strings");
    }
    let (name_tag, digest) = match image.split_once('@') {
        Some((name_tag, digest)) => (name_tag, Some(digest)),
        None => (image, None),
    };
    let (name, tag) = match name_tag.rsplit_once(':') {
        // A colon before the last slash is a registry port.
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (name_tag, None),
    };
    // Docker's rule: the first component is a registry only if it looks like a host.
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    };
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("invalid reference format: repository name must be lowercase");
    }
    let valid = path.split('/').all(is_path_component)
        && domain.is_none_or(is_domain)
        && tag.is_none_or(is_tag)
        && digest.is_none_or(is_digest);
    if !valid {
        return Err(FORMAT);
    }
    if name.len() > 255 {
        return Err("repository name must not be more than 255 characters");
    }
    Ok(())
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or dashes.
fn is_path_component(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.split(alnum)
            .filter(|sep| !sep.is_empty())
            .all(|sep| matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-'))
}

/// `host[:port]`, the host a DNS name, an IPv4 address or `[IPv6]`.
fn is_domain(s: &str) -> bool {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => s.split_at(end + 1),
            None => return false,
        }
    } else {
        s.split_at(s.find(':').unwrap_or(s.len()))
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => !ip.is_empty() && ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'),
        None => host.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        }),
    };
    port_ok && host_ok
}

/// `[\w][\w.-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    (1..=128).contains(&s.len())
        && word(s.as_bytes()[0])
        && s.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

/// `algorithm:hex`, the algorithm `[A-Za-z][A-Za-z0-9]*` parts joined by `+.-_`, at least 32
/// hex digits.
fn is_digest(s: &str) -> bool {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return false;
    };
    algorithm.split(['+', '.', '-', '_']).all(|part| {
        part.starts_with(|c: char| c.is_ascii_alphabetic())
            && part.bytes().all(|b| b.is_ascii_alphanumeric())
    }) && hex.len() >= 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use serde_json::{Value, json};

    use super::*;

    /// A pod `web` in `default` with this spec.
    fn pod(spec: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web", "namespace": "default",
                "labels": {"app": "web"}, "annotations": {"team": "blue"},
            },
            "spec": spec,
        }))
        .unwrap()
    }

    fn container(c: Value) -> Container {
        serde_json::from_value(c).unwrap()
    }

    fn refs() -> PodRefs {
        let mut refs = PodRefs::default();
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "app-config", "namespace": "default"},
            "data": {"mode": "fast", "LEVEL": "debug"},
        }))
        .unwrap();
        refs.config_maps
            .insert(object_name("default", "app-config"), cm);
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("password".into(), ByteString(b"hunter2".to_vec())),
                ("token".into(), ByteString(b"old".to_vec())),
            ])),
            string_data: Some(BTreeMap::from([("token".into(), "new".into())])),
            ..Default::default()
        };
        refs.secrets.insert(object_name("default", "creds"), secret);
        refs
    }

    fn downward() -> Downward {
        Downward {
            pod_ip: "10.88.0.7".into(),
            node_name: "node-1".into(),
        }
    }

    fn config(pod: &Pod, c: &Container, refs: &PodRefs) -> Result<ContainerConfig, SpecError> {
        container_config(pod, "uid-1", c, 0, refs, &downward(), Vec::new())
    }

    #[test]
    fn validate_accepts_a_pod_using_every_supported_feature() {
        let pod = pod(json!({
            "initContainers": [{"name": "setup", "image": "busybox"}],
            "containers": [{
                "name": "app", "image": "localhost:5000/team/app:v1.2",
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}],
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch", "subPath": "a/b"},
                    {"name": "cfg", "mountPath": "/etc/app", "mountPropagation": "HostToContainer"},
                ],
            }],
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "host", "hostPath": {"path": "/var/log", "type": "Directory"}},
                {"name": "cfg", "configMap": {"name": "app-config", "items": [{"key": "a", "path": "x/a", "mode": 0o600}]}},
                {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                {"name": "untyped"},
            ],
        }));
        assert_eq!(validate(&pod), Ok(()));
    }

    #[test]
    fn validate_names_the_field_and_reason_of_an_unrunnable_pod() {
        let app = |extra: Value| {
            let mut c = json!({"name": "app", "image": "busybox"});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let invalid = |m: &str| Err((INVALID_POD_SPEC, m.to_owned()));
        let image = |m: &str| Err((INVALID_IMAGE_NAME, m.to_owned()));
        // The reason and message wanted, or none.
        type Want = Result<(), (&'static str, String)>;
        let cases: Vec<(&str, Value, Want)> = vec![
            (
                "no containers",
                json!({"containers": []}),
                invalid("spec.containers: Required value: a pod needs at least one container"),
            ),
            (
                "duplicate name across init and app containers",
                json!({"initContainers": [{"name": "web", "image": "busybox"}],
                       "containers": [app(json!({})), {"name": "web", "image": "busybox"}]}),
                invalid("spec.containers[1].name: duplicate container name \"web\""),
            ),
            (
                "container name not a label",
                json!({"containers": [app(json!({"name": "../x"}))]}),
                invalid(
                    "spec.containers[0].name: invalid container name \"../x\": must be a lowercase RFC 1123 label",
                ),
            ),
            (
                "unsupported volume type",
                json!({"containers": [app(json!({}))], "volumes": [
                    {"name": "data", "awsElasticBlockStore": {"volumeID": "vol-1"}}]}),
                invalid(
                    "spec.volumes[0]: volume \"data\": unsupported volume type awsElasticBlockStore",
                ),
            ),
            (
                "two volume types",
                json!({"containers": [app(json!({}))], "volumes": [
                    {"name": "data", "emptyDir": {}, "hostPath": {"path": "/tmp"}}]}),
                invalid(
                    "spec.volumes[0]: volume \"data\": more than one volume type: emptyDir, hostPath",
                ),
            ),
            (
                "duplicate volume names",
                json!({"containers": [app(json!({}))], "volumes": [
                    {"name": "data", "emptyDir": {}}, {"name": "data", "emptyDir": {}}]}),
                invalid("spec.volumes[1].name: duplicate volume name \"data\""),
            ),
            (
                "volume name not a label",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "..", "emptyDir": {}}]}),
                invalid(
                    "spec.volumes[0].name: invalid volume name \"..\": must be a lowercase RFC 1123 label",
                ),
            ),
            (
                "mount of no volume",
                json!({"containers": [app(json!({"volumeMounts": [{"name": "data", "mountPath": "/d"}]}))]}),
                invalid(
                    "spec.containers[0].volumeMounts[0].name: no volume named \"data\" in spec.volumes",
                ),
            ),
            (
                "relative mount path",
                json!({"containers": [app(json!({"volumeMounts": [{"name": "d", "mountPath": "d"}]}))],
                       "volumes": [{"name": "d", "emptyDir": {}}]}),
                invalid(
                    "spec.containers[0].volumeMounts[0].mountPath: invalid path \"d\": must be absolute",
                ),
            ),
            (
                "same mount path twice",
                json!({"containers": [app(json!({"volumeMounts": [
                        {"name": "d", "mountPath": "/d"}, {"name": "d", "mountPath": "/d"}]}))],
                       "volumes": [{"name": "d", "emptyDir": {}}]}),
                invalid("spec.containers[0].volumeMounts[1].mountPath: \"/d\" is mounted twice"),
            ),
            (
                "subPath leaving the volume",
                json!({"containers": [app(json!({"volumeMounts": [{"name": "d", "mountPath": "/d", "subPath": "a/../../etc"}]}))],
                       "volumes": [{"name": "d", "emptyDir": {}}]}),
                invalid(
                    "spec.containers[0].volumeMounts[0].subPath: invalid path \"a/../../etc\": must be relative, without '..'",
                ),
            ),
            (
                "unknown mount propagation",
                json!({"containers": [app(json!({"volumeMounts": [{"name": "d", "mountPath": "/d", "mountPropagation": "Sideways"}]}))],
                       "volumes": [{"name": "d", "emptyDir": {}}]}),
                invalid(
                    "spec.containers[0].volumeMounts[0].mountPropagation: Unsupported value: \"Sideways\": supported values: \"Bidirectional\", \"HostToContainer\", \"None\"",
                ),
            ),
            (
                "unknown hostPath type",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "h", "hostPath": {"path": "/x", "type": "Folder"}}]}),
                invalid(
                    "spec.volumes[0]: volume \"h\": hostPath.type: Unsupported value: \"Folder\"",
                ),
            ),
            (
                "relative hostPath",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "h", "hostPath": {"path": "x"}}]}),
                invalid(
                    "spec.volumes[0]: volume \"h\": hostPath.path: invalid path \"x\": must be absolute, without '..'",
                ),
            ),
            (
                "secret without a name",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "s", "secret": {}}]}),
                invalid("spec.volumes[0]: volume \"s\": secret.secretName: Required value"),
            ),
            (
                "configMap item leaving the volume",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "c", "configMap": {
                    "name": "app-config", "items": [{"key": "a", "path": "../a"}]}}]}),
                invalid(
                    "spec.volumes[0]: volume \"c\": items[0].path: invalid path \"../a\": must be relative, without '..'",
                ),
            ),
            (
                "defaultMode out of range",
                json!({"containers": [app(json!({}))], "volumes": [{"name": "c", "configMap": {
                    "name": "app-config", "defaultMode": 0o1000}}]}),
                invalid(
                    "spec.volumes[0]: volume \"c\": defaultMode: invalid mode 512: must be between 0 and 0777 (octal)",
                ),
            ),
            (
                "empty image",
                json!({"containers": [app(json!({"image": ""}))]}),
                image(
                    "spec.containers[0].image: couldn't parse image name \"\": repository name must have at least one component",
                ),
            ),
            (
                "uppercase repository",
                json!({"containers": [app(json!({"image": "library/BusyBox:1.36"}))]}),
                image(
                    "spec.containers[0].image: couldn't parse image name \"library/BusyBox:1.36\": invalid reference format: repository name must be lowercase",
                ),
            ),
            (
                "bad tag",
                json!({"initContainers": [app(json!({"image": "busybox:-1"}))], "containers": [{"name": "b", "image": "busybox"}]}),
                image(
                    "spec.initContainers[0].image: couldn't parse image name \"busybox:-1\": invalid reference format",
                ),
            ),
            (
                "unknown pull policy",
                json!({"containers": [app(json!({"imagePullPolicy": "Sometimes"}))]}),
                invalid(
                    "spec.containers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
                ),
            ),
            (
                "container port out of range",
                json!({"containers": [app(json!({"ports": [{"containerPort": 80}, {"containerPort": 70000}]}))]}),
                invalid(
                    "spec.containers[0].ports[1].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                ),
            ),
            (
                "host port out of range",
                json!({"containers": [app(json!({"ports": [{"containerPort": 80, "hostPort": -1}]}))]}),
                invalid(
                    "spec.containers[0].ports[0].hostPort: Invalid value: -1: must be between 0 and 65535, inclusive",
                ),
            ),
            (
                "unknown protocol",
                json!({"containers": [app(json!({"ports": [{"containerPort": 80, "protocol": "ICMP"}]}))]}),
                invalid(
                    "spec.containers[0].ports[0].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
                ),
            ),
            (
                "bad quantity",
                json!({"containers": [app(json!({"resources": {"requests": {"memory": "lots"}}}))]}),
                invalid("spec.containers[0].resources.requests.memory: invalid quantity \"lots\""),
            ),
            (
                "negative quantity",
                json!({"containers": [app(json!({"resources": {"limits": {"cpu": "-1"}}}))]}),
                invalid(
                    "spec.containers[0].resources.limits.cpu: quantity \"-1\" must be greater than or equal to 0",
                ),
            ),
        ];
        for (what, spec, want) in cases {
            let got = validate(&pod(spec)).map_err(|e| (e.reason, e.message));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn validate_refuses_a_pod_name_that_is_not_a_subdomain() {
        let mut p = pod(json!({"containers": [{"name": "app", "image": "busybox"}]}));
        p.metadata.name = Some("a/../b".into());
        let e = validate(&p).unwrap_err();
        assert_eq!(e.reason, INVALID_POD_SPEC);
        assert_eq!(
            e.message,
            "metadata.name: invalid pod name \"a/../b\": must be a lowercase RFC 1123 subdomain"
        );
    }

    #[test]
    fn image_references_follow_the_docker_grammar() {
        let hex64 = "a".repeat(64);
        let digest = format!("busybox@sha256:{hex64}");
        let long_tag = format!("busybox:{}", "t".repeat(129));
        let valid = [
            "busybox",
            "busybox:1.36",
            "docker.io/library/busybox:latest",
            "localhost/app",
            "localhost:5000/team/app:v1",
            "registry.example.com/a_b/c__d/e-f---g.h:v1.0-rc_1",
            "Registry.Example.com/app",
            "[::1]:5000/app",
            "127.0.0.1:5000/app:tag",
            &digest,
        ];
        for image in valid {
            assert_eq!(image_reference(image), Ok(()), "{image}");
        }
        let format = Err("invalid reference format");
        let invalid = [
            ("", Err("repository name must have at least one component")),
            (
                "Busybox",
                Err("invalid reference format: repository name must be lowercase"),
            ),
            ("busybox:", format),
            ("busybox:-x", format),
            (long_tag.as_str(), format),
            ("busy box", format),
            ("busybox@sha256:abc", format),
            ("busybox@sha256", format),
            ("a..b", format),
            ("a___b", format),
            ("-busybox", format),
            ("busybox-", format),
            ("team//app", format),
            (":tag", format),
            ("localhost:port/app", format),
            ("[::1/app", format),
            ("-bad.example.com/app", format),
            (
                hex64.as_str(),
                Err("invalid repository name: cannot specify 64-byte hexadecimal strings"),
            ),
        ];
        for (image, want) in invalid {
            assert_eq!(image_reference(image), want, "{image}");
        }
        let long_name = format!("example.com/{}", "a".repeat(250));
        assert_eq!(
            image_reference(&long_name),
            Err("repository name must not be more than 255 characters")
        );
    }

    #[test]
    fn quantities_parse_as_the_api_rounds_them() {
        let cases = [
            ("500m", 3, Ok(500)),
            ("2", 3, Ok(2000)),
            ("1.5", 3, Ok(1500)),
            (".5", 3, Ok(500)),
            ("5.", 3, Ok(5000)),
            ("+5", 0, Ok(5)),
            ("0.0001", 3, Ok(1)),
            ("100n", 3, Ok(1)),
            ("250u", 3, Ok(1)),
            ("1m", 0, Ok(1)),
            ("0", 3, Ok(0)),
            ("-0", 3, Ok(0)),
            ("1k", 0, Ok(1_000)),
            ("1G", 0, Ok(1_000_000_000)),
            ("2T", 0, Ok(2_000_000_000_000)),
            ("1E", 0, Ok(1_000_000_000_000_000_000)),
            ("1e3", 0, Ok(1_000)),
            ("1E3", 0, Ok(1_000)),
            ("15e-1", 3, Ok(1_500)),
            ("1e+2", 0, Ok(100)),
            ("1Ki", 0, Ok(1_024)),
            ("128Mi", 0, Ok(134_217_728)),
            ("1.5Gi", 0, Ok(1_610_612_736)),
            ("2Ei", 0, Ok(2_305_843_009_213_693_952)),
            ("0.5Ki", 0, Ok(512)),
            ("1e-100", 0, Ok(1)),
        ];
        for (text, scale, want) in cases {
            assert_eq!(quantity(text, scale), want, "{text}");
        }
        for text in [
            "",
            "abc",
            "1.2.3",
            ".",
            "1Xi",
            "1ki",
            "1KiB",
            "1e",
            "1e+",
            "1e+-3",
            "--1",
            "1 ",
            "m",
            &"9".repeat(40),
        ] {
            assert_eq!(
                quantity(text, 0),
                Err(format!("invalid quantity {text:?}")),
                "{text}"
            );
        }
        assert_eq!(
            quantity("-1", 0),
            Err("quantity \"-1\" must be greater than or equal to 0".into())
        );
        for text in ["1e40", "16Ei", "9223372036854775808"] {
            assert_eq!(
                quantity(text, 3),
                Err(format!("quantity {text:?} is too large")),
                "{text}"
            );
        }
    }

    #[test]
    fn resources_become_cgroup_settings_like_the_kubelet_makes_them() {
        let cases = [
            // (limits, requests) → (period, quota, shares, memory)
            (json!(null), json!(null), (0, 0, 2, 0)),
            (
                json!({"cpu": "500m", "memory": "128Mi"}),
                json!({"cpu": "250m"}),
                (100_000, 50_000, 256, 134_217_728),
            ),
            // The request defaults to the limit.
            (
                json!({"cpu": "1"}),
                json!(null),
                (100_000, 100_000, 1024, 0),
            ),
            (
                json!(null),
                json!({"cpu": "2", "memory": "1Gi"}),
                (0, 0, 2048, 0),
            ),
            // The kubelet's minimums, and a limit of 0 is none.
            (json!({"cpu": "1m"}), json!(null), (100_000, 1_000, 2, 0)),
            (json!({"cpu": "0"}), json!(null), (100_000, 0, 2, 0)),
            (json!(null), json!({"cpu": "1000"}), (0, 0, 262_144, 0)),
        ];
        for (limits, requests, (period, quota, shares, memory)) in cases {
            let c = container(
                json!({"name": "app", "resources": {"limits": limits, "requests": requests}}),
            );
            let r = linux_resources("spec.containers[0]", &c).unwrap();
            assert_eq!(
                (
                    r.cpu_period,
                    r.cpu_quota,
                    r.cpu_shares,
                    r.memory_limit_in_bytes,
                    r.oom_score_adj
                ),
                (period, quota, shares, memory, 0),
                "limits {limits} requests {requests}"
            );
        }
    }

    #[test]
    fn sandbox_config_carries_identity_dns_ports_and_namespaces() {
        let mut p = pod(json!({
            "hostNetwork": true,
            "dnsConfig": {
                "nameservers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"],
                "options": [{"name": "ndots", "value": "5"}, {"name": "edns0"}],
            },
            "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
            "initContainers": [{"name": "setup", "image": "busybox", "securityContext": {"privileged": true}}],
            "containers": [
                {"name": "app", "image": "busybox", "ports": [
                    {"containerPort": 80},
                    {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"},
                ]},
                {"name": "side", "image": "busybox", "ports": [{"containerPort": 8080, "hostPort": 18080}]},
            ],
        }));
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_MANAGED.into(), "spoofed".into());
        let settings = SandboxSettings {
            cgroup_root: "/kubepods/".into(),
            log_root: "/var/log/pods".into(),
        };
        let config = sandbox_config(&p, "uid-1", 2, &settings);
        assert_eq!(
            config.metadata,
            Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 2,
            })
        );
        assert_eq!(config.hostname, "web");
        assert_eq!(config.log_directory, "/var/log/pods/default_web_uid-1");
        assert_eq!(
            config.dns_config,
            Some(DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into(), "edns0".into()],
            })
        );
        assert_eq!(
            config.port_mappings,
            vec![
                PortMapping {
                    protocol: Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: 8080,
                    host_port: 18080,
                    host_ip: String::new(),
                },
            ]
        );
        let labels: BTreeMap<_, _> = config.labels.into_iter().collect();
        assert_eq!(
            labels,
            BTreeMap::from([
                ("app".into(), "web".into()),
                (LABEL_POD_NAME.into(), "web".into()),
                (LABEL_POD_NAMESPACE.into(), "default".into()),
                (LABEL_POD_UID.into(), "uid-1".into()),
                (LABEL_MANAGED.into(), "true".into()),
            ])
        );
        assert_eq!(
            config.annotations,
            HashMap::from([("team".into(), "blue".into())])
        );
        let linux = config.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/poduid-1");
        assert_eq!(
            linux.sysctls,
            HashMap::from([("net.ipv4.ip_unprivileged_port_start".into(), "0".into())])
        );
        let security = linux.security_context.unwrap();
        assert!(security.privileged, "an init container is privileged");
        assert_eq!(
            security.namespace_options,
            Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                pid: NamespaceMode::Container as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            })
        );
    }

    #[test]
    fn sandbox_defaults_pod_network_no_dns_and_a_spec_hostname() {
        let settings = SandboxSettings {
            cgroup_root: "/kubepods".into(),
            log_root: "/logs".into(),
        };
        let plain = sandbox_config(
            &pod(json!({"containers": [{"name": "app"}]})),
            "u",
            0,
            &settings,
        );
        assert_eq!(plain.dns_config, None);
        assert!(plain.port_mappings.is_empty());
        let security = plain.linux.unwrap().security_context.unwrap();
        assert!(!security.privileged);
        assert_eq!(
            security.namespace_options.unwrap().network,
            NamespaceMode::Pod as i32
        );

        let p = pod(json!({
            "hostname": format!("{}-.x", "h".repeat(61)),
            "shareProcessNamespace": true, "hostIPC": true,
            "containers": [{"name": "app"}],
        }));
        let config = sandbox_config(&p, "u", 0, &settings);
        assert_eq!(
            config.hostname,
            "h".repeat(61),
            "cut to 63 characters, no trailing '-' or '.'"
        );
        let ns = config
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(
            (ns.pid, ns.ipc),
            (NamespaceMode::Pod as i32, NamespaceMode::Node as i32)
        );
    }

    #[test]
    fn container_config_translates_the_container() {
        let p = pod(json!({
            "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "supplementalGroups": [4000]},
            "containers": [{"name": "app"}, {
                "name": "web", "image": "busybox:1.36",
                "command": ["/bin/sh", "-c"], "args": ["echo $(GREETING) $(UNDEFINED) $$(GREETING) on $(NODE)"],
                "workingDir": "/srv", "tty": true, "stdin": true,
                "env": [{"name": "GREETING", "value": "hello"}, {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}},
                "securityContext": {
                    "runAsUser": 2000, "privileged": false, "readOnlyRootFilesystem": true,
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                },
            }],
        }));
        let c = &p.spec.as_ref().unwrap().containers[1];
        let mount = Mount {
            container_path: "/data".into(),
            host_path: "/pods/x/volumes/data".into(),
            ..Default::default()
        };
        let config =
            container_config(&p, "uid-1", c, 3, &refs(), &downward(), vec![mount.clone()]).unwrap();
        assert_eq!(
            config.metadata,
            Some(ContainerMetadata {
                name: "web".into(),
                attempt: 3
            })
        );
        assert_eq!(config.image.unwrap().image, "busybox:1.36");
        assert_eq!(config.command, ["/bin/sh", "-c"]);
        assert_eq!(
            config.args,
            ["echo hello $(UNDEFINED) $(GREETING) on node-1"]
        );
        assert_eq!(config.working_dir, "/srv");
        assert_eq!(config.mounts, [mount]);
        assert_eq!(config.log_path, "web/3.log");
        assert!(config.tty && config.stdin && !config.stdin_once);
        let labels: BTreeMap<_, _> = config.labels.into_iter().collect();
        assert_eq!(
            labels,
            BTreeMap::from([
                (LABEL_CONTAINER_NAME.into(), "web".into()),
                (LABEL_POD_NAME.into(), "web".into()),
                (LABEL_POD_NAMESPACE.into(), "default".into()),
                (LABEL_POD_UID.into(), "uid-1".into()),
                (LABEL_MANAGED.into(), "true".into()),
            ])
        );
        let annotations: BTreeMap<_, _> = config.annotations.into_iter().collect();
        assert_eq!(
            annotations,
            BTreeMap::from([
                ("team".into(), "blue".into()),
                (ANNOTATION_RESTART_COUNT.into(), "3".into()),
                (ANNOTATION_CONTAINER_HASH.into(), container_hash(c)),
            ])
        );
        let linux = config.linux.unwrap();
        let resources = linux.resources.unwrap();
        assert_eq!(
            (
                resources.cpu_period,
                resources.cpu_quota,
                resources.cpu_shares,
                resources.memory_limit_in_bytes
            ),
            (100_000, 25_000, 256, 67_108_864)
        );
        let security = linux.security_context.unwrap();
        assert_eq!(
            security.run_as_user,
            Some(Int64Value { value: 2000 }),
            "the container's over the pod's"
        );
        assert_eq!(
            security.run_as_group,
            Some(Int64Value { value: 3000 }),
            "the pod's"
        );
        assert_eq!(security.supplemental_groups, [4000]);
        assert!(security.readonly_rootfs && security.no_new_privs && !security.privileged);
        assert_eq!(
            security.capabilities,
            Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            })
        );
        assert_eq!(
            security.namespace_options.unwrap().pid,
            NamespaceMode::Container as i32,
            "the container's namespaces are the sandbox's"
        );
    }

    #[test]
    fn security_defaults_and_the_non_root_policy() {
        let p =
            pod(json!({"containers": [{"name": "app", "securityContext": {"privileged": true}}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let security = config(&p, c, &refs())
            .unwrap()
            .linux
            .unwrap()
            .security_context
            .unwrap();
        assert!(security.privileged);
        assert!(!security.no_new_privs && !security.readonly_rootfs);
        assert_eq!((security.run_as_user, security.capabilities), (None, None));

        // runAsNonRoot from the pod, root from the container.
        let p = pod(json!({
            "securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "app", "securityContext": {"runAsUser": 0}}],
        }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            config(&p, c, &refs()).unwrap_err(),
            SpecError::new(
                CREATE_CONTAINER_CONFIG_ERROR,
                "container's runAsUser breaks non-root policy (pod: \"web_default(uid-1)\", container: app)"
            )
        );
        // The container may lift the pod's policy.
        let p = pod(json!({
            "securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "app", "securityContext": {"runAsUser": 0, "runAsNonRoot": false}}],
        }));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(config(&p, c, &refs()).is_ok());
    }

    #[test]
    fn environment_resolves_every_source_in_the_kubelet_order() {
        let mut p = pod(json!({"containers": [{"name": "app"}]}));
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tier".into(), "front".into());
        let c = container(json!({
            "name": "app",
            "envFrom": [
                {"configMapRef": {"name": "app-config"}},
                {"secretRef": {"name": "creds"}, "prefix": "S_"},
                {"configMapRef": {"name": "absent", "optional": true}},
            ],
            "env": [
                {"name": "mode", "value": "slow"},
                {"name": "URL", "value": "http://$(POD_IP):80/$(LEVEL)?$$(LEVEL)"},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "LATE", "value": "$(POD_IP)"},
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
                {"name": "NOLABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['team']"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "mode"}}},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "NOKEY", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "x", "optional": true}}},
                {"name": "NOSECRET", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": true}}},
                {"name": "EMPTY"},
            ],
        }));
        let env = environment(&p, "uid-1", &c, &refs(), &downward()).unwrap();
        let got: Vec<(&str, &str)> = env
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("LEVEL", "debug"),
                // Defined by the ConfigMap first, replaced by `env`, keeping its place.
                ("mode", "slow"),
                ("S_password", "hunter2"),
                ("S_token", "new"),
                // POD_IP is not defined yet when URL is expanded.
                ("URL", "http://$(POD_IP):80/debug?$(LEVEL)"),
                ("POD_IP", "10.88.0.7"),
                ("LATE", "10.88.0.7"),
                ("NAME", "web"),
                ("NS", "default"),
                ("UID", "uid-1"),
                ("TIER", "front"),
                ("NOLABEL", ""),
                ("TEAM", "blue"),
                ("NODE", "node-1"),
                ("CM", "fast"),
                ("PASSWORD", "hunter2"),
                ("TOKEN", "new"),
                ("EMPTY", ""),
            ]
        );
    }

    #[test]
    fn environment_errors_use_the_kubelet_wording() {
        let cases = [
            (
                json!({"envFrom": [{"configMapRef": {"name": "absent"}}]}),
                "configmap \"absent\" not found",
            ),
            (
                json!({"envFrom": [{"secretRef": {"name": "absent"}}]}),
                "secret \"absent\" not found",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]}),
                "configmap \"absent\" not found",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "x"}}}]}),
                "couldn't find key x in ConfigMap default/app-config",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}),
                "secret \"absent\" not found",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "x"}}}]}),
                "couldn't find key x in Secret default/creds",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]}),
                "unsupported fieldPath: status.hostIP",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}),
                "env \"A\": only value, fieldRef, configMapKeyRef and secretKeyRef are supported",
            ),
        ];
        let p = pod(json!({"containers": [{"name": "app"}]}));
        for (extra, message) in cases {
            let mut c = json!({"name": "app"});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            let c = container(c);
            assert_eq!(
                config(&p, &c, &refs()).unwrap_err(),
                SpecError::new(CREATE_CONTAINER_CONFIG_ERROR, message),
                "{extra}"
            );
        }
    }

    #[test]
    fn expansion_matches_the_kubelet() {
        let lookup = |name: &str| match name {
            "A" => Some("a"),
            "EMPTY" => Some(""),
            _ => None,
        };
        let cases = [
            ("$(A)", "a"),
            ("x$(A)y$(A)", "xaya"),
            ("$(EMPTY)", ""),
            ("$(B)", "$(B)"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$a"),
            ("$$$$", "$$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$(A", "$(A"),
            ("$x", "$x"),
            ("$()", "$()"),
            ("$($(A)", "$($(A)"),
            ("ä$(A)ö", "äaö"),
            ("no refs", "no refs"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, lookup), want, "{input}");
        }
    }

    #[test]
    fn container_hash_is_stable_and_follows_the_spec() {
        let c = container(
            json!({"name": "app", "image": "busybox:1.36", "env": [{"name": "A", "value": "1"}]}),
        );
        // Pinned: a different hash after an upgrade would restart every running container.
        assert_eq!(container_hash(&c), "22387b17f7f2b553");
        assert_eq!(container_hash(&c.clone()), container_hash(&c));
        let mut changed = c.clone();
        changed.image = Some("busybox:1.37".into());
        assert_ne!(container_hash(&changed), container_hash(&c));
        let mut changed = c.clone();
        changed.env.as_mut().unwrap()[0].value = Some("2".into());
        assert_ne!(container_hash(&changed), container_hash(&c));
    }
}
