//! kube-proxy's rulesets for the benchmark's baselines, laid out as kube-proxy writes them:
//! iptables mode (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*, `statistic --mode random`,
//! KUBE-MARK-MASQ / KUBE-POSTROUTING) and nftables mode (the `service-ips` verdict map).
//! Pure text generators, so their layout is table-tested.
use std::{fmt::Write as _, net::Ipv4Addr};

/// One ClusterIP Service port with its endpoints.
#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp", as iptables and nft spell it.
    pub proto: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// kube-proxy's chain-name hash: a stable 16-character suffix per service port or endpoint.
fn chain_suffix(text: &str) -> String {
    // FNV-1a, then base32 — kube-proxy uses SHA-256 + base32; only stability and length matter.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| {
            let bits = hash.rotate_left(i * 4);
            ALPHABET[(bits & 31) as usize] as char
        })
        .collect()
}

/// The nat table as `iptables-restore` input: kube-proxy's full sync. Services are written in
/// order, so the last one sits at the end of KUBE-SERVICES (the worst case for a linear walk).
pub fn iptables_restore(services: &[BenchService], cluster_cidr: &str) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::new();
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for svc in services {
        let (vip, port, name, proto) = (svc.cluster_ip, svc.port, &svc.name, svc.proto);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name}:p{port} cluster IP\" -m {proto} -p {proto} -d {vip} --dport {port} -j {}",
            svc_chain(svc)
        );
        service_chains(svc, cluster_cidr, &mut chains, &mut rules);
    }
    chains + &rules + "COMMIT\n"
}

/// kube-proxy's partial sync: only the chains of `changed` Services, for
/// `iptables-restore --noflush` (declaring a chain flushes just that chain).
pub fn iptables_restore_partial(changed: &[BenchService], cluster_cidr: &str) -> String {
    let (mut chains, mut rules) = (String::from("*nat\n"), String::new());
    for svc in changed {
        service_chains(svc, cluster_cidr, &mut chains, &mut rules);
    }
    chains + &rules + "COMMIT\n"
}

fn svc_chain(svc: &BenchService) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_suffix(&format!("{}:p{}/{}", svc.name, svc.port, svc.proto))
    )
}

/// A Service's KUBE-SVC chain (masquerade mark for off-cluster sources, endpoints picked with
/// `statistic`) and its KUBE-SEP chains.
fn service_chains(svc: &BenchService, cluster_cidr: &str, chains: &mut String, rules: &mut String) {
    let (vip, port, name, proto) = (svc.cluster_ip, svc.port, &svc.name, svc.proto);
    let svc_chain = svc_chain(svc);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc_chain} -m comment --comment \"{name}:p{port} cluster IP\" -m {proto} -p {proto} -d {vip} --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
    );
    let n = svc.endpoints.len();
    for (i, (ip, ep_port)) in svc.endpoints.iter().enumerate() {
        let sep_chain = format!(
            "KUBE-SEP-{}",
            chain_suffix(&format!("{name}:p{port}/{proto}:{ip}:{ep_port}"))
        );
        let _ = writeln!(chains, ":{sep_chain} - [0:0]");
        // kube-proxy: each endpoint but the last takes 1/(remaining) of what reaches it.
        let jump = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {:.10} ",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name}:p{port} -> {ip}:{ep_port}\" {jump}-j {sep_chain}"
        );
        let _ = writeln!(
            rules,
            "-A {sep_chain} -m comment --comment \"{name}:p{port}\" -s {ip} -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            rules,
            "-A {sep_chain} -m comment --comment \"{name}:p{port}\" -m {proto} -p {proto} -j DNAT --to-destination {ip}:{ep_port}"
        );
    }
}

/// The `ip kube-proxy` table as `nft -f` input: kube-proxy's full sync.
pub fn nft_ruleset(services: &[BenchService], cluster_cidr: &str) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    out.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
    out.push_str("  chain mark-for-masquerade { mark set mark or 0x4000; }\n");
    out.push_str(
        "  chain masquerading {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    out.push_str("    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    out.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }\n");
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    let mut elements = Vec::new();
    for svc in services {
        let chains = NftChains::of(svc);
        for ((ip, ep_port), ep_chain) in svc.endpoints.iter().zip(&chains.endpoints) {
            let _ = writeln!(
                out,
                "  chain {ep_chain} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto {} dnat to {ip}:{ep_port}\n  }}",
                svc.proto
            );
        }
        let _ = writeln!(
            out,
            "  chain {} {{\n{}  }}",
            chains.service,
            chains
                .service_rules(svc, cluster_cidr)
                .replace("RULE ", "    ")
        );
        elements.push(format!(
            "{} . {} . {} : goto {}",
            svc.cluster_ip, svc.proto, svc.port, chains.service
        ));
    }
    out.push_str("}\n");
    if !elements.is_empty() {
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} }}",
            elements.join(", ")
        );
    }
    out
}

