//! `cargo xtask bench`: node-agent against kube-proxy's iptables (legacy and nf_tables
//! backends) and nftables modes, and a no-NAT floor, in namespaces this run creates.
mod kube_proxy;
mod pinned;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use kube_proxy::{
    BenchService, iptables_restore, iptables_restore_partial, nft_ruleset, nft_update,
};
use node_agent_tests::{
    agent::Agent,
    backend::BackendServer,
    client::{Connection, UdpFlow},
    manifest::{write, yaml},
    topology::{Topology, backend_ip},
};
use node_common::{PROTO_TCP, SCOPE_EXTERNAL, SERVICES_MAP, ServiceKey, ServiceValue};
use pinned::PinnedMap;
use serde_json::{Value, json};

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
    /// Where report.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
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
    crr: Vec<Duration>,
    rr: Vec<Duration>,
    udp: Vec<Duration>,
}

pub fn run(agent_binary: &Path, args: BenchArgs) -> anyhow::Result<()> {
    let (scales, rounds, per_round) = if args.quick {
        (vec![1, 100], 2, 100)
    } else {
        (args.services, 5, 1000)
    };
    let mut report = Vec::new();
    println!(
        "{:>8}  {:<16} {:>11} {:>11} {:>8} {:>10} {:>10} {:>11} {:>11}",
        "services",
        "mode",
        "CRR p50 µs",
        "CRR p99 µs",
        "conn/s",
        "RR p50 µs",
        "RR p99 µs",
        "UDP p50 µs",
        "UDP p99 µs"
    );
    for &scale in &scales {
        let services = services(scale);
        let mut beds = Mode::ALL
            .iter()
            .map(|&mode| bed(agent_binary, mode, &services))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Interleaved rounds: a noisy moment hits every mode alike.
        for round in 0..rounds {
            eprintln!("bench: {scale} services, round {}/{rounds}", round + 1);
            for bed in &mut beds {
                let target = bed.target;
                let batch = bed.topology.client.run(move || -> anyhow::Result<_> {
                    Ok((
                        crr(target, per_round)?,
                        rr(target, per_round)?,
                        udp_rr(target, per_round)?,
                    ))
                })?;
                let (crr, rr, udp) = batch.with_context(|| format!("mode {}", bed.mode.name()))?;
                bed.crr.extend(crr);
                bed.rr.extend(rr);
                bed.udp.extend(udp);
            }
        }
        for bed in &beds {
            let timings = programming(bed, &services, if args.quick { 2 } else { 6 })?;
            let programming: BTreeMap<&str, f64> = ["manifest change", "full sync", "partial sync"]
                .into_iter()
                .filter_map(|kind| {
                    let samples: Vec<Duration> = timings
                        .iter()
                        .filter(|(k, _)| *k == kind)
                        .map(|(_, d)| *d)
                        .collect();
                    (!samples.is_empty()).then(|| (kind, summary(&samples).p50 / 1000.0))
                })
                .collect();
            eprintln!(
                "bench: {scale} services, {}: programming p50 (ms) {programming:?}",
                bed.mode.name()
            );
            let (crr, rr, udp) = (summary(&bed.crr), summary(&bed.rr), summary(&bed.udp));
            println!(
                "{scale:>8}  {:<16} {:>11.1} {:>11.1} {:>8.0} {:>10.1} {:>10.1} {:>11.1} {:>11.1}",
                bed.mode.name(),
                crr.p50,
                crr.p99,
                crr.rate,
                rr.p50,
                rr.p99,
                udp.p50,
                udp.p99
            );
            report.push(json!({"services": scale, "mode": bed.mode.name(), "tcp_crr": crr, "tcp_rr": rr, "udp_rr": udp,
                "programming_p50_ms": programming}));
        }
    }
    fs::create_dir_all(&args.out)?;
    let path = args.out.join("report.json");
    fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"results": report}))?,
    )?;
    println!("report: {}", path.display());
    Ok(())
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
    match mode {
        Mode::NoNat => target = SocketAddr::new(IpAddr::V4(backend_ip(1)), BACKEND_PORT),
        Mode::NodeAgent => {
            let dir = tempfile::tempdir()?;
            // The measured Service in a file of its own: a change to it re-reads only that.
            let (fillers, measured) = split(services);
            write(dir.path(), "services.yaml", &manifest_list(&fillers))?;
            write(dir.path(), MEASURED_FILE, &manifest_list(&measured))?;
            let flags = [
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--service-cidr",
                "198.19.0.0/16",
            ];
            agent = Some(Agent::start(
                agent_binary,
                &topology.node,
                dir.path(),
                &topology.node_devices(),
                &flags,
            )?);
            manifests = Some(dir);
        }
        Mode::IptablesLegacy | Mode::IptablesNft | Mode::Nftables => {
            full_sync(&topology, mode, services)?;
        }
    }
    Ok(Bed {
        mode,
        agent,
        manifests,
        _servers: servers,
        topology,
        target,
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
        // One transaction that replaces the table, as kube-proxy's own full resync does.
        Mode::Nftables => {
            let replace = format!(
                "table ip kube-proxy\ndelete table ip kube-proxy\n{}",
                nft_ruleset(services, CLUSTER_CIDR)
            );
            restore(topology, "nft", &["-f", "-"], &replace)
        }
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
/// until the datapath has the change. kube-proxy's modes are timed as a partial sync each time
/// and as a full sync once (it takes minutes at 10k Services with iptables-nft).
fn programming(
    bed: &Bed,
    services: &[BenchService],
    times: usize,
) -> anyhow::Result<Vec<(&'static str, Duration)>> {
    let (fillers, measured) = split(services);
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
                if i == 0 {
                    let start = Instant::now();
                    full_sync(
                        &bed.topology,
                        bed.mode,
                        &[fillers.clone(), variant.clone()].concat(),
                    )?;
                    timings.push(("full sync", start.elapsed()));
                }
                let start = Instant::now();
                partial_sync(&bed.topology, bed.mode, &variant)?;
                timings.push(("partial sync", start.elapsed()));
            }
        }
    }
    Ok(timings)
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

