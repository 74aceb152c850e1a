//! `cargo xtask demo`: the real agent on a node namespace between a client and three backends,
//! fed from deploy/demo/, showing a ClusterIP load-balancing and following an endpoint change.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use node_agent_tests::{
    agent::Agent,
    client::{tcp_spread, udp_spread},
    manifest::endpoint_slice,
    topology::{Topology, backend_ip},
};

const FRONTEND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)), 80);
const ENDPOINTS_FILE: &str = "web-endpoints.yaml";

pub fn run(agent_binary: &Path, manifests: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "== topology: client 198.18.1.2 → node (node-agent) → backend-1..3 at 198.18.11-13.2, each in its own netns"
    );
    let topology = Topology::new(3)?;
    let _servers = topology.start_backends(8080)?;
    let dir = tempfile::tempdir()?;
    for entry in fs::read_dir(manifests)? {
        let path = entry?.path();
        fs::copy(&path, dir.path().join(path.file_name().expect("a file")))?;
    }
    println!(
        "== node-agent run --manifests {} --devices {}",
        dir.path().display(),
        topology.node_devices().join(",")
    );
    let agent = Agent::start(
        agent_binary,
        &topology.node,
        dir.path(),
        &topology.node_devices(),
        &[],
    )?;
    println!("== node-agent lb list\n{}", agent.lb_list()?);

    println!("== 300 TCP connections and 300 UDP flows to {FRONTEND}:");
    println!(
        "   TCP {:?}",
        topology.client.run(|| tcp_spread(FRONTEND, 300))?
    );
    println!(
        "   UDP {:?}",
        topology.client.run(|| udp_spread(FRONTEND, 300))?
    );

    println!(
        "== removing backend-3 ({}) from {ENDPOINTS_FILE}",
        backend_ip(3)
    );
    let ports = [("http", 8080, "TCP"), ("echo", 8080, "UDP")];
    fs::write(
        dir.path().join(ENDPOINTS_FILE),
        endpoint_slice("web-1", "web", &ports, &[backend_ip(1), backend_ip(2)]),
    )?;
    thread::sleep(Duration::from_millis(300));
    println!("{}", agent.lb_list()?);
    println!(
        "   TCP {:?}",
        topology.client.run(|| tcp_spread(FRONTEND, 300))?
    );
    println!(
        "== done in {:.1} s; stopping the agent and removing the namespaces",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
