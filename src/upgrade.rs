//! SIGUSR2: the binary upgraded in place, with no connection refused (nginx's `USR2`).
//!
//! The executable at this process's path (a new build put there is what runs) is started
//! with the same arguments and environment, and handed the listening sockets the way
//! systemd hands them (`LISTEN_FDS` from fd 3, `LISTEN_FDNAMES` naming each by its key,
//! `LISTEN_PID` its own pid), so the new process needs no mode of its own: it serves on
//! them as on sockets of a socket unit. Until it says it serves (a line on a pipe, see
//! `listen::activation`), this process serves alone and goes on if the new one fails; once
//! it does, both accept on the same sockets while this one hands over and drains.
//!
//! `LISTEN_PID` must be the new process's pid, which no one knows before the fork, so the
//! fork and exec are done here rather than by `std::process::Command`: everything the new
//! process is given (arguments, environment, a buffer for the pid's digits) is made before
//! the fork, and the child only calls what is async-signal-safe (the parent has threads).

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::PathBuf,
    time::Duration,
};

use tokio::io::AsyncReadExt as _;

use crate::listen::activation::{FIRST_FD, READY_FD};

/// How long the new process has to say it serves before it is stopped and this one goes on.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The variables of the hand-over protocol: never passed on from this process's own
/// environment (where they are unset anyway), always set anew.
const HANDOVER_VARS: [&str; 5] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    READY_FD,
];

/// The executable and arguments this process was started with: what an upgrade starts.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The executable's path, resolved at start (`/proc/self/exe`): an upgrade runs what is
    /// at that path then, not the file this process was loaded from.
    pub exe: PathBuf,
    args: Vec<OsString>,
}

impl Exec {
    /// This process's executable and arguments.
    pub fn current() -> io::Result<Exec> {
        let mut exe = std::env::current_exe()?;
        // Replacing the file this process runs (a new build) leaves `/proc/self/exe`
        // pointing at the old one, marked deleted: the path is what was meant.
        if let Some(live) = exe
            .to_str()
            .and_then(|p| p.strip_suffix(" (deleted)"))
            .map(PathBuf::from)
        {
            exe = live;
        }
        Ok(Exec {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// What SIGUSR2 does: starts `exec` handed `sockets`, and logs it. The future resolves with
/// the new process's pid once it serves, or with why it will not.
pub fn start(
    exec: &io::Result<Exec>,
    sockets: &[(BorrowedFd<'_>, &str)],
) -> io::Result<impl std::future::Future<Output = Result<libc::pid_t, String>>> {
    let exec = exec
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("this executable's path: {e}")))?;
    let successor = spawn(exec, sockets)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", exec.exe.display())))?;
    log::info!(
        "upgrade (SIGUSR2): started {} as process {}; waiting for it to serve",
        exec.exe.display(),
        successor.pid
    );
    Ok(successor.serving(READY_TIMEOUT))
}

/// A new process started by [`spawn`], not yet known to serve.
#[derive(Debug)]
pub struct Successor {
    pub pid: libc::pid_t,
    ready: tokio::net::unix::pipe::Receiver,
}

/// Starts `exec` as a new process that is handed `sockets` (each with its name), from fd 3
/// on in their order.
pub fn spawn(exec: &Exec, sockets: &[(BorrowedFd<'_>, &str)]) -> io::Result<Successor> {
    let n = RawFd::try_from(sockets.len()).expect("three listeners at most");
    let ready_fd = FIRST_FD + n;
    let (read_end, write_end) = pipe()?;
    // The sources are copied above every target first, so that no dup2 in the child can
    // overwrite a source before it is copied (fd 3 may be anything in this process).
    let above = |fd: RawFd| -> io::Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC makes a new fd; the OwnedFd owns it.
        match unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, ready_fd + 1) } {
            -1 => Err(io::Error::last_os_error()),
            new => Ok(unsafe { OwnedFd::from_raw_fd(new) }),
        }
    };
    let sources = sockets
        .iter()
        .map(|(fd, _)| above(fd.as_raw_fd()))
        .collect::<io::Result<Vec<_>>>()?;
    let ready_source = above(write_end.as_raw_fd())?;
    drop(write_end);

    let c = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
    };
    let exe = c(exec.exe.as_os_str().as_bytes())?;
    let mut args = vec![exe.clone()];
    for a in &exec.args {
        args.push(c(a.as_bytes())?);
    }
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if !HANDOVER_VARS.iter().any(|h| k == *h) {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            env.push(c(&kv)?);
        }
    }
    let names = sockets
        .iter()
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(":");
    env.push(c(format!("LISTEN_FDS={n}").as_bytes())?);
    env.push(c(format!("LISTEN_FDNAMES={names}").as_bytes())?);
    env.push(c(format!("{READY_FD}={ready_fd}").as_bytes())?);
    // Filled in by the child with its pid (at most 10 digits) and a NUL.
    let mut listen_pid = b"LISTEN_PID=".to_vec();
    let digits_at = listen_pid.len();
    listen_pid.resize(digits_at + 12, 0);
    let mut exec_failed =
        format!("ERROR cannot execute {}: errno ", exec.exe.display()).into_bytes();
    exec_failed.truncate(200);

    // One pointer for both uses: envp reads the string, the child writes its digits.
    let listen_pid_at = listen_pid.as_mut_ptr();
    let argv = pointers(&args, None);
    let envp = pointers(&env, Some(listen_pid_at.cast_const().cast()));
    let sources_raw = sources.iter().map(|s| s.as_raw_fd()).collect::<Vec<_>>();
    let ready_raw = ready_source.as_raw_fd();
    let pid_digits = listen_pid_at.wrapping_add(digits_at);

    // SAFETY: fork(2); the child only runs `exec_child`, which uses what was made above
    // and async-signal-safe calls, and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            exec_child(
                pid_digits,
                &sources_raw,
                ready_raw,
                ready_fd,
                &exec_failed,
                exe.as_ptr(),
                &argv,
                &envp,
            )
        },
        pid => {
            // This process's copies close here: the pipe's writing end is then the
            // child's alone, and its end (or its death) is an EOF here.
            drop((sources, ready_source));
            Ok(Successor {
                pid,
                ready: tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?,
            })
        }
    }
}

