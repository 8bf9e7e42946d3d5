//! Socket activation over real sockets: the built binary handed a listening socket of the
//! test's as fd 3 with `LISTEN_PID`/`LISTEN_FDS` serves on it (and binds what it was not
//! handed), refuses to start on a socket that matches no listener, leaves alone variables
//! meant for another process, and tells systemd's notify socket `READY=1` and
//! `STOPPING=1`.

mod common;

use std::{
    io::Write as _,
    net::TcpListener,
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use common::{handover::*, *};

/// A config file: the proxy on `listen`, the admin API on `admin` ("" for none), in front
/// of `backend`.
fn config_file(listen: &str, admin: &str, backend: &Backend) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        "[listen]\naddress = \"{listen}\"\nworkers = 1\n[balancer]\nservers = [\"{}\"]\n\
         [rate_limit]\nenabled = false\n[admin]\naddress = \"{admin}\"\n",
        backend.url()
    )
    .unwrap();
    file
}

#[actix_rt::test]
async fn a_socket_handed_over_as_fd_3_is_served_and_the_rest_is_bound_as_usual() {
    let a = Backend::start("a");
    // The test keeps its own copy open: were the binary to bind this address itself, it
    // would find it taken and exit 1.
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let admin = free_port();
    let config = config_file(&addr.to_string(), &format!("127.0.0.1:{admin}"), &a);
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = spawn_activated(config.path(), &[&socket], &[], stderr.reopen().unwrap());
    let log = || std::fs::read_to_string(stderr.path()).unwrap();

    let served = eventually(Duration::from_secs(10), async || {
        awc::Client::new()
            .get(format!("http://{addr}/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "serves on the socket handed over: {}", log());
    assert_eq!(
        get(&format!("http://{addr}/")).await,
        (200, "a".to_string())
    );
    // admin.address was not handed over: bound as usual.
    let health = get(&format!("http://127.0.0.1:{admin}/healthz")).await;
    assert_eq!(health.0, 200, "{}", log());
    assert!(log().contains(&format!("listening on {addr}")), "{}", log());
    let handed = format!("listen.address: serving on {addr}, the socket handed over as fd 3");
    assert!(log().contains(&handed), "{}", log());

    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = actix_rt::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
}

#[actix_rt::test]
async fn a_socket_that_matches_no_listener_is_a_start_up_error_naming_it() {
    let a = Backend::start("a");
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let handed = socket.local_addr().unwrap();
    let configured = format!("127.0.0.1:{}", free_port());
    let config = config_file(&configured, "", &a);
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = spawn_activated(config.path(), &[&socket], &[], stderr.reopen().unwrap());
    let status = actix_rt::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let err = std::fs::read_to_string(stderr.path()).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let line = err.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {err}");
    for part in [
        "LISTEN_FDS",
        "fd 3",
        &handed.to_string(),
        &format!("listen.address {configured}"),
    ] {
        assert!(line.contains(part), "names {part}: {line}");
    }
}

#[actix_rt::test]
async fn variables_meant_for_another_process_are_left_alone() {
    let a = Backend::start("a");
    let port = free_port();
    let config = config_file(&format!("127.0.0.1:{port}"), "", &a);
    // LISTEN_PID names some other process: fd 3 (not even open here) is not this one's
    // to take, so it binds its own listener rather than refusing to start.
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roundabout"));
    cmd.arg("--config")
        .arg(config.path())
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(stderr.reopen().unwrap());
    let mut child = cmd.spawn().unwrap();
    let served = eventually(Duration::from_secs(10), async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let log = std::fs::read_to_string(stderr.path()).unwrap();
    assert!(served, "{log}");
    assert_eq!(get(&format!("http://127.0.0.1:{port}/")).await.1, "a");
    let _ = child.kill();
    let _ = child.wait();
}

#[actix_rt::test]
async fn it_tells_the_notify_socket_ready_once_it_serves_and_stopping_on_sigterm() {
    let a = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = free_port();
    let p = Binary::start_exe(
        env!("CARGO_BIN_EXE_roundabout").as_ref(),
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n[balancer]\nservers = [\"{}\"]\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n",
            a.url()
        ),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;
    let recv = move || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), notify)
    };
    let (said, notify) = actix_rt::task::spawn_blocking(recv).await.unwrap();
    assert_eq!(said, "READY=1");
    p.signal(libc::SIGTERM);
    let (said, _) = actix_rt::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), ())
    })
    .await
    .unwrap();
    assert_eq!(said, "STOPPING=1", "{}", p.log());
}
