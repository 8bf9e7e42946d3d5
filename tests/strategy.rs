//! The strategies over real sockets: weighted order and shares, load-aware choices under a
//! slow server, configuration errors, and the guarantees kept across health and membership
//! changes. One worker (the harness's), so each worker's cycle is the whole picture.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use roundabout::{config::Config, Running};

/// A `[balancer]` section for `extra`: `strategy` over `servers`, each with its weight.
fn balancer_section(strategy: &str, servers: &[(&Backend, u32)]) -> String {
    let list = servers
        .iter()
        .map(|(b, w)| format!("{{ url = \"{}\", weight = {w} }}", b.url()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[balancer]\nstrategy = \"{strategy}\"\nservers = [{list}]\n")
}

/// Sends `n` sequential `GET /` through the proxy and returns the answering backends' names.
async fn sequence(lb: &Running, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
        assert_eq!(status, 200, "{body}");
        names.push(body);
    }
    names
}

/// How many of `names` are `name`.
fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

/// Sends `clients × each` `GET /` through the proxy, `clients` at a time (each client sends
/// its requests one after the other), and returns the answering backends' names.
async fn concurrently(lb: &Running, clients: usize, each: usize) -> Vec<String> {
    let client = client();
    let url = format!("http://{}/", lb.proxy_addr);
    let runs = (0..clients).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut names = Vec::with_capacity(each);
            for _ in 0..each {
                let mut res = client.get(&url).send().await.expect("reaches the proxy");
                assert_eq!(res.status(), 200);
                let body = res.body().await.expect("body");
                names.push(String::from_utf8_lossy(&body).into_owned());
            }
            names
        }
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The admin API's view of the servers.
async fn admin_servers(lb: &Running) -> Vec<serde_json::Value> {
    let addr = lb.admin_addr.expect("the harness enables the admin API");
    let (status, body) = get(&format!("http://{addr}/servers")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON from GET /servers")
}

/// Waits until the balancer has `backend` in the given health (at most 5 s).
async fn wait_health(lb: &Running, backend: &Backend, healthy: bool) {
    let url = backend.url();
    let reached = eventually(Duration::from_secs(5), async || {
        admin_servers(lb)
            .await
            .iter()
            .any(|s| s["url"] == url.as_str() && s["healthy"] == healthy)
    })
    .await;
    assert!(reached, "{} never became healthy={healthy}", backend.name);
}

/// The share the slow server (`slow`, 300 ms per answer) gets of 300 requests from 30
/// concurrent clients under `strategy`, with two fast servers beside it.
async fn slow_share(strategy: &str) -> usize {
    let slow = Backend::start_slow("slow", 300);
    let (f1, f2) = (Backend::start("fast1"), Backend::start("fast2"));
    let lb = balancer(
        &[],
        &balancer_section(strategy, &[(&slow, 1), (&f1, 1), (&f2, 1)]),
    );
    let names = concurrently(&lb, 30, 10).await;
    assert_eq!(names.len(), 300);
    assert_eq!(slow.hits() + f1.hits() + f2.hits(), 300, "{strategy}");
    lb.stop(false).await;
    count(&names, "slow")
}

#[actix_rt::test]
async fn weighted_round_robin_gives_5_1_1_as_50_10_10_in_nginx_smooth_order() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(
        &[],
        &balancer_section("weighted_round_robin", &[(&a, 5), (&b, 1), (&c, 1)]),
    );
    let names = sequence(&lb, 70).await;
    assert_eq!(names[..7], ["a", "a", "b", "a", "c", "a", "a"], "{names:?}");
    assert_eq!(
        (count(&names, "a"), count(&names, "b"), count(&names, "c")),
        (50, 10, 10)
    );
    assert_eq!((a.hits(), b.hits(), c.hits()), (50, 10, 10));
    // The cycle of 7 repeats exactly.
    for (i, name) in names.iter().enumerate() {
        assert_eq!(name, &names[i % 7], "request {i}: {names:?}");
    }
}

#[actix_rt::test]
async fn least_requests_sends_a_slow_server_far_fewer_requests_than_round_robin() {
    let round_robin = slow_share("round_robin").await;
    let least = slow_share("least_requests").await;
    // Round robin ignores load: exactly one in three.
    assert_eq!(round_robin, 100);
    assert!(
        least * 2 < round_robin,
        "least_requests gave the slow server {least} of 300, round_robin {round_robin}"
    );
}