/// A pipe, both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new fds, which the OwnedFds then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A NULL-terminated array of pointers to `strings` (and `extra`), for execve.
fn pointers(strings: &[CString], extra: Option<*const libc::c_char>) -> Vec<*const libc::c_char> {
    let mut p: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
    p.extend(extra);
    p.push(std::ptr::null());
    p
}

/// In the forked child: the pid into `LISTEN_PID`, the sockets onto fds 3.., the pipe after
/// them (dup2 clears close-on-exec on the copy), the signal mask and SIGPIPE as a new
/// process expects them (as `std::process::Command` leaves them), then execve. Only
/// async-signal-safe calls; no allocation.
#[allow(clippy::too_many_arguments)]
unsafe fn exec_child(
    pid_digits: *mut u8,
    sources: &[RawFd],
    ready_source: RawFd,
    ready_fd: RawFd,
    exec_failed: &[u8],
    exe: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let pid = libc::getpid() as u64;
    let mut digits = [0u8; 20];
    let len = decimal(pid, &mut digits);
    std::ptr::copy_nonoverlapping(digits.as_ptr(), pid_digits, len);
    *pid_digits.add(len) = 0;
    for (i, &source) in sources.iter().enumerate() {
        if libc::dup2(source, FIRST_FD + i as RawFd) == -1 {
            libc::_exit(127);
        }
    }
    if libc::dup2(ready_source, ready_fd) == -1 {
        libc::_exit(127);
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    libc::execve(exe, argv.as_ptr(), envp.as_ptr());
    // Still here: say why on the pipe, where the old process reads it.
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0) as u64;
    let len = decimal(errno, &mut digits);
    libc::write(ready_fd, exec_failed.as_ptr().cast(), exec_failed.len());
    libc::write(ready_fd, digits.as_ptr().cast(), len);
    libc::write(ready_fd, b"\n".as_ptr().cast(), 1);
    libc::_exit(127)
}

/// Writes `n` in decimal at the start of `out`; its length.
fn decimal(mut n: u64, out: &mut [u8; 20]) -> usize {
    let mut tmp = [0u8; 20];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = tmp[len - 1 - i];
    }
    len
}

impl Successor {
    /// Waits until the new process says it serves, for at most `within`. `Err` says why it
    /// will not; it has then exited, or been stopped (SIGKILL) and reaped.
    pub async fn serving(mut self, within: Duration) -> Result<libc::pid_t, String> {
        let mut said = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 1024];
            while !said.contains(&b'\n') && said.len() < 8192 {
                match self.ready.read(&mut buf).await? {
                    0 => break,
                    n => said.extend_from_slice(&buf[..n]),
                }
            }
            Ok::<_, io::Error>(())
        })
        .await;
        let said = String::from_utf8_lossy(&said);
        let said = said.lines().next().unwrap_or("");
        if read.is_ok() && said == "READY" {
            return Ok(self.pid);
        }
        if !matches!(read, Ok(Ok(()))) {
            // SAFETY: kill(2) on a child not yet reaped, so its pid is still its own.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let why = match read {
            Err(_) => format!(
                "did not say it serves within {}s; stopped it",
                within.as_secs()
            ),
            Ok(Err(e)) => format!("could not be heard (its pipe: {e}); stopped it"),
            Ok(Ok(())) => match said.strip_prefix("ERROR ") {
                Some(why) => format!("did not start: {why}"),
                None => String::new(),
            },
        };
        let status = reap(self.pid).await;
        Err(match (why.is_empty(), status) {
            (true, status) => format!("{status} before serving"),
            (false, _) => why,
        })
    }
}

/// Waits for `pid` to end (SIGKILL after 5 s), and says how it did.
async fn reap(pid: libc::pid_t) -> String {
    let start = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a child of this process, without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if start.elapsed() > Duration::from_secs(5) => {
                // SAFETY: kill(2) on a child not yet reaped, so its pid is still its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            0 => {}
            -1 => return "ended".into(),
            _ if libc::WIFEXITED(status) => {
                return format!("exited with status {}", libc::WEXITSTATUS(status))
            }
            _ if libc::WIFSIGNALED(status) => {
                return format!("was killed by signal {}", libc::WTERMSIG(status))
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_writes_every_digit_and_zero() {
        let mut out = [0u8; 20];
        let len = decimal(0, &mut out);
        assert_eq!(&out[..len], b"0");
        let len = decimal(4_194_304, &mut out);
        assert_eq!(&out[..len], b"4194304");
        let len = decimal(u64::MAX, &mut out);
        assert_eq!(&out[..len], u64::MAX.to_string().as_bytes());
    }
}
