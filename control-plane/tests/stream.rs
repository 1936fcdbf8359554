//! tern-control end to end in process: a real tonic client over 127.0.0.1 against the
//! gRPC server, a real config directory watched with notify, and the admin `/sidecars`.

mod common;

use std::time::Duration;

use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_api::v1::sidecar_message::Kind;
use tern_api::v1::{Ack, Nack, SidecarMessage};
use tern_control::server::Settings;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_push_edit_ack_nack() {
    let dir = temp_dir("stream");
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    let settings = Settings {
        debounce: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        admit_rate: 1000,
        ..Settings::default()
    };
    let Running {
        grpc: grpc_addr,
        admin: admin_addr,
        shutdown,
        server,
    } = start(&dir, settings).await;
    assert_eq!(http_get(admin_addr, "/live").await.0, 200);

    // The first message must be a Hello.
    {
        let mut client = client(grpc_addr).await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(SidecarMessage {
            kind: Some(Kind::Ack(Ack {
                version: "x".into(),
            })),
        })
        .await
        .unwrap();
        let err = client.stream(ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }

    // Hello -> the scoped push.
    let mut web = Sidecar::connect(grpc_addr, hello("web-1", &["shop/checkout"], ""))
        .await
        .unwrap();
    let v1 = web.next().await;
    let names: Vec<&str> = v1.documents.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&"mesh.yaml#2"), "{names:?}"); // Service checkout
    assert!(!names.contains(&"mesh.yaml#5"), "{names:?}"); // Service catalog
    assert_eq!(v1.version.len(), 16);
    web.send(Kind::Ack(Ack {
        version: v1.version.clone(),
    }))
    .await;
    let s = wait_for(admin_addr, |s| s.len() == 1 && s[0].state == "synced").await;
    assert_eq!(s[0].workload, "web-1");
    assert_eq!(s[0].applied_version, v1.version);
    assert_eq!(s[0].calls, vec!["shop/checkout".to_string()]);
    assert!(s[0].last_ack_unix_ms.is_some());
    assert_eq!(s[0].zone, "z1");

    // A sidecar that only calls catalog, already serving its version: no push.
    let mut catalog = Sidecar::connect(grpc_addr, hello("cat-1", &["shop/catalog"], ""))
        .await
        .unwrap();
    let c1 = catalog.next().await;
    drop(catalog);
    let mut catalog = Sidecar::connect(grpc_addr, hello("cat-2", &["shop/catalog"], &c1.version))
        .await
        .unwrap();

    // Edit checkout's split: web gets a new push, catalog nothing.
    write_atomic(&file, &MESH.replace("weight: 90", "weight: 70"));
    let v2 = web.next().await;
    assert_ne!(v2.version, v1.version);
    assert!(v2.documents.iter().any(|d| d.yaml.contains("weight: 70")));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), catalog.pushes.message())
            .await
            .is_err(),
        "catalog's scope did not change"
    );
    web.send(Kind::Nack(Nack {
        version: v2.version.clone(),
        reason: "spec.rules[0]: no thanks\nsecond line".into(),
    }))
    .await;
    let s = wait_for(admin_addr, |s| {
        s.iter()
            .any(|s| s.workload == "web-1" && s.state == "nacked")
    })
    .await;
    let w = s.iter().find(|s| s.workload == "web-1").unwrap();
    assert_eq!(w.applied_version, v1.version);
    assert_eq!(w.pushed_version, v2.version);
    let nack = w.last_nack.as_ref().unwrap();
    assert_eq!(nack.version, v2.version);
    assert!(nack.reason.starts_with("spec.rules[0]: no thanks"));
    let c = s.iter().find(|s| s.workload == "cat-2").unwrap();
    assert_eq!(c.state, "synced");

    // An invalid edit is refused: nothing is pushed; the next valid one is.
    write_atomic(
        &file,
        &MESH.replace("name: checkout-v1, port", "name: nope, port"),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(400), web.pushes.message())
            .await
            .is_err()
    );
    write_atomic(&file, &MESH.replace("weight: 90", "weight: 60"));
    let v3 = web.next().await;
    assert!(v3.documents.iter().any(|d| d.yaml.contains("weight: 60")));
    web.send(Kind::Ack(Ack {
        version: v3.version.clone(),
    }))
    .await;
    wait_for(admin_addr, |s| {
        s.iter().any(|s| {
            s.workload == "web-1" && s.state == "synced" && s.applied_version == v3.version
        })
    })
    .await;

    let (_, metrics) = http_get(admin_addr, "/metrics").await;
    for want in [
        "tern_control_sidecars_connected 2",
        "tern_control_acks_total 2",
        "tern_control_nacks_total 1",
        "tern_control_change_to_ack_seconds_count 1",
        "tern_control_config_reloads_total{result=\"error\"}",
    ] {
        assert!(metrics.contains(want), "{want} not in:\n{metrics}");
    }

    // Disconnected sidecars leave /sidecars.
    drop(web);
    wait_for(admin_addr, |s| s.len() == 1).await;

    shutdown.cancel();
    tokio::time::timeout(WAIT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_are_admitted_at_a_bounded_rate() {
    let dir = temp_dir("admit");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let settings = Settings {
        debounce: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
        admit_rate: 2,
        ..Settings::default()
    };
    let Running {
        grpc: grpc_addr,
        admin: admin_addr,
        shutdown,
        server,
    } = start(&dir, settings).await;
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..5 {
        match Sidecar::connect(grpc_addr, hello(&format!("s-{i}"), &[], "")).await {
            Ok(s) => admitted.push(s),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                refused += 1;
            }
        }
    }
    assert_eq!((admitted.len(), refused), (2, 3));
    // Everything in the mesh: calls is empty.
    let push = admitted[0].next().await;
    assert_eq!(push.documents.len(), MESH.matches("\n---").count() + 1);
    let (_, metrics) = http_get(admin_addr, "/metrics").await;
    assert!(
        metrics.contains("tern_control_streams_rejected_total 3"),
        "{metrics}"
    );
    // The bucket refills: a later attempt is admitted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        Sidecar::connect(grpc_addr, hello("late", &[], ""))
            .await
            .is_ok()
    );
    shutdown.cancel();
    tokio::time::timeout(WAIT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Many sidecars at once: every one gets its push, and a change reaches every sidecar
/// that calls the changed Service. Run with
/// `cargo test -p tern-control --release --test stream -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn many_sidecars() {
    const SIDECARS: usize = 2000;
    let dir = temp_dir("many");
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, MESH).unwrap();
    let settings = Settings {
        admit_rate: 100_000,
        ..Settings::default()
    };
    let Running {
        grpc: grpc_addr,
        admin: admin_addr,
        shutdown,
        server,
    } = start(&dir, settings).await;
    // 20 connections, 100 streams each.
    let mut channels = Vec::new();
    for _ in 0..20 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let start = std::time::Instant::now();
    for i in 0..SIDECARS {
        let mut client = ControlPlaneClient::new(channels[i % channels.len()].clone());
        let calls = if i % 2 == 0 {
            "shop/checkout"
        } else {
            "shop/catalog"
        };
        let done = done_tx.clone();
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(4);
            tx.send(SidecarMessage {
                kind: Some(Kind::Hello(hello(&format!("s-{i}"), &[calls], ""))),
            })
            .await
            .unwrap();
            let mut pushes = client
                .stream(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            while let Ok(Some(push)) = pushes.message().await {
                tx.send(SidecarMessage {
                    kind: Some(Kind::Ack(Ack {
                        version: push.version.clone(),
                    })),
                })
                .await
                .unwrap();
                let _ = done.send((i, std::time::Instant::now()));
            }
        });
    }
    for _ in 0..SIDECARS {
        done_rx.recv().await.unwrap();
    }
    println!(
        "{SIDECARS} sidecars connected and pushed in {:?}",
        start.elapsed()
    );
    wait_for(admin_addr, |s| {
        s.len() == SIDECARS && s.iter().all(|s| s.state == "synced")
    })
    .await;
    let written = std::time::Instant::now();
    write_atomic(&file, &MESH.replace("weight: 90", "weight: 50"));
    let mut last = written;
    for _ in 0..SIDECARS / 2 {
        let (i, at) = done_rx.recv().await.unwrap();
        assert_eq!(i % 2, 0, "only checkout callers get the change");
        last = last.max(at);
    }
    println!(
        "the change reached all {} checkout callers {:?} after the write",
        SIDECARS / 2,
        last - written
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(done_rx.try_recv().is_err(), "catalog callers got nothing");
    let (_, metrics) = http_get(admin_addr, "/metrics").await;
    for l in metrics
        .lines()
        .filter(|l| l.contains("change_to_ack_seconds") && !l.starts_with('#'))
    {
        println!("{l}");
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(WAIT, server).await;
    let _ = std::fs::remove_dir_all(&dir);
}
