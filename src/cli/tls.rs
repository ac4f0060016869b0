//! The `--tls-*` options of `send` and `echo`: DICOM TLS (PS3.15 B.9) for
//! the node's SCU. Turns them into the client's TLS configuration through
//! the library's loader; owns no TLS logic itself.

use std::path::PathBuf;

use her2map::dimse::client::ClientTls;

/// DICOM TLS (PS3.15 B.9) for `send` and `echo`: given `--tls-ca`, the
/// association runs over TLS.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Use DICOM TLS, trusting the CA certificates in this PEM file.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The node's own certificate (PEM), for peers that require one.
    #[arg(long, value_name = "PEM", requires_all = ["tls_ca", "tls_private_key"])]
    tls_certificate: Option<PathBuf>,
    /// The private key (PEM) of --tls-certificate.
    #[arg(long, value_name = "PEM", requires = "tls_certificate")]
    tls_private_key: Option<PathBuf>,
    /// The name the peer's certificate must carry; default: HOST.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The client TLS configuration for a peer at `address` (HOST:PORT);
    /// `None` without `--tls-ca`.
    pub fn client_tls(self, address: &str) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = self.tls_ca else {
            return Ok(None);
        };
        let settings = her2map::config::ClientTlsSettings {
            ca,
            certificate: self.tls_certificate.unwrap_or_default(),
            private_key: self.tls_private_key.unwrap_or_default(),
            server_name: self.tls_server_name.unwrap_or_default(),
        };
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        her2map::dimse::tls::client_tls(&settings, host, &her2map::dimse::tls::COMMAND_LINE_KEYS)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))
    }
}

/// How the node's SCU calls a peer from the command line (`send`, `echo`):
/// its AE titles and, optionally, DICOM TLS.
#[derive(clap::Args)]
pub struct ScuArgs {
    #[arg(long, default_value = "HER2MAP-SCU")]
    calling_ae: String,
    #[arg(long, default_value = "ANY-SCP")]
    called_ae: String,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ScuArgs {
    /// The client options for calling `address` (HOST:PORT).
    pub fn options(self, address: &str) -> anyhow::Result<her2map::dimse::client::ClientOptions> {
        Ok(her2map::dimse::client::ClientOptions {
            calling_ae: self.calling_ae,
            called_ae: self.called_ae,
            tls: self.tls.client_tls(address)?,
            ..Default::default()
        })
    }
}
