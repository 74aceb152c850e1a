//! The CRI client against a real containerd (the fixture's, in its own namespace): a pod with
//! CNI networking serving HTTP from busybox, exec, and teardown.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ImageSpec, LinuxPodSandboxConfig,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxState,
};
use node_agent::cri::Cri;
use node_agent_tests::{client::http_get, containerd::Containerd, image};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn pod_serves_http_and_tears_down() {
    let containerd = Containerd::start("10.88.0.0/16").unwrap();
    let started = Instant::now();
    let mut cri = Cri::connect(&containerd.endpoint(), WAIT).await.unwrap();
    eprintln!("CRI Version answered after {:?}", started.elapsed());
    if let Err(e) = cri.wait_ready(WAIT).await {
        panic!("{e:#}\ncontainerd:\n{}", containerd.logs().join("\n"));
    }
    for name in [image::PAUSE, image::BUSYBOX] {
        let image = cri.image_status(name).await.unwrap();
        assert!(image.is_some(), "{name} not imported");
    }

    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-web".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: String::new(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: containerd.cgroup_parent("pod-web"),
            ..Default::default()
        }),
        labels: HashMap::from([("app".into(), "web".into())]),
        ..Default::default()
    };
    let t = Instant::now();
    let pod = cri.run_pod_sandbox(sandbox.clone()).await.unwrap();
    let run_sandbox = t.elapsed();
    let status = cri.pod_sandbox_status(&pod).await.unwrap();
    assert_eq!(status.state(), PodSandboxState::SandboxReady);
    let ip = status.network.expect("a pod network").ip;
    assert!(ip.starts_with("10.88."), "pod IP {ip}");

    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "httpd".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image::BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into()],
        args: vec!["echo hello-from-pod > /tmp/index.html && exec httpd -f -p 8080 -h /tmp".into()],
        ..Default::default()
    };
    let t = Instant::now();
    let id = cri
        .create_container(&pod, container, &sandbox)
        .await
        .unwrap();
    cri.start_container(&id).await.unwrap();
    let start_container = t.elapsed();
    eprintln!(
        "RunPodSandbox {run_sandbox:?}, CreateContainer + StartContainer {start_container:?}"
    );
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), ContainerState::ContainerRunning);

    // From containerd's namespace, across the CNI bridge, as a node reaches its pods.
    let addr = format!("{ip}:8080").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match containerd.netns().run(move || http_get(addr, "/")).unwrap() {
            Ok((200, body)) => break body,
            other if Instant::now() > deadline => panic!("GET http://{addr}/: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(body, "hello-from-pod\n");

    let t = Instant::now();
    let exec = cri
        .exec_sync(&id, &["echo", "hi"], Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("ExecSync {:?}", t.elapsed());
    assert_eq!(exec.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "hi\n");

    let t = Instant::now();
    cri.stop_container(&id, Duration::from_secs(5))
        .await
        .unwrap();
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), ContainerState::ContainerExited);
    cri.remove_container(&id).await.unwrap();
    cri.stop_pod_sandbox(&pod).await.unwrap();
    cri.remove_pod_sandbox(&pod).await.unwrap();
    eprintln!("stop + remove container and sandbox {:?}", t.elapsed());
    assert!(cri.list_containers(&[]).await.unwrap().is_empty());
    assert!(cri.list_pod_sandboxes(&[]).await.unwrap().is_empty());
    let gone = cri.container_status(&id).await.unwrap_err();
    assert!(format!("{gone:#}").contains("NotFound"), "{gone:#}");
}

#[tokio::test]
async fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/containerd.sock", dir.path().display());
    let started = Instant::now();
    let err = Cri::connect(&endpoint, Duration::from_millis(300))
        .await
        .err()
        .expect("no runtime there");
    let message = format!("{err:#}");
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("did not answer Version"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A socket file nobody listens on: the same, not a hang.
    let path = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let dead = format!("unix://{}", path.display());
    let err = Cri::connect(&dead, Duration::from_millis(300)).await.err();
    let message = format!("{:#}", err.expect("a dead socket"));
    assert!(message.contains(&dead), "{message}");

    let err = Cri::connect("/run/containerd.sock", WAIT).await.err();
    let message = format!("{:#}", err.expect("not a unix:// endpoint"));
    assert!(message.contains("unix://"), "{message}");
}
