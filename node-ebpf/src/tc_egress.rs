//! TC egress on the node's devices: the source rewrites tc_ingress left in the skb mark, done
//! after routing has chosen the way out (see node_common::MARK_KIND_MASK).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    macros::classifier,
    programs::TcContext,
};
use node_common::{MARK_KIND_MASK, MARK_MASQUERADE, MARK_REV_NAT, MARK_VALUE_MASK};

use crate::{
    maps::{REV_NAT, config},
    nat::{Side, rewrite},
    packet::parse_flow,
};

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    try_tc_egress(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_tc_egress(ctx: &TcContext) -> Result<i32, c_long> {
    let mark = unsafe { (*ctx.skb.skb).mark };
    let source = match mark & MARK_KIND_MASK {
        MARK_MASQUERADE => Some((config().snat_address, mark as u16)),
        MARK_REV_NAT => unsafe { REV_NAT.get(mark & MARK_VALUE_MASK) }.map(|f| (f.address, f.port)),
        _ => return Ok(TC_ACT_OK),
    };
    if let (Some((address, port)), Some(flow)) = (source, parse_flow(ctx)) {
        rewrite(ctx, &flow, Side::Source, address, port)?;
    }
    ctx.set_mark(0);
    Ok(TC_ACT_OK)
}
