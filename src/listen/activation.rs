//! What the process that started this one handed over, and how this one tells it that it
//! serves. One protocol for systemd and for a SIGUSR2 upgrade, so that the new process of an
//! upgrade needs no mode of its own:
//!
//! - sockets, by systemd's socket activation (`sd_listen_fds(3)`): `LISTEN_PID` is the pid
//!   they are for (a variable inherited by a grandchild is not), `LISTEN_FDS` how many
//!   there are from fd 3 on, `LISTEN_FDNAMES` their names, colon-separated;
//! - readiness: `READY=1` on systemd's `NOTIFY_SOCKET` (`sd_notify(3)`, for `Type=notify`),
//!   and for an upgrade a line on the pipe named by [`READY_FD`], which the old process
//!   reads: `READY`, or `ERROR <why>` when this process will not serve. A pipe rather than a
//!   socket address: nobody else can write to it, and the old process sees its end (EOF) if
//!   the new one dies before a word.
//!
//! All of these variables are read and unset at once, while the process has one thread
//! (`Inherited::from_env`, first thing in `main`), so that no child inherits them.

use std::{
    fs::File,
    io::Write as _,
    os::fd::{FromRawFd as _, RawFd},
};

/// The variable with the number of the pipe's writing end on which a SIGUSR2 upgrade's old
/// process waits for the new one's `READY` line.
pub const READY_FD: &str = "ROUNDABOUT_READY_FD";

/// The first fd handed over (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// A socket handed over, not yet checked.
#[derive(Debug)]
pub struct Handed {
    /// Its fd number, for messages.
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if any. A SIGUSR2 upgrade names each by its key
    /// (`listen.address`, ...); systemd names them after the socket unit unless told.
    pub name: Option<String>,
    pub socket: socket2::Socket,
}

/// Everything handed over at start: sockets and where to say that this process serves.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The sockets, in fd order.
    pub(crate) sockets: Vec<Handed>,
    /// Why the variables could not be taken; a start-up error (`start` reports it).
    pub(crate) error: Option<String>,
    pub(crate) notify: Notify,
}

impl Inherited {
    /// Nothing handed over (what the tests that start the balancer in-process use).
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes what the environment hands over and unsets the variables. To be called while
    /// the process has one thread: the environment is not safe to change with more.
    pub fn from_env() -> Inherited {
        let var = |name: &str| {
            let value = std::env::var(name).ok();
            std::env::remove_var(name);
            value
        };
        let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        let (systemd, ready) = (var("NOTIFY_SOCKET"), var(READY_FD));
        let mut inherited = Inherited::default();
        match sockets(pid.as_deref(), fds.as_deref(), names.as_deref()) {
            Ok(sockets) => inherited.sockets = sockets,
            Err(e) => inherited.error = Some(e),
        }
        inherited.notify = Notify {
            systemd: systemd.filter(|s| !s.is_empty()),
            pipe: ready.and_then(|fd| ready_pipe(&fd)),
        };
        inherited
    }

    /// Tells the process that started this one (a SIGUSR2 upgrade's old process) that this
    /// one will not serve, and why. Nothing happens without one.
    pub fn fail(&mut self, why: &str) {
        self.notify.fail(why);
    }
}

/// The sockets of `LISTEN_*`, if they are this process's.
fn sockets(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
) -> Result<Vec<Handed>, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    // Meant for another process (this one inherited them from a parent that did not unset
    // them): not ours to take, nor to close.
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| format!("LISTEN_FDS: {fds:?} is not a number of sockets"))?;
    let mut names = names.map(|n| n.split(':').map(str::to_owned).collect::<Vec<_>>());
    let mut handed = Vec::new();
    for i in 0..n {
        let fd = FIRST_FD + i;
        // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open; it changes nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(format!("LISTEN_FDS is {n}, but fd {fd} is not open"));
        }
        // SAFETY: `fd` is open and was handed to this process (LISTEN_PID is ours) for it
        // to own; nothing else in the process refers to it.
        let socket = unsafe { socket2::Socket::from_raw_fd(fd) };
        // Not to be inherited by anything this process runs: an upgrade hands the sockets
        // over explicitly.
        socket
            .set_cloexec(true)
            .map_err(|e| format!("LISTEN_FDS: fd {fd}: {e}"))?;
        let name = names
            .as_mut()
            .and_then(|n| n.get_mut(i as usize).map(std::mem::take))
            .filter(|n| !n.is_empty());
        handed.push(Handed { fd, name, socket });
    }
    Ok(handed)
}

/// The upgrade's pipe, if `fd` is one that is open.
fn ready_pipe(fd: &str) -> Option<File> {
    let fd: RawFd = fd.trim().parse().ok().filter(|&fd| fd > 2)?;
    // SAFETY: fstat only reads the status of `fd`, whatever it is.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // SAFETY: `fd` is an open pipe handed to this process for it to write its readiness
    // to and close; nothing else in the process refers to it. Close-on-exec: no child of
    // this process may hold it open.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(File::from_raw_fd(fd))
    }
}

/// Where to say that this process serves, or will not.
#[derive(Debug, Default)]
pub struct Notify {
    /// systemd's `NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace.
    systemd: Option<String>,
    /// A SIGUSR2 upgrade's pipe; written once, then closed.
    pipe: Option<File>,
}

impl Notify {
    /// This process serves: its listeners accept.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"READY\n");
        }
        self.systemd("READY=1");
    }

    /// This process will not serve, because of `why`.
    pub fn fail(&mut self, why: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let why = why.replace('\n', " ");
            let _ = pipe.write_all(format!("ERROR {why}\n").as_bytes());
        }
    }

    /// This process is stopping (systemd shows it as deactivating).
    pub fn stopping(&self) {
        self.systemd("STOPPING=1");
    }

    /// Sends `state` to systemd, when started by it with a notify socket.
    fn systemd(&self, state: &str) {
        let Some(target) = &self.systemd else { return };
        if let Err(e) = sd_notify(target, state) {
            log::warn!("NOTIFY_SOCKET {target}: could not tell systemd {state}: {e}");
        }
    }
}

fn sd_notify(target: &str, state: &str) -> std::io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let addr = match target.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        _ => SocketAddr::from_pathname(target)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_for_another_process_hand_nothing_over() {
        let other = (std::process::id() + 1).to_string();
        assert!(sockets(Some(&other), Some("2"), None).unwrap().is_empty());
        assert!(sockets(None, Some("2"), None).unwrap().is_empty());
        assert!(sockets(Some(&other), None, None).unwrap().is_empty());
    }

    #[test]
    fn a_count_that_is_not_one_is_an_error_naming_the_variable() {
        let me = std::process::id().to_string();
        let e = sockets(Some(&me), Some("two"), None).unwrap_err();
        assert!(e.starts_with("LISTEN_FDS:"), "{e}");
        assert!(sockets(Some(&me), Some("0"), None).unwrap().is_empty());
    }
}
