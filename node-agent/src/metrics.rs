//! Prometheus metrics on `--metrics-bind` (`GET /metrics`, OpenMetrics text), named as
//! kube-proxy names them where it has them, plus packets and bytes per Service port read from
//! the datapath at scrape time.
//!
//! The datapath counts per frontend (reverse-NAT id); the proxy knows which Service port each
//! frontend serves. A scrape reads the counters on a blocking thread and asks the agent's loop,
//! which owns the proxy, for that table, so the loop never waits on a scrape.
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use node_common::ServiceCounters;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    datapath::ServiceCounterReader,
    proxy::{HeldFrontend, SyncReport, proto_name},
};

/// A Service port, as the per-Service counters are labelled.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct ServicePortLabels {
    pub namespace: String,
    pub service: String,
    /// `spec.ports[].port`: every frontend of the port (ClusterIP, NodePorts, ExternalIPs,
    /// LoadBalancer IPs) adds to it.
    pub port: u16,
    pub protocol: &'static str,
}

/// The Service port behind each frontend, by reverse-NAT id.
pub type ServicePorts = BTreeMap<u32, ServicePortLabels>;

/// A scrape's question to the agent's loop: it answers `service_ports(proxy.frontends())`.
pub type Scrape = oneshot::Sender<ServicePorts>;

pub fn service_ports<'a>(frontends: impl Iterator<Item = HeldFrontend<'a>>) -> ServicePorts {
    frontends
        .map(|held| {
            let labels = ServicePortLabels {
                namespace: held.service.namespace.to_string(),
                service: held.service.name.to_string(),
                port: held.port,
                protocol: proto_name(held.frontend.proto),
            };
            (held.rev_nat_id, labels)
        })
        .collect()
}

/// Each Service port's traffic: its frontends' counters summed, zero for a port no packet
/// reached yet (so its series exists before the first one). Counters of an id the proxy no
/// longer knows belong to a frontend just removed: left out.
pub fn service_traffic(
    ports: &ServicePorts,
    counters: &BTreeMap<u32, ServiceCounters>,
) -> BTreeMap<ServicePortLabels, ServiceCounters> {
    let mut traffic = BTreeMap::new();
    for (id, labels) in ports {
        let sum: &mut ServiceCounters = traffic.entry(labels.clone()).or_default();
        if let Some(c) = counters.get(id) {
            sum.packets = sum.packets.wrapping_add(c.packets);
            sum.bytes = sum.bytes.wrapping_add(c.bytes);
        }
    }
    traffic
}

/// The agent's own metrics; clones share them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    sync_duration: Histogram,
    programming_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    service_changes: Counter,
    endpoint_changes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        // Syncs take microseconds to seconds: 100 µs doubling to ~52 s (kube-proxy's start at
        // 1 ms, where every incremental sync here would fall in the first bucket).
        let buckets = || exponential_buckets(0.0001, 2.0, 20);
        let metrics = Self {
            registry: Arc::default(),
            sync_duration: Histogram::new(buckets()),
            programming_duration: Histogram::new(buckets()),
            last_sync: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
        };
        let mut registry = Registry::default();
        registry.register_with_unit(
            "kubeproxy_sync_proxy_rules_duration",
            "SyncProxyRules latency in seconds: compiling the changes and writing the maps",
            Unit::Seconds,
            metrics.sync_duration.clone(),
        );
        registry.register_with_unit(
            "kubeproxy_network_programming_duration",
            "In Cluster Network Programming Latency in seconds: from the agent seeing a change \
             (a manifest written, a pod's readiness) to the maps written",
            Unit::Seconds,
            metrics.programming_duration.clone(),
        );
        registry.register_with_unit(
            "kubeproxy_sync_proxy_rules_last_timestamp",
            "The last time proxy rules were successfully synced",
            Unit::Seconds,
            metrics.last_sync.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            metrics.endpoint_changes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }
}

