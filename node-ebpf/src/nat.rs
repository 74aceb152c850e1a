//! Address and port rewriting with incremental checksum updates (RFC 1624) through the kernel's
//! csum helpers, which also handle CHECKSUM_PARTIAL skbs from local senders; SCTP's CRC32c is
//! recomputed when a port changes.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::c_long,
    programs::TcContext,
};
use node_common::{PROTO_SCTP, PROTO_UDP};

use crate::{
    packet::{Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    sctp,
};

/// Which end of the flow to rewrite.
pub enum Side {
    /// DNAT: client → frontend becomes client → backend.
    Destination,
    /// Reverse NAT: backend → client becomes frontend → client.
    Source,
}

/// Rewrites one side's address and port (both network order) and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    address: u32,
    port: u16,
) -> Result<(), c_long> {
    let t = &flow.tuple;
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Destination => (IP_DADDR_OFF, flow.l4_off + 2, t.daddr, t.dport),
        Side::Source => (IP_SADDR_OFF, flow.l4_off, t.saddr, t.sport),
    };
    if t.proto != PROTO_SCTP {
        // A UDP checksum of 0 means "none" and must stay 0; a computed 0 is sent as 0xffff.
        let udp = if t.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let csum_off = flow.l4_csum_off();
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | udp | 4;
        ctx.l4_csum_replace(csum_off, u64::from(old_addr), u64::from(address), pseudo)?;
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), udp | 2)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(address), 4)?;
    ctx.store(addr_off, &address, 0)?;
    ctx.store(port_off, &port, 0)?;
    if t.proto == PROTO_SCTP && port != old_port {
        sctp::update_crc(ctx, flow.l4_off)?;
    }
    Ok(())
}
