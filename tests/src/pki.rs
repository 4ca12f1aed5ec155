//! Certificates for zones in tests, made with rcgen: a CA per test site and
//! a certificate per zone with the SAN URI `kmsd://zone/NAME`, usable for
//! both TLS client and server authentication, as kmsd requires.

use std::path::{Path, PathBuf};

/// A test CA (ECDSA P-256, self-signed, a unique common name).
#[allow(missing_debug_implementations)] // holds a private key
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// The files of one zone's identity.
#[derive(Debug, Clone)]
pub struct ZoneCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ZoneCert {
    /// The `[peering]` lines that use these files.
    pub fn peering_toml(&self, listen: &str) -> String {
        format!(
            "[peering]\nlisten = {listen:?}\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            self.cert, self.key, self.ca
        )
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A fresh CA.
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cn = format!("kmsd test CA {}", uuid::Uuid::new_v4());
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { cert, key }
    }

    /// Writes `dir/ca.pem` (this CA), `dir/NAME.pem` and `dir/NAME.key`
    /// for a certificate whose SAN holds `uris`.
    pub fn issue_uris(&self, dir: &Path, name: &str, uris: &[String]) -> ZoneCert {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(u.clone().try_into().expect("an IA5 URI")))
            .collect();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("certificate");
        let files = ZoneCert {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, self.cert.pem()).unwrap();
        files
    }

    /// A certificate for `127.0.0.1` (server and client use), as an etcd
    /// member or its client presents.
    pub fn issue_loopback(&self, dir: &Path, name: &str) -> ZoneCert {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("certificate");
        let files = ZoneCert {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, self.cert.pem()).unwrap();
        files
    }

    /// The certificate of zone `zone`.
    pub fn issue(&self, dir: &Path, zone: &str) -> ZoneCert {
        self.issue_uris(dir, zone, &[format!("kmsd://zone/{zone}")])
    }
}
