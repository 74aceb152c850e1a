//! The datapath's maps and configuration. Names and layouts are the ABI in node-common; the
//! agent writes SERVICES, BACKENDS, REV_NAT and SOURCE_RANGES, the datapath alone writes
//! CONNTRACK and AFFINITY, and adds to SERVICE_COUNTERS, which the agent reads and deletes from. All maps are pinned by name under the agent's bpffs directory.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
};
use node_common::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, Backend,
    CLUSTER_IPS_MAX_ENTRIES, CONNTRACK_MAX_ENTRIES, Cidr, Config, CtKey, CtValue, MAP_NO_PREALLOC,
    REV_NAT_MAX_ENTRIES, RevNat, SERVICE_COUNTERS_MAX_ENTRIES, SERVICES_MAX_ENTRIES,
    SOURCE_RANGES_MAX_ENTRIES, ServiceCounters, ServiceKey, ServiceValue, SourceRange,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAX_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(REV_NAT_MAX_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

/// Every allocated ClusterIP (network order → 1): traffic to one on a port no Service serves
/// is rejected, traffic to any other address of the service range dropped.
#[map]
pub static CLUSTER_IPS: HashMap<u32, u8> =
    HashMap::pinned(CLUSTER_IPS_MAX_ENTRIES, MAP_NO_PREALLOC);

/// Packets and bytes per frontend (reverse-NAT id), per CPU: adding needs no atomics.
#[map]
pub static SERVICE_COUNTERS: PerCpuHashMap<u32, ServiceCounters> =
    PerCpuHashMap::pinned(SERVICE_COUNTERS_MAX_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8> = LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);

/// Set by the agent when it loads the object (read-only data).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    snat_address: 0,
    cluster_cidr: Cidr {
        address: 0,
        mask: 0,
    },
    service_cidr: Cidr {
        address: 0,
        mask: 0,
    },
};

#[inline(always)]
pub fn config() -> Config {
    // A volatile read: the compiler must not fold the zeros above into the code.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}
