//! Routes and pools over real sockets (SPEC, "Routing" and "Pools"): several demo backends
//! as pools, requests routed by host, path, header and method, what a route asks of them
//! (strip_prefix, allow, header rules, redirect_https, its own budget), and the admin API
//! per pool.

mod common;

use std::time::Duration;

use common::{tls::*, *};
use serde_json::Value;

/// The `[pools.*]` of `(name, backends)`.
fn pools(list: &[(&str, &[&Backend])]) -> String {
    list.iter()
        .map(|(name, backends)| {
            let servers: Vec<String> = backends
                .iter()
                .map(|b| format!("\"{}\"", b.url()))
                .collect();
            format!("[pools.{name}]\nservers = [{}]\n", servers.join(", "))
        })
        .collect()
}

/// GETs `path` from the balancer with the headers given; (status, body, response).
async fn ask(
    lb: &roundabout::Running,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, awc::http::header::HeaderMap) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client().request(method, format!("http://{}{path}", lb.proxy_addr));
    for (n, v) in headers {
        req = req.insert_header((*n, *v));
    }
    let mut res = req.send().await.expect("an answer");
    let body = res.body().await.unwrap();
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
        res.headers().clone(),
    )
}

async fn body_for(lb: &roundabout::Running, host: &str, path: &str) -> String {
    let (status, body, _) = ask(lb, "GET", path, &[("host", host)]).await;
    assert_eq!(status, 200, "{host}{path}: {body}");
    body
}

#[actix_rt::test]
async fn two_services_go_to_their_pools_by_host_and_path_and_the_rest_to_the_default_pool() {
    let (api1, api2, web) = (
        Backend::start("api1"),
        Backend::start("api2"),
        Backend::start("web"),
    );
    let (st, def) = (Backend::start("static"), Backend::start("default"));
    let extra = format!(
        "{}[[routes]]\nhost = \"api.example.com\"\npool = \"api\"\n\
         [[routes]]\nhost = \"*.web.test\"\npool = \"web\"\n\
         [[routes]]\npath_prefix = \"/static\"\npool = \"assets\"\n",
        pools(&[
            ("api", &[&api1, &api2]),
            ("web", &[&web]),
            ("assets", &[&st])
        ])
    );
    let lb = balancer(&[def.url()], &extra);

    let api: Vec<String> =
        futures_util::future::join_all((0..4).map(|_| body_for(&lb, "api.example.com", "/"))).await;
    for name in ["api1", "api2"] {
        assert_eq!(api.iter().filter(|b| *b == name).count(), 2, "{api:?}");
    }
    // Case, port and a trailing dot do not matter; the wildcard takes any depth.
    assert_eq!(body_for(&lb, "API.Example.com.:8000", "/").await.len(), 4);
    assert_eq!(body_for(&lb, "www.WEB.test", "/").await, "web");
    assert_eq!(body_for(&lb, "a.b.web.test:1", "/").await, "web");
    assert_eq!(
        body_for(&lb, "web.test", "/").await,
        "default",
        "not the suffix itself"
    );
    assert_eq!(
        body_for(&lb, "other.test", "/static/app.js").await,
        "static"
    );
    assert_eq!(body_for(&lb, "other.test", "/static").await, "static");
    assert_eq!(
        body_for(&lb, "other.test", "/staticx").await,
        "default",
        "whole segments"
    );
    assert_eq!(
        body_for(&lb, "other.test", "//static/x").await,
        "static",
        "slashes merged"
    );
    assert_eq!(
        body_for(&lb, "other.test", "/x/../static/y").await,
        "static",
        "dot segments"
    );
    assert_eq!(
        body_for(&lb, "other.test", "/%73tatic/y").await,
        "static",
        "unreserved escapes"
    );
    assert_eq!(body_for(&lb, "other.test", "/").await, "default");
    assert_eq!(
        (api1.hits() + api2.hits(), web.hits(), st.hits()),
        (5, 2, 5)
    );
}

