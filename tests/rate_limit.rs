//! The rate limiter over real sockets, with a real `redis-server`: the budget and its
//! headers, who the client is (IPv6 by prefix), one budget shared by two instances, keys
//! that expire, what a Redis outage answers and the recovery after it (more in `outage`),
//! and the in-process store.

mod common;
#[path = "rate_limit/outage.rs"]
mod outage;

use std::{net::SocketAddr, time::Duration};

use actix_web::http::header::HeaderMap;
use common::*;

const PREFIX: &str = "test:rl";

/// The names of every field the limiter adds.
const LIMIT_HEADERS: [&str; 5] = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
];

/// A `[rate_limit]` section: 5 requests per `window` on `redis_url`, plus `more` lines.
fn limiter(redis_url: &str, window: &str, more: &str) -> String {
    format!(
        "[rate_limit]\nenabled = true\nrequests = 5\nwindow = \"{window}\"\n\
         redis_url = \"{redis_url}\"\nkey_prefix = \"{PREFIX}\"\n{more}\n"
    )
}

/// One answer of the balancer, read whole.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// A header that must be there and be a number.
    fn number(&self, name: &str) -> u64 {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} on a {} answer", self.status));
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {value:?} is not a number"))
    }

    fn remaining(&self) -> u64 {
        self.number("x-ratelimit-remaining")
    }

    fn has_no_limit_headers(&self) -> bool {
        LIMIT_HEADERS.iter().all(|h| self.header(h).is_none())
    }
}

/// GETs `/` on `addr`, claiming to forward for `xff` when given.
async fn hit(client: &awc::Client, addr: SocketAddr, xff: Option<&str>) -> Answer {
    let mut req = client.get(format!("http://{addr}/"));
    if let Some(xff) = xff {
        req = req.insert_header(("x-forwarded-for", xff));
    }
    let mut res = req.send().await.expect("request reaches the balancer");
    let body = res.body().await.expect("body");
    Answer {
        status: res.status().as_u16(),
        headers: res.headers().clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends `n` requests one after another and returns their answers.
async fn hits(client: &awc::Client, addr: SocketAddr, xff: Option<&str>, n: usize) -> Vec<Answer> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(hit(client, addr, xff).await);
    }
    out
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    answers.iter().map(|a| a.status).collect()
}

fn remainings(answers: &[Answer]) -> Vec<u64> {
    answers.iter().map(Answer::remaining).collect()
}

/// The keys under [`PREFIX`] in `redis`, sorted.
fn keys(redis: &Redis) -> Vec<String> {
    let reply = redis
        .command(&["KEYS", &format!("{PREFIX}*")])
        .expect("redis answers KEYS");
    // An array reply: `*N`, then `$len` and the key for each; keep the keys.
    let mut keys: Vec<String> = reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_string)
        .collect();
    keys.sort();
    keys
}

/// A key's time to live in seconds (-1: no expiry, -2: no key).
fn ttl(redis: &Redis, key: &str) -> i64 {
    let reply = redis.command(&["TTL", key]).expect("redis answers TTL");
    reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("TTL {key}: {reply:?}"))
}

#[actix_rt::test]
async fn five_requests_pass_and_the_sixth_is_429() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], &limiter(&redis.url(), "2s", ""));
    let client = client();

    let passed = hits(&client, lb.proxy_addr, None, 5).await;
    assert_eq!(statuses(&passed), [200; 5]);
    assert_eq!(remainings(&passed), [4, 3, 2, 1, 0]);
    for answer in &passed {
        assert_eq!(answer.number("x-ratelimit-limit"), 5);
        let reset = answer.number("x-ratelimit-reset");
        assert!((1..=2).contains(&reset), "X-RateLimit-Reset {reset}");
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"default\";q=5;w=2")
        );
        let expected = format!("\"default\";r={};t={reset}", answer.remaining());
        assert_eq!(answer.header("ratelimit"), Some(expected.as_str()));
    }

    let refused = hit(&client, lb.proxy_addr, None).await;
    assert_eq!(refused.status, 429);
    let retry_after = refused.number("retry-after");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(refused.number("x-ratelimit-reset"), retry_after);
    assert_eq!(refused.remaining(), 0);
    assert_eq!(refused.number("x-ratelimit-limit"), 5);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"default\";q=5;w=2")
    );
    let expected = format!("\"default\";r=0;t={retry_after}");
    assert_eq!(refused.header("ratelimit"), Some(expected.as_str()));
    assert!(
        refused
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        refused.header("content-type")
    );
    assert!(!refused.body.trim().is_empty());
    assert_eq!(a.hits(), 5, "the refused request never reached the backend");

    // Retry-After is honest: once it has passed, the client is served again, in a new window.
    actix_rt::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let again = hit(&client, lb.proxy_addr, None).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.remaining(), 4);
    assert_eq!(a.hits(), 6);
}

