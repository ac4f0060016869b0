//! The browser tests' bridge to Node.js: runs a script of tests/browser/
//! (playwright-core driving Debian's headless Chromium) with one JSON
//! argument and returns the JSON it prints last. Needs `node` (Node.js
//! 18+), Chromium (`/usr/bin/chromium` or `HER2MAP_CHROMIUM`) and
//! `HER2MAP_WEB_DEPS` from `eval "$(scripts/web-deps.sh)"`; without them the
//! test fails with that message: it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `HER2MAP_WEB_DEPS`, checked.
pub fn web_deps() -> PathBuf {
    let dir = std::env::var_os("HER2MAP_WEB_DEPS")
        .map(PathBuf::from)
        .expect(
            "HER2MAP_WEB_DEPS is not set: run eval \"$(scripts/web-deps.sh)\" \
         (playwright-core and the OHIF dist from npm)",
        );
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "{}: no playwright-core; run scripts/web-deps.sh",
        dir.display()
    );
    dir
}

fn node_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into()])
        .map(|d| d.join("node"))
        .find(|p| p.is_file())
        .expect("node (Node.js) is not installed: apt-get install nodejs")
}

fn chromium() {
    let exe = std::env::var_os("HER2MAP_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        exe.is_file(),
        "{} missing: apt-get install chromium (or set HER2MAP_CHROMIUM)",
        exe.display()
    );
}

/// Run `tests/browser/SCRIPT` with `arg`; its last stdout line as JSON.
/// Blocking: call it from `block_in_place` or `spawn_blocking`.
pub fn run_script(script: &str, arg: &Value) -> Value {
    web_deps();
    chromium();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    let out = Command::new(node_binary())
        .arg(&path)
        .arg(arg.to_string())
        .output()
        .unwrap_or_else(|e| panic!("running node {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    serde_json::from_str(last.unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script}: no JSON result ({e}):\n{stdout}\n{stderr}"))
}
