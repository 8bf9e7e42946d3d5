//! `/metrics` as Prometheus reads it: the OpenMetrics content type, a body that a real
//! OpenMetrics parser (Python's `prometheus_client`, installed by `scripts/test`) accepts,
//! every documented series there from the start, and a stable order.

mod common;

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use common::*;

async fn scrape(lb: &roundabout::Running) -> (String, String) {
    let mut res = client()
        .get(format!("http://{}/metrics", lb.admin_addr.unwrap()))
        .send()
        .await
        .unwrap();
    let kind = res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
    (kind, body)
}

/// The metric families Python's OpenMetrics parser finds in `text`, or its error.
fn parse_with_prometheus_client(text: &str) -> Result<Vec<String>, String> {
    // scripts/test names the Python that has prometheus-client (Debian's, when `python3` on
    // PATH is another one, say pyenv's).
    let python = std::env::var("ROUNDABOUT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             for f in text_string_to_metric_families(sys.stdin.read()):\n    print(f.name)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} runs (scripts/test installs prometheus-client): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[actix_rt::test]
async fn metrics_are_openmetrics_that_a_real_parser_reads_with_every_series_from_the_start() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(
        &urls(&[&a, &b]),
        "[rate_limit]\nenabled = true\nredis_url = \"\"\nrequests = 3\n",
    );
    let (kind, before) = scrape(&lb).await;
    assert_eq!(
        kind,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let families =
        parse_with_prometheus_client(&before).unwrap_or_else(|e| panic!("{e}\n{before}"));
    for family in [
        "roundabout_requests",
        "roundabout_request_duration_seconds",
        "roundabout_in_flight_requests",
        "roundabout_server_healthy",
        "roundabout_health_check_failures",
        "roundabout_rate_limited",
        "roundabout_rate_limit_store_errors",
        "roundabout_rate_limit_fallback",
    ] {
        assert!(
            families.iter().any(|f| f == family),
            "no {family} in {families:?}"
        );
    }
    // Read from the allocator at each scrape; tests/heap_metrics.rs checks its values.
    assert!(
        families.iter().any(|f| f == "roundabout_heap_bytes"),
        "{families:?}"
    );
    let label = a.addr.to_string();
    for series in [
        format!("roundabout_requests_total{{pool=\"default\",server=\"{label}\",class=\"2xx\"}} 0"),
        format!("roundabout_health_check_failures_total{{pool=\"default\",server=\"{label}\"}} 0"),
        "roundabout_rate_limited_total 0".to_string(),
    ] {
        assert!(
            before.contains(&series),
            "{series} missing at start:\n{before}"
        );
    }

    let url = format!("http://{}/", lb.proxy_addr);
    for _ in 0..5 {
        get(&url).await;
    }
    let (_, after) = scrape(&lb).await;
    parse_with_prometheus_client(&after).unwrap_or_else(|e| panic!("{e}\n{after}"));
    assert!(after.contains("roundabout_rate_limited_total 2"), "{after}");
    let (_, again) = scrape(&lb).await;
    let lines = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("roundabout_requests_total"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&after), lines(&again), "the same order twice");
}
