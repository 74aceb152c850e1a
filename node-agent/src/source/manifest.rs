//! The standalone source: Kubernetes objects (Services, EndpointSlices, Pods, ConfigMaps and
//! Secrets) from `*.yaml`, `*.yml` and `*.json` files in a directory (multi-document YAML and
//! `kind: List` allowed). After the first load only the
//! files the watcher names are read again, and only the objects in them are reported changed.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicUsize, atomic::Ordering, mpsc as std_mpsc},
};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString, Resource,
    api::{
        core::v1::{ConfigMap, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    serde::{Deserialize as _, de::DeserializeOwned},
};
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode},
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::model::{Changes, ObjectName};

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

/// What reading some files found: the objects that changed, the files or objects that were
/// refused, and the kinds skipped because the agent does not use them.
#[derive(Debug, Default)]
pub struct Loaded {
    pub changes: Changes,
    pub errors: Vec<FileError>,
    pub skipped: Vec<String>,
    /// Files read and parsed.
    pub parsed: usize,
}

impl Loaded {
    fn extend(&mut self, later: Loaded) {
        self.changes.extend(later.changes);
        self.errors.extend(later.errors);
        self.skipped.extend(later.skipped);
        self.parsed += later.parsed;
    }
}

/// Reads every manifest in `dir` once (see `ManifestDir` for following it).
pub fn load(dir: &Path) -> anyhow::Result<Loaded> {
    ManifestDir::new(dir).load()
}

/// A manifest directory and which objects each file defined when last read; the objects
/// themselves go to the proxy, which keeps what it needs of them.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<Arc<Path>, Vec<Key>>,
    /// The file whose definition of each object counts: the first by name when several
    /// define it.
    defined: BTreeMap<Key, Arc<Path>>,
    /// The other files defining an object, in name order (rare, so kept apart).
    shadowed: BTreeMap<Key, Vec<Arc<Path>>>,
    namespaces: BTreeSet<Arc<str>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    ConfigMap,
    Secret,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => Service::KIND,
            Kind::EndpointSlice => EndpointSlice::KIND,
            Kind::Pod => Pod::KIND,
            Kind::ConfigMap => ConfigMap::KIND,
            Kind::Secret => Secret::KIND,
        }
    }

    /// Reports the object `name` of this kind as deleted.
    fn delete(self, name: ObjectName, changes: &mut Changes) {
        match self {
            Kind::Service => {
                changes.services.insert(name, None);
            }
            Kind::EndpointSlice => {
                changes.endpoint_slices.insert(name, None);
            }
            Kind::Pod => {
                changes.pods.insert(name, None);
            }
            Kind::ConfigMap => {
                changes.config_maps.insert(name, None);
            }
            Kind::Secret => {
                changes.secrets.insert(name, None);
            }
        }
    }
}

type Key = (Kind, ObjectName);

