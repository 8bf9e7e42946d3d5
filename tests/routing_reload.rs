//! Routes and pools in the built binary: SIGHUP replaces the route table while requests
//! flow, a pool gone from the file drains and goes, the JSON access log names the pool and
//! the route, and a bad route or pool is refused at start in one line naming it.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use serde_json::Value;

/// A binary's config: `pools` (TOML) and one route for `app.test` to `pool`.
fn config(port: u16, admin: u16, default: &Backend, pools: &str, pool: &str, log: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 2\n\
         [balancer]\nservers = [\"{}\"]\n\
         [health_check]\npath = \"/health\"\ninterval = \"200ms\"\n\
         [rate_limit]\nenabled = false\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\
         [log]\n{log}\n\
         {pools}\n[[routes]]\nname = \"app\"\nhost = \"app.test\"\npool = \"{pool}\"\n",
        default.url()
    )
}

async fn pools_of(admin: u16) -> Value {
    let mut res = client()
        .get(format!("http://127.0.0.1:{admin}/pools"))
        .send()
        .await
        .unwrap();
    res.json().await.unwrap()
}

#[actix_rt::test]
async fn a_reload_swaps_the_route_table_under_traffic_and_a_pool_gone_drains_then_goes() {
    let (old, new, def) = (
        Backend::start("old"),
        Backend::start("new"),
        Backend::start("def"),
    );
    let (port, admin) = (free_port(), free_port());
    let old_pool = format!("[pools.blue]\nservers = [\"{}\"]\n", old.url());
    let new_pool = format!("[pools.green]\nservers = [\"{}\"]\n", new.url());
    let quiet = "access_log = false";
    let lb = Binary::start(port, &config(port, admin, &def, &old_pool, "blue", quiet)).await;

    // Clients that never stop asking while the table changes under them.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, answers, url) = (stop.clone(), answers.clone(), lb.url("/"));
        clients.push(actix_rt::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let answer = match c.get(&url).insert_header(("host", "app.test")).send().await {
                    Ok(mut res) => {
                        let body = res.body().await.map(|b| b.to_vec()).unwrap_or_default();
                        (
                            res.status().as_u16(),
                            String::from_utf8_lossy(&body).into_owned(),
                        )
                    }
                    Err(e) => (0, e.to_string()),
                };
                answers.lock().unwrap().push(answer);
            }
        }));
    }
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    lb.rewrite_config(&config(port, admin, &def, &new_pool, "green", quiet));
    lb.signal(libc::SIGHUP);
    lb.wait_log("configuration reloaded (SIGHUP)", 1).await;
    let log = lb.log();
    assert!(
        log.contains("new pool green") && log.contains("pool blue gone (draining)"),
        "{log}"
    );
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let failed: Vec<&(u16, String)> = answers
        .iter()
        .filter(|(s, b)| *s != 200 || (b != "old" && b != "new"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    let switched = answers
        .iter()
        .position(|(_, b)| b == "new")
        .expect("the new pool answers");
    assert!(
        answers[switched..]
            .iter()
            .filter(|(_, b)| b == "old")
            .count()
            <= 4,
        "once the new table is in, only requests that read the old one go to the old pool"
    );
    assert!(answers.iter().any(|(_, b)| b == "old"));

    // The retired pool is shown draining, then goes once its grace is over.
    let pools = pools_of(admin).await;
    assert_eq!(pools["green"]["servers"].as_array().unwrap().len(), 1);
    let gone = eventually(Duration::from_secs(10), async || {
        pools_of(admin).await.get("blue").is_none()
    })
    .await;
    assert!(gone, "{}", pools_of(admin).await);
    assert_eq!(
        get(&lb.url("/")).await.1,
        "def",
        "no route: the default pool"
    );
}

#[actix_rt::test]
async fn the_json_access_log_names_the_pool_and_the_route() {
    let (api, def) = (Backend::start("api"), Backend::start("def"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let (port, admin) = (free_port(), free_port());
    let log = format!(
        "access_log = \"{}\"\naccess_log_format = \"json\"",
        path.display()
    );
    let api_pool = format!("[pools.api]\nservers = [\"{}\"]\n", api.url());
    let lb = Binary::start(port, &config(port, admin, &def, &api_pool, "api", &log)).await;
    let mut res = client()
        .get(lb.url("/x"))
        .insert_header(("host", "app.test"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.body().await.unwrap(), "api");
    assert_eq!(get(&lb.url("/y")).await.1, "def");
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), async || lines().len() >= 2).await);
    let lines = lines();
    let of = |uri: &str| lines.iter().find(|l| l["uri"] == uri).unwrap().clone();
    assert_eq!(
        (of("/x")["pool"].as_str(), of("/x")["route"].as_str()),
        (Some("api"), Some("app"))
    );
    assert_eq!(of("/x")["upstream"], api.addr.to_string());
    assert_eq!(
        (of("/y")["pool"].as_str(), of("/y")["route"].as_str()),
        (Some("default"), None)
    );
}

#[test]
fn a_bad_route_or_pool_is_refused_at_start_in_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[pools.api]\nservers = []\n[[routes]]\n[[routes]]\n[[routes]]\npool = \"apii\"\n",
            "routes[3].pool: \"apii\" is not a pool (pools: default, api)",
        ),
        (
            "[[routes]]\nrequest_headers = { set = { x-forwarded-for = \"1.2.3.4\" } }\n",
            "routes[1].request_headers.set.x-forwarded-for: x-forwarded-for cannot be set",
        ),
        (
            "[[routes]]\nresponse_headers = { remove = [\"transfer-encoding\"] }\n",
            "routes[1].response_headers.remove[0]: transfer-encoding cannot be set or removed",
        ),
        (
            "[[routes]]\nredirect_https = true\n",
            "routes[1].redirect_https: needs listen.tls_address",
        ),
        (
            "[pools.api]\nstrategy = \"fastest\"\n",
            "pools.api.strategy: \"fastest\" is not one of",
        ),
    ];
    for (text, want) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, format!("[rate_limit]\nredis_url = \"\"\n{text}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_roundabout"))
            .args(["--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(want), "{text:?} gave {err:?}, wanted {want:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}
