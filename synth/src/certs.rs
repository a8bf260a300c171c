//! A development certificate authority for mTLS between the coordinator and the nodes
//! (`fedq certs init|issue`, and every `fedq synth` output).
//!
//! The CA signs one certificate per party. Each certificate names its party in the subject
//! common name and as a DNS subject-alternative name (plus `localhost` and `127.0.0.1`, so
//! loopback federations verify): a node's name is its site (the coordinator checks that the
//! node it reached holds the certificate of the site it meant), the coordinator's name is
//! what nodes put on their `allowed_coordinators` list. Certificates allow both server and
//! client authentication. Keys are ECDSA P-256, written with mode 0600.
//!
//! This is for development and tests. A hospital network uses its own PKI: any CA whose
//! certificates carry the names above works the same way.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::configs::{write_file, write_secret};
use crate::SynthError;

/// File names of the CA inside a certificate directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (mode 0600). Only needed to issue more certificates.
pub const CA_KEY: &str = "ca.key";

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    /// `<dir>/<name>.pem`.
    pub cert: PathBuf,
    /// `<dir>/<name>.key` (mode 0600).
    pub key: PathBuf,
}

fn cert_err(what: &str, e: rcgen::Error) -> SynthError {
    SynthError::Certificate(format!("{what}: {e}"))
}

/// A loaded CA that can issue certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
}

impl DevCa {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str) -> Result<DevCa, SynthError> {
        let key = KeyPair::generate().map_err(|e| cert_err("generating the CA key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| cert_err("CA parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "fedq development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| cert_err("self-signing the CA", e))?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Write `ca.pem` and `ca.key` into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), SynthError> {
        crate::create_dir(dir)?;
        let cert = dir.join(CA_CERT);
        let key = dir.join(CA_KEY);
        write_file(&cert, &self.cert_pem)?;
        write_secret(&key, &self.issuer.key().serialize_pem())?;
        Ok((cert, key))
    }

    /// Load `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<DevCa, SynthError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|e| {
                SynthError::Certificate(format!(
                    "cannot read {}: {e}; create a CA first with `fedq certs init --dir {}`",
                    p.display(),
                    dir.display()
                ))
            })
        };
        let cert_pem = read(dir.join(CA_CERT))?;
        let key_pem = read(dir.join(CA_KEY))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| cert_err("reading ca.key", e))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| cert_err("reading ca.pem", e))?;
        Ok(DevCa { issuer, cert_pem })
    }

    /// Issue a certificate for `name` (a site, or a coordinator name), valid for server and
    /// client authentication. `extra_names` are further DNS names or IP addresses.
    /// Returns `(cert PEM, key PEM)`.
    pub fn issue(
        &self,
        name: &str,
        extra_names: &[String],
    ) -> Result<(String, String), SynthError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(SynthError::InvalidConfig(format!(
                "certificate name {name:?} must be a DNS-style name (letters, digits, '-' and '.'), e.g. site01 or coordinator"
            )));
        }
        let key = KeyPair::generate().map_err(|e| cert_err("generating a key", e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| cert_err("certificate parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let mut names = vec![name.to_string(), "localhost".to_string()];
        names.extend(extra_names.iter().cloned());
        names.dedup();
        let mut sans = vec![SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]))];
        for n in names {
            if let Ok(ip) = n.parse::<std::net::IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else {
                sans.push(SanType::DnsName(n.clone().try_into().map_err(|e| {
                    cert_err(&format!("name {n:?} is not a valid DNS name"), e)
                })?));
            }
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| cert_err(&format!("signing the certificate of {name}"), e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issue a certificate for `name` and write `<dir>/<name>.pem` and `<dir>/<name>.key`.
    pub fn issue_to(
        &self,
        dir: &Path,
        name: &str,
        extra_names: &[String],
    ) -> Result<IssuedPaths, SynthError> {
        let (cert_pem, key_pem) = self.issue(name, extra_names)?;
        crate::create_dir(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        write_file(&cert, &cert_pem)?;
        write_secret(&key, &key_pem)?;
        Ok(IssuedPaths { cert, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_ca_loads_and_issues() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        ca.write(tmp.path()).unwrap();
        let loaded = DevCa::load(tmp.path()).unwrap();
        let p = loaded
            .issue_to(tmp.path(), "site01", &["node1.example".into()])
            .unwrap();
        let pem = std::fs::read_to_string(&p.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(tmp.path().join(CA_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(loaded.issue("bad name!", &[]).is_err());
    }

    #[test]
    fn loading_a_missing_ca_says_how_to_create_one() {
        let tmp = tempfile::tempdir().unwrap();
        let e = DevCa::load(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("fedq certs init"), "{e}");
    }
}
