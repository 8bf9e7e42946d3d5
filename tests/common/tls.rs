//! TLS for the tests: a CA of the test's own (rcgen, ECDSA P-256) and the certificates it
//! signs, clients that trust it (awc, and blocking rustls connections), and a server
//! certificate that records the names clients ask for.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, ServerName},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned,
};

/// A CA of the test's own and the files it signs, in a temporary directory.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub dir: tempfile::TempDir,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Ca { cert, key, dir }
    }

    pub fn pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `localhost` and `127.0.0.1` named `cn`, written as `{file}.pem`
    /// and `{file}.key`; `expired` makes one whose validity ended in 2020.
    pub fn leaf(&self, file: &str, cn: &str, expired: bool) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A client configuration that trusts this CA only, offering `alpn`.
    pub fn client(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// An awc client that trusts `ca` and offers `alpn` (`h2` first: HTTP/2 when agreed).
pub fn https_client(ca: &Ca, alpn: &[&str]) -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(ca.client(alpn)))
        .disable_redirects()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// A blocking TLS connection (rustls over a std socket), the handshake done.
pub fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, std::io::Error> {
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let conn = ClientConnection::new(config, server_name).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// GET `/` on an open TLS connection (kept alive); the status.
pub fn get_on(stream: &mut StreamOwned<ClientConnection, TcpStream>) -> u16 {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length: usize = head
        .split("content-length: ")
        .nth(1)
        .and_then(|v| v.split("\r\n").next())
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    stream.read_exact(&mut vec![0; length]).unwrap();
    head[9..12].parse().unwrap()
}

pub fn peer_cert(stream: &StreamOwned<ClientConnection, TcpStream>) -> CertificateDer<'static> {
    stream.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

pub fn leaf_der(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_file(path).unwrap()
}

/// A server certificate that records the name each client asked for (SNI).
#[derive(Debug)]
pub struct RecordingCert {
    pub key: Arc<CertifiedKey>,
    pub names: Mutex<Vec<Option<String>>>,
}

impl ResolvesServerCert for RecordingCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_string);
        self.names.lock().unwrap().push(name);
        Some(self.key.clone())
    }
}

pub fn server_tls(resolver: Arc<dyn ResolvesServerCert>) -> ServerConfig {
    ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver)
}
