//! The built binary: command line, configuration errors, signals, and constant memory.

mod common;

use std::{
    io::Write as _,
    net::TcpListener,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt as _;

const BIN: &str = env!("CARGO_BIN_EXE_roundabout");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn version_and_help_answer() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("roundabout "));
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--config") && help.contains("--check"),
        "{help}"
    );
}

#[test]
fn check_prints_the_resolved_config_of_the_shipped_file() {
    let out = run(&["--config", "config/default.toml", "--check"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("address = \"127.0.0.1:8000\""), "{text}");
    assert!(text.contains("strategy = \"round_robin\""), "{text}");
}

#[test]
fn an_environment_variable_overrides_the_file() {
    let out = run(
        &["--config", "config/default.toml", "--check"],
        &[
            ("ROUNDABOUT__LISTEN__ADDRESS", "0.0.0.0:8080"),
            ("ROUNDABOUT__RATE_LIMIT__REDIS_URL", "redis://10.0.0.5:6379"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("address = \"0.0.0.0:8080\""), "{text}");
    assert!(
        text.contains("redis_url = \"redis://10.0.0.5:6379\""),
        "{text}"
    );

    let out = run(
        &["--config", "config/default.toml", "--check"],
        &[("ROUNDABOUT__RATE_LIMIT__WINDOW", "0s")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rate_limit.window"));
}

#[test]
fn a_bad_config_exits_1_with_one_line_naming_file_and_key() {
    let cases = [
        ("[listen]\nadress = \"127.0.0.1:1\"\n", "adress"),
        ("[listen]\nworkers = \"two\"\n", "listen.workers"),
        (
            "[balancer]\nservers = [\"not a url\"]\n",
            "balancer.servers[0].url",
        ),
        ("[rate_limit]\nwindow = \"0s\"\n", "rate_limit.window"),
        (
            "[health_check]\ninterval = \"every now and then\"\n",
            "health_check.interval",
        ),
        ("[balancer]\nstrategy = \"fastest\"\n", "balancer.strategy"),
        (
            "[rate_limit]\ntrusted_proxies = [\"10.0.0.0/99\"]\n",
            "rate_limit.trusted_proxies[0]",
        ),
        ("[admin]\naddress = \"0.0.0.0:8001\"\n", "admin.token"),
        ("[listen\naddress = 1\n", ""),
    ];
    for (text, key) in cases {
        let file = config_file(text);
        let path = file.path().to_str().unwrap();
        for extra in [&[][..], &["--check"][..]] {
            let mut args = vec!["--config", path];
            args.extend_from_slice(extra);
            let out = run(&args, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{text:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
            assert!(err.contains(path), "names the file: {err}");
            assert!(err.contains(key), "names {key}: {err}");
            assert!(out.stdout.is_empty());
        }
    }
    let out = run(&["--config", "/nonexistent/roundabout.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/roundabout.toml"));
}

#[test]
fn a_port_in_use_exits_1_naming_the_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = config_file(&format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"\"\n[rate_limit]\nenabled = false\n"
    ));
    let out = run(&["--config", file.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.address"));
}

/// The binary in front of `backend` (one worker, no limiter, no admin), on a free port.
async fn in_front_of(backend: &Backend, log: &str) -> Binary {
    let port = free_port();
    Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [\"{}\"]\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n{log}",
            backend.url()
        ),
    )
    .await
}

#[actix_rt::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let a = Backend::start("a");
    let mut p = in_front_of(&a, "[log]\nlevel = \"warn\"\n").await;
    let slow = p.url("/slow/1500");
    let request = actix_rt::spawn(async move { get(&slow).await });
    actix_rt::time::sleep(Duration::from_millis(400)).await;
    p.signal(libc::SIGTERM);
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .is_err(),
        "still accepting after SIGTERM"
    );
    assert_eq!(request.await.unwrap(), (200, "a".to_string()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[actix_rt::test]
async fn a_1gb_body_passes_both_ways_in_constant_memory() {
    const GB: u64 = 1 << 30;
    let a = Backend::start("a");
    let p = in_front_of(&a, "[log]\nlevel = \"warn\"\n").await;

    let mut res = client()
        .get(p.url(&format!("/bytes/{GB}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut n = 0u64;
    while let Some(chunk) = res.next().await {
        n += chunk.unwrap().len() as u64;
    }
    assert_eq!(n, GB);

    let chunk = actix_web::web::Bytes::from(vec![7u8; 256 * 1024]);
    let chunks = GB / chunk.len() as u64;
    let upload =
        futures_util::stream::iter(0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let mut res = client()
        .post(p.url("/sha256"))
        .timeout(Duration::from_secs(120))
        .send_stream(upload)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.body().await.unwrap();
    assert!(body.starts_with(format!("{GB} ").as_bytes()), "{body:?}");

    let peak = p.peak_rss_kib();
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB while moving 2 GiB");
}

#[actix_rt::test]
async fn a_dead_server_and_a_dead_redis_are_each_logged_once() {
    let a = Backend::start("a");
    let log = tempfile::NamedTempFile::new().unwrap();
    let dead_server = dead_url();
    let dead_redis = dead_url().replace("http://", "redis://");
    let port = free_port();
    let config = config_file(&format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
         [balancer]\nservers = [\"{}\", \"{dead_server}\"]\n\
         [health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
         [rate_limit]\nredis_url = \"{dead_redis}\"\n[admin]\naddress = \"\"\n\
         [log]\naccess_log = false\n",
        a.url()
    ));
    let mut child = Command::new(BIN)
        .args(["--config", config.path().to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    assert!(
        eventually(Duration::from_secs(10), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await
    );
    for _ in 0..20 {
        assert_eq!(get(&url).await, (200, "a".to_string()));
    }
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(log.path()).unwrap();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    let dead_label = dead_server.trim_start_matches("http://");
    assert_eq!(count(&format!("{dead_label} down")), 1, "{text}");
    assert_eq!(count("rate limit store unreachable"), 1, "{text}");
    assert_eq!(
        text.lines().count(),
        count("INFO") + 2,
        "nothing else was warned: {text}"
    );
}
