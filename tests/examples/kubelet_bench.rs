//! The raw CRI cost of a pod start, with no agent in between: on a containerd of its own (the
//! test fixture) with the agent's own CNI network, busybox httpd pods (the e2e's, no readiness
//! probe) started one after another, each through the CRI calls the agent's pod worker makes
//! to start it, with the configs the worker sends (`node_agent::kubelet::spec`). Pods stay
//! running, as under the agent, so each starts next to those before it.
//!
//! Driven line by line, so `cargo xtask bench` (which builds it in release with the agent) can
//! take turns with the agent's own pod starts: prints `ready` once the runtime is, then for
//! each pod name read on stdin one JSON line on stdout, `[[CALL, MS], ..]` in the order the
//! calls were made. At the end of stdin it exits and the fixture removes its pods. Needs root.
use std::{
    future::Future,
    io::{BufRead as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use node_agent::{
    cri::Cri,
    kubelet::{
        PodRefs, cni, pod_uid,
        spec::{self, Downward, SandboxSettings},
        volumes,
        worker::ANNOTATION_GRACE,
    },
};
use node_agent_tests::{containerd::Containerd, manifest::HttpdPod};

const POD_CIDR: &str = "10.88.0.0/24";
const PORT: u16 = 8080;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let containerd = Containerd::start_without_network()?;
    cni::write(
        &containerd.cni_conf_dir(),
        POD_CIDR.parse().map_err(anyhow::Error::msg)?,
        &containerd.root_dir().join("ipam"),
    )?;
    let mut cri = rt.block_on(async {
        let mut cri = Cri::connect(&containerd.endpoint(), READY_TIMEOUT).await?;
        cri.wait_ready(READY_TIMEOUT).await?;
        anyhow::Ok(cri)
    })?;
    let settings = SandboxSettings {
        cgroup_root: containerd.cgroup_root().to_owned(),
        log_root: containerd.root_dir().join("logs"),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for name in std::io::stdin().lock().lines() {
        let name = name?;
        let calls = rt.block_on(start_pod(
            &mut cri,
            &settings,
            &containerd.root_dir(),
            &name,
        ))?;
        writeln!(out, "{}", serde_json::to_string(&calls)?)?;
        out.flush()?;
    }
    Ok(())
}

/// Starts pod `name` as the agent's worker does, timing each CRI call (ms). What the worker
/// does besides calls (directories, configs) is done untimed, before the call needing it.
async fn start_pod(
    cri: &mut Cri,
    settings: &SandboxSettings,
    root_dir: &Path,
    name: &str,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let pod = HttpdPod {
        name,
        port: PORT,
        ..Default::default()
    }
    .pod();
    let uid = pod_uid(&pod);
    let refs = PodRefs::default();
    let volumes = volumes::prepare(&root_dir.join("pods").join(&uid), &pod, &refs)?;
    let sandbox = spec::sandbox_config(&pod, &uid, 0, settings);
    std::fs::create_dir_all(&sandbox.log_directory)?;
    let container = pod.spec.as_ref().context("a pod spec")?.containers[0].clone();
    let image = container.image.clone().unwrap_or_default();
    let mut calls = Vec::new();

    let present = timed(&mut calls, "ImageStatus", cri.image_status(&image)).await?;
    if present.is_none() {
        bail!("{image} is not in the runtime: the fixture imports it");
    }
    let id = timed(
        &mut calls,
        "RunPodSandbox",
        cri.run_pod_sandbox(sandbox.clone()),
    )
    .await?;
    let status = timed(&mut calls, "PodSandboxStatus", cri.pod_sandbox_status(&id)).await?;
    let downward = Downward {
        pod_ip: status.network.map(|n| n.ip).unwrap_or_default(),
        node_name: "bench".into(),
    };
    let mounts = volumes::mounts(&container, &volumes)?;
    let mut config = spec::container_config(&pod, &uid, &container, 0, &refs, &downward, mounts)?;
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds);
    config
        .annotations
        .insert(ANNOTATION_GRACE.into(), grace.unwrap_or(30).to_string());
    let container_id = timed(
        &mut calls,
        "CreateContainer",
        cri.create_container(&id, config, &sandbox),
    )
    .await?;
    timed(
        &mut calls,
        "StartContainer",
        cri.start_container(&container_id),
    )
    .await?;
    Ok(calls)
}

/// Awaits `call`, adding how long it took (ms) to `calls` under `name`.
async fn timed<T>(
    calls: &mut Vec<(&'static str, f64)>,
    name: &'static str,
    call: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let out = call.await.with_context(|| format!("CRI {name}"))?;
    calls.push((name, start.elapsed().as_secs_f64() * 1e3));
    Ok(out)
}
