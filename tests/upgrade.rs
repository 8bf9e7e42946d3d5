//! SIGUSR2 over real sockets: the built binary started again at its own path, handed the
//! listeners, under continuous keep-alive load from several clients (every failed request
//! counted: none may fail), the old process draining with `Connection: close` and exiting
//! 0, the new one serving, reloading on SIGHUP and stopping on SIGTERM; a bad config or an
//! executable gone at upgrade time leaving the old process serving, with the reason logged.
//!
//! The new process outlives the one the test started; the test makes itself their reaper
//! (`become_subreaper`) to wait for it and read its exit status.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{handover::*, *};

/// The config of these tests: the proxy on `port`, two workers, the admin API on `admin`.
fn config(port: u16, admin: u16, servers: &[&Backend]) -> String {
    let servers: Vec<String> = servers.iter().map(|b| format!("\"{}\"", b.url())).collect();
    format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 2\n\
         [balancer]\nservers = [{}]\n[rate_limit]\nenabled = false\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\n[log]\naccess_log = false\n",
        servers.join(", ")
    )
}

/// One answer read off a kept-alive connection: its status, whether it said
/// `Connection: close`, and its body.
fn read_answer(conn: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool, String)> {
    let mut status = String::new();
    if conn.read_line(&mut status)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let code = status.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (mut close, mut length) = (false, 0usize);
    loop {
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        close |= line == "connection: close";
        if let Some(v) = line.strip_prefix("content-length: ") {
            length = v.parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok((code, close, String::from_utf8_lossy(&body).into_owned()))
}

/// What the clients of [`load`] saw.
#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Answers that said `Connection: close` (the client then opened a new connection).
    closed: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

/// `clients` threads sending `GET /` back to back, each on a kept-alive connection, opening
/// a new one only when an answer says `Connection: close`, until `stop`. A failure is any
/// error, an answer that is not 200, or a connection that closes unannounced.
fn load(
    to: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Counts>, Vec<std::thread::JoinHandle<()>>) {
    let counts = Arc::new(Counts::default());
    let threads = (0..clients)
        .map(|_| {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let fail = |why: String| {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        counts.errors.lock().unwrap().push(why);
                    };
                    if conn.is_none() {
                        match TcpStream::connect(to) {
                            Ok(s) => {
                                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                conn = Some(BufReader::new(s));
                            }
                            Err(e) => {
                                fail(format!("connect: {e}"));
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        }
                    }
                    let c = conn.as_mut().unwrap();
                    let answer = c
                        .get_mut()
                        .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                        .and_then(|()| read_answer(c));
                    match answer {
                        Ok((200, close, _)) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                            if close {
                                counts.closed.fetch_add(1, Ordering::Relaxed);
                                conn = None;
                            }
                        }
                        Ok((status, _, body)) => {
                            fail(format!("{status} {body}"));
                            conn = None;
                        }
                        Err(e) => {
                            fail(format!("{e}"));
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    (counts, threads)
}

/// `GET /status.json`'s `pid` on the admin API at `admin`.
async fn status_pid(admin: u16) -> i64 {
    let mut res = client()
        .get(format!("http://127.0.0.1:{admin}/status.json"))
        .send()
        .await
        .unwrap();
    let json: serde_json::Value = res.json().limit(1 << 20).await.unwrap();
    json["pid"].as_i64().expect("a pid")
}

/// The pid in the log line that says an upgrade's new process serves.
async fn new_pid(p: &Binary) -> i32 {
    p.wait_log("upgrade (SIGUSR2): process", 1).await;
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("upgrade (SIGUSR2): process"))
        .unwrap();
    line.split("process ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until the test's own child `p` exits: its exit code.
async fn exit_code(p: &mut Binary, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status.code();
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[actix_rt::test]
async fn sigusr2_under_keep_alive_load_loses_no_request_and_the_new_process_takes_over() {
    become_subreaper();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let (port, admin) = (free_port(), free_port());
    let mut p = Binary::start(port, &config(port, admin, &[&a])).await;
    let old = p.child.id() as i64;
    assert_eq!(status_pid(admin).await, old);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // A kept-alive connection left idle across the upgrade: never closed unannounced.
    let mut idle = BufReader::new(TcpStream::connect(to).unwrap());
    idle.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut idle).unwrap(), (200, false, "a".into()));

    let stop = Arc::new(AtomicBool::new(false));
    let (counts, clients) = load(to, 4, stop.clone());
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    let before = counts.ok.load(Ordering::Relaxed);
    p.signal(libc::SIGUSR2);
    let new = Orphan(new_pid(&p).await);
    assert_ne!(new.0 as i64, old);

    // The old process drains: its idle connection's next request is answered, with
    // `Connection: close`, and then closed.
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let last = actix_rt::task::spawn_blocking(move || {
        idle.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answer = read_answer(&mut idle).unwrap();
        let mut rest = Vec::new();
        let closed = idle.read_to_end(&mut rest).map(|_| rest.is_empty());
        (answer, closed.unwrap_or(false))
    })
    .await
    .unwrap();
    assert_eq!(last, ((200, true, "a".to_string()), true));

    let started = Instant::now();
    assert_eq!(
        exit_code(&mut p, Duration::from_secs(35)).await,
        Some(0),
        "{}",
        p.log()
    );
    let drained_in = started.elapsed();
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        actix_rt::task::spawn_blocking(move || c.join().unwrap())
            .await
            .unwrap();
    }
    let (ok, failed, closed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.closed.load(Ordering::Relaxed),
    );
    println!(
        "SIGUSR2 under load: {ok} requests answered ({before} before the signal), {failed} failed, \
         {closed} answered with Connection: close; the old process drained in {drained_in:?}"
    );
    assert_eq!(failed, 0, "{:?}", counts.errors.lock().unwrap());
    assert!(closed >= 4, "each client was told to reconnect: {closed}");
    assert!(ok > before + 100, "the new process served the load: {ok}");
    assert_eq!(status_pid(admin).await, new.0 as i64);

    // The new process is operated as usual: SIGHUP reloads the file (written where the old
    // one wrote its log), SIGTERM stops it with exit 0.
    p.rewrite_config(&config(port, admin, &[&a, &b]));
    new.signal(libc::SIGHUP);
    p.wait_log("configuration reloaded (SIGHUP): added", 1)
        .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        seen.insert(get(&format!("http://{to}/")).await.1);
    }
    assert!(seen.contains("b"), "{seen:?}");
    new.signal(libc::SIGTERM);
    let code = actix_rt::task::spawn_blocking(move || new.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{}", p.log());
}

#[actix_rt::test]
async fn a_bad_config_at_upgrade_time_leaves_the_old_process_serving_with_the_reason_logged() {
    become_subreaper();
    let a = Backend::start("a");
    let (port, admin) = (free_port(), free_port());
    let good = config(port, admin, &[&a]);
    let mut p = Binary::start(port, &good).await;
    let old = p.child.id() as i64;
    p.rewrite_config(&good.replace("enabled = false", "enabled = true\nwindow = \"0s\""));
    p.signal(libc::SIGUSR2);
    p.wait_log("upgrade (SIGUSR2) failed", 1).await;
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("upgrade (SIGUSR2) failed"))
        .unwrap();
    assert!(line.contains("rate_limit.window"), "says why: {line}");
    assert!(line.contains("keeps serving"), "{line}");
    assert_eq!(get(&p.url("/")).await, (200, "a".to_string()));
    assert_eq!(status_pid(admin).await, old);
    assert!(p.child.try_wait().unwrap().is_none());

    // Mended, the next SIGUSR2 goes through.
    p.rewrite_config(&good);
    p.signal(libc::SIGUSR2);
    let new = Orphan(new_pid(&p).await);
    assert_eq!(
        exit_code(&mut p, Duration::from_secs(35)).await,
        Some(0),
        "{}",
        p.log()
    );
    assert_eq!(get(&p.url("/")).await, (200, "a".to_string()));
    assert_eq!(status_pid(admin).await, new.0 as i64);
}

#[actix_rt::test]
async fn the_executable_at_the_path_is_what_runs_and_one_gone_is_a_logged_failure() {
    become_subreaper();
    let a = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("roundabout");
    std::fs::copy(env!("CARGO_BIN_EXE_roundabout"), &exe).unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut p = Binary::start_exe(&exe, port, &config(port, admin, &[&a]), &[]).await;

    std::fs::remove_file(&exe).unwrap();
    p.signal(libc::SIGUSR2);
    p.wait_log("upgrade (SIGUSR2) failed", 1).await;
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("upgrade (SIGUSR2) failed"))
        .unwrap();
    assert!(
        line.contains("cannot execute") && line.contains(exe.to_str().unwrap()),
        "{line}"
    );
    assert_eq!(get(&p.url("/")).await.0, 200);

    // A new file at the path (a new build): that is what the new process runs.
    std::fs::copy(env!("CARGO_BIN_EXE_roundabout"), &exe).unwrap();
    p.signal(libc::SIGUSR2);
    let new = Orphan(new_pid(&p).await);
    let running = std::fs::read_link(format!("/proc/{}/exe", new.0)).unwrap();
    assert_eq!(running, exe);
    assert_eq!(
        exit_code(&mut p, Duration::from_secs(35)).await,
        Some(0),
        "{}",
        p.log()
    );
    assert_eq!(get(&p.url("/")).await.0, 200);
}
