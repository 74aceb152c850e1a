//! Every YAML document under deploy/ is the Kubernetes object it claims to be, with no field
//! the schema lacks (k8s-openapi's types drop unknown fields silently, so each document goes
//! through its type and back and nothing may be lost or changed); node-agent's config files
//! (and the ConfigMap's) parse with the agent's own parser; and the RBAC roles grant exactly
//! what node-agent/src/rbac.rs says the agent calls.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
};
use node_agent::{
    config,
    rbac::{self, ApiAccess},
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under deploy/, with its file.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    assert!(files.len() >= 10, "deploy/ has only {files:?}");
    let mut docs = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::to_value(
                serde_yaml::Value::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display())),
            )
            .unwrap();
            docs.push((file.clone(), value));
        }
    }
    docs
}

/// The paths where `original` has something `round_trip` does not (an unknown field) or
/// differs from it.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => lost(value, other, &path, out),
                    None => out.push(format!("{path}: not in the schema")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} became {b}")),
        _ => {}
    }
}

/// Deserializes `doc` as `T` and back: an error names the field's path.
fn check<T: Resource + DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(doc).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    lost(
        doc,
        &serde_json::to_value(&typed).unwrap(),
        "",
        &mut problems,
    );
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(problems.join("; "))
    }
}

/// Checks `doc` as the kind it names; Err for a kind this test does not know.
fn check_kind(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    macro_rules! kinds {
        ($($t:ty),*) => {
            $(if (api_version, kind) == (<$t>::API_VERSION, <$t>::KIND) {
                return check::<$t>(doc).map(drop);
            })*
        };
    }
    kinds!(
        DaemonSet,
        ServiceAccount,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        ConfigMap,
        Secret,
        Service,
        EndpointSlice,
        Pod
    );
    if (api_version, kind) == (config::API_VERSION, config::KIND) {
        let text = serde_yaml::to_string(doc).unwrap();
        return config::parse(Path::new("-"), &text)
            .map(drop)
            .map_err(|e| e.to_string());
    }
    Err(format!("unknown kind {api_version}/{kind}"))
}

#[test]
fn every_document_is_the_kind_it_claims_with_no_unknown_field() {
    let mut failures = Vec::new();
    for (file, doc) in documents() {
        if let Err(e) = check_kind(&doc) {
            failures.push(format!("{} ({}): {e}", file.display(), doc["kind"]));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_checks_catch_unknown_and_mistyped_fields() {
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 80, "protocl": "TCP"}]},
    });
    let error = check_kind(&service).unwrap_err();
    assert!(
        error.contains(".spec.ports[0].protocl: not in the schema"),
        "{error}"
    );
    let mut daemonset = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d"},
        "spec": {"selector": {}, "template": {"spec": {"hostNetwork": "yes", "containers": []}}},
    });
    let error = check_kind(&daemonset).unwrap_err();
    assert!(error.contains("spec.template.spec.hostNetwork"), "{error}");
    daemonset["apiVersion"] = "extensions/v1beta1".into();
    assert!(check_kind(&daemonset).unwrap_err().contains("unknown kind"));
    let config = serde_json::json!({"apiVersion": config::API_VERSION, "kind": config::KIND, "conntrack": {}});
    assert!(
        check_kind(&config)
            .unwrap_err()
            .contains("unknown field `conntrack`")
    );
}

fn find<T: Resource + DeserializeOwned + Serialize>(name: &str) -> T {
    let docs = documents();
    let doc = docs
        .iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == T::KIND && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {} {name} under deploy/", T::KIND));
    check(doc).unwrap()
}

