//! Bounds-checked packet parsing: every read of packet memory in the datapath goes through here.
use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use node_common::{CtKey, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// More-fragments flag and fragment offset: any of them set means this is a fragment.
const IP_FRAGMENT_MASK: u16 = 0x3fff;

/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The first four bytes of TCP, UDP and SCTP headers alike.
#[repr(C)]
struct L4Ports {
    source: u16,
    dest: u16,
}

/// An IPv4 TCP, UDP or SCTP packet: its 5-tuple (wire order) and where its L4 header starts.
pub struct Flow {
    pub tuple: CtKey,
    pub l4_off: usize,
}

impl Flow {
    /// Offset of the L4 checksum field (TCP and UDP; SCTP's CRC32c sits at 8).
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.tuple.proto == PROTO_TCP { 16 } else { 6 }
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Parses an unfragmented IPv4 TCP/UDP/SCTP packet. `None` for anything else, which the datapath
/// passes untouched.
#[inline(always)]
pub fn parse_flow(ctx: &TcContext) -> Option<Flow> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let (version_ihl, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).proto,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    if u16::from_be(frag_off) & IP_FRAGMENT_MASK != 0
        || !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
    {
        return None;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let ports = ptr_at::<L4Ports>(ctx, l4_off)?;
    let (sport, dport) = unsafe { ((*ports).source, (*ports).dest) };
    Some(Flow {
        tuple: CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        },
        l4_off,
    })
}
