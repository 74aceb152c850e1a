//! Backend selection: session affinity, else a random slot of the frontend's scope.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use node_common::{AffinityKey, AffinityValue, Backend, SVC_AFFINITY, ServiceKey, ServiceValue};

use crate::maps::{AFFINITY, BACKENDS, SERVICES};

/// Picks a backend for a new flow from `client` to the frontend whose scope master is
/// `master` (at `key`): with session affinity, the client's backend while it is fresh and still
/// exists (remembered afresh either way); otherwise a random slot.
#[inline(always)]
pub fn select(key: ServiceKey, master: &ServiceValue, client: u32) -> Option<(u32, Backend)> {
    if master.flags & SVC_AFFINITY == 0 {
        return random(key, master);
    }
    let now = (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32;
    let akey = AffinityKey {
        client,
        rev_nat_id: master.rev_nat_id,
    };
    let sticky = unsafe { AFFINITY.get(akey) }
        .filter(|a| now.wrapping_sub(a.last_used) <= master.affinity_timeout)
        .and_then(|a| Some((a.backend_id, *unsafe { BACKENDS.get(a.backend_id) }?)));
    let (id, backend) = match sticky {
        Some(chosen) => chosen,
        None => random(key, master)?,
    };
    let _ = AFFINITY.insert(
        akey,
        AffinityValue {
            backend_id: id,
            last_used: now,
        },
        0,
    );
    Some((id, backend))
}

#[inline(always)]
fn random(key: ServiceKey, master: &ServiceValue) -> Option<(u32, Backend)> {
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(master.count)) as u16 + 1;
    // A slot may vanish between reading the count and reading the slot while the agent shrinks
    // the Service; the client retransmits.
    let id = unsafe { SERVICES.get(key.with_slot(slot)) }?.backend_id;
    Some((id, *unsafe { BACKENDS.get(id) }?))
}
