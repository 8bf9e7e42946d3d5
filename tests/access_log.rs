//! The access log of the built binary: nginx's combined fields plus the upstream, its time,
//! the whole time and the request id (or JSON), a line for requests refused before they
//! could be read, a file reopened on SIGUSR1, and X-Request-Id end to end.

mod common;

use std::time::Duration;

use common::*;

/// The binary in front of `backend`, `log` as the body of its `[log]` section.
async fn in_front_of(backend: &Backend, log: &str) -> Binary {
    Binary::in_front_of(backend, &format!("[log]\n{log}")).await
}

/// The access lines among `text`'s: those that start with a client address.
fn access_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("127.0.0.1 - - [") || l.starts_with('{'))
        .map(str::to_string)
        .collect()
}

#[actix_rt::test]
async fn each_request_gets_a_combined_line_with_the_upstream_times_and_request_id() {
    let a = Backend::start("a");
    let p = in_front_of(&a, "").await;
    let res = client()
        .get(p.url("/bytes/1000?x=1"))
        .insert_header(("referer", "http://shop.example/"))
        .insert_header(("user-agent", "tester/1.0"))
        .insert_header(("x-request-id", "req-42"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    assert_eq!(get(&p.url("/status/404")).await.0, 404);
    p.wait_log("\" 404 ", 1).await;
    let lines = access_lines(&p.log());
    assert_eq!(lines.len(), 2, "{}", p.log());
    let upstream = a.addr.to_string();
    // 127.0.0.1 - - [26/Nov/2026:06:28:41 +0000] "GET /bytes/1000?x=1 HTTP/1.1" 200 1000
    // "http://shop.example/" "tester/1.0" 127.0.0.1:5001 0.001 0.002 req-42
    let first = &lines[0];
    assert!(
        first.contains(&format!(
            "] \"GET /bytes/1000?x=1 HTTP/1.1\" 200 1000 \"http://shop.example/\" \"tester/1.0\" {upstream} "
        )),
        "{first}"
    );
    assert!(first.ends_with(" req-42"), "{first}");
    let fields: Vec<&str> = first.rsplit(' ').take(4).collect();
    for t in &fields[1..3] {
        assert!(
            t.parse::<f64>().is_ok(),
            "a time in seconds: {t} in {first}"
        );
    }
    assert!(
        lines[1].contains("\"GET /status/404 HTTP/1.1\" 404 10 \"-\" "),
        "{}",
        lines[1]
    );
}

#[actix_rt::test]
async fn the_json_format_is_one_object_per_line() {
    let a = Backend::start("a");
    let p = in_front_of(&a, "access_log_format = \"json\"\n").await;
    assert_eq!(get(&p.url("/?q=1")).await.0, 200);
    p.wait_log("\"status\":200", 1).await;
    let lines = access_lines(&p.log());
    assert_eq!(lines.len(), 1, "{}", p.log());
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["uri"], "/?q=1");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["upstream"], a.addr.to_string());
    assert_eq!(v["request_id"].as_str().unwrap().len(), 32);
    assert!(v["request_time"].as_f64().unwrap() >= 0.0);
}

#[actix_rt::test]
async fn with_the_access_log_off_nothing_is_written() {
    let a = Backend::start("a");
    let p = in_front_of(&a, "access_log = false\n").await;
    assert_eq!(get(&p.url("/")).await.0, 200);
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert!(access_lines(&p.log()).is_empty(), "{}", p.log());
}

/// A raw HTTP/1.1 answer's header value (name in lower case) and its body.
fn header_and_body<'a>(answer: &'a str, name: &str) -> (Option<&'a str>, &'a str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let value = head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    });
    (value, body)
}

#[actix_rt::test]
async fn a_malformed_request_gets_a_body_saying_why_a_request_id_and_a_400_line() {
    let a = Backend::start("a");
    let p = in_front_of(&a, "").await;
    let addr = format!("127.0.0.1:{}", p.port).parse().unwrap();
    for (bad, why) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            "bad request: both Content-Length and Transfer-Encoding\n",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "bad request: two Content-Length headers\n",
        ),
        (
            b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            "bad request: invalid Header provided\n",
        ),
    ] {
        let answer = raw(addr, bad).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        let (id, body) = header_and_body(&answer, "x-request-id");
        assert_eq!(body, why, "{answer:?}");
        let id = id.unwrap_or_else(|| panic!("no X-Request-Id: {answer:?}"));
        assert_eq!(id.len(), 32, "a new id: {answer:?}");
        assert_eq!(
            header_and_body(&answer, "content-type").0,
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(header_and_body(&answer, "connection").0, Some("close"));
        // The access line has the body's length and the same id.
        p.wait_log(&format!("\"-\" 400 {} ", why.len()), 1).await;
        assert!(
            p.log()
                .lines()
                .any(|l| l.contains(" 400 ") && l.ends_with(id)),
            "{}",
            p.log()
        );
    }
    let log = p.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert_eq!(get(&p.url("/")).await.0, 200, "still serving");
}