#[actix_rt::test]
async fn file_order_wins_and_headers_and_methods_must_match() {
    let (canary, api, def) = (
        Backend::start("canary"),
        Backend::start("api"),
        Backend::start("def"),
    );
    let extra = format!(
        "{}[[routes]]\nname = \"canary\"\nheaders = {{ X-Canary = \"1\" }}\npool = \"canary\"\n\
         [[routes]]\nname = \"writes\"\nhost = \"api.test\"\nmethods = [\"POST\", \"PUT\"]\npool = \"canary\"\n\
         [[routes]]\nname = \"api\"\nhost = \"api.test\"\npool = \"api\"\n",
        pools(&[("canary", &[&canary]), ("api", &[&api])])
    );
    let lb = balancer(&[def.url()], &extra);
    let go = async |method: &str, headers: &[(&str, &str)]| ask(&lb, method, "/", headers).await.1;
    assert_eq!(
        go("GET", &[("host", "api.test"), ("x-canary", "1")]).await,
        "canary"
    );
    assert_eq!(
        go("GET", &[("host", "api.test"), ("x-canary", "2")]).await,
        "api"
    );
    assert_eq!(go("POST", &[("host", "api.test")]).await, "canary");
    assert_eq!(go("GET", &[("host", "api.test")]).await, "api");
    assert_eq!(go("GET", &[("host", "elsewhere.test")]).await, "def");
}

#[actix_rt::test]
async fn strip_prefix_sends_the_rest_of_the_normalized_path_with_the_query() {
    let (api, def) = (Backend::start("api"), Backend::start("def"));
    let extra = format!(
        "{}[[routes]]\npath_prefix = \"/v1\"\nstrip_prefix = true\npool = \"api\"\n",
        pools(&[("api", &[&api])])
    );
    let lb = balancer(&[def.url()], &extra);
    for (path, upstream) in [
        ("/v1/headers?x=1&y", "/headers?x=1&y"),
        ("//v1/./headers", "/headers"),
        ("/static/../v1/headers", "/headers"),
    ] {
        let (status, body, _) = ask(&lb, "GET", path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["uri"], upstream, "{path}");
    }
    assert_eq!(
        ask(&lb, "GET", "/v1", &[]).await.1,
        "api",
        "/v1 alone is / upstream"
    );
    assert_eq!(ask(&lb, "GET", "/v10/headers", &[]).await.1, "def");
}

#[actix_rt::test]
async fn allow_lists_refuse_other_clients_with_403_and_trust_proxies_as_the_limiter_does() {
    let (inside, def) = (Backend::start("inside"), Backend::start("def"));
    let extra = format!(
        "{}[[routes]]\npath_prefix = \"/internal\"\nallow = [\"10.0.0.0/8\"]\npool = \"inside\"\n\
         [[routes]]\npath_prefix = \"/local\"\nallow = [\"127.0.0.1\"]\npool = \"inside\"\n\
         [rate_limit]\nenabled = false\ntrusted_proxies = [\"127.0.0.2\"]\n",
        pools(&[("inside", &[&inside])])
    );
    let lb = balancer(&[def.url()], &extra);
    let (status, body, headers) = ask(&lb, "GET", "/internal/x", &[]).await;
    assert_eq!(status, 403);
    assert!(body.contains("forbidden"), "a body of our own: {body:?}");
    assert!(headers.contains_key("x-request-id"));
    // 127.0.0.1 is no trusted proxy: the address it claims to forward for is not believed.
    let claimed = [("x-forwarded-for", "10.1.2.3")];
    assert_eq!(ask(&lb, "GET", "/internal/x", &claimed).await.0, 403);
    assert_eq!(ask(&lb, "GET", "/local/x", &[]).await.1, "inside");
    assert_eq!(inside.hits(), 1, "nothing refused reached the server");
}

