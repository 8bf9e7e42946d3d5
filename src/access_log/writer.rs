//! The access log's writer thread: the only place that formats and writes lines, so a slow
//! disk or a blocked stderr stalls this thread and never a worker. It writes what has
//! queued up in one go and flushes when the queue runs dry, reopens its file on request
//! (SIGUSR1, for logrotate) and switches target or format on a reload. It never panics on
//! a write error: it reports it once and goes on.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::mpsc::Receiver,
};

use super::{format, Message};
use crate::config::{AccessLog, AccessLogFormat};

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

fn run(mut output: Output, mut format: AccessLogFormat, lines: Receiver<Message>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    // Blocks for the first message, then takes whatever else is queued without waiting.
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => format::write(format, &line, &mut buf),
                Message::Reopen => {
                    flush(&mut output, &mut buf, &mut failing);
                    if let Output::File { path, file } = &mut output {
                        match append(path) {
                            Ok(new) => *file = new,
                            Err(e) => log::error!("reopening the access log: {e}"),
                        }
                    }
                }
                Message::Configure(config) => {
                    flush(&mut output, &mut buf, &mut failing);
                    match open(config) {
                        Ok((o, f)) => (output, format) = (o, f),
                        Err(e) => log::error!("the access log stays as it was: {e}"),
                    }
                }
            }
            if buf.len() < 60 * 1024 {
                next = lines.try_recv().ok();
            }
        }
        flush(&mut output, &mut buf, &mut failing);
    }
    flush(&mut output, &mut buf, &mut failing);
}

/// Writes out `buf`; the first failure of a run of them is logged, not each.
fn flush(output: &mut Output, buf: &mut Vec<u8>, failing: &mut bool) {
    if buf.is_empty() {
        return;
    }
    let result = match output {
        Output::Nowhere => Ok(()),
        Output::Stderr => io::stderr().lock().write_all(buf),
        Output::File { file, .. } => file.write_all(buf),
    };
    buf.clear();
    match result {
        Ok(()) => *failing = false,
        Err(e) if !*failing => {
            *failing = true;
            log::error!("writing the access log: {e}; lines are lost until it works again");
        }
        Err(_) => {}
    }
}
