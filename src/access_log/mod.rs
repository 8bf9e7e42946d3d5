//! The end of an exchange: once its answer has been sent (or could not be), it is counted
//! in the metrics and written to the access log, one line with the bytes sent and the whole
//! time taken, as nginx's `$body_bytes_sent` and `$request_time`. It only observes: it never
//! changes an answer.

use std::{fmt, net::IpAddr, sync::Arc, time::Instant};

use actix_web::http::{Method, Uri};

use crate::{metrics::Metrics, upstream::Upstream};

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

/// What the access log says of one request beyond the counts: who asked for what.
pub struct AccessEntry {
    pub client: Option<IpAddr>,
    pub method: Method,
    pub uri: Uri,
}

/// One exchange, to be counted and logged when it ends.
pub struct Record {
    pub metrics: Arc<Metrics>,
    /// The server that answered; `None` for answers of our own.
    pub upstream: Option<Arc<Upstream>>,
    /// The status sent (or about to be).
    pub status: u16,
    pub started: Instant,
    /// `None` with the access log off.
    pub entry: Option<AccessEntry>,
}

impl Record {
    /// Counts and logs the exchange: `bytes` of body were sent, and it ended so.
    pub fn finish(self, bytes: u64, ending: Ending) {
        let status = match ending {
            Ending::ClientGone => CLIENT_CLOSED,
            _ => self.status,
        };
        let counters = self.upstream.as_ref().map(|u| &u.counters);
        self.metrics.answered(counters, status);
        if let Ending::UpstreamFailed(_) = ending {
            self.metrics.upstream_failed(counters);
        }
        let Some(e) = &self.entry else { return };
        let failure = match ending {
            Ending::UpstreamFailed(why) => Failure(Some(why)),
            _ => Failure(None),
        };
        log::info!(
            target: "roundabout::access",
            "{} \"{} {}\" {} {} {} {:.3}ms{failure}",
            DisplayOr(e.client.as_ref()),
            e.method,
            e.uri,
            status,
            bytes,
            self.upstream.as_ref().map_or("-", |u| &u.label),
            self.started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

/// Reopens the access log file (SIGUSR1, for logrotate). The log goes to stderr today,
/// which needs no reopening.
pub fn reopen() {
    log::debug!("SIGUSR1: the access log goes to stderr; nothing to reopen");
}

/// ` upstream failed: <why>`, or nothing.
struct Failure(Option<&'static str>);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(why) => write!(f, " upstream failed: {why}"),
            None => Ok(()),
        }
    }
}

/// Shows the value, or `-` when there is none.
struct DisplayOr<'a, T>(Option<&'a T>);

impl<T: fmt::Display> fmt::Display for DisplayOr<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
