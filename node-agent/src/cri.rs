//! A CRI v1 client: the kubelet side of a container runtime (containerd) reached over its
//! unix socket. Each call's error names the endpoint and the call.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, Image, ImageSpec,
    ImageStatusRequest, ListContainersRequest, ListPodSandboxRequest, PodSandbox, PodSandboxConfig,
    PodSandboxFilter, PodSandboxStatus, PodSandboxStatusRequest, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest, VersionResponse,
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Polling interval while waiting for the runtime.
const POLL: Duration = Duration::from_millis(50);

/// Cheap to clone: the clones share one connection (each pod worker and prober holds one).
#[derive(Clone)]
pub struct Cri {
    endpoint: String,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to `unix://PATH` and waits up to `timeout` until the runtime answers
    /// `Version` (containerd's CRI plugin answers "not initialized" for a while after start).
    pub async fn connect(endpoint: &str, timeout: Duration) -> anyhow::Result<Self> {
        let Some(path) = endpoint.strip_prefix("unix://") else {
            bail!("CRI endpoint {endpoint}: only unix://PATH endpoints are supported");
        };
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = async {
                let channel = channel(path).await?;
                let mut cri = Self {
                    endpoint: endpoint.to_owned(),
                    runtime: RuntimeServiceClient::new(channel.clone()),
                    images: ImageServiceClient::new(channel),
                };
                cri.version().await?;
                anyhow::Ok(cri)
            };
            match attempt.await {
                Ok(cri) => return Ok(cri),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "CRI runtime at {endpoint} did not answer Version within {timeout:?}"
                    )));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    pub async fn version(&mut self) -> anyhow::Result<VersionResponse> {
        let request = VersionRequest {
            version: "v1".into(),
        };
        let response = self.runtime.version(request).await;
        self.call("Version", response)
    }

    /// Waits up to `timeout` for the RuntimeReady and NetworkReady conditions (the network
    /// is ready once a CNI config is in place).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let request = StatusRequest { verbose: false };
            let response = self.runtime.status(request).await;
            let status = self.call("Status", response)?;
            let not_ready: Vec<String> = status
                .status
                .map(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !c.status)
                .map(|c| format!("{} ({}: {})", c.r#type, c.reason, c.message))
                .collect();
            if not_ready.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "CRI runtime at {} not ready after {timeout:?}: {}",
                    self.endpoint,
                    not_ready.join("; ")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The image as the runtime stores it, None when it is absent.
    pub async fn image_status(&mut self, image: &str) -> anyhow::Result<Option<Image>> {
        let request = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let response = self.images.image_status(request).await;
        Ok(self.call("ImageStatus", response)?.image)
    }

    /// Runs a pod sandbox (its network set up by CNI) and returns its id.
    pub async fn run_pod_sandbox(&mut self, config: PodSandboxConfig) -> anyhow::Result<String> {
        let request = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let response = self.runtime.run_pod_sandbox(request).await;
        Ok(self.call("RunPodSandbox", response)?.pod_sandbox_id)
    }

    pub async fn pod_sandbox_status(&mut self, id: &str) -> anyhow::Result<PodSandboxStatus> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let response = self.runtime.pod_sandbox_status(request).await;
        self.call("PodSandboxStatus", response)?
            .status
            .with_context(|| format!("{}: PodSandboxStatus {id}: no status", self.endpoint))
    }

    /// Pulls `image` (with the sandbox's config, as the kubelet does) and returns its reference.
    pub async fn pull_image(
        &mut self,
        image: &str,
        sandbox: &PodSandboxConfig,
    ) -> anyhow::Result<String> {
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(sandbox.clone()),
        };
        let response = self.images.pull_image(request).await;
        Ok(self.call("PullImage", response)?.image_ref)
    }

    /// The sandboxes carrying every label of `labels` (all of them when empty).
    pub async fn list_pod_sandboxes(
        &mut self,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Vec<PodSandbox>> {
        let filter = PodSandboxFilter {
            label_selector: label_selector(labels),
            ..Default::default()
        };
        let request = ListPodSandboxRequest {
            filter: Some(filter),
        };
        let response = self.runtime.list_pod_sandbox(request).await;
        Ok(self.call("ListPodSandbox", response)?.items)
    }

    pub async fn stop_pod_sandbox(&mut self, id: &str) -> anyhow::Result<()> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let response = self.runtime.stop_pod_sandbox(request).await;
        self.call("StopPodSandbox", response).map(drop)
    }

    pub async fn remove_pod_sandbox(&mut self, id: &str) -> anyhow::Result<()> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let response = self.runtime.remove_pod_sandbox(request).await;
        self.call("RemovePodSandbox", response).map(drop)
    }

    /// Creates a container in sandbox `pod_id` (run from `sandbox`'s config) and returns its id.
    pub async fn create_container(
        &mut self,
        pod_id: &str,
        config: ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> anyhow::Result<String> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let response = self.runtime.create_container(request).await;
        Ok(self.call("CreateContainer", response)?.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> anyhow::Result<()> {
        let request = StartContainerRequest {
            container_id: id.into(),
        };
        let response = self.runtime.start_container(request).await;
        self.call("StartContainer", response).map(drop)
    }

    pub async fn container_status(&mut self, id: &str) -> anyhow::Result<ContainerStatus> {
        let request = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let response = self.runtime.container_status(request).await;
        self.call("ContainerStatus", response)?
            .status
            .with_context(|| format!("{}: ContainerStatus {id}: no status", self.endpoint))
    }

    /// The containers carrying every label of `labels` (all of them when empty).
    pub async fn list_containers(
        &mut self,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Vec<k8s_cri::v1::Container>> {
        let filter = ContainerFilter {
            label_selector: label_selector(labels),
            ..Default::default()
        };
        let request = ListContainersRequest {
            filter: Some(filter),
        };
        let response = self.runtime.list_containers(request).await;
        Ok(self.call("ListContainers", response)?.containers)
    }

    /// Runs `cmd` in the container, waiting at most `timeout` (whole seconds, as CRI has it).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<ExecSyncResponse> {
        let request = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|&c| c.into()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        let response = self.runtime.exec_sync(request).await;
        self.call("ExecSync", response)
    }

    /// Stops the container, SIGKILLing it `grace` after SIGTERM.
    pub async fn stop_container(&mut self, id: &str, grace: Duration) -> anyhow::Result<()> {
        let request = StopContainerRequest {
            container_id: id.into(),
            timeout: grace.as_secs() as i64,
        };
        let response = self.runtime.stop_container(request).await;
        self.call("StopContainer", response).map(drop)
    }

    pub async fn remove_container(&mut self, id: &str) -> anyhow::Result<()> {
        let request = RemoveContainerRequest {
            container_id: id.into(),
        };
        let response = self.runtime.remove_container(request).await;
        self.call("RemoveContainer", response).map(drop)
    }

    /// The response, or an error naming the endpoint, the call and the runtime's message.
    fn call<T>(
        &self,
        name: &'static str,
        response: Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<T> {
        response.map(tonic::Response::into_inner).map_err(|s| {
            CallError {
                call: name,
                endpoint: self.endpoint.clone(),
                code: s.code(),
                message: s.message().to_owned(),
            }
            .into()
        })
    }
}

/// A CRI call the runtime refused or could not answer.
#[derive(Debug, thiserror::Error)]
#[error("CRI {call} at {endpoint}: {code:?}: {message}")]
pub struct CallError {
    pub call: &'static str,
    pub endpoint: String,
    pub code: tonic::Code,
    pub message: String,
}

/// Whether `e` is the runtime saying the object asked about does not exist.
pub fn not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CallError>()
        .is_some_and(|c| c.code == tonic::Code::NotFound)
}

fn label_selector(labels: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    labels
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A gRPC channel over the unix socket at `path` (the URI is a placeholder tonic requires).
async fn channel(path: &str) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    Endpoint::try_from("http://[::]")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .context("connecting")
}
