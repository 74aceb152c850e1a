//! The `--config` file: the agent's settings in the shape of kube-proxy's
//! `KubeProxyConfiguration` and the kubelet's `KubeletConfiguration` where they overlap with the
//! agent's flags (same field names), plus the agent's own few. Flags given on the command line
//! override the file; the file overrides the flags' defaults.
use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, de};

use crate::{
    agent::{RunConfig, Source},
    model::Ipv4Cidr,
    source::api::ApiConfig,
};

pub const API_VERSION: &str = "node-agent.io/v1alpha1";
pub const KIND: &str = "NodeAgentConfiguration";

/// The config file. Every field is optional: an absent one leaves the flag's value.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    /// `node-agent.io/v1alpha1` when given.
    pub api_version: Option<String>,
    /// `NodeAgentConfiguration` when given.
    pub kind: Option<String>,

    // KubeProxyConfiguration.
    /// --node-name.
    pub hostname_override: Option<String>,
    /// --cluster-cidr (kube-proxy takes one IPv4 range here).
    #[serde(rename = "clusterCIDR", default, deserialize_with = "parsed")]
    pub cluster_cidr: Option<Ipv4Cidr>,
    /// --nodeport-addresses.
    #[serde(default, deserialize_with = "parsed_list")]
    pub node_port_addresses: Option<Vec<Ipv4Cidr>>,
    /// --health-bind.
    pub healthz_bind_address: Option<SocketAddr>,

    // KubeletConfiguration.
    /// --manifests: the directory of static Pods (and, for the agent, their Services).
    pub static_pod_path: Option<PathBuf>,
    /// --cri-endpoint.
    pub container_runtime_endpoint: Option<String>,
    /// --pod-cidr.
    #[serde(rename = "podCIDR", default, deserialize_with = "parsed")]
    pub pod_cidr: Option<Ipv4Cidr>,
    /// --cgroup-root.
    pub cgroup_root: Option<String>,

    // The agent's own (neither component has them as config fields).
    /// --service-cidr.
    #[serde(rename = "serviceCIDR", default, deserialize_with = "parsed")]
    pub service_cidr: Option<Ipv4Cidr>,
    /// --node-ips.
    #[serde(rename = "nodeIPs")]
    pub node_ips: Option<Vec<Ipv4Addr>>,
    /// --devices.
    pub devices: Option<Vec<String>>,
}

/// The cause is in the message (one line) rather than a `source` printed again.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    /// An unknown field, a wrong type or a bad value, with its line.
    #[error("config {path}: {error}")]
    Parse {
        path: PathBuf,
        error: serde_yaml::Error,
    },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.into(),
        error,
    })?;
    parse(path, &text)
}

/// Parses `text`, read from `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    let file: ConfigFile = serde_yaml::from_str(text).map_err(|error| ConfigError::Parse {
        path: path.into(),
        error,
    })?;
    let invalid = |reason| ConfigError::Invalid {
        path: path.into(),
        reason,
    };
    if let Some(version) = file.api_version.as_deref().filter(|v| *v != API_VERSION) {
        return Err(invalid(format!(
            "apiVersion {version:?} is not {API_VERSION:?}"
        )));
    }
    if let Some(kind) = file.kind.as_deref().filter(|k| *k != KIND) {
        return Err(invalid(format!("kind {kind:?} is not {KIND:?}")));
    }
    Ok(file)
}

/// The settings `run` uses: `flags` (the command line with its defaults) with the `file`'s
/// values for every flag not given on the command line (`given` answers by clap argument id).
/// Errors when neither names the manifest directory.
pub fn effective(
    mut flags: RunConfig,
    file: ConfigFile,
    given: impl Fn(&str) -> bool,
) -> Result<RunConfig, String> {
    fn set<T>(field: &mut T, from_file: Option<T>, given: bool) {
        if let Some(value) = from_file.filter(|_| !given) {
            *field = value;
        }
    }
    if let Source::Manifests(dir) = &mut flags.source {
        set(dir, file.static_pod_path, given("manifests"));
    }
    set(&mut flags.devices, file.devices, given("devices"));
    set(
        &mut flags.health_bind,
        file.healthz_bind_address,
        given("health_bind"),
    );
    let node = &mut flags.node;
    set(&mut node.name, file.hostname_override, given("node_name"));
    set(&mut node.ips, file.node_ips, given("node_ips"));
    set(
        &mut node.service_cidr,
        file.service_cidr.map(Some),
        given("service_cidr"),
    );
    set(
        &mut node.cluster_cidr,
        file.cluster_cidr.map(Some),
        given("cluster_cidr"),
    );
    set(
        &mut node.nodeport_addresses,
        file.node_port_addresses,
        given("nodeport_addresses"),
    );
    // Proxy only: the kubelet's settings have nothing to apply to.
    if let Some(kubelet) = &mut flags.kubelet {
        set(
            &mut kubelet.cri_endpoint,
            file.container_runtime_endpoint,
            given("cri_endpoint"),
        );
        set(
            &mut kubelet.pod_cidr,
            file.pod_cidr.map(Some),
            given("pod_cidr"),
        );
        set(
            &mut kubelet.cgroup_root,
            file.cgroup_root,
            given("cgroup_root"),
        );
    }
    Ok(flags)
}

