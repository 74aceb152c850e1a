//! The API source: Services and EndpointSlices in all namespaces, followed through the
//! Kubernetes API with kube's watcher (initial list, then watch with bookmarks; a 410 Gone
//! relists; failures retry with the watcher's default backoff). The watcher does the I/O;
//! `Follow` turns its events into `Changes`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{core::v1::Service, discovery::v1::EndpointSlice},
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tower::util::MapResponseLayer;

use crate::model::{Changes, ObjectName};

/// Where the API server and the credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiConfig {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (KUBERNETES_SERVICE_HOST and the mounted token).
    InCluster,
}

/// A client for the API server `config` names, reporting each successful answer as
/// `Update::Reached`; errors name the file or what is missing.
pub async fn client(
    config: &ApiConfig,
    updates: mpsc::UnboundedSender<Update>,
) -> anyhow::Result<Client> {
    let config = match config {
        ApiConfig::Kubeconfig(path) => from_kubeconfig(path).await?,
        ApiConfig::InCluster => {
            kube::Config::incluster().context("in-cluster API config (service account)")?
        }
    };
    let builder = ClientBuilder::try_from(config).context("building the API client")?;
    Ok(builder
        .with_layer(&MapResponseLayer::new(reached(updates)))
        .build())
}

/// Reports every successful answer: a watch resumed after an outage brings no event until
/// something changes, yet the state is current again.
fn reached<B>(
    updates: mpsc::UnboundedSender<Update>,
) -> impl FnMut(http::Response<B>) -> http::Response<B> + Clone {
    move |response| {
        if response.status().is_success() {
            let _ = updates.send(Update::Reached);
        }
        response
    }
}

async fn from_kubeconfig(path: &Path) -> anyhow::Result<kube::Config> {
    let context = || format!("kubeconfig {}", path.display());
    let kubeconfig = Kubeconfig::read_from(path).with_context(context)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(context)
}

