//! `cargo xtask bench`: node-agent against kube-proxy's iptables (legacy and nf_tables
//! backends) and nftables modes, and a no-NAT floor, in namespaces this run creates; and the
//! embedded kubelet's pod start against the raw CRI calls it needs (`kubelet`).
mod bpf;
mod footprint;
mod frame;
mod kube_proxy;
mod kubelet;
mod manifests;
mod plot;
mod report;
mod stats;

use std::{
    collections::BTreeMap,
    fmt::Display,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bpf::{PinnedMap, Program};
use footprint::Rss;
use kube_proxy::{
    BenchService, iptables_restore, iptables_restore_partial, nft_ruleset, nft_update,
};
use manifests::{filler_files, manifest_list};
use node_agent_tests::{
    agent::Agent,
    backend::BackendServer,
    client::{Connection, UdpFlow},
    manifest::write,
    netns::Netns,
    topology::{CLIENT_IP, NODE_CLIENT_DEVICE, Topology, backend_ip},
};
use node_common::{PROTO_TCP, SCOPE_EXTERNAL, SERVICES_MAP, ServiceKey, ServiceValue};
use report::{AgentFigures, Row};
use serde_json::json;
use stats::{Percentiles, percentiles, summary};

pub use kubelet::RAW_CRI_EXAMPLE;

const CLUSTER_CIDR: &str = "198.18.8.0/21";
const BACKEND_PORT: u16 = 8080;
/// The measured Service: written last, so in iptables mode its rule is the last of
/// KUBE-SERVICES. Fillers take 198.19.x.y:80/81, which never collide with it.
const MEASURED: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 19, 255, 254), 9999);

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A small scale, well under a minute: checks the harness, not the figures.
    #[arg(long)]
    quick: bool,
    /// Service counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<usize>,
    /// Where report.json and bench.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Above this many Services the nftables mode is skipped: its cold start grows
    /// super-linearly in the kernel (22 s at 10k, 8.5 min at 30k on kernel 6.18; hours at 100k).
    #[arg(long, default_value_t = 30_000)]
    nftables_max_services: usize,
    /// Pods started one after another, through raw CRI calls and through the agent
    /// (--quick: 3).
    #[arg(long, default_value_t = 10, value_parser = at_least_one())]
    pods: usize,
    /// Pods written in one manifest and started together (--quick: 10).
    #[arg(long, default_value_t = 50, value_parser = at_least_one())]
    pods_at_once: usize,
    /// Measure only one part: the Service datapath or the embedded kubelet.
    #[arg(long, value_enum)]
    only: Option<Part>,
}

fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Services,
    Kubelet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    NoNat,
    NodeAgent,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::NoNat,
        Mode::NodeAgent,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::NoNat => "no-nat",
            Mode::NodeAgent => "node-agent",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
        }
    }
}

/// One mode's node, programmed for one scale. Fields drop in order: the agent first.
struct Bed {
    mode: Mode,
    agent: Option<Agent>,
    manifests: Option<tempfile::TempDir>,
    _servers: Vec<BackendServer>,
    topology: Topology,
    target: SocketAddr,
    /// Until every Service was in the datapath; None for the no-NAT floor.
    full_sync: Option<Duration>,
    /// node-agent's logged first sync and memory right after it.
    agent_sync: Option<(Duration, Rss)>,
    crr: Vec<Duration>,
    rr: Vec<Duration>,
    udp: Vec<Duration>,
}

/// How much of everything one run measures.
struct Plan {
    scales: Vec<usize>,
    /// Measured rounds per scale, after one warm-up round.
    rounds: usize,
    /// Connections, round trips or datagrams per mode and round.
    per_round: usize,
    /// Programming changes per mode and scale.
    changes: usize,
    /// BPF_PROG_TEST_RUN calls per kind of packet.
    packets: usize,
    kubelet: kubelet::Plan,
}

/// Says what the run is doing, with the time since it started.
struct Progress(Instant);

impl Progress {
    fn say(&self, what: impl Display) {
        eprintln!("bench [{:>7.1} s] {what}", self.0.elapsed().as_secs_f64());
    }
}

