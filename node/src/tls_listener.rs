//! The node's TLS listener. Handshakes run here rather than inside tonic, so that a caller
//! refused by TLS itself (no client certificate, one from another CA, a handshake that
//! never finishes) is logged with its address: the hospital's log then records every
//! refused caller, not only those refused by the allow-list after the handshake
//! (`NodeService::caller`). Accepted connections are handed to tonic as they are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedq_common::tls::TlsPem;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::NodeError;

/// How long a caller has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake finished but that tonic has not taken yet.
const QUEUE: usize = 64;

/// The server's TLS configuration: this node's certificate, and client certificates
/// required and verified against the federation CA. HTTP/2 only.
pub fn server_config(pem: &TlsPem) -> Result<rustls::ServerConfig, NodeError> {
    let bad = |what: &str, e: String| {
        NodeError::Tls(format!(
            "{}: {what}: {e}; check [tls] ca, cert and key in the node config",
            pem.cert_path.display()
        ))
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pem.ca) {
        let ca = ca.map_err(|e| bad("the CA file", e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| bad("the CA certificate", e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| bad("the CA", e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("the certificate", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| bad("the key", e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("the certificate and key", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accept TCP connections on `listener`, run each TLS handshake (logging a refusal with
/// the peer's address), and yield the connections that completed it. Stops accepting when
/// the returned stream is dropped (the server shut down).
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    site: String,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, rather than spin.
                    tracing::warn!(site = %site, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold small response
            // frames back for tens of milliseconds.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, site) = (acceptor.clone(), tx.clone(), site.clone());
            tokio::spawn(async move {
                if let Some(tls) = handshake(&acceptor, tcp, peer, &site).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    site: &str,
) -> Option<TlsStream<TcpStream>> {
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => fedq_common::escape_log(&e.to_string()),
        Err(_) => format!(
            "the TLS handshake did not finish within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
    };
    tracing::warn!(site, peer = %peer, outcome = "refused", reason = %reason, "caller refused by TLS");
    None
}
