//! Redis killed and restarted under the limiter: the local fallback (the default), the
//! breaker that keeps a dead Redis from costing time per request, the recovery, and what
//! is logged.

use std::time::{Duration, Instant};

use super::*;

const TRUSTING: &str = "trusted_proxies = [\"127.0.0.1\"]";

/// The value of `name` in the balancer's `/metrics`.
async fn metric(lb: &roundabout::Running, name: &str) -> u64 {
    let (status, text) = get(&format!("http://{}/metrics", lb.admin_addr.unwrap())).await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Polls with a new client each time until Redis holds a key for one: the limiter counts
/// in Redis again. Returns how long that took.
async fn counted_in_redis_again(client: &awc::Client, addr: SocketAddr, redis: &Redis) -> Duration {
    let back = Instant::now();
    let mut i = 0u32;
    let counted = eventually(Duration::from_secs(3), async || {
        i += 1;
        let ip = format!("198.51.{}.{}", i / 250, i % 250 + 1);
        hit(client, addr, Some(&ip)).await;
        keys(redis).contains(&format!("{PREFIX}:{ip}"))
    })
    .await;
    assert!(counted, "Redis counts again once it is back");
    back.elapsed()
}

#[actix_rt::test]
async fn with_redis_down_the_default_counts_in_process_with_the_usual_headers() {
    let redis = Redis::start();
    let a = Backend::start("a");
    // No on_store_error: the default is "local".
    let lb = balancer(&[a.url()], &limiter(&redis.url(), "10s", TRUSTING));
    let client = client();
    let me = Some("203.0.113.1");
    assert_eq!(metric(&lb, "roundabout_rate_limit_fallback_total").await, 0);
    assert_eq!(hit(&client, lb.proxy_addr, me).await.remaining(), 4);

    redis.stop();
    let answers = hits(&client, lb.proxy_addr, me, 7).await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429, 429]);
    // The fallback keeps its own counts, apart from Redis's: a fresh window.
    assert_eq!(remainings(&answers), [4, 3, 2, 1, 0, 0, 0]);
    for answer in &answers {
        assert_eq!(answer.number("x-ratelimit-limit"), 5);
        assert!((1..=10).contains(&answer.number("x-ratelimit-reset")));
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"default\";q=5;w=10")
        );
    }
    assert!(answers[5].number("retry-after") >= 1);
    assert_eq!(
        a.hits(),
        6,
        "the refused requests never reached the backend"
    );
    // Six checks answered by the fallback; the seventh was refused by the worker's block.
    assert_eq!(metric(&lb, "roundabout_rate_limit_fallback_total").await, 6);

    redis.restart();
    let took = counted_in_redis_again(&client, lb.proxy_addr, &redis).await;
    assert!(
        took < Duration::from_secs(1),
        "back in Redis after {took:?}"
    );
}

#[actix_rt::test]
async fn with_the_breaker_open_requests_do_not_wait_on_the_dead_store() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let client = client();
    for (policy, want) in [("local", 200), ("allow", 200), ("deny", 503)] {
        let more = format!("on_store_error = \"{policy}\"\n{TRUSTING}");
        let lb = balancer(&[a.url()], &limiter(&redis.url(), "60s", &more));
        assert_eq!(hit(&client, lb.proxy_addr, None).await.status, 200);

        redis.stop();
        // A new client each time, so that every request needs a check.
        let started = Instant::now();
        for i in 0..200u32 {
            let ip = format!("192.0.2.{}", i + 1);
            let answer = hit(&client, lb.proxy_addr, Some(&ip)).await;
            assert_eq!(answer.status, want, "{policy}: {}", answer.body);
            assert_eq!(answer.has_no_limit_headers(), policy != "local", "{policy}");
        }
        // At the store's 50 ms bound each, this would take 10 s; a functional check, not
        // a benchmark, hence the slack.
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{policy}: 200 requests in {took:?}"
        );

        redis.restart();
        let took = counted_in_redis_again(&client, lb.proxy_addr, &redis).await;
        assert!(
            took < Duration::from_secs(1),
            "{policy}: back after {took:?}"
        );
    }
}

