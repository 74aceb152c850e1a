//! The standalone source: Kubernetes objects from `*.yaml`, `*.yml` and `*.json` files in a
//! directory (multi-document YAML and `kind: List` allowed), reloaded whenever the directory
//! changes.
use std::{
    collections::BTreeMap,
    fmt, fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use k8s_openapi::{
    Resource,
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    serde::{Deserialize as _, de::DeserializeOwned},
};
use notify::{RecursiveMode, Watcher as _};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::model::{Cluster, ObjectName};

/// A file, or one object in it, that could not be used.
#[derive(Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// The directory's content: the objects, the files or objects that were refused, and the kinds
/// skipped because the agent does not use them.
#[derive(Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    pub errors: Vec<FileError>,
    pub skipped: Vec<String>,
    /// Files read and parsed for this load (the others were unchanged).
    pub parsed: usize,
}

/// Reads every manifest in `dir` once (see `ManifestDir` for reading it again and again).
pub fn load(dir: &Path) -> anyhow::Result<Loaded> {
    ManifestDir::new(dir).load()
}

/// A manifest directory and what each file held when last read. A file is parsed again only
/// when its size, modification time or inode changed, so a change to one file among thousands
/// costs one parse.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, Result<Vec<Object>, String>)>,
}

/// What tells a file changed: an edit in place moves the mtime, a rename brings a new inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Every manifest in the directory, in file-name order. A file that cannot be read or
    /// parsed is reported and contributes nothing; the other files are unaffected.
    pub fn load(&mut self) -> anyhow::Result<Loaded> {
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)
            .with_context(|| format!("reading manifest directory {}", self.dir.display()))?
            .filter_map(Result::ok)
            // The entry's own type costs no stat; symlinks count (ConfigMap volumes use them).
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .map(|e| e.path())
            .filter(|p| is_manifest(p))
            .collect();
        paths.sort();
        let mut loaded = Loaded::default();
        let mut files = BTreeMap::new();
        for path in paths {
            let stamp = fs::metadata(&path).ok().map(|m| Stamp {
                len: m.len(),
                modified: m.modified().unwrap_or(UNIX_EPOCH),
                inode: m.ino(),
            });
            let cached = self
                .files
                .remove(&path)
                .filter(|(old, _)| Some(*old) == stamp);
            let entry = match (cached, stamp) {
                (Some(entry), _) => entry,
                (None, stamp) => {
                    loaded.parsed += 1;
                    let objects = match fs::read_to_string(&path) {
                        Ok(text) => parse(&path, &text),
                        Err(e) => Err(format!("cannot read: {e}")),
                    };
                    (
                        stamp.unwrap_or(Stamp {
                            len: 0,
                            modified: UNIX_EPOCH,
                            inode: 0,
                        }),
                        objects,
                    )
                }
            };
            files.insert(path, entry);
        }
        // Files gone from the directory are dropped here with what they held.
        self.files = files;
        let mut origin: BTreeMap<(&'static str, &ObjectName), &Path> = BTreeMap::new();
        for (path, (_, objects)) in &self.files {
            let objects = match objects {
                Ok(objects) => objects,
                Err(reason) => {
                    loaded.errors.push(FileError {
                        path: path.clone(),
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            for object in objects {
                let (kind, name) = match object {
                    Object::Service(name, _) => (Service::KIND, name),
                    Object::EndpointSlice(name, _) => (EndpointSlice::KIND, name),
                    Object::Skipped(what) => {
                        loaded.skipped.push(format!("{}: {what}", path.display()));
                        continue;
                    }
                };
                if let Some(first) = origin.get(&(kind, name)) {
                    loaded.errors.push(FileError {
                        path: path.clone(),
                        reason: format!(
                            "{kind} {name} is already defined in {}; keeping that one",
                            first.display()
                        ),
                    });
                    continue;
                }
                origin.insert((kind, name), path);
                match object {
                    Object::Service(name, s) => {
                        loaded.cluster.services.insert(name.clone(), Arc::clone(s));
                    }
                    Object::EndpointSlice(name, s) => {
                        loaded
                            .cluster
                            .endpoint_slices
                            .insert(name.clone(), Arc::clone(s));
                    }
                    Object::Skipped(_) => {}
                }
            }
        }
        Ok(loaded)
    }
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

#[derive(Clone)]
enum Object {
    Service(ObjectName, Arc<Service>),
    EndpointSlice(ObjectName, Arc<EndpointSlice>),
    /// A kind the agent does not use: `apiVersion/kind name`.
    Skipped(String),
}

/// Parses one file. Any error refuses the whole file, so a half-written file never programs
/// half of its objects.
fn parse(path: &Path, text: &str) -> Result<Vec<Object>, String> {
    let documents: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?]
    } else {
        serde_yaml::Deserializer::from_str(text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid YAML: {e}"))?
    };
    let mut objects = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        // An empty document (a trailing `---`) holds nothing.
        if !document.is_null() {
            typed(document, &mut objects).map_err(|e| format!("document {}: {e}", i + 1))?;
        }
    }
    Ok(objects)
}

fn typed(document: Value, out: &mut Vec<Object>) -> Result<(), String> {
    let field = |name: &str| {
        document
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err("not a Kubernetes object: apiVersion and kind are required".into());
    };
    match (api_version.as_str(), kind.as_str()) {
        (Service::API_VERSION, Service::KIND) => {
            let (name, s) = object::<Service>(document, |s| &s.metadata)?;
            out.push(Object::Service(name, Arc::new(s)));
        }
        (EndpointSlice::API_VERSION, EndpointSlice::KIND) => {
            let (name, s) = object::<EndpointSlice>(document, |s| &s.metadata)?;
            out.push(Object::EndpointSlice(name, Arc::new(s)));
        }
        ("v1", "List") => {
            let Some(Value::Array(items)) = document.get("items").cloned() else {
                return Err("List: items must be a list".into());
            };
            for (i, item) in items.into_iter().enumerate() {
                typed(item, out).map_err(|e| format!("items[{i}]: {e}"))?;
            }
        }
        _ => {
            let name = document
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)");
            out.push(Object::Skipped(format!("{api_version}/{kind} {name}")));
        }
    }
    Ok(())
}

fn object<K: Resource + DeserializeOwned>(
    document: Value,
    metadata: fn(&K) -> &ObjectMeta,
) -> Result<(ObjectName, K), String> {
    let what = format!(
        "{} {}",
        K::KIND,
        document
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("(unnamed)")
    );
    let object: K = serde_json::from_value(document).map_err(|e| format!("{what}: {e}"))?;
    let meta = metadata(&object);
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(format!("{what}: metadata.name is required"));
    };
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    Ok((ObjectName { namespace, name }, object))
}

