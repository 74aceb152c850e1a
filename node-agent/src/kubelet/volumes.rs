//! The pod's volumes on the host (emptyDir, hostPath, configMap, secret), under
//! `<pod dir>/volumes/<name>`, and the container mounts that use them. What each volume holds
//! is planned purely (`plan`), then written; writing again (after an agent restart) changes
//! only what differs.
use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder, OpenOptions, Permissions},
    io,
    os::unix::fs::{
        DirBuilderExt as _, FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use k8s_cri::v1::{Mount, MountPropagation};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, HostPathVolumeSource, KeyToPath, Pod, Volume, VolumeMount,
};

use super::{
    PodRefs, SpecError,
    spec::{self, CREATE_CONTAINER_CONFIG_ERROR, INVALID_POD_SPEC},
};

/// A volume that cannot be set up now (a missing ConfigMap or Secret, a hostPath of the wrong
/// type).
pub const FAILED_MOUNT: &str = "FailedMount";

/// The mode of configMap and secret files when the volume names none (the API's default).
const DEFAULT_MODE: u32 = 0o644;

/// A pod's volumes on the host, by volume name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Volumes {
    pub by_name: BTreeMap<String, HostVolume>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostVolume {
    pub path: PathBuf,
    /// configMap and secret volumes are always mounted read-only, as by the kubelet.
    pub read_only: bool,
}

/// A volume's type, as the spec says it.
enum Source<'a> {
    EmptyDir,
    HostPath(&'a HostPathVolumeSource),
    /// configMap or secret: files from the object's keys.
    Object(ObjectSource<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ObjectKind {
    ConfigMap,
    Secret,
}

impl ObjectKind {
    /// As the kubelet's messages name the object, and its keys.
    fn nouns(self) -> (&'static str, &'static str) {
        match self {
            ObjectKind::ConfigMap => ("configmap", "config"),
            ObjectKind::Secret => ("secret", "secret"),
        }
    }
}

struct ObjectSource<'a> {
    kind: ObjectKind,
    name: &'a str,
    items: Option<&'a [KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
}

fn source(volume: &Volume) -> Result<Source<'_>, String> {
    // Found by their JSON names, so an unsupported type is named as the manifest names it.
    let types: Vec<String> = match serde_json::to_value(volume) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k != "name")
            .collect(),
        _ => Vec::new(),
    };
    let one = match types.as_slice() {
        // The API's default when no type is given.
        [] => return Ok(Source::EmptyDir),
        [one] => one.as_str(),
        many => return Err(format!("more than one volume type: {}", many.join(", "))),
    };
    match (one, volume) {
        ("emptyDir", _) => Ok(Source::EmptyDir),
        (
            "hostPath",
            Volume {
                host_path: Some(host_path),
                ..
            },
        ) => Ok(Source::HostPath(host_path)),
        (
            "configMap",
            Volume {
                config_map: Some(cm),
                ..
            },
        ) => Ok(Source::Object(ObjectSource {
            kind: ObjectKind::ConfigMap,
            name: &cm.name,
            items: cm.items.as_deref(),
            default_mode: cm.default_mode,
            optional: cm.optional == Some(true),
        })),
        (
            "secret",
            Volume {
                secret: Some(secret),
                ..
            },
        ) => Ok(Source::Object(ObjectSource {
            kind: ObjectKind::Secret,
            name: secret.secret_name.as_deref().unwrap_or_default(),
            items: secret.items.as_deref(),
            default_mode: secret.default_mode,
            optional: secret.optional == Some(true),
        })),
        (other, _) => Err(format!("unsupported volume type {other}")),
    }
}

/// How a hostPath must be found, or be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostPathType {
    /// No check (`""`).
    Any,
    DirectoryOrCreate,
    Directory,
    FileOrCreate,
    File,
    Socket,
    CharDevice,
    BlockDevice,
}

fn host_path_type(source: &HostPathVolumeSource) -> Result<HostPathType, String> {
    Ok(match source.type_.as_deref().unwrap_or_default() {
        "" => HostPathType::Any,
        "DirectoryOrCreate" => HostPathType::DirectoryOrCreate,
        "Directory" => HostPathType::Directory,
        "FileOrCreate" => HostPathType::FileOrCreate,
        "File" => HostPathType::File,
        "Socket" => HostPathType::Socket,
        "CharDevice" => HostPathType::CharDevice,
        "BlockDevice" => HostPathType::BlockDevice,
        other => return Err(format!("hostPath.type: Unsupported value: {other:?}")),
    })
}

