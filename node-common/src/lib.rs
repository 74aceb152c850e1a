//! The ABI shared by the eBPF datapath (`node-ebpf`) and the agent (`node-agent`).
//!
//! The map model is Cilium's: a service map keyed by frontend and slot (slot 0 is the master
//! entry, slots 1..=count name backends), a backend map, a reverse-NAT map and an LRU conntrack
//! map, plus per-CPU packet counters keyed by reverse-NAT id (one per frontend). Addresses and
//! ports are stored in network byte order exactly as they sit in a packet, so the datapath
//! compares and copies them without swapping; the constructors and accessors below are the
//! only place that converts.
#![no_std]

use core::net::Ipv4Addr;

/// IANA protocol numbers, as in the IPv4 header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Map names, shared by the `#[map]` statics in node-ebpf and the agent's lookups.
pub const SERVICES_MAP: &str = "SERVICES";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const REV_NAT_MAP: &str = "REV_NAT";
pub const CONNTRACK_MAP: &str = "CONNTRACK";
pub const AFFINITY_MAP: &str = "AFFINITY";
pub const SOURCE_RANGES_MAP: &str = "SOURCE_RANGES";
pub const CLUSTER_IPS_MAP: &str = "CLUSTER_IPS";
pub const SERVICE_COUNTERS_MAP: &str = "SERVICE_COUNTERS";
/// The `Config` global in node-ebpf's read-only data, set by the agent at load time.
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// Capacities of the maps. SERVICES holds a master entry plus one slot per backend for every
/// frontend; 100k Services × 2 backends needs 300k entries. The maps the agent writes are
/// allocated as entries arrive (`MAP_NO_PREALLOC`), so a capacity costs no kernel memory
/// until it is used.
pub const SERVICES_MAX_ENTRIES: u32 = 2_097_152;
pub const BACKENDS_MAX_ENTRIES: u32 = 1_048_576;
/// One reverse-NAT id per frontend. Ids run up to `MARK_VALUE_MASK` (they travel in the skb
/// mark), so freed ids can rest long before they are handed out again.
pub const REV_NAT_MAX_ENTRIES: u32 = 1_048_576;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;
pub const CLUSTER_IPS_MAX_ENTRIES: u32 = 1_048_576;
/// One counter per frontend, keyed like REV_NAT. Per CPU (16 bytes per CPU each), created by a
/// frontend's first packet, so frontends that see no traffic cost nothing.
pub const SERVICE_COUNTERS_MAX_ENTRIES: u32 = REV_NAT_MAX_ENTRIES;
/// BPF_F_NO_PREALLOC: hash map elements are allocated on insert, not all at creation.
pub const MAP_NO_PREALLOC: u32 = 1;

/// The most backends one frontend may have: a Service beyond it is reported, not truncated
/// silently.
pub const MAX_BACKENDS_PER_SERVICE: usize = 4096;