#[actix_rt::test]
async fn clients_behind_a_trusted_proxy_have_separate_budgets() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "10s", "trusted_proxies = [\"127.0.0.0/8\"]");
    let lb = balancer(&[a.url()], &extra);
    let client = client();

    let first = hits(&client, lb.proxy_addr, Some("203.0.113.1"), 6).await;
    assert_eq!(statuses(&first), [200, 200, 200, 200, 200, 429]);
    let second = hits(&client, lb.proxy_addr, Some("203.0.113.2"), 6).await;
    assert_eq!(statuses(&second), [200, 200, 200, 200, 200, 429]);
    assert_eq!(remainings(&second), [4, 3, 2, 1, 0, 0]);
    assert_eq!(a.hits(), 10);
    assert_eq!(
        keys(&redis),
        [
            format!("{PREFIX}:203.0.113.1"),
            format!("{PREFIX}:203.0.113.2")
        ]
    );
}

#[actix_rt::test]
async fn ipv6_clients_share_one_budget_per_prefix_in_redis_and_in_the_fallback() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "10s", "trusted_proxies = [\"127.0.0.1\"]");
    let lb = balancer(&[a.url()], &extra);
    let client = client();

    // Six addresses of one /64 (the default prefix), one request each: one budget.
    let one_net = [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2:ffff:ffff:ffff:ffff",
        "2001:db8:1:2:abcd::7",
        "2001:db8:1:2::1",
        "2001:db8:1:2:1:2:3:4",
    ];
    let mut answers = Vec::new();
    for ip in one_net {
        answers.push(hit(&client, lb.proxy_addr, Some(ip)).await);
    }
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429]);
    assert_eq!(remainings(&answers), [4, 3, 2, 1, 0, 0]);
    // The next /64 is another client.
    let other = hit(&client, lb.proxy_addr, Some("2001:db8:1:3::1")).await;
    assert_eq!((other.status, other.remaining()), (200, 4));
    assert_eq!(
        keys(&redis),
        [
            format!("{PREFIX}:2001:db8:1:2::/64"),
            format!("{PREFIX}:2001:db8:1:3::/64")
        ]
    );

    // The local fallback keys them the same way.
    redis.stop();
    let answers = [
        hit(&client, lb.proxy_addr, Some("2001:db8:1:4::1")).await,
        hit(&client, lb.proxy_addr, Some("2001:db8:1:4::2")).await,
        hit(&client, lb.proxy_addr, Some("2001:db8:1:5::2")).await,
    ];
    assert_eq!(remainings(&answers), [4, 3, 4]);
}

#[actix_rt::test]
async fn an_untrusted_peer_shares_one_budget_whatever_it_forwards_for() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], &limiter(&redis.url(), "10s", ""));
    let client = client();

    let mut answers = Vec::new();
    for i in 1..=6 {
        let claimed = format!("203.0.113.{i}");
        answers.push(hit(&client, lb.proxy_addr, Some(&claimed)).await);
    }
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429]);
    assert_eq!(remainings(&answers), [4, 3, 2, 1, 0, 0]);
    assert_eq!(keys(&redis), [format!("{PREFIX}:127.0.0.1")]);
}

#[actix_rt::test]
async fn two_instances_on_one_redis_admit_exactly_the_limit_together() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "10s", "on_store_error = \"deny\"");
    let one = balancer(&[a.url()], &extra);
    let two = balancer(&[a.url()], &extra);
    let client = client();

    let requests = (0..20).map(|i| {
        let addr = if i % 2 == 0 {
            one.proxy_addr
        } else {
            two.proxy_addr
        };
        hit(&client, addr, None)
    });
    let answers = futures_util::future::join_all(requests).await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers.iter().filter(|a| a.status == 429).count();
    assert_eq!(
        (admitted, refused),
        (5, 15),
        "statuses {:?}",
        statuses(&answers)
    );
    assert_eq!(a.hits(), 5);
    let mut admitted_remaining: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(Answer::remaining)
        .collect();
    admitted_remaining.sort();
    assert_eq!(admitted_remaining, [0, 1, 2, 3, 4]);
}