/// What a watch reports to the agent.
#[derive(Debug)]
pub enum Update {
    /// Changes to objects of `kind`; `listed` when they complete a (re)list of it.
    Changes {
        kind: &'static str,
        changes: Changes,
        listed: bool,
    },
    /// The watch of `kind` failed; the watcher retries with backoff and nothing changes
    /// meanwhile.
    Failed { kind: &'static str, error: String },
    /// The API server answered a request successfully.
    Reached,
}

/// A kind the API source follows, and where its changes go.
pub trait Watched:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + k8s_openapi::Resource
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + 'static
{
    fn changes(changes: &mut Changes) -> &mut BTreeMap<ObjectName, Option<Self>>;
}

impl Watched for Service {
    fn changes(changes: &mut Changes) -> &mut BTreeMap<ObjectName, Option<Self>> {
        &mut changes.services
    }
}

impl Watched for EndpointSlice {
    fn changes(changes: &mut Changes) -> &mut BTreeMap<ObjectName, Option<Self>> {
        &mut changes.endpoint_slices
    }
}

/// The kinds the proxy follows, watched in all namespaces until `updates` is closed.
pub fn watch_proxy(client: Client, updates: mpsc::UnboundedSender<Update>) {
    tokio::spawn(watch::<Service>(client.clone(), updates.clone()));
    tokio::spawn(watch::<EndpointSlice>(client, updates));
}

/// Number of kinds `watch_proxy` follows: the first sync waits for a list of each.
pub const PROXY_KINDS: usize = 2;

async fn watch<K: Watched>(client: Client, updates: mpsc::UnboundedSender<Update>) {
    let events = watcher(Api::<K>::all(client), watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut follow = Follow::<K>::default();
    while let Some(event) = events.next().await {
        if let Some(update) = follow.event(event)
            && updates.send(update).is_err()
        {
            return;
        }
    }
}

/// One kind as last listed and watched: the names known, for a relist to tell which objects
/// disappeared meanwhile, and the objects of a list in progress.
pub struct Follow<K> {
    known: BTreeSet<ObjectName>,
    listing: Option<BTreeMap<ObjectName, K>>,
}

impl<K> Default for Follow<K> {
    fn default() -> Self {
        Self {
            known: BTreeSet::new(),
            listing: None,
        }
    }
}

impl<K: Watched> Follow<K> {
    /// What a watcher event changes. A list is reported whole at its end (with the known
    /// objects it no longer has as deleted), so the datapath never sees half of it.
    pub fn event(&mut self, event: Result<watcher::Event<K>, watcher::Error>) -> Option<Update> {
        let mut changes = Changes::default();
        let mut listed = false;
        match event {
            Err(e) => {
                // With its causes: "client error (Connect)" alone does not say what failed.
                let mut error = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    error = format!("{error}: {cause}");
                    source = cause.source();
                }
                return Some(Update::Failed {
                    kind: <K as k8s_openapi::Resource>::KIND,
                    error,
                });
            }
            Ok(watcher::Event::Init) => {
                self.listing = Some(BTreeMap::new());
                return None;
            }
            Ok(watcher::Event::InitApply(object)) => {
                self.listing
                    .get_or_insert_default()
                    .insert(name(&object), object);
                return None;
            }
            Ok(watcher::Event::InitDone) => {
                let listing = self.listing.take().unwrap_or_default();
                let known = listing.keys().cloned().collect();
                let applied = K::changes(&mut changes);
                for gone in std::mem::replace(&mut self.known, known) {
                    applied.insert(gone, None);
                }
                applied.extend(listing.into_iter().map(|(n, o)| (n, Some(o))));
                listed = true;
            }
            Ok(watcher::Event::Apply(object)) => {
                let name = name(&object);
                self.known.insert(name.clone());
                K::changes(&mut changes).insert(name, Some(object));
            }
            Ok(watcher::Event::Delete(object)) => {
                let name = name(&object);
                self.known.remove(&name);
                K::changes(&mut changes).insert(name, None);
            }
        }
        Some(Update::Changes {
            kind: <K as k8s_openapi::Resource>::KIND,
            changes,
            listed,
        })
    }
}

fn name<K: Resource>(object: &K) -> ObjectName {
    ObjectName {
        namespace: object.namespace().unwrap_or_default().into(),
        name: object.name_any().into(),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle, SendResponse};

    use super::*;

    type Server = Handle<Request<Body>, Response<Body>>;

    /// A client over a mock transport, and the watch of `K` running on it.
    fn start<K: Watched>() -> (Server, mpsc::UnboundedReceiver<Update>) {
        let (transport, server) = mock::pair::<Request<Body>, Response<Body>>();
        let (updates, received) = mpsc::unbounded_channel();
        let transport = tower::ServiceBuilder::new()
            .map_response(reached(updates.clone()))
            .service(transport);
        tokio::spawn(watch::<K>(Client::new(transport, "default"), updates));
        (server, received)
    }

    /// The next update is the API server's successful answer.
    async fn is_reached(received: &mut mpsc::UnboundedReceiver<Update>) {
        match received.recv().await.expect("an update") {
            Update::Reached => {}
            other => panic!("{other:?}"),
        }
    }

    /// The next request, checked to contain each of `query`.
    async fn request(
        server: &mut Server,
        path: &str,
        query: &[&str],
    ) -> SendResponse<Response<Body>> {
        let (request, respond) = pin!(server).next_request().await.expect("a request");
        let uri = request.uri().to_string();
        assert_eq!(request.uri().path(), path, "{uri}");
        for q in query {
            assert!(uri.contains(q), "{uri} has no {q}");
        }
        respond
    }

    fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        response
    }