/// What one volume needs from the spec alone (`spec::validate` calls it for each volume).
pub(super) fn validate(field: &str, volume: &Volume) -> Result<(), SpecError> {
    let invalid = |message: String| {
        SpecError::new(
            INVALID_POD_SPEC,
            format!("{field}: volume {:?}: {message}", volume.name),
        )
    };
    let object = match source(volume).map_err(invalid)? {
        Source::EmptyDir => return Ok(()),
        Source::HostPath(host_path) => {
            host_path_type(host_path).map_err(invalid)?;
            let path = &host_path.path;
            if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(invalid(format!(
                    "hostPath.path: invalid path {path:?}: must be absolute, without '..'"
                )));
            }
            return Ok(());
        }
        Source::Object(object) => object,
    };
    if object.name.is_empty() {
        let field = match object.kind {
            ObjectKind::ConfigMap => "configMap.name",
            ObjectKind::Secret => "secret.secretName",
        };
        return Err(invalid(format!("{field}: Required value")));
    }
    file_mode(object.default_mode).map_err(|e| invalid(format!("defaultMode: {e}")))?;
    for (i, item) in object.items.into_iter().flatten().enumerate() {
        relative_path(&item.path).map_err(|e| invalid(format!("items[{i}].path: {e}")))?;
        file_mode(item.mode).map_err(|e| invalid(format!("items[{i}].mode: {e}")))?;
    }
    Ok(())
}

/// A file mode from the spec (`None`: the default, 0644).
fn file_mode(mode: Option<i32>) -> Result<u32, String> {
    match mode {
        None => Ok(DEFAULT_MODE),
        Some(mode) => u32::try_from(mode)
            .ok()
            .filter(|&mode| mode <= 0o777)
            .ok_or_else(|| format!("invalid mode {mode}: must be between 0 and 0777 (octal)")),
    }
}

/// A path inside a volume: relative, no part `.` nor starting with `..` (the kubelet refuses
/// the same), so it stays inside the volume.
fn relative_path(path: &str) -> Result<(), String> {
    let valid = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|part| part != "." && !part.starts_with(".."));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid path {path:?}: must be relative, without '..'"
        ))
    }
}

/// What a volume becomes on the host.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// A directory anyone may write. `medium: Memory` stays a plain directory too (no tmpfs:
    /// nothing to unmount when the pod goes).
    EmptyDir,
    HostPath {
        path: PathBuf,
        type_: HostPathType,
    },
    /// A read-only directory of these files and nothing else.
    Files(Vec<File>),
}

#[derive(Debug, PartialEq, Eq)]
struct File {
    /// Relative to the volume's directory.
    path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
}

/// What each of the pod's volumes becomes, by name.
fn plan(pod: &Pod, refs: &PodRefs) -> Result<Vec<(String, Plan)>, SpecError> {
    let namespace = spec::pod_namespace(pod);
    let volumes = pod
        .spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten());
    volumes
        .map(|volume| {
            let failed = |message: String| mount_error(&volume.name, message);
            let plan = match source(volume).map_err(failed)? {
                Source::EmptyDir => Plan::EmptyDir,
                Source::HostPath(host_path) => Plan::HostPath {
                    path: PathBuf::from(&host_path.path),
                    type_: host_path_type(host_path).map_err(failed)?,
                },
                Source::Object(object) => {
                    let payload = match object.kind {
                        ObjectKind::ConfigMap => {
                            spec::config_map(refs, namespace, object.name).map(config_map_payload)
                        }
                        ObjectKind::Secret => {
                            spec::secret(refs, namespace, object.name).map(spec::secret_data)
                        }
                    };
                    Plan::Files(files(&object, payload).map_err(failed)?)
                }
            };
            Ok((volume.name.clone(), plan))
        })
        .collect()
}

/// The kubelet's event wording: `MountVolume.SetUp failed for volume "cfg" : ...`.
fn mount_error(volume: &str, message: String) -> SpecError {
    SpecError::new(
        FAILED_MOUNT,
        format!("MountVolume.SetUp failed for volume {volume:?} : {message}"),
    )
}

/// A ConfigMap's keys and values: `data` and `binaryData`.
fn config_map_payload(cm: &ConfigMap) -> BTreeMap<&str, &[u8]> {
    let data = (cm.data.iter().flatten()).map(|(k, v)| (k.as_str(), v.as_bytes()));
    let binary = (cm.binary_data.iter().flatten()).map(|(k, v)| (k.as_str(), v.0.as_slice()));
    data.chain(binary).collect()
}

