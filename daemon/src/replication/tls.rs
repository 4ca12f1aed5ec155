//! Mutual TLS between zones: who a peer is comes from its certificate.
//!
//! Every zone has a certificate signed by the deployment's CA whose subject
//! alternative names hold exactly one URI `kmsd://zone/NAME`. Both sides of
//! a connection verify the other's chain to that CA (TLS 1.3 only, rustls
//! with the `ring` provider); the listening side reads the caller's zone
//! from its certificate, and the dialling side checks that the server's
//! certificate names the zone it meant to reach. A zone's certificate must
//! allow both `serverAuth` and `clientAuth`, since each daemon is both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The URI prefix that names a zone in a certificate.
pub const ZONE_URI_PREFIX: &str = "kmsd://zone/";

/// The name every dialled peer is asked for (SNI). Certificates are not
/// checked against it: the zone URI is what identifies a peer.
const SERVER_NAME: &str = "kmsd-peer";

/// Why the TLS settings or a peer's certificate are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    Empty { what: &'static str, path: PathBuf },
    #[error("certificate {path} names no zone: it needs exactly one SAN URI {ZONE_URI_PREFIX}NAME")]
    NoZone { path: PathBuf },
    #[error("certificate {path} is for zone {found}, but this daemon is zone {expected}")]
    WrongZone {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("TLS setup")]
    Rustls(#[from] rustls::Error),
    #[error("CA certificates")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where the zone's credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This zone's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) that sign every zone's certificate (PEM).
    pub ca: PathBuf,
}

/// The zone a certificate names: the one SAN URI `kmsd://zone/NAME` with a
/// valid zone name. `None` for none, several, or a malformed one.
pub fn zone_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut zones = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(ZONE_URI_PREFIX),
        _ => None,
    });
    let zone = zones.next()?;
    if zones.next().is_some() || !crate::config::zone_name_ok(zone) {
        return None;
    }
    Some(zone.to_string())
}