#[actix_rt::test]
async fn every_key_the_limiter_writes_expires() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "30s", "trusted_proxies = [\"127.0.0.0/8\"]");
    let lb = balancer(&[a.url()], &extra);
    let client = client();

    let clients = ["198.51.100.7", "2001:db8::7", "203.0.113.9"];
    for ip in clients {
        // Past the budget too: a refused request must not leave a key behind either.
        hits(&client, lb.proxy_addr, Some(ip), 7).await;
    }
    let mut expected: Vec<String> = ["198.51.100.7", "2001:db8::/64", "203.0.113.9"]
        .iter()
        .map(|ip| format!("{PREFIX}:{ip}"))
        .collect();
    expected.sort();
    let written = keys(&redis);
    assert_eq!(written, expected);
    for key in &written {
        let ttl = ttl(&redis, key);
        assert!((1..=30).contains(&ttl), "{key} has TTL {ttl}");
    }
}

#[actix_rt::test]
async fn with_redis_down_allow_forwards_uncounted_and_limiting_resumes_when_it_is_back() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "10s", "on_store_error = \"allow\"");
    let lb = balancer(&[a.url()], &extra);
    let client = client();
    assert_eq!(hit(&client, lb.proxy_addr, None).await.remaining(), 4);

    redis.stop();
    let answers = hits(&client, lb.proxy_addr, None, 8).await;
    assert_eq!(statuses(&answers), [200; 8], "fails open");
    assert!(answers.iter().all(Answer::has_no_limit_headers));
    assert_eq!(a.hits(), 9);

    // The same port, an empty store: the balancer reconnects by itself.
    redis.restart();
    recovers(&client, lb.proxy_addr).await;
}

#[actix_rt::test]
async fn with_redis_down_deny_answers_503_and_limiting_resumes_when_it_is_back() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = limiter(&redis.url(), "10s", "on_store_error = \"deny\"");
    let lb = balancer(&[a.url()], &extra);
    let client = client();
    assert_eq!(hit(&client, lb.proxy_addr, None).await.remaining(), 4);

    redis.stop();
    let answers = hits(&client, lb.proxy_addr, None, 5).await;
    assert_eq!(statuses(&answers), [503; 5], "fails closed");
    for answer in &answers {
        assert!(answer.has_no_limit_headers());
        assert!(!answer.body.trim().is_empty(), "503 says what happened");
    }
    assert_eq!(a.hits(), 1, "no request passed while the store was down");

    redis.restart();
    recovers(&client, lb.proxy_addr).await;
}

/// After Redis came back empty: requests are counted again from a fresh window, and the
/// budget is enforced (Remaining falls to 0, then 429).
async fn recovers(client: &awc::Client, addr: SocketAddr) {
    let mut first = None;
    let back = eventually(Duration::from_secs(5), async || {
        let answer = hit(client, addr, None).await;
        let counted = answer.header("x-ratelimit-remaining").is_some();
        if counted {
            first = Some(answer);
        }
        counted
    })
    .await;
    assert!(back, "the limiter counts again once Redis is back");
    let first = first.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(
        first.remaining(),
        4,
        "a fresh window on the restarted Redis"
    );
    let rest = hits(client, addr, None, 5).await;
    assert_eq!(statuses(&rest), [200, 200, 200, 200, 429]);
    assert_eq!(remainings(&rest), [3, 2, 1, 0, 0]);
}

#[actix_rt::test]
async fn the_in_process_store_limits_the_same_way() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], &limiter("", "10s", ""));
    let client = client();

    let answers = hits(&client, lb.proxy_addr, None, 7).await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(remainings(&answers), [4, 3, 2, 1, 0, 0, 0]);
    for answer in &answers {
        assert_eq!(answer.number("x-ratelimit-limit"), 5);
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"default\";q=5;w=10")
        );
    }
    assert!(answers[5].number("retry-after") >= 1);
    assert_eq!(a.hits(), 5);
}

#[actix_rt::test]
async fn the_in_process_store_is_one_budget_for_every_worker() {
    let a = Backend::start("a");
    let extra = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 4\n\n{}",
        limiter("", "10s", "")
    );
    let lb = balancer(&[a.url()], &extra);
    let client = client();

    // Concurrent connections, spread over the workers by the acceptor.
    let answers =
        futures_util::future::join_all((0..20).map(|_| hit(&client, lb.proxy_addr, None))).await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 5, "statuses {:?}", statuses(&answers));
    assert_eq!(a.hits(), 5);
}

