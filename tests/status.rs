//! The status page over plain HTTP: the HTML shell without a token and without data,
//! `/status.json` behind the token, and what it reports (servers, rates, the limiter).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// `GET` on the admin listener; (status, headers as `name: value` lines, body).
async fn admin_get(
    lb: &roundabout::Running,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let mut req = client().get(format!("http://{}{path}", lb.admin_addr.unwrap()));
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.unwrap();
    let headers = res
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap()))
        .collect();
    let body = res.body().await.unwrap();
    (
        res.status().as_u16(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn status(lb: &roundabout::Running) -> Value {
    let (code, _, body) = admin_get(lb, "/status.json", None).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn server<'a>(report: &'a Value, b: &Backend) -> &'a Value {
    report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["label"] == b.addr.to_string())
        .unwrap_or_else(|| panic!("{} in {report:#}", b.addr))
}

/// Requests of `s` in the span its rate covers.
fn requests(report: &Value, s: &Value) -> f64 {
    s["requests_per_second"].as_f64().unwrap() * report["rates_over_seconds"].as_f64().unwrap()
}

#[actix_rt::test]
async fn the_page_needs_no_token_and_holds_no_data_but_status_json_needs_the_token() {
    let a = Backend::start("a");
    let lb = balancer(
        &[a.url()],
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
    );

    let (code, headers, page) = admin_get(&lb, "/", None).await;
    assert_eq!(code, 200);
    assert!(
        headers.contains("content-type: text/html; charset=utf-8"),
        "{headers}"
    );
    assert!(
        headers.contains("content-security-policy: default-src 'none';"),
        "nothing from elsewhere, and no framing: {headers}"
    );
    assert!(page.contains("<table id=\"servers\">") && page.contains("status.json"));
    assert!(
        !page.contains(&a.addr.port().to_string()),
        "the shell names no server"
    );
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "self-contained"
    );

    for token in [None, Some("wrong")] {
        let (code, headers, body) = admin_get(&lb, "/status.json", token).await;
        assert_eq!(code, 401, "{token:?}");
        assert!(headers.contains("www-authenticate: Bearer"));
        assert!(!body.contains(&a.addr.to_string()));
    }
    let (code, headers, body) = admin_get(&lb, "/status.json", Some("s3cret")).await;
    assert_eq!(code, 200, "{body}");
    assert!(headers.contains("cache-control: no-store"), "{headers}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["servers"][0]["label"], a.addr.to_string());
}

