//! TLS termination and HTTPS upstreams, over real sockets with certificates made here
//! (rcgen, ECDSA P-256): HTTP/1.1 and HTTP/2 clients (awc over rustls, and curl), names the
//! certificate does not cover, stalled handshakes, certificate reload, bad files, and
//! `https://` servers with a private CA and with an untrusted certificate.

mod common;

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{tls::*, *};
use futures_util::StreamExt as _;
use roundabout::tls::{CertStore, ServerCert};

/// The `[listen]` section of a balancer with both listeners on `plain` and `tls`.
fn listen(plain: &str, tls: &str, (cert, key): &(PathBuf, PathBuf)) -> String {
    format!(
        "[listen]\naddress = \"{plain}\"\nworkers = 1\ntls_address = \"{tls}\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\n",
        cert.display(),
        key.display()
    )
}

fn tls_url(running: &roundabout::Running, path: &str) -> String {
    format!("https://{}{path}", running.tls_addr.unwrap())
}

/// The backend's `/headers` answer: the value of `name`, if it saw one.
fn seen(json: &serde_json::Value, name: &str) -> Option<String> {
    json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|h| (h[0].as_str() == Some(name)).then(|| h[1].as_str().unwrap().to_string()))
}

async fn fetch(client: &awc::Client, url: &str) -> (awc::http::Version, u16, Vec<u8>) {
    let mut res = client.get(url).send().await.expect("answer");
    let body = res.body().limit(64 << 20).await.unwrap();
    (res.version(), res.status().as_u16(), body.to_vec())
}

#[actix_rt::test]
async fn http1_and_http2_clients_get_answers_and_the_spec_headers_through_tls() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server", "server", false);
    let lb = balancer(
        &urls(&[&a, &b]),
        &listen("127.0.0.1:0", "127.0.0.1:0", &leaf),
    );
    let (h1, h2) = (https_client(&ca, &["http/1.1"]), https_client(&ca, &["h2"]));

    // One round-robin cycle per worker, whichever listener the request came in on.
    let plain = format!("http://{}/", lb.proxy_addr);
    let mut names = Vec::new();
    for (client, url) in [
        (&client(), plain.clone()),
        (&h1, tls_url(&lb, "/")),
        (&h2, tls_url(&lb, "/")),
        (&client(), plain.clone()),
    ] {
        let (_, status, body) = fetch(client, &url).await;
        assert_eq!(status, 200);
        names.push(String::from_utf8(body).unwrap());
    }
    assert_eq!(names, ["a", "b", "a", "b"]);

    let authority = lb.tls_addr.unwrap().to_string();
    for (client, version) in [
        (&h1, awc::http::Version::HTTP_11),
        (&h2, awc::http::Version::HTTP_2),
    ] {
        let (v, status, body) = fetch(client, &tls_url(&lb, "/headers")).await;
        assert_eq!((v, status), (version, 200));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // HTTP/2's :authority is the Host an HTTP/1.1 server gets.
        assert_eq!(seen(&json, "host").as_deref(), Some(authority.as_str()));
        assert_eq!(seen(&json, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(seen(&json, "x-forwarded-host"), Some(authority.clone()));
    }
    // HTTP/2 may send each cookie as a field of its own; an HTTP/1.1 server gets one.
    let mut res = h2
        .get(tls_url(&lb, "/headers"))
        .append_header(("cookie", "a=1"))
        .append_header(("cookie", "b=2"))
        .send()
        .await
        .unwrap();
    let json: serde_json::Value = res.json().await.unwrap();
    let cookies: Vec<_> = json["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "cookie")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1; b=2"]);

    let (_, _, body) = fetch(&client(), &format!("{plain}headers")).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen(&json, "x-forwarded-proto").as_deref(), Some("http"));
}

