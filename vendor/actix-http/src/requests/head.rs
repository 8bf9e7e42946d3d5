use std::{fmt, net, rc::Rc};

use crate::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    message::{Flags, Head, MessagePool},
    ConnectionType, Method, Uri, Version,
};

thread_local! {
    static REQUEST_POOL: MessagePool<RequestHead> = MessagePool::<RequestHead>::create()
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,

    /// Will only be None when called in unit tests unless set manually.
    pub peer_addr: Option<net::SocketAddr>,

    flags: Flags,
}

impl Default for RequestHead {
    fn default() -> RequestHead {
        RequestHead {
            method: Method::default(),
            uri: Uri::default(),
            version: Version::HTTP_11,
            // Upstream reserved room for 16 headers: a 6.4 KiB table for every head, which a
            // client's request (awc) allocated per request, often to replace it whole, and
            // which every pooled head kept. The decoder sizes a head's map to its headers.
            headers: HeaderMap::new(),
            peer_addr: None,
            flags: Flags::empty(),
        }
    }
}

impl Head for RequestHead {
    fn clear(&mut self) {
        self.flags = Flags::empty();
        self.headers.clear();
    }

    fn with_pool<F, R>(f: F) -> R
    where
        F: FnOnce(&MessagePool<Self>) -> R,
    {
        REQUEST_POOL.with(|p| f(p))
    }
}

impl RequestHead {
    /// A head of `method` and `uri`, HTTP/1.1, with no headers and none of their room
    /// allocated (`Default` makes room for 16): for a [`ForwardedHead`], whose headers are
    /// elsewhere.
    pub fn bare(method: Method, uri: Uri) -> RequestHead {
        RequestHead {
            method,
            uri,
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            peer_addr: None,
            flags: Flags::empty(),
        }
    }

    /// Read the message headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Mutable reference to the message headers.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// Returns whether headers should be sent in Camel-Case.
    ///
    /// Default is `false`.
    #[inline]
    pub fn camel_case_headers(&self) -> bool {
        self.flags.contains(Flags::CAMEL_CASE)
    }

    /// Sets whether to send headers formatted as Camel-Case.
    #[inline]
    pub fn set_camel_case_headers(&mut self, val: bool) {
        if val {
            self.flags.insert(Flags::CAMEL_CASE);
        } else {
            self.flags.remove(Flags::CAMEL_CASE);
        }
    }

    #[inline]
    /// Set connection type of the message
    pub fn set_connection_type(&mut self, ctype: ConnectionType) {
        match ctype {
            ConnectionType::Close => self.flags.insert(Flags::CLOSE),
            ConnectionType::KeepAlive => self.flags.insert(Flags::KEEP_ALIVE),
            ConnectionType::Upgrade => self.flags.insert(Flags::UPGRADE),
        }
    }

    #[inline]
    /// Connection type
    pub fn connection_type(&self) -> ConnectionType {
        if self.flags.contains(Flags::CLOSE) {
            ConnectionType::Close
        } else if self.flags.contains(Flags::KEEP_ALIVE) {
            ConnectionType::KeepAlive
        } else if self.flags.contains(Flags::UPGRADE) {
            ConnectionType::Upgrade
        } else if self.version < Version::HTTP_11 {
            ConnectionType::Close
        } else {
            ConnectionType::KeepAlive
        }
    }

    /// Connection upgrade status
    pub fn upgrade(&self) -> bool {
        let mut upgrade = false;

        for conn in self.headers().get_all(header::CONNECTION) {
            if let Ok(conn) = conn.to_str() {
                for option in conn.split(',').map(str::trim) {
                    if option.eq_ignore_ascii_case("close") {
                        return false;
                    } else if option.eq_ignore_ascii_case("upgrade") {
                        upgrade = true;
                    }
                }
            }
        }

        upgrade
    }

    #[inline]
    /// Get response body chunking state
    pub fn chunked(&self) -> bool {
        !self.flags.contains(Flags::NO_CHUNKING)
    }

    #[inline]
    pub fn no_chunking(&mut self, val: bool) {
        if val {
            self.flags.insert(Flags::NO_CHUNKING);
        } else {
            self.flags.remove(Flags::NO_CHUNKING);
        }
    }

