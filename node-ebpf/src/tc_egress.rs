//! TC egress on the node's devices: the masquerade half of a masqueraded flow, after routing
//! has chosen the way out (the source becomes the node's address and the claimed port).
use aya_ebpf::{bindings::TC_ACT_OK, cty::c_long, macros::classifier, programs::TcContext};
use node_common::{MASQ_MARK, MASQ_MARK_MASK};

use crate::{
    maps::config,
    nat::{Side, rewrite},
    packet::parse_flow,
};

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    try_tc_egress(&ctx).unwrap_or(aya_ebpf::bindings::TC_ACT_SHOT)
}

fn try_tc_egress(ctx: &TcContext) -> Result<i32, c_long> {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MASQ_MARK_MASK != MASQ_MARK {
        return Ok(TC_ACT_OK);
    }
    if let Some(flow) = parse_flow(ctx) {
        rewrite(ctx, &flow, Side::Source, config().snat_address, mark as u16)?;
    }
    ctx.set_mark(0);
    Ok(TC_ACT_OK)
}
