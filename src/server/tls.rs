//! HTTPS served by edgegate itself, for hosts without a TLS-terminating proxy.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Builds the TLS acceptor from the PEM files (aws-lc-rs, the service's one crypto backend).
/// Their existence is checked here, not with the configuration: only `serve` and `check` read
/// them, and `migrate` runs where they are not mounted.
pub fn load_tls(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    // Read first, so that a file the service may not read says why (permission denied), rather
    // than that it holds no PEM; only the operating system's reason is shown, never the text.
    let read = |name: &str, path: &std::path::Path| {
        anyhow::ensure!(path.is_file(), "{name} must name a readable file");
        std::fs::read(path).map_err(|err| anyhow::anyhow!("{name} cannot be read: {err}"))
    };
    let (cert_pem, key_pem) = (
        read("TLS_CERT_FILE", &files.cert)?,
        read("TLS_KEY_FILE", &files.key)?,
    );
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("TLS_CERT_FILE holds no readable PEM certificate chain")?;
    if certs.is_empty() {
        anyhow::bail!("TLS_CERT_FILE holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .context("TLS_KEY_FILE holds no readable PEM private key")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS_CERT_FILE and TLS_KEY_FILE do not form a usable certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
