//! The datapath's maps. Names and layouts are the ABI in node-common; the agent writes
//! SERVICES, BACKENDS and REV_NAT, the datapath alone writes CONNTRACK. All are pinned by name
//! under the agent's bpffs directory.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use node_common::{
    BACKENDS_MAX_ENTRIES, Backend, CONNTRACK_MAX_ENTRIES, CtKey, CtValue, REV_NAT_MAX_ENTRIES,
    RevNat, SERVICES_MAX_ENTRIES, ServiceKey, ServiceValue,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAX_ENTRIES, 0);

#[map]
pub static REV_NAT: HashMap<u16, RevNat> = HashMap::pinned(REV_NAT_MAX_ENTRIES, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);
