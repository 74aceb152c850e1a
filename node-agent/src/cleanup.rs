//! `node-agent cleanup-kube-proxy`: removes what kube-proxy left on a node it no longer runs on,
//! as `kube-proxy --cleanup` does — its iptables chains (legacy and nft backends, IPv4 and
//! IPv6) with the jumps to them, and its nftables tables. Running it again finds nothing to do.
use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use tracing::{debug, info};

/// kube-proxy's fixed chains, in the tables it creates them in (kubelet's KUBE-FIREWALL,
/// KUBE-MARK-DROP and KUBE-KUBELET-CANARY stay).
const CHAINS: &[(&str, &[&str])] = &[
    (
        "nat",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "filter",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

/// kube-proxy's per-Service and per-endpoint chains (any table).
const CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
];

/// The iptables backends, each as its save and restore commands.
const BACKENDS: &[(&str, &str)] = &[
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// kube-proxy's nftables-mode tables.
const NFT_TABLES: &[&str] = &["ip kube-proxy", "ip6 kube-proxy"];

/// Cleans every backend, all of them tried even when one fails.
pub fn kube_proxy() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (save, restore) in BACKENDS {
        if let Err(e) = clean_iptables(save, restore) {
            failed.push(format!("{e:#}"));
        }
    }
    if let Err(e) = clean_nft() {
        failed.push(format!("{e:#}"));
    }
    if !failed.is_empty() {
        bail!("cleaning up kube-proxy's rules: {}", failed.join("; "));
    }
    Ok(())
}

fn clean_iptables(save: &str, restore: &str) -> anyhow::Result<()> {
    let Some(rules) = output(save, &[])? else {
        debug!("{save} is not installed");
        return Ok(());
    };
    let Some(script) = restore_script(&rules) else {
        debug!("{save}: no kube-proxy chains");
        return Ok(());
    };
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .with_context(|| format!("writing to {restore}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // Its message names the line of the script that failed.
        bail!(
            "{restore} --noflush failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    info!("{restore}: removed kube-proxy's chains");
    Ok(())
}

fn clean_nft() -> anyhow::Result<()> {
    let Some(tables) = output("nft", &["list", "tables"])? else {
        debug!("nft is not installed");
        return Ok(());
    };
    for table in nft_tables(&tables) {
        let mut args = vec!["delete", "table"];
        args.extend(table.split(' '));
        output("nft", &args)?;
        info!("nft: deleted table {table}");
    }
    Ok(())
}

/// `program args`' stdout; None when the program is not installed.
fn output(program: &str, args: &[&str]) -> anyhow::Result<Option<String>> {
    let out = match Command::new(program).args(args).output() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("running {program}"))?,
    };
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
        || CHAINS
            .iter()
            .any(|(t, chains)| *t == table && chains.contains(&chain))
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from the
/// `iptables-save` output `rules`: per table, the jumps to them from other chains are deleted,
/// then they are flushed (declared again) and deleted. None when there are none.
pub fn restore_script(rules: &str) -> Option<String> {
    let mut script = String::new();
    let mut table = "";
    let (mut flush, mut unhook, mut delete) = (String::new(), String::new(), String::new());
    for line in rules.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name;
        } else if let Some(chain) = line.strip_prefix(':') {
            let chain = chain.split(' ').next().unwrap_or_default();
            if is_kube_proxy_chain(table, chain) {
                flush.push_str(&format!(":{chain} - [0:0]\n"));
                delete.push_str(&format!("-X {chain}\n"));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            if !is_kube_proxy_chain(table, chain)
                && jump_target(rule).is_some_and(|target| is_kube_proxy_chain(table, target))
            {
                unhook.push_str(&format!("-D {rule}\n"));
            }
        } else if line == "COMMIT" {
            if !flush.is_empty() || !unhook.is_empty() {
                script.push_str(&format!("*{table}\n{unhook}{flush}{delete}COMMIT\n"));
            }
            (flush, unhook, delete) = Default::default();
        }
    }
    (!script.is_empty()).then_some(script)
}

/// The chain a rule jumps or goes to (`-j X` / `-g X`), if it is its last target.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split(' ').rev();
    let target = words.next()?;
    matches!(words.next()?, "-j" | "-g").then_some(target)
}

/// kube-proxy's tables among `nft list tables` output.
pub fn nft_tables(list: &str) -> Vec<&'static str> {
    NFT_TABLES
        .iter()
        .copied()
        .filter(|t| list.lines().any(|l| l.trim() == format!("table {t}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-SERVICES
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -s 10.0.0.0/8 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
:USER-CHAIN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j USER-CHAIN
-A USER-CHAIN -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
-A KUBE-SEP-DEF -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:6443
COMMIT
"#;

    #[test]
    fn removes_kube_proxy_chains_and_the_jumps_to_them_only() {
        assert_eq!(
            restore_script(SAVED).unwrap(),
            r#"*mangle
:KUBE-PROXY-CANARY - [0:0]
-X KUBE-PROXY-CANARY
COMMIT
*filter
-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-SERVICES
-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-X KUBE-FORWARD
-X KUBE-SERVICES
COMMIT
*nat
-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D USER-CHAIN -j KUBE-MARK-MASQ
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
-X KUBE-MARK-MASQ
-X KUBE-SERVICES
-X KUBE-SVC-ABC
-X KUBE-SEP-DEF
COMMIT
"#
        );
    }

    #[test]
    fn nothing_to_do_without_kube_proxy() {
        for rules in [
            "",
            "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n",
            // A chain kube-proxy only makes in nat, in mangle.
            "*mangle\n:KUBE-MARK-MASQ - [0:0]\nCOMMIT\n",
        ] {
            assert_eq!(restore_script(rules), None, "{rules}");
        }
    }

    #[test]
    fn finds_kube_proxys_nft_tables() {
        let list =
            "table inet filter\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable ip kube-proxy-2\n";
        assert_eq!(nft_tables(list), ["ip kube-proxy", "ip6 kube-proxy"]);
        assert!(nft_tables("table inet kube-proxy\n").is_empty());
    }
}