/// Converts a host-order port to the network-order representation the maps hold.
const fn port_to_wire(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

const fn port_from_wire(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

const fn addr_to_wire(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

const fn addr_from_wire(address: u32) -> Ipv4Addr {
    let [a, b, c, d] = address.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Key of `SERVICES`: one frontend (ClusterIP:port/proto) and a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Frontend address, network byte order.
    pub address: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// 0 is the master entry; 1..=count are backend slots.
    pub slot: u16,
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// The backends every source uses, or (with `SVC_ETP_LOCAL`) those external sources use.
pub const SCOPE_EXTERNAL: u8 = 0;
/// With `SVC_ETP_LOCAL`: the backends sources inside the cluster (pods, the node) use.
pub const SCOPE_INTERNAL: u8 = 1;

impl ServiceKey {
    pub const fn new(address: Ipv4Addr, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            address: addr_to_wire(address),
            port: port_to_wire(port),
            slot,
            proto,
            scope,
            _pad: [0; 2],
        }
    }

    pub const fn ip(&self) -> Ipv4Addr {
        addr_from_wire(self.address)
    }

    pub const fn host_port(&self) -> u16 {
        port_from_wire(self.port)
    }

    /// The same frontend at another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Value of `SERVICES`. The master entry (slot 0) carries `count`, `flags` and the affinity
/// timeout; a backend slot carries `backend_id`. Both carry the frontend's reverse-NAT id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub count: u16,
    /// `SVC_*` bits (master entries).
    pub flags: u16,
    /// Seconds a client stays on its backend (with `SVC_AFFINITY`).
    pub affinity_timeout: u32,
}

/// A NodePort, LoadBalancer or ExternalIP frontend: reached from outside the cluster.
pub const SVC_EXTERNAL: u16 = 1 << 0;
/// externalTrafficPolicy Local: external sources keep their address and use the local backends
/// of scope EXTERNAL; sources inside the cluster use scope INTERNAL.
pub const SVC_ETP_LOCAL: u16 = 1 << 1;
/// sessionAffinity ClientIP.
pub const SVC_AFFINITY: u16 = 1 << 2;
/// loadBalancerSourceRanges: sources not in SOURCE_RANGES for this frontend are dropped.
pub const SVC_SOURCE_RANGES: u16 = 1 << 3;
/// No backends in this scope although the Service has some elsewhere (a Local traffic policy
/// with no local endpoint): drop, where a Service with no endpoints at all rejects.
pub const SVC_DROP_WHEN_EMPTY: u16 = 1 << 4;

/// Value of `BACKENDS`, keyed by backend id (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl Backend {
    pub const fn new(address: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            address: addr_to_wire(address),
            port: port_to_wire(port),
            proto,
            _pad: 0,
        }
    }

    pub const fn ip(&self) -> Ipv4Addr {
        addr_from_wire(self.address)
    }

    pub const fn host_port(&self) -> u16 {
        port_from_wire(self.port)
    }
}

/// Value of `REV_NAT`, keyed by reverse-NAT id (u32): the frontend a reply must appear from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl RevNat {
    pub const fn new(address: Ipv4Addr, port: u16) -> Self {
        Self {
            address: addr_to_wire(address),
            port: port_to_wire(port),
            _pad: 0,
        }
    }
}

/// Value of `SERVICE_COUNTERS` (per CPU), keyed by reverse-NAT id: the packets sent to one
/// frontend that reached the Service (new and established forward flows, also those rejected or
/// dropped by its policies) and their bytes as the frames' length. The datapath creates an
/// entry on the frontend's first packet and only adds to it; the agent removes it with the
/// frontend's reverse-NAT entry, so a reused id starts from zero. (A packet that found the
/// frontend just before it went may create it again; a frontend given that id later would
/// start from its count, but ids are handed out again only after every other one.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of `CONNTRACK`: a flow's 5-tuple as it appears on the wire, in the direction the entry
/// matches (client → frontend for a forward entry, backend → client for a reply entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The entry matches replies (backend → client): translate the source back to the frontend.
pub const CT_REPLY: u8 = 1 << 0;
/// The flow is masqueraded: forward packets leave with the node's address and `nat_port`;
/// replies go back to `nat_addr`:`nat_port`, the client.
pub const CT_SNAT: u8 = 1 << 1;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// Forward entries: the backend this flow is pinned to.
    pub backend_id: u32,
    /// Reply entries of masqueraded flows: the client's address (network order).
    pub nat_addr: u32,
    /// Masqueraded flows: forward entries hold the node port the flow leaves with, reply
    /// entries the client's port (network order).
    pub rev_nat_id: u32,
    pub nat_port: u16,
    /// `CT_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Source rewrites happen at egress, after routing, as netfilter does them in POSTROUTING: a
