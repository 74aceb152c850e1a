//! TC ingress on the node's devices: Service frontends are DNATed to a backend, replies from
//! backends are reverse-NATed, everything else passes untouched.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    helpers::bpf_get_prandom_u32,
    macros::classifier,
    programs::TcContext,
};
use node_common::{CT_REPLY, CtKey, CtValue, ServiceKey, ServiceValue};

use crate::{
    maps::{BACKENDS, CONNTRACK, REV_NAT, SERVICES},
    nat::{Side, rewrite},
    packet::{Flow, parse_flow},
};

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    // A failed rewrite may leave a half-translated packet: drop it rather than forward it.
    try_tc_ingress(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_tc_ingress(ctx: &TcContext) -> Result<i32, c_long> {
    let Some(flow) = parse_flow(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let t = &flow.tuple;
    let frontend = ServiceKey {
        address: t.daddr,
        port: t.dport,
        slot: 0,
        proto: t.proto,
        _pad: [0; 3],
    };
    // The service lookup comes first on every packet, so a deleted Service stops attracting
    // traffic at once, even for flows conntrack still knows.
    match unsafe { SERVICES.get(frontend) } {
        Some(master) => to_backend(ctx, &flow, frontend, *master),
        None => reverse_nat(ctx, &flow),
    }
}

fn to_backend(
    ctx: &TcContext,
    flow: &Flow,
    frontend: ServiceKey,
    master: ServiceValue,
) -> Result<i32, c_long> {
    // An established flow stays on its backend for as long as that backend exists.
    if let Some(ct) = unsafe { CONNTRACK.get(flow.tuple) }
        && let Some(backend) = unsafe { BACKENDS.get(ct.backend_id) }
    {
        rewrite(ctx, flow, Side::Destination, backend.address, backend.port)?;
        return Ok(TC_ACT_OK);
    }
    if master.count == 0 {
        return Ok(TC_ACT_SHOT);
    }
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(master.count)) as u16 + 1;
    // A slot may vanish between reading the count and reading the slot while the agent shrinks
    // the Service; the client retransmits.
    let Some(entry) = (unsafe { SERVICES.get(frontend.with_slot(slot)) }) else {
        return Ok(TC_ACT_SHOT);
    };
    let backend_id = entry.backend_id;
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        return Ok(TC_ACT_SHOT);
    };
    let (address, port) = (backend.address, backend.port);
    let t = &flow.tuple;
    let forward = CtValue {
        backend_id,
        rev_nat_id: master.rev_nat_id,
        flags: 0,
        _pad: 0,
    };
    let reply_key = CtKey {
        saddr: address,
        daddr: t.saddr,
        sport: port,
        dport: t.sport,
        proto: t.proto,
        _pad: [0; 3],
    };
    CONNTRACK.insert(flow.tuple, forward, 0)?;
    CONNTRACK.insert(
        reply_key,
        CtValue {
            flags: CT_REPLY,
            ..forward
        },
        0,
    )?;
    rewrite(ctx, flow, Side::Destination, address, port)?;
    Ok(TC_ACT_OK)
}

fn reverse_nat(ctx: &TcContext, flow: &Flow) -> Result<i32, c_long> {
    if let Some(ct) = unsafe { CONNTRACK.get(flow.tuple) }
        && ct.flags & CT_REPLY != 0
        && let Some(frontend) = unsafe { REV_NAT.get(ct.rev_nat_id) }
    {
        rewrite(ctx, flow, Side::Source, frontend.address, frontend.port)?;
    }
    Ok(TC_ACT_OK)
}