/// kube-proxy's partial sync for `changed` Services: their chains are added (if new), flushed
/// and written again.
pub fn nft_update(changed: &[BenchService], cluster_cidr: &str) -> String {
    let mut out = String::new();
    for svc in changed {
        let chains = NftChains::of(svc);
        for ((ip, ep_port), ep_chain) in svc.endpoints.iter().zip(&chains.endpoints) {
            let add = format!("add rule ip kube-proxy {ep_chain}");
            let _ = writeln!(
                out,
                "add chain ip kube-proxy {ep_chain}\nflush chain ip kube-proxy {ep_chain}"
            );
            let _ = writeln!(
                out,
                "{add} ip saddr {ip} jump mark-for-masquerade\n{add} meta l4proto {} dnat to {ip}:{ep_port}",
                svc.proto
            );
        }
        let _ = writeln!(out, "flush chain ip kube-proxy {}", chains.service);
        let prefix = format!("add rule ip kube-proxy {} ", chains.service);
        out.push_str(
            &chains
                .service_rules(svc, cluster_cidr)
                .replace("RULE ", &prefix),
        );
    }
    out
}

/// The nftables chain names of one Service port.
struct NftChains {
    service: String,
    endpoints: Vec<String>,
}

impl NftChains {
    fn of(svc: &BenchService) -> Self {
        let (port, name, proto) = (svc.port, &svc.name, svc.proto);
        let hash = |text: String| chain_suffix(&text)[..8].to_owned();
        Self {
            service: format!(
                "service-{}-{name}/{proto}/p{port}",
                hash(format!("{name}:p{port}/{proto}"))
            ),
            endpoints: svc
                .endpoints
                .iter()
                .map(|(ip, ep_port)| {
                    format!(
                        "endpoint-{}-{name}/{proto}/p{port}__{ip}/{ep_port}",
                        hash(format!("{name}/{proto}:{ip}:{ep_port}"))
                    )
                })
                .collect(),
        }
    }

    /// The service chain's rules, one per line, each starting with "RULE ".
    fn service_rules(&self, svc: &BenchService, cluster_cidr: &str) -> String {
        let vmap: Vec<String> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        format!(
            "RULE ip daddr {} ip saddr != {cluster_cidr} jump mark-for-masquerade\nRULE numgen random mod {} vmap {{ {} }}\n",
            svc.cluster_ip,
            vmap.len(),
            vmap.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> BenchService {
        BenchService {
            name: "default/web".into(),
            cluster_ip: Ipv4Addr::new(198, 19, 0, 10),
            port: 80,
            proto: "tcp",
            endpoints: vec![
                (Ipv4Addr::new(198, 18, 11, 2), 8080),
                (Ipv4Addr::new(198, 18, 12, 2), 8080),
            ],
        }
    }

    #[test]
    fn iptables_layout_is_kube_proxys() {
        let rules = iptables_restore(&[web()], "198.18.8.0/21");
        let lines: Vec<&str> = rules.lines().collect();
        let svc_chain = lines.iter().find(|l| l.starts_with(":KUBE-SVC-")).unwrap()[1..]
            .split(' ')
            .next()
            .unwrap();
        // KUBE-SERVICES matches the ClusterIP and jumps to the service chain.
        assert!(lines.contains(&format!("-A KUBE-SERVICES -m comment --comment \"default/web:p80 cluster IP\" -m tcp -p tcp -d 198.19.0.10 --dport 80 -j {svc_chain}").as_str()));
        // Off-cluster sources are marked for masquerade; endpoints are picked by statistic.
        let svc_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {svc_chain} ")))
            .collect();
        assert_eq!(svc_rules.len(), 3, "{svc_rules:?}");
        assert!(svc_rules[0].ends_with("! -s 198.18.8.0/21 -j KUBE-MARK-MASQ"));
        assert!(
            svc_rules[1]
                .contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(
            !svc_rules[2].contains("statistic"),
            "the last endpoint takes what is left"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("-j DNAT --to-destination 198.18.1"))
                .count(),
            2
        );
        assert_eq!(lines.last(), Some(&"COMMIT"));
        // Every chain used is declared.
        for jump in lines
            .iter()
            .filter_map(|l| l.split(" -j ").nth(1))
            .filter(|t| t.starts_with("KUBE-"))
        {
            assert!(
                lines.contains(&format!(":{jump} - [0:0]").as_str()),
                "{jump} undeclared"
            );
        }
    }

    #[test]
    fn probabilities_split_evenly() {
        let mut svc = web();
        svc.endpoints = (1..=4)
            .map(|i| (Ipv4Addr::new(198, 18, 20, i), 8080))
            .collect();
        let rules = iptables_restore(&[svc], "198.18.8.0/21");
        let probabilities: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|p| &p[..12])
            .collect();
        assert_eq!(
            probabilities,
            ["0.2500000000", "0.3333333333", "0.5000000000"]
        );
    }

    #[test]
    fn nftables_layout_is_kube_proxys() {
        let rules = nft_ruleset(&[web()], "198.18.8.0/21");
        assert!(
            rules.contains(
                "chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }"
            )
        );
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp dnat to 198.18.11.2:8080"));
        assert!(rules.contains(
            "add element ip kube-proxy service-ips { 198.19.0.10 . tcp . 80 : goto service-"
        ));
    }
}