/// A file as read: `None` when it is gone (or not a file), its objects, or why it is refused.
type FileRead = Option<Result<Vec<Object>, String>>;

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            defined: BTreeMap::new(),
            shadowed: BTreeMap::new(),
            namespaces: BTreeSet::new(),
        }
    }

    /// Reads every manifest in the directory (and forgets files gone from it).
    pub fn load(&mut self) -> anyhow::Result<Loaded> {
        let mut all = Loaded::default();
        self.load_each(&mut |loaded| all.extend(loaded))?;
        Ok(all)
    }

    /// As `load`, handing over what each file held as soon as it is read: the objects of the
    /// whole directory are never all in memory at once.
    pub fn load_each(&mut self, sink: &mut dyn FnMut(Loaded)) -> anyhow::Result<()> {
        let mut paths: BTreeSet<PathBuf> = fs::read_dir(&self.dir)
            .with_context(|| format!("reading manifest directory {}", self.dir.display()))?
            .filter_map(Result::ok)
            // The entry's own type costs no stat; symlinks count (ConfigMap volumes use them).
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .map(|e| e.path())
            .filter(|p| is_manifest(p))
            .collect();
        paths.extend(self.files.keys().map(|p| p.to_path_buf()));
        self.read(paths.into_iter().collect(), sink);
        Ok(())
    }

    /// Reads `paths` again (those of manifests in the directory; others are ignored): each
    /// one's objects as applied, and those it no longer defines as deleted.
    pub fn reload(&mut self, paths: BTreeSet<PathBuf>) -> Loaded {
        let paths = paths
            .into_iter()
            .filter(|p| p.parent() == Some(self.dir.as_path()) && is_manifest(p))
            .collect();
        let mut all = Loaded::default();
        self.read(paths, &mut |loaded| all.extend(loaded));
        all
    }

    /// Reads and parses `paths` (sorted) on every core, and takes them in, in order.
    fn read(&mut self, paths: Vec<PathBuf>, sink: &mut dyn FnMut(Loaded)) {
        let mut affected = BTreeSet::new();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let (done, results) = std_mpsc::channel();
            for _ in 0..threads.min(paths.len()) {
                let done = done.clone();
                let (next, paths) = (&next, &paths);
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = paths.get(i) else { break };
                        if done.send((i, read_file(path))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done);
            // Taken in in path order, whichever thread finished first: the first file keeps
            // an object defined twice.
            let mut ready = BTreeMap::new();
            let mut taken = 0;
            for (i, read) in results {
                ready.insert(i, read);
                while let Some(read) = ready.remove(&taken) {
                    sink(self.take_in(&paths[taken], read, &mut affected));
                    taken += 1;
                }
            }
        });
        sink(self.settle(affected));
    }

    /// Replaces what `path` defined with what it holds now. Objects it defined first and no
    /// longer does are added to `affected`.
    fn take_in(&mut self, path: &Path, read: FileRead, affected: &mut BTreeSet<Key>) -> Loaded {
        let mut loaded = Loaded::default();
        let path: Arc<Path> = path.into();
        for key in self.files.remove(&path).into_iter().flatten() {
            if self.undefine(&key, &path) {
                affected.insert(key);
            }
        }
        let objects = match read {
            None => return loaded,
            Some(Err(reason)) => {
                loaded.parsed += 1;
                loaded.errors.push(FileError {
                    path: path.to_path_buf(),
                    reason,
                });
                return loaded;
            }
            Some(Ok(objects)) => objects,
        };
        loaded.parsed += 1;
        let mut keys = Vec::with_capacity(objects.len());
        for object in objects {
            let key = match object.key() {
                Some((kind, name)) => (kind, self.keep(&name)),
                None => {
                    if let Object::Skipped(what) = &object {
                        loaded.skipped.push(format!("{}: {what}", path.display()));
                    }
                    continue;
                }
            };
            if let Some((first, twice)) = self.define(&key, &path) {
                if !twice {
                    keys.push(key.clone());
                }
                loaded.errors.push(FileError {
                    path: path.to_path_buf(),
                    reason: format!(
                        "{} {} is already defined in {}; keeping that one",
                        key.0.name(),
                        key.1,
                        first.display()
                    ),
                });
                continue;
            }
            keys.push(key.clone());
            affected.remove(&key);
            object.apply(key.1.clone(), &mut loaded.changes);
        }
        self.files.insert(path, keys);
        loaded
    }

    /// `name` as kept for as long as its object lives: allocated on this thread, not on the
    /// parser's (whose memory is otherwise all freed after the load), with one namespace
    /// string for all the objects in it.
    fn keep(&mut self, name: &ObjectName) -> ObjectName {
        let namespace = match self.namespaces.get(&name.namespace) {
            Some(namespace) => Arc::clone(namespace),
            None => {
                let namespace: Arc<str> = (*name.namespace).into();
                self.namespaces.insert(Arc::clone(&namespace));
                namespace
            }
        };
        ObjectName {
            namespace,
            name: (*name.name).into(),
        }
    }

    /// Records that `path` defines `key`: `None` when its definition counts, or the file whose
    /// does and whether `path` had defined `key` already (twice in one file).
    fn define(&mut self, key: &Key, path: &Arc<Path>) -> Option<(Arc<Path>, bool)> {
        let first = self
            .defined
            .entry(key.clone())
            .or_insert_with(|| Arc::clone(path));
        if first == path {
            return None;
        }
        let others = self.shadowed.entry(key.clone()).or_default();
        let twice = match others.binary_search(path) {
            Ok(_) => true,
            Err(_) if path < first => {
                // Sorts first: its definition counts from now on.
                let previous = std::mem::replace(first, Arc::clone(path));
                let at = others.partition_point(|p| *p < previous);
                others.insert(at, previous);
                return None;
            }
            Err(at) => {
                others.insert(at, Arc::clone(path));
                false
            }
        };
        Some((Arc::clone(first), twice))
    }

    /// Forgets that `path` defines `key`; whether its definition was the one that counted.
    fn undefine(&mut self, key: &Key, path: &Arc<Path>) -> bool {
        let others = self.shadowed.get_mut(key);
        if self.defined.get(key) != Some(path) {
            if let Some(others) = others {
                others.retain(|p| p != path);
            }
            return false;
        }
        match others.filter(|o| !o.is_empty()) {
            Some(others) => {
                self.defined.insert(key.clone(), others.remove(0));
            }
            None => {
                self.defined.remove(key);
            }
        }
        if self.shadowed.get(key).is_some_and(Vec::is_empty) {
            self.shadowed.remove(key);
        }
        true
    }

    /// The objects whose defining file gave them up: deleted, or taken from the file that
    /// defines them now (read again, for that is rare: an object defined twice).
    fn settle(&mut self, affected: BTreeSet<Key>) -> Loaded {
        let mut loaded = Loaded::default();
        for key in affected {
            let now = self.defined.get(&key).cloned();
            let object = now.and_then(|path| {
                loaded.parsed += 1;
                let objects = read_file(&path)?.ok()?;
                objects.into_iter().find(|o| o.key().as_ref() == Some(&key))
            });
            match object {
                Some(object) => object.apply(key.1, &mut loaded.changes),
                None => key.0.delete(key.1, &mut loaded.changes),
            }
        }
        loaded
    }
}

