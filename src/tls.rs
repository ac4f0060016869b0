//! DICOM TLS (PS3.15 B.9): the rustls server configuration from the PEM
//! files named in `[dicom.tls]`. TLS 1.2 and 1.3 only (rustls' safe
//! defaults, ring provider); client certificates are required and verified
//! against `client_ca` when it is set. Every error names its key.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::{ConfigError, TlsSettings};

fn invalid(key: &'static str, path: &Path, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: format!("{}: {message}", path.display()),
    }
}

/// The certificates of a PEM file: at least one, all readable.
fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, e))?;
    if certs.is_empty() {
        return Err(invalid(key, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// Build the TLS configuration of the DICOM TLS listener.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("dicom.tls.certificate", &settings.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&settings.private_key).map_err(|e| {
        invalid(
            "dicom.tls.private_key",
            &settings.private_key,
            format!("no usable PEM private key ({e})"),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid {
            key: "dicom.tls",
            message: e.to_string(),
        })?;
    let builder = if settings.client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let path = &settings.client_ca;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates("dicom.tls.client_ca", path)? {
            roots
                .add(cert)
                .map_err(|e| invalid("dicom.tls.client_ca", path, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid("dicom.tls.client_ca", path, e))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "dicom.tls.private_key",
            &settings.private_key,
            format!("does not fit dicom.tls.certificate ({e})"),
        )
    })?;
    Ok(Arc::new(config))
}
