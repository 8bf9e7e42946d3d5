//! `scripts/demo`, as the README has a new user run it: on the binaries this build made
//! (`ROUNDABOUT_BIN_DIR`, no cargo build), on free ports, with a state directory of its own
//! (`ROUNDABOUT_DEMO_DIR`) so that tests and a user's own demo do not meet.

mod common;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo");

/// The directory of the binaries `cargo test` built: roundabout, and the demo backend among
/// the examples (which `cargo test` builds too, unless the tests are selected by name).
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_roundabout"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        dir.join("examples/backend").exists(),
        "{}/examples/backend is missing: cargo build --example backend",
        dir.display()
    );
    dir
}

/// `scripts/demo ARGS` with `env`, its state in `state`.
fn command(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(SCRIPT);
    cmd.args(args)
        .env("ROUNDABOUT_BIN_DIR", bin_dir())
        .env("ROUNDABOUT_DEMO_DIR", state)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SIGINT as a terminal's Ctrl-C finds it: a test run started in the background by a
    // non-interactive shell inherits SIGINT ignored, and bash cannot trap a signal ignored
    // when it started, so the demo would never see the Ctrl-C the test sends.
    // SAFETY: signal(2) is async-signal-safe, as pre_exec asks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

/// Runs `scripts/demo` with `env` until it exits (within 20 s): its exit code and
/// everything it wrote.
fn demo(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let state = tempfile::tempdir().unwrap();
    let mut running = Demo::spawn(state.path().join("demo"), env);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "scripts/demo still running after 20 s:\n{}",
            running.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), running.output())
}

/// A running `scripts/demo`, stopped (SIGTERM: it stops what it started) when dropped.
struct Demo {
    child: Child,
    state: PathBuf,
    output: tempfile::NamedTempFile,
}

impl Demo {
    fn spawn(state: PathBuf, env: &[(&str, &str)]) -> Demo {
        let output = tempfile::NamedTempFile::new().unwrap();
        let child = command(&state, &[], env)
            .stdout(Stdio::from(output.reopen().unwrap()))
            .stderr(Stdio::from(output.reopen().unwrap()))
            .spawn()
            .unwrap();
        Demo {
            child,
            state,
            output,
        }
    }

    /// Everything it wrote so far (roundabout's log among it).
    fn output(&self) -> String {
        std::fs::read_to_string(self.output.path()).unwrap()
    }