impl Metrics {
    /// Records a sync that succeeded; `seen` is when the agent saw the change it programs
    /// (none for the first sync, which programs no change).
    pub fn synced(&self, report: &SyncReport, seen: Option<Instant>) {
        self.sync_duration
            .observe((report.compiled + report.written).as_secs_f64());
        if let Some(seen) = seen {
            self.programming_duration
                .observe(seen.elapsed().as_secs_f64());
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        self.last_sync
            .set(now.unwrap_or(Duration::ZERO).as_secs_f64());
        self.service_changes.inc_by(report.service_changes);
        self.endpoint_changes.inc_by(report.endpoint_changes);
    }

    /// The exposition: the agent's metrics, then the traffic of each Service port.
    pub fn render(
        &self,
        traffic: BTreeMap<ServicePortLabels, ServiceCounters>,
    ) -> Result<String, fmt::Error> {
        let mut scraped = Registry::default();
        scraped.register_collector(Box::new(ServiceTraffic(traffic)));
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry)?;
        text::encode_registry(&mut out, &scraped)?;
        text::encode_eof(&mut out)?;
        Ok(out)
    }
}

/// One scrape's per-Service counters.
#[derive(Debug)]
struct ServiceTraffic(BTreeMap<ServicePortLabels, ServiceCounters>);

impl Collector for ServiceTraffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        self.encode_counter(
            &mut encoder,
            "node_agent_service_packets",
            None,
            "Packets sent to the Service port's frontends (new and established flows).",
            |c| c.packets,
        )?;
        self.encode_counter(
            &mut encoder,
            "node_agent_service",
            Some(&Unit::Bytes),
            "Bytes of the packets sent to the Service port's frontends, as frames.",
            |c| c.bytes,
        )
    }
}

impl ServiceTraffic {
    /// One counter family: a series per Service port.
    fn encode_counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        unit: Option<&Unit>,
        help: &str,
        value: fn(&ServiceCounters) -> u64,
    ) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (labels, counters) in &self.0 {
            ConstCounter::new(value(counters)).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// What a scrape needs: the metrics, the datapath's counters and the way to the agent's loop.
#[derive(Clone)]
struct Scraper {
    metrics: Metrics,
    counters: Arc<ServiceCounterReader>,
    ask: mpsc::Sender<Scrape>,
}

/// Binds `addr` now, so a taken port fails the start, and serves `/metrics` in the
/// background; each scrape asks the agent's loop through `ask`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    counters: ServiceCounterReader,
    ask: mpsc::Sender<Scrape>,
) -> anyhow::Result<()> {
    let scraper = Scraper {
        metrics,
        counters: Arc::new(counters),
        ask,
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(scraper);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics server to {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server on {addr} stopped: {e}");
        }
    });
    Ok(())
}

async fn scrape(State(scraper): State<Scraper>) -> Response {
    match render(scraper).await {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("metrics scrape: {e:#}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
        }
    }
}

