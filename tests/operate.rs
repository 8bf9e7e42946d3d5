//! Operating the built binary as nginx is operated: SIGHUP reloads the config file (servers
//! diffed, live keys applied, restart-only keys logged, a bad file refused), SIGUSR1 does
//! not end the process, and servers that come and go through the admin API leave nothing
//! behind in `/metrics` or in memory.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// A config for the binary: one worker, fast checks, admin on `admin`; `servers` and
/// `extra` (more sections) as given.
fn config(port: u16, admin: u16, servers: &str, extra: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
         [balancer]\nstrategy = \"weighted_round_robin\"\nservers = [{servers}]\n\
         [health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\n\
         [log]\naccess_log = false\n{extra}"
    )
}

fn no_limiter() -> &'static str {
    "[rate_limit]\nenabled = false\n"
}

async fn servers(admin: u16) -> Vec<Value> {
    let mut res = client()
        .get(format!("http://127.0.0.1:{admin}/servers"))
        .send()
        .await
        .unwrap();
    serde_json::from_slice(&res.body().await.unwrap()).unwrap()
}

fn weight_of(list: &[Value], url: &str) -> Option<u64> {
    list.iter()
        .find(|s| s["url"] == url)
        .map(|s| s["weight"].as_u64().unwrap())
}

#[actix_rt::test]
async fn sighup_adds_removes_and_reweighs_file_servers_under_traffic_and_keeps_admin_ones() {
    let (a, b, c) = Backend::abc();
    let d = Backend::start("d");
    let (port, admin) = (free_port(), free_port());
    let lb = Binary::start(
        port,
        &config(
            port,
            admin,
            &format!("\"{}\", \"{}\"", a.url(), b.url()),
            no_limiter(),
        ),
    )
    .await;
    let added = client()
        .post(format!("http://127.0.0.1:{admin}/servers"))
        .send_json(&serde_json::json!({ "url": d.url() }))
        .await
        .unwrap();
    assert_eq!(added.status(), 201);

    // Traffic all along: every answer must be a backend's 200.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), lb.url("/"));
        actix_rt::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                statuses.push(get(&url).await.0);
            }
            statuses
        })
    };
    actix_rt::time::sleep(Duration::from_millis(300)).await;

    lb.rewrite_config(&config(
        port,
        admin,
        &format!("{{ url = \"{}\", weight = 3 }}, \"{}\"", b.url(), c.url()),
        no_limiter(),
    ));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    let list = servers(admin).await;
    assert_eq!(weight_of(&list, &b.url()), Some(3), "{list:?}");
    assert_eq!(weight_of(&list, &c.url()), Some(1), "{list:?}");
    assert_eq!(
        weight_of(&list, &d.url()),
        Some(1),
        "admin-added kept: {list:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), async || weight_of(
            &servers(admin).await,
            &a.url()
        )
        .is_none())
        .await,
        "a drained and went"
    );

    let a_before = a.hits();
    let (b0, c0) = (b.hits(), c.hits());
    actix_rt::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = traffic.await.unwrap();
    assert!(statuses.len() > 50, "{} requests", statuses.len());
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(a.hits(), a_before, "a gets nothing after the reload");
    let (db, dc) = (b.hits() - b0, c.hits() - c0);
    assert!(
        dc > 0 && db >= 2 * dc,
        "b (weight 3) {db} vs c (weight 1) {dc}"
    );
    let log = lb.log();
    assert!(log.contains(&format!("added {}", c.addr)), "{log}");
    assert!(
        log.contains(&format!("removed {} (draining)", a.addr)),
        "{log}"
    );
    assert!(log.contains(&format!("new weight for {}", b.addr)), "{log}");
    assert!(
        log.contains(&format!("{} added (weight 1) by 127.0.0.1:", d.addr)),
        "an admin change names its caller: {log}"
    );
}

/// Three requests' statuses and the last one's `X-RateLimit-Limit`.
async fn three(url: &str) -> (Vec<u16>, String) {
    let mut statuses = Vec::new();
    let mut limit = String::new();
    for _ in 0..3 {
        let res = client().get(url).send().await.unwrap();
        statuses.push(res.status().as_u16());
        limit = res
            .headers()
            .get("x-ratelimit-limit")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
    }
    (statuses, limit)
}

#[actix_rt::test]
async fn a_reload_applies_a_new_requests_limit() {
    let a = Backend::start("a");
    let (port, admin) = (free_port(), free_port());
    let limiter =
        |n: u32| format!("[rate_limit]\nrequests = {n}\nwindow = \"60s\"\nredis_url = \"\"\n");
    let servers = format!("\"{}\"", a.url());
    let lb = Binary::start(port, &config(port, admin, &servers, &limiter(2))).await;
    assert_eq!(three(&lb.url("/")).await, (vec![200, 200, 429], "2".into()));

    lb.rewrite_config(&config(port, admin, &servers, &limiter(5)));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    // The window goes on: 3 counted so far, 2 more fit under the new limit.
    assert_eq!(three(&lb.url("/")).await, (vec![200, 200, 429], "5".into()));
}

