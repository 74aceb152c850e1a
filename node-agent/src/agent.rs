//! `node-agent run`: the datapath fed from a manifest directory until SIGTERM.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{datapath::Datapath, health, proxy::Proxy, source::manifest};

/// Changes that arrive this close together are applied as one sync: an in-place save is a
/// truncate and a write microseconds apart, and must not be read half-written.
const DEBOUNCE: Duration = Duration::from_millis(5);

pub struct RunConfig {
    pub manifests: PathBuf,
    pub devices: Vec<String>,
    pub health_bind: SocketAddr,
    pub bpffs: PathBuf,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut datapath = Datapath::load(&config.bpffs)?;
    for device in &config.devices {
        datapath.attach(device)?;
    }
    info!(devices = ?config.devices, bpffs = %config.bpffs.display(), "datapath attached");
    let health = health::Health::default();
    health::serve(config.health_bind, health.clone()).await?;

    let (changed, mut changes) = mpsc::unbounded_channel();
    let _watcher = manifest::watch(&config.manifests, changed)?;
    let mut proxy = Proxy::default();
    sync(&config, &mut proxy, &mut datapath).context("first sync")?;
    health.synced();

    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while changes.try_recv().is_ok() {}
                match sync(&config, &mut proxy, &mut datapath) {
                    Ok(()) => health.synced(),
                    Err(e) => error!("sync failed: {e:#}"),
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping");
    drop(datapath);
    Ok(())
}

fn sync(config: &RunConfig, proxy: &mut Proxy, datapath: &mut Datapath) -> anyhow::Result<()> {
    let loaded = manifest::load(&config.manifests)?;
    for e in &loaded.errors {
        warn!("manifest refused: {e}");
    }
    for s in &loaded.skipped {
        debug!("manifest skipped (kind not used by node-agent): {s}");
    }
    let report = proxy.sync(&loaded.cluster, datapath)?;
    for e in &report.errors {
        warn!("object refused: {e}");
    }
    info!(
        services = loaded.cluster.services.len(),
        endpoint_slices = loaded.cluster.endpoint_slices.len(),
        writes = report.writes,
        elapsed_us = report.elapsed.as_micros() as u64,
        "synced"
    );
    Ok(())
}