#[actix_rt::test]
async fn header_rules_set_and_remove_fields_after_roundabouts_own() {
    let (api, def) = (Backend::start("api"), Backend::start("def"));
    let extra = format!(
        "{}[[routes]]\nhost = \"api.test\"\npool = \"api\"\n\
         request_headers = {{ set = {{ x-env = \"prod\", host = \"internal.api\" }}, remove = [\"x-debug\"] }}\n\
         response_headers = {{ set = {{ strict-transport-security = \"max-age=31536000\" }}, remove = [\"x-backend\"] }}\n",
        pools(&[("api", &[&api])])
    );
    let lb = balancer(&[def.url()], &extra);
    let (status, body, headers) = ask(
        &lb,
        "GET",
        "/headers",
        &[("host", "api.test"), ("x-debug", "1"), ("x-env", "dev")],
    )
    .await;
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_str(&body).unwrap();
    let field = |name: &str| {
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(field("x-env"), ["prod"]);
    assert!(field("x-debug").is_empty());
    assert_eq!(field("host"), ["internal.api"]);
    assert_eq!(
        field("x-forwarded-host"),
        ["api.test"],
        "roundabout's own, from the client's"
    );
    assert_eq!(
        headers.get("strict-transport-security").unwrap(),
        "max-age=31536000"
    );
    assert!(headers.get("x-backend").is_none());
    // On the default pool, nothing of that route's.
    let (_, _, other) = ask(&lb, "GET", "/headers", &[("host", "else.test")]).await;
    assert!(other.get("x-backend").is_some() && other.get("strict-transport-security").is_none());
}

#[actix_rt::test]
async fn redirect_https_sends_plain_requests_to_the_tls_listener_and_serves_tls_ones() {
    let def = Backend::start("def");
    let ca = Ca::new("redirect CA");
    let (cert, key) = ca.leaf("server", "server", false);
    let extra = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nworkers = 1\ntls_address = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\
         [[routes]]\nhost = \"secure.test\"\nredirect_https = true\n",
        cert.display(),
        key.display()
    );
    let lb = balancer(&[def.url()], &extra);
    let tls_port = lb.tls_addr.unwrap().port();
    let (status, body, headers) =
        ask(&lb, "POST", "/a/b?c=1", &[("host", "Secure.test:8080")]).await;
    assert_eq!(status, 308, "{body}");
    assert_eq!(
        headers.get("location").unwrap(),
        &format!("https://Secure.test:{tls_port}/a/b?c=1")
    );
    assert!(headers.contains_key("x-request-id") && !body.is_empty());
    assert_eq!(def.hits(), 0);
    let tls = https_client(&ca, &["http/1.1"]);
    let mut res = tls
        .get(format!("https://localhost:{tls_port}/"))
        .insert_header(("host", "secure.test"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.body().await.unwrap(), "def");
    // Other hosts on the plain listener are served as ever.
    assert_eq!(
        ask(&lb, "GET", "/", &[("host", "plain.test")]).await.1,
        "def"
    );
}

#[actix_rt::test]
async fn a_route_budget_is_its_own_and_false_means_no_limit() {
    let def = Backend::start("def");
    let extra = "[rate_limit]\nenabled = true\nredis_url = \"\"\nrequests = 2\nwindow = \"60s\"\n\
                 [[routes]]\nname = \"tight\"\npath_prefix = \"/tight\"\nrate_limit = { requests = 1 }\n\
                 [[routes]]\nname = \"free\"\npath_prefix = \"/free\"\nrate_limit = false\n";
    let lb = balancer(&[def.url()], extra);
    let (status, _, h) = ask(&lb, "GET", "/tight", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(h.get("x-ratelimit-limit").unwrap(), "1");
    assert_eq!(h.get("ratelimit-policy").unwrap(), "\"tight\";q=1;w=60");
    assert!(h
        .get("ratelimit")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("\"tight\";r=0;t="));
    let (status, _, h) = ask(&lb, "GET", "/tight", &[]).await;
    assert_eq!(status, 429);
    assert_eq!(h.get("x-ratelimit-remaining").unwrap(), "0");
    // The default budget has counted none of those.
    let (status, _, h) = ask(&lb, "GET", "/", &[]).await;
    assert_eq!(
        (
            status,
            h.get("x-ratelimit-remaining").unwrap().to_str().unwrap()
        ),
        (200, "1")
    );
    assert_eq!(h.get("ratelimit-policy").unwrap(), "\"default\";q=2;w=60");
    for _ in 0..5 {
        let (status, _, h) = ask(&lb, "GET", "/free", &[]).await;
        assert_eq!(status, 200);
        assert!(
            h.get("x-ratelimit-limit").is_none(),
            "not limited, not counted"
        );
    }
}

#[actix_rt::test]
async fn a_route_budget_applies_with_the_default_limiter_off() {
    let def = Backend::start("def");
    let extra = "[rate_limit]\nenabled = false\nredis_url = \"\"\n\
                 [[routes]]\nname = \"login\"\npath_prefix = \"/login\"\nrate_limit = { requests = 1, window = \"10s\" }\n";
    let lb = balancer(&[def.url()], extra);
    assert_eq!(ask(&lb, "GET", "/login", &[]).await.0, 200);
    assert_eq!(ask(&lb, "GET", "/login", &[]).await.0, 429);
    let (status, _, h) = ask(&lb, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert!(h.get("x-ratelimit-limit").is_none());
}

#[actix_rt::test]
async fn two_instances_share_a_route_budget_through_redis_under_its_own_key() {
    let redis = Redis::start();
    let def = Backend::start("def");
    let extra = format!(
        "[rate_limit]\nenabled = true\nredis_url = \"{}\"\nkey_prefix = \"rt\"\nrequests = 100\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nrate_limit = {{ requests = 3, window = \"60s\" }}\n",
        redis.url()
    );
    let (one, two) = (
        balancer(&[def.url()], &extra),
        balancer(&[def.url()], &extra),
    );
    let mut statuses = Vec::new();
    for lb in [&one, &two, &one, &two, &one] {
        statuses.push(ask(lb, "GET", "/api/x", &[]).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let count = redis.command(&["GET", "rt:api:127.0.0.1"]).unwrap();
    assert!(
        count.contains("\r\n5\r\n"),
        "the route's key counts both: {count:?}"
    );
    let default = redis.command(&["GET", "rt:127.0.0.1"]).unwrap();
    assert!(
        default.starts_with("$-1"),
        "the default budget untouched: {default:?}"
    );
    assert_eq!(ask(&one, "GET", "/", &[]).await.0, 200);
}

async fn admin_json(
    lb: &roundabout::Running,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", lb.admin_addr.unwrap());
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let req = client().request(method, url);
    let mut res = match body {
        Some(b) => req.send_json(&b).await.unwrap(),
        None => req.send().await.unwrap(),
    };
    let bytes = res.body().await.unwrap();
    (
        res.status().as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[actix_rt::test]
async fn the_admin_api_shows_pools_and_routes_and_changes_each_pools_servers() {
    let (api, def, extra_one) = (
        Backend::start("api"),
        Backend::start("def"),
        Backend::start("more"),
    );
    let extra = format!(
        "{}[pools.api]\nstrategy = \"least_requests\"\nservers = [\"{}\", \"{}\"]\n\
         [[routes]]\nname = \"api\"\nhost = \"api.test\"\npool = \"api\"\n\
         [[routes]]\npath_prefix = \"/x\"\nmethods = [\"GET\"]\n",
        "",
        api.url(),
        def.url()
    );
    let lb = balancer(&[def.url()], &extra);
    let (status, all) = admin_json(&lb, "GET", "/pools", None).await;
    assert_eq!(status, 200);
    assert_eq!(all["default"]["strategy"], "round_robin");
    assert_eq!(all["api"]["strategy"], "least_requests");
    assert_eq!(all["default"]["servers"].as_array().unwrap().len(), 1);
    let in_api: Vec<&str> = all["api"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["url"].as_str().unwrap())
        .collect();
    assert_eq!(in_api, [api.url(), def.url()], "one URL in two pools");

    let (status, routes) = admin_json(&lb, "GET", "/routes", None).await;
    assert_eq!(status, 200);
    assert_eq!(routes[0]["name"], "api");
    assert_eq!(routes[0]["host"], "api.test");
    assert_eq!(routes[0]["pool"], "api");
    assert_eq!(routes[1]["name"], "route-2");
    assert_eq!(routes[1]["pool"], "default");
    assert_eq!(routes[1]["methods"][0], "GET");

    let new = serde_json::json!({ "url": extra_one.url(), "weight": 2 });
    let (status, added) = admin_json(&lb, "POST", "/pools/api/servers", Some(new.clone())).await;
    assert_eq!(
        (status, added["url"].as_str()),
        (201, Some(extra_one.url().as_str()))
    );
    assert_eq!(
        admin_json(&lb, "POST", "/pools/api/servers", Some(new.clone()))
            .await
            .0,
        409
    );
    let (_, list) = admin_json(&lb, "GET", "/pools/api/servers", None).await;
    assert_eq!(list.as_array().unwrap().len(), 3);
    let (_, default) = admin_json(&lb, "GET", "/servers", None).await;
    assert_eq!(
        default.as_array().unwrap().len(),
        1,
        "the default pool's only"
    );
    let label = extra_one.addr.to_string();
    assert_eq!(
        admin_json(&lb, "DELETE", &format!("/servers/{label}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        admin_json(&lb, "DELETE", &format!("/pools/api/servers/{label}"), None)
            .await
            .0,
        204
    );
    for (method, path) in [
        ("GET", "/pools/nope/servers"),
        ("POST", "/pools/nope/servers"),
        ("DELETE", "/pools/nope/servers/127.0.0.1:1"),
    ] {
        let body = (method == "POST").then(|| new.clone());
        let (status, err) = admin_json(&lb, method, path, body).await;
        assert_eq!(status, 404, "{method} {path}");
        assert!(err["error"].as_str().unwrap().contains("nope"), "{err}");
    }
}

#[actix_rt::test]
async fn metrics_and_status_name_each_servers_pool() {
    let (a, def) = (Backend::start("a"), Backend::start("def"));
    let extra = format!(
        "[pools.api]\nservers = [\"{}\", \"{}\"]\n[[routes]]\nhost = \"api.test\"\npool = \"api\"\n",
        a.url(),
        def.url()
    );
    let lb = balancer(&[def.url()], &extra);
    for _ in 0..2 {
        ask(&lb, "GET", "/", &[("host", "api.test")]).await;
    }
    ask(&lb, "GET", "/", &[]).await;
    let admin = lb.admin_addr.unwrap();
    let mut res = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    let text = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
    let series = |pool: &str, server: &Backend| {
        format!(
            "roundabout_requests_total{{pool=\"{pool}\",server=\"{}\",class=\"2xx\"}} ",
            server.addr
        )
    };
    assert!(text.contains(&format!("{}1", series("api", &a))), "{text}");
    assert!(
        text.contains(&format!("{}1", series("api", &def))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}1", series("default", &def))),
        "{text}"
    );
    assert!(text.contains(&format!(
        "roundabout_server_healthy{{pool=\"api\",server=\"{}\"}} 1",
        a.addr
    )));
    let mut res = client()
        .get(format!("http://{admin}/status.json"))
        .send()
        .await
        .unwrap();
    let status: Value = res.json().await.unwrap();
    let pools: Vec<&str> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pool"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["default", "api", "api"]);
    assert_eq!(status["pools"][1]["name"], "api");
}

#[actix_rt::test]
async fn a_pool_overrides_health_checks_and_retries_stay_inside_it() {
    let good = Backend::start("good");
    // The api pool's health path fails on `good`, the default pool's passes: the same
    // server is out of one pool and in the other.
    let extra = format!(
        "[pools.api]\nservers = [\"{}\", \"{}\"]\nhealth_check = {{ path = \"/status/500\", unhealthy_threshold = 1 }}\n\
         proxy = {{ retries = 0 }}\n\
         [[routes]]\nhost = \"api.test\"\npool = \"api\"\n",
        good.url(),
        dead_url()
    );
    let lb = balancer(&[good.url()], &extra);
    let out = eventually(Duration::from_secs(5), async || {
        ask(&lb, "GET", "/", &[("host", "api.test")]).await.0 == 503
    })
    .await;
    assert!(out, "every server of the api pool out of rotation");
    let (status, _, h) = ask(&lb, "GET", "/", &[("host", "api.test")]).await;
    assert_eq!(status, 503);
    assert!(h.contains_key("retry-after"));
    assert_eq!(
        ask(&lb, "GET", "/", &[]).await.1,
        "good",
        "still in the default pool"
    );
}
