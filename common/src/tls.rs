//! The `[tls]` section shared by `node.toml` and `coordinator.toml`: where the federation
//! CA, this party's certificate and its private key are (PEM files). Only file reading and
//! checks live here; the transports are set up by the node and the coordinator.

use std::path::{Path, PathBuf};

/// PEM material of one party, read from its `[tls]` files.
#[derive(Clone)]
pub struct TlsPem {
    /// The federation CA certificate(s).
    pub ca: Vec<u8>,
    /// This party's certificate chain.
    pub cert: Vec<u8>,
    /// This party's private key.
    pub key: Vec<u8>,
    /// Where the files were read from, for messages.
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsPem")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn read_pem(base: &Path, p: &Path, key: &str, marker: &str) -> Result<(Vec<u8>, PathBuf), String> {
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "[tls] {key} = {:?}: cannot read {}: {e}; create certificates with `fedq certs init` and `fedq certs issue`",
            p.display(),
            path.display()
        )
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(marker) {
        return Err(format!(
            "[tls] {key}: {} is not a PEM file with a {marker} block",
            path.display()
        ));
    }
    Ok((bytes, path))
}

impl TlsPem {
    /// Read `ca`, `cert` and `key` (relative paths against `base`), checking each is PEM.
    pub fn load(base: &Path, ca: &Path, cert: &Path, key: &Path) -> Result<TlsPem, String> {
        let (ca, _) = read_pem(base, ca, "ca", "CERTIFICATE")?;
        let (cert, cert_path) = read_pem(base, cert, "cert", "CERTIFICATE")?;
        let (key, _) = read_pem(base, key, "key", "PRIVATE KEY")?;
        Ok(TlsPem {
            ca,
            cert,
            key,
            cert_path,
        })
    }
}

/// The warning logged (at `warn`) by a node or coordinator started with `insecure_dev`.
pub const INSECURE_DEV_WARNING: &str = "INSECURE: insecure_dev = true: traffic between the coordinator and the nodes is PLAINTEXT and UNAUTHENTICATED. Anyone who can reach this port can send requests or read answers. Use this only on a development machine; configure [tls] everywhere else";
