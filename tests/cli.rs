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
    assert!(String::from_utf8_lossy(&out.stderr).contains("ROUNDABOUT__RATE_LIMIT__WINDOW: "));
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
fn a_port_in_use_exits_1_saying_which_key_or_variable_moves_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = config_file(&format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"\"\n[rate_limit]\nenabled = false\n"
    ));
    let path = file.path().to_str().unwrap();
    let out = run(&["--config", path], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // roundabout: listen.address 127.0.0.1:P: Address already in use (os error 98); another
    // process holds it: stop it, or move roundabout with listen.address in FILE or
    // ROUNDABOUT__LISTEN__ADDRESS=127.0.0.1:Q
    let line = err.lines().last().unwrap();
    assert!(
        line.starts_with(&format!("roundabout: listen.address 127.0.0.1:{port}: ")),
        "{err}"
    );
    assert!(
        line.contains(&format!(
            "; another process holds it: stop it, or move roundabout with listen.address in \
             {path} or ROUNDABOUT__LISTEN__ADDRESS=127.0.0.1:"
        )),
        "{err}"
    );
    // The port it suggests was free.
    let suggested: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(suggested, port);
}

#[actix_rt::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let a = Backend::start("a");
    let mut p = Binary::in_front_of(&a, "[log]\nlevel = \"warn\"\n").await;
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
    let p = Binary::in_front_of(&a, "[log]\nlevel = \"warn\"\n").await;

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
    let dead_server = dead_url();
    let dead_redis = dead_url().replace("http://", "redis://");
    let port = free_port();
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [\"{}\", \"{dead_server}\"]\n\
             [health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
             [rate_limit]\nredis_url = \"{dead_redis}\"\n[admin]\naddress = \"\"\n\
             [log]\naccess_log = false\n",
            a.url()
        ),
    )
    .await;
    let url = p.url("/");
    for _ in 0..20 {
        assert_eq!(get(&url).await, (200, "a".to_string()));
    }
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let text = p.log();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    let dead_label = dead_server.trim_start_matches("http://");
    assert_eq!(count(&format!("{dead_label} down")), 1, "{text}");
    assert_eq!(count("rate limit store unreachable"), 1, "{text}");
    // Every request is still served and limited (in-process): a warning, saying what to do.
    let redis = text
        .lines()
        .find(|l| l.contains("rate limit store unreachable"))
        .unwrap();
    assert!(redis.contains(" WARN "), "{redis}");
    assert!(
        redis.ends_with(
            "start Redis there, or set rate_limit.redis_url = \"\" to count in-process (one \
             instance only)"
        ),
        "{redis}"
    );
    assert_eq!(
        text.lines().count(),
        count("INFO") + 2,
        "nothing else was warned: {text}"
    );
}

