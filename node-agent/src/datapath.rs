//! The eBPF datapath: loading, attaching, pinning and reading node-ebpf's programs and maps.
//! Nothing else in the agent touches aya.
use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, Map, MapData, MapError, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        Program, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use node_common::{
    AFFINITY_MAP, BACKENDS_MAP, Backend, CLUSTER_IPS_MAP, CONFIG_GLOBAL, CONNTRACK_MAP, Config,
    REV_NAT_MAP, RevNat, SERVICE_COUNTERS_MAP, SERVICES_MAP, SOURCE_RANGE_FRONTEND_BITS,
    SOURCE_RANGES_MAP, ServiceCounters, ServiceKey, ServiceValue, SourceRange,
};

use crate::{
    model::Ipv4Cidr,
    proxy::{MapOp, MapState},
};

/// The object node-agent's build script compiled from node-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/node-ebpf"));

const PINNED_MAPS: [&str; 8] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    REV_NAT_MAP,
    CONNTRACK_MAP,
    AFFINITY_MAP,
    SOURCE_RANGES_MAP,
    CLUSTER_IPS_MAP,
    SERVICE_COUNTERS_MAP,
];

/// Where a program runs on a device.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// Load balancing and reverse translation.
    Ingress,
    /// The masquerade half of masqueraded flows.
    Egress,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    fn program(self) -> &'static str {
        match self {
            Hook::Ingress => "tc_ingress",
            Hook::Egress => "tc_egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// The loaded datapath; see `Pins` for what outlives it.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    maps: ServiceMaps,
    /// The devices the programs are attached to, with their links.
    attached: BTreeMap<String, Vec<(Hook, SchedClassifierLinkId)>>,
}

/// The maps the agent writes.
struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    cluster_ips: HashMap<MapData, u32, u8>,
    /// Deleted from with the reverse-NAT entries.
    counters: PerCpuHashMap<MapData, u32, ServiceCounters>,
}

/// A handle of its own on the per-frontend counters, for reading them away from the agent's
/// loop.
pub struct ServiceCounterReader(PerCpuHashMap<MapData, u32, ServiceCounters>);

impl ServiceCounterReader {
    /// Each frontend's counters (by reverse-NAT id), summed over the CPUs.
    pub fn read(&self) -> anyhow::Result<BTreeMap<u32, ServiceCounters>> {
        let mut totals = BTreeMap::new();
        for entry in self.0.iter() {
            let (id, per_cpu) = entry.with_context(|| format!("reading {SERVICE_COUNTERS_MAP}"))?;
            let total = per_cpu
                .iter()
                .fold(ServiceCounters::default(), |sum, c| ServiceCounters {
                    packets: sum.packets.wrapping_add(c.packets),
                    bytes: sum.bytes.wrapping_add(c.bytes),
                });
            totals.insert(id, total);
        }
        Ok(totals)
    }
}

/// The result of one BPF_PROG_TEST_RUN.
pub struct TestRunOutput {
    /// The TC action the program returned (TC_ACT_OK = 0, TC_ACT_SHOT = 2, TC_ACT_REDIRECT = 7).
    pub action: i32,
    pub packet: Vec<u8>,
    /// The skb mark the program left.
    pub mark: u32,
}

/// BPF_PROG_TEST_RUN's context is a `struct __sk_buff`: the mark is its third u32; the
/// kernel refuses to return less than the whole struct (192 bytes today), so room for more.
const SKB_MARK_WORD: usize = 2;
const SKB_CONTEXT_WORDS: usize = 64;