#[test]
fn the_daemonset_reads_the_configmaps_config() {
    let configmap: ConfigMap = find("node-agent");
    let text = &configmap.data.as_ref().unwrap()["config.yaml"];
    let file = config::parse(Path::new("configmap node-agent config.yaml"), text).unwrap();
    assert!(file.cluster_cidr.is_some() && file.healthz_bind_address.is_some());

    let daemonset: DaemonSet = find("node-agent");
    let pod = daemonset.spec.template.spec.unwrap();
    let agent = &pod.containers[0];
    let args = agent.args.as_ref().unwrap();
    assert!(args.iter().any(|a| a == "--kubelet=false"), "{args:?}");
    let path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(path).parent() == Some(Path::new(&m.mount_path)))
        .expect("a mount holding --config");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.config_map.as_ref().unwrap().name, "node-agent");
    assert!(path.ends_with("/config.yaml"));
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("node-agent"),
        "the ServiceAccount bound to node-agent-proxy"
    );
}

/// Every (group, resource, verb, namespace) a list of rules grants.
fn grants(
    rules: &[PolicyRule],
    namespace: Option<&str>,
) -> BTreeSet<(String, String, String, Option<String>)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((
                        group.clone(),
                        resource.clone(),
                        verb.clone(),
                        namespace.map(str::to_string),
                    ));
                }
            }
        }
    }
    out
}

fn declared(access: &[ApiAccess]) -> BTreeSet<(String, String, String, Option<String>)> {
    access
        .iter()
        .flat_map(|a| {
            a.verbs.iter().map(|verb| {
                (
                    a.group.to_string(),
                    a.resource.to_string(),
                    verb.to_string(),
                    a.namespace.map(str::to_string),
                )
            })
        })
        .collect()
}

#[test]
fn the_roles_grant_exactly_what_the_agent_calls() {
    let proxy: ClusterRole = find("node-agent-proxy");
    assert_eq!(
        grants(proxy.rules.as_deref().unwrap_or_default(), None),
        declared(rbac::PROXY),
        "node-agent-proxy against rbac::PROXY"
    );
    let kubelet: ClusterRole = find("node-agent-kubelet");
    let lease: Role = find("node-agent-lease");
    let mut full_node = grants(kubelet.rules.as_deref().unwrap_or_default(), None);
    full_node.extend(grants(
        &lease.rules.unwrap_or_default(),
        lease.metadata.namespace.as_deref(),
    ));
    assert_eq!(
        full_node,
        declared(rbac::KUBELET),
        "node-agent-kubelet + node-agent-lease against rbac::KUBELET"
    );

    // The DaemonSet's ServiceAccount gets the proxy's share only.
    let mut bound_to_service_account = Vec::new();
    for (_, doc) in documents() {
        if doc["kind"] == ClusterRoleBinding::KIND {
            let binding: ClusterRoleBinding = check(&doc).unwrap();
            if binding
                .subjects
                .iter()
                .flatten()
                .any(|s| s.kind == "ServiceAccount" && s.name == "node-agent")
            {
                bound_to_service_account.push(binding.role_ref.name);
            }
        }
    }
    assert_eq!(bound_to_service_account, ["node-agent-proxy"]);
}

/// The full-node kubeconfig example names a context whose cluster and user it defines, with
/// a client certificate (the identity rbac.yaml binds by group).
#[test]
fn the_kubeconfig_example_is_complete() {
    let path = deploy_dir().join("systemd/kubeconfig.example");
    let config: Value = serde_yaml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        (&config["apiVersion"], &config["kind"]),
        (&"v1".into(), &"Config".into())
    );
    let named = |list: &str, name: &Value| {
        config[list]
            .as_array()
            .and_then(|items| items.iter().find(|i| &i["name"] == name).cloned())
            .unwrap_or_else(|| panic!("{}: no {list} entry {name}", path.display()))
    };
    let context = named("contexts", &config["current-context"]);
    let cluster = named("clusters", &context["context"]["cluster"]);
    let user = named("users", &context["context"]["user"]);
    assert!(
        cluster["cluster"]["server"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    assert!(
        user["user"]["client-certificate"].is_string() && user["user"]["client-key"].is_string()
    );
}
