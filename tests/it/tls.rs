//! DICOM TLS on its own port against DCMTK's echoscu/storescu `+tls` / `+tla`,
//! with a CA, server and client certificates made by the test (rcgen).

use crate::common;

use std::path::Path;

use common::pki::{Pki, make_pki};
use common::*;
use her2map::config::{PeerSettings, Settings};
use her2map::dimse::client::{ClientOptions, ScuAssociation};

/// Test settings with TLS on port 0; `client_ca` makes client certificates
/// mandatory.
fn tls_settings(data_dir: &Path, pki: &Pki, client_ca: bool) -> Settings {
    let mut s = test_settings(data_dir);
    s.dicom.tls.enabled = true;
    s.dicom.tls.port = 0;
    s.dicom.tls.certificate = pki.server_cert.clone();
    s.dicom.tls.private_key = pki.server_key.clone();
    if client_ca {
        s.dicom.tls.client_ca = pki.ca.clone();
    }
    s
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// DCMTK TLS options: a client certificate (key, certificate) or anonymous,
/// trusting the test CA.
fn tls_args(client: Option<(&Path, &Path)>, pki: &Pki) -> Vec<String> {
    let mut args = match client {
        Some((key, cert)) => vec!["+tls".into(), path(key), path(cert)],
        None => vec!["+tla".into()],
    };
    args.extend(["+cf".into(), path(&pki.ca)]);
    args
}

fn target(calling: &str, port: u16) -> Vec<String> {
    vec![
        "-aet".into(),
        calling.into(),
        "-aec".into(),
        "HER2MAP".into(),
        "127.0.0.1".into(),
        port.to_string(),
    ]
}

fn reasons(events: &[her2map::db::AuditEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.detail.as_ref().unwrap()["reason"].to_string())
        .collect()
}

/// (1) Client certificate required and presented: C-ECHO and C-STORE over
/// TLS, the instance stored and indexed like on the plain port.
#[tokio::test(flavor = "multi_thread")]
async fn echo_and_store_with_a_client_certificate() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_with(tls_settings(dir.path(), &pki, true)).await;
    let tls_port = app.tls_addr.expect("TLS listener").port();
    assert_ne!(tls_port, app.port());
    let client = Some((pki.client_key.as_path(), pki.client_cert.as_path()));

    let mut args = tls_args(client, &pki);
    args.extend(target("PACS", tls_port));
    let (ok, out) = dcmtk("echoscu", args).await;
    assert!(ok, "echoscu +tls: {out}");

    let mut args = tls_args(client, &pki);
    args.extend(target("PACS", tls_port));
    args.push(path(&test_data("dicom/MR_small.dcm")));
    let (ok, out) = dcmtk("storescu", args).await;
    assert!(ok, "storescu +tls: {out}");

    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    let stored = wait_events(&app.db, "instance_stored", 1).await;
    assert_eq!(stored.len(), 1);
    let closed = wait_events(&app.db, "association_closed", 2).await;
    assert_eq!(closed.len(), 2, "{closed:?}");
    for e in &closed {
        assert_eq!(e.detail.as_ref().unwrap()["outcome"], "released", "{e:?}");
    }
    let opened = wait_events(&app.db, "association_opened", 2).await;
    assert_eq!(opened[0].detail.as_ref().unwrap()["calling_ae"], "PACS");
    let started = wait_events(&app.db, "node_started", 1).await;
    assert_eq!(
        started[0].detail.as_ref().unwrap()["tls_address"],
        app.tls_addr.unwrap().to_string()
    );
    assert!(
        wait_events(&app.db, "association_rejected", 0)
            .await
            .is_empty()
    );
    app.stop().await;
}

/// (2) Client certificate required: a client without one, or with one from
/// an untrusted CA, fails the handshake; each is an `association_rejected`
/// and the node keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn missing_or_untrusted_client_certificate_fails_the_handshake() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_with(tls_settings(dir.path(), &pki, true)).await;
    let tls_port = app.tls_addr.unwrap().port();

    let mut args = tls_args(None, &pki);
    args.extend(target("PACS", tls_port));
    let (ok, out) = dcmtk("echoscu", args).await;
    assert!(!ok, "anonymous client must be refused: {out}");

    let mut args = tls_args(
        Some((pki.rogue_key.as_path(), pki.rogue_cert.as_path())),
        &pki,
    );
    args.extend(target("PACS", tls_port));
    let (ok, out) = dcmtk("echoscu", args).await;
    assert!(!ok, "untrusted client certificate must be refused: {out}");

    let rejected = wait_events(&app.db, "association_rejected", 2).await;
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    for reason in reasons(&rejected) {
        assert!(reason.contains("TLS handshake failed"), "{reason}");
    }
    assert!(
        wait_events(&app.db, "association_opened", 0)
            .await
            .is_empty()
    );

    // Still serving, on both ports.
    let mut args = tls_args(
        Some((pki.client_key.as_path(), pki.client_cert.as_path())),
        &pki,
    );
    args.extend(target("PACS", tls_port));
    let (ok, out) = dcmtk("echoscu", args).await;
    assert!(ok, "{out}");
    let (ok, out) = dcmtk("echoscu", target("PACS", app.port())).await;
    assert!(ok, "{out}");
    app.stop().await;
}