/// Watches `dir` and sends a unit on every change; keep the returned watcher alive.
pub fn watch(
    dir: &Path,
    changed: mpsc::UnboundedSender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changed.send(());
        }
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    const SLICE_JSON: &str = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "prod", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]}"#;

    #[test]
    fn loads_yaml_multi_documents_json_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "{SERVICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\n---\n"
            ),
        );
        write(dir.path(), "b.json", SLICE_JSON);
        write(
            dir.path(),
            "c.yml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: api, namespace: kube-system}\n  spec: {clusterIP: 10.96.0.1, ports: [{port: 443}]}\n",
        );
        write(dir.path(), "notes.txt", "not a manifest");
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.errors, vec![]);
        let services: Vec<String> = loaded
            .cluster
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(services, ["default/web", "kube-system/api"]);
        let slices: Vec<String> = loaded
            .cluster
            .endpoint_slices
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(slices, ["prod/web-1"]);
        assert_eq!(loaded.skipped.len(), 1);
        assert!(
            loaded.skipped[0].ends_with("a.yaml: v1/ConfigMap cm"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn bad_files_are_reported_by_name_and_reason_and_others_still_load() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "good.yaml", SERVICE);
        write(
            dir.path(),
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
        );
        write(dir.path(), "kindless.yaml", "foo: bar\n");
        write(
            dir.path(),
            "typed.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 12}\n",
        );
        write(dir.path(), "dup.yaml", SERVICE);
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.cluster.services.len(), 1);
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        let has =
            |file: &str, text: &str| errors.iter().any(|e| e.contains(file) && e.contains(text));
        assert!(has("broken.yaml", "invalid YAML"), "{errors:?}");
        assert!(
            has("kindless.yaml", "apiVersion and kind are required"),
            "{errors:?}"
        );
        assert!(has("typed.yaml", "Service x: invalid type"), "{errors:?}");
        assert!(
            has("good.yaml", "Service default/web is already defined in"),
            "{errors:?}"
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn only_changed_files_are_parsed_again() {
        let dir = tempfile::tempdir().unwrap();
        let service = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        write(dir.path(), "a.yaml", &service("a", "10.96.0.1"));
        write(dir.path(), "b.yaml", &service("b", "10.96.0.2"));
        write(dir.path(), "c.yaml", &service("c", "10.96.0.3"));
        let mut manifests = ManifestDir::new(dir.path());
        let ip_of = |loaded: &Loaded, name: &str| {
            let key = ObjectName {
                namespace: "default".into(),
                name: name.into(),
            };
            loaded.cluster.services[&key]
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .clone()
                .unwrap()
        };

        let first = manifests.load().unwrap();
        assert_eq!((first.parsed, first.cluster.services.len()), (3, 3));
        let again = manifests.load().unwrap();
        assert_eq!(
            (again.parsed, again.cluster.services.len()),
            (0, 3),
            "nothing changed, nothing parsed"
        );

        // Replaced through a rename, as tools do: a new inode even at the same size and second.
        let tmp = dir.path().join(".b.tmp");
        fs::write(&tmp, service("b", "10.96.0.9")).unwrap();
        fs::rename(&tmp, dir.path().join("b.yaml")).unwrap();
        let changed = manifests.load().unwrap();
        assert_eq!(changed.parsed, 1);
        assert_eq!(ip_of(&changed, "b"), "10.96.0.9");
        assert_eq!(ip_of(&changed, "a"), "10.96.0.1");

        fs::remove_file(dir.path().join("c.yaml")).unwrap();
        let removed = manifests.load().unwrap();
        assert_eq!(
            (removed.parsed, removed.cluster.services.len()),
            (0, 2),
            "a removed file takes its objects along"
        );
    }
}