impl Datapath {
    /// Loads the embedded object for a node addressed as `config` says, with its maps pinned
    /// under `pin_dir` (bpffs is mounted first when needed).
    pub fn load(pin_dir: &Path, config: &Config) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let pins = Pins {
            dir: pin_dir.to_owned(),
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(CONFIG_GLOBAL, config, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        for hook in Hook::ALL {
            let name = hook.program();
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no {name} program"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel"))?;
        }
        let maps = ServiceMaps::take(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        })?;
        Ok(Self {
            maps,
            ebpf,
            pins,
            attached: BTreeMap::new(),
        })
    }

    /// Attaches the programs to a node device's ingress and egress (TCX on this kernel).
    pub fn attach(&mut self, device: &str) -> anyhow::Result<()> {
        self.attach_with(device, |program, hook| {
            program.attach(device, hook.attach_type())
        })
    }

    /// Attaches the programs to a pod interface, through a clsact qdisc: a TCX attach waits
    /// for an RCU grace period holding the RTNL lock (about 12 ms per hook here), which the
    /// runtime setting up the next pod's network waits for too.
    pub fn attach_pod(&mut self, device: &str) -> anyhow::Result<()> {
        match tc::qdisc_add_clsact(device) {
            Err(TcError::NetlinkError(e))
                if e.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32) => {}
            other => other.with_context(|| format!("adding a clsact qdisc to {device}"))?,
        }
        self.attach_with(device, |program, hook| {
            let options = TcAttachOptions::Netlink(NlOptions::default());
            program.attach_with_options(device, hook.attach_type(), options)
        })
    }

    fn attach_with(
        &mut self,
        device: &str,
        attach: impl Fn(
            &mut SchedClassifier,
            Hook,
        ) -> Result<SchedClassifierLinkId, aya::programs::ProgramError>,
    ) -> anyhow::Result<()> {
        let mut links = Vec::new();
        for hook in Hook::ALL {
            let program: &mut SchedClassifier = self.program(hook)?.try_into()?;
            let link = attach(program, hook)
                .with_context(|| format!("attaching {} to device {device}", hook.program()))?;
            links.push((hook, link));
        }
        self.attached.insert(device.to_owned(), links);
        Ok(())
    }

    /// Detaches the programs from `device`; a device already gone took its links with it.
    pub fn detach(&mut self, device: &str) {
        for (hook, link) in self.attached.remove(device).unwrap_or_default() {
            if let Ok(program) = self.program(hook)
                && let Ok(program) = <&mut SchedClassifier>::try_from(program)
            {
                let _ = program.detach(link);
            }
        }
    }

    fn program(&mut self, hook: Hook) -> anyhow::Result<&mut Program> {
        let name = hook.program();
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("{name} is not loaded"))
    }

    pub fn write(&mut self, op: &MapOp) -> anyhow::Result<()> {
        let m = &mut self.maps;
        match *op {
            MapOp::PutBackend(id, backend) => m.backends.insert(id, backend, 0),
            MapOp::PutRevNat(id, rev_nat) => m.rev_nat.insert(id, rev_nat, 0),
            MapOp::PutSourceRange(id, cidr) => {
                m.source_ranges.insert(&source_range_key(id, cidr), 1, 0)
            }
            MapOp::PutService(key, value) => m.services.insert(key, value, 0),
            MapOp::DeleteService(key) => m.services.remove(&key),
            MapOp::DeleteSourceRange(id, cidr) => {
                m.source_ranges.remove(&source_range_key(id, cidr))
            }
            MapOp::PutClusterIp(ip) => m.cluster_ips.insert(u32::from_ne_bytes(ip.octets()), 1, 0),
            MapOp::DeleteClusterIp(ip) => m.cluster_ips.remove(&u32::from_ne_bytes(ip.octets())),
            MapOp::DeleteRevNat(id) => m.rev_nat.remove(&id).and_then(|()| {
                // The frontend's counters go with it: its first packet created them, if any.
                match m.counters.remove(&id) {
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) =>
                    {
                        Ok(())
                    }
                    other => other,
                }
            }),
            MapOp::DeleteBackend(id) => m.backends.remove(&id),
        }
        .with_context(|| format!("{op}"))
    }

    /// What the Service maps hold.
    pub fn read(&self) -> anyhow::Result<MapState> {
        self.maps.read()
    }

    /// A reader of the per-frontend counters.
    pub fn service_counters(&self) -> anyhow::Result<ServiceCounterReader> {
        let path = self.pins.dir.join(SERVICE_COUNTERS_MAP);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(ServiceCounterReader(Map::from_map_data(data)?.try_into()?))
    }

    /// Runs the program at `hook` once over `frame` (an Ethernet frame) carrying skb `mark`,
    /// through BPF_PROG_TEST_RUN, against the live maps.
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        mark: u32,
    ) -> anyhow::Result<TestRunOutput> {
        let program: &mut SchedClassifier = self.program(hook)?.try_into()?;
        // Room to grow: a REJECT turns a packet into a larger ICMP error.
        let mut out = vec![0; frame.len() + 128];
        let mut ctx_in = [0u32; SKB_MARK_WORD + 1];
        ctx_in[SKB_MARK_WORD] = mark;
        let mut ctx_out = [0u32; SKB_CONTEXT_WORDS];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(u32_bytes(&ctx_in)),
            ctx_out: Some(u32_bytes_mut(&mut ctx_out)),
            ..TestRunOptions::new()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            packet: out,
            mark: ctx_out[SKB_MARK_WORD],
        })
    }
}

