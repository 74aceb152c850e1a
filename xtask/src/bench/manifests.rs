//! node-agent's manifest directory for the benchmark's Services.
use node_agent_tests::manifest::yaml;
use serde_json::{Value, json};

use super::kube_proxy::BenchService;

/// Services per filler file: the layout node-agent is tuned for.
const SERVICES_PER_FILE: usize = 1000;

/// The fillers as `kind: List` files of at most SERVICES_PER_FILE Services each: (name, text).
pub fn filler_files(fillers: &[BenchService]) -> Vec<(String, String)> {
    let services: Vec<&[BenchService]> = fillers.chunk_by(|a, b| a.name == b.name).collect();
    services
        .chunks(SERVICES_PER_FILE)
        .enumerate()
        .map(|(i, chunk)| {
            (
                format!("fillers-{i:04}.yaml"),
                manifest_list(&chunk.concat()),
            )
        })
        .collect()
}

/// The Services (Service ports of one name grouped into one Service), each followed by its
/// EndpointSlice, as one `kind: List` manifest.
pub fn manifest_list(services: &[BenchService]) -> String {
    let mut items: Vec<Value> = Vec::new();
    for ports in services.chunk_by(|a, b| a.name == b.name) {
        let (namespace, name) = ports[0].name.split_once('/').expect("namespace/name");
        let protocol = |svc: &BenchService| svc.proto.to_uppercase();
        let service_ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.proto, "port": p.port, "protocol": protocol(p)}))
            .collect();
        let slice_ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": p.proto, "port": p.endpoints[0].1, "protocol": protocol(p)}))
            .collect();
        let endpoints: Vec<Value> = ports[0]
            .endpoints
            .iter()
            .map(|(ip, _)| json!({"addresses": [ip.to_string()]}))
            .collect();
        items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ports[0].cluster_ip.to_string(), "ports": service_ports}}));
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": slice_ports, "endpoints": endpoints}));
    }
    yaml(json!({"apiVersion": "v1", "kind": "List", "items": items}))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr};

    use super::*;

    fn service(name: String, proto: &'static str) -> BenchService {
        BenchService {
            name,
            cluster_ip: Ipv4Addr::new(198, 19, 0, 1),
            port: 80,
            proto,
            endpoints: vec![(Ipv4Addr::new(198, 18, 200, 1), 8080)],
        }
    }

    fn items(text: &str) -> Vec<Value> {
        let list: Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(list["kind"], "List");
        list["items"].as_array().unwrap().clone()
    }

    #[test]
    fn fillers_split_into_files_of_a_thousand() {
        for (count, files) in [(0, 0), (1, 1), (1000, 1), (1001, 2), (2500, 3)] {
            let fillers: Vec<BenchService> = (0..count)
                .map(|i| service(format!("default/filler-{i}"), "tcp"))
                .collect();
            let out = filler_files(&fillers);
            assert_eq!(out.len(), files, "{count} fillers");
            let mut names = BTreeSet::new();
            for (i, (file, text)) in out.iter().enumerate() {
                assert_eq!(file, &format!("fillers-{i:04}.yaml"));
                let items = items(text);
                assert!(items.len() <= 2 * SERVICES_PER_FILE);
                // Each Service is followed by its EndpointSlice.
                for pair in items.chunks(2) {
                    assert_eq!(
                        (pair[0]["kind"].as_str(), pair[1]["kind"].as_str()),
                        (Some("Service"), Some("EndpointSlice"))
                    );
                    let name = pair[0]["metadata"]["name"].as_str().unwrap();
                    assert_eq!(
                        pair[1]["metadata"]["labels"]["kubernetes.io/service-name"],
                        name
                    );
                    assert!(names.insert(name.to_owned()), "{name} twice");
                }
            }
            assert_eq!(names.len(), count);
        }
    }

    #[test]
    fn ports_of_one_name_make_one_service() {
        let measured = [
            service("default/measured".into(), "tcp"),
            service("default/measured".into(), "udp"),
        ];
        let items = items(&manifest_list(&measured));
        assert_eq!(items.len(), 2);
        let protocols: Vec<&str> = items[0]["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(protocols, ["TCP", "UDP"]);
    }
}