#[actix_rt::test]
async fn http2_bodies_stream_both_ways_and_a_get_has_none() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server", "server", false);
    let lb = balancer(&urls(&[&a]), &listen("127.0.0.1:0", "127.0.0.1:0", &leaf));
    let h2 = https_client(&ca, &["h2"]);

    // An upload of unknown length (no Content-Length, as HTTP/2 allows): 3 MiB in 64 KiB
    // DATA frames, hashed by the server.
    let chunk = web_bytes(64 * 1024);
    let upload =
        futures_util::stream::iter((0..48).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let mut res = h2
        .post(tls_url(&lb, "/sha256"))
        .send_stream(upload)
        .await
        .unwrap();
    assert_eq!(res.version(), awc::http::Version::HTTP_2);
    let body = res.body().await.unwrap();
    let want = {
        use sha2::Digest as _;
        format!(
            "{} {:x}",
            3 << 20,
            sha2::Sha256::digest(vec![b'x'; 3 << 20])
        )
    };
    assert_eq!(String::from_utf8_lossy(&body), want);

    // A GET ends its stream with its head: the server sees no body at all.
    let (_, _, body) = fetch(&h2, &tls_url(&lb, "/headers")).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen(&json, "transfer-encoding"), None, "{json}");
    assert_eq!(seen(&json, "content-length"), None, "{json}");

    // A download streams back whole.
    let mut res = h2.get(tls_url(&lb, "/bytes/5000000")).send().await.unwrap();
    let mut n = 0;
    while let Some(chunk) = res.next().await {
        n += chunk.unwrap().len();
    }
    assert_eq!(n, 5_000_000);
}

fn web_bytes(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; n])
}

