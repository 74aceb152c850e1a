//! Manifests as a user writes them, for the agent's manifest directory.
use std::{fs, io, net::Ipv4Addr, path::Path};

use serde_json::json;

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
