//! The agent's HTTP health answers, shaped like kube-proxy's: `GET /healthz` (200 once the
//! first full sync is in the maps, 503 before and while the API source has been failing for
//! longer than `STALE_AFTER`), `GET /livez` (200 while the process runs) and the per-Service
//! healthCheckNodePort servers
//! of externalTrafficPolicy Local (200 while the node has local endpoints, 503 otherwise).
//! `GET /pods` answers the pods the kubelet runs, with their status (`node-agent pods`).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::proxy::HealthCheck;

/// How long the API source may fail before `/healthz` says the datapath is stale: kube-proxy's
/// healthz timeout, twice its default 30 s sync period.
pub const STALE_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

#[derive(Clone, Default)]
pub struct Health {
    last_sync: Arc<Mutex<Option<Timestamp>>>,
    /// The last news from the API source, and since when it has been failing without any.
    api: Arc<Mutex<(Option<Timestamp>, Option<Timestamp>)>>,
    /// Sorted by namespace, then name.
    pods: Arc<Mutex<Arc<Vec<Pod>>>>,
}

impl Health {
    pub fn synced(&self) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(Timestamp::now());
    }

    /// The API source reported a change or a list: what the datapath has is current.
    pub fn api_progress(&self) {
        *self.api.lock().unwrap_or_else(|e| e.into_inner()) = (Some(Timestamp::now()), None);
    }

    /// The API source failed: the datapath ages from now, unless it was failing already.
    pub fn api_failed(&self) {
        let mut api = self.api.lock().unwrap_or_else(|e| e.into_inner());
        api.1.get_or_insert_with(Timestamp::now);
    }

    /// The pods the kubelet reports now, with their status.
    pub fn set_pods(&self, mut pods: Vec<Pod>) {
        let key = |p: &Pod| (p.metadata.namespace.clone(), p.metadata.name.clone());
        pods.sort_by_cached_key(key);
        *self.pods.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(pods);
    }

    fn pods(&self) -> Json<Vec<Pod>> {
        // Copied outside the lock: the kubelet never waits for a reader.
        let pods = Arc::clone(&self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        Json(pods.to_vec())
    }

    fn status(&self) -> (StatusCode, Json<Value>) {
        self.status_at(Timestamp::now())
    }

    fn status_at(&self, now: Timestamp) -> (StatusCode, Json<Value>) {
        let last = *self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
        let (progress, failing) = *self.api.lock().unwrap_or_else(|e| e.into_inner());
        let stale = failing.is_some_and(|since| now.duration_since(since) > STALE_AFTER);
        let code = if last.is_some() && !stale {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let updated = last.max(progress.filter(|_| last.is_some()));
        let body = json!({
            "lastUpdated": updated.map(|t| t.to_string()).unwrap_or_default(),
            "currentTime": now.to_string(),
        });
        (code, Json(body))
    }
}

/// Binds `addr` now, so a taken port fails the start, and serves `/healthz`, `/livez` and
/// `/pods` in the background.
pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<()> {
    spawn(addr, router(health)).await.map(drop)
}

fn router(health: Health) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Health>| async move { h.status() }),
        )
        // Liveness: answering is all it takes, before the first sync too.
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/pods",
            get(|State(h): State<Health>| async move { h.pods() }),
        )
        .with_state(health)
}

async fn spawn(addr: SocketAddr, app: Router) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding a health server to {addr}"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health server on {addr} stopped: {e}");
        }
    }))
}

/// The running healthCheckNodePort servers.
#[derive(Default)]
pub struct ServiceHealthServers {
    servers: BTreeMap<u16, (Arc<Mutex<HealthCheck>>, JoinHandle<()>)>,
}

