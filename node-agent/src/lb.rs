//! `node-agent lb list`: what the Service maps hold, one frontend (and scope) per line with
//! its backends in slot order and its flags.
use node_common::{
    SCOPE_INTERNAL, SVC_AFFINITY, SVC_DROP_WHEN_EMPTY, SVC_ETP_LOCAL, SVC_EXTERNAL,
    SVC_SOURCE_RANGES,
};

use crate::proxy::{Frontend, MapState, proto_name};

pub fn format_list(state: &MapState) -> String {
    let mut out = String::from("SERVICE ADDRESS                      BACKENDS\n");
    for row in rows(state) {
        out.push_str(&row);
        out.push('\n');
    }
    out
}

/// One line per master entry.
pub fn rows(state: &MapState) -> Vec<String> {
    let mut masters: Vec<_> = state.services.iter().filter(|(k, _)| k.slot == 0).collect();
    masters.sort_by_key(|(k, _)| (Frontend::of(k), k.scope));
    let mut rows = Vec::new();
    for (key, master) in masters {
        let backends: Vec<String> = (1..=master.count)
            .map(|slot| {
                let backend = state
                    .services
                    .get(&key.with_slot(slot))
                    .and_then(|s| state.backends.get(&s.backend_id));
                match backend {
                    Some(b) => format!("{}:{}/{}", b.ip(), b.host_port(), proto_name(b.proto)),
                    None => format!("(slot {slot} missing)"),
                }
            })
            .collect();
        let backends = match (backends.is_empty(), master.flags & SVC_DROP_WHEN_EMPTY != 0) {
            (false, _) => backends.join(" "),
            (true, true) => "(none: drop)".to_owned(),
            (true, false) => "(none: reject)".to_owned(),
        };
        let mut flags = Vec::new();
        let f = master.flags;
        if f & SVC_EXTERNAL != 0 {
            flags.push("external".to_owned());
        }
        if f & SVC_ETP_LOCAL != 0 {
            flags.push("eTP=Local".to_owned());
        }
        if f & SVC_AFFINITY != 0 {
            flags.push(format!("affinity={}s", master.affinity_timeout));
        }
        if f & SVC_SOURCE_RANGES != 0 {
            let ranges: Vec<String> = state
                .source_ranges
                .iter()
                .filter(|(id, _)| *id == master.rev_nat_id)
                .map(|(_, c)| c.to_string())
                .collect();
            flags.push(format!("sources={}", ranges.join(",")));
        }
        let scope = if key.scope == SCOPE_INTERNAL {
            " (internal)"
        } else {
            ""
        };
        let frontend = format!("{}{scope}", Frontend::of(key));
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", flags.join(" "))
        };
        rows.push(format!("{frontend:<36} {backends}{flags}"));
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use node_common::{Backend, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, ServiceValue};

    use super::*;

    #[test]
    fn lists_each_frontend_with_its_backends_in_slot_order() {
        let web = Frontend {
            ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: PROTO_TCP,
        };
        let dns = Frontend {
            ip: Ipv4Addr::new(10, 96, 0, 53),
            port: 53,
            proto: PROTO_UDP,
        };
        let slot = |id| ServiceValue {
            backend_id: id,
            rev_nat_id: 1,
            ..Default::default()
        };
        let mut state = MapState::default();
        state.services.insert(
            web.key(SCOPE_EXTERNAL, 0),
            ServiceValue {
                count: 2,
                rev_nat_id: 1,
                ..Default::default()
            },
        );
        state.services.insert(web.key(SCOPE_EXTERNAL, 1), slot(7));
        state.services.insert(web.key(SCOPE_EXTERNAL, 2), slot(3));
        state.services.insert(
            web.key(SCOPE_INTERNAL, 0),
            ServiceValue {
                rev_nat_id: 1,
                flags: SVC_DROP_WHEN_EMPTY,
                ..Default::default()
            },
        );
        state.services.insert(
            dns.key(SCOPE_EXTERNAL, 0),
            ServiceValue {
                rev_nat_id: 2,
                ..Default::default()
            },
        );
        state
            .backends
            .insert(7, Backend::new(Ipv4Addr::new(10, 0, 0, 7), 8080, PROTO_TCP));
        state
            .backends
            .insert(3, Backend::new(Ipv4Addr::new(10, 0, 0, 3), 8080, PROTO_TCP));
        assert_eq!(
            format_list(&state),
            "SERVICE ADDRESS                      BACKENDS\n\
             10.96.0.10:80/TCP                    10.0.0.7:8080/TCP 10.0.0.3:8080/TCP\n\
             10.96.0.10:80/TCP (internal)         (none: drop)\n\
             10.96.0.53:53/UDP                    (none: reject)\n"
        );
    }
}
