//! The eBPF datapath: loading, attaching, pinning and reading node-ebpf's programs and maps.
//! Nothing else in the agent touches aya.
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use node_common::{
    BACKENDS_MAP, Backend, CONNTRACK_MAP, REV_NAT_MAP, RevNat, SERVICES_MAP, ServiceKey,
    ServiceValue,
};

use crate::proxy::{MapOp, MapState};

/// The object node-agent's build script compiled from node-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/node-ebpf"));

const TC_INGRESS: &str = "tc_ingress";
const PINNED_MAPS: [&str; 4] = [SERVICES_MAP, BACKENDS_MAP, REV_NAT_MAP, CONNTRACK_MAP];

/// The loaded datapath. Dropping it is the one place that decides what outlives the agent: for
/// now nothing does (programs detach, pins are removed).
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u16, RevNat>,
}

/// The result of one BPF_PROG_TEST_RUN.
pub struct TestRunOutput {
    /// The TC action the program returned (TC_ACT_OK = 0, TC_ACT_SHOT = 2).
    pub action: i32,
    pub packet: Vec<u8>,
    pub duration: Duration,
}

impl Datapath {
    /// Loads the embedded object with its maps pinned under `pin_dir` (bpffs is mounted first
    /// when needed).
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS)
            .context("the eBPF object has no tc_ingress program")?
            .try_into()?;
        program
            .load()
            .context("loading tc_ingress into the kernel")?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        };
        let (services, backends, rev_nat) =
            (take(SERVICES_MAP)?, take(BACKENDS_MAP)?, take(REV_NAT_MAP)?);
        Ok(Self {
            services: services.try_into()?,
            backends: backends.try_into()?,
            rev_nat: rev_nat.try_into()?,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Attaches tc_ingress to `device`'s ingress (TCX on this kernel).
    pub fn attach(&mut self, device: &str) -> anyhow::Result<()> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_INGRESS)
            .context("tc_ingress is not loaded")?
            .try_into()?;
        program
            .attach(device, TcAttachType::Ingress)
            .with_context(|| format!("attaching tc_ingress to device {device}"))?;
        Ok(())
    }

    pub fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        match *op {
            MapOp::PutBackend(id, backend) => self.backends.insert(id, backend, 0),
            MapOp::PutRevNat(id, rev_nat) => self.rev_nat.insert(id, rev_nat, 0),
            MapOp::PutService(key, value) => self.services.insert(key, value, 0),
            MapOp::DeleteService(key) => self.services.remove(&key),
            MapOp::DeleteRevNat(id) => self.rev_nat.remove(&id),
            MapOp::DeleteBackend(id) => self.backends.remove(&id),
        }
        .with_context(|| format!("{op}"))
    }

    /// Runs tc_ingress once over `frame` (an Ethernet frame) through BPF_PROG_TEST_RUN, against
    /// the live maps.
    pub fn test_run(&self, frame: &[u8]) -> anyhow::Result<TestRunOutput> {
        let program: &SchedClassifier = self
            .ebpf
            .program(TC_INGRESS)
            .context("tc_ingress is not loaded")?
            .try_into()?;
        // Room for the frame: the datapath rewrites in place and never grows a packet.
        let mut out = vec![0; frame.len()];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            packet: out,
            duration: result.duration,
        })
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Only the pins this agent makes: --bpffs may name a shared directory.
        for name in PINNED_MAPS {
            let pin = self.pin_dir.join(name);
            if let Err(e) = fs::remove_file(&pin)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("removing pin {}: {e}", pin.display());
            }
        }
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

/// Reads what the pinned Service maps under `pin_dir` hold (for `node-agent lb list`).
pub fn read_pinned(pin_dir: &Path) -> anyhow::Result<MapState> {
    fn open(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "opening {} (is node-agent running with --bpffs {}?)",
                path.display(),
                pin_dir.display()
            )
        })?;
        Ok(Map::from_map_data(data)?)
    }
    let services: HashMap<_, ServiceKey, ServiceValue> = open(pin_dir, SERVICES_MAP)?.try_into()?;
    let backends: HashMap<_, u32, Backend> = open(pin_dir, BACKENDS_MAP)?.try_into()?;
    let rev_nat: HashMap<_, u16, RevNat> = open(pin_dir, REV_NAT_MAP)?.try_into()?;
    Ok(MapState {
        services: services.iter().collect::<Result<_, _>>()?,
        backends: backends.iter().collect::<Result<_, _>>()?,
        rev_nat: rev_nat.iter().collect::<Result<_, _>>()?,
    })
}

/// Mounts bpffs at /sys/fs/bpf when `pin_dir` lies under it and nothing is mounted there yet.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let on_bpffs = |path: &Path| statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if on_bpffs(parent) {
        return Ok(());
    }
    if !pin_dir.starts_with(root) {
        bail!(
            "{} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a directory under /sys/fs/bpf",
            parent.display()
        );
    }
    tracing::info!("mounting bpffs at {}", root.display());
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}