#[actix_rt::test]
async fn an_ip_over_budget_is_refused_without_asking_redis_until_its_window_ends() {
    let redis = Redis::start();
    let a = Backend::start("a");
    // Fail open: had the limiter asked the stopped Redis, these would pass as 200.
    let extra = limiter(&redis.url(), "3s", "on_store_error = \"allow\"");
    let lb = balancer(&[a.url()], &extra);
    let client = client();

    let answers = hits(&client, lb.proxy_addr, None, 6).await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 200, 429]);
    let retry_after = answers[5].number("retry-after");

    redis.stop();
    let refused = hits(&client, lb.proxy_addr, None, 5).await;
    assert_eq!(statuses(&refused), [429; 5]);
    for answer in &refused {
        assert_eq!(answer.remaining(), 0);
        assert!(answer.number("retry-after") <= retry_after);
    }
    assert_eq!(a.hits(), 5);

    // The window over, the limiter asks the store again: down, so the request passes uncounted.
    actix_rt::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let after = hit(&client, lb.proxy_addr, None).await;
    assert_eq!(after.status, 200);
    assert!(after.has_no_limit_headers());
}

#[actix_rt::test]
async fn a_disabled_limiter_adds_no_headers_and_limits_nothing() {
    let a = Backend::start("a");
    let extra = "[rate_limit]\nenabled = false\nrequests = 1\nredis_url = \"\"\n";
    let lb = balancer(&[a.url()], extra);
    let client = client();

    let answers = hits(&client, lb.proxy_addr, None, 10).await;
    assert_eq!(statuses(&answers), [200; 10]);
    assert!(answers.iter().all(Answer::has_no_limit_headers));
    assert_eq!(a.hits(), 10);
}

#[actix_rt::test]
async fn a_local_block_ends_with_the_window_not_a_rounded_up_second_later() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], &limiter(&redis.url(), "2s", ""));
    let client = client();

    // The window starts with the first request and ends 2 s later, at `end`.
    let end = std::time::Instant::now() + Duration::from_secs(2);
    assert_eq!(hit(&client, lb.proxy_addr, None).await.remaining(), 4);
    // Over budget with 1.1 s of the window left: Retry-After rounds that up to 2 s, but the
    // block must end with the window, not 2 s from now.
    actix_rt::time::sleep(Duration::from_millis(900)).await;
    let answers = hits(&client, lb.proxy_addr, None, 5).await;
    assert_eq!(statuses(&answers), [200, 200, 200, 200, 429]);

    actix_rt::time::sleep_until((end + Duration::from_millis(300)).into()).await;
    let next_window = hit(&client, lb.proxy_addr, None).await;
    assert_eq!(next_window.status, 200, "the window has ended");
    assert_eq!(next_window.remaining(), 4);
}

#[actix_rt::test]
async fn a_redis_that_never_answers_does_not_stall_the_proxy() {
    // Accepts connections and never answers: every check runs into the limiter's bound.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("redis://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let a = Backend::start("a");
    let client = client();
    for (policy, want) in [("allow", 200), ("deny", 503)] {
        let lb = balancer(
            &[a.url()],
            &limiter(&silent, "60s", &format!("on_store_error = \"{policy}\"")),
        );
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let answer = hit(&client, lb.proxy_addr, None).await;
            assert_eq!(answer.status, want, "{policy}: {}", answer.body);
            assert!(
                answer.has_no_limit_headers(),
                "an uncounted answer has no limit fields"
            );
            // Bounded by the limiter's 50 ms, far below any Redis client time-out.
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{policy}: {:?}",
                started.elapsed()
            );
        }
    }
}

/// The balancer's connections to `redis` (every client but the one asking).
fn redis_clients(redis: &Redis) -> usize {
    let list = redis
        .command(&["CLIENT", "LIST"])
        .expect("redis answers CLIENT LIST");
    list.lines()
        .filter(|l| l.contains(" cmd=") && !l.contains(" cmd=client|list"))
        .count()
}

#[actix_rt::test]
async fn each_worker_counts_over_a_redis_connection_of_its_own() {
    let redis = Redis::start();
    let a = Backend::start("a");
    let extra = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 3\n\n{}",
        limiter(&redis.url(), "10s", "trusted_proxies = [\"127.0.0.1\"]")
    );
    let lb = balancer(&[a.url()], &extra);
    // Each worker opens its connection at start, on its own thread.
    assert!(
        eventually(Duration::from_secs(5), async || redis_clients(&redis) == 3).await,
        "{} connections for 3 workers",
        redis_clients(&redis)
    );

    // Concurrent connections, spread over the workers by the acceptor: still one budget.
    let client = client();
    let answers = futures_util::future::join_all(
        (0..30).map(|_| hit(&client, lb.proxy_addr, Some("203.0.113.5"))),
    )
    .await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 5, "statuses {:?}", statuses(&answers));
    assert_eq!(redis_clients(&redis), 3, "no connection per request");
}
