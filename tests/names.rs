//! Servers known by name over real sockets (SPEC, "Servers by name"): a DNS server of the
//! test's own whose records change while the balancer runs, and backends on 127.0.0.1 and
//! 127.0.0.2 at the same port, so that only the address tells them apart: addresses that
//! appear join, addresses gone drain, a failed lookup keeps the last ones, and a name that
//! does not resolve at start stops the start.

mod common;

use std::time::Duration;

use common::{
    dns::{Dns, Mode},
    *,
};
use serde_json::Value;

/// A config for `http://api.test:PORT` resolved through `dns` every 200 ms.
fn by_name(dns: &Dns, port: u16, extra: &str) -> String {
    format!(
        "[balancer]\nservers = [\"http://api.test:{port}\"]\nresolvers = [\"{}\"]\n\
         resolve_interval = \"200ms\"\n{extra}",
        dns.addr
    )
}

async fn servers(lb: &roundabout::Running) -> Vec<Value> {
    let mut res = client()
        .get(format!("http://{}/servers", lb.admin_addr.unwrap()))
        .send()
        .await
        .unwrap();
    let list: Value = res.json().await.unwrap();
    list.as_array().unwrap().clone()
}

/// The addresses `/servers` lists, in order.
async fn addresses(lb: &roundabout::Running) -> Vec<String> {
    servers(lb)
        .await
        .iter()
        .filter(|s| s["draining"] == false)
        .map(|s| s["url"].as_str().unwrap().to_string())
        .collect()
}

/// The names of the backends that answer `n` requests.
async fn answers(lb: &roundabout::Running, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
        assert_eq!(status, 200, "{body}");
        out.push(body);
    }
    out.sort();
    out.dedup();
    out
}

#[actix_rt::test]
async fn each_address_of_a_name_is_a_server_and_the_set_follows_the_name() {
    let one = Backend::start_at("one", "127.0.0.1", 0);
    let port = one.addr.port();
    let two = Backend::start_at("two", "127.0.0.2", port);
    let dns = Dns::start();
    dns.set("api.test", &["127.0.0.1"]);
    let lb = balancer(
        &[],
        &by_name(&dns, port, "[proxy]\npreserve_host = false\n"),
    );

    let list = servers(&lb).await;
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["url"],
        format!("http://127.0.0.1:{port}"),
        "by its address"
    );
    assert_eq!(
        list[0]["name"],
        format!("http://api.test:{port}"),
        "the name beside it"
    );
    assert_eq!(answers(&lb, 4).await, ["one"]);
    let (_, seen) = get(&format!("http://{}/headers", lb.proxy_addr)).await;
    let seen: Value = serde_json::from_str(&seen).unwrap();
    let host = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "host")
        .unwrap()[1]
        .clone();
    assert_eq!(
        host,
        format!("api.test:{port}"),
        "the upstream Host is the name"
    );

    // A new address joins at once (and is checked like any server).
    dns.set("api.test", &["127.0.0.1", "127.0.0.2"]);
    let both = eventually(Duration::from_secs(5), async || {
        addresses(&lb).await.len() == 2
    })
    .await;
    assert!(both, "{:?}", servers(&lb).await);
    assert!(
        eventually(Duration::from_secs(5), async || answers(&lb, 6).await
            == ["one", "two"])
        .await,
        "both addresses answer, each its own connection though the name is one"
    );

    // An address gone drains.
    dns.set("api.test", &["127.0.0.2"]);
    let moved = eventually(Duration::from_secs(5), async || {
        addresses(&lb).await == [format!("http://127.0.0.2:{port}")]
    })
    .await;
    assert!(moved, "{:?}", servers(&lb).await);
    assert_eq!(answers(&lb, 4).await, ["two"]);
    assert!(two.hits() >= 4);

    // Lookups that fail, or are not answered, keep the last addresses.
    for mode in [Mode::Fail, Mode::Silent] {
        dns.mode(mode);
        actix_rt::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            addresses(&lb).await,
            [format!("http://127.0.0.2:{port}")],
            "{mode:?}"
        );
        assert_eq!(answers(&lb, 3).await, ["two"]);
    }
    dns.mode(Mode::Answer);
    dns.set("api.test", &["127.0.0.1"]);
    assert!(
        eventually(Duration::from_secs(5), async || answers(&lb, 3).await
            == ["one"])
        .await,
        "and follow the name again once it answers"
    );
}

#[actix_rt::test]
async fn a_name_that_does_not_resolve_at_start_stops_the_start() {
    let dns = Dns::start();
    let config = config(&[], &by_name(&dns, 5000, ""));
    let err = match roundabout::start(config) {
        Ok(_) => panic!("started without its server's address"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("http://api.test:5000/ (pool default): api.test does not resolve"),
        "{err}"
    );
}

#[test]
fn the_binary_says_which_name_does_not_resolve_and_exits_1() {
    let dns = Dns::start();
    dns.mode(Mode::Fail);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("names.toml");
    std::fs::write(
        &file,
        format!(
            "[rate_limit]\nredis_url = \"\"\n{}",
            by_name(&dns, 5000, "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roundabout"))
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("api.test does not resolve"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[actix_rt::test]
async fn a_reload_that_brings_a_name_which_does_not_resolve_is_refused() {
    let a = Backend::start("a");
    let b = Backend::start_at("b", "127.0.0.2", a.addr.port());
    let dns = Dns::start();
    dns.set("known.test", &["127.0.0.2"]);
    let port = free_port();
    let text = |servers: &str| {
        format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [{servers}]\nresolvers = [\"{}\"]\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n",
            dns.addr
        )
    };
    let lb = Binary::start(port, &text(&format!("\"{}\"", a.url()))).await;
    lb.rewrite_config(&text(&format!("\"{}\", \"http://new.test:1\"", a.url())));
    lb.signal(libc::SIGHUP);
    lb.wait_log(
        "reload (SIGHUP) refused: http://new.test:1/ (pool default): new.test does not resolve",
        1,
    )
    .await;
    assert_eq!(
        get(&lb.url("/")).await.1,
        "a",
        "the running configuration stays"
    );
    lb.rewrite_config(&text(&format!("\"http://known.test:{}\"", a.addr.port())));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    let p = a.addr.port();
    let log = lb.log();
    assert!(
        log.contains(&format!("added 127.0.0.2:{p} (known.test:{p})")),
        "{log}"
    );
    assert!(
        log.contains(&format!("removed 127.0.0.1:{p} (draining)")),
        "{log}"
    );
    assert_eq!(get(&lb.url("/")).await.1, b.name);
}