/// forwarded packet must not carry a node address as its source while the kernel routes it
/// (it would be dropped as a martian). tc_ingress leaves the work in the skb mark: the high 8
/// bits say which rewrite, the low 24 bits with what (24 bits: room for 100k+ frontends).
pub const MARK_KIND_MASK: u32 = 0xff00_0000;
pub const MARK_VALUE_MASK: u32 = !MARK_KIND_MASK;
/// Masquerade: the source becomes `Config::snat_address` and the port in the low bits
/// (network order).
pub const MARK_MASQUERADE: u32 = 0x4e00_0000;
/// Reverse NAT of a reply: the source becomes the frontend of the reverse-NAT id in the low bits.
pub const MARK_REV_NAT: u32 = 0x4f00_0000;
/// Ports masqueraded flows leave with: the ephemeral range, clear of the NodePort range.
pub const SNAT_PORT_MIN: u16 = 32_768;
pub const SNAT_PORT_MAX: u16 = 60_999;

/// Key of `AFFINITY`: a client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: u32,
    pub rev_nat_id: u32,
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Seconds on the kernel's monotonic clock.
    pub last_used: u32,
}

/// Data of an `SOURCE_RANGES` LPM key: the prefix length counts 32 bits for the frontend plus
/// the CIDR's own bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRange {
    pub rev_nat_id: u32,
    /// Network order.
    pub address: u32,
}

/// Bits of the LPM prefix taken by `rev_nat_id`.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 32;

/// The node's addressing, fixed when the datapath loads. Zero means "not configured".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The address masqueraded flows leave with (network order).
    pub snat_address: u32,
    /// Pod range: sources inside it are cluster traffic.
    pub cluster_cidr: Cidr,
    /// ClusterIP range: packets to an address in it that no Service uses are dropped.
    pub service_cidr: Cidr,
}

/// An IPv4 prefix in network order, with its mask, for one-AND membership tests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub address: u32,
    pub mask: u32,
}

impl Cidr {
    pub const fn new(address: Ipv4Addr, prefix: u8) -> Self {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        };
        Self {
            address: addr_to_wire(address) & u32::from_ne_bytes(mask.to_be_bytes()),
            mask: u32::from_ne_bytes(mask.to_be_bytes()),
        }
    }

    /// Whether `address` (network order) lies inside; never for an unconfigured (zero) CIDR.
    pub const fn contains(&self, address: u32) -> bool {
        self.mask != 0 && address & self.mask == self.address
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made of integers, with explicit padding fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_matches_packet_bytes() {
        let key = ServiceKey::new(
            Ipv4Addr::new(10, 96, 0, 1),
            443,
            PROTO_TCP,
            SCOPE_EXTERNAL,
            0,
        );
        // The bytes in memory are the bytes in the packet header.
        assert_eq!(key.address.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(key.ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(key.host_port(), 443);
    }

    #[test]
    fn abi_sizes_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 12);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 16);
        assert_eq!(core::mem::size_of::<Backend>(), 8);
        assert_eq!(core::mem::size_of::<RevNat>(), 8);
        assert_eq!(core::mem::size_of::<ServiceCounters>(), 16);
        assert_eq!(core::mem::size_of::<CtKey>(), 16);
        assert_eq!(core::mem::size_of::<CtValue>(), 16);
        assert_eq!(core::mem::size_of::<AffinityKey>(), 8);
        assert_eq!(core::mem::size_of::<AffinityValue>(), 8);
        assert_eq!(core::mem::size_of::<SourceRange>(), 8);
        assert_eq!(core::mem::size_of::<Config>(), 20);
    }

    #[test]
    fn cidr_membership() {
        let pods = Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16);
        let wire = |a, b, c, d| u32::from_ne_bytes([a, b, c, d]);
        assert!(pods.contains(wire(10, 244, 3, 7)));
        assert!(!pods.contains(wire(10, 245, 0, 1)));
        assert!(
            !Cidr::default().contains(wire(10, 244, 3, 7)),
            "unconfigured matches nothing"
        );
    }
}