    fn service(namespace: &str, name: &str, version: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": namespace, "name": name, "resourceVersion": version},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
        })
    }

    fn list(kind: &str, version: &str, items: Vec<Value>) -> Response<Body> {
        let body = json!({
            "apiVersion": "v1", "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": version}, "items": items,
        });
        json_response(StatusCode::OK, serde_json::to_vec(&body).unwrap())
    }

    /// A watch answer: one JSON event a line, then the end of the stream (a disconnect).
    fn events(events: &[(&str, Value)]) -> Response<Body> {
        let mut body = Vec::new();
        for (kind, object) in events {
            serde_json::to_writer(&mut body, &json!({"type": kind, "object": object})).unwrap();
            body.push(b'\n');
        }
        json_response(StatusCode::OK, body)
    }

    fn name(namespace: &str, name: &str) -> ObjectName {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The next update's Service changes: each name with its clusterIP, or None when deleted;
    /// and whether they complete a list.
    async fn services(
        received: &mut mpsc::UnboundedReceiver<Update>,
    ) -> (Vec<(ObjectName, Option<String>)>, bool) {
        match received.recv().await.expect("an update") {
            Update::Changes {
                kind,
                changes,
                listed,
            } => {
                assert_eq!(kind, "Service");
                assert!(changes.endpoint_slices.is_empty() && changes.pods.is_empty());
                let services = changes
                    .services
                    .into_iter()
                    .map(|(n, s)| (n, s.map(|s| s.spec.unwrap().cluster_ip.unwrap())))
                    .collect();
                (services, listed)
            }
            other => panic!("{other:?}"),
        }
    }

    /// List, then ADDED / MODIFIED / DELETED / BOOKMARK; the stream ends and the watch resumes
    /// from the bookmark; a 410 Gone relists, and what disappeared meanwhile is deleted.
    #[tokio::test(start_paused = true)]
    async fn watch_events_become_changes_and_a_relist_deletes_what_disappeared() {
        let (mut server, mut received) = start::<Service>();
        let path = "/api/v1/services";

        request(&mut server, path, &["limit=500"])
            .await
            .send_response(list(
                "Service",
                "10",
                vec![
                    service("default", "a", "1", "10.96.0.1"),
                    service("prod", "b", "2", "10.96.0.2"),
                ],
            ));
        is_reached(&mut received).await;
        let (a, b, c, d) = (
            name("default", "a"),
            name("prod", "b"),
            name("default", "c"),
            name("prod", "d"),
        );
        assert_eq!(
            services(&mut received).await,
            (
                vec![
                    (a.clone(), Some("10.96.0.1".into())),
                    (b.clone(), Some("10.96.0.2".into()))
                ],
                true
            )
        );

        request(&mut server, path, &["watch=true", "resourceVersion=10", "allowWatchBookmarks=true"])
            .await
            .send_response(events(&[
                ("ADDED", service("default", "c", "11", "10.96.0.3")),
                ("MODIFIED", service("default", "a", "12", "10.96.0.9")),
                ("DELETED", service("prod", "b", "13", "10.96.0.2")),
                ("BOOKMARK", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"resourceVersion": "20"}})),
            ]));
        is_reached(&mut received).await;
        assert_eq!(
            services(&mut received).await,
            (vec![(c.clone(), Some("10.96.0.3".into()))], false)
        );
        assert_eq!(
            services(&mut received).await,
            (vec![(a.clone(), Some("10.96.0.9".into()))], false)
        );
        assert_eq!(
            services(&mut received).await,
            (vec![(b.clone(), None)], false)
        );

        // The stream ended (a disconnect): the watch resumes where the bookmark left it, and
        // the API server answers that this version is gone.
        request(&mut server, path, &["watch=true", "resourceVersion=20"])
            .await
            .send_response(events(&[(
                "ERROR",
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "message": "too old resource version: 20 (25)", "reason": "Expired", "code": 410}),
            )]));
        is_reached(&mut received).await;
        match received.recv().await.expect("an update") {
            Update::Failed { kind, error } => {
                assert_eq!(kind, "Service");
                assert!(error.contains("too old resource version"), "{error}");
            }
            other => panic!("{other:?}"),
        }

        // Relisted (after the backoff): c went while the watch was gone, d came.
        request(&mut server, path, &["limit=500"])
            .await
            .send_response(list(
                "Service",
                "30",
                vec![
                    service("default", "a", "12", "10.96.0.9"),
                    service("prod", "d", "28", "10.96.0.4"),
                ],
            ));
        is_reached(&mut received).await;
        assert_eq!(
            services(&mut received).await,
            (
                vec![
                    (a.clone(), Some("10.96.0.9".into())),
                    (c.clone(), None),
                    (d.clone(), Some("10.96.0.4".into()))
                ],
                true
            )
        );
        // A resumed watch that brings nothing still tells that the state is current.
        request(&mut server, path, &["watch=true", "resourceVersion=30"])
            .await
            .send_response(events(&[]));
        is_reached(&mut received).await;
        request(&mut server, path, &["watch=true", "resourceVersion=30"]).await;
        assert!(received.try_recv().is_err(), "nothing more");
    }

    fn endpoint_slice(version: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": "web-x7k2p", "resourceVersion": version,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-1"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        })
    }

    /// The next update's EndpointSlice changes: each name with its first address, or None.
    async fn slices(
        received: &mut mpsc::UnboundedReceiver<Update>,
    ) -> Vec<(ObjectName, Option<String>)> {
        match received.recv().await.expect("an update") {
            Update::Changes { kind, changes, .. } => {
                assert_eq!(kind, "EndpointSlice");
                assert!(changes.services.is_empty());
                (changes.endpoint_slices.into_iter())
                    .map(|(n, s)| (n, s.map(|s| s.endpoints.unwrap()[0].addresses[0].clone())))
                    .collect()
            }
            other => panic!("{other:?}"),
        }
    }

    /// After the list, the API server fails: the watch start answered 500, a connection reset,
    /// then garbage. Each failure is reported naming the kind and nothing is reported changed,
    /// so the maps keep what they have; once the API server is back the watch resumes from
    /// where it was.
    #[tokio::test(start_paused = true)]
    async fn an_api_outage_changes_nothing_and_names_the_resource() {
        let (mut server, mut received) = start::<EndpointSlice>();
        let path = "/apis/discovery.k8s.io/v1/endpointslices";
        request(&mut server, path, &["limit=500"])
            .await
            .send_response(list(
                "EndpointSlice",
                "40",
                vec![endpoint_slice("39", "10.244.1.5")],
            ));
        is_reached(&mut received).await;
        let web = name("default", "web-x7k2p");
        assert_eq!(
            slices(&mut received).await,
            [(web.clone(), Some("10.244.1.5".into()))]
        );

        let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                            "message": "etcdserver: request timed out", "code": 500});
        request(&mut server, path, &["watch=true", "resourceVersion=40"])
            .await
            .send_response(json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::to_vec(&status).unwrap(),
            ));
        request(&mut server, path, &["watch=true", "resourceVersion=40"])
            .await
            .send_error(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ));
        let mut errors = Vec::new();
        for _ in 0..2 {
            match received.recv().await.expect("an update") {
                Update::Failed { kind, error } => {
                    assert_eq!(kind, "EndpointSlice");
                    errors.push(error);
                }
                other => panic!("an outage changed something: {other:?}"),
            }
        }
        assert!(errors[0].contains("failed to start watching"), "{errors:?}");
        assert!(
            errors[0].contains("etcdserver: request timed out"),
            "{errors:?}"
        );
        assert!(errors[1].contains("failed to start watching"), "{errors:?}");
        assert!(errors[1].contains("connection reset by peer"), "{errors:?}");

        request(&mut server, path, &["watch=true", "resourceVersion=40"])
            .await
            .send_response(json_response(
                StatusCode::OK,
                b"<html>garbage</html>\n".to_vec(),
            ));
        is_reached(&mut received).await;
        match received.recv().await.expect("an update") {
            Update::Failed { kind, error } => {
                assert_eq!(kind, "EndpointSlice");
                assert!(error.contains("watch stream failed"), "{error}");
            }
            other => panic!("garbage changed something: {other:?}"),
        }

        request(&mut server, path, &["watch=true", "resourceVersion=40"])
            .await
            .send_response(events(&[("MODIFIED", endpoint_slice("41", "10.244.1.6"))]));
        is_reached(&mut received).await;
        assert_eq!(
            slices(&mut received).await,
            [(web, Some("10.244.1.6".into()))]
        );
    }

    /// Watcher events in, changes out: (events, for each the Service names applied (+) or
    /// deleted (-) and whether they complete a list; None while a list is in progress).
    #[test]
    fn follow_turns_watcher_events_into_changes() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let svc = |name: &str| -> Service {
            serde_json::from_value(service("default", name, "1", "10.96.0.1")).unwrap()
        };
        type Step = (watcher::Event<Service>, Option<(&'static str, bool)>);
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "a list is reported whole at its end",
                vec![
                    (Init, None),
                    (InitApply(svc("a")), None),
                    (InitApply(svc("b")), None),
                    (InitDone, Some(("+a +b", true))),
                ],
            ),
            (
                "an empty first list is still a complete list",
                vec![(Init, None), (InitDone, Some(("", true)))],
            ),
            (
                "watched changes are reported one by one",
                vec![
                    (Apply(svc("a")), Some(("+a", false))),
                    (Apply(svc("a")), Some(("+a", false))),
                    (Delete(svc("a")), Some(("-a", false))),
                ],
            ),
            (
                "a relist deletes what was known and is no longer listed",
                vec![
                    (Init, None),
                    (InitApply(svc("a")), None),
                    (InitApply(svc("b")), None),
                    (InitDone, Some(("+a +b", true))),
                    (Apply(svc("c")), Some(("+c", false))),
                    (Delete(svc("a")), Some(("-a", false))),
                    (Init, None),
                    (InitApply(svc("b")), None),
                    (InitApply(svc("d")), None),
                    (InitDone, Some(("+b -c +d", true))),
                    (Init, None),
                    (InitDone, Some(("-b -d", true))),
                ],
            ),
            (
                "a delete of an object never seen is passed on",
                vec![(Delete(svc("x")), Some(("-x", false)))],
            ),
        ];
        for (case, steps) in cases {
            let mut follow = Follow::<Service>::default();
            for (i, (event, expected)) in steps.into_iter().enumerate() {
                let got = follow.event(Ok(event)).map(|update| match update {
                    Update::Changes {
                        kind: "Service",
                        changes,
                        listed,
                    } => {
                        let names: Vec<String> = (changes.services.iter())
                            .map(|(n, s)| {
                                format!("{}{}", if s.is_some() { "+" } else { "-" }, n.name)
                            })
                            .collect();
                        (names.join(" "), listed)
                    }
                    other => panic!("{case}: {other:?}"),
                });
                let expected = expected.map(|(names, listed)| (names.to_string(), listed));
                assert_eq!(got, expected, "{case}, step {i}");
            }
        }
    }

    #[tokio::test]
    async fn a_missing_or_garbage_kubeconfig_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let garbage = dir.path().join("garbage.yaml");
        std::fs::write(&garbage, "clusters: [ {name: 7, cluster: not a map").unwrap();
        for path in [missing, garbage] {
            let (updates, _) = mpsc::unbounded_channel();
            let Err(error) = client(&ApiConfig::Kubeconfig(path.clone()), updates).await else {
                panic!("{} accepted", path.display());
            };
            let error = format!("{error:#}");
            assert!(error.contains(&path.display().to_string()), "{error}");
        }
    }
}
