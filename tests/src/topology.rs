//! The node under test with a client and N backends around it, each in its own namespace:
//!
//! ```text
//!  client 198.18.1.2 ──eth0│nc── node ──nbI│eth0── backend-I 198.18.(10+I).2
//! ```
//! Checksum offload is off on every veth, so each kernel computes and verifies checksums in
//! software: a wrong checksum written by the datapath loses the packet.
use std::net::Ipv4Addr;

use crate::{
    backend::BackendServer,
    netns::{Netns, ip},
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The node's address facing the client: its first device's, so the masquerade address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The node's device facing the client.
pub const NODE_CLIENT_DEVICE: &str = "nc";

pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
}

/// The address of backend `i` (1-based).
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10 + i as u8, 2)
}

impl Topology {
    pub fn new(backends: usize) -> anyhow::Result<Self> {
        let client = Netns::new("client")?;
        let node = Netns::new("node")?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        link(
            &client,
            "eth0",
            CLIENT_IP,
            &node,
            NODE_CLIENT_DEVICE,
            NODE_IP,
        )?;
        let mut namespaces = Vec::new();
        for i in 1..=backends {
            let backend = Netns::new(&format!("backend{i}"))?;
            let gateway = Ipv4Addr::new(198, 18, 10 + i as u8, 1);
            link(
                &backend,
                "eth0",
                backend_ip(i),
                &node,
                &format!("nb{i}"),
                gateway,
            )?;
            namespaces.push(backend);
        }
        Ok(Self {
            client,
            node,
            backends: namespaces,
        })
    }

    /// Adds `address`/24 to the client, routed back to it by the node: a second client source.
    pub fn add_client_address(&self, address: Ipv4Addr) -> anyhow::Result<()> {
        ip(&[
            "-n",
            self.client.name(),
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        let net = Ipv4Addr::from(u32::from(address) & 0xffff_ff00);
        ip(&[
            "-n",
            self.node.name(),
            "route",
            "add",
            &format!("{net}/24"),
            "dev",
            NODE_CLIENT_DEVICE,
        ])
    }

    /// A TCP+UDP server named `backend-I` on `port` in each backend namespace.
    pub fn start_backends(&self, port: u16) -> anyhow::Result<Vec<BackendServer>> {
        let named = |(i, ns)| BackendServer::start(ns, &format!("backend-{}", i + 1), port);
        self.backends.iter().enumerate().map(named).collect()
    }

    /// Every node device: where the datapath attaches.
    pub fn node_devices(&self) -> Vec<String> {
        let mut devices = vec![NODE_CLIENT_DEVICE.to_owned()];
        devices.extend((1..=self.backends.len()).map(|i| format!("nb{i}")));
        devices
    }
}

/// A veth between `host`'s `host_dev` (`host_ip`/24, default route via `gateway_ip`) and
/// `gateway`'s `gateway_dev` (`gateway_ip`/24), with checksum offload off on both ends.
fn link(
    host: &Netns,
    host_dev: &str,
    host_ip: Ipv4Addr,
    gateway: &Netns,
    gateway_dev: &str,
    gateway_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    ip(&[
        "-n",
        host.name(),
        "link",
        "add",
        host_dev,
        "type",
        "veth",
        "peer",
        "name",
        gateway_dev,
        "netns",
        gateway.name(),
    ])?;
    for (ns, dev, addr) in [
        (host, host_dev, host_ip),
        (gateway, gateway_dev, gateway_ip),
    ] {
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ])?;
        ip(&["-n", ns.name(), "link", "set", dev, "up"])?;
        ns.exec("ethtool", &["-K", dev, "tx", "off", "rx", "off"])?;
    }
    ip(&[
        "-n",
        host.name(),
        "route",
        "add",
        "default",
        "via",
        &gateway_ip.to_string(),
    ])
}

/// The EndpointSlice `web-1` of Service `web` (80/TCP "http" and 80/UDP "echo" on `port`),
/// listing the backends numbered `backends` (1-based).
pub fn web_slice(backends: &[usize], port: u16) -> String {
    let ips: Vec<Ipv4Addr> = backends.iter().map(|&i| backend_ip(i)).collect();
    crate::manifest::endpoint_slice(
        "web-1",
        "web",
        &[("http", port, "TCP"), ("echo", port, "UDP")],
        &ips,
    )
}
