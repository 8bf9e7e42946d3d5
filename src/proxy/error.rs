//! [`ProxyError`]: every answer the proxy gives of its own, and the one place where each is
//! mapped to a status, headers and a short plain-text body. Nothing here decides when to
//! answer so.

use actix_http::{
    body::{BoxBody, MessageBody as _},
    h1::OnRefused,
    Response,
};
use actix_web::{
    http::{
        header::{self, HeaderMap, HeaderValue},
        StatusCode,
    },
    HttpResponse, ResponseError,
};

use super::{checks::MAX_HEAD_BYTES, headers};
use crate::{access_log::AccessLog, rate_limit::Decision};

/// Why the proxy answered for itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy upstream server")]
    NoServer { retry_after: HeaderValue },
    #[error("could not reach an upstream server: {0}")]
    BadGateway(String),
    #[error("the upstream server did not answer in time")]
    GatewayTimeout,
    #[error("the request body stopped arriving")]
    RequestTimeout,
    /// The client's body ended before it was whole (it went away or shut its side
    /// mid-upload): answered 400 in case it still listens, counted and logged as 499.
    #[error("request body cut short")]
    ClientGone,
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request header fields larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("only the expectation 100-continue is supported")]
    ExpectationFailed,
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("too many requests")]
    RateLimited(Decision),
    #[error("rate limiter unavailable")]
    LimiterUnavailable,
    #[error("balancer unavailable")]
    Unavailable,
    #[error("forbidden: this address may not use this route")]
    Forbidden,
    /// A route with `redirect_https`, asked over plain HTTP: 308 to this location.
    #[error("use https: {}", .0.to_str().unwrap_or("https"))]
    RedirectHttps(HeaderValue),
}

impl ResponseError for ProxyError {
    fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::NoServer { .. }
            | ProxyError::LimiterUnavailable
            | ProxyError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientGone => StatusCode::BAD_REQUEST,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::RedirectHttps(_) => StatusCode::PERMANENT_REDIRECT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.content_type("text/plain; charset=utf-8");
        match self {
            ProxyError::NoServer { retry_after } => {
                res.insert_header((header::RETRY_AFTER, retry_after.clone()));
            }
            ProxyError::RateLimited(d) => {
                res.insert_header((header::RETRY_AFTER, d.reset_secs));
            }
            ProxyError::RedirectHttps(location) => {
                res.insert_header((header::LOCATION, location.clone()));
            }
            // The body was not read: the connection cannot carry another request.
            ProxyError::TooLarge(_)
            | ProxyError::RequestTimeout
            | ProxyError::ClientGone
            | ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge
            | ProxyError::ExpectationFailed
            | ProxyError::NotImplemented(_) => {
                res.force_close();
            }
            _ => {}
        }
        res.body(format!("{self}\n"))
    }
}

/// The answer to a request actix-http refuses before any handler runs (a malformed head:
/// 400, one too large: 431, one not complete in time: 408), as every answer of our own: a
/// short plain-text body saying what is wrong and a new `X-Request-Id`, which its
/// access-log line carries too.
pub fn on_refused(log: AccessLog) -> OnRefused {
    OnRefused::answering(move |refused| {
        log::debug!("refused with {}: {}", refused.status, refused.reason);
        // No header of the client's can be trusted here: always a new id.
        let id = headers::request_id(&HeaderMap::new());
        let what = refused
            .status
            .canonical_reason()
            .unwrap_or("refused")
            .to_ascii_lowercase();
        let body = format!("{what}: {}\n", refused.reason);
        log.refused(
            refused.peer_addr.map(|a| a.ip()),
            refused.status.as_u16(),
            body.len() as u64,
            id.clone(),
        );
        let mut res: Response<BoxBody> = Response::with_body(refused.status, body.boxed());
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(headers::X_REQUEST_ID, id);
        res
    })
}
