//! The tern-control binary as a real process: flags, readiness, `ternctl status` against
//! it, and a clean exit on SIGTERM.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MESH: &str = include_str!("data/mesh.yaml");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn wait_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some((200, _)) = http_get(admin, "/ready") {
            break;
        }
        assert!(Instant::now() < deadline, "tern-control never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn binary_serves_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("tern-control-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern-control"))
        .args(["--config-dir", dir.to_str().unwrap(), "--listen", &listen])
        .env("TERN_CONTROL_ADMIN", &admin)
        .env("TERN_CONTROL_DEBOUNCE", "20ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&admin);
    let (status, body) = http_get(&admin, "/sidecars").unwrap();
    assert_eq!((status, body.trim()), (200, "[]"));
    let (_, metrics) = http_get(&admin, "/metrics").unwrap();
    assert!(
        metrics.contains("tern_control_sidecars_connected 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tern_control_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(["status", "--control-plane", &admin])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("0 sidecars, 0 nacked, 0 stale"), "{text}");
    assert!(text.contains("WORKLOAD"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(["status", "--control-plane", &admin, "--json"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "[]");

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tern-control did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn ternctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ternctl_ca_and_a_tern_control_with_a_ca() {
    let dir = std::env::temp_dir().join(format!("tern-control-ca-proc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/mesh.yaml"), MESH).unwrap();
    let path = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let out = ternctl(&[
        "ca",
        "init",
        "--dir",
        &path("ca"),
        "--issuer-lifetime",
        "30d",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = ternctl(&[
        "ca",
        "token",
        "--tokens",
        &path("tokens.yaml"),
        "--namespace",
        "shop",
        "--service-account",
        "web",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim().len(), 64);

    let control = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tern-control"));
        c.args([
            "--config-dir",
            &path("config"),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(extra)
        .env("TERN_CONTROL_ADMIN", format!("127.0.0.1:{}", free_port()));
        c
    };
    // A CA needs tokens; a CA directory without its files is refused with the reason.
    let out = control(&["--ca-dir", &path("ca")]).output().unwrap();
    assert!(!out.status.success());
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let out = control(&["--ca-dir", &path("empty"), "--tokens", &path("tokens.yaml")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--ca-dir: reading") && err.contains("anchors.pem"),
        "{err}"
    );

    let admin = format!("127.0.0.1:{}", free_port());
    let child = control(&["--ca-dir", &path("ca"), "--tokens", &path("tokens.yaml")])
        .env("TERN_CONTROL_ADMIN", &admin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    wait_ready(&admin);
    let (_, metrics) = http_get(&admin, "/metrics").unwrap();
    assert!(
        metrics.contains("tern_control_ca_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("tern_control_issuer_not_after_seconds 0"),
        "{metrics}"
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kills the child when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
