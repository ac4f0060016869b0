//! DICOM TLS (PS3.15 B.9): the rustls configurations from PEM files, for the
//! node's TLS port (`[dicom.tls]`; client certificates required and verified
//! against `client_ca` when it is set) and for its SCU (`[destinations.tls]`,
//! `send`/`echo --tls-*`; the peer verified against a configured CA, the
//! node's own certificate offered when configured). TLS 1.2 and 1.3 only
//! (rustls' safe defaults, ring provider). Every error names its key.
//!
//! It reads the `[dicom.tls]` and `[destinations.tls]` sections of
//! [`crate::config`] and owns nothing else of the configuration; its errors
//! are its own ([`TlsError`]), so config never depends on this module.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::{ClientTlsSettings, TlsSettings};
use crate::dimse::client::ClientTls;

/// TLS files that could not be turned into a rustls configuration; the
/// message names the configuration key (or command-line option) that gave
/// them, worded as a configuration error since that is what the operator
/// has to fix.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        message: format!("{}: {message}", path.display()),
    }
}

/// The certificates of a PEM file: at least one, all readable.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
pub fn server_config(settings: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
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
        .map_err(|e| TlsError {
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

/// What the settings of a client TLS are called where they were given: the
/// keys of a destination, or the options of the command line.
pub struct ClientTlsKeys {
    pub ca: &'static str,
    pub certificate: &'static str,
    pub private_key: &'static str,
}

pub const DESTINATION_KEYS: ClientTlsKeys = ClientTlsKeys {
    ca: "destinations.tls.ca",
    certificate: "destinations.tls.certificate",
    private_key: "destinations.tls.private_key",
};

pub const COMMAND_LINE_KEYS: ClientTlsKeys = ClientTlsKeys {
    ca: "--tls-ca",
    certificate: "--tls-certificate",
    private_key: "--tls-private-key",
};

/// Build the TLS of an association the node requests to `host`.
pub fn client_tls(
    settings: &ClientTlsSettings,
    host: &str,
    keys: &ClientTlsKeys,
) -> Result<ClientTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if settings.ca.as_os_str().is_empty() {
        return Err(TlsError {
            key: keys.ca,
            message: "required: the CA certificates that sign the peer's certificate".into(),
        });
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(keys.ca, &settings.ca)? {
        roots
            .add(cert)
            .map_err(|e| invalid(keys.ca, &settings.ca, e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            key: keys.ca,
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    let (cert, key) = (&settings.certificate, &settings.private_key);
    let config = match (cert.as_os_str().is_empty(), key.as_os_str().is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let chain = certificates(keys.certificate, cert)?;
            let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                invalid(
                    keys.private_key,
                    key,
                    format!("no usable PEM private key ({e})"),
                )
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                invalid(
                    keys.private_key,
                    key,
                    format!("does not fit the certificate ({e})"),
                )
            })?
        }
        (false, true) => {
            return Err(TlsError {
                key: keys.private_key,
                message: "required with a certificate".into(),
            });
        }
        (true, false) => {
            return Err(TlsError {
                key: keys.certificate,
                message: "required with a private key".into(),
            });
        }
    };
    let server_name = match settings.server_name.trim() {
        "" => host.trim().to_string(),
        name => name.to_string(),
    };
    Ok(ClientTls {
        config: Arc::new(config),
        server_name,
    })
}

pub const SOURCE_KEYS: ClientTlsKeys = ClientTlsKeys {
    ca: "sources.tls.ca",
    certificate: "sources.tls.certificate",
    private_key: "sources.tls.private_key",
};