/// (3) No `client_ca`: anonymous clients get TLS (server authenticated,
/// link encrypted) and can store.
#[tokio::test(flavor = "multi_thread")]
async fn without_client_ca_anonymous_clients_store() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_with(tls_settings(dir.path(), &pki, false)).await;
    let tls_port = app.tls_addr.unwrap().port();
    let mut args = tls_args(None, &pki);
    args.extend(target("MODALITY", tls_port));
    args.push(path(&test_data("dicom/MR_small.dcm")));
    let (ok, out) = dcmtk("storescu", args).await;
    assert!(ok, "storescu +tla: {out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    app.stop().await;
}

/// (4) A plain DICOM client on the TLS port fails cleanly (recorded), and
/// the plain port keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn plain_client_on_the_tls_port_fails_cleanly() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_with(tls_settings(dir.path(), &pki, true)).await;
    let tls_port = app.tls_addr.unwrap().port();
    let (ok, out) = dcmtk("echoscu", target("PACS", tls_port)).await;
    assert!(!ok, "plain TCP on the TLS port must fail: {out}");
    let rejected = wait_events(&app.db, "association_rejected", 1).await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(reasons(&rejected)[0].contains("TLS handshake failed"));

    let mut args = target("PACS", app.port());
    args.push(path(&test_data("dicom/MR_small.dcm")));
    let (ok, out) = dcmtk("storescu", args).await;
    assert!(ok, "plain port: {out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    app.stop().await;
}

/// (5) The calling-AE allow list with its host check, and the association
/// limit shared with the plain port, apply on the TLS port.
#[tokio::test(flavor = "multi_thread")]
async fn allow_list_and_association_limit_apply_on_the_tls_port() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = tls_settings(dir.path(), &pki, true);
    settings.dicom.peers = vec![
        PeerSettings {
            ae_title: "PACS".into(),
            host: Some("127.0.0.1".into()),
        },
        PeerSettings {
            ae_title: "ELSEWHERE".into(),
            host: Some("10.255.255.1".into()),
        },
    ];
    settings.dicom.max_associations = 1;
    let app = spawn_app_with(settings).await;
    let tls_port = app.tls_addr.unwrap().port();
    let client = Some((pki.client_key.as_path(), pki.client_cert.as_path()));
    let echo = |calling: &str| {
        let mut args = tls_args(client, &pki);
        args.extend(target(calling, tls_port));
        args
    };
    let (ok, out) = dcmtk("echoscu", echo("PACS")).await;
    assert!(ok, "known peer: {out}");
    let (ok, out) = dcmtk("echoscu", echo("STRANGER")).await;
    assert!(!ok, "{out}");
    assert!(out.contains("Calling AE Title Not Recognized"), "{out}");
    let (ok, out) = dcmtk("echoscu", echo("ELSEWHERE")).await;
    assert!(!ok, "known AE from the wrong host: {out}");

    // One association held on the plain port uses the only slot.
    let held = ScuAssociation::connect(
        &app.address(),
        &ClientOptions {
            calling_ae: "PACS".into(),
            called_ae: "HER2MAP".into(),
            ..Default::default()
        },
        &[(
            "1.2.840.10008.1.1".to_string(),
            "1.2.840.10008.1.2".to_string(),
        )],
    )
    .await
    .expect("plain association");
    let (ok, out) = dcmtk("echoscu", echo("PACS")).await;
    assert!(!ok, "over the limit: {out}");
    held.release().await;

    let rejected = wait_events(&app.db, "association_rejected", 3).await;
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    let r = reasons(&rejected);
    assert!(r[0].contains("calling AE title not recognized"), "{r:?}");
    assert!(r[1].contains("calling AE title not recognized"), "{r:?}");
    assert!(r[2].contains("local limit exceeded"), "{r:?}");
    assert_eq!(
        rejected[0].detail.as_ref().unwrap()["calling_ae"],
        "STRANGER"
    );
    assert_eq!(
        rejected[1].detail.as_ref().unwrap()["calling_ae"],
        "ELSEWHERE"
    );
    app.stop().await;
}

/// A missing or unusable file stops the node at start-up, naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_are_startup_errors_naming_the_key() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let build = |s: Settings| async move {
        match her2map::app::App::build(s).await {
            Ok(_) => panic!("must not start"),
            Err(e) => format!("{e:#}"),
        }
    };
    let mut s = tls_settings(dir.path(), &pki, true);
    s.dicom.tls.certificate = dir.path().join("missing.pem");
    let err = build(s).await;
    assert!(err.contains("dicom.tls.certificate"), "{err}");

    let mut s = tls_settings(dir.path(), &pki, true);
    s.dicom.tls.private_key = pki.ca.clone();
    let err = build(s).await;
    assert!(err.contains("dicom.tls.private_key"), "{err}");

    let mut s = tls_settings(dir.path(), &pki, true);
    s.dicom.tls.private_key = pki.client_key.clone();
    let err = build(s).await;
    assert!(err.contains("dicom.tls.private_key"), "{err}");

    let mut s = tls_settings(dir.path(), &pki, true);
    s.dicom.tls.client_ca = pki.server_key.clone();
    let err = build(s).await;
    assert!(err.contains("dicom.tls.client_ca"), "{err}");
}