#[actix_rt::test]
async fn power_of_two_sends_a_slow_server_far_fewer_requests_than_round_robin() {
    let round_robin = slow_share("round_robin").await;
    let p2c = slow_share("power_of_two").await;
    assert_eq!(round_robin, 100);
    assert!(
        p2c * 2 < round_robin,
        "power_of_two gave the slow server {p2c} of 300, round_robin {round_robin}"
    );
}

#[actix_rt::test]
async fn power_of_two_spreads_evenly_over_equal_servers() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(
        &[],
        &balancer_section("power_of_two", &[(&a, 1), (&b, 1), (&c, 1)]),
    );
    let names = concurrently(&lb, 10, 60).await;
    assert_eq!(names.len(), 600);
    for name in ["a", "b", "c"] {
        let n = count(&names, name);
        // A third is 200; within ±25%.
        assert!((150..=250).contains(&n), "{name} got {n} of 600");
    }
}

#[test]
fn an_unknown_strategy_is_refused_naming_balancer_strategy() {
    let text = "[balancer]\nstrategy = \"random\"\nservers = [\"http://127.0.0.1:5000\"]\n";
    let err = Config::from_toml_with_env("t.toml", text, Some(Default::default()))
        .expect_err("an unknown strategy is refused")
        .to_string();
    assert!(err.starts_with("t.toml: balancer.strategy: "), "{err}");
    assert!(err.contains("random"), "says what was given: {err}");
    assert!(!err.contains('\n'), "one line: {err:?}");
}

#[test]
fn a_zero_weight_is_refused_naming_the_server_and_key() {
    let text = "[balancer]\nservers = [{ url = \"http://127.0.0.1:5000\", weight = 0 }]\n";
    let err = Config::from_toml_with_env("t.toml", text, Some(Default::default()))
        .expect_err("weight 0 is refused")
        .to_string();
    assert!(
        err.starts_with("t.toml: balancer.servers[0].weight: "),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err:?}");
}