/// The files of a configMap or secret volume: every key of the object (`payload`, `None`
/// when it is missing), or the `items` chosen. A missing optional object gives an empty
/// volume, a missing optional key no file.
fn files(
    object: &ObjectSource,
    payload: Option<BTreeMap<&str, &[u8]>>,
) -> Result<Vec<File>, String> {
    let (kind, key_kind) = object.kind.nouns();
    let Some(payload) = payload else {
        return if object.optional {
            Ok(Vec::new())
        } else {
            Err(spec::not_found(kind, object.name))
        };
    };
    let default_mode = file_mode(object.default_mode)?;
    let chosen: Vec<(&str, &str, Option<i32>)> = match object.items {
        Some(items) => (items.iter())
            .map(|item| (item.key.as_str(), item.path.as_str(), item.mode))
            .collect(),
        None => payload.keys().map(|&key| (key, key, None)).collect(),
    };
    let mut files = Vec::new();
    for (key, path, mode) in chosen {
        let Some(bytes) = payload.get(key) else {
            if object.optional {
                continue;
            }
            return Err(format!(
                "{kind} references non-existent {key_kind} key: {key}"
            ));
        };
        relative_path(path)?;
        files.push(File {
            path: PathBuf::from(path),
            bytes: bytes.to_vec(),
            mode: mode.map_or(Ok(default_mode), |mode| file_mode(Some(mode)))?,
        });
    }
    Ok(files)
}

/// Sets up every volume of the pod under `pod_dir/volumes/<name>` (hostPath volumes stay where
/// they are), after an agent restart too: content and modes that differ are rewritten, files
/// no longer wanted removed, emptyDir contents kept.
pub fn prepare(pod_dir: &Path, pod: &Pod, refs: &PodRefs) -> Result<Volumes, SpecError> {
    let mut volumes = Volumes::default();
    for (name, plan) in plan(pod, refs)? {
        let dir = pod_dir.join("volumes").join(&name);
        let volume = match plan {
            Plan::EmptyDir => make_dir(&dir, 0o777).map(|()| HostVolume {
                path: dir,
                read_only: false,
            }),
            Plan::HostPath { path, type_ } => check_host_path(&path, type_).map(|()| HostVolume {
                path,
                read_only: false,
            }),
            Plan::Files(files) => write_files(&dir, &files).map(|()| HostVolume {
                path: dir,
                read_only: true,
            }),
        };
        let volume = volume.map_err(|message| mount_error(&name, message))?;
        volumes.by_name.insert(name, volume);
    }
    Ok(volumes)
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> String {
    move |e| format!("{}: {e}", path.display())
}

/// A directory (and its parents) with exactly `mode`, whatever the umask.
fn make_dir(dir: &Path, mode: u32) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .create(dir)
        .and_then(|()| fs::set_permissions(dir, Permissions::from_mode(mode)))
        .map_err(io_error(dir))
}

fn check_host_path(path: &Path, type_: HostPathType) -> Result<(), String> {
    let wrong = |what: &str| {
        format!(
            "hostPath type check failed: {} is not {what}",
            path.display()
        )
    };
    let (what, fits): (&str, fn(&fs::Metadata) -> bool) = match type_ {
        HostPathType::Any => return Ok(()),
        HostPathType::DirectoryOrCreate | HostPathType::Directory => {
            ("a directory", |m| m.is_dir())
        }
        HostPathType::FileOrCreate | HostPathType::File => ("a file", |m| !m.is_dir()),
        HostPathType::Socket => ("a socket file", |m| m.file_type().is_socket()),
        HostPathType::CharDevice => ("a character device", |m| m.file_type().is_char_device()),
        HostPathType::BlockDevice => ("a block device", |m| m.file_type().is_block_device()),
    };
    match fs::metadata(path) {
        Ok(meta) if fits(&meta) => Ok(()),
        Ok(_) => Err(wrong(what)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match type_ {
            HostPathType::DirectoryOrCreate => DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .map_err(io_error(path)),
            HostPathType::FileOrCreate => {
                if let Some(parent) = path.parent() {
                    DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(io_error(parent))?;
                }
                let created = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o644)
                    .open(path);
                created.map(drop).map_err(io_error(path))
            }
            _ => Err(wrong(what)),
        },
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Makes `dir` hold exactly `files`.
fn write_files(dir: &Path, files: &[File]) -> Result<(), String> {
    make_dir(dir, 0o755)?;
    // Wanted entries, relative to `dir`: each file (false), each directory above one (true).
    let mut wanted = BTreeMap::new();
    for file in files {
        wanted.insert(file.path.clone(), false);
        for parent in file.path.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                wanted.insert(parent.to_path_buf(), true);
            }
        }
    }
    remove_unwanted(dir, Path::new(""), &wanted)?;
    for file in files {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            make_dir(parent, 0o755)?;
        }
        write_file(&path, &file.bytes, file.mode).map_err(io_error(&path))?;
    }
    Ok(())
}

