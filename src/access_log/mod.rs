//! The end of an exchange: once its answer has been sent (or could not be), it is counted
//! in the metrics and, with the access log on, handed to the log's writer thread as one
//! [`Line`]: who asked for what, the status, the body bytes sent and the whole time taken
//! (nginx's `$body_bytes_sent` and `$request_time`), the upstream and its time, the request
//! id. The writer formats and writes it (`format`, `writer`); a worker never waits for
//! it: a full queue drops the line and counts it. Nothing here changes an answer.

pub mod format;
pub mod writer;

use std::{
    net::IpAddr,
    rc::Rc,
    sync::{mpsc, Arc},
    time::{Duration, Instant, SystemTime},
};

use actix_web::http::{header::HeaderValue, Method, Uri, Version};

use crate::{config, metrics::Metrics, upstream::Upstream};

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole answer was sent.
    Complete,
    /// The client went away before the answer was complete: logged and counted as 499
    /// (nginx's convention); the server is not blamed.
    ClientGone,
    /// The server's body ended early (closed, reset, or paused past `proxy.timeout`): the
    /// client's connection was closed without a clean end.
    UpstreamFailed(&'static str),
}

/// The nginx status for a client that closed its connection before the answer was sent.
pub const CLIENT_CLOSED: u16 = 499;

/// How many lines may wait for the writer; past that, lines are dropped and counted.
const QUEUE: usize = 16 * 1024;

/// One access-log line, as the writer thread gets it.
#[derive(Debug, Clone)]
pub struct Line {
    /// When the exchange ended.
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    /// `None` for a request refused before it could be read.
    pub request: Option<(Method, Uri, Version)>,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// The server's `host:port`.
    pub upstream: Option<Arc<str>>,
    /// The pool the request went to (`None` for a request refused before it was read).
    pub pool: Option<Arc<str>>,
    /// The route that took it; `None`: no route (the default pool).
    pub route: Option<Arc<str>>,
    /// From the request to the server's response head.
    pub upstream_time: Option<Duration>,
    /// From the request to the end of the answer.
    pub request_time: Duration,
    pub request_id: Option<HeaderValue>,
    /// Why the server's body ended early.
    pub failure: Option<&'static str>,
}

impl Line {
    /// A line of these fields, at `time`, with nothing sent and nothing else known.
    pub fn bare(
        time: SystemTime,
        client: Option<IpAddr>,
        request: Option<(Method, Uri, Version)>,
        status: u16,
    ) -> Line {
        Line {
            time,
            client,
            request,
            status,
            bytes: 0,
            referer: None,
            user_agent: None,
            upstream: None,
            pool: None,
            route: None,
            upstream_time: None,
            request_time: Duration::ZERO,
            request_id: None,
            failure: None,
        }
    }
}

/// What the writer thread is asked to do.
pub enum Message {
    Line(Box<Line>),
    /// Reopen the file (SIGUSR1, after logrotate moved it).
    Reopen,
    /// Write there, so, from now on (a reload); `None`: nowhere.
    Configure(Option<config::AccessLog>),
    /// Write out every line queued before this, then answer.
    Flush(mpsc::Sender<()>),
}

/// The access log of the process: a handle on its writer thread, cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    queue: mpsc::SyncSender<Message>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Starts the writer thread, writing as `config` says.
    pub fn start(
        config: Option<config::AccessLog>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        writer::spawn(config, lines)?;
        Ok(Self { queue, metrics })
    }

    /// Hands `line` to the writer, or drops it (and counts it) when the queue is full.
    pub fn write(&self, line: Line) {
        self.send(Box::new(line));
    }

    /// [`write`](Self::write), for a line already boxed.
    pub fn send(&self, line: Box<Line>) {
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.metrics.access_log_dropped();
        }
    }

    /// A request the HTTP parser refused before it could be read (a malformed head: 400, one
    /// too large: 431, one not complete in time: 408): counted as an answer of our own and
    /// logged with the body bytes and the request id of its answer, as nginx logs its 400s.
    pub fn refused(
        &self,
        client: Option<IpAddr>,
        status: u16,
        bytes: u64,
        request_id: HeaderValue,
    ) {
        self.metrics.answered(None, status);
        let mut line = Line::bare(SystemTime::now(), client, None, status);
        line.bytes = bytes;
        line.request_id = Some(request_id);
        self.write(line);
    }

    /// Asks the writer to reopen its file; waits for room in the queue, never on the disk.
    pub fn reopen(&self) {
        let _ = self.queue.send(Message::Reopen);
    }

    /// Waits (at most `limit`) until every line handed over so far is written: at a stop,
    /// so that the last requests' lines are not lost with the process.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done, written) = mpsc::channel();
        self.queue.send(Message::Flush(done)).is_ok() && written.recv_timeout(limit).is_ok()
    }

    /// Asks the writer to write elsewhere, or in another format.
    pub fn configure(&self, config: Option<config::AccessLog>) {
        let _ = self.queue.send(Message::Configure(config));
    }
}