/// The datapath's pin directory. Dropping it is the one place that decides what outlives the
/// agent: for now nothing does (its map pins are removed; programs detach when the Ebpf goes).
/// It exists before anything is pinned, so a failed load cleans up too.
struct Pins {
    dir: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        // Only the pins this agent makes: --bpffs may name a shared directory.
        for name in PINNED_MAPS {
            let pin = self.dir.join(name);
            if let Err(e) = fs::remove_file(&pin)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("removing pin {}: {e}", pin.display());
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn source_range_key(rev_nat_id: u32, cidr: Ipv4Cidr) -> Key<SourceRange> {
    let address = u32::from_ne_bytes(cidr.address.octets());
    let data = SourceRange {
        rev_nat_id,
        address,
    };
    Key::new(SOURCE_RANGE_FRONTEND_BITS + u32::from(cidr.prefix), data)
}

fn u32_bytes(words: &[u32]) -> &[u8] {
    // SAFETY: any u32 is 4 valid bytes; the length is in bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), size_of_val(words)) }
}

fn u32_bytes_mut(words: &mut [u32]) -> &mut [u8] {
    // SAFETY: as above, and every 4 bytes are a valid u32.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), size_of_val(words)) }
}

/// Reads what the pinned Service maps under `pin_dir` hold (for `node-agent lb list`).
pub fn read_pinned(pin_dir: &Path) -> anyhow::Result<MapState> {
    ServiceMaps::take(|name| {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "opening {} (is node-agent running with --bpffs {}?)",
                path.display(),
                pin_dir.display()
            )
        })?;
        Ok(Map::from_map_data(data)?)
    })?
    .read()
}

impl ServiceMaps {
    fn take(mut map: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            services: map(SERVICES_MAP)?.try_into()?,
            backends: map(BACKENDS_MAP)?.try_into()?,
            rev_nat: map(REV_NAT_MAP)?.try_into()?,
            source_ranges: map(SOURCE_RANGES_MAP)?.try_into()?,
            cluster_ips: map(CLUSTER_IPS_MAP)?.try_into()?,
            counters: map(SERVICE_COUNTERS_MAP)?.try_into()?,
        })
    }

    fn read(&self) -> anyhow::Result<MapState> {
        let source_ranges = self
            .source_ranges
            .iter()
            .map(|entry| {
                let (key, _) = entry?;
                let SourceRange {
                    rev_nat_id,
                    address,
                    ..
                } = key.data();
                let [a, b, c, d] = address.to_ne_bytes();
                let prefix = (key.prefix_len() - SOURCE_RANGE_FRONTEND_BITS) as u8;
                Ok((
                    rev_nat_id,
                    Ipv4Cidr {
                        address: Ipv4Addr::new(a, b, c, d),
                        prefix,
                    },
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(MapState {
            services: self.services.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            rev_nat: self.rev_nat.iter().collect::<Result<_, _>>()?,
            source_ranges,
            cluster_ips: self
                .cluster_ips
                .keys()
                .map(|ip| ip.map(|ip| Ipv4Addr::from(ip.to_ne_bytes())))
                .collect::<Result<_, _>>()?,
        })
    }
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
