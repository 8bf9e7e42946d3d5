//! The built `roundabout` binary, run as a user would.
#![allow(dead_code)]

use std::{
    io::Write,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{eventually, Backend};

/// A port nothing listens on now (bound, then released), for a listener of the binary.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct ports nothing listens on now: all are held until all are chosen, so none
/// comes twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The built `roundabout` binary, run on a config file of the test's, its stderr kept in a
/// file the test can read; killed on drop.
pub struct Binary {
    pub child: Child,
    /// `listen.address`'s port.
    pub port: u16,
    pub config: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl Binary {
    /// Starts the binary on `config` (TOML), which must listen on `127.0.0.1:port`, and
    /// waits until it accepts connections.
    pub async fn start(port: u16, config: &str) -> Binary {
        Self::start_exe(env!("CARGO_BIN_EXE_roundabout").as_ref(), port, config, &[]).await
    }

    /// [`Binary::start`] with the executable at `exe` (a copy of the binary) and `env` set.
    pub async fn start_exe(
        exe: &std::path::Path,
        port: u16,
        config: &str,
        env: &[(&str, &str)],
    ) -> Binary {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(config.as_bytes()).unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(exe)
            .args(["--config", file.path().to_str().unwrap()])
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr.reopen().unwrap()))
            .spawn()
            .unwrap();
        let b = Binary {
            child,
            port,
            config: file,
            stderr,
        };
        assert!(
            eventually(Duration::from_secs(10), async || {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await,
            "the binary listens on {port}: {}",
            b.log()
        );
        b
    }

    /// The binary in front of `backend` (one worker, no limiter, no admin) on a free port;
    /// `extra` is appended (more sections).
    pub async fn in_front_of(backend: &Backend, extra: &str) -> Binary {
        let port = free_port();
        Binary::start(
            port,
            &format!(
                "[listen]\naddress = \"127.0.0.1:{port}\"\nworkers = 1\n\
                 [balancer]\nservers = [\"{}\"]\n\
                 [rate_limit]\nenabled = false\n[admin]\naddress = \"\"\n{extra}",
                backend.url()
            ),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything it has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    /// Replaces its config file's text (to be read on the next SIGHUP).
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(self.config.path(), text).unwrap();
    }

    /// Sends it `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} sent");
    }

    /// Waits until its log has `n` lines containing `needle`; panics with the log if not.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let seen = eventually(Duration::from_secs(10), async || {
            self.log().lines().filter(|l| l.contains(needle)).count() >= n
        })
        .await;
        assert!(seen, "no {n}× {needle:?} in the log:\n{}", self.log());
    }

    /// Peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
