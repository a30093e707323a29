//! TLS for `amqps://` (feature `tls`): the driver's own, under the guard on what the
//! broker sends (`guard.rs`), so that the guard reads the AMQP bytes, not the
//! encrypted ones.
//!
//! Without `ca_file`, the broker is checked against the Mozilla roots, as fe2o3-amqp
//! would; brokers inside a company usually carry a certificate from their own CA.

use std::path::Path;
use std::sync::Arc;

use fe2o3_amqp::connection::OpenError;
use queue_core::{Error, Result};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::KIND;

/// Far past any bundle of CA certificates (Mozilla's whole store is about 250 KB).
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// A TLS connector that trusts exactly the certificates in the PEM file `ca_file`.
pub(crate) fn trusting(ca_file: &Path) -> Result<TlsConnector> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::invalid(format!(
            "{KIND}: tls.ca_file: cannot read certificates from {}: {e}",
            ca_file.display()
        ))
    };
    let pem = queue_core::config::read_regular_file(ca_file, MAX_CA_FILE_BYTES)
        .map_err(|e| unreadable(&e))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| unreadable(&e))?;
        roots.add(cert).map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"the file holds no PEM certificate"));
    }
    Ok(connector(roots))
}

/// A TLS connector that trusts the Mozilla roots.
pub(crate) fn trusting_mozilla_roots() -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    connector(roots)
}

fn connector(roots: RootCertStore) -> TlsConnector {
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// TLS from the first byte, as RabbitMQ's and Artemis' TLS listeners expect (not the
/// AMQP TLS protocol header of core spec 5.2.1, which they drop), checking the
/// certificate against `domain`.
pub(crate) async fn handshake(
    connector: &TlsConnector,
    domain: &str,
    stream: TcpStream,
) -> std::result::Result<TlsStream<TcpStream>, OpenError> {
    let name = ServerName::try_from(domain.to_string()).map_err(|_| OpenError::InvalidDomain)?;
    connector.connect(name, stream).await.map_err(OpenError::Io)
}