#[actix_rt::test]
async fn an_outage_is_logged_once_when_it_starts_and_once_when_it_ends() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let port = free_port();
    let p = Binary::start(
        port,
        &config_text(
            &[a.url()],
            &format!(
                "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 2\n[admin]\naddress = \"\"\n\
                 {}",
                limiter(&redis.url(), "10s", TRUSTING)
            ),
        ),
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = client();
    assert_eq!(hit(&client, addr, None).await.remaining(), 4);

    redis.stop();
    for i in 0..50u32 {
        let ip = format!("192.0.2.{}", i + 1);
        assert_eq!(hit(&client, addr, Some(&ip)).await.remaining(), 4);
    }
    redis.restart();
    counted_in_redis_again(&client, addr, &redis).await;
    for i in 0..50u32 {
        let ip = format!("192.0.2.{}", i + 1);
        assert_eq!(hit(&client, addr, Some(&ip)).await.status, 200);
    }
    let text = p.log();
    let lines =
        |needle: &str| -> Vec<&str> { text.lines().filter(|l| l.contains(needle)).collect() };
    let store = format!("redis://127.0.0.1:{} (shared)", redis.port);
    let started = lines(&format!("listening on {addr}"));
    assert_eq!(started.len(), 1, "{text}");
    assert!(
        started[0].contains(&format!(
            "rate limit 5/10s, store {store}, on_store_error = \"local\""
        )),
        "{}",
        started[0]
    );
    let down = lines("rate limit store unreachable");
    assert_eq!(down.len(), 1, "{text}");
    assert!(down[0].contains(&store), "{}", down[0]);
    assert!(
        down[0].contains("on_store_error = \"local\""),
        "{}",
        down[0]
    );
    let up = lines("rate limit store reachable again");
    assert_eq!(up.len(), 1, "{text}");
    assert!(up[0].contains(&store), "{}", up[0]);
}

#[actix_rt::test]
async fn after_an_outage_every_worker_counts_in_redis_again_from_its_first_check() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 3\n\n{}",
        limiter(&redis.url(), "10s", TRUSTING)
    );
    let lb = balancer(&[a.url()], &extra);
    let client = client();
    // Every worker has used its connection before Redis goes away.
    futures_util::future::join_all((0..30).map(|_| hit(&client, lb.proxy_addr, None))).await;

    redis.stop();
    futures_util::future::join_all((0..30).map(|_| hit(&client, lb.proxy_addr, None))).await;
    redis.restart();
    counted_in_redis_again(&client, lb.proxy_addr, &redis).await;
    let errors = metric(&lb, "roundabout_rate_limit_store_errors_total").await;

    // Once the breaker has closed, no worker's first check may fail on a connection that
    // died with the old Redis: each new client is counted in Redis, none in the fallback.
    let fallback = metric(&lb, "roundabout_rate_limit_fallback_total").await;
    let ips: Vec<String> = (1..=60).map(|i| format!("198.18.0.{i}")).collect();
    futures_util::future::join_all(ips.iter().map(|ip| hit(&client, lb.proxy_addr, Some(ip))))
        .await;
    let stored = keys(&redis);
    let missing: Vec<&String> = ips
        .iter()
        .filter(|ip| !stored.contains(&format!("{PREFIX}:{ip}")))
        .collect();
    assert!(missing.is_empty(), "not counted in Redis: {missing:?}");
    assert_eq!(
        metric(&lb, "roundabout_rate_limit_fallback_total").await,
        fallback
    );
    assert_eq!(
        metric(&lb, "roundabout_rate_limit_store_errors_total").await,
        errors,
        "no check failed after the recovery"
    );
}
