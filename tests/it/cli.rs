//! The `her2map` binary as an administrator runs it: configuration layering
//! and errors, `serve` on port 0, graceful SIGTERM, `send`, `echo`, `audit`.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    mr_variants, serve_binary, spawn_app_with, test_data, test_database_url, test_settings,
};

fn her2map() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_her2map"));
    // Keep the caller's environment from leaking settings into the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("HER2MAP__") {
            c.env_remove(k);
        }
    }
    // Tests run side by side: the console on a free port.
    c.env("HER2MAP__HTTP__PORT", "0");
    c
}

fn sigterm_and_wait(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_bad_configuration_names_the_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.toml");
    std::fs::write(&conf, "[dicom]\nport = \"eleven\"\n").unwrap();
    let out = her2map()
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dicom.port"), "{err}");

    std::fs::write(&conf, "[dicom]\nmax_associations = 0\n").unwrap();
    // --config accepted before the subcommand too.
    let out = her2map()
        .arg("--config")
        .arg(&conf)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dicom.max_associations"));

    let out = her2map()
        .arg("serve")
        .env("HER2MAP__DICOM__AE_TITLE", "WAY-TOO-LONG-AE-TITLE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dicom.ae_title"));

    let out = her2map()
        .args(["serve", "--config", "/nonexistent/her2map.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn serve_send_echo_audit_and_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("node.toml");
    std::fs::write(&conf, "[dicom]\nae_title = \"BREASTAI\"\n").unwrap();
    let data = dir.path().join("data");
    let (child, port) = serve_binary(&data, &[], &[]);
    let addr = format!("127.0.0.1:{port}");
    let out = her2map()
        .args(["echo", &addr, "--called-ae", "HER2MAP"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let files = [
        test_data("dicom/MR_small.dcm"),
        test_data("dicom/MR_small_RLE.dcm"),
    ];
    let out = her2map()
        .args(["send", &addr, "--called-ae", "HER2MAP"])
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("sent 2 of 2"), "{stdout}");

    // A wrong called AE: the summary shows the failure, exit non-zero.
    let out = her2map()
        .args(["send", &addr, "--called-ae", "NOPE"])
        .arg(&files[0])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let status = sigterm_and_wait(child);
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");

    let out = her2map()
        .args(["audit", "--json"])
        .env("HER2MAP__STORAGE__DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for expected in [
        "node_started",
        "association_opened",
        "instance_stored",
        "instance_duplicate",
        "association_closed",
        "association_rejected",
        "node_stopped",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(events.iter().all(|e| e["time"].is_string()));
    let stored: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "instance_stored")
        .collect();
    assert!(stored[0]["sop_instance_uid"].is_string());

    // The --config layer (after the subcommand): the node now answers to
    // BREASTAI only. Reuse the port the first node had.
    let mut cmd = her2map();
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(&conf)
        .env("HER2MAP__DICOM__PORT", port.to_string())
        .env("HER2MAP__DICOM__HOST", "127.0.0.1")
        .env("HER2MAP__STORAGE__DATA_DIR", &data)
        .env("HER2MAP__MODEL__DEMO", "true")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut ok = false;
    for _ in 0..100 {
        let out = her2map()
            .args(["echo", &addr, "--called-ae", "BREASTAI"])
            .output()
            .unwrap();
        if out.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "node with --config answers to its configured AE title");
    let out = her2map()
        .args(["echo", &addr, "--called-ae", "HER2MAP"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    child.kill().unwrap();
    let _ = child.wait();
}

/// No PHI and no token in logs: a patient with a distinctive name and ID
/// goes through the whole node (debug logging on) and a console user made
/// by `her2map token` reads the case, with its token and with a wrong one;
/// none of them appears in any log line.
#[test]
fn no_patient_name_or_id_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let patient = dir.path().join("patient");
    let out = her2map()
        .args(["synth"])
        .arg(&patient)
        .args([
            "--patient-name",
            "Zyxwvut^Quenelda",
            "--patient-id",
            "PID-8675309-XQ",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `her2map token`: the token once, and the table to paste.
    let out = her2map()
        .args(["token", "olga", "--role", "operator"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = text
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("# ")
        .to_string();
    assert!(token.len() >= 32, "{text}");
    assert!(!text.contains(&format!("token_sha256 = \"{token}\"")));
    let table: String = text
        .lines()
        .skip_while(|l| !l.starts_with("[[http.users]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(table.contains("role = \"operator\""), "{text}");
    let conf = dir.path().join("node.toml");
    std::fs::write(&conf, &table).unwrap();

    let data = dir.path().join("data");
    let mut child = her2map()
        .args(["serve", "--config"])
        .arg(&conf)
        .env("HER2MAP__DICOM__PORT", "0")
        .env("HER2MAP__DICOM__HOST", "127.0.0.1")
        .env("HER2MAP__STORAGE__DATA_DIR", &data)
        .env("HER2MAP__MODEL__DEMO", "true")
        .env("HER2MAP__CASES__STABLE_AGE_SECS", "1")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let after = |line: &str, marker: &str| -> Option<String> {
        let rest = line.split(marker).nth(1)?;
        let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
        Some(addr.rsplit(':').next().unwrap().to_string())
    };
    let (mut port, mut http) = (None, None);
    while port.is_none() || http.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("listening lines");
        port = port.or_else(|| after(&line, "SCP listening on "));
        http = http.or_else(|| after(&line, "HTTP listening on http://"));
        log.push(line);
    }
    let (port, http) = (port.unwrap(), http.unwrap());
    let out = her2map()
        .args([
            "send",
            &format!("127.0.0.1:{port}"),
            "--called-ae",
            "HER2MAP",
        ])
        .arg(&patient)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Wait for the case to be reported (the pipeline logs "case result").
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let done = line.contains("case result");
            log.push(line);
            if done {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no case result in the log");
    }
    // The console, with the token, a wrong token, and the case's page.
    let curl = |path: &str, token: &str| -> String {
        let out = Command::new("curl")
            .args(["-sS", "-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("http://127.0.0.1:{http}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cases: serde_json::Value = serde_json::from_str(&curl("/api/v1/cases", &token)).unwrap();
    let id = cases["items"][0]["id"]
        .as_str()
        .expect("a case")
        .to_string();
    let page = curl(&format!("/cases/{id}"), &token);
    assert!(
        page.contains("Zyxwvut"),
        "a signed-in user sees the patient (show_phi)"
    );
    let wrong = "wrong-token-5551212-abcdefghijklmnop";
    let refused = curl("/api/v1/status", wrong);
    assert!(
        refused.contains("unauthorized") || refused.contains("error"),
        "{refused}"
    );

    let status = sigterm_and_wait(child);
    assert!(status.success());
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        log.push(line);
    }
    let all = log.join("\n");
    for secret in [token.as_str(), wrong] {
        assert!(!all.contains(secret), "a bearer token is in the logs");
    }
    assert!(
        all.lines().count() > 20,
        "debug logging produced too little to mean anything"
    );
    for phi in ["Zyxwvut", "Quenelda", "8675309"] {
        assert!(!all.contains(phi), "PHI {phi:?} found in the logs");
    }
}

#[test]
fn infer_on_tensors_on_a_dicom_folder_and_the_replay_agree() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> serde_json::Value {
        let out = her2map()
            .arg("infer")
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let pth = test_data("parity/map_small_weights.pth");
    let weights = test_data("parity/map_small_weights.safetensors");
    // The fixtures' `all` case, from the .pth: the reference probabilities.
    let v = run(&[
        "--model",
        pth.to_str().unwrap(),
        "--inputs",
        test_data("parity/map_small_io.safetensors")
            .to_str()
            .unwrap(),
        "--flags",
        "1,1,1",
    ]);
    let probs: Vec<f64> = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["prob"].as_f64().unwrap())
        .collect();
    assert!(
        (probs[0] - 0.576224).abs() < 1e-4 && (probs[1] - 0.569879).abs() < 1e-4,
        "{probs:?}"
    );
    assert_eq!(v["weights_sha256"].as_str().unwrap().len(), 64);
    // Per-sample flags: an absent branch is null.
    let v = run(&[
        "--model",
        pth.to_str().unwrap(),
        "--inputs",
        test_data("parity/map_small_io.safetensors")
            .to_str()
            .unwrap(),
        "--flags",
        "1,1,1;0,1,0",
    ]);
    assert!(v["samples"][1]["branch_probs"]["us"].is_null());
    assert!(v["samples"][1]["branch_probs"]["mri"].is_number());

    // The synthetic patient as DICOM, with its inputs dumped and replayed.
    let dump = dir.path().join("inputs.safetensors");
    let v = run(&[
        "--model",
        weights.to_str().unwrap(),
        test_data("synth-patient").to_str().unwrap(),
        "--dump-inputs",
        dump.to_str().unwrap(),
    ]);
    let side = &v["sides"][0];
    assert_eq!(side["lesion_side"], "Right", "{side}");
    let roles: Vec<&str> = side["selections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["role"].as_str().unwrap())
        .collect();
    for role in ["CC", "MLO", "US"] {
        assert!(roles.contains(&role), "{role} not chosen: {roles:?}");
    }
    let flags = &side["flags"];
    let f = |k: &str| {
        if flags[k].as_bool().unwrap() {
            "1"
        } else {
            "0"
        }
    };
    let replay = run(&[
        "--model",
        weights.to_str().unwrap(),
        "--inputs",
        dump.to_str().unwrap(),
        "--flags",
        &format!("{},{},{}", f("us"), f("mri"), f("mg")),
    ]);
    let (a, b) = (
        side["prob"].as_f64().unwrap(),
        replay["samples"][0]["prob"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-6, "DICOM run {a} vs replay {b}");
}

/// The CLI's case and outbox actions are audited like the console's: an
/// `operator_action` event naming `cli:LOGIN`.
#[tokio::test(flavor = "multi_thread")]
async fn cli_actions_are_audited_with_the_login_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = test_settings(&data);
    s.cases.stable_age_secs = 3600;
    let app = spawn_app_with(s).await;
    let files = mr_variants(dir.path(), 1, "cli-act");
    let scu = her2map::dimse::client::ClientOptions {
        calling_ae: "PACS".into(),
        called_ae: "HER2MAP".into(),
        ..Default::default()
    };
    let sent = her2map::send::send_files(&app.address(), &scu, &files, |_| {})
        .await
        .unwrap();
    assert!(sent.iter().all(|r| r.ok()), "{sent:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let case = loop {
        if let Some(c) = app.db.all_cases().await.unwrap().first() {
            break c.id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no case opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.stop().await;

    let out = tokio::task::block_in_place(|| {
        her2map()
            .args(["cases", "hold", &case])
            .env("HER2MAP__STORAGE__DATA_DIR", &data)
            .env("USER", "radadmin")
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::block_in_place(|| {
        her2map()
            .args(["outbox", "retry", "999"])
            .env("HER2MAP__STORAGE__DATA_DIR", &data)
            .env("USER", "radadmin")
            .output()
            .unwrap()
    });
    assert!(!out.status.success(), "no delivery 999");

    let db = her2map::db::Db::connect(&test_database_url(&data, "her2map.db"))
        .await
        .unwrap();
    let actions = db.events(0, Some("operator_action"), 10).await.unwrap();
    assert_eq!(actions.len(), 2, "{actions:?}");
    let d = actions[0].detail.as_ref().unwrap();
    assert_eq!(d["user"], "cli:radadmin", "{d}");
    assert_eq!(d["action"], "hold");
    assert_eq!(d["to"], "held", "{d}");
    assert_eq!(actions[0].case_id.as_deref(), Some(case.as_str()));
    let d = actions[1].detail.as_ref().unwrap();
    assert_eq!(
        (d["action"].as_str(), d["outbox_id"].as_i64()),
        (Some("retry"), Some(999))
    );
    assert!(d["refused"].is_string(), "{d}");
}