/// With no manifest directory (flag or staticPodPath) and no kubeconfig, a pod follows the
/// in-cluster API; elsewhere there is nothing to follow.
pub fn in_cluster_unless_given(run: &mut RunConfig, in_cluster: bool) -> Result<(), String> {
    match &run.source {
        Source::Manifests(dir) if dir.as_os_str().is_empty() => {
            if !in_cluster {
                return Err(
                    "nothing to follow: give --manifests DIR (or staticPodPath in \
                            --config) or --kubeconfig FILE; in a pod, the in-cluster API is used"
                        .into(),
                );
            }
            run.source = Source::Api(ApiConfig::InCluster);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A string field parsed with the type's `FromStr` (a CIDR).
fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err: fmt::Display>,
{
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(de::Error::custom))
        .transpose()
}

fn parsed_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err: fmt::Display>,
{
    Option::<Vec<String>>::deserialize(d)?
        .map(|list| {
            list.iter()
                .map(|s| s.parse().map_err(de::Error::custom))
                .collect()
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{KubeletConfig, NodeConfig};

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    /// The command line's defaults, as `run --manifests /m` gives them.
    fn defaults() -> RunConfig {
        RunConfig {
            source: Source::Manifests("/m".into()),
            devices: vec![],
            health_bind: "127.0.0.1:10256".parse().unwrap(),
            metrics_bind: "127.0.0.1:10249".parse().unwrap(),
            bpffs: "/sys/fs/bpf/node-agent".into(),
            node: NodeConfig {
                name: "host".into(),
                ips: vec![],
                service_cidr: None,
                cluster_cidr: None,
                nodeport_addresses: vec![],
            },
            kubelet: Some(KubeletConfig {
                cri_endpoint: "unix:///run/containerd/containerd.sock".into(),
                pod_cidr: None,
                cni_conf_dir: "/etc/cni/net.d".into(),
                root_dir: "/var/lib/node-agent".into(),
                cgroup_root: "/kubepods".into(),
            }),
        }
    }

    const FULL: &str = "\
apiVersion: node-agent.io/v1alpha1
kind: NodeAgentConfiguration
hostnameOverride: node-1
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [192.168.0.0/24, 10.0.0.1/32]
healthzBindAddress: 0.0.0.0:10256
staticPodPath: /etc/kubernetes/manifests
containerRuntimeEndpoint: unix:///run/crio/crio.sock
podCIDR: 10.244.1.0/24
cgroupRoot: /pods
serviceCIDR: 10.96.0.0/12
nodeIPs: [192.168.0.10]
devices: [eth0, eth1]
";

    #[test]
    fn parses_every_field() {
        let file = parse(Path::new("c.yaml"), FULL).unwrap();
        assert_eq!(
            file,
            ConfigFile {
                api_version: Some(API_VERSION.into()),
                kind: Some(KIND.into()),
                hostname_override: Some("node-1".into()),
                cluster_cidr: Some(cidr("10.244.0.0/16")),
                node_port_addresses: Some(vec![cidr("192.168.0.0/24"), cidr("10.0.0.1/32")]),
                healthz_bind_address: Some("0.0.0.0:10256".parse().unwrap()),
                static_pod_path: Some("/etc/kubernetes/manifests".into()),
                container_runtime_endpoint: Some("unix:///run/crio/crio.sock".into()),
                pod_cidr: Some(cidr("10.244.1.0/24")),
                cgroup_root: Some("/pods".into()),
                service_cidr: Some(cidr("10.96.0.0/12")),
                node_ips: Some(vec!["192.168.0.10".parse().unwrap()]),
                devices: Some(vec!["eth0".into(), "eth1".into()]),
            }
        );
        assert_eq!(
            parse(Path::new("e.yaml"), "{}").unwrap(),
            ConfigFile::default()
        );
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        for (text, expected) in [
            // A KubeProxyConfiguration field the agent has no use for.
            (
                "conntrack: {maxPerCore: 32768}",
                "unknown field `conntrack`",
            ),
            ("clusterCidr: 10.0.0.0/8", "unknown field `clusterCidr`"),
            (
                "clusterCIDR: 10.0.0.0/33",
                "\"10.0.0.0/33\" is not an IPv4 CIDR",
            ),
            ("nodePortAddresses: [x]", "\"x\" is not an IPv4 CIDR"),
            ("healthzBindAddress: 0.0.0.0", "invalid socket address"),
            ("devices: eth0", "devices: invalid type"),
            (
                "kind: KubeProxyConfiguration",
                "kind \"KubeProxyConfiguration\" is not",
            ),
            ("apiVersion: v1", "apiVersion \"v1\" is not"),
            ("- a", "invalid type: sequence"),
        ] {
            let error = parse(Path::new("/etc/node-agent/config.yaml"), text)
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with("config /etc/node-agent/config.yaml: ")
                    && error.contains(expected),
                "{text}: {error}"
            );
        }
        let error = load(Path::new("/nonexistent/config.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("reading config /nonexistent/config.yaml: "),
            "{error}"
        );
    }

    #[test]
    fn flags_given_override_the_file_which_overrides_defaults() {
        let file = || parse(Path::new("c.yaml"), FULL).unwrap();
        // Nothing given: every field from the file.
        let run = effective(defaults(), file(), |_| false).unwrap();
        assert!(
            matches!(&run.source, Source::Manifests(d) if d == Path::new("/etc/kubernetes/manifests"))
        );
        assert_eq!(run.devices, ["eth0", "eth1"]);
        assert_eq!(run.health_bind, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(run.node.name, "node-1");
        assert_eq!(run.node.ips, ["192.168.0.10".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(run.node.service_cidr, Some(cidr("10.96.0.0/12")));
        assert_eq!(run.node.cluster_cidr, Some(cidr("10.244.0.0/16")));
        assert_eq!(run.node.nodeport_addresses.len(), 2);
        let kubelet = run.kubelet.unwrap();
        assert_eq!(kubelet.cri_endpoint, "unix:///run/crio/crio.sock");
        assert_eq!(kubelet.pod_cidr, Some(cidr("10.244.1.0/24")));
        assert_eq!(kubelet.cgroup_root, "/pods");

        // Everything given: the command line wins.
        let run = effective(defaults(), file(), |_| true).unwrap();
        let expected = defaults();
        assert!(matches!(&run.source, Source::Manifests(d) if d == Path::new("/m")));
        assert!(matches!(expected.source, Source::Manifests(_)));
        assert_eq!(run.health_bind, expected.health_bind);
        assert_eq!(run.node.name, "host");
        assert_eq!(run.node.cluster_cidr, None);
        assert!(run.node.ips.is_empty() && run.devices.is_empty());
        let kubelet = run.kubelet.unwrap();
        assert_eq!(
            kubelet.cri_endpoint,
            "unix:///run/containerd/containerd.sock"
        );
        assert_eq!(
            (kubelet.pod_cidr, kubelet.cgroup_root.as_str()),
            (None, "/kubepods")
        );

        // Field by field: only the flag given keeps its value.
        for (flag, check) in [
            (
                "cluster_cidr",
                (|r: &RunConfig| r.node.cluster_cidr.is_none()) as fn(&RunConfig) -> bool,
            ),
            ("node_name", |r| r.node.name == "host"),
            ("pod_cidr", |r| {
                r.kubelet.as_ref().unwrap().pod_cidr.is_none()
            }),
            ("health_bind", |r| r.health_bind.ip().is_loopback()),
        ] {
            let run = effective(defaults(), file(), |id| id == flag).unwrap();
            assert!(check(&run), "{flag}");
            assert_eq!(run.devices, ["eth0", "eth1"], "{flag}");
        }
    }

    #[test]
    fn proxy_only_ignores_the_kubelet_fields_and_a_manifest_dir_is_needed() {
        let mut proxy = defaults();
        proxy.kubelet = None;
        let run = effective(proxy, parse(Path::new("c.yaml"), FULL).unwrap(), |_| false).unwrap();
        assert!(run.kubelet.is_none());

        let mut none = defaults();
        none.source = Source::Manifests(PathBuf::new());
        let mut run = effective(none, ConfigFile::default(), |_| false).unwrap();
        let error = in_cluster_unless_given(&mut run, false).err().unwrap();
        assert!(
            error.contains("--manifests DIR (or staticPodPath"),
            "{error}"
        );
        in_cluster_unless_given(&mut run, true).unwrap();
        assert!(matches!(run.source, Source::Api(ApiConfig::InCluster)));
    }
}