/// The Services (Service ports of one name grouped into one Service) and their
/// EndpointSlices as one `kind: List` manifest.
fn manifest_list(services: &[BenchService]) -> String {
    let mut grouped: Vec<(&str, Vec<&BenchService>)> = Vec::new();
    for svc in services {
        match grouped.last_mut() {
            Some((name, ports)) if *name == svc.name => ports.push(svc),
            _ => grouped.push((&svc.name, vec![svc])),
        }
    }
    let mut items: Vec<Value> = Vec::with_capacity(grouped.len() * 2);
    for (i, (_, ports)) in grouped.iter().enumerate() {
        let name = format!("s{i}");
        let protocol = |svc: &BenchService| svc.proto.to_uppercase();
        let service_ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.proto, "port": p.port, "protocol": protocol(p)}))
            .collect();
        let slice_ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.proto, "port": p.endpoints[0].1, "protocol": protocol(p)}))
            .collect();
        let endpoints: Vec<Value> = ports[0]
            .endpoints
            .iter()
            .map(|(ip, _)| json!({"addresses": [ip.to_string()]}))
            .collect();
        items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ports[0].cluster_ip.to_string(), "ports": service_ports}}));
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": slice_ports, "endpoints": endpoints}));
    }
    yaml(json!({"apiVersion": "v1", "kind": "List", "items": items}))
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

/// Latency percentiles in µs, and operations per second one after another.
#[derive(serde::Serialize)]
struct Summary {
    p50: f64,
    p99: f64,
    rate: f64,
    samples: usize,
}

fn summary(samples: &[Duration]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let total: f64 = samples.iter().map(Duration::as_secs_f64).sum();
    Summary {
        p50: at(0.5),
        p99: at(0.99),
        rate: samples.len() as f64 / total,
        samples: samples.len(),
    }
}
