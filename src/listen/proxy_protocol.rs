//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary) that an
//! L4 balancer (AWS NLB, HAProxy `send-proxy`) puts before a connection's first byte, naming
//! the client it accepted the connection from.
//!
//! The header is read exactly: not one byte of what follows it (a TLS ClientHello, a request
//! head) is consumed, so the stream goes on to TLS or actix-http as it is, with no buffer in
//! front of it. A v2 header says its own length; a v1 line is found by peeking at what has
//! arrived and consuming up to its `\n` only. The bytes are then parsed by `ppp`.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use actix_rt::net::TcpStream;
use ppp::{v1, v2};
use tokio::io::AsyncReadExt as _;

/// The first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v2: the signature, version and command, family and protocol, and the length (2 bytes).
const V2_FIXED: usize = 16;
/// v1: the longest line the specification allows, `\r\n` included.
const V1_MAX: usize = 107;
/// Bytes read before the version is decided: the shortest valid header of either version is
/// at least this long (`PROXY UNKNOWN\r\n`), so they are all header bytes.
const SHORTEST: usize = 15;

/// Why a connection was closed before anything was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no PROXY protocol header within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header ended")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header that must open `io` within `deadline`. `Some(source)` is the client the
/// balancer in front names; `None` keeps the TCP peer: a v2 `LOCAL` header (the balancer's
/// own health check), v1 `UNKNOWN`, or addresses that are not IP (v2 `UNSPEC`, `UNIX`).
pub async fn read(io: &mut TcpStream, deadline: Duration) -> Result<Option<SocketAddr>, Refused> {
    match tokio::time::timeout(deadline, read_header(io)).await {
        Ok(read) => read,
        Err(_) => Err(Refused::Timeout(deadline)),
    }
}

async fn read_header(io: &mut TcpStream) -> Result<Option<SocketAddr>, Refused> {
    let mut buf = Vec::with_capacity(V1_MAX);
    buf.resize(SHORTEST, 0);
    read_exact(io, &mut buf).await?;
    if buf.starts_with(V2_SIGNATURE) {
        buf.resize(V2_FIXED, 0);
        read_exact(io, &mut buf[SHORTEST..]).await?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        buf.resize(V2_FIXED + len, 0);
        read_exact(io, &mut buf[V2_FIXED..]).await?;
        return v2_source(&buf);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(Refused::Invalid(format!("starts with {:?}", shown(&buf))));
    }
    // A v1 line: consume what has arrived up to its `\n`, never past it.
    while !buf.ends_with(b"\n") {
        if buf.len() >= V1_MAX {
            return Err(Refused::Invalid(format!(
                "a v1 line longer than {V1_MAX} bytes: {:?}",
                shown(&buf)
            )));
        }
        let mut peek = [0u8; V1_MAX];
        let room = V1_MAX - buf.len();
        let n = io.peek(&mut peek[..room]).await?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        // Everything peeked up to and including a `\n` is the header's; without one, all of
        // it is, and the next peek waits for more (no byte is peeked twice).
        let take = peek[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let start = buf.len();
        buf.resize(start + take, 0);
        read_exact(io, &mut buf[start..]).await?;
    }
    v1_source(&buf)
}

async fn read_exact(io: &mut TcpStream, buf: &mut [u8]) -> Result<(), Refused> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Refused::Closed),
        Err(e) => Err(e.into()),
    }
}

fn v1_source(line: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    let header = v1::Header::try_from(line)
        .map_err(|e| Refused::Invalid(format!("{e}: {:?}", shown(line))))?;
    Ok(match header.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    })
}

fn v2_source(bytes: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    let header = v2::Header::try_from(bytes).map_err(|e| Refused::Invalid(format!("v2: {e}")))?;
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

/// Up to 40 bytes of what arrived, for the log.
fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned()
}

/// Logs a refused connection: the first one at WARN, since every connection refused at once
/// usually means the balancer in front sends no header (or this listener should not expect
/// one); the rest at DEBUG, so that anyone who can connect cannot fill the log.
pub fn log_refused(peer: Option<SocketAddr>, why: &Refused) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let peer = peer.map_or_else(|| "?".into(), |p| p.to_string());
    if WARNED.swap(true, Ordering::Relaxed) {
        log::debug!("connection from {peer} closed: {why}");
    } else {
        log::warn!(
            "connection from {peer} closed: {why} (listen.proxy_protocol is on: every connection \
             must open with a PROXY protocol header; further ones are logged at debug level)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_give_the_source_or_keep_the_peer() {
        let four = v1_source(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\n").unwrap();
        assert_eq!(four, Some("203.0.113.7:51000".parse().unwrap()));
        let six = v1_source(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n").unwrap();
        assert_eq!(six, Some("[2001:db8::7]:51000".parse().unwrap()));
        assert_eq!(v1_source(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert_eq!(
            v1_source(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap(),
            None
        );
    }

    #[test]
    fn malformed_v1_lines_are_refused() {
        for line in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 051000 80\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 80\r\n",
            b"PROXY TCP5 203.0.113.7 10.0.0.1 1 80\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 80\r\n",
        ] {
            assert!(v1_source(line).is_err(), "{:?}", shown(line));
        }
    }

    #[test]
    fn v2_local_keeps_the_peer_and_proxy_gives_the_source() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(v2_source(&local).unwrap(), None);

        let mut proxy = V2_SIGNATURE.to_vec();
        proxy.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1]);
        proxy.extend_from_slice(&[0xC3, 0x50, 0x01, 0xBB]);
        assert_eq!(
            v2_source(&proxy).unwrap(),
            Some("198.51.100.9:50000".parse().unwrap())
        );

        let mut bad_version = proxy.clone();
        bad_version[12] = 0x31;
        assert!(v2_source(&bad_version).is_err());
    }
}