async fn render(scraper: Scraper) -> anyhow::Result<String> {
    let (reply, answer) = oneshot::channel();
    scraper
        .ask
        .send(reply)
        .await
        .context("the agent is stopping")?;
    let reader = Arc::clone(&scraper.counters);
    let counters = tokio::task::spawn_blocking(move || reader.read()).await??;
    let ports = answer.await.context("the agent is stopping")?;
    let traffic = service_traffic(&ports, &counters);
    Ok(scraper.metrics.render(traffic)?)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use node_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::{model::ObjectName, proxy::Frontend};

    fn labels(service: &str, port: u16, protocol: &'static str) -> ServicePortLabels {
        ServicePortLabels {
            namespace: "default".into(),
            service: service.into(),
            port,
            protocol,
        }
    }

    fn counters(packets: u64, bytes: u64) -> ServiceCounters {
        ServiceCounters { packets, bytes }
    }

    #[test]
    fn frontends_map_to_their_service_port() {
        let web = ObjectName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let frontend = |ip, port, proto| Frontend {
            ip: Ipv4Addr::from_bits(ip),
            port,
            proto,
        };
        let held = [
            (1, 80, frontend(0x0a60000a, 80, PROTO_TCP)),
            (2, 80, frontend(0xc0000201, 30080, PROTO_TCP)),
            (3, 53, frontend(0x0a60000a, 53, PROTO_UDP)),
        ];
        let ports = service_ports(
            held.iter()
                .map(|&(rev_nat_id, port, frontend)| HeldFrontend {
                    rev_nat_id,
                    service: &web,
                    port,
                    frontend,
                }),
        );
        let want: ServicePorts = [
            (1, labels("web", 80, "TCP")),
            (2, labels("web", 80, "TCP")),
            (3, labels("web", 53, "UDP")),
        ]
        .into();
        assert_eq!(ports, want);
    }

    #[test]
    fn traffic_table() {
        let ports: ServicePorts = [
            (1, labels("web", 80, "TCP")),
            (2, labels("web", 80, "TCP")),
            (3, labels("dns", 53, "UDP")),
        ]
        .into();
        type Case = (
            &'static str,
            Vec<(u32, ServiceCounters)>,
            Vec<(ServicePortLabels, ServiceCounters)>,
        );
        let cases: Vec<Case> = vec![
            (
                "no traffic yet: every Service port at zero",
                vec![],
                vec![
                    (labels("dns", 53, "UDP"), counters(0, 0)),
                    (labels("web", 80, "TCP"), counters(0, 0)),
                ],
            ),
            (
                "a port's frontends (ClusterIP and NodePort) add up",
                vec![(1, counters(3, 300)), (2, counters(2, 120))],
                vec![
                    (labels("dns", 53, "UDP"), counters(0, 0)),
                    (labels("web", 80, "TCP"), counters(5, 420)),
                ],
            ),
            (
                "a counter of a frontend just removed is left out",
                vec![(3, counters(1, 60)), (9, counters(7, 700))],
                vec![
                    (labels("dns", 53, "UDP"), counters(1, 60)),
                    (labels("web", 80, "TCP"), counters(0, 0)),
                ],
            ),
        ];
        for (name, read, want) in cases {
            let got = service_traffic(&ports, &read.into_iter().collect());
            assert_eq!(got, want.into_iter().collect(), "{name}");
        }
    }

    fn report(compiled_us: u64, services: u64, endpoints: u64) -> SyncReport {
        SyncReport {
            writes: 0,
            errors: vec![],
            health_checks: BTreeMap::new(),
            compiled: Duration::from_micros(compiled_us),
            written: Duration::from_micros(50),
            service_changes: services,
            endpoint_changes: endpoints,
        }
    }

    /// The lines of an exposition that are samples of `name` (not comments).
    fn samples<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
        out.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn exposition_has_kube_proxy_names_and_service_counters() {
        let metrics = Metrics::default();
        metrics.synced(&report(150, 2, 3), None);
        metrics.synced(&report(1_000, 0, 1), Some(Instant::now()));
        let traffic = [
            (labels("dns", 53, "UDP"), counters(1, 60)),
            (labels("web", 80, "TCP"), counters(5, 420)),
        ];
        let out = metrics.render(traffic.into()).unwrap();

        assert!(out.ends_with("# EOF\n"), "one EOF, at the end:\n{out}");
        assert_eq!(out.matches("# EOF").count(), 1);
        for (name, want) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds_count ", "2"),
            ("kubeproxy_network_programming_duration_seconds_count ", "1"),
            ("kubeproxy_sync_proxy_rules_service_changes_total ", "2"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total ", "4"),
        ] {
            assert_eq!(
                samples(&out, name),
                [format!("{name}{want}")],
                "{name}:\n{out}"
            );
        }
        // 200 µs and 1050 µs: the 0.0002 bucket holds the first, the 0.0016 one both.
        let buckets = samples(&out, "kubeproxy_sync_proxy_rules_duration_seconds_bucket");
        assert!(
            buckets
                .contains(&r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.0002"} 1"#),
            "{buckets:?}"
        );
        assert!(
            buckets
                .contains(&r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.0016"} 2"#),
            "{buckets:?}"
        );
        let last = samples(&out, "kubeproxy_sync_proxy_rules_last_timestamp_seconds ");
        let at: f64 = last[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!(at > 1.7e9, "a Unix time in seconds: {at}");

        assert_eq!(
            samples(&out, "node_agent_service_packets_total"),
            [
                r#"node_agent_service_packets_total{namespace="default",service="dns",port="53",protocol="UDP"} 1"#,
                r#"node_agent_service_packets_total{namespace="default",service="web",port="80",protocol="TCP"} 5"#,
            ]
        );
        assert_eq!(
            samples(&out, "node_agent_service_bytes_total"),
            [
                r#"node_agent_service_bytes_total{namespace="default",service="dns",port="53",protocol="UDP"} 60"#,
                r#"node_agent_service_bytes_total{namespace="default",service="web",port="80",protocol="TCP"} 420"#,
            ]
        );
        assert!(out.contains("# TYPE node_agent_service_packets counter\n"));
        assert!(out.contains("# UNIT node_agent_service_bytes bytes\n"));
    }
}
