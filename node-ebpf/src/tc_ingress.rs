//! TC ingress on the node's devices: packets to a Service frontend are DNATed to a backend
//! (and marked for masquerading where kube-proxy would masquerade), replies are marked for
//! reverse NAT (and de-masqueraded), a frontend with no usable backend rejects or drops,
//! everything else passes untouched.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    helpers::bpf_get_prandom_u32,
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use node_common::{
    CT_REPLY, CT_SNAT, Config, CtKey, CtValue, MARK_MASQUERADE, MARK_REV_NAT, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SNAT_PORT_MAX, SNAT_PORT_MIN, SOURCE_RANGE_FRONTEND_BITS, SVC_DROP_WHEN_EMPTY,
    SVC_ETP_LOCAL, SVC_EXTERNAL, SVC_SOURCE_RANGES, ServiceCounters, ServiceKey, ServiceValue,
    SourceRange,
};

use crate::{
    lb,
    maps::{BACKENDS, CLUSTER_IPS, CONNTRACK, SERVICE_COUNTERS, SERVICES, SOURCE_RANGES, config},
    nat::{Side, rewrite},
    packet::{Flow, parse_flow},
    reject::reject,
};

/// Tries at finding a free masquerade port before the packet is dropped.
const SNAT_PORT_TRIES: u32 = 16;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    // A failed rewrite may leave a half-translated packet: drop it rather than forward it.
    try_tc_ingress(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn try_tc_ingress(ctx: &TcContext) -> Result<i32, c_long> {
    let Some(flow) = parse_flow(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let t = flow.tuple;
    let ct = unsafe { CONNTRACK.get(t) }.copied();
    if let Some(ct) = ct
        && ct.flags & CT_REPLY != 0
    {
        return reply(ctx, &flow, &ct);
    }
    let frontend = ServiceKey {
        address: t.daddr,
        port: t.dport,
        slot: 0,
        proto: t.proto,
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    };
    // The frontend is looked up on every packet, so a deleted Service stops attracting
    // traffic at once, even for flows conntrack still knows.
    let Some(master) = unsafe { SERVICES.get(frontend) }.copied() else {
        // A ClusterIP on a port or protocol no Service serves rejects; an address of the
        // service range that no Service uses goes nowhere (kube-proxy's nftables mode).
        // With the range known, addresses outside it skip the ClusterIP lookup.
        let range = config().service_cidr;
        let in_range = range.contains(t.daddr);
        if (in_range || range.mask == 0) && unsafe { CLUSTER_IPS.get(t.daddr) }.is_some() {
            return reject(ctx, &flow);
        }
        return Ok(if in_range { TC_ACT_SHOT } else { TC_ACT_OK });
    };
    count(master.rev_nat_id, ctx.len());
    if let Some(ct) = ct
        && let Some(backend) = unsafe { BACKENDS.get(ct.backend_id) }
    {
        let (address, port) = (backend.address, backend.port);
        rewrite(ctx, &flow, Side::Destination, address, port)?;
        if ct.flags & CT_SNAT != 0 {
            ctx.set_mark(MARK_MASQUERADE | u32::from(ct.nat_port));
        }
        return Ok(TC_ACT_OK);
    }
    new_flow(ctx, &flow, frontend, &master)
}

fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    frontend: ServiceKey,
    master: &ServiceValue,
) -> Result<i32, c_long> {
    let t = &flow.tuple;
    let cfg = config();
    if master.flags & SVC_SOURCE_RANGES != 0 && !source_allowed(master.rev_nat_id, t.saddr) {
        return Ok(TC_ACT_SHOT);
    }
    // Sources inside the cluster: pods, and the node itself.
    let from_node = cfg.snat_address != 0 && t.saddr == cfg.snat_address;
    let internal = cfg.cluster_cidr.contains(t.saddr) || from_node;
    let etp_local = master.flags & SVC_ETP_LOCAL != 0;
    let (key, scope_master) = if etp_local && internal {
        let key = ServiceKey {
            scope: SCOPE_INTERNAL,
            ..frontend
        };
        match unsafe { SERVICES.get(key) } {
            Some(m) => (key, *m),
            None => return Ok(TC_ACT_SHOT),
        }
    } else {
        (frontend, *master)
    };
    if scope_master.count == 0 {
        return if scope_master.flags & SVC_DROP_WHEN_EMPTY != 0 {
            Ok(TC_ACT_SHOT)
        } else {
            reject(ctx, flow)
        };
    }
    let Some((backend_id, backend)) = lb::select(key, &scope_master, t.saddr) else {
        return Ok(TC_ACT_SHOT);
    };
    let masquerade =
        masquerades(&cfg, master.flags, t.saddr, from_node) || backend.address == t.saddr;
    let mut forward = CtValue {
        backend_id,
        nat_addr: 0,
        nat_port: 0,
        rev_nat_id: master.rev_nat_id,
        flags: 0,
        _pad: 0,
    };
    let reply_value = CtValue {
        flags: CT_REPLY,
        ..forward
    };
    if masquerade {
        let Some(port) = claim_snat_port(&cfg, t, &backend, reply_value) else {
            return Ok(TC_ACT_SHOT);
        };
        forward.flags = CT_SNAT;
        forward.nat_port = port;
        ctx.set_mark(MARK_MASQUERADE | u32::from(port));
    } else {
        let reply_key = CtKey {
            saddr: backend.address,
            daddr: t.saddr,
            sport: backend.port,
            dport: t.sport,
            proto: t.proto,
            _pad: [0; 3],
        };
        CONNTRACK.insert(reply_key, reply_value, 0)?;
    }
    CONNTRACK.insert(t, forward, 0)?;
    rewrite(ctx, flow, Side::Destination, backend.address, backend.port)?;
    Ok(TC_ACT_OK)
}

/// Counts a packet to the frontend `rev_nat_id` on this CPU. Its first packet creates the
/// entry; when another CPU creates it first, this packet is added to that one.
#[inline(always)]
fn count(rev_nat_id: u32, bytes: u32) {
    let add = || match SERVICE_COUNTERS.get_ptr_mut(rev_nat_id) {
        Some(counters) => {
            // SAFETY: the pointer is this CPU's value of a live entry; no other CPU writes it.
            unsafe {
                (*counters).packets += 1;
                (*counters).bytes += u64::from(bytes);
            }
            true
        }
        None => false,
    };
    if add() {
        return;
    }
    let first = ServiceCounters {
        packets: 1,
        bytes: u64::from(bytes),
    };
    if SERVICE_COUNTERS
        .insert(rev_nat_id, first, u64::from(BPF_NOEXIST))
        .is_err()
    {
        add();
    }
}

/// kube-proxy's masquerade rules: traffic to NodePort/LoadBalancer/ExternalIP frontends is
/// masqueraded unless externalTrafficPolicy is Local (then only the node's own traffic, which
/// may be sent to a remote backend); ClusterIP traffic from outside the pod range is
/// masqueraded when the pod range is known. Hairpin traffic is handled by the caller.
#[inline(always)]
fn masquerades(cfg: &Config, flags: u16, source: u32, from_node: bool) -> bool {
    if flags & SVC_EXTERNAL != 0 {
        flags & SVC_ETP_LOCAL == 0 || from_node
    } else {
        cfg.cluster_cidr.mask != 0 && !cfg.cluster_cidr.contains(source)
    }
}

/// Claims a node port for a masqueraded flow by inserting its reply entry, which must not
/// exist yet: (backend, node address, backend port, node port) identifies the flow's replies.
#[inline(always)]
fn claim_snat_port(
    cfg: &Config,
    t: &CtKey,
    backend: &node_common::Backend,
    reply: CtValue,
) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let value = CtValue {
        flags: CT_REPLY | CT_SNAT,
        nat_addr: t.saddr,
        nat_port: t.sport,
        ..reply
    };
    for _ in 0..SNAT_PORT_TRIES {
        let port = (SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % span) as u16).to_be();
        let key = CtKey {
            saddr: backend.address,
            daddr: cfg.snat_address,
            sport: backend.port,
            dport: port,
            proto: t.proto,
            _pad: [0; 3],
        };
        if CONNTRACK.insert(key, value, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
    }
    None
}

#[inline(always)]
fn source_allowed(rev_nat_id: u32, source: u32) -> bool {
    let key = Key::new(
        SOURCE_RANGE_FRONTEND_BITS + 32,
        SourceRange {
            rev_nat_id,
            address: source,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// A reply from a backend: for a masqueraded flow its destination becomes the client again now;
/// its source becomes the frontend again at egress, after routing.
fn reply(ctx: &TcContext, flow: &Flow, ct: &CtValue) -> Result<i32, c_long> {
    if ct.flags & CT_SNAT != 0 {
        rewrite(ctx, flow, Side::Destination, ct.nat_addr, ct.nat_port)?;
    }
    ctx.set_mark(MARK_REV_NAT | ct.rev_nat_id);
    Ok(TC_ACT_OK)
}
