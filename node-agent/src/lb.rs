//! `node-agent lb list`: what the Service maps hold, one frontend and its backends per line.
use std::fmt::Write as _;

use crate::proxy::{Frontend, MapState, proto_name};

pub fn format_list(state: &MapState) -> String {
    let mut out = String::from("SERVICE ADDRESS            BACKENDS\n");
    for (key, master) in state.services.iter().filter(|(k, _)| k.slot == 0) {
        let backends: Vec<String> = (1..=master.count)
            .map(|slot| {
                match state
                    .services
                    .get(&key.with_slot(slot))
                    .and_then(|s| state.backends.get(&s.backend_id))
                {
                    Some(b) => format!("{}:{}/{}", b.ip(), b.host_port(), proto_name(b.proto)),
                    None => format!("(slot {slot} missing)"),
                }
            })
            .collect();
        let backends = if backends.is_empty() {
            "(no backends)".to_owned()
        } else {
            backends.join(" ")
        };
        let _ = writeln!(out, "{:<26} {backends}", Frontend::of(key).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use node_common::{Backend, PROTO_TCP, PROTO_UDP, ServiceValue};

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
        let mut state = MapState::default();
        state.services.insert(
            web.key(0),
            ServiceValue {
                backend_id: 0,
                count: 2,
                rev_nat_id: 1,
            },
        );
        state.services.insert(
            web.key(1),
            ServiceValue {
                backend_id: 7,
                count: 0,
                rev_nat_id: 1,
            },
        );
        state.services.insert(
            web.key(2),
            ServiceValue {
                backend_id: 3,
                count: 0,
                rev_nat_id: 1,
            },
        );
        state.services.insert(
            dns.key(0),
            ServiceValue {
                backend_id: 0,
                count: 0,
                rev_nat_id: 2,
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
            "SERVICE ADDRESS            BACKENDS\n\
             10.96.0.10:80/TCP          10.0.0.7:8080/TCP 10.0.0.3:8080/TCP\n\
             10.96.0.53:53/UDP          (no backends)\n"
        );
    }
}