/// Runs curl with `args` (and `stdin`), off the test's thread; returns its stdout.
async fn curl(args: Vec<String>, stdin: Vec<u8>) -> String {
    actix_rt::task::spawn_blocking(move || {
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl is installed (scripts/test installs it)");
        child.stdin.take().unwrap().write_all(&stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

#[actix_rt::test]
async fn curl_over_http2_is_limited_balanced_and_answered_as_over_http1() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server", "server", false);
    let extra = listen("127.0.0.1:0", "127.0.0.1:0", &leaf)
        + "[rate_limit]\nenabled = true\nrequests = 3\nwindow = \"60s\"\nredis_url = \"\"\n";
    let lb = balancer(&urls(&[&a]), &extra);
    let base = |http: &str, path: &str| {
        vec![
            http.to_string(),
            "--cacert".into(),
            ca.pem().display().to_string(),
            "-D".into(),
            "-".into(),
            tls_url(&lb, path),
        ]
    };

    let answer = curl(base("--http2", "/"), Vec::new()).await;
    assert!(answer.starts_with("HTTP/2 200"), "{answer}");
    assert!(answer.contains("x-ratelimit-remaining: 2"), "{answer}");
    assert!(answer.ends_with("a"), "{answer}");

    // A streamed upload from stdin (no Content-Length over HTTP/2).
    let mut args = base("--http2", "/sha256");
    args.extend(["-T".into(), "-".into()]);
    let answer = curl(args, vec![b'x'; 1 << 20]).await;
    let want = {
        use sha2::Digest as _;
        format!(
            "{} {:x}",
            1 << 20,
            sha2::Sha256::digest(vec![b'x'; 1 << 20])
        )
    };
    assert!(
        answer.starts_with("HTTP/2 200") && answer.ends_with(&want),
        "{answer}"
    );

    let answer = curl(base("--http1.1", "/"), Vec::new()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = curl(base("--http2", "/"), Vec::new()).await;
    assert!(answer.starts_with("HTTP/2 429"), "{answer}");
    assert!(answer.contains("retry-after: "), "{answer}");
    assert!(answer.contains("x-ratelimit-remaining: 0"), "{answer}");

    // Failure answers are the same over HTTP/2.
    let dead = balancer(&[dead_url()], &listen("127.0.0.1:0", "127.0.0.1:0", &leaf));
    let mut args = base("--http2", "/");
    *args.last_mut().unwrap() = tls_url(&dead, "/");
    let answer = curl(args, Vec::new()).await;
    assert!(answer.starts_with("HTTP/2 502"), "{answer}");
    assert!(
        answer.contains("could not reach an upstream server"),
        "{answer}"
    );
}

#[actix_rt::test]
async fn a_name_the_certificate_does_not_cover_gets_it_anyway_and_refuses_it() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server", "server", false);
    let lb = balancer(&urls(&[&a]), &listen("127.0.0.1:0", "127.0.0.1:0", &leaf));
    let addr = lb.tls_addr.unwrap();
    let config = ca.client(&["http/1.1"]);
    let statuses = actix_rt::task::spawn_blocking(move || {
        let wrong = connect(addr, "other.example", config.clone()).map(|_| ());
        let err = wrong.expect_err("a certificate for localhost is refused for other.example");
        assert!(
            err.to_string()
                .contains("not valid for name \"other.example\""),
            "{err}"
        );
        // The listener goes on: by name, and by address (no SNI at all).
        let mut by_name = connect(addr, "localhost", config.clone()).unwrap();
        let mut by_ip = connect(addr, "127.0.0.1", config).unwrap();
        [get_on(&mut by_name), get_on(&mut by_ip)]
    })
    .await
    .unwrap();
    assert_eq!(statuses, [200, 200]);
}

#[actix_rt::test]
async fn a_stalled_handshake_is_closed_after_ten_seconds() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server", "server", false);
    let lb = balancer(&urls(&[&a]), &listen("127.0.0.1:0", "127.0.0.1:0", &leaf));
    let addr = lb.tls_addr.unwrap();
    let started = Instant::now();
    // One client sends nothing; one sends the start of a ClientHello and stops.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // Meanwhile others are served.
    let (_, status, _) = fetch(&https_client(&ca, &["h2"]), &tls_url(&lb, "/")).await;
    assert_eq!(status, 200);
    for mut stream in [silent, partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await;
        let closed_at = started.elapsed();
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed, not {read:?}"
        );
        assert!(
            closed_at >= Duration::from_millis(9_500) && closed_at <= Duration::from_secs(12),
            "closed after {closed_at:?}"
        );
    }
}

#[actix_rt::test]
async fn https_servers_are_verified_with_upstream_ca_named_by_sni_and_health_checked() {
    let ca = Ca::new("private CA");
    let (cert, key) = ca.leaf("upstream", "upstream", false);
    let recording = Arc::new(RecordingCert {
        key: ServerCert::load(&cert, &key).unwrap().key,
        names: Mutex::new(Vec::new()),
    });
    let a = Backend::start_tls("secure", server_tls(recording.clone()));
    let server = format!("https://localhost:{}", a.addr.port());
    let extra = format!("[proxy]\nupstream_ca = \"{}\"\n", ca.pem().display());
    let lb = balancer(&[server], &extra);

    let (status, body) = get(&format!("http://{}/", lb.proxy_addr)).await;
    assert_eq!((status, body.as_str()), (200, "secure"));
    let (_, body) = get(&format!("http://{}/headers", lb.proxy_addr)).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The client's Host goes upstream; the TLS name is the server's own.
    assert_eq!(seen(&json, "host"), Some(lb.proxy_addr.to_string()));

    // Probes go over HTTPS too, and pass: the server stays in rotation.
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    let servers: serde_json::Value = client()
        .get(format!("http://{}/servers", lb.admin_addr.unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(servers[0]["healthy"], true, "{servers}");
    let names = recording.names.lock().unwrap().clone();
    assert!(names.len() >= 3, "requests and probes connected: {names:?}");
    assert!(
        names.iter().all(|n| n.as_deref() == Some("localhost")),
        "{names:?}"
    );
}

/// The `[listen]` of a binary: both listeners on free ports; returns (text, plain, tls).
fn binary_listen(leaf: &(PathBuf, PathBuf)) -> (String, u16, u16) {
    let (plain, tls) = (free_port(), free_port());
    let text = listen(
        &format!("127.0.0.1:{plain}"),
        &format!("127.0.0.1:{tls}"),
        leaf,
    )
        + "[admin]\naddress = \"\"\n[log]\naccess_log = false\n[rate_limit]\nenabled = false\n";
    (text, plain, tls)
}

#[actix_rt::test]
async fn an_untrusted_https_server_is_a_502_and_logged_once() {
    let ca = Ca::new("private CA");
    let stranger = Ca::new("someone else's CA");
    let (cert, key) = stranger.leaf("upstream", "upstream", false);
    let loaded = ServerCert::load(&cert, &key).unwrap();
    let a = Backend::start_tls("a", roundabout::tls::server_config(CertStore::new(&loaded)));
    let (listen, port, _) = binary_listen(&ca.leaf("server", "server", false));
    // By address: `localhost` is a name, one server per address it resolves to (::1
    // too, where nothing listens), which would muddle the one failure this test watches.
    let config = format!(
        "{listen}[balancer]\nservers = [\"https://127.0.0.1:{}\"]\n\
         [health_check]\ninterval = \"1h\"\n",
        a.addr.port()
    );
    let bin = Binary::start(port, &config).await;

    let (status, body) = get(&bin.url("/")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("invalid peer certificate"), "{body}");
    bin.wait_log("down:", 1).await;
    let (status, _) = get(&bin.url("/")).await;
    assert_eq!(status, 503, "out of rotation now");
    let log = bin.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("invalid peer certificate"))
        .count();
    assert_eq!(lines, 1, "{log}");
    assert_eq!(a.hits(), 0);
}

/// `roundabout --check` on `config`: (success, stderr).
fn check(config: &str) -> (bool, String) {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(config.as_bytes()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roundabout"))
        .args(["--check", "--config", file.path().to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_certificate_files_fail_the_check_with_one_line_naming_the_file() {
    let ca = Ca::new("test CA");
    let good = ca.leaf("good", "good", false);
    let other = ca.leaf("other", "other", false);
    let missing = (ca.dir.path().join("missing.pem"), good.1.clone());
    let unreadable = (good.0.clone(), ca.dir.path().to_path_buf());
    let mismatched = (good.0.clone(), other.1.clone());
    let not_pem = (ca.pem(), ca.pem());
    let (ok, err) = check(&listen("127.0.0.1:8000", "127.0.0.1:8443", &good));
    assert!(ok, "{err}");
    for (files, key, words) in [
        (&missing, "listen.tls.cert", "missing.pem: cannot read"),
        (&unreadable, "listen.tls.key", "cannot read"),
        (
            &mismatched,
            "listen.tls.key",
            "does not match the certificate",
        ),
        (&not_pem, "listen.tls.key", "no PEM private key"),
    ] {
        let (ok, err) = check(&listen("127.0.0.1:8000", "127.0.0.1:8443", files));
        assert!(!ok, "{files:?} passed");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key) && err.contains(words), "{err}");
    }
    let (ok, err) = check("[listen]\ntls_address = \"127.0.0.1:8443\"\n");
    assert!(!ok && err.contains("listen.tls:"), "{err}");
    let (ok, err) = check("[listen]\naddress = \"\"\n");
    assert!(!ok && err.contains("listen.address"), "{err}");
    // TLS alone is enough.
    let only_tls = listen("", "127.0.0.1:8443", &good);
    let (ok, err) = check(&only_tls);
    assert!(ok, "{err}");
}

#[actix_rt::test]
async fn an_expired_certificate_starts_with_a_warning_naming_it_and_its_date() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let expired = ca.leaf("old", "old", true);
    let (listen, port, _) = binary_listen(&expired);
    let config = format!("{listen}[balancer]\nservers = [\"{}\"]\n", a.url());
    let bin = Binary::start(port, &config).await;
    bin.wait_log("WARN", 1).await;
    let log = bin.log();
    let warning = log.lines().find(|l| l.contains("WARN")).unwrap();
    assert!(
        warning.contains(&expired.0.display().to_string()) && warning.contains("2020-01-01"),
        "{log}"
    );
}

#[actix_rt::test]
async fn sighup_gives_new_handshakes_the_new_certificate_and_keeps_open_connections() {
    let a = Backend::start("a");
    let ca = Ca::new("test CA");
    let live = ca.leaf("live", "first", false);
    let (listen, port, tls) = binary_listen(&live);
    let config = format!("{listen}[balancer]\nservers = [\"{}\"]\n", a.url());
    let bin = Binary::start(port, &config).await;
    let addr: SocketAddr = ([127, 0, 0, 1], tls).into();
    let client = ca.client(&["http/1.1"]);

    let first = leaf_der(&live.0);
    let mut open = connect(addr, "localhost", client.clone()).unwrap();
    assert_eq!(get_on(&mut open), 200);
    assert_eq!(peer_cert(&open), first);

    // A new certificate in the same files, then SIGHUP.
    let second = ca.leaf("next", "second", false);
    std::fs::copy(&second.0, &live.0).unwrap();
    std::fs::copy(&second.1, &live.1).unwrap();
    bin.signal(libc::SIGHUP);
    bin.wait_log("new TLS certificate", 1).await;
    let mut fresh = connect(addr, "localhost", client.clone()).unwrap();
    assert_eq!(peer_cert(&fresh), leaf_der(&second.0));
    assert_eq!(get_on(&mut fresh), 200);
    assert_eq!(get_on(&mut open), 200, "the open connection is kept");

    // A key that does not match is refused with one line; the certificate stays.
    let third = ca.leaf("third", "third", false);
    std::fs::copy(&third.0, &live.0).unwrap();
    bin.signal(libc::SIGHUP);
    bin.wait_log("reload (SIGHUP) refused", 1).await;
    let refused = bin.log();
    let line = refused.lines().find(|l| l.contains("refused")).unwrap();
    assert!(line.contains("listen.tls.key"), "{refused}");
    let mut after = connect(addr, "localhost", client).unwrap();
    assert_eq!(peer_cert(&after), leaf_der(&second.0));
    assert_eq!(get_on(&mut after), 200);
}
