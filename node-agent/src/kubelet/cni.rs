//! The CNI network configuration for the node's pod range: the bridge plugin on `na0` with
//! host-local IPAM on the pod CIDR (Debian's containernetworking-plugins), which the runtime
//! uses for every pod sandbox.
use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::model::Ipv4Cidr;

/// The bridge the pods' host-side interfaces are enslaved to.
pub const BRIDGE: &str = "na0";
const NETWORK: &str = "node-agent";
const FILE_NAME: &str = "10-node-agent.conflist";

/// The network configuration list for pods in `pod_cidr`, host-local keeping its leases in
/// `ipam_dir`.
pub fn conflist(pod_cidr: Ipv4Cidr, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            // The datapath decides what is masqueraded.
            "ipMasq": false,
            // A pod reaching itself through a Service: the packet goes back out the port it
            // came in by.
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": pod_cidr.to_string(),
                    "gateway": gateway(pod_cidr).to_string(),
                }]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            },
        }],
    })
}

/// The pods' gateway, the bridge's address: the first address of the range.
pub fn gateway(pod_cidr: Ipv4Cidr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(pod_cidr.network()).wrapping_add(1))
}

/// Writes the configuration into `conf_dir` (made if missing) as `10-node-agent.conflist`,
/// atomically and only when its content changes, so the runtime never reads half a file nor
/// sees a change that is none. Returns the file's path.
pub fn write(conf_dir: &Path, pod_cidr: Ipv4Cidr, ipam_dir: &Path) -> anyhow::Result<PathBuf> {
    check(pod_cidr).map_err(|reason| anyhow::anyhow!("pod CIDR {pod_cidr}: {reason}"))?;
    let path = conf_dir.join(FILE_NAME);
    let mut content = serde_json::to_vec_pretty(&conflist(pod_cidr, ipam_dir))?;
    content.push(b'\n');
    if fs::read(&path).is_ok_and(|old| old == content) {
        return Ok(path);
    }
    fs::create_dir_all(conf_dir).with_context(|| {
        format!(
            "creating CNI configuration directory {}",
            conf_dir.display()
        )
    })?;
    // Not a configuration name (.conf, .conflist, .json) while it is being written.
    let temp = conf_dir.join(format!(".{FILE_NAME}.tmp"));
    let written = fs::File::create(&temp).and_then(|mut file| {
        file.write_all(&content)?;
        file.sync_all()
    });
    written
        .and_then(|()| fs::rename(&temp, &path))
        .with_context(|| format!("writing {}", path.display()))
        .inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
    Ok(path)
}

/// Why `pod_cidr` cannot be a pod range, if it cannot.
fn check(pod_cidr: Ipv4Cidr) -> Result<(), String> {
    // Network, gateway, one pod, broadcast.
    if pod_cidr.prefix > 30 {
        return Err(format!(
            "too small for pods: /{} leaves no address for a pod (at most /30)",
            pod_cidr.prefix
        ));
    }
    let network = pod_cidr.network();
    if network != pod_cidr.address {
        return Err(format!(
            "not a network address (the network is {network}/{})",
            pod_cidr.prefix
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_and_check_table() {
        let cases = [
            ("10.88.0.0/24", "10.88.0.1", Ok(())),
            ("10.244.0.0/16", "10.244.0.1", Ok(())),
            ("10.88.0.4/30", "10.88.0.5", Ok(())),
            (
                "10.88.0.0/31",
                "10.88.0.1",
                Err("too small for pods: /31 leaves no address for a pod (at most /30)"),
            ),
            (
                "10.88.0.7/32",
                "10.88.0.8",
                Err("too small for pods: /32 leaves no address for a pod (at most /30)"),
            ),
            (
                "10.88.0.1/24",
                "10.88.0.1",
                Err("not a network address (the network is 10.88.0.0/24)"),
            ),
            (
                "10.88.1.0/16",
                "10.88.0.1",
                Err("not a network address (the network is 10.88.0.0/16)"),
            ),
        ];
        for (range, want_gateway, want) in cases {
            let range = cidr(range);
            assert_eq!(gateway(range).to_string(), want_gateway, "{range}");
            assert_eq!(check(range), want.map_err(str::to_owned), "{range}");
        }
    }

    #[test]
    fn the_conflist_is_a_hairpin_bridge_with_host_local_ipam() {
        let got = conflist(cidr("10.88.0.0/24"), Path::new("/var/lib/node-agent/ipam"));
        assert_eq!(
            got,
            json!({
                "cniVersion": "0.4.0",
                "name": "node-agent",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "na0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.88.0.0/24", "gateway": "10.88.0.1"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": "/var/lib/node-agent/ipam",
                    },
                }],
            })
        );
    }

    #[test]
    fn written_atomically_and_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let ipam = dir.path().join("ipam");
        let path = write(&conf_dir, cidr("10.88.0.0/24"), &ipam).unwrap();
        assert_eq!(path, conf_dir.join("10-node-agent.conflist"));
        let read = || serde_json::from_slice::<Value>(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(read(), conflist(cidr("10.88.0.0/24"), &ipam));
        let inode = fs::metadata(&path).unwrap().ino();

        // Unchanged: the file is left as it is.
        write(&conf_dir, cidr("10.88.0.0/24"), &ipam).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);

        // Changed: replaced by a rename, nothing else left in the directory.
        write(&conf_dir, cidr("10.89.0.0/24"), &ipam).unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(read(), conflist(cidr("10.89.0.0/24"), &ipam));
        let files: Vec<_> = fs::read_dir(&conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["10-node-agent.conflist"]);

        // Refused: named with the reason, the file untouched.
        let error = write(&conf_dir, cidr("10.90.0.1/24"), &ipam).unwrap_err();
        assert_eq!(
            error.to_string(),
            "pod CIDR 10.90.0.1/24: not a network address (the network is 10.90.0.0/24)"
        );
        assert_eq!(read(), conflist(cidr("10.89.0.0/24"), &ipam));
    }
}
