//! Shared by the server tests: start `vajra-engine serve` on the tiny Llama fixture on a free
//! port and wait for the address it prints. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    start_noting(extra, None).0
}

/// [`start`], also returning what follows `note` on the first stderr line that has it (a
/// decode server's `taking hand-offs on ADDR`), read before the HTTP address.
pub fn start_noting(extra: &[&str], note: Option<&str>) -> (Server, Option<String>) {
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
    let mut noted = None;
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(n) = note
            && noted.is_none()
            && let Some(v) = line.split(n).nth(1)
        {
            noted = Some(v.trim().to_owned());
        }
        if let Some(at) = line.split("http://").nth(1) {
            break at.trim().to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server { child, addr }, noted)
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

// ---- HTTP helpers (plain std TCP, HTTP/1.1, `Connection: close`)

/// Sends a request and returns the open connection.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Status and de-chunked body.
pub fn call(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = request(addr, method, path, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `data:` payloads of a server-sent event body.
pub fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_owned)
        .collect()
}

/// A metric's value; a labelled series never observed yet counts as 0.
pub fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = call(addr, "GET", "/metrics", None);
    match text
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
    {
        Some(l) => l.rsplit(' ').next().unwrap().parse().unwrap(),
        None if name.contains('{') => 0.0,
        None => panic!("metric {name} missing:\n{text}"),
    }
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