#[actix_rt::test]
async fn an_empty_200_from_the_server_is_logged_and_counted_as_200_not_499() {
    // actix-http never polls a body of size 0: the answer must end its record anyway.
    let empty = RawBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let (port, admin) = (free_port(), free_port());
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [\"{}\"]\n[health_check]\ninterval = \"1h\"\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"127.0.0.1:{admin}\"\n",
            empty.url()
        ),
    )
    .await;
    assert_eq!(get(&p.url("/")).await, (200, String::new()));
    p.wait_log("\"GET / HTTP/1.1\" ", 1).await;
    let lines = access_lines(&p.log());
    assert!(lines[0].contains("\"GET / HTTP/1.1\" 200 0 "), "{lines:?}");
    let (_, metrics) = get(&format!("http://127.0.0.1:{admin}/metrics")).await;
    let answered = |class: &str| {
        metrics.lines().any(|l| {
            l.starts_with("roundabout_requests_total{")
                && l.contains(&format!("class=\"{class}\""))
                && l.contains("server=\"127.0.0.1:")
                && !l.ends_with(" 0")
        })
    };
    assert!(
        answered("2xx") && !answered("4xx"),
        "499 is counted as 4xx: {metrics}"
    );
}

#[actix_rt::test]
async fn a_502_line_names_the_last_server_tried() {
    let dead = dead_url();
    let port = free_port();
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
             [balancer]\nservers = [\"{dead}\"]\n[health_check]\ninterval = \"1h\"\n\
             [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n"
        ),
    )
    .await;
    assert_eq!(get(&p.url("/")).await.0, 502);
    p.wait_log("\" 502 ", 1).await;
    let lines = access_lines(&p.log());
    let label = dead.trim_start_matches("http://");
    // `... 502 N "-" "user agent" 127.0.0.1:PORT ...`: not `-`.
    assert!(lines[0].contains(&format!("\" {label} ")), "{lines:?}");
}

#[actix_rt::test]
async fn a_log_file_is_reopened_on_sigusr1_after_it_was_moved() {
    let a = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let p = in_front_of(&a, &format!("access_log = {:?}\n", path.to_str().unwrap())).await;
    assert_eq!(get(&p.url("/before")).await.0, 200);
    let old = dir.path().join("access.log.1");
    assert!(
        eventually(Duration::from_secs(3), async || std::fs::read_to_string(
            &path
        )
        .is_ok_and(|t| t.contains("GET /before")))
        .await
    );
    std::fs::rename(&path, &old).unwrap();
    p.signal(libc::SIGUSR1);
    // The reopen is queued behind the lines before it: this one may go either way.
    assert!(
        eventually(Duration::from_secs(3), async || path.exists()).await,
        "a new file after SIGUSR1"
    );
    assert_eq!(get(&p.url("/after")).await.0, 200);
    assert!(
        eventually(Duration::from_secs(3), async || std::fs::read_to_string(
            &path
        )
        .is_ok_and(|t| t.contains("GET /after")))
        .await
    );
    let rotated = std::fs::read_to_string(&old).unwrap();
    assert!(rotated.contains("GET /before") && !rotated.contains("GET /after"));
    assert!(!p.log().contains("GET /before"), "nothing on stderr");
}

#[actix_rt::test]
async fn an_unwritable_log_file_stops_the_start_naming_the_key() {
    let a = Backend::start("a");
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roundabout"))
        .env("ROUNDABOUT__LISTEN__ADDRESS", format!("127.0.0.1:{port}"))
        .env("ROUNDABOUT__ADMIN__ADDRESS", "")
        .env("ROUNDABOUT__BALANCER__SERVERS", a.url())
        .env("ROUNDABOUT__LOG__ACCESS_LOG", "/nonexistent/dir/access.log")
        .args(["--config", "config/default.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.access_log /nonexistent/dir/access.log"),
        "{err}"
    );
}

#[actix_rt::test]
async fn the_request_id_goes_upstream_and_back_and_is_made_when_missing() {
    let a = Backend::start("a");
    let lb = balancer(&[a.url()], "");
    let url = format!("http://{}/headers", lb.proxy_addr);
    let sent = |res: &awc::ClientResponse| {
        res.headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let upstream_saw = |body: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p[0] == "x-request-id")
            .map(|p| p[1].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };

    let mut res = client()
        .get(&url)
        .insert_header(("x-request-id", "abc-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent(&res), "abc-123");
    assert_eq!(upstream_saw(&res.body().await.unwrap()), ["abc-123"]);

    let mut res = client().get(&url).send().await.unwrap();
    let made = sent(&res);
    assert_eq!(made.len(), 32);
    assert_eq!(upstream_saw(&res.body().await.unwrap()), [made]);

    let mut res = client()
        .get(&url)
        .insert_header(("x-request-id", "x".repeat(201)))
        .send()
        .await
        .unwrap();
    let replaced = sent(&res);
    assert_eq!(replaced.len(), 32, "too long: replaced");
    assert_eq!(upstream_saw(&res.body().await.unwrap()), [replaced]);

    // Answers of roundabout's own carry one too.
    let refused = raw(
        lb.proxy_addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nExpect: nothing\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 417"), "{refused:?}");
    assert!(
        refused.to_ascii_lowercase().contains("x-request-id: "),
        "{refused:?}"
    );
}

#[actix_rt::test]
async fn a_head_not_complete_in_time_gets_a_408_line() {
    use tokio::io::AsyncWriteExt as _;
    let a = Backend::start("a");
    let port = free_port();
    let p = Binary::start(
        port,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\nheader_timeout = \"1s\"\n\
             [balancer]\nservers = [\"{}\"]\n[rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n",
            a.url()
        ),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let why = "request timeout: request head not complete in time\n";
    p.wait_log(&format!("\"-\" 408 {} ", why.len()), 1).await;
    // The answer says why, as every answer of our own.
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert_eq!(header_and_body(&answer, "x-request-id").1, why);
    assert!(header_and_body(&answer, "x-request-id").0.is_some());
    assert!(!p.log().contains("ERROR"), "{}", p.log());
}