/// Removes what is under `dir/rel` and not wanted (or wanted as the other kind: a file where a
/// directory is wanted, or the reverse).
fn remove_unwanted(dir: &Path, rel: &Path, wanted: &BTreeMap<PathBuf, bool>) -> Result<(), String> {
    let here = dir.join(rel);
    for entry in fs::read_dir(&here).map_err(io_error(&here))? {
        let entry = entry.map_err(io_error(&here))?;
        let path = rel.join(entry.file_name());
        let full = dir.join(&path);
        // Not followed: a symlink is an entry to remove like a file.
        let is_dir = entry.file_type().map_err(io_error(&full))?.is_dir();
        let removed = match wanted.get(&path) {
            Some(&want_dir) if want_dir == is_dir => {
                if is_dir {
                    remove_unwanted(dir, &path, wanted)?;
                }
                Ok(())
            }
            _ if is_dir => fs::remove_dir_all(&full),
            _ => fs::remove_file(&full),
        };
        removed.map_err(io_error(&full))?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // An unchanged file is left alone, so its readers see no change.
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && fs::read(path)? == bytes
    {
        return Ok(());
    }
    // Renamed over the old one, so a running container never reads half a file. No key
    // starts with `..`, so the temporary name is nobody's.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!("..{name}.tmp"));
    fs::write(&temporary, bytes)?;
    fs::set_permissions(&temporary, Permissions::from_mode(mode))?;
    fs::rename(&temporary, path)
}

/// The `subPath` of a mount, checked: inside the volume.
pub(super) fn sub_path(mount: &VolumeMount) -> Result<Option<&Path>, String> {
    if mount.sub_path_expr.is_some() {
        return Err("subPathExpr is not supported".into());
    }
    match mount.sub_path.as_deref() {
        None | Some("") => Ok(None),
        Some(sub) => relative_path(sub).map(|()| Some(Path::new(sub))),
    }
}

pub(super) fn propagation(mount: &VolumeMount) -> Result<MountPropagation, String> {
    match mount.mount_propagation.as_deref() {
        None | Some("None") => Ok(MountPropagation::PropagationPrivate),
        Some("HostToContainer") => Ok(MountPropagation::PropagationHostToContainer),
        Some("Bidirectional") => Ok(MountPropagation::PropagationBidirectional),
        Some(other) => Err(format!(
            "Unsupported value: {other:?}: supported values: \"Bidirectional\", \
             \"HostToContainer\", \"None\""
        )),
    }
}

/// The container's mounts of the pod's prepared volumes. A `subPath` directory is made when
/// missing, as the kubelet does.
pub fn mounts(container: &Container, volumes: &Volumes) -> Result<Vec<Mount>, SpecError> {
    let config_error = |message: String| SpecError::new(CREATE_CONTAINER_CONFIG_ERROR, message);
    (container.volume_mounts.iter().flatten())
        .map(|mount| {
            let volume = volumes.by_name.get(&mount.name).ok_or_else(|| {
                config_error(format!(
                    "cannot find volume {:?} to mount into container {:?}",
                    mount.name, container.name
                ))
            })?;
            let in_mount = |e: String| config_error(format!("volumeMount {:?}: {e}", mount.name));
            let host_path = match sub_path(mount).map_err(in_mount)? {
                Some(sub) => sub_path_dir(&volume.path, sub).map_err(in_mount)?,
                None => volume.path.clone(),
            };
            Ok(Mount {
                container_path: mount.mount_path.clone(),
                host_path: host_path.to_string_lossy().into_owned(),
                readonly: volume.read_only || mount.read_only == Some(true),
                propagation: propagation(mount).map_err(in_mount)? as i32,
                ..Default::default()
            })
        })
        .collect()
}

/// The host path of `sub` inside the volume at `root`. Missing directories are made with the
/// volume's mode; a symlink on the way is refused, so a container cannot aim a later mount
/// outside its volume.
fn sub_path_dir(root: &Path, sub: &Path) -> Result<PathBuf, String> {
    let mode = fs::metadata(root)
        .map_err(io_error(root))?
        .permissions()
        .mode()
        & 0o7777;
    let mut path = root.to_path_buf();
    for part in sub.components() {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "subPath {}: {} is a symlink",
                    sub.display(),
                    path.display()
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path)
                    .and_then(|()| fs::set_permissions(&path, Permissions::from_mode(mode)))
                    .map_err(io_error(&path))?;
            }
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(path)
}

