//! `GET /healthz`, answered like kube-proxy's: 200 once the first full sync is in the maps,
//! 503 before.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use jiff::Timestamp;
use serde_json::{Value, json};

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

/// Binds `addr` now, so a taken port fails the start, and serves in the background.
pub async fn serve(addr: SocketAddr, health: Health) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health server to {addr}"))?;
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Health>| async move { h.status() }),
        )
        .with_state(health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health server stopped: {e}");
        }
    });
    Ok(())
}