fn read_file(path: &Path) -> FileRead {
    // A symlink counts as the file it names.
    if !fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    Some(match fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Err(format!("cannot read: {e}")),
    })
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

enum Object {
    Service(ObjectName, Box<Service>),
    EndpointSlice(ObjectName, Box<EndpointSlice>),
    Pod(ObjectName, Box<Pod>),
    ConfigMap(ObjectName, Box<ConfigMap>),
    Secret(ObjectName, Box<Secret>),
    /// A kind the agent does not use: `apiVersion/kind name`.
    Skipped(String),
}

impl Object {
    fn key(&self) -> Option<Key> {
        match self {
            Object::Service(name, _) => Some((Kind::Service, name.clone())),
            Object::EndpointSlice(name, _) => Some((Kind::EndpointSlice, name.clone())),
            Object::Pod(name, _) => Some((Kind::Pod, name.clone())),
            Object::ConfigMap(name, _) => Some((Kind::ConfigMap, name.clone())),
            Object::Secret(name, _) => Some((Kind::Secret, name.clone())),
            Object::Skipped(_) => None,
        }
    }

    /// Reports the object as applied, under `name` (its own, as kept).
    fn apply(self, name: ObjectName, changes: &mut Changes) {
        match self {
            Object::Service(_, s) => {
                changes.services.insert(name, Some(*s));
            }
            Object::EndpointSlice(_, s) => {
                changes.endpoint_slices.insert(name, Some(*s));
            }
            Object::Pod(_, p) => {
                changes.pods.insert(name, Some(*p));
            }
            Object::ConfigMap(_, c) => {
                changes.config_maps.insert(name, Some(*c));
            }
            Object::Secret(_, s) => {
                changes.secrets.insert(name, Some(*s));
            }
            Object::Skipped(_) => {}
        }
    }
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

fn typed(mut document: Value, out: &mut Vec<Object>) -> Result<(), String> {
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
            out.push(Object::Service(name, Box::new(s)));
        }
        (EndpointSlice::API_VERSION, EndpointSlice::KIND) => {
            let (name, s) = object::<EndpointSlice>(document, |s| &s.metadata)?;
            out.push(Object::EndpointSlice(name, Box::new(s)));
        }
        (Pod::API_VERSION, Pod::KIND) => {
            let (name, p) = object::<Pod>(document, |p| &p.metadata)?;
            out.push(Object::Pod(name, Box::new(p)));
        }
        (ConfigMap::API_VERSION, ConfigMap::KIND) => {
            let (name, c) = object::<ConfigMap>(document, |c| &c.metadata)?;
            out.push(Object::ConfigMap(name, Box::new(c)));
        }
        (Secret::API_VERSION, Secret::KIND) => {
            let (name, s) = object::<Secret>(document, |s| &s.metadata)?;
            out.push(Object::Secret(name, Box::new(string_data_merged(s))));
        }
        ("v1", "List") => {
            let Some(Value::Array(items)) = document.get_mut("items").map(Value::take) else {
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
    let namespace = meta.namespace.as_deref().unwrap_or("default").into();
    let name = name.into();
    Ok((ObjectName { namespace, name }, object))
}

/// `secret` as the API server stores it: `stringData` written into `data` (its keys win), so
/// users of a Secret read `data` only.
fn string_data_merged(mut secret: Secret) -> Secret {
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_default();
        for (key, value) in strings {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
    secret
}

/// What the watcher saw change.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// A file written and closed, renamed in or out, or deleted: read it again.
    Path(PathBuf),
    /// Anything else that may change what the files hold (a directory renamed in, as a
    /// ConfigMap volume swaps its `..data` symlink, or lost events): read them all again.
    Everything,
}

/// Watches `dir` and reports complete changes only, so a half-written file is never read: a
/// close after writing, a rename in or out, a delete. Keep the returned watcher alive.
pub fn watch(
    dir: &Path,
    changed: mpsc::UnboundedSender<Watched>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            _ => {
                let _ = changed.send(Watched::Everything);
                return;
            }
        };
        let complete = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::To))
            | EventKind::Remove(_) => true,
            // A symlink is complete when created; a file only once written.
            EventKind::Create(CreateKind::File | CreateKind::Other) => {
                event.paths.iter().all(|p| p.is_symlink())
            }
            _ => false,
        };
        if !complete {
            return;
        }
        for path in event.paths {
            let _ = changed.send(if path.is_dir() {
                Watched::Everything
            } else {
                Watched::Path(path)
            });
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
                "{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: dep}}\n---\n"
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
            .changes
            .services
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(services, ["default/web", "kube-system/api"]);
        let slices: Vec<String> = loaded
            .changes
            .endpoint_slices
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(slices, ["prod/web-1"]);
        assert_eq!(loaded.skipped.len(), 1);
        assert!(
            loaded.skipped[0].ends_with("a.yaml: apps/v1/Deployment dep"),
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
        assert_eq!(loaded.changes.services.len(), 1);
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

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// Each changed Service and its ClusterIP, or "deleted".
    fn changed(loaded: &Loaded) -> Vec<(String, String)> {
        loaded
            .changes
            .services
            .iter()
            .map(|(name, s)| {
                let ip = s.as_ref().map_or("deleted".into(), |s| {
                    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
                });
                (name.name.to_string(), ip)
            })
            .collect()
    }

    fn pair(name: &str, ip: &str) -> (String, String) {
        (name.into(), ip.into())
    }

    #[test]
    fn only_the_paths_named_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        write(dir.path(), "a.yaml", &service("a", "10.96.0.1"));
        write(dir.path(), "b.yaml", &service("b", "10.96.0.2"));
        write(dir.path(), "c.yaml", &service("c", "10.96.0.3"));
        let mut manifests = ManifestDir::new(dir.path());
        let first = manifests.load().unwrap();
        assert_eq!(first.parsed, 3);
        assert_eq!(changed(&first).len(), 3);

        // Files not named are not read, even when they changed.
        write(dir.path(), "c.yaml", &service("c", "10.96.0.30"));
        let nothing = manifests.reload(BTreeSet::new());
        assert_eq!((nothing.parsed, changed(&nothing)), (0, vec![]));

        // Replaced through a rename, as tools do: only that file is read.
        let tmp = path(".b.tmp");
        fs::write(&tmp, service("b", "10.96.0.9")).unwrap();
        fs::rename(&tmp, path("b.yaml")).unwrap();
        let renamed = manifests.reload(BTreeSet::from([tmp, path("b.yaml")]));
        assert_eq!(renamed.parsed, 1);
        assert_eq!(changed(&renamed), [pair("b", "10.96.0.9")]);

        // Written in place.
        write(dir.path(), "a.yaml", &service("a", "10.96.0.11"));
        let in_place = manifests.reload(BTreeSet::from([path("a.yaml")]));
        assert_eq!(changed(&in_place), [pair("a", "10.96.0.11")]);

        // Deleted: its objects go, nothing is parsed.
        fs::remove_file(path("c.yaml")).unwrap();
        let removed = manifests.reload(BTreeSet::from([path("c.yaml")]));
        assert_eq!(
            (removed.parsed, changed(&removed)),
            (0, vec![pair("c", "deleted")])
        );

        // Moved to another name: the object stays, from its new file.
        fs::rename(path("a.yaml"), path("d.yaml")).unwrap();
        let moved = manifests.reload(BTreeSet::from([path("a.yaml"), path("d.yaml")]));
        assert_eq!(changed(&moved), [pair("a", "10.96.0.11")]);
        fs::remove_file(path("a.yaml")).unwrap_err();
    }

    #[test]
    fn an_object_defined_twice_comes_from_the_first_file_still_defining_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &service("web", "10.96.0.1"));
        write(dir.path(), "b.yaml", &service("web", "10.96.0.2"));
        let mut manifests = ManifestDir::new(dir.path());
        let first = manifests.load().unwrap();
        assert_eq!(changed(&first), [pair("web", "10.96.0.1")]);
        assert_eq!(first.errors.len(), 1, "{:?}", first.errors);

        // b.yaml changes but a.yaml still wins.
        write(dir.path(), "b.yaml", &service("web", "10.96.0.3"));
        let ignored = manifests.reload(BTreeSet::from([dir.path().join("b.yaml")]));
        assert_eq!(changed(&ignored), []);
        assert_eq!(ignored.errors.len(), 1);

        // a.yaml goes: b.yaml's definition takes over.
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let taken_over = manifests.reload(BTreeSet::from([dir.path().join("a.yaml")]));
        assert_eq!(changed(&taken_over), [pair("web", "10.96.0.3")]);
        assert_eq!(taken_over.errors, []);

        // A file sorting first takes it over; when it goes, b.yaml's counts again.
        write(dir.path(), "0.yaml", &service("web", "10.96.0.4"));
        let first_now = manifests.reload(BTreeSet::from([dir.path().join("0.yaml")]));
        assert_eq!(changed(&first_now), [pair("web", "10.96.0.4")]);
        fs::remove_file(dir.path().join("0.yaml")).unwrap();
        let back = manifests.reload(BTreeSet::from([dir.path().join("0.yaml")]));
        assert_eq!(changed(&back), [pair("web", "10.96.0.3")]);

        // A file that no longer parses gives its objects up.
        write(dir.path(), "b.yaml", "kind: [");
        let broken = manifests.reload(BTreeSet::from([dir.path().join("b.yaml")]));
        assert_eq!(changed(&broken), [pair("web", "deleted")]);
        assert_eq!(broken.errors.len(), 1);
    }

    fn pod(name: &str, image: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod}}\nspec: {{containers: [{{name: c, image: {image}}}]}}\n"
        )
    }

    /// Each changed Pod and its first container's image, or "deleted".
    fn changed_pods(loaded: &Loaded) -> Vec<(String, String)> {
        loaded
            .changes
            .pods
            .iter()
            .map(|(name, p)| {
                let image = p.as_ref().map_or("deleted".into(), |p| {
                    p.spec.as_ref().unwrap().containers[0]
                        .image
                        .clone()
                        .unwrap()
                });
                (name.to_string(), image)
            })
            .collect()
    }

    /// The names of changed objects, each with whether it was applied.
    fn applied<T>(changes: &BTreeMap<ObjectName, Option<T>>) -> Vec<(String, bool)> {
        changes
            .iter()
            .map(|(name, o)| (name.to_string(), o.is_some()))
            .collect()
    }

    fn named(name: &str, applied: bool) -> (String, bool) {
        (name.into(), applied)
    }

    #[test]
    fn pods_config_maps_and_secrets_come_and_go_with_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: x}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\n\
                 data: {{user: YWRtaW4=, pass: b2xk}}\nstringData: {{pass: new}}\n",
                pod("web", "busybox:1")
            ),
        );
        write(
            dir.path(),
            "b.yaml",
            &format!(
                "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: other}}\n",
                pod("web", "busybox:2")
            ),
        );
        write(
            dir.path(),
            "c.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec: {containers: 3}\n",
        );
        let mut manifests = ManifestDir::new(dir.path());
        let first = manifests.load().unwrap();
        assert_eq!(changed_pods(&first), [pair("prod/web", "busybox:1")]);
        assert_eq!(
            applied(&first.changes.config_maps),
            [named("default/cfg", true), named("default/other", true)]
        );
        let config_map = first.changes.config_maps.values().next().unwrap();
        let data = config_map.as_ref().unwrap().data.as_ref().unwrap();
        assert_eq!(data["a"], "x");
        // stringData is written into data, as the API server stores a Secret.
        let secret = first
            .changes
            .secrets
            .values()
            .next()
            .unwrap()
            .as_ref()
            .unwrap();
        let data = secret.data.as_ref().unwrap();
        assert_eq!(
            (data["user"].0.as_slice(), data["pass"].0.as_slice()),
            (&b"admin"[..], &b"new"[..])
        );
        assert_eq!(secret.string_data, None);
        let errors: Vec<String> = first.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("b.yaml: Pod prod/web is already defined in")
                && errors[0].ends_with("a.yaml; keeping that one"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("c.yaml: document 1: Pod bad: invalid type"),
            "{errors:?}"
        );

        // a.yaml goes: its ConfigMap and Secret are deleted, b.yaml's Pod takes over.
        fs::remove_file(path("a.yaml")).unwrap();
        let gone = manifests.reload(BTreeSet::from([path("a.yaml")]));
        assert_eq!(changed_pods(&gone), [pair("prod/web", "busybox:2")]);
        assert_eq!(
            applied(&gone.changes.config_maps),
            [named("default/cfg", false)]
        );
        assert_eq!(
            applied(&gone.changes.secrets),
            [named("default/creds", false)]
        );
        assert_eq!(gone.errors, []);

        // Edited in place: the Pod changes; the unchanged ConfigMap is reported again.
        write(
            dir.path(),
            "b.yaml",
            &format!(
                "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: other}}\n",
                pod("web", "busybox:3")
            ),
        );
        let edited = manifests.reload(BTreeSet::from([path("b.yaml")]));
        assert_eq!(changed_pods(&edited), [pair("prod/web", "busybox:3")]);
        assert_eq!(
            applied(&edited.changes.config_maps),
            [named("default/other", true)]
        );

        fs::remove_file(path("b.yaml")).unwrap();
        let none = manifests.reload(BTreeSet::from([path("b.yaml")]));
        assert_eq!(changed_pods(&none), [pair("prod/web", "deleted")]);
        assert_eq!(
            applied(&none.changes.config_maps),
            [named("default/other", false)]
        );
        assert!(none.changes.services.is_empty() && none.changes.endpoint_slices.is_empty());
    }

    #[tokio::test]
    async fn the_watcher_reports_complete_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watcher = watch(dir.path(), tx).unwrap();
        let next = async |rx: &mut mpsc::UnboundedReceiver<Watched>| {
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
        };
        let path = |name: &str| Watched::Path(dir.path().join(name));

        // Opened, half written: nothing yet; reported when closed.
        let mut file = fs::File::create(dir.path().join("a.yaml")).unwrap();
        std::io::Write::write_all(&mut file, b"apiVersion: v1\n").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing before the file is closed");
        drop(file);
        assert_eq!(next(&mut rx).await, path("a.yaml"));

        // Renamed in: the temporary file when closed, then both names of the rename.
        fs::write(dir.path().join(".b.tmp"), "x").unwrap();
        fs::rename(dir.path().join(".b.tmp"), dir.path().join("b.yaml")).unwrap();
        assert_eq!(next(&mut rx).await, path(".b.tmp"));
        assert_eq!(next(&mut rx).await, path(".b.tmp"));
        assert_eq!(next(&mut rx).await, path("b.yaml"));

        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(next(&mut rx).await, path("a.yaml"));

        // A directory renamed in (a ConfigMap volume's `..data`): everything.
        fs::create_dir(dir.path().join("..data_tmp")).unwrap();
        fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        loop {
            match next(&mut rx).await {
                Watched::Everything => break,
                Watched::Path(p) => assert!(p.ends_with("..data_tmp"), "{p:?}"),
            }
        }
    }
}
