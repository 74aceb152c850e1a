//! REJECT as kube-proxy does it: the packet becomes an ICMP port-unreachable from the address
//! the client targeted, sent back out of the device it came in on.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    cty::c_long,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::packet::{ETH_HLEN, Flow};

const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// What ICMP quotes of the offending packet: its IP header and the first 8 bytes after it.
const QUOTE_LEN: usize = IPV4_HLEN + 8;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

#[inline(always)]
pub fn reject(ctx: &TcContext, flow: &Flow) -> Result<i32, c_long> {
    // Packets with IP options are dropped rather than quoted: the quote stays fixed-size.
    if flow.l4_off != ETH_HLEN + IPV4_HLEN {
        return Ok(TC_ACT_SHOT);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let mut quote: [u32; QUOTE_LEN / 4] = ctx.load(ETH_HLEN)?;

    // Keep Ethernet + quote, then open room for the new IP and ICMP headers after Ethernet.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE_LEN) as u32, 0) };
    if ret != 0 {
        return Err(ret);
    }
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)?;

    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0)?;

    let t = &flow.tuple;
    let mut ip = [0u32; IPV4_HLEN / 4];
    {
        let b = as_bytes_mut(&mut ip);
        b[0] = 0x45;
        b[2..4].copy_from_slice(&((IPV4_HLEN + ICMP_HLEN + QUOTE_LEN) as u16).to_be_bytes());
        b[8] = 64;
        b[9] = PROTO_ICMP;
        b[12..16].copy_from_slice(&t.daddr.to_ne_bytes());
        b[16..20].copy_from_slice(&t.saddr.to_ne_bytes());
    }
    let ip_csum = fold(unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            ip.as_mut_ptr(),
            IPV4_HLEN as u32,
            0,
        )
    });
    as_bytes_mut(&mut ip)[10..12].copy_from_slice(&ip_csum.to_ne_bytes());

    let mut icmp = [0u32; ICMP_HLEN / 4];
    as_bytes_mut(&mut icmp)[0] = ICMP_DEST_UNREACH;
    as_bytes_mut(&mut icmp)[1] = ICMP_PORT_UNREACH;
    let partial = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            icmp.as_mut_ptr(),
            ICMP_HLEN as u32,
            0,
        )
    };
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote.as_mut_ptr(),
            QUOTE_LEN as u32,
            partial as u32,
        )
    };
    let icmp_csum = fold(sum);
    as_bytes_mut(&mut icmp)[2..4].copy_from_slice(&icmp_csum.to_ne_bytes());

    ctx.store(ETH_HLEN, &ip, 0)?;
    ctx.store(ETH_HLEN + IPV4_HLEN, &icmp, 0)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}

/// Folds a 32-bit one's-complement sum to the 16-bit checksum field (in memory order).
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut s = sum as u32 as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn as_bytes_mut<const N: usize>(words: &mut [u32; N]) -> &mut [u8] {
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), N * 4) }
}