#[actix_rt::test]
async fn status_json_reports_each_servers_state_rates_errors_and_the_limited_requests() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(
        &urls(&[&a, &b, &c]),
        "[rate_limit]\nenabled = true\nrequests = 6\nwindow = \"60s\"\nredis_url = \"\"\n",
    );
    let proxy = format!("http://{}", lb.proxy_addr);

    // Every server checked once, so each has a last check to show.
    assert!(
        eventually(Duration::from_secs(3), async || {
            status(&lb).await["servers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["last_check"]["ok"] == true)
        })
        .await
    );

    // Six allowed (one of them a 500 from the server), then four refused with 429.
    for path in ["/", "/", "/", "/", "/", "/status/500", "/", "/", "/", "/"] {
        get(&format!("{proxy}{path}")).await;
    }
    let report = status(&lb).await;

    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["strategy"], "round_robin");
    assert_eq!(report["health_check"]["unhealthy_threshold"], 2);
    assert!(report["uptime_seconds"].as_f64().unwrap() > 0.0);
    let over = report["rates_over_seconds"].as_f64().unwrap();
    assert!(over > 0.0 && over <= 10.5, "{over}");

    let totals = &report["totals"];
    assert_eq!(totals["requests"], 10);
    assert_eq!(totals["in_flight"], 0);
    let total = totals["requests_per_second"].as_f64().unwrap() * over;
    assert!((total - 10.0).abs() < 1e-6, "{total}");
    assert!((totals["error_rate"].as_f64().unwrap() - 0.1).abs() < 1e-9);

    let mut served = 0.0;
    let mut failed = 0.0;
    for s in [&a, &b, &c].map(|b| server(&report, b)) {
        assert_eq!(s["state"], "up", "{s}");
        assert_eq!(
            (s["healthy"].as_bool(), s["draining"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(s["weight"], 1);
        assert!(s["state_seconds"].as_f64().unwrap() > 0.0);
        let check = &s["last_check"];
        assert_eq!(check["result"], "status 200");
        assert!(check["latency_ms"].as_f64().unwrap() > 0.0);
        assert!(check["seconds_ago"].as_f64().unwrap() < 2.0);
        let n = requests(&report, s);
        served += n;
        failed += s["error_rate"].as_f64().unwrap_or(0.0) * n;
    }
    assert!(
        (served - 6.0).abs() < 1e-6,
        "6 answered by servers: {served}"
    );
    assert!((failed - 1.0).abs() < 1e-6, "one of them a 500: {failed}");

    let rl = &report["rate_limit"];
    assert_eq!(rl["enabled"], true);
    assert_eq!(
        (rl["requests"].as_u64(), rl["window_seconds"].as_u64()),
        (Some(6), Some(60))
    );
    assert_eq!(
        (rl["store"].as_str(), rl["shared"].as_bool()),
        (Some("in-process"), Some(false))
    );
    assert_eq!(rl["store_reachable"], true);
    assert_eq!(rl["limited_last_minute"], 4);
}

#[actix_rt::test]
async fn a_stopped_server_is_down_with_its_failed_check_and_a_drained_one_draining() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(&urls(&[&a, &b]), "");
    // Up a while first, so that a time counted from the start shows.
    actix_rt::time::sleep(Duration::from_millis(1500)).await;

    a.stop().await;
    let down = eventually(Duration::from_secs(3), async || {
        server(&status(&lb).await, &a)["state"] == "down"
    })
    .await;
    assert!(down);
    let report = status(&lb).await;
    let s = server(&report, &a);
    assert_eq!(s["healthy"], false);
    assert_eq!(s["last_check"]["ok"], false);
    assert_eq!(s["last_check"]["result"], "connection refused");
    assert!(
        s["state_seconds"].as_f64().unwrap() < 1.0,
        "counted from the change: {s}"
    );

    // A request in flight on b when it is removed: draining until it ends.
    let proxy = format!("http://{}/slow/1500", lb.proxy_addr);
    let slow = actix_rt::spawn(async move { get(&proxy).await });
    assert!(eventually(Duration::from_secs(2), async || b.hits() == 1).await);
    let removed = client()
        .delete(format!(
            "http://{}/servers/{}",
            lb.admin_addr.unwrap(),
            b.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status().as_u16(), 204);
    let report = status(&lb).await;
    let s = server(&report, &b);
    assert_eq!(
        (s["state"].as_str(), s["in_flight"].as_u64()),
        (Some("draining"), Some(1))
    );
    assert_eq!(s["state_seconds"], Value::Null);
    assert_eq!(report["totals"]["in_flight"], 1);
    slow.await.unwrap();
}

#[actix_rt::test]
async fn the_limiter_is_reported_shared_on_redis_and_unreachable_while_redis_is_down() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = format!(
        "[rate_limit]\nenabled = true\nrequests = 100\nwindow = \"10s\"\n\
         redis_url = \"{}\"\non_store_error = \"allow\"\n",
        redis.url()
    );
    let lb = balancer(&[a.url()], &extra);
    let proxy = format!("http://{}/", lb.proxy_addr);
    assert_eq!(get(&proxy).await.0, 200);

    let rl = status(&lb).await["rate_limit"].clone();
    assert_eq!(
        (rl["store"].as_str(), rl["shared"].as_bool()),
        (Some("redis"), Some(true))
    );
    assert_eq!(rl["store_reachable"], true);

    redis.stop();
    let unreachable = eventually(Duration::from_secs(5), async || {
        get(&proxy).await;
        status(&lb).await["rate_limit"]["store_reachable"] == false
    })
    .await;
    assert!(unreachable, "reported while Redis is down");

    redis.restart();
    let back = eventually(Duration::from_secs(5), async || {
        get(&proxy).await;
        status(&lb).await["rate_limit"]["store_reachable"] == true
    })
    .await;
    assert!(back, "and reachable again once it is back");
}
