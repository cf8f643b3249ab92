//! Shared by the server tests: start `vajra-engine serve` on the tiny Llama fixture on a free
//! port and wait for the address it prints. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vajra-engine serve` (model name `tiny`, 8 MiB of KV cache) with `extra` arguments.
pub fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
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
        .arg(root().join("tests/fixtures/tiny-llama"))
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vajra-engine serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(at) = line.split("http://").nth(1) {
            break at.trim().to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

impl Server {
    /// Stops the server as Ctrl-C would (SIGINT) and waits for it to exit; returns whether it
    /// exited successfully.
    pub fn interrupt(self) -> bool {
        self.signal("INT")
    }

    /// Stops the server as a container runtime would (SIGTERM); as [`Server::interrupt`].
    pub fn terminate(self) -> bool {
        self.signal("TERM")
    }

    fn signal(mut self, sig: &str) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{sig} {pid}");
        let status = self.child.wait().expect("the server exits");
        status.success()
    }
}