pub fn run(agent_binary: &Path, args: BenchArgs) -> anyhow::Result<()> {
    let plan = if args.quick {
        Plan {
            scales: vec![1, 100],
            rounds: 2,
            per_round: 100,
            changes: 2,
            packets: 500,
            kubelet: kubelet::Plan {
                one_by_one: 3,
                at_once: 10,
            },
        }
    } else {
        Plan {
            scales: args.services,
            rounds: 5,
            per_round: 1000,
            changes: 6,
            packets: 5000,
            kubelet: kubelet::Plan {
                one_by_one: args.pods,
                at_once: args.pods_at_once,
            },
        }
    };
    let scales = if args.only == Some(Part::Kubelet) {
        &[][..]
    } else {
        &plan.scales[..]
    };
    let progress = Progress(Instant::now());
    let (mut rows, mut skipped) = (Vec::new(), Skipped::default());
    if !scales.is_empty() {
        println!("{}\n{}", report::HEADER, report::UNITS);
    }
    for &scale in scales {
        let services = services(scale);
        let mut beds = Vec::new();
        for mode in Mode::ALL {
            if let Some(reason) = skip(mode, scale, args.nftables_max_services) {
                skipped.add(&progress, scale, mode, reason);
                continue;
            }
            progress.say(format_args!(
                "{scale} services, {}: setting up",
                mode.name()
            ));
            match bed(agent_binary, mode, &services) {
                Ok(bed) => {
                    if let Some(took) = bed.full_sync {
                        progress.say(format_args!(
                            "{scale} services, {}: full sync took {:.3} s",
                            mode.name(),
                            took.as_secs_f64()
                        ));
                    }
                    beds.push(bed);
                }
                Err(e) => skipped.add(&progress, scale, mode, format!("setting up failed: {e:#}")),
            }
        }
        // Interleaved rounds: a noisy moment hits every mode alike. Round 0 warms up caches,
        // conntrack and the backends, and is thrown away.
        for round in 0..=plan.rounds {
            let mut failed = Vec::new();
            for (i, bed) in beds.iter_mut().enumerate() {
                progress.say(format_args!(
                    "{scale} services, {}: {}",
                    bed.mode.name(),
                    if round == 0 {
                        "warm-up round".to_owned()
                    } else {
                        format!("round {round}/{}", plan.rounds)
                    }
                ));
                let target = bed.target;
                let per_round = plan.per_round;
                let batch = bed.topology.client.run(move || -> anyhow::Result<_> {
                    Ok((
                        crr(target, per_round)?,
                        rr(target, per_round)?,
                        udp_rr(target, per_round)?,
                    ))
                })?;
                match batch {
                    Ok(_) if round == 0 => {}
                    Ok((crr, rr, udp)) => {
                        bed.crr.extend(crr);
                        bed.rr.extend(rr);
                        bed.udp.extend(udp);
                    }
                    Err(e) => failed.push((i, format!("traffic failed: {e:#}"))),
                }
            }
            for (i, reason) in failed.into_iter().rev() {
                skipped.add(&progress, scale, beds.remove(i).mode, reason);
            }
        }
        for bed in &beds {
            progress.say(format_args!(
                "{scale} services, {}: programming latency",
                bed.mode.name()
            ));
            let timings = programming(bed, &services, plan.changes)?;
            let agent = match (&bed.agent, bed.agent_sync) {
                (Some(agent), Some((logged, rss_after_sync))) => {
                    progress.say(format_args!(
                        "{scale} services, {}: per-packet cost",
                        bed.mode.name()
                    ));
                    let map_memlock_bytes = footprint::map_memory(agent.bpffs())?;
                    Some(AgentFigures {
                        logged_sync_ms: logged.as_secs_f64() * 1e3,
                        rss_after_sync,
                        map_memlock_total_bytes: map_memlock_bytes.values().sum(),
                        map_memlock_bytes,
                        packet_cost_ns: packet_cost(&bed.topology.node, plan.packets)?,
                        rss_after_run: footprint::rss(agent.pid())?,
                    })
                }
                _ => None,
            };
            let row = Row {
                services: scale,
                mode: bed.mode.name(),
                tcp_crr: summary(&bed.crr),
                tcp_rr: summary(&bed.rr),
                udp_rr: summary(&bed.udp),
                programming_p50_ms: programming_p50_ms(&timings),
                full_sync_ms: bed.full_sync.map(|d| d.as_secs_f64() * 1e3),
                agent,
            };
            println!("{}", report::table_row(&row));
            rows.push(row);
        }
        progress.say(format_args!("{scale} services: done, cleaning up"));
    }
    let kubelet = (args.only != Some(Part::Services))
        .then(|| kubelet::run(agent_binary, &plan.kubelet, &progress, &mut skipped));
    if let Some(figures) = &kubelet {
        println!("{}", kubelet::table(figures));
    }
    fs::create_dir_all(&args.out)?;
    let path = args.out.join("report.json");
    fs::write(
        &path,
        serde_json::to_string_pretty(
            &json!({"results": rows, "kubelet": kubelet, "skipped": skipped.0}),
        )?,
    )?;
    println!("report: {}", path.display());
    if !rows.is_empty() {
        let svg = args.out.join("bench.svg");
        plot::draw(&rows, &svg)?;
        println!("plot: {}", svg.display());
    }
    Ok(())
}

