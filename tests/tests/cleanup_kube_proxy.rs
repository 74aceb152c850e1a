//! `node-agent cleanup-kube-proxy` on a node kube-proxy ran on: in a fresh namespace, a
//! kube-proxy-shaped ruleset (iptables mode on each backend, IPv4 and IPv6, and nftables
//! mode) next to the user's own rules and the kubelet's chains; the real binary removes
//! kube-proxy's chains, the jumps to them and its nft tables, and nothing else, and running it
//! again changes nothing.
use std::process::Command;

use node_agent_tests::{
    agent::{binary, run_to_exit},
    netns::Netns,
};

/// kube-proxy's iptables mode as `iptables-save` shows it (one ClusterIP Service with two
/// endpoints, one NodePort Service with its external chain and a load-balancer firewall), with
/// the user's and the kubelet's rules around it.
const IPV4: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:USER-ALLOW - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -s 10.1.0.0/16 -j USER-ALLOW
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/empty has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A USER-ALLOW -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-EXT-WEB - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-WEB1 - [0:0]
:KUBE-SEP-WEB2 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-FW-WEB - [0:0]
:KUBE-XLB-WEB - [0:0]
:USER-SNAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.1.0.0/16 -j USER-SNAT
-A KUBE-EXT-WEB -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-WEB -j KUBE-SVC-WEB
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-WEB
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-WEB1 -s 10.1.1.2/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-WEB1 -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.1.1.2:8080
-A KUBE-SEP-WEB2 -s 10.1.2.2/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-WEB2 -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.1.2.2:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-WEB ! -s 10.1.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.1.1.2:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-WEB1
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.1.2.2:8080" -j KUBE-SEP-WEB2
-A KUBE-FW-WEB -j KUBE-XLB-WEB
-A USER-SNAT -j MASQUERADE
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
"#;

const IPV6: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEB6 - [0:0]
:KUBE-SEP-WEB6 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -d fd00::1/128 -j ACCEPT
-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB6
-A KUBE-SVC-WEB6 -j KUBE-SEP-WEB6
-A KUBE-SEP-WEB6 -p tcp -m tcp -j DNAT --to-destination [fd00:1::2]:8080
COMMIT
"#;

/// kube-proxy's nftables mode (both families, abridged) and a user's table.
const NFT: &str = r#"
table ip kube-proxy {
  comment "rules for kube-proxy"
  map service-ips {
    type ipv4_addr . inet_proto . inet_service : verdict
  }
  chain service-web {
    ip daddr 10.96.0.10 tcp dport 80 dnat to 10.1.1.2:8080
  }
  chain services {
    ip daddr . meta l4proto . th dport vmap @service-ips
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }
  chain nat-output {
    type nat hook output priority -100; policy accept;
    jump services
  }
}
table ip6 kube-proxy {
  chain services {
  }
  chain nat-output {
    type nat hook output priority -100; policy accept;
    jump services
  }
}
table inet user {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 22 accept
  }
}
"#;

/// The lines the user and the kubelet own: they must all survive the cleanup.
const KEPT: &[&str] = &[
    ":KUBE-FIREWALL - [0:0]",
    ":KUBE-KUBELET-CANARY - [0:0]",
    ":USER-ALLOW - [0:0]",
    ":USER-SNAT - [0:0]",
    "-A INPUT -j KUBE-FIREWALL",
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A FORWARD -s 10.1.0.0/16 -j USER-ALLOW",
    "-A OUTPUT -j KUBE-FIREWALL",
    "-A USER-ALLOW -j ACCEPT",
    "-A POSTROUTING -s 10.1.0.0/16 -j USER-SNAT",
    "-A USER-SNAT -j MASQUERADE",
];

/// `program args` inside `ns`, its stdout; `stdin` written to it.
fn exec(ns: &Netns, program: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rules of one backend (`legacy`, `nft`) in `ns`, both families, without comment lines.
fn saved(ns: &Netns, backend: &str) -> Vec<String> {
    let (v4, v6) = (
        format!("iptables-{backend}-save"),
        format!("ip6tables-{backend}-save"),
    );
    [exec(ns, &v4, &[], ""), exec(ns, &v6, &[], "")]
        .concat()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// kube-proxy's lines among `rules`: any KUBE- chain or jump but the kubelet's.
fn kube_proxy_lines(rules: &[String]) -> Vec<&String> {
    rules
        .iter()
        .filter(|l| {
            l.contains("KUBE-")
                && !l.contains("KUBE-FIREWALL")
                && !l.contains("KUBE-KUBELET-CANARY")
        })
        .collect()
}

fn cleanup(ns: &Netns) {
    let out = run_to_exit(&binary(), ns, &["cleanup-kube-proxy"]).unwrap();
    assert!(
        out.status.success(),
        "cleanup-kube-proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One namespace per iptables backend: the two backends are not meant to share a namespace.
fn cleans_backend(backend: &str, with_nft_tables: bool) {
    let ns = Netns::new("kpclean").unwrap();
    exec(&ns, &format!("iptables-{backend}-restore"), &[], IPV4);
    exec(&ns, &format!("ip6tables-{backend}-restore"), &[], IPV6);
    if with_nft_tables {
        exec(&ns, "nft", &["-f", "-"], NFT);
    }
    let before = saved(&ns, backend);
    assert!(kube_proxy_lines(&before).len() > 40, "{before:#?}");

    cleanup(&ns);
    let after = saved(&ns, backend);
    assert_eq!(kube_proxy_lines(&after), Vec::<&String>::new(), "{backend}");
    for line in KEPT {
        assert!(
            after.iter().any(|l| l == line),
            "{backend}: {line} is gone: {after:#?}"
        );
    }
    // kube-proxy's REJECT for a Service without endpoints went with its chain; the user's
    // rules are all that is left in the built-in chains.
    assert!(!after.iter().any(|l| l.contains("10.96.0.")), "{after:#?}");
    assert!(
        after
            .iter()
            .any(|l| l == "-A OUTPUT -d fd00::1/128 -j ACCEPT"),
        "{after:#?}"
    );
    let tables = exec(&ns, "nft", &["list", "tables"], "");
    assert!(!tables.contains("kube-proxy"), "{tables}");
    if with_nft_tables {
        assert!(tables.contains("table inet user"), "{tables}");
    }

    // Idempotent: nothing left to do, nothing changed.
    cleanup(&ns);
    assert_eq!(saved(&ns, backend), after, "{backend}: a second run");
}

#[test]
fn removes_kube_proxys_iptables_legacy_rules_and_nft_tables() {
    cleans_backend("legacy", true);
}

#[test]
fn removes_kube_proxys_iptables_nft_rules() {
    cleans_backend("nft", false);
}
