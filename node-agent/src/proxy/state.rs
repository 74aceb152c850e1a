//! The content of the datapath's Service maps as plain data, and the writes that change it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use node_common::{Backend, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RevNat, ServiceKey, ServiceValue};

use crate::model::Ipv4Cidr;

/// A Service port as the datapath matches it: ClusterIP:port/protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl Frontend {
    pub fn key(&self, scope: u8, slot: u16) -> ServiceKey {
        ServiceKey::new(self.ip, self.port, self.proto, scope, slot)
    }

    pub fn of(key: &ServiceKey) -> Self {
        Self {
            ip: key.ip(),
            port: key.host_port(),
            proto: key.proto,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, proto_name(self.proto))
    }
}

/// The Kubernetes spelling of an IP protocol number.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "?",
    }
}

/// What SERVICES, BACKENDS, REV_NAT and SOURCE_RANGES hold (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    /// (reverse-NAT id of a LoadBalancer frontend, a source range it allows).
    pub source_ranges: BTreeSet<(u32, Ipv4Cidr)>,
    /// Every allocated ClusterIP.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutRevNat(u32, RevNat),
    PutSourceRange(u32, Ipv4Cidr),
    PutService(ServiceKey, ServiceValue),
    PutClusterIp(Ipv4Addr),
    DeleteClusterIp(Ipv4Addr),
    DeleteService(ServiceKey),
    DeleteSourceRange(u32, Ipv4Cidr),
    DeleteRevNat(u32),
    DeleteBackend(u32),
}

impl MapState {
    /// The state after `op` has been written.
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
            }
            MapOp::PutRevNat(id, rev_nat) => {
                self.rev_nat.insert(id, rev_nat);
            }
            MapOp::PutSourceRange(id, cidr) => {
                self.source_ranges.insert((id, cidr));
            }
            MapOp::DeleteSourceRange(id, cidr) => {
                self.source_ranges.remove(&(id, cidr));
            }
            MapOp::PutService(key, value) => {
                self.services.insert(key, value);
            }
            MapOp::PutClusterIp(ip) => {
                self.cluster_ips.insert(ip);
            }
            MapOp::DeleteClusterIp(ip) => {
                self.cluster_ips.remove(&ip);
            }
            MapOp::DeleteService(key) => {
                self.services.remove(&key);
            }
            MapOp::DeleteRevNat(id) => {
                self.rev_nat.remove(&id);
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
        }
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PutBackend(id, b) => write!(f, "put backend {id} ({}:{})", b.ip(), b.host_port()),
            Self::PutRevNat(id, _) => write!(f, "put reverse NAT {id}"),
            Self::PutSourceRange(id, cidr) => {
                write!(f, "put source range {cidr} of reverse NAT {id}")
            }
            Self::DeleteSourceRange(id, cidr) => {
                write!(f, "delete source range {cidr} of reverse NAT {id}")
            }
            Self::PutService(k, _) => {
                write!(
                    f,
                    "put service {} scope {} slot {}",
                    Frontend::of(k),
                    k.scope,
                    k.slot
                )
            }
            Self::DeleteService(k) => {
                write!(
                    f,
                    "delete service {} scope {} slot {}",
                    Frontend::of(k),
                    k.scope,
                    k.slot
                )
            }
            Self::PutClusterIp(ip) => write!(f, "put ClusterIP {ip}"),
            Self::DeleteClusterIp(ip) => write!(f, "delete ClusterIP {ip}"),
            Self::DeleteRevNat(id) => write!(f, "delete reverse NAT {id}"),
            Self::DeleteBackend(id) => write!(f, "delete backend {id}"),
        }
    }
}
