//! The access log's writer thread: the only place that formats and writes lines, so a slow
//! disk or a blocked stderr stalls this thread and never a worker. While lines keep coming
//! it takes them in batches [`BATCH_EVERY`] apart, one write(2) per batch; it reopens its
//! file on request (SIGUSR1, for logrotate) and switches target or format on a reload. It
//! never panics on a write error: it reports it once and goes on.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::mpsc::{Receiver, TryRecvError},
    time::Duration,
};

use super::{format, Message};
use crate::config::{AccessLog, AccessLogFormat};

/// How long the writer sleeps between two batches while lines keep coming. A worker's
/// send then finds the writer asleep in no wait on the queue, so a line costs the worker no
/// wake-up of another thread (a futex call) and the writer no write(2) of its own: at
/// 30,000 requests a second both were one per line. A line waits at most this long (and
/// the time to write a batch) before it is written; nginx's `access_log ... flush=` makes
/// the same trade. At 16,384 lines, the queue holds this long of traffic many times over.
pub const BATCH_EVERY: Duration = Duration::from_millis(10);

/// Where lines go.
enum Output {
    Nowhere,
    Stderr,
    File { path: PathBuf, file: File },
}

/// Starts the writer on `lines`, writing as `config` says; an unwritable file is refused
/// here, at start, with the path in the error.
pub fn spawn(config: Option<AccessLog>, lines: Receiver<Message>) -> io::Result<()> {
    let (output, format) = open(config)?;
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || run(output, format, lines))?;
    Ok(())
}

fn open(config: Option<AccessLog>) -> io::Result<(Output, AccessLogFormat)> {
    Ok(match config {
        None => (Output::Nowhere, AccessLogFormat::default()),
        Some(AccessLog { file: None, format }) => (Output::Stderr, format),
        Some(AccessLog {
            file: Some(path),
            format,
        }) => {
            let file = append(&path)?;
            (Output::File { path, file }, format)
        }
    })
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("log.access_log {}: {e}", path.display())))
}

fn run(output: Output, format: AccessLogFormat, lines: Receiver<Message>) {
    let mut w = Writer {
        output,
        format,
        buf: Vec::with_capacity(64 * 1024),
        failing: false,
    };
    // Idle, it blocks on the queue; once a line comes, it takes what is queued, writes it
    // out, sleeps, and goes on so until a batch finds the queue empty.
    while let Ok(first) = lines.recv() {
        w.handle(first);
        loop {
            let next = loop {
                match lines.try_recv() {
                    Ok(message) => w.handle(message),
                    Err(e) => break e,
                }
            };
            w.flush();
            if next == TryRecvError::Disconnected {
                return;
            }
            std::thread::sleep(BATCH_EVERY);
            match lines.try_recv() {
                Ok(message) => w.handle(message),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
    }
}

/// The writer thread's state: where lines go, how, and what waits to be written.
struct Writer {
    output: Output,
    format: AccessLogFormat,
    buf: Vec<u8>,
    /// The last write failed (the next failure is not logged again).
    failing: bool,
}

impl Writer {
    fn handle(&mut self, message: Message) {
        match message {
            Message::Line(line) => {
                format::write(self.format, &line, &mut self.buf);
                if self.buf.len() >= 60 * 1024 {
                    self.flush();
                }
            }
            Message::Reopen => {
                self.flush();
                if let Output::File { path, file } = &mut self.output {
                    match append(path) {
                        Ok(new) => *file = new,
                        Err(e) => log::error!("reopening the access log: {e}"),
                    }
                }
            }
            Message::Configure(config) => {
                self.flush();
                match open(config) {
                    Ok((output, format)) => (self.output, self.format) = (output, format),
                    Err(e) => log::error!("the access log stays as it was: {e}"),
                }
            }
            Message::Flush(done) => {
                self.flush();
                let _ = done.send(());
            }
        }
    }

    /// Writes out what waits; the first failure of a run of them is logged, not each.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let result = match &mut self.output {
            Output::Nowhere => Ok(()),
            Output::Stderr => io::stderr().lock().write_all(&self.buf),
            Output::File { file, .. } => file.write_all(&self.buf),
        };
        self.buf.clear();
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                log::error!("writing the access log: {e}; lines are lost until it works again");
            }
            Err(_) => {}
        }
    }
}