/// The modes left out of a scale, and why: a long run goes on without them.
#[derive(Default)]
struct Skipped(Vec<serde_json::Value>);

impl Skipped {
    fn add(&mut self, progress: &Progress, scale: usize, mode: Mode, reason: String) {
        progress.say(format_args!(
            "{scale} services, {}: left out, {reason}",
            mode.name()
        ));
        self.0
            .push(json!({"services": scale, "mode": mode.name(), "reason": reason}));
    }

    fn kubelet(&mut self, progress: &Progress, mode: &str, reason: String) {
        progress.say(format_args!("{mode}: left out, {reason}"));
        self.0.push(json!({"mode": mode, "reason": reason}));
    }
}

/// Why `mode` is left out at `scale` from the start, if it is.
fn skip(mode: Mode, scale: usize, nftables_max: usize) -> Option<String> {
    (mode == Mode::Nftables && scale > nftables_max).then(|| {
        format!(
            "its cold-start sync takes hours above {nftables_max} Services \
             (one anonymous vmap per Service; --nftables-max-services raises the limit)"
        )
    })
}

/// The p50 of each kind of programming timing, ms.
fn programming_p50_ms(timings: &[(&'static str, Duration)]) -> BTreeMap<&'static str, f64> {
    let mut by_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (kind, took) in timings {
        by_kind
            .entry(kind)
            .or_default()
            .push(took.as_secs_f64() * 1e3);
    }
    by_kind
        .into_iter()
        .map(|(kind, ms)| (kind, percentiles(&ms).p50))
        .collect()
}

/// `count` Services: fillers with two fake endpoints, then the measured one with the real
/// backends.
fn services(count: usize) -> Vec<BenchService> {
    let filler_endpoints = vec![
        (Ipv4Addr::new(198, 18, 200, 1), BACKEND_PORT),
        (Ipv4Addr::new(198, 18, 200, 2), BACKEND_PORT),
    ];
    let mut services: Vec<BenchService> = (0..count.saturating_sub(1))
        .map(|i| BenchService {
            name: format!("default/filler-{i}"),
            cluster_ip: Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8),
            port: 80 + (i >> 16) as u16,
            proto: "tcp",
            endpoints: filler_endpoints.clone(),
        })
        .collect();
    // TCP and UDP on the same port, as two Service ports (two KUBE-SVC chains in iptables).
    for proto in ["tcp", "udp"] {
        services.push(BenchService {
            name: "default/measured".into(),
            cluster_ip: MEASURED.0,
            port: MEASURED.1,
            proto,
            endpoints: vec![(backend_ip(1), BACKEND_PORT), (backend_ip(2), BACKEND_PORT)],
        });
    }
    services
}

fn bed(agent_binary: &Path, mode: Mode, services: &[BenchService]) -> anyhow::Result<Bed> {
    let topology = Topology::new(2)?;
    let servers = topology.start_backends(BACKEND_PORT)?;
    let vip = SocketAddr::new(IpAddr::V4(MEASURED.0), MEASURED.1);
    let (mut agent, mut manifests, mut target) = (None, None, vip);
    let (mut full_sync_took, mut agent_sync) = (None, None);
    match mode {
        Mode::NoNat => target = SocketAddr::new(IpAddr::V4(backend_ip(1)), BACKEND_PORT),
        Mode::NodeAgent => {
            let dir = tempfile::tempdir()?;
            // The measured Service in a file of its own: a change to it re-reads only that.
            let (fillers, measured) = split(services);
            for (name, text) in filler_files(&fillers) {
                write(dir.path(), &name, &text)?;
            }
            write(dir.path(), MEASURED_FILE, &manifest_list(&measured))?;
            let flags = [
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--service-cidr",
                "198.19.0.0/16",
            ];
            let started = Agent::start(
                agent_binary,
                &topology.node,
                dir.path(),
                &topology.node_devices(),
                &flags,
            )?;
            full_sync_took = Some(started.synced_after());
            let line = started
                .wait_for_log(&[" synced"], Duration::from_secs(5))
                .context("node-agent logged no \"synced\" line")?;
            let logged = footprint::logged_sync_us(&[line])
                .context("no elapsed_us in node-agent's \"synced\" line")?;
            // An object the agent could not hold (a full map) would fail later as refused
            // connections: say so now. Its warning is logged before "synced".
            let refused: Vec<String> = started
                .logs()
                .into_iter()
                .filter(|l| l.contains("refused"))
                .collect();
            if let Some(first) = refused.first() {
                bail!("node-agent refused {} objects, e.g. {first}", refused.len());
            }
            agent_sync = Some((
                Duration::from_micros(logged),
                footprint::rss(started.pid())?,
            ));
            agent = Some(started);
            manifests = Some(dir);
        }
        Mode::IptablesLegacy | Mode::IptablesNft | Mode::Nftables => {
            let start = Instant::now();
            full_sync(&topology, mode, services)?;
            full_sync_took = Some(start.elapsed());
        }
    }
    Ok(Bed {
        mode,
        agent,
        manifests,
        _servers: servers,
        topology,
        target,
        full_sync: full_sync_took,
        agent_sync,
        crr: Vec::new(),
        rr: Vec::new(),
        udp: Vec::new(),
    })
}

/// The measured Service's own manifest file in node-agent's directory.
const MEASURED_FILE: &str = "measured.yaml";

/// The fillers, and the measured Service's ports.
fn split(services: &[BenchService]) -> (Vec<BenchService>, Vec<BenchService>) {
    services
        .iter()
        .cloned()
        .partition(|s| s.cluster_ip != MEASURED.0)
}

/// kube-proxy's full sync of `services` in `mode`.
fn full_sync(topology: &Topology, mode: Mode, services: &[BenchService]) -> anyhow::Result<()> {
    match mode {
        Mode::IptablesLegacy => restore(
            topology,
            "iptables-legacy-restore",
            &[],
            &iptables_restore(services, CLUSTER_CIDR),
        ),
        Mode::IptablesNft => restore(
            topology,
            "iptables-nft-restore",
            &[],
            &iptables_restore(services, CLUSTER_CIDR),
        ),
        Mode::Nftables => restore(
            topology,
            "nft",
            &["-f", "-"],
            &nft_ruleset(services, CLUSTER_CIDR),
        ),
        Mode::NoNat | Mode::NodeAgent => Ok(()),
    }
}

/// kube-proxy's partial sync of the `changed` Services in `mode`.
fn partial_sync(topology: &Topology, mode: Mode, changed: &[BenchService]) -> anyhow::Result<()> {
    match mode {
        Mode::IptablesLegacy => restore(
            topology,
            "iptables-legacy-restore",
            &["--noflush"],
            &iptables_restore_partial(changed, CLUSTER_CIDR),
        ),
        Mode::IptablesNft => restore(
            topology,
            "iptables-nft-restore",
            &["--noflush"],
            &iptables_restore_partial(changed, CLUSTER_CIDR),
        ),
        Mode::Nftables => restore(
            topology,
            "nft",
            &["-f", "-"],
            &nft_update(changed, CLUSTER_CIDR),
        ),
        Mode::NoNat | Mode::NodeAgent => Ok(()),
    }
}

/// One endpoint of the measured Service taken away and given back, `times` times: how long
/// until the datapath has the change — node-agent from the manifest write until its map entry
/// changed, kube-proxy's modes as a partial sync each time (their full sync is the cold start).
fn programming(
    bed: &Bed,
    services: &[BenchService],
    times: usize,
) -> anyhow::Result<Vec<(&'static str, Duration)>> {
    let (_, measured) = split(services);
    let mut timings = Vec::new();
    for i in 0..times {
        let variant: Vec<BenchService> = measured
            .iter()
            .map(|s| BenchService {
                endpoints: if i % 2 == 0 {
                    s.endpoints[..1].to_vec()
                } else {
                    s.endpoints.clone()
                },
                ..s.clone()
            })
            .collect();
        match (&bed.agent, &bed.manifests) {
            (Some(agent), Some(dir)) => {
                let map = PinnedMap::open(&agent.bpffs().join(SERVICES_MAP))?;
                let key = ServiceKey::new(MEASURED.0, MEASURED.1, PROTO_TCP, SCOPE_EXTERNAL, 0);
                let want = variant[0].endpoints.len() as u16;
                let start = Instant::now();
                write(dir.path(), MEASURED_FILE, &manifest_list(&variant))?;
                while map
                    .get::<_, ServiceValue>(&key)
                    .is_none_or(|v| v.count != want)
                {
                    if start.elapsed() > Duration::from_secs(10) {
                        bail!("node-agent did not program the change within 10 s");
                    }
                }
                timings.push(("manifest change", start.elapsed()));
            }
            _ if bed.mode == Mode::NoNat => {}
            _ => {
                let start = Instant::now();
                partial_sync(&bed.topology, bed.mode, &variant)?;
                timings.push(("partial sync", start.elapsed()));
            }
        }
    }
    Ok(timings)
}

/// tc_ingress's per-packet cost on the node's client-facing device at this scale, through
/// BPF_PROG_TEST_RUN against the live maps, one run per call: an established flow to the
/// measured Service, a new flow to it each call, and a packet for no Service at all.
fn packet_cost(node: &Netns, count: usize) -> anyhow::Result<BTreeMap<&'static str, Percentiles>> {
    node.run(move || -> anyhow::Result<_> {
        let ifindex = nix::net::if_::if_nametoindex(NODE_CLIENT_DEVICE)?;
        let program = Program::tcx_ingress(ifindex)?;
        let client = |port| SocketAddrV4::new(CLIENT_IP, port);
        let measured = SocketAddrV4::new(MEASURED.0, MEASURED.1);
        // Outside the service CIDR, so no Service lookup can match it.
        let unrelated = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80);
        let established = frame::tcp_frame(client(40000), measured);
        program.time(&established)?; // the first packet makes the conntrack entry
        let time = |frames: &mut dyn Iterator<Item = Vec<u8>>| -> anyhow::Result<Percentiles> {
            let ns = frames
                .map(|f| program.time(&f).map(f64::from))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            Ok(percentiles(&ns))
        };
        let fresh_ports = (0..count).map(|i| frame::tcp_frame(client(1024 + i as u16), measured));
        let [established_kind, new_kind, unrelated_kind] = report::PACKETS;
        Ok(BTreeMap::from([
            (
                established_kind,
                time(&mut std::iter::repeat_n(established.clone(), count))?,
            ),
            (new_kind, time(&mut fresh_ports.into_iter())?),
            (
                unrelated_kind,
                time(&mut std::iter::repeat_n(
                    frame::tcp_frame(client(40000), unrelated),
                    count,
                ))?,
            ),
        ]))
    })?
}

/// Feeds `rules` to `tool` (a restore command, or nft) inside the node namespace.
fn restore(topology: &Topology, tool: &str, args: &[&str], rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", topology.node.name(), tool])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// TCP_CRR: `count` times connect, read the backend's greeting, close; each one's latency.
fn crr(target: SocketAddr, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut greeting = String::new();
        BufReader::new(&stream).read_line(&mut greeting)?;
        drop(stream);
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

/// TCP_RR: one kept-alive connection, `count` request/response round trips.
fn rr(target: SocketAddr, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut conn = Connection::open(target).with_context(|| format!("connecting to {target}"))?;
    (0..count)
        .map(|_| {
            let start = Instant::now();
            conn.echo("x")?;
            Ok(start.elapsed())
        })
        .collect()
}

/// UDP request/response: one flow, `count` datagrams each answered.
fn udp_rr(target: SocketAddr, count: usize) -> anyhow::Result<Vec<Duration>> {
    let flow = UdpFlow::open(target)?;
    (0..count)
        .map(|_| {
            let start = Instant::now();
            flow.ask()?;
            Ok(start.elapsed())
        })
        .collect()
}