/// TLS configurations of one zone: a server that requires a client
/// certificate, and a client per zone it dials.
#[derive(Debug)]
pub struct PeerTls {
    server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl PeerTls {
    /// Loads the credentials of zone `zone`, checking that its certificate
    /// names it.
    ///
    /// # Errors
    /// Unreadable or malformed files, a certificate for another zone or
    /// none, a key that does not match.
    pub fn load(files: &TlsFiles, zone: &str) -> Result<Self, TlsError> {
        let chain = read_certs("certificate", &files.cert)?;
        let found = zone_of(&chain[0]).ok_or_else(|| TlsError::NoZone {
            path: files.cert.clone(),
        })?;
        if found != zone {
            return Err(TlsError::WrongZone {
                path: files.cert.clone(),
                found,
                expected: zone.to_string(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Read {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs("CA file", &files.ca)? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        Ok(Self {
            server: Arc::new(server),
            provider,
            roots,
            chain,
            key,
        })
    }

    /// The acceptor for the peering listener.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// A connector that accepts only a server whose certificate names
    /// `zone`, and presents this zone's certificate.
    ///
    /// # Errors
    /// A key rustls cannot use (already checked by [`PeerTls::load`]).
    pub fn connector(&self, zone: &str) -> Result<tokio_rustls::TlsConnector, TlsError> {
        let verifier = Arc::new(ZoneVerifier {
            zone: zone.to_string(),
            roots: self.roots.clone(),
            algs: self.provider.signature_verification_algorithms,
        });
        let client = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    /// The name to dial every peer with.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
    }
}

/// Checks a server's chain to the CA like rustls' own verifier, then its
/// zone URI instead of a host name.
#[derive(Debug)]
struct ZoneVerifier {
    zone: String,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ZoneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        match zone_of(end_entity) {
            Some(z) if z == self.zone => Ok(ServerCertVerified::assertion()),
            Some(z) => Err(rustls::Error::General(format!(
                "the peer at zone {}'s address presented a certificate for zone {z}",
                self.zone
            ))),
            None => Err(rustls::Error::General(format!(
                "the peer at zone {}'s address presented a certificate naming no zone",
                self.zone
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA and certificates for zones, made with rcgen.
    pub(crate) struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl Ca {
        pub(crate) fn new() -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cn = format!("kmsd test CA {}", uuid::Uuid::new_v4());
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self { cert, key }
        }

        /// Writes `ca.pem`, `NAME.pem`, `NAME.key` for a leaf with `uris`.
        pub(crate) fn issue(&self, dir: &Path, name: &str, uris: &[&str]) -> TlsFiles {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = uris
                .iter()
                .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
                .collect();
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            let files = TlsFiles {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
                ca: dir.join("ca.pem"),
            };
            std::fs::write(&files.cert, cert.pem()).unwrap();
            std::fs::write(&files.key, key.serialize_pem()).unwrap();
            std::fs::write(&files.ca, self.cert.pem()).unwrap();
            files
        }
    }

    fn der(files: &TlsFiles) -> CertificateDer<'static> {
        read_certs("certificate", &files.cert).unwrap().remove(0)
    }

    #[test]
    fn a_certificate_names_exactly_one_valid_zone() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let one = ca.issue(dir.path(), "a", &["kmsd://zone/a"]);
        assert_eq!(zone_of(&der(&one)).as_deref(), Some("a"));
        let two = ca.issue(dir.path(), "two", &["kmsd://zone/a", "kmsd://zone/b"]);
        assert_eq!(zone_of(&der(&two)), None, "two zones: ambiguous");
        let none = ca.issue(dir.path(), "none", &["https://example.org/"]);
        assert_eq!(zone_of(&der(&none)), None);
        let bad = ca.issue(dir.path(), "bad", &["kmsd://zone/a%2Fb"]);
        assert_eq!(zone_of(&der(&bad)), None, "not a zone name");
    }

    #[test]
    fn load_refuses_a_certificate_of_another_zone() {
        let dir = tempfile::tempdir().unwrap();
        let files = Ca::new().issue(dir.path(), "b", &["kmsd://zone/b"]);
        assert!(PeerTls::load(&files, "b").is_ok());
        let e = PeerTls::load(&files, "a").unwrap_err();
        assert!(matches!(e, TlsError::WrongZone { .. }), "{e}");
    }

    async fn handshake(server: &PeerTls, client: &PeerTls, dial: &str) -> Result<Option<String>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = server.acceptor();
        let srv = tokio::spawn(async move {
            let s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let zone = s.get_ref().1.peer_certificates().and_then(|c| zone_of(&c[0]));
            Ok::<_, String>(zone)
        });
        let conn = client.connector(dial).unwrap();
        let c = conn.connect(PeerTls::server_name(), b).await;
        let server_side = srv.await.unwrap();
        c.map_err(|e| e.to_string())?;
        server_side
    }

    #[tokio::test]
    async fn both_ends_learn_the_other_zone_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let a = PeerTls::load(&ca.issue(dir.path(), "a", &["kmsd://zone/a"]), "a").unwrap();
        let b = PeerTls::load(&ca.issue(dir.path(), "b", &["kmsd://zone/b"]), "b").unwrap();
        assert_eq!(handshake(&b, &a, "b").await.unwrap().as_deref(), Some("a"));
        // a dials "c" but reaches b: the client refuses.
        let e = handshake(&b, &a, "c").await.unwrap_err();
        assert!(e.contains("zone b"), "{e}");
        // A certificate from another CA is refused by the server.
        // (It trusts our CA, so only the server can refuse it.)
        let other_dir = tempfile::tempdir().unwrap();
        let mut files = Ca::new().issue(other_dir.path(), "a", &["kmsd://zone/a"]);
        files.ca = dir.path().join("ca.pem");
        let stranger = PeerTls::load(&files, "a").unwrap();
        let e = handshake(&b, &stranger, "b").await.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
    }
}