impl ServiceHealthServers {
    /// Starts, updates and stops servers so exactly `wanted` run. A port that cannot be bound
    /// is reported with its Service; the others are unaffected.
    pub async fn reconcile(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (&port, check) in wanted {
            if let Some((state, _)) = self.servers.get(&port) {
                *state.lock().unwrap_or_else(|e| e.into_inner()) = check.clone();
                continue;
            }
            let state = Arc::new(Mutex::new(check.clone()));
            let app = Router::new()
                .fallback(get(service_health))
                .with_state(state.clone());
            match spawn(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), app).await {
                Ok(task) => {
                    self.servers.insert(port, (state, task));
                }
                Err(e) => tracing::warn!(
                    "Service {}: healthCheckNodePort {port}: {e:#}",
                    check.service
                ),
            }
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        self.servers.values().for_each(|(_, task)| task.abort());
    }
}

async fn service_health(State(state): State<Arc<Mutex<HealthCheck>>>) -> impl IntoResponse {
    let check = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let code = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": &*check.service.namespace, "name": &*check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (
        code,
        [(header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        Json(body),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(namespace: &str, name: &str) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "status": {"phase": "Running", "podIP": "10.88.0.2"},
        }))
        .unwrap()
    }

    /// `/livez` answers while the process runs; `/healthz` only once the maps are synced.
    #[tokio::test]
    async fn livez_answers_before_the_first_sync_healthz_after() {
        use tower::ServiceExt as _;
        let health = Health::default();
        let status = |path: &'static str| {
            let app = router(health.clone());
            async move {
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                app.oneshot(request).await.unwrap().status()
            }
        };
        assert_eq!(status("/livez").await, StatusCode::OK);
        assert_eq!(status("/healthz").await, StatusCode::SERVICE_UNAVAILABLE);
        health.synced();
        assert_eq!(status("/livez").await, StatusCode::OK);
        assert_eq!(status("/healthz").await, StatusCode::OK);
    }

    /// Like kube-proxy: 503 before the first sync, 200 after it, and 503 again once the API
    /// source has been failing for longer than STALE_AFTER; any news from it makes it current.
    #[test]
    fn healthz_reports_an_api_source_failing_too_long_as_stale() {
        let health = Health::default();
        let now = Timestamp::now();
        let code = |at: Timestamp| health.status_at(at).0;
        assert_eq!(
            code(now),
            StatusCode::SERVICE_UNAVAILABLE,
            "before the first sync"
        );
        health.synced();
        assert_eq!(code(now), StatusCode::OK);
        health.api_failed();
        health.api_failed();
        let later = |s: i64| now + jiff::SignedDuration::from_secs(s);
        assert_eq!(
            code(later(59)),
            StatusCode::OK,
            "a short outage is tolerated"
        );
        assert_eq!(code(later(61)), StatusCode::SERVICE_UNAVAILABLE, "stale");
        let body = health.status_at(later(61)).1.0;
        assert_eq!(body["currentTime"], later(61).to_string());
        let updated: Timestamp = body["lastUpdated"].as_str().unwrap().parse().unwrap();
        assert!(updated < later(1), "the last sync, not now");
        health.api_progress();
        assert_eq!(code(later(61)), StatusCode::OK, "current again");
    }

    /// `node-agent pods` reads what the kubelet set, sorted by namespace and name.
    #[tokio::test]
    async fn pods_are_served_sorted_to_node_agent_pods() {
        let health = Health::default();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(axum::serve(listener, router(health.clone())).into_future());
        let fetch = || tokio::task::spawn_blocking(move || crate::pods::fetch(addr));

        assert_eq!(fetch().await.unwrap().unwrap(), []);
        health.set_pods(vec![
            pod("prod", "b"),
            pod("default", "z"),
            pod("prod", "a"),
        ]);
        let names: Vec<String> = (fetch().await.unwrap().unwrap().iter())
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap(),
                    p.metadata.name.as_deref().unwrap()
                )
            })
            .collect();
        assert_eq!(names, ["default/z", "prod/a", "prod/b"]);
        let served = fetch().await.unwrap().unwrap();
        assert_eq!(served[0], pod("default", "z"), "the whole object");
        server.abort();
    }
}
