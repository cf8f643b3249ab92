//! The official `openai` Python client against `vajra-engine serve` (tests/openai_client.py).
//! Needs a Python with `openai` installed, named by `$VAJRA_PYTHON` (`.ci/run` sets it); skips
//! with a printed reason otherwise.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn official_openai_client_completes_chats_streams_and_sees_bad_requests() {
    let Some(python) = std::env::var_os("VAJRA_PYTHON") else {
        eprintln!(
            "SKIPPED official_openai_client_completes_chats_streams_and_sees_bad_requests: set \
             VAJRA_PYTHON to a Python with the `openai` package (.ci/run does)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut server = Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args([
            "serve",
            "--port",
            "0",
            "--kv-cache-mib",
            "8",
            "--served-model-name",
            "tiny",
        ])
        .arg("--model")
        .arg(root.join("tests/fixtures/tiny-llama"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(at) = line.split("http://").nth(1) {
            break format!("http://{}", at.trim());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let out = Command::new(python)
        .arg(root.join("tests/openai_client.py"))
        .args([&url, "tiny"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openai client failed:\n{text}");
    assert!(text.contains("bad requests OK"), "{text}");
}