#[actix_rt::test]
async fn a_broken_file_is_refused_on_reload_and_sighups_in_a_row_apply_the_last_file() {
    let (a, b, c) = Backend::abc();
    let (port, admin) = (free_port(), free_port());
    let good = config(port, admin, &format!("\"{}\"", a.url()), no_limiter());
    let lb = Binary::start(port, &good).await;

    lb.rewrite_config(
        &good
            .replace("[proxy]", "")
            .replace("workers = 1", "workers = \"many\""),
    );
    lb.signal(libc::SIGHUP);
    lb.wait_log("reload (SIGHUP) refused: invalid configuration", 1)
        .await;
    let log = lb.log();
    let refused = log.lines().find(|l| l.contains("refused")).unwrap();
    assert!(
        refused.contains("listen.workers"),
        "names the key: {refused}"
    );
    assert!(
        refused.contains(lb.config.path().to_str().unwrap()),
        "{refused}"
    );
    assert_eq!(get(&lb.url("/")).await, (200, "a".into()), "still serving");

    // Two at once: signals that arrive together may be taken as one reload (as nginx
    // does); either way the file's last state is what runs, and nothing is dropped.
    let only =
        |backend: &Backend| config(port, admin, &format!("\"{}\"", backend.url()), no_limiter());
    lb.rewrite_config(&only(&b));
    lb.signal(libc::SIGHUP);
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    assert!(
        eventually(Duration::from_secs(2), async || get(&lb.url("/")).await
            == (200, "b".into()))
        .await
    );
    for _ in 0..5 {
        assert_eq!(get(&lb.url("/")).await, (200, "b".into()));
    }
    let reloads = lb.log().matches("configuration reloaded (SIGHUP)").count();
    lb.rewrite_config(&only(&c));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", reloads + 1)
        .await;
    assert!(
        eventually(Duration::from_secs(2), async || get(&lb.url("/")).await
            == (200, "c".into()))
        .await
    );
}

#[actix_rt::test]
async fn a_restart_only_key_is_logged_and_not_applied() {
    let a = Backend::start("a");
    let (port, admin, other) = (free_port(), free_port(), free_port());
    let text = config(port, admin, &format!("\"{}\"", a.url()), no_limiter());
    let lb = Binary::start(port, &text).await;
    lb.rewrite_config(&text.replace(&format!(":{port}\""), &format!(":{other}\"")));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    assert!(
        lb.log().contains(
            "reload (SIGHUP): listen.address changed; it takes effect at the next restart"
        ),
        "{}",
        lb.log()
    );
    assert_eq!(get(&lb.url("/")).await, (200, "a".into()));
    assert!(std::net::TcpStream::connect(("127.0.0.1", other)).is_err());
}

#[actix_rt::test]
async fn sigusr1_does_not_end_the_process() {
    let a = Backend::start("a");
    let (port, admin) = (free_port(), free_port());
    let mut lb = Binary::start(
        port,
        &config(port, admin, &format!("\"{}\"", a.url()), no_limiter()),
    )
    .await;
    lb.signal(libc::SIGUSR1);
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert!(lb.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(get(&lb.url("/")).await, (200, "a".into()));
}

#[actix_rt::test]
async fn ten_thousand_servers_added_and_removed_leave_metrics_and_memory_as_they_were() {
    let a = Backend::start("a");
    let (port, admin) = (free_port(), free_port());
    let lb = Binary::start(
        port,
        &config(port, admin, &format!("\"{}\"", a.url()), no_limiter()),
    )
    .await;
    let api = format!("http://127.0.0.1:{admin}");
    let metrics = async || {
        let mut res = client().get(format!("{api}/metrics")).send().await.unwrap();
        let body = res.body().limit(64 << 20).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let churn = async |n: u32| {
        let c = client();
        for i in 0..n {
            let server = format!("127.0.0.1:{}", 20_000 + i % 40_000);
            let res = c
                .post(format!("{api}/servers"))
                .send_json(&serde_json::json!({ "url": format!("http://{server}") }))
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            let res = c
                .delete(format!("{api}/servers/{server}"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 204);
        }
    };
    // A first round brings every pool and buffer to its working size; the last server it
    // removed may still have its series for a moment (a probe of it under way).
    churn(1_000).await;
    let only_a = format!("server=\"{}\"", a.addr);
    let settled = async || {
        let text = metrics().await;
        let stray = text
            .lines()
            .any(|l| l.contains("server=\"127.") && !l.contains(&only_a));
        (!stray).then_some(text)
    };
    assert!(eventually(Duration::from_secs(5), async || settled().await.is_some()).await);
    let base_metrics = settled().await.expect("settled");
    let base_rss = lb.rss_kib();
    churn(10_000).await;
    let gone = eventually(Duration::from_secs(5), async || {
        metrics().await.len() == base_metrics.len()
    })
    .await;
    let now = metrics().await;
    let new: Vec<&str> = now
        .lines()
        .filter(|l| !base_metrics.lines().any(|b| b == *l))
        .collect();
    assert!(
        gone,
        "/metrics is {} bytes, was {}; new lines: {new:?}",
        now.len(),
        base_metrics.len()
    );
    let rss = lb.rss_kib();
    assert!(
        rss < base_rss + 4 * 1024,
        "RSS {rss} KiB after 10,000 servers came and went, was {base_rss} KiB"
    );
    assert_eq!(get(&lb.url("/")).await, (200, "a".into()));
}
