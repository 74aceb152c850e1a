//! The agent's HTTP health answers, shaped like kube-proxy's: `GET /healthz` (200 once the
//! first full sync is in the maps, 503 before) and the per-Service healthCheckNodePort servers
//! of externalTrafficPolicy Local (200 while the node has local endpoints, 503 otherwise).
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
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::proxy::HealthCheck;

#[derive(Clone, Default)]
pub struct Health {
    last_sync: Arc<Mutex<Option<Timestamp>>>,
}

impl Health {
    pub fn synced(&self) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(Timestamp::now());
    }

    fn status(&self) -> (StatusCode, Json<Value>) {
        let last = *self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
        let code = if last.is_some() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "lastUpdated": last.map(|t| t.to_string()).unwrap_or_default(),
            "currentTime": Timestamp::now().to_string(),
        });
        (code, Json(body))
    }
}

/// Binds `addr` now, so a taken port fails the start, and serves `/healthz` in the background.
pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Health>| async move { h.status() }),
        )
        .with_state(health);
    spawn(addr, app).await.map(drop)
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
