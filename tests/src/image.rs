//! OCI images built locally, since no registry is reachable: a static `pause` and a busybox.
//! Each is one OCI image layout in a tar archive that `ctr images import` reads, named by the
//! `io.containerd.image.name` annotation of its index.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const PAUSE: &str = "node-agent.local/pause:3.9";
pub const BUSYBOX: &str = "node-agent.local/busybox:latest";

/// The busybox applets the image links, as a test or a small backend needs them.
const APPLETS: &[&str] = &[
    "sh", "ash", "httpd", "sleep", "echo", "cat", "ls", "wget", "nc", "true", "false", "env",
    "hostname", "ip", "ps", "kill", "mkdir", "rm", "grep", "touch", "id", "date", "uname",
    "readlink", "timeout", "stat", "head",
];

/// Sleeps until SIGTERM or SIGINT, reaping children: a pod's shared PID namespace init.
const PAUSE_C: &str = r#"#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;

pub enum Entry {
    Dir(&'static str),
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: &'static str,
    },
}

/// Image config fields that matter to a runtime.
pub struct Config {
    pub entrypoint: Vec<&'static str>,
    pub cmd: Vec<&'static str>,
}

/// Builds both images into `out` and returns the archives, pause first.
pub fn build_all(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let images = [
        (PAUSE, "pause.tar", pause_files(out)?, pause_config()),
        (BUSYBOX, "busybox.tar", busybox_files()?, busybox_config()),
    ];
    images
        .into_iter()
        .map(|(name, file, entries, config)| {
            let path = out.join(file);
            let archive = oci_archive(name, &config, &entries)?;
            // Written whole, then renamed: a concurrent reader never sees half an archive.
            let tmp = out.join(format!(".{file}.{}", std::process::id()));
            fs::write(&tmp, archive).with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, &path)?;
            Ok(path)
        })
        .collect()
}

fn pause_config() -> Config {
    Config {
        entrypoint: vec!["/pause"],
        cmd: vec![],
    }
}

fn busybox_config() -> Config {
    Config {
        entrypoint: vec![],
        cmd: vec!["sh"],
    }
}

/// Compiles the pause program with `gcc -static` (in `work`, removed afterwards).
fn pause_files(work: &Path) -> anyhow::Result<Vec<Entry>> {
    let src = work.join(format!(".pause-{}.c", std::process::id()));
    let bin = src.with_extension("bin");
    fs::write(&src, PAUSE_C)?;
    let out = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running gcc")?;
    let data = fs::read(&bin);
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&bin);
    if !out.status.success() {
        bail!(
            "gcc -static pause.c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(vec![Entry::File {
        path: "pause".into(),
        mode: 0o755,
        data: data?,
    }])
}

/// Debian's busybox-static plus a symlink per applet.
fn busybox_files() -> anyhow::Result<Vec<Entry>> {
    let data = fs::read("/bin/busybox")
        .context("reading /bin/busybox (Debian package busybox-static; cargo xtask setup)")?;
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("tmp"),
        Entry::Dir("etc"),
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data,
        },
    ];
    entries.extend(APPLETS.iter().map(|a| Entry::Symlink {
        path: format!("bin/{a}"),
        target: "busybox",
    }));
    Ok(entries)
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// An uncompressed layer tar: fixed owner and mtime, so the same files give the same digest.
pub fn layer_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, path, &[][..])?;
            }
            Entry::File { path, mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, &data[..])?;
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

/// The whole OCI image layout (oci-layout, index.json, blobs) as one tar archive.
pub fn oci_archive(name: &str, config: &Config, entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let layer = layer_tar(entries)?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;
    let config_json = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": ["PATH=/bin"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [sha256(&layer)] },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config_json),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer_gz)],
    }))?;
    let mut manifest_desc = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    manifest_desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    manifest_desc["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    }))?;

    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, path, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in [&layer_gz, &config_json, &manifest] {
        let digest = sha256(blob);
        add(
            &format!("blobs/sha256/{}", &digest["sha256:".len()..]),
            blob,
        )?;
    }
    Ok(tar.into_inner()?)
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": sha256(blob), "size": blob.len() })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, io::Read as _};

    use super::*;

    fn files(archive: &[u8]) -> HashMap<String, Vec<u8>> {
        let mut tar = tar::Archive::new(archive);
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (e.path().unwrap().display().to_string(), data)
            })
            .collect()
    }

    /// Every descriptor's digest and size match its blob, and the config's diff_id is the
    /// digest of the uncompressed layer, as containerd checks on import and unpack.
    #[test]
    fn descriptors_match_blobs() {
        let entries = [
            Entry::Dir("bin"),
            Entry::File {
                path: "bin/busybox".into(),
                mode: 0o755,
                data: b"not really busybox".to_vec(),
            },
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "busybox",
            },
        ];
        let archive = oci_archive(BUSYBOX, &busybox_config(), &entries).unwrap();
        assert_eq!(
            archive,
            oci_archive(BUSYBOX, &busybox_config(), &entries).unwrap()
        );
        let files = files(&archive);
        let blob = |desc: &Value| {
            let digest = desc["digest"].as_str().unwrap();
            let data = &files[&format!("blobs/sha256/{}", &digest["sha256:".len()..])];
            assert_eq!(sha256(data), digest);
            assert_eq!(data.len() as u64, desc["size"].as_u64().unwrap());
            data.clone()
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let desc = &index["manifests"][0];
        assert_eq!(desc["annotations"]["io.containerd.image.name"], BUSYBOX);
        let manifest: Value = serde_json::from_slice(&blob(desc)).unwrap();
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        let layer_gz = blob(&manifest["layers"][0]);
        let mut layer = Vec::new();
        flate2::read::GzDecoder::new(&layer_gz[..])
            .read_to_end(&mut layer)
            .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer));
        let layer_files = self::files(&layer);
        assert_eq!(layer_files["bin/busybox"], b"not really busybox");
        assert!(layer_files.contains_key("bin/sh"));
    }
}
