//! Trusting a private certificate authority (`tls.ca_file`, feature `tls`).
//!
//! Without `ca_file`, fe2o3-amqp checks the broker against the Mozilla roots; brokers
//! inside a company usually carry a certificate from their own CA instead.

use std::path::Path;
use std::sync::Arc;

use queue_core::{Error, Result};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::KIND;

/// A TLS connector that trusts exactly the certificates in the PEM file `ca_file`.
pub(crate) fn trusting(ca_file: &Path) -> Result<TlsConnector> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::invalid(format!(
            "{KIND}: tls.ca_file: cannot read certificates from {}: {e}",
            ca_file.display()
        ))
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| unreadable(&e))? {
        let cert = cert.map_err(|e| unreadable(&e))?;
        roots.add(cert).map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"the file holds no PEM certificate"));
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
