//! TLS with rustls (the `ring` provider; no OpenSSL): the listener's certificate, read and
//! checked from PEM files and swapped in place on reload, and the client side for
//! `https://` servers (the system's roots plus `proxy.upstream_ca`).
//!
//! The listener asks [`CertStore`] for its certificate once per handshake, so a reload
//! reaches new handshakes while open connections keep the certificate they began with.
//! Nothing here binds a socket or knows the configuration's shape: `config` hands it paths
//! and keeps what it returns.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig,
};

/// Why a certificate, key or CA file was refused: the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Content { path: PathBuf, reason: String },
    #[error("{key}: the key does not match the certificate in {cert}")]
    Mismatch { key: PathBuf, cert: PathBuf },
}

impl TlsError {
    /// True when the problem is the key file's (the config error names `listen.tls.key`).
    pub(crate) fn is_key(&self, key: &Path) -> bool {
        match self {
            TlsError::Mismatch { .. } => true,
            TlsError::Read { path, .. } | TlsError::Content { path, .. } => path == key,
        }
    }
}

/// A certificate chain and its key, checked to belong together, as the listener serves it.
#[derive(Clone)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// Where the chain was read from, for the log.
    pub(crate) cert_path: PathBuf,
    /// The leaf's `notAfter`, when it could be read.
    pub(crate) not_after: Option<SystemTime>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Reads a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1) and
    /// checks that the key is the leaf's.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, TlsError> {
        let chain = read_certs(cert)?;
        let key_pem = read(key)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Content {
            path: key.into(),
            reason: format!("no PEM private key ({e})"),
        })?;
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(|e| TlsError::Content {
                path: key.into(),
                reason: format!("unusable private key: {e}"),
            })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::Mismatch {
                    key: key.into(),
                    cert: cert.into(),
                })
            }
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(TlsError::Content {
                    path: cert.into(),
                    reason: format!("not a usable certificate: {e}"),
                })
            }
        }
        let not_after = certified.cert.first().and_then(|c| not_after(c));
        Ok(ServerCert {
            key: Arc::new(certified),
            cert_path: cert.into(),
            not_after,
        })
    }

    /// The expiry date, when the leaf has expired by `now`.
    pub(crate) fn expired_at(&self, now: SystemTime) -> Option<SystemTime> {
        self.not_after.filter(|t| *t < now)
    }

    /// Logs a WARN line naming the file and its expiry date when the leaf has expired.
    pub(crate) fn warn_if_expired(&self) {
        if let Some(at) = self.expired_at(SystemTime::now()) {
            log::warn!(
                "listen.tls.cert {}: the certificate expired on {}; clients will refuse it",
                self.cert_path.display(),
                humantime::format_rfc3339_seconds(at)
            );
        }
    }

    /// True when both hold the same chain.
    pub(crate) fn same_chain(&self, other: &ServerCert) -> bool {
        self.key.cert == other.key.cert
    }
}

/// Sessions kept for resumption (rustls's default size).
const SESSION_CACHE_SIZE: usize = 256;

/// The listener's certificate, read once per handshake and replaced on reload, with the
/// sessions that clients may resume, which go with it: a resumed session skips the
/// certificate, so one begun under the old certificate must not outlive it.
#[derive(Debug)]
pub struct CertStore {
    key: RwLock<Arc<CertifiedKey>>,
    sessions: RwLock<Arc<ServerSessionMemoryCache>>,
}

impl CertStore {
    pub fn new(cert: &ServerCert) -> Arc<CertStore> {
        Arc::new(CertStore {
            key: RwLock::new(cert.key.clone()),
            sessions: RwLock::new(ServerSessionMemoryCache::new(SESSION_CACHE_SIZE)),
        })
    }

    /// New handshakes get `cert` (and no session of the old one); connections already
    /// open keep theirs.
    pub(crate) fn replace(&self, cert: &ServerCert) {
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = cert.key.clone();
        *self.sessions.write().unwrap_or_else(|e| e.into_inner()) =
            ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    }

    fn sessions(&self) -> Arc<ServerSessionMemoryCache> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    // One certificate whatever the SNI (as nginx's default server): a client that asked
    // for another name refuses it by its own checks.
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl StoresServerSessions for CertStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.sessions().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.sessions().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.sessions().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The listener's rustls configuration over `store`; actix adds the ALPN list (h2, http/1.1).
pub fn server_config(store: Arc<CertStore>) -> ServerConfig {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.session_storage = store;
    config
}

/// The client configuration for `https://` servers: the system's roots and, when given,
/// the certificates of `upstream_ca`. HTTP/1.1 only by ALPN: upstreams are spoken to as
/// nginx does, and the response framing checks are HTTP/1.1's.
pub fn client_config(upstream_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = system_roots().clone();
    if let Some(ca) = upstream_ca {
        for cert in read_certs(ca)? {
            roots.add(cert).map_err(|e| TlsError::Content {
                path: ca.into(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(ring::default_provider()))
        .clone()
}

/// The system's trusted roots, read once per process (a few hundred certificates).
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            log::debug!("system roots: {e}");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        log::debug!("system roots: {added} trusted, {ignored} unusable");
        roots
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Every certificate in a PEM file; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            path: path.into(),
            reason: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.into(),
            reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

/// The `notAfter` of an X.509 certificate, `None` when it cannot be parsed (rustls parses
/// certificates but does not expose their dates).
fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    match u64::try_from(secs) {
        Ok(after) => SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(after)),
        Err(_) => SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn self_signed(not_after: (i32, u8, u8)) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn the_expiry_date_is_read_from_the_certificate() {
        for date in [(2001, 2, 28), (2049, 12, 31), (2050, 1, 1), (2100, 3, 1)] {
            let (cert, _) = self_signed(date);
            let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let at = not_after(&der).expect("a date");
            let want = format!("{:04}-{:02}-{:02}T00:00:00Z", date.0, date.1, date.2);
            assert_eq!(humantime::format_rfc3339_seconds(at).to_string(), want);
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed((2100, 1, 1));
        let (_, other_key) = self_signed((2100, 1, 1));
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &other_key);
        let err = ServerCert::load(&cert, &key).unwrap_err();
        assert!(err.is_key(&key));
        let text = err.to_string();
        assert!(
            text.contains("key.pem") && text.contains("cert.pem"),
            "{text}"
        );
    }

    #[test]
    fn unreadable_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed((2100, 1, 1));
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        assert!(ServerCert::load(&cert, &key).is_ok());
        let missing = dir.path().join("missing.pem");
        let err = ServerCert::load(&missing, &key).unwrap_err().to_string();
        assert!(err.contains("missing.pem: cannot read"), "{err}");
        let empty = write(dir.path(), "empty.pem", "");
        let err = ServerCert::load(&empty, &key).unwrap_err().to_string();
        assert!(err.contains("empty.pem: no PEM certificate"), "{err}");
        let err = ServerCert::load(&cert, &cert).unwrap_err();
        assert!(err.is_key(&cert) && err.to_string().contains("no PEM private key"));
    }

    #[test]
    fn an_expired_certificate_loads_and_says_when_it_expired() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed((2020, 1, 1));
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let loaded = ServerCert::load(&cert, &key).unwrap();
        assert!(loaded.expired_at(SystemTime::now()).is_some());
        assert!(loaded.expired_at(SystemTime::UNIX_EPOCH).is_none());
    }
}
