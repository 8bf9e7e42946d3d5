//! Processes that hand sockets over, as systemd and a SIGUSR2 upgrade do: the built binary
//! started with listening sockets of the test's as fds 3.., and the processes an upgrade
//! leaves behind (which are not the test's children).
#![allow(dead_code)]

use std::{
    fs::File,
    net::TcpListener,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Starts the built binary on the config file `config` with `sockets` handed over the way
/// systemd hands them: as fds 3.. (`pre_exec` copies them there), `LISTEN_FDS` their
/// number, and `LISTEN_PID` the binary's own pid, which only the new process knows: `sh`
/// sets it to its own (`$$`) and execs the binary, which keeps the pid. `env` is added.
pub fn spawn_activated(
    config: &Path,
    sockets: &[&TcpListener],
    env: &[(&str, &str)],
    stderr: File,
) -> Child {
    let fds: Vec<i32> = sockets.iter().map(|l| l.as_raw_fd()).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_roundabout"))
        .arg("--config")
        .arg(config)
        .env("LISTEN_FDS", fds.len().to_string())
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec, on fds this
    // process owns; `fds` was made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Above every target first, so that no dup2 overwrites a socket not yet copied.
            let mut high = [0; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                // The copy at 3 + i is not close-on-exec: the binary inherits it.
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Makes this test process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`):
/// the process a SIGUSR2 upgrade starts outlives its parent, the binary the test started,
/// and then becomes the test's to wait for, with its exit status.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer argument; it changes only this process's attribute.
    let done = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(done, 0, "PR_SET_CHILD_SUBREAPER");
}

/// A process the test did not start but must not leave running: killed (and reaped, when
/// it is the test's to reap) on drop.
pub struct Orphan(pub i32);

impl Orphan {
    /// Sends it `signal`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a process that is ours to reap and not yet reaped.
        assert_eq!(unsafe { libc::kill(self.0, signal) }, 0, "signal {signal}");
    }

    /// Waits for it to exit, for at most `within`: its exit code (`None`: still running,
    /// or killed by a signal).
    pub fn wait(&self, within: Duration) -> Option<i32> {
        wait_exit(self.0, within)
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        // SAFETY: as in `signal`; a process already reaped makes these fail harmlessly.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// Waits up to `within` for the child or orphan `pid` to exit: its exit code.
pub fn wait_exit(pid: i32, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid on a process that is this test's to reap, without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => std::thread::sleep(Duration::from_millis(20)),
            p if p == pid && libc::WIFEXITED(status) => return Some(libc::WEXITSTATUS(status)),
            _ => return None,
        }
    }
    None
}