    /// Waits until its output has `n` lines containing `needle`, while it runs.
    fn wait_for(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.output().lines().filter(|l| l.contains(needle)).count() < n {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "scripts/demo exited waiting for {needle:?}:\n{}",
                self.output()
            );
            assert!(
                Instant::now() < deadline,
                "no {n}× {needle:?} in 20 s:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `scripts/demo ARGS` from "another terminal": the same state directory.
    fn control(&self, args: &[&str]) -> Output {
        command(&self.state, args, &[]).output().unwrap()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) },
            0
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// Free ports: roundabout's, the admin API's, and `n` backends' (comma-separated).
fn ports(n: usize) -> (u16, u16, Vec<u16>) {
    let ports = free_ports(n + 2);
    (ports[0], ports[1], ports[2..].to_vec())
}

fn joined(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The backends that answered `n` requests through roundabout, in order.
async fn answered_by(port: u16, n: usize) -> Vec<String> {
    let mut by = Vec::new();
    for _ in 0..n {
        let (status, body) = get(&format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(status, 200, "{body}");
        by.push(body.trim().rsplit(' ').next().unwrap().to_string());
    }
    by
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[actix_rt::test]
async fn a_backend_that_dies_does_not_end_the_demo_and_comes_back_on_request() {
    let (listen, admin, backends) = ports(3);
    let state = tempfile::tempdir().unwrap();
    let mut demo = Demo::spawn(
        state.path().join("demo"),
        &[
            (
                "ROUNDABOUT__LISTEN__ADDRESS",
                &format!("127.0.0.1:{listen}"),
            ),
            ("ROUNDABOUT__ADMIN__ADDRESS", &format!("127.0.0.1:{admin}")),
            ("ROUNDABOUT_DEMO_BACKEND_PORTS", &joined(&backends)),
            // The test asks more often than the shipped 100 a minute allows.
            ("ROUNDABOUT__RATE_LIMIT__ENABLED", "false"),
        ],
    );
    demo.wait_for("Ctrl-C stops the demo.", 1);
    let (a, b, c) = (backends[0], backends[1], backends[2]);
    let said = demo.output();
    for how in [
        format!("scripts/demo stop {b}"),
        format!("scripts/demo start {b}"),
    ] {
        assert!(said.contains(&how), "says how to fail over: {said}");
    }
    // The backends moved, and roundabout's servers with them.
    let mut by = answered_by(listen, 3).await;
    let mut all = [a, b, c].map(|p| p.to_string());
    by.sort();
    all.sort();
    assert_eq!(by, all, "{}", demo.output());

    // Taken down from "another terminal": the demo goes on, and says so in one line.
    let out = demo.control(&["stop", &b.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("scripts/demo start {b}")),
        "{}",
        text(&out)
    );
    demo.wait_for(
        &format!("scripts/demo: the backend on port {b} stopped; the demo goes on"),
        1,
    );
    let by = answered_by(listen, 6).await;
    assert!(!by.contains(&b.to_string()), "{by:?}");

    // A backend killed outright is the same to the demo.
    let pid = std::fs::read_to_string(state.path().join(format!("demo/backend-{a}.pid"))).unwrap();
    let pid: i32 = pid.trim().parse().unwrap();
    // SAFETY: kill(2) on a backend the demo (this test's child) started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    demo.wait_for(
        &format!("the backend on port {a} was killed (SIGKILL); the demo goes on"),
        1,
    );
    assert_eq!(answered_by(listen, 3).await, vec![c.to_string(); 3]);

    // Brought back: roundabout puts it in rotation again after its health checks pass.
    let out = demo.control(&["start", &b.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(10), async || answered_by(listen, 2)
            .await
            .contains(&b.to_string()))
        .await,
        "{}",
        demo.output()
    );
    let out = demo.control(&["start", &b.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already running"), "{}", text(&out));
    assert!(demo.child.try_wait().unwrap().is_none(), "still running");

    // Ctrl-C stops everything it started.
    demo.signal(libc::SIGINT);
    let status = demo.child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", demo.output());
    for port in [listen, admin, b, c] {
        assert!(
            eventually(Duration::from_secs(5), async || {
                TcpListener::bind(("127.0.0.1", port)).is_ok()
            })
            .await,
            "port {port} still held after Ctrl-C"
        );
    }
    assert!(!state.path().join("demo").exists(), "state left behind");
}

#[test]
fn stop_and_start_without_a_running_demo_say_so() {
    let state = tempfile::tempdir().unwrap();
    let out = command(state.path(), &["stop", "5002"], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out).trim_end(),
        "scripts/demo: no demo is running; start one with: scripts/demo"
    );
}

#[test]
fn the_demo_on_a_busy_port_says_which_and_what_to_try_and_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let (_, _, backends) = ports(3);
    let (code, text) = demo(&[
        ("ROUNDABOUT__LISTEN__ADDRESS", &busy.to_string()),
        ("ROUNDABOUT__ADMIN__ADDRESS", ""),
        ("ROUNDABOUT_DEMO_BACKEND_PORTS", &joined(&backends)),
    ]);
    refused_as_busy(
        code,
        &text,
        &format!("{busy} (roundabout's listen.address)"),
        "ROUNDABOUT__LISTEN__ADDRESS=127.0.0.1:",
    );
}

#[test]
fn the_demo_on_a_busy_backend_port_says_how_to_move_the_backends() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let (listen, _, backends) = ports(2);
    let (code, text) = demo(&[
        (
            "ROUNDABOUT__LISTEN__ADDRESS",
            &format!("127.0.0.1:{listen}"),
        ),
        ("ROUNDABOUT__ADMIN__ADDRESS", ""),
        (
            "ROUNDABOUT_DEMO_BACKEND_PORTS",
            &joined(&[backends[0], busy, backends[1]]),
        ),
    ]);
    refused_as_busy(
        code,
        &text,
        &format!("127.0.0.1:{busy} (a demo backend's)"),
        "    ROUNDABOUT_DEMO_BACKEND_PORTS=",
    );
}

/// A demo that found a port taken: exit status 1, a line naming the address and whose it
/// is (`taken`), what to try (`hint`), and nothing started.
fn refused_as_busy(code: Option<i32>, text: &str, taken: &str, hint: &str) {
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("scripts/demo: {taken} is already in use")),
        "{text}"
    );
    assert!(text.contains(hint), "says what to try: {text}");
    assert!(!text.contains("is up"), "{text}");
}

#[test]
fn the_demo_with_a_bad_override_exits_1_with_roundabout_s_one_line() {
    let (code, text) = demo(&[("ROUNDABOUT__RATE_LIMIT__WINDOW", "0s")]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(
        text.trim_end(),
        "scripts/demo: roundabout: invalid configuration: ROUNDABOUT__RATE_LIMIT__WINDOW: \
         must be greater than zero"
    );
}