/// Where one worker's exchanges end up: the metrics, and the access log.
pub struct Sink {
    pub metrics: Arc<Metrics>,
    /// This worker's head-time histogram (written by it alone).
    pub head_times: Arc<crate::metrics::WorkerHistogram>,
    pub log: AccessLog,
}

/// One exchange, to be counted and logged when it ends.
pub struct Record {
    pub sink: Rc<Sink>,
    /// The server that answered, or for an answer of our own the last one tried.
    pub upstream: Option<Arc<Upstream>>,
    /// The answer is our own (502, 503, …): counted as such, whatever `upstream` says.
    ours: bool,
    /// The status sent (or about to be).
    pub status: u16,
    pub started: Instant,
    /// When the server's response head arrived.
    pub upstream_time: Option<Duration>,
    /// The log line, its request's fields filled in (`None` with the access log off),
    /// boxed from the start: the record moves with the answer's body, and the line is
    /// boxed to reach the writer anyway.
    pub line: Option<Box<Line>>,
}

impl Record {
    /// The record of a request that starts now, for `sink`; the phases fill it in.
    pub fn new(sink: Rc<Sink>, started: Instant, line: Option<Box<Line>>) -> Self {
        Record {
            sink,
            upstream: None,
            ours: false,
            status: 0,
            started,
            upstream_time: None,
            line,
        }
    }

    /// The answer is our own: counted under `server=""` even when `upstream` names the
    /// server last tried (which the log shows).
    pub fn own_answer(&mut self) {
        self.ours = true;
    }

    /// Counts and logs the exchange: `bytes` of body were sent, and it ended so.
    pub fn finish(self, bytes: u64, ending: Ending) {
        let status = match ending {
            Ending::ClientGone => CLIENT_CLOSED,
            _ => self.status,
        };
        let counters = match self.ours {
            true => None,
            false => self.upstream.as_ref().map(|u| &u.counters),
        };
        self.sink.metrics.answered(counters, status);
        if let Ending::UpstreamFailed(_) = ending {
            self.sink.metrics.upstream_failed(counters);
        }
        let Some(mut line) = self.line else { return };
        line.time = SystemTime::now();
        line.status = status;
        line.bytes = bytes;
        line.upstream = self.upstream.map(|u| u.label.clone());
        line.upstream_time = self.upstream_time;
        line.request_time = self.started.elapsed();
        line.failure = match ending {
            Ending::UpstreamFailed(why) => Some(why),
            _ => None,
        };
        self.sink.log.send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(path: &str) -> Line {
        let request = (Method::GET, path.parse().unwrap(), Version::HTTP_11);
        Line::bare(SystemTime::now(), None, Some(request), 200)
    }

    #[test]
    fn a_flush_returns_once_every_line_handed_over_is_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let config = config::AccessLog {
            file: Some(path.clone()),
            format: config::AccessLogFormat::default(),
        };
        let log = AccessLog::start(Some(config), Arc::new(Metrics::new())).unwrap();
        let read = || std::fs::read_to_string(&path).unwrap();
        log.write(line("/first"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !read().contains("GET /first ") {
            assert!(
                Instant::now() < deadline,
                "the first line was never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The writer has just written a batch and sleeps before it takes the next: without
        // the flush, these lines would wait there.
        for n in 0..100 {
            log.write(line(&format!("/next/{n}")));
        }
        assert!(log.flush(Duration::from_secs(5)));
        let text = read();
        for n in 0..100 {
            assert!(text.contains(&format!("GET /next/{n} ")), "{n} not written");
        }
    }
}
