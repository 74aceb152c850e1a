//! The CRI client against a real containerd (the fixture's, in its own namespace): a pod with
//! CNI networking serving HTTP from busybox (the manifests' httpd pod script), exec, crash,
//! graceful stop, and teardown with what it leaves.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ImageSpec, LinuxPodSandboxConfig, Mount,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxState,
};
use node_agent::cri::Cri;
use node_agent_tests::{
    client::{http_get, tally_lines, wget_loop},
    containerd::{Containerd, cgroup_dirs, netns_inode},
    image,
    manifest::{CRASH, EVENTS, HTTPD, HttpdPod},
};

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

    // The manifests' httpd pod, its events dir mounted as the kubelet mounts a hostPath.
    let events = tempfile::tempdir().unwrap();
    let httpd = HttpdPod {
        name: "web",
        port: 8080,
        events: Some(events.path()),
        ..Default::default()
    };
    let container = |name: &str, httpd: HttpdPod| ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image::BUSYBOX.into(),
            ..Default::default()
        }),
        command: httpd.pod().spec.unwrap().containers[0]
            .command
            .clone()
            .unwrap(),
        mounts: vec![Mount {
            container_path: EVENTS.into(),
            host_path: events.path().display().to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let t = Instant::now();
    let id = cri
        .create_container(&pod, container(HTTPD, httpd), &sandbox)
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
    assert_eq!(body, "web\n");

    let t = Instant::now();
    let exec = cri
        .exec_sync(&id, &["echo", "hi"], Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("ExecSync {:?}", t.elapsed());
    assert_eq!(exec.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "hi\n");

    // The kubelet e2e's client: busybox wget from inside a pod, one line per answer.
    let pause = Duration::from_millis(50);
    let url = format!("http://{ip}:8080/");
    let answers = tally_lines(&stdout_of(&mut cri, &id, &wget_loop(&url, 3, pause)).await);
    assert_eq!(answers, BTreeMap::from([("web".to_owned(), 3)]));
    let nobody = wget_loop("http://127.0.0.1:1/", 2, pause);
    let answers = tally_lines(&stdout_of(&mut cri, &id, &nobody).await);
    assert_eq!(answers, BTreeMap::from([("error".to_owned(), 2)]));

    // What the kubelet e2e finds a pod's leftovers by: its netns and its cgroup.
    let netns = stdout_of(&mut cri, &id, &["readlink", "/proc/self/ns/net"]).await;
    let netns = netns_inode(&netns).unwrap();
    assert!(containerd.pod_netns().contains(&netns), "netns {netns}");
    let proc_cgroup = stdout_of(&mut cri, &id, &["cat", "/proc/self/cgroup"]).await;
    let pod_cgroup = containerd.pod_cgroup(&proc_cgroup).unwrap();
    assert_eq!(pod_cgroup, containerd.cgroup_parent("pod-web"));
    let container_cgroup = format!("{pod_cgroup}/{id}");
    assert!(!cgroup_dirs(&container_cgroup).is_empty(), "{proc_cgroup}");

    // The script's crash: httpd killed, the shell (PID 1) exits with its status.
    let port = 8081;
    let crashing = HttpdPod { port, ..httpd };
    let crashing = cri
        .create_container(&pod, container("crashing", crashing), &sandbox)
        .await
        .unwrap();
    cri.start_container(&crashing).await.unwrap();
    let out = cri
        .exec_sync(&crashing, CRASH, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = cri.container_status(&crashing).await.unwrap();
        if status.state() == ContainerState::ContainerExited || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.state(), ContainerState::ContainerExited);
    assert_eq!(status.exit_code, 143);
    cri.remove_container(&crashing).await.unwrap();

    // SIGTERM: the script exits at once, with 0, and says so in its events dir.
    let t = Instant::now();
    cri.stop_container(&id, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), ContainerState::ContainerExited);
    assert_eq!(status.exit_code, 0);
    let log = std::fs::read_to_string(events.path().join("log")).unwrap();
    assert_eq!(log, "sigterm\n");
    cri.remove_container(&id).await.unwrap();
    cri.stop_pod_sandbox(&pod).await.unwrap();
    cri.remove_pod_sandbox(&pod).await.unwrap();
    eprintln!("stop + remove container and sandbox {:?}", t.elapsed());
    assert!(cri.list_containers(&[]).await.unwrap().is_empty());
    assert!(cri.list_pod_sandboxes(&[]).await.unwrap().is_empty());
    let gone = cri.container_status(&id).await.unwrap_err();
    assert!(format!("{gone:#}").contains("NotFound"), "{gone:#}");
    assert!(!containerd.pod_netns().contains(&netns));
    assert!(cgroup_dirs(&container_cgroup).is_empty());
    // runc leaves the pod's own cgroup: removing it is the kubelet's part.
    assert!(!cgroup_dirs(&pod_cgroup).is_empty());
}

/// `cmd`'s stdout in container `id`.
async fn stdout_of(cri: &mut Cri, id: &str, cmd: &[impl AsRef<str>]) -> String {
    let cmd: Vec<&str> = cmd.iter().map(AsRef::as_ref).collect();
    let out = cri
        .exec_sync(id, &cmd, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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
