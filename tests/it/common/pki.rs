//! A test PKI made with rcgen: DICOM TLS tests of the node's listener and
//! of its SCU.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM files of a test PKI: one CA, a server certificate for
/// 127.0.0.1/localhost, a client certificate, a PACS certificate for both
/// directions (a PACS that is TLS server to the node's queries and TLS
/// client of its C-MOVE's C-STOREs uses one), and a client certificate
/// from another CA that the node does not trust.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub pacs_cert: PathBuf,
    pub pacs_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

/// A leaf certificate signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: &[ExtendedKeyUsagePurpose],
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = usage.to_vec();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (ca_params, ca_key, ca_pem) = ca("her2map test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let (server_cert, server_key) = leaf(
        &issuer,
        "HER2MAP",
        &["127.0.0.1", "localhost"],
        &[ExtendedKeyUsagePurpose::ServerAuth],
    );
    let (client_cert, client_key) =
        leaf(&issuer, "PACS", &[], &[ExtendedKeyUsagePurpose::ClientAuth]);
    let (pacs_cert, pacs_key) = leaf(
        &issuer,
        "ORTHANC",
        &["127.0.0.1", "localhost"],
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (rogue_params, rogue_key, _) = ca("someone else's CA");
    let rogue_issuer = Issuer::new(rogue_params, rogue_key);
    let (rogue_cert, rogue_key) = leaf(
        &rogue_issuer,
        "ROGUE",
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    );
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        pacs_cert: write("pacs.pem", &pacs_cert),
        pacs_key: write("pacs.key", &pacs_key),
        rogue_cert: write("rogue.pem", &rogue_cert),
        rogue_key: write("rogue.key", &rogue_key),
        _dir: dir,
    }
}
