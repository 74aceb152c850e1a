//! The ABI shared by the eBPF datapath (`node-ebpf`) and the agent (`node-agent`).
//!
//! The map model is Cilium's: a service map keyed by frontend and slot (slot 0 is the master
//! entry, slots 1..=count name backends), a backend map, a reverse-NAT map and an LRU conntrack
//! map. Addresses and ports are stored in network byte order exactly as they sit in a packet, so
//! the datapath compares and copies them without swapping; the constructors and accessors below
//! are the only place that converts.
#![no_std]

use core::net::Ipv4Addr;

/// IANA protocol numbers, as in the IPv4 header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names, shared by the `#[map]` statics in node-ebpf and the agent's lookups.
pub const SERVICES_MAP: &str = "SERVICES";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const REV_NAT_MAP: &str = "REV_NAT";
pub const CONNTRACK_MAP: &str = "CONNTRACK";

/// Capacities of the maps. SERVICES holds a master entry plus one slot per backend for every
/// frontend; 100k Services × 2 backends needs 300k entries.
pub const SERVICES_MAX_ENTRIES: u32 = 524_288;
pub const BACKENDS_MAX_ENTRIES: u32 = 262_144;
pub const REV_NAT_MAX_ENTRIES: u32 = 65_535;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

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
    pub _pad: [u8; 3],
}

impl ServiceKey {
    pub const fn new(address: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            address: addr_to_wire(address),
            port: port_to_wire(port),
            slot,
            proto,
            _pad: [0; 3],
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

/// Value of `SERVICES`. The master entry (slot 0) carries `count`; a backend slot carries
/// `backend_id`. Both carry the frontend's reverse-NAT id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_id: u16,
}

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

/// Value of `REV_NAT`, keyed by reverse-NAT id (u16): the frontend a reply must appear from.
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
pub const CT_REPLY: u8 = 1;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// Forward entries: the backend this flow is pinned to.
    pub backend_id: u32,
    pub rev_nat_id: u16,
    /// `CT_REPLY` or 0.
    pub flags: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made of integers, with explicit padding fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_matches_packet_bytes() {
        let key = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 443, PROTO_TCP, 0);
        // The bytes in memory are the bytes in the packet header.
        assert_eq!(key.address.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(key.ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(key.host_port(), 443);
    }

    #[test]
    fn abi_sizes_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 12);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 8);
        assert_eq!(core::mem::size_of::<Backend>(), 8);
        assert_eq!(core::mem::size_of::<RevNat>(), 8);
        assert_eq!(core::mem::size_of::<CtKey>(), 16);
        assert_eq!(core::mem::size_of::<CtValue>(), 8);
    }
}
