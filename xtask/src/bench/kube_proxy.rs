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

/// kube-proxy's nftables table.
const NFT_TABLE: &str = "ip kube-proxy";

/// kube-proxy's full sync as the one `nft -f` transaction it sends (knftables writes one command a
/// line): the table, chains and map are added if missing and flushed, never deleted, then
/// written whole. Each service chain's `numgen ... vmap { ... }` is an anonymous map: the
/// kernel names each new one by walking every set of the table, so a cold start grows
/// super-linearly with Services (kubernetes/kubernetes#139513), as kube-proxy's own does.
pub fn nft_ruleset(services: &[BenchService], cluster_cidr: &str) -> String {
    let t = NFT_TABLE;
    let mut out = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    for (chain, hook) in [
        (
            "nat-prerouting",
            "type nat hook prerouting priority dstnat ;",
        ),
        // nft 1.0 names dstnat only for prerouting: -100 is its value.
        ("nat-output", "type nat hook output priority -100 ;"),
        (
            "nat-postrouting",
            "type nat hook postrouting priority srcnat ;",
        ),
    ] {
        let _ = writeln!(
            out,
            "add chain {t} {chain} {{ {hook} }}\nflush chain {t} {chain}"
        );
    }
    for (chain, from) in [
        ("services", "nat-output"),
        ("services", "nat-prerouting"),
        ("masquerading", "nat-postrouting"),
    ] {
        let _ = writeln!(
            out,
            "add chain {t} {chain}\nflush chain {t} {chain}\nadd rule {t} {from} jump {chain}"
        );
    }
    let _ = writeln!(
        out,
        "add chain {t} mark-for-masquerade\nflush chain {t} mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or 0x4000"
    );
    for rule in [
        "mark and 0x4000 == 0 return",
        "mark set mark xor 0x4000",
        "masquerade fully-random",
    ] {
        let _ = writeln!(out, "add rule {t} masquerading {rule}");
    }
    let _ = writeln!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(out, "flush map {t} service-ips");
    for svc in services {
        let chains = NftChains::of(svc);
        chains.write(svc, cluster_cidr, &mut out);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . {} . {} : goto {} }}",
            svc.cluster_ip, svc.proto, svc.port, chains.service
        );
    }
    out
}

/// kube-proxy's partial sync for `changed` Services: their chains are added (if new), flushed
/// and written again.
pub fn nft_update(changed: &[BenchService], cluster_cidr: &str) -> String {
    let mut out = String::new();
    for svc in changed {
        NftChains::of(svc).write(svc, cluster_cidr, &mut out);
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

    /// The Service's endpoint chains and service chain, each added, flushed and filled (an
    /// off-cluster source is marked for masquerade; an endpoint is picked at random).
    fn write(&self, svc: &BenchService, cluster_cidr: &str, out: &mut String) {
        let t = NFT_TABLE;
        let proto = svc.proto;
        for ((ip, ep_port), chain) in svc.endpoints.iter().zip(&self.endpoints) {
            let _ = writeln!(out, "add chain {t} {chain}\nflush chain {t} {chain}");
            let _ = writeln!(
                out,
                "add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                out,
                "add rule {t} {chain} meta l4proto {proto} dnat to {ip}:{ep_port}"
            );
        }
        let chain = &self.service;
        let _ = writeln!(out, "add chain {t} {chain}\nflush chain {t} {chain}");
        let _ = writeln!(
            out,
            "add rule {t} {chain} ip daddr {} {proto} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            svc.cluster_ip, svc.port
        );
        let vmap: Vec<String> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        let _ = writeln!(
            out,
            "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(" , ")
        );
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
        let lines: Vec<&str> = rules.lines().collect();
        // Added and flushed, never deleted: what kube-proxy sends on every full sync.
        assert!(lines[0].starts_with("add table ip kube-proxy"));
        assert!(!rules.contains("delete "));
        for want in [
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "flush map ip kube-proxy service-ips",
            "add rule ip kube-proxy nat-prerouting jump services",
        ] {
            assert!(lines.contains(&want), "{want}");
        }
        let element = lines.iter().find(|l| l.starts_with("add element")).unwrap();
        assert!(element.starts_with(
            "add element ip kube-proxy service-ips { 198.19.0.10 . tcp . 80 : goto service-"
        ));
        // Every chain a rule or element names is added and flushed before it is filled.
        for (i, line) in lines.iter().enumerate() {
            for chain in line
                .split_whitespace()
                .filter(|w| w.starts_with("service-") || w.starts_with("endpoint-"))
            {
                if chain == "service-ips" {
                    continue;
                }
                let added = lines
                    .iter()
                    .position(|l| *l == format!("add chain ip kube-proxy {chain}"));
                let flushed = lines
                    .iter()
                    .position(|l| *l == format!("flush chain ip kube-proxy {chain}"));
                assert!(
                    added.is_some() && added < flushed,
                    "{chain} not added then flushed"
                );
                if line.starts_with(&format!("add rule ip kube-proxy {chain} ")) {
                    assert!(flushed < Some(i), "{chain} filled before its flush");
                }
            }
        }
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp dnat to 198.18.11.2:8080"));
        assert!(rules.contains(
            "ip daddr 198.19.0.10 tcp dport 80 ip saddr != 198.18.8.0/21 jump mark-for-masquerade"
        ));
    }

    #[test]
    fn nftables_partial_sync_rewrites_only_the_service_chains() {
        let rules = nft_update(&[web()], "198.18.8.0/21");
        assert!(!rules.contains("service-ips"), "the map is left alone");
        assert_eq!(
            rules
                .lines()
                .filter(|l| l.starts_with("flush chain"))
                .count(),
            3
        );
        let full = nft_ruleset(&[web()], "198.18.8.0/21");
        assert!(full.contains(&rules), "the same chains as a full sync");
    }
}