/// Runs `roundabout --config <file with text> --check`: (exit code, stdout, stderr).
fn check(text: &str) -> (Option<i32>, String, String) {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roundabout"))
        .arg("--config")
        .arg(file.path())
        .arg("--check")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_binary_check_exits_1_with_one_line_naming_the_bad_key() {
    let cases = [
        (
            "[balancer]\nstrategy = \"fastest\"\nservers = [\"http://127.0.0.1:5000\"]\n",
            "balancer.strategy",
        ),
        (
            "[balancer]\nstrategy = \"weighted_round_robin\"\n\
             servers = [\"http://127.0.0.1:5000\", { url = \"http://127.0.0.1:5001\", weight = 0 }]\n",
            "balancer.servers[1].weight",
        ),
    ];
    for (text, key) in cases {
        let (code, stdout, stderr) = check(text);
        assert_eq!(code, Some(1), "{key}: stderr {stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        assert!(stderr.contains(key), "{stderr:?} names {key}");
        assert!(stdout.is_empty(), "nothing printed as resolved: {stdout:?}");
    }
}

#[test]
fn the_binary_check_accepts_weighted_servers_and_prints_them() {
    let (code, stdout, stderr) = check(
        "[balancer]\nstrategy = \"weighted_round_robin\"\n\
         servers = [\"http://127.0.0.1:5000\", { url = \"http://127.0.0.1:5001\", weight = 3 }]\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("weighted_round_robin"), "{stdout}");
    assert!(stdout.contains("weight = 3"), "{stdout}");
}

#[actix_rt::test]
async fn weighted_round_robin_keeps_the_ratio_among_healthy_servers_and_starves_the_sick_one() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(
        &[],
        &balancer_section("weighted_round_robin", &[(&a, 5), (&b, 1), (&c, 1)]),
    );
    // Part of a cycle, so that left-over scores would show if they leaked across the change.
    sequence(&lb, 3).await;

    b.set_health(500);
    wait_health(&lb, &b, false).await;
    let names = sequence(&lb, 60).await;
    assert_eq!(count(&names, "b"), 0, "{names:?}");
    assert_eq!((count(&names, "a"), count(&names, "c")), (50, 10));
    // Smooth among the remaining two as well: c never waits more than 5 of a.
    assert_eq!(names[..6], ["a", "a", "a", "c", "a", "a"], "{names:?}");

    b.set_health(200);
    wait_health(&lb, &b, true).await;
    let names = sequence(&lb, 70).await;
    assert_eq!(names[..7], ["a", "a", "b", "a", "c", "a", "a"], "{names:?}");
    assert_eq!(
        (count(&names, "a"), count(&names, "b"), count(&names, "c")),
        (50, 10, 10)
    );
}

#[actix_rt::test]
async fn weighted_round_robin_keeps_the_ratio_when_servers_are_added_and_removed() {
    let (a, b, c, d) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
        Backend::start("d"),
    );
    let lb = balancer(
        &[],
        &balancer_section("weighted_round_robin", &[(&a, 5), (&b, 1), (&c, 1)]),
    );
    let admin = lb.admin_addr.unwrap();
    sequence(&lb, 4).await;

    let res = client()
        .post(format!("http://{admin}/servers"))
        .send_json(&serde_json::json!({ "url": d.url(), "weight": 2 }))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    wait_health(&lb, &d, true).await;
    let names = sequence(&lb, 90).await;
    assert_eq!(
        [&a, &b, &c, &d].map(|s| count(&names, &s.name)),
        [50, 10, 10, 20],
        "{names:?}"
    );

    let res = client()
        .delete(format!("http://{admin}/servers/{}", a.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let gone = eventually(Duration::from_secs(5), async || {
        admin_servers(&lb).await.len() == 3
    })
    .await;
    assert!(gone, "a is still listed: {:?}", admin_servers(&lb).await);
    let names = sequence(&lb, 40).await;
    assert_eq!(
        [&a, &b, &c, &d].map(|s| count(&names, &s.name)),
        [0, 10, 10, 20],
        "{names:?}"
    );
}

#[actix_rt::test]
async fn round_robin_keeps_its_turn_when_a_server_is_removed() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(&urls(&[&a, &b, &c]), "");
    let admin = lb.admin_addr.unwrap();
    let before = sequence(&lb, 2).await;
    assert_eq!(before, ["a", "b"]);

    let res = client()
        .delete(format!("http://{admin}/servers/{}", a.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let gone = eventually(Duration::from_secs(5), async || {
        admin_servers(&lb).await.len() == 2
    })
    .await;
    assert!(gone);
    // c was next in turn before a left, and still is: b is not served twice in a row.
    let after = sequence(&lb, 4).await;
    assert_eq!(after, ["c", "b", "c", "b"]);
}

#[actix_rt::test]
async fn least_requests_counts_requests_that_end_after_their_server_was_removed_and_re_added() {
    let slow = Backend::start_slow("slow", 1500);
    let fast = Backend::start("fast");
    let lb = balancer(
        &[],
        &balancer_section("least_requests", &[(&slow, 1), (&fast, 1)]),
    );
    let admin = lb.admin_addr.unwrap();
    let client = client();

    // One request in flight on `slow` while it is removed (draining) and added back.
    let url = format!("http://{}/", lb.proxy_addr);
    let pending = client.get(&url).send();
    let pending = actix_rt::spawn(async move {
        let mut res = pending.await.expect("reaches the proxy");
        String::from_utf8_lossy(&res.body().await.unwrap()).into_owned()
    });
    let in_flight = eventually(Duration::from_secs(5), async || slow.hits() == 1).await;
    assert!(in_flight);
    let res = client
        .delete(format!("http://{admin}/servers/{}", slow.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = client
        .post(format!("http://{admin}/servers"))
        .send_json(&serde_json::json!({ "url": slow.url() }))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(pending.await.unwrap(), "slow");

    // Its request has ended: nothing is in flight anywhere once it is back in rotation.
    wait_health(&lb, &slow, true).await;
    let servers = admin_servers(&lb).await;
    assert!(
        servers.iter().all(|s| s["in_flight"] == 0),
        "in-flight counts after every request ended: {servers:?}"
    );
    // And so the idle servers share sequential requests in turn again.
    let names = sequence(&lb, 4).await;
    assert_eq!(count(&names, "slow"), 2, "{names:?}");
}