/// `her2map send` / `echo` with `--tls-*`, as an administrator runs them.
fn her2map_scu(args: &[String]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_her2map"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn scu_args(command: &str, port: u16, tls: &[(&str, &Path)]) -> Vec<String> {
    let mut args = vec![
        command.to_string(),
        format!("127.0.0.1:{port}"),
        "--calling-ae".into(),
        "PACS".into(),
        "--called-ae".into(),
        "HER2MAP".into(),
    ];
    for (flag, file) in tls {
        args.push(flag.to_string());
        args.push(path(file));
    }
    args
}

/// (6) The node's own SCU over DICOM TLS: it verifies the peer's
/// certificate against the given CA and name, presents its certificate when
/// the peer requires one, and each failure is a clear error.
#[tokio::test(flavor = "multi_thread")]
async fn the_node_scu_speaks_tls_and_verifies_its_peer() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_with(tls_settings(dir.path(), &pki, true)).await;
    let port = app.tls_addr.unwrap().port();
    let with_cert = [
        ("--tls-ca", pki.ca.as_path()),
        ("--tls-certificate", pki.client_cert.as_path()),
        ("--tls-private-key", pki.client_key.as_path()),
    ];

    let mut args = scu_args("send", port, &with_cert);
    args.push(path(&test_data("dicom/MR_small.dcm")));
    let (ok, out) = her2map_scu(&args);
    assert!(ok, "send over TLS: {out}");
    assert_eq!(app.db.instance_count().await.unwrap(), 1);
    let (ok, out) = her2map_scu(&scu_args("echo", port, &with_cert));
    assert!(ok && out.contains("0x0000"), "echo over TLS: {out}");

    // The node requires a client certificate: without one, no association.
    let (ok, out) = her2map_scu(&scu_args("echo", port, &[("--tls-ca", &pki.ca)]));
    assert!(!ok, "no client certificate: {out}");
    // A peer whose certificate the given CA did not sign.
    let mut untrusted = with_cert;
    untrusted[0].1 = pki.rogue_cert.as_path();
    let (ok, out) = her2map_scu(&scu_args("echo", port, &untrusted));
    assert!(!ok, "untrusted server: {out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    // A certificate for 127.0.0.1/localhost is not one for another name.
    let mut args = scu_args("echo", port, &with_cert);
    args.extend(["--tls-server-name".into(), "pacs.example.org".into()]);
    let (ok, out) = her2map_scu(&args);
    assert!(!ok, "wrong server name: {out}");
    // Unusable files are named by their option, before any connection.
    let (ok, out) = her2map_scu(&scu_args("echo", port, &[("--tls-ca", &pki.client_key)]));
    assert!(!ok && out.contains("--tls-ca"), "{out}");
    let mut mismatched = with_cert;
    mismatched[2].1 = pki.server_key.as_path();
    let (ok, out) = her2map_scu(&scu_args("echo", port, &mismatched));
    assert!(!ok && out.contains("--tls-private-key"), "{out}");

    // A plain SCU on the TLS port, or a TLS one on the plain port, fails.
    let (ok, out) = her2map_scu(&scu_args("echo", app.port(), &with_cert));
    assert!(!ok, "TLS to the plain port: {out}");

    // Only the two good associations were opened.
    let opened = wait_events(&app.db, "association_opened", 2).await;
    assert_eq!(opened.len(), 2, "{opened:?}");
    app.stop().await;
}

/// A destination's unusable TLS files stop the node at start-up, naming
/// the key.
#[tokio::test(flavor = "multi_thread")]
async fn bad_destination_tls_files_are_startup_errors_naming_the_key() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.destinations = vec![her2map::outbox::DestinationSettings {
        ae_title: "PACS".into(),
        host: "127.0.0.1".into(),
        port: 104,
        dicomweb: None,
        outputs: None,
        tls: Some(her2map::config::ClientTlsSettings {
            ca: dir.path().join("missing.pem"),
            ..Default::default()
        }),
    }];
    let err = match her2map::app::App::build(s.clone()).await {
        Ok(_) => panic!("must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("destinations.tls.ca"), "{err}");
    let tls = s.destinations[0].tls.as_mut().unwrap();
    tls.ca = pki.ca.clone();
    tls.certificate = pki.client_cert.clone();
    let err = match her2map::app::App::build(s).await {
        Ok(_) => panic!("must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("destinations.tls.private_key"), "{err}");
}
