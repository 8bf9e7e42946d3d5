//! Active and passive health checks over real sockets: servers leave and rejoin rotation,
//! and a dead server is routed around without the client noticing.
//!
//! The harness probes every 200 ms with a 150 ms timeout and thresholds of 2 (SPEC default).

mod common;

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use common::*;

/// Is the server at `url` in rotation, as the admin API reports it?
async fn healthy(lb: &roundabout::Running, url: &str) -> Option<bool> {
    let admin = lb.admin_addr.expect("the harness starts the admin API");
    let servers: Vec<serde_json::Value> = client()
        .get(format!("http://{admin}/servers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    servers
        .iter()
        .find(|s| s["url"] == url)
        .and_then(|s| s["healthy"].as_bool())
}

/// Waits up to `secs` seconds for the server at `url` to be reported `want`; fails if not.
async fn wait_health(lb: &roundabout::Running, url: &str, want: bool, secs: u64) {
    let seen = eventually(Duration::from_secs(secs), async || {
        healthy(lb, url).await == Some(want)
    })
    .await;
    assert!(seen, "{url} never became healthy = {want}");
}

/// A server that accepts connections and never answers.
fn hanging_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    format!("http://{addr}")
}

#[actix_rt::test]
async fn a_failing_health_check_takes_a_server_out_and_passing_ones_bring_it_back() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(&urls(&[&a, &b]), "");
    let url = format!("http://{}/", lb.proxy_addr);
    // Workers register with the health registry as they start.
    wait_health(&lb, &a.url(), true, 3).await;

    a.set_health(500);
    let started = Instant::now();
    wait_health(&lb, &a.url(), false, 3).await;
    // interval × (unhealthy_threshold + 1), with slack for a busy machine.
    assert!(
        started.elapsed() < Duration::from_millis(600 + 600),
        "{:?}",
        started.elapsed()
    );
    let before = a.hits();
    for _ in 0..10 {
        assert_eq!(get(&url).await, (200, "b".to_string()));
    }
    assert_eq!(a.hits(), before, "an unhealthy server got traffic");

    a.set_health(200);
    wait_health(&lb, &a.url(), true, 3).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(get(&url).await.1);
    }
    assert!(names.contains(&"a".to_string()), "{names:?}");
}

#[actix_rt::test]
async fn a_stopped_backend_is_taken_out_and_comes_back_when_started_again() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(&urls(&[&a, &b]), "");
    let port = a.addr.port();
    a.stop().await;
    wait_health(&lb, &a.url(), false, 3).await;

    let again = Backend::start_on("a-again", port);
    wait_health(&lb, &again.url(), true, 3).await;
    let url = format!("http://{}/", lb.proxy_addr);
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(get(&url).await.1);
    }
    assert!(names.contains(&"a-again".to_string()), "{names:?}");
}

#[actix_rt::test]
async fn a_hung_server_fails_by_timeout_while_the_other_checks_go_on() {
    let a = Backend::start("a");
    let hung = hanging_server();
    let lb = balancer(&[hung.clone(), a.url()], "");
    wait_health(&lb, &hung, false, 3).await;
    // The hung server's probes never delay the others': a's change is seen just as fast.
    a.set_health(503);
    let started = Instant::now();
    wait_health(&lb, &a.url(), false, 3).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    a.set_health(200);
    wait_health(&lb, &a.url(), true, 3).await;
    assert_eq!(healthy(&lb, &hung).await, Some(false));
}

#[actix_rt::test]
async fn with_every_server_down_the_answer_is_503_and_one_back_brings_200() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(&urls(&[&a, &b]), "[health_check]\npath = \"/health\"\ninterval = \"1500ms\"\ntimeout = \"150ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n");
    a.set_health(500);
    b.set_health(500);
    assert!(
        eventually(Duration::from_secs(5), async || {
            healthy(&lb, &a.url()).await == Some(false)
                && healthy(&lb, &b.url()).await == Some(false)
        })
        .await
    );
    let mut res = client()
        .get(format!("http://{}/", lb.proxy_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    // The health interval in whole seconds, rounded up.
    assert_eq!(res.headers().get("retry-after").unwrap(), "2");
    assert!(!res.body().await.unwrap().is_empty());

    b.set_health(200);
    wait_health(&lb, &b.url(), true, 5).await;
    assert_eq!(
        get(&format!("http://{}/", lb.proxy_addr)).await,
        (200, "b".to_string())
    );
}

#[actix_rt::test]
async fn a_backend_stopped_mid_stream_cuts_only_its_own_bodies_and_costs_other_requests_nothing() {
    use futures_util::StreamExt as _;
    let (a, b, c) = Backend::abc();
    let lb = balancer(&urls(&[&a, &b, &c]), "");
    let url = format!("http://{}/", lb.proxy_addr);
    // One long download on each backend (round robin, one worker), 25 chunks over 5 s.
    let mut downloads = Vec::new();
    for _ in 0..3 {
        let res = client().get(format!("{url}drip/25")).send().await.unwrap();
        let name = res
            .headers()
            .get("x-backend")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        downloads.push(actix_rt::spawn(async move {
            let mut res = res;
            let mut n = 0;
            while let Some(chunk) = res.next().await {
                match chunk {
                    Ok(bytes) => n += bytes.len(),
                    Err(_) => return (name, n, false),
                }
            }
            (name, n, true)
        }));
    }
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    b.stop().await;

    let mut errors = Vec::new();
    for i in 0..200 {
        let (status, body) = get(&url).await;
        if status != 200 {
            errors.push((i, status, body));
        }
        actix_rt::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(errors.is_empty(), "client saw errors: {errors:?}");
    assert_eq!(healthy(&lb, &b.url()).await, Some(false));
    for download in downloads {
        let (name, bytes, whole) = download.await.unwrap();
        if name == "b" {
            assert!(
                !whole,
                "b's body was cut, and it must not look whole ({bytes} bytes)"
            );
            assert!(bytes < 25 * 5, "{bytes}");
        } else {
            assert!(
                whole && bytes == 25 * 5,
                "{name}: {bytes} bytes, whole: {whole}"
            );
        }
    }
}

#[actix_rt::test]
async fn a_refused_connection_counts_as_a_failed_check_at_once() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    // Probes so rare that only passive reports can take b out in this test.
    let lb = balancer(
        &urls(&[&a, &b]),
        "[health_check]\npath = \"/health\"\ninterval = \"1h\"\nunhealthy_threshold = 2\n",
    );
    b.stop().await;
    let url = format!("http://{}/", lb.proxy_addr);
    for _ in 0..6 {
        assert_eq!(get(&url).await, (200, "a".to_string()));
    }
    wait_health(&lb, &b.url(), false, 1).await;
}