#[test]
fn config_errors_speak_the_config_s_words_on_one_line() {
    let cases = [
        (
            "[balancer]\nstrategy = \"roundrobin\"\n",
            "balancer.strategy: \"roundrobin\" is not one of round_robin, weighted_round_robin, \
             least_requests, power_of_two",
        ),
        (
            "[health_check]\ninterval = 2\n",
            "health_check.interval: expected a duration such as \"2s\", found the number 2",
        ),
        (
            "[rate_limit]\non_store_error = \"Allow\"\n",
            "rate_limit.on_store_error: \"Allow\" is not one of ",
        ),
    ];
    for (text, want) in cases {
        let file = config_file(text);
        let path = file.path().to_str().unwrap();
        let out = run(&["--config", path, "--check"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with(&format!(
                "roundabout: invalid configuration: {path}: {want}"
            )),
            "{text:?} gave {err:?}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        for rust in ["for key", "enum ", "variant", "Strategy", "OnStoreError"] {
            assert!(!err.contains(rust), "{rust:?} in {err:?}");
        }
    }
}

#[test]
fn an_error_from_an_environment_override_names_the_variable_not_the_file() {
    let cases = [
        (
            "ROUNDABOUT__RATE_LIMIT__WINDOW",
            "0s",
            "ROUNDABOUT__RATE_LIMIT__WINDOW: must be greater than zero",
        ),
        (
            "ROUNDABOUT__HEALTH_CHECK__INTERVAL",
            "2",
            "ROUNDABOUT__HEALTH_CHECK__INTERVAL: expected a duration such as \"2s\"",
        ),
        (
            "ROUNDABOUT__BALANCER__STRATEGY",
            "fastest",
            "ROUNDABOUT__BALANCER__STRATEGY: \"fastest\" is not one of round_robin,",
        ),
        // The token is missing, but the address is what asks for one.
        (
            "ROUNDABOUT__ADMIN__ADDRESS",
            "0.0.0.0:28001",
            "ROUNDABOUT__ADMIN__ADDRESS: 0.0.0.0:28001 is not a loopback address, so admin.token \
             must be set too",
        ),
    ];
    for (var, value, want) in cases {
        let out = run(
            &["--config", "config/default.toml", "--check"],
            &[(var, value)],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with(&format!("roundabout: invalid configuration: {want}")),
            "{var}={value} gave {err:?}"
        );
        assert!(!err.contains("default.toml"), "blames the file: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    }
}

#[actix_rt::test]
async fn no_servers_starts_with_one_warning_and_actix_start_lines_stay_below_info() {
    let (port, admin) = (free_port(), free_port());
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = []\n[rate_limit]\nenabled = false\n\
             [admin]\naddress = \"127.0.0.1:{admin}\"\n"
        ),
    )
    .await;
    p.wait_log("listening on", 1).await;
    assert_eq!(get(&p.url("/")).await.0, 503);
    let text = p.log();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains(&format!(
            "every request gets 503 until servers are added through the admin API \
             (POST http://127.0.0.1:{admin}/servers)"
        )),
        "{text}"
    );
    for actix in [
        "starting 1 workers",
        "Actix runtime found",
        "starting service",
    ] {
        assert!(!text.contains(actix), "{actix:?} at info: {text}");
    }
}

#[test]
fn rust_log_still_shows_actix_s_start_lines() {
    let port = free_port();
    let file = config_file(&format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
         [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n"
    ));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", file.path().to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(log.path()).unwrap();
        if text.contains("listening on") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("starting 1 workers"), "{text}");
}

#[actix_rt::test]
async fn health_changes_are_logged_in_words_that_say_the_count_was_met() {
    let a = Backend::start("a");
    let d = Backend::start("d");
    let (port, admin) = (free_port(), free_port());
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [\"{}\"]\n\
             [health_check]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\
             [log]\naccess_log = false\n",
            a.url()
        ),
    )
    .await;
    // One server, in the singular.
    p.wait_log("listening on", 1).await;
    assert!(p.log().contains(" (1 server, round_robin)"), "{}", p.log());
    let added = client()
        .post(format!("http://127.0.0.1:{admin}/servers"))
        .send_json(&serde_json::json!({ "url": d.url() }))
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    p.wait_log(
        &format!("{} up: status 200 (first check passed)", d.addr),
        1,
    )
    .await;

    a.health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    p.wait_log(
        &format!("{} down: status 500 (2/2 checks failed)", a.addr),
        1,
    )
    .await;
    a.health_status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    p.wait_log(&format!("{} up: status 200 (2/2 checks passed)", a.addr), 1)
        .await;
}

#[test]
fn check_does_not_print_secrets() {
    let out = run(
        &["--config", "config/default.toml", "--check"],
        &[
            ("ROUNDABOUT__ADMIN__TOKEN", "s3cret-token"),
            (
                "ROUNDABOUT__RATE_LIMIT__REDIS_URL",
                "redis://:hunter2@10.0.0.5:6379",
            ),
        ],
    );
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !printed.contains("s3cret-token") && !printed.contains("hunter2"),
        "{printed}"
    );
    assert!(printed.contains("redis://:***@10.0.0.5:6379"), "{printed}");
}
