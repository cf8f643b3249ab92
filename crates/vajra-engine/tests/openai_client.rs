//! The official `openai` Python client against `vajra-engine serve` (tests/openai_client.py).
//! Needs a Python with `openai` installed, named by `$VAJRA_PYTHON` (`scripts/test.sh` sets
//! it); skips with a printed reason otherwise, and fails under `VAJRA_REQUIRE_ALL`.

mod common;

use std::process::Command;

#[test]
fn official_openai_client_completes_chats_streams_and_sees_bad_requests() {
    let Some(python) = std::env::var_os("VAJRA_PYTHON") else {
        assert!(
            std::env::var_os("VAJRA_REQUIRE_ALL").is_none(),
            "VAJRA_REQUIRE_ALL is set but VAJRA_PYTHON is not: the official-client test cannot run (scripts/test.sh sets both)"
        );
        eprintln!(
            "SKIPPED official_openai_client_completes_chats_streams_and_sees_bad_requests: set \
             VAJRA_PYTHON to a Python with the `openai` package (.ci/run does)"
        );
        return;
    };
    let server = common::start(&[]);
    let url = format!("http://{}", server.addr);
    let out = Command::new(python)
        .arg(common::root().join("tests/openai_client.py"))
        .args([&url, "tiny"])
        .output()
        .unwrap();
    drop(server);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openai client failed:\n{text}");
    assert!(text.contains("bad requests OK"), "{text}");
}