/// Removes the pod's directory and its volumes; nothing to do when it is gone already.
pub fn remove(pod_dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(pod_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        os::unix::{fs::MetadataExt as _, net::UnixListener},
    };

    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use serde_json::{Value, json};

    use super::*;
    use crate::model::ObjectName;

    fn pod(volumes: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}], "volumes": volumes},
        }))
        .unwrap()
    }

    fn name(name: &str) -> ObjectName {
        ObjectName::new("default", name)
    }

    fn config_map(data: Value, binary_data: Value) -> ConfigMap {
        serde_json::from_value(json!({"data": data, "binaryData": binary_data})).unwrap()
    }

    fn refs() -> PodRefs {
        let mut refs = PodRefs::default();
        refs.config_maps.insert(
            name("app-config"),
            // binaryData is base64 in the manifest: "\x00\x01" here.
            config_map(
                json!({"app.conf": "a=1", "mode": "fast"}),
                json!({"blob": "AAE="}),
            ),
        );
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("password".into(), ByteString(b"hunter2".to_vec())),
                ("token".into(), ByteString(b"old".to_vec())),
            ])),
            string_data: Some(BTreeMap::from([("token".into(), "new".into())])),
            ..Default::default()
        };
        refs.secrets.insert(name("creds"), secret);
        refs
    }

    fn file(path: &str, bytes: &[u8], mode: u32) -> File {
        File {
            path: path.into(),
            bytes: bytes.to_vec(),
            mode,
        }
    }

    fn plan_one(volume: Value, refs: &PodRefs) -> Result<Plan, SpecError> {
        let mut plans = plan(&pod(json!([volume])), refs)?;
        assert_eq!(plans.len(), 1);
        Ok(plans.remove(0).1)
    }

    #[test]
    fn plans_what_each_volume_holds() {
        let cases = [
            (
                json!({"name": "v", "emptyDir": {"medium": "Memory"}}),
                Plan::EmptyDir,
            ),
            (json!({"name": "v"}), Plan::EmptyDir),
            (
                json!({"name": "v", "hostPath": {"path": "/run/x.sock", "type": "Socket"}}),
                Plan::HostPath {
                    path: "/run/x.sock".into(),
                    type_: HostPathType::Socket,
                },
            ),
            (
                json!({"name": "v", "hostPath": {"path": "/data"}}),
                Plan::HostPath {
                    path: "/data".into(),
                    type_: HostPathType::Any,
                },
            ),
            // Every key, data and binaryData, with the default mode.
            (
                json!({"name": "v", "configMap": {"name": "app-config"}}),
                Plan::Files(vec![
                    file("app.conf", b"a=1", 0o644),
                    file("blob", &[0, 1], 0o644),
                    file("mode", b"fast", 0o644),
                ]),
            ),
            // Items choose keys and paths; an item's mode beats defaultMode.
            (
                json!({"name": "v", "configMap": {"name": "app-config", "defaultMode": 0o640, "items": [
                    {"key": "mode", "path": "conf/mode.txt"},
                    {"key": "app.conf", "path": "app.conf", "mode": 0o600},
                ]}}),
                Plan::Files(vec![
                    file("conf/mode.txt", b"fast", 0o640),
                    file("app.conf", b"a=1", 0o600),
                ]),
            ),
            // stringData over data.
            (
                json!({"name": "v", "secret": {"secretName": "creds", "defaultMode": 0o400}}),
                Plan::Files(vec![
                    file("password", b"hunter2", 0o400),
                    file("token", b"new", 0o400),
                ]),
            ),
            (
                json!({"name": "v", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "t"}]}}),
                Plan::Files(vec![file("t", b"new", 0o644)]),
            ),
            // Optional: a missing object is an empty volume, a missing key no file.
            (
                json!({"name": "v", "configMap": {"name": "absent", "optional": true}}),
                Plan::Files(vec![]),
            ),
            (
                json!({"name": "v", "secret": {"secretName": "creds", "optional": true, "items": [
                    {"key": "absent", "path": "a"}, {"key": "password", "path": "p"}]}}),
                Plan::Files(vec![file("p", b"hunter2", 0o644)]),
            ),
        ];
        for (volume, want) in cases {
            assert_eq!(plan_one(volume.clone(), &refs()), Ok(want), "{volume}");
        }
    }

    #[test]
    fn planning_errors_use_the_kubelet_wording() {
        let mut refs = refs();
        refs.config_maps.insert(
            name("evil"),
            config_map(json!({"..data": "x"}), json!(null)),
        );
        let cases = [
            (
                json!({"name": "cfg", "configMap": {"name": "x"}}),
                "configmap \"x\" not found",
            ),
            (
                json!({"name": "cfg", "secret": {"secretName": "x"}}),
                "secret \"x\" not found",
            ),
            (
                json!({"name": "cfg", "configMap": {"name": "app-config", "items": [{"key": "nope", "path": "n"}]}}),
                "configmap references non-existent config key: nope",
            ),
            (
                json!({"name": "cfg", "secret": {"secretName": "creds", "items": [{"key": "nope", "path": "n"}]}}),
                "secret references non-existent secret key: nope",
            ),
            (
                json!({"name": "cfg", "configMap": {"name": "evil"}}),
                "invalid path \"..data\": must be relative, without '..'",
            ),
            (
                json!({"name": "cfg", "configMap": {"name": "app-config", "items": [{"key": "mode", "path": "/etc/passwd"}]}}),
                "invalid path \"/etc/passwd\": must be relative, without '..'",
            ),
            (
                json!({"name": "cfg", "nfs": {"server": "x", "path": "/"}}),
                "unsupported volume type nfs",
            ),
        ];
        for (volume, message) in cases {
            let want = SpecError::new(
                FAILED_MOUNT,
                format!("MountVolume.SetUp failed for volume \"cfg\" : {message}"),
            );
            assert_eq!(plan_one(volume.clone(), &refs), Err(want), "{volume}");
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn prepare_writes_files_with_their_modes_and_rewrites_only_what_changed() {
        let root = tempfile::tempdir().unwrap();
        let pod_dir = root.path().join("pod");
        let pod = pod(json!([
            {"name": "scratch", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "app-config", "items": [
                {"key": "app.conf", "path": "app.conf"},
                {"key": "mode", "path": "sub/mode", "mode": 0o600},
            ]}},
            {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        ]));
        let volumes = prepare(&pod_dir, &pod, &refs()).unwrap();
        let dir = |name: &str| pod_dir.join("volumes").join(name);
        assert_eq!(
            volumes.by_name,
            BTreeMap::from([
                (
                    "cfg".into(),
                    HostVolume {
                        path: dir("cfg"),
                        read_only: true
                    }
                ),
                (
                    "creds".into(),
                    HostVolume {
                        path: dir("creds"),
                        read_only: true
                    }
                ),
                (
                    "scratch".into(),
                    HostVolume {
                        path: dir("scratch"),
                        read_only: false
                    }
                ),
            ])
        );
        assert_eq!(mode(&dir("scratch")), 0o777);
        assert_eq!(fs::read(dir("cfg").join("app.conf")).unwrap(), b"a=1");
        assert_eq!(mode(&dir("cfg").join("app.conf")), 0o644);
        assert_eq!(fs::read(dir("cfg").join("sub/mode")).unwrap(), b"fast");
        assert_eq!(mode(&dir("cfg").join("sub/mode")), 0o600);
        assert_eq!(fs::read(dir("creds").join("token")).unwrap(), b"new");
        assert_eq!(mode(&dir("creds").join("password")), 0o400);

        // Meanwhile a container wrote to its emptyDir, and a stray file appeared.
        fs::write(dir("scratch").join("state"), "kept").unwrap();
        fs::write(dir("cfg").join("stray"), "x").unwrap();
        let inode = |path: PathBuf| fs::metadata(path).unwrap().ino();
        let app_conf = inode(dir("cfg").join("app.conf"));
        let password = inode(dir("creds").join("password"));

        // The agent restarts with a changed ConfigMap and a changed mode.
        let mut refs = refs();
        refs.config_maps.insert(
            name("app-config"),
            config_map(json!({"app.conf": "a=1", "mode": "slow"}), json!(null)),
        );
        let pod2 = super::tests::pod(json!([
            {"name": "scratch", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "app-config", "items": [
                {"key": "app.conf", "path": "app.conf"},
                {"key": "mode", "path": "sub/mode", "mode": 0o640},
            ]}},
            {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        ]));
        assert_eq!(prepare(&pod_dir, &pod2, &refs), Ok(volumes));
        assert_eq!(fs::read(dir("scratch").join("state")).unwrap(), b"kept");
        assert!(
            !dir("cfg").join("stray").exists(),
            "a file no longer wanted is removed"
        );
        assert_eq!(fs::read(dir("cfg").join("sub/mode")).unwrap(), b"slow");
        assert_eq!(mode(&dir("cfg").join("sub/mode")), 0o640);
        assert_eq!(
            inode(dir("cfg").join("app.conf")),
            app_conf,
            "unchanged: not rewritten"
        );
        assert_eq!(
            inode(dir("creds").join("password")),
            password,
            "unchanged: not rewritten"
        );
        let mut names: Vec<_> = fs::read_dir(dir("cfg"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["app.conf", "sub"], "no temporary file left");
    }

    #[test]
    fn rewriting_replaces_a_directory_where_a_file_is_now_wanted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("v");
        write_files(&dir, &[file("a/b", b"1", 0o644), file("c", b"2", 0o644)]).unwrap();
        write_files(&dir, &[file("a", b"3", 0o600)]).unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"3");
        assert_eq!(mode(&dir.join("a")), 0o600);
        assert!(!dir.join("c").exists());
    }

    #[test]
    fn prepare_fails_on_a_missing_config_map_and_writes_nothing_for_it() {
        let root = tempfile::tempdir().unwrap();
        let pod = pod(json!([{"name": "cfg", "configMap": {"name": "x"}}]));
        assert_eq!(
            prepare(root.path(), &pod, &PodRefs::default()),
            Err(SpecError::new(
                FAILED_MOUNT,
                "MountVolume.SetUp failed for volume \"cfg\" : configmap \"x\" not found"
            ))
        );
        assert!(!root.path().join("volumes").exists());
    }

    #[test]
    fn host_paths_are_checked_and_made_by_type() {
        let root = tempfile::tempdir().unwrap();
        let at = |name: &str| root.path().join(name);
        fs::create_dir(at("dir")).unwrap();
        fs::write(at("file"), "x").unwrap();
        let _listener = UnixListener::bind(at("sock")).unwrap();
        use HostPathType::*;
        let cases = [
            ("missing", Any, Ok(())),
            ("dir", Directory, Ok(())),
            ("file", Directory, Err("is not a directory")),
            ("missing", Directory, Err("is not a directory")),
            ("file", File, Ok(())),
            ("sock", File, Ok(())),
            ("dir", File, Err("is not a file")),
            ("missing", File, Err("is not a file")),
            ("sock", Socket, Ok(())),
            ("file", Socket, Err("is not a socket file")),
            ("file", CharDevice, Err("is not a character device")),
            ("file", BlockDevice, Err("is not a block device")),
            ("dir", DirectoryOrCreate, Ok(())),
            ("file", DirectoryOrCreate, Err("is not a directory")),
            ("dir", FileOrCreate, Err("is not a file")),
        ];
        for (name, type_, want) in cases {
            let path = at(name);
            let want = want
                .map_err(|what| format!("hostPath type check failed: {} {what}", path.display()));
            assert_eq!(check_host_path(&path, type_), want, "{name} {type_:?}");
        }
        assert_eq!(check_host_path(Path::new("/dev/null"), CharDevice), Ok(()));

        assert_eq!(check_host_path(&at("new/dir"), DirectoryOrCreate), Ok(()));
        assert!(at("new/dir").is_dir());
        assert_eq!(check_host_path(&at("made/file"), FileOrCreate), Ok(()));
        assert!(at("made/file").is_file());
        assert_eq!(mode(&at("made/file")) & !0o022, 0o644);
        assert!(!at("missing").exists(), "no type: nothing made");
    }

    #[test]
    fn prepare_reports_a_host_path_of_the_wrong_type() {
        let root = tempfile::tempdir().unwrap();
        let pod =
            pod(json!([{"name": "h", "hostPath": {"path": "/dev/null", "type": "Directory"}}]));
        assert_eq!(
            prepare(root.path(), &pod, &PodRefs::default()),
            Err(SpecError::new(
                FAILED_MOUNT,
                "MountVolume.SetUp failed for volume \"h\" : hostPath type check failed: /dev/null is not a directory"
            ))
        );
    }

    fn container(mounts: Value) -> Container {
        serde_json::from_value(json!({"name": "app", "volumeMounts": mounts})).unwrap()
    }

    #[test]
    fn mounts_map_volume_mounts_onto_the_prepared_volumes() {
        let root = tempfile::tempdir().unwrap();
        let scratch = root.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        fs::set_permissions(&scratch, Permissions::from_mode(0o777)).unwrap();
        let volumes = Volumes {
            by_name: BTreeMap::from([
                (
                    "scratch".into(),
                    HostVolume {
                        path: scratch.clone(),
                        read_only: false,
                    },
                ),
                (
                    "cfg".into(),
                    HostVolume {
                        path: "/pods/x/volumes/cfg".into(),
                        read_only: true,
                    },
                ),
            ]),
        };
        let c = container(json!([
            {"name": "cfg", "mountPath": "/etc/app"},
            {"name": "scratch", "mountPath": "/data", "readOnly": true, "mountPropagation": "HostToContainer"},
            {"name": "scratch", "mountPath": "/cache", "subPath": "cache/app"},
        ]));
        let mount = |container_path: &str,
                     host_path: &Path,
                     readonly,
                     propagation: MountPropagation| Mount {
            container_path: container_path.into(),
            host_path: host_path.to_string_lossy().into_owned(),
            readonly,
            propagation: propagation as i32,
            ..Default::default()
        };
        assert_eq!(
            mounts(&c, &volumes),
            Ok(vec![
                mount(
                    "/etc/app",
                    Path::new("/pods/x/volumes/cfg"),
                    true,
                    MountPropagation::PropagationPrivate
                ),
                mount(
                    "/data",
                    &scratch,
                    true,
                    MountPropagation::PropagationHostToContainer
                ),
                mount(
                    "/cache",
                    &scratch.join("cache/app"),
                    false,
                    MountPropagation::PropagationPrivate
                ),
            ])
        );
        assert_eq!(
            mode(&scratch.join("cache")),
            0o777,
            "made with the volume's mode"
        );
        assert_eq!(mode(&scratch.join("cache/app")), 0o777);

        // A container planted a symlink out of its volume.
        std::os::unix::fs::symlink("/etc", scratch.join("escape")).unwrap();
        let c = container(json!([{"name": "scratch", "mountPath": "/x", "subPath": "escape/ssl"}]));
        let escape = scratch.join("escape");
        assert_eq!(
            mounts(&c, &volumes),
            Err(SpecError::new(
                CREATE_CONTAINER_CONFIG_ERROR,
                format!(
                    "volumeMount \"scratch\": subPath escape/ssl: {} is a symlink",
                    escape.display()
                )
            ))
        );

        let cases = [
            (
                json!([{"name": "gone", "mountPath": "/x"}]),
                "cannot find volume \"gone\" to mount into container \"app\"",
            ),
            (
                json!([{"name": "scratch", "mountPath": "/x", "subPath": "../.."}]),
                "volumeMount \"scratch\": invalid path \"../..\": must be relative, without '..'",
            ),
            (
                json!([{"name": "scratch", "mountPath": "/x", "subPathExpr": "$(POD)"}]),
                "volumeMount \"scratch\": subPathExpr is not supported",
            ),
        ];
        for (mounts_json, message) in cases {
            assert_eq!(
                mounts(&container(mounts_json.clone()), &volumes),
                Err(SpecError::new(CREATE_CONTAINER_CONFIG_ERROR, message)),
                "{mounts_json}"
            );
        }
    }

    #[test]
    fn remove_deletes_the_pod_directory_and_accepts_a_missing_one() {
        let root = tempfile::tempdir().unwrap();
        let pod_dir = root.path().join("pod");
        let pod = pod(json!([{"name": "scratch", "emptyDir": {}}]));
        prepare(&pod_dir, &pod, &PodRefs::default()).unwrap();
        fs::write(pod_dir.join("volumes/scratch/f"), "x").unwrap();
        remove(&pod_dir).unwrap();
        assert!(!pod_dir.exists());
        remove(&pod_dir).unwrap();
    }
}