    /// Request contains `EXPECT` header.
    #[inline]
    pub fn expect(&self) -> bool {
        self.flags.contains(Flags::EXPECT)
    }

    #[inline]
    pub(crate) fn set_expect(&mut self) {
        self.flags.insert(Flags::EXPECT);
    }
}

/// A request head that a proxy forwards: the head it received, written out as it came
/// but for the headers the proxy drops and its own, without copying the received headers
/// into a map of their own (HAProxy and nginx edit the head they parsed in place; this is
/// the nearest a head held by another layer allows).
pub trait ForwardedHead {
    /// Method, URI, version and connection flags of the request to send. The URI says where
    /// to connect (scheme and authority); its path is not sent ([`ForwardedHead::target`]
    /// is). Its header map is not read: [`ForwardedHead::headers`] gives the headers.
    fn head(&self) -> &RequestHead;

    /// The request target written on the request line: a path and query.
    fn target(&self) -> &str;

    /// Calls `f` with every header to send (each value of a repeated one), in the order
    /// they are to be written.
    fn headers(&self, f: &mut dyn FnMut(&HeaderName, &HeaderValue));

    /// Whether a header named `name` is among those [`ForwardedHead::headers`] gives.
    fn has(&self, name: &HeaderName) -> bool;
}

pub enum RequestHeadType {
    /// Boxed (vendored): inline, its 160 bytes sized every variant, and a client's request
    /// is moved whole through each layer of awc's connector and send futures.
    Owned(Box<RequestHead>),
    Rc(Rc<RequestHead>, Option<HeaderMap>),
    /// A head a proxy forwards (see [`ForwardedHead`]).
    Forward(Box<dyn ForwardedHead>),
}

impl fmt::Debug for RequestHeadType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestHeadType::Owned(head) => f.debug_tuple("Owned").field(head).finish(),
            RequestHeadType::Rc(head, extra) => {
                f.debug_tuple("Rc").field(head).field(extra).finish()
            }
            RequestHeadType::Forward(fwd) => {
                let mut headers = Vec::new();
                fwd.headers(&mut |name, value| headers.push((name.clone(), value.clone())));
                f.debug_struct("Forward")
                    .field("head", fwd.head())
                    .field("target", &fwd.target())
                    .field("headers", &headers)
                    .finish()
            }
        }
    }
}

impl RequestHeadType {
    pub fn extra_headers(&self) -> Option<&HeaderMap> {
        match self {
            RequestHeadType::Owned(_) | RequestHeadType::Forward(_) => None,
            RequestHeadType::Rc(_, headers) => headers.as_ref(),
        }
    }

    /// Whether the request sends a header named `name`, wherever this kind of head keeps
    /// its headers.
    pub fn has_header(&self, name: &HeaderName) -> bool {
        match self {
            RequestHeadType::Owned(head) => head.headers.contains_key(name),
            RequestHeadType::Rc(head, extra) => {
                head.headers.contains_key(name) || extra.iter().any(|h| h.contains_key(name))
            }
            RequestHeadType::Forward(fwd) => fwd.has(name),
        }
    }
}

impl AsRef<RequestHead> for RequestHeadType {
    fn as_ref(&self) -> &RequestHead {
        match self {
            RequestHeadType::Owned(head) => head,
            RequestHeadType::Rc(head, _) => head.as_ref(),
            RequestHeadType::Forward(fwd) => fwd.head(),
        }
    }
}

impl From<RequestHead> for RequestHeadType {
    fn from(head: RequestHead) -> Self {
        RequestHeadType::Owned(Box::new(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_type_is_no_larger_than_its_rc_variant() {
        // Moved whole through every layer of awc's connector and send futures: an inline
        // `RequestHead` (160 bytes) made it 192.
        assert!(std::mem::size_of::<RequestHeadType>() <= 64);
        let head = RequestHeadType::from(RequestHead::default());
        assert!(matches!(head, RequestHeadType::Owned(_)));
        assert_eq!(head.as_ref().method, Method::GET);
        assert!(!head.has_header(&crate::header::HOST));
    }
}
