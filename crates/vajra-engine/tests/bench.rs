//! `vajra-engine bench` end to end: against our own server on the tiny fixture (a complete run
//! folder whose request count, token counts and timestamp order are right), and against a
//! server whose completions all fail (errors counted, results still written).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

fn experiment(dir: &Path, n: u32) -> std::path::PathBuf {
    experiment_with(dir, n, r#"{ type = "poisson", qps = 200.0 }"#)
}

fn experiment_with(dir: &Path, n: u32, arrival: &str) -> std::path::PathBuf {
    let p = dir.join("bench.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "tiny-bench"
seed = 7
[scheduler]
policy = {{ type = "sarathi", chunk_size = 64 }}
[workload]
num_requests = {n}
arrival = {arrival}
lengths = {{ type = "independent", prompt = {{ type = "uniform", min = 8, max = 60 }}, output = {{ type = "uniform", min = 2, max = 25 }} }}
[slo]
ttft_s = 1.0
"#
        ),
    )
    .unwrap();
    p
}

fn bench(url: &str, exp: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["bench", "--quiet", "--timeout-s", "30", "--url", url])
        .arg("--experiment")
        .arg(exp)
        .arg("--model-dir")
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vajra-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bench_against_our_server_writes_a_complete_run_folder() {
    let srv = common::start(&[]);
    let dir = tmp("ok");
    let exp = experiment(&dir, 40);
    let out = dir.join("run");
    let o = bench(&format!("http://{}", srv.addr), &exp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["bench"]["sent"], 40);
    assert_eq!(summary["bench"]["completed"], 40);
    assert_eq!(summary["bench"]["length_mismatches"], 0);
    // Our server exposes its step counters: the bench reads the batches it ran.
    let steps = summary["bench"]["server_steps"].as_u64().unwrap();
    assert!(steps > 0, "{summary}");
    assert!(summary["bench"]["server_mean_batch_size"].as_f64().unwrap() >= 1.0);
    assert_eq!(
        summary["requests_completed"], 40,
        "metrics at the top level, as the simulator's"
    );
    for f in [
        "requests.csv",
        "requests.parquet",
        "batches.parquet",
        "cdf/ttft_s.csv",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let mut rdr = csv::Reader::from_path(out.join("requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let (arr, first, done, pt, ot) = (
        col("arrival_s"),
        col("first_token_s"),
        col("completed_s"),
        col("prompt_tokens"),
        col("output_tokens"),
    );
    let mut rows = 0;
    for r in rdr.records() {
        let r = r.unwrap();
        let f = |i: usize| r[i].parse::<f64>().unwrap();
        assert!(
            f(arr) <= f(first) && f(first) <= f(done),
            "timestamps out of order: {r:?}"
        );
        assert!((8.0..=60.0).contains(&f(pt)), "prompt tokens {}", f(pt));
        assert!((2.0..=25.0).contains(&f(ot)), "output tokens {}", f(ot));
        rows += 1;
    }
    assert_eq!(rows, 40);
    // The same workload the simulator would run: prompt lengths follow the seed.
    let o2 = bench(&format!("http://{}", srv.addr), &exp, &dir.join("run2"));
    assert!(o2.status.success());
    let lens = |p: &Path| {
        let mut rdr = csv::Reader::from_path(p.join("requests.csv")).unwrap();
        rdr.records()
            .map(|r| r.unwrap()[pt].to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(lens(&out), lens(&dir.join("run2")));
}

#[test]
fn closed_loop_bench_never_has_more_requests_in_flight_than_clients() {
    let srv = common::start(&[]);
    let dir = tmp("closed");
    let exp = experiment_with(
        &dir,
        24,
        r#"{ type = "closed_loop", clients = 3, think_time_s = 0.01 }"#,
    );
    let out = dir.join("run");
    let o = bench(&format!("http://{}", srv.addr), &exp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["bench"]["sent"], 24);
    assert_eq!(summary["bench"]["completed"], 24);
    let mut rdr = csv::Reader::from_path(out.join("requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let (arr, done) = (col("arrival_s"), col("completed_s"));
    // +1 at each arrival, -1 at each completion; a completion at the same instant as an
    // arrival (a client's next request after zero think time) is counted first.
    let mut edges: Vec<(f64, i32)> = rdr
        .records()
        .flat_map(|r| {
            let r = r.unwrap();
            let t = |i: usize| r[i].parse::<f64>().unwrap();
            [(t(arr), 1), (t(done), -1)]
        })
        .collect();
    assert_eq!(edges.len(), 48);
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut live, mut most) = (0, 0);
    for (_, d) in edges {
        live += d;
        most = most.max(live);
    }
    assert!(most <= 3, "{most} requests in flight with 3 clients");
    assert!(
        most >= 2,
        "the clients ran concurrently (at most {most} in flight)"
    );
}

/// A server that lists a model and answers every completion with 503.
fn failing_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = std::io::Read::read_exact(&mut r, &mut body);
            let (status, text) = if first.contains("/v1/models") {
                ("200 OK", r#"{"object":"list","data":[{"id":"flaky"}]}"#)
            } else {
                (
                    "503 Service Unavailable",
                    r#"{"error":{"message":"overloaded"}}"#,
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    addr
}

#[test]
fn bench_counts_a_failing_servers_errors_and_still_writes_its_results() {
    let addr = failing_server();
    let dir = tmp("fail");
    let exp = experiment(&dir, 12);
    let out = dir.join("run");
    let o = bench(&format!("http://{addr}"), &exp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["bench"]["sent"], 12);
    assert_eq!(summary["bench"]["completed"], 0);
    assert_eq!(summary["bench"]["errors"]["status 503"], 12);
    assert_eq!(summary["bench"]["model"], "flaky");
    assert!(out.join("requests.csv").is_file());
}

#[test]
fn bench_against_no_server_is_a_clear_error() {
    let dir = tmp("none");
    let exp = experiment(&dir, 3);
    let o = bench("http://127.0.0.1:9", &exp, &dir.join("run"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("url") && err.contains("reachable"), "{err}");
}

#[test]
fn bench_reads_the_experiment_schema_and_names_what_is_wrong() {
    let dir = tmp("schema");
    let out = dir.join("run");
    // Sections bench does not use are still the experiment schema's: a misspelt key is named.
    let p = dir.join("typo.toml");
    let text = std::fs::read_to_string(experiment(&dir, 3)).unwrap();
    std::fs::write(&p, format!("{text}[cache]\nblok_size = 16\n")).unwrap();
    let err = String::from_utf8_lossy(&bench("http://127.0.0.1:9", &p, &out).stderr).into_owned();
    assert!(
        err.contains("blok_size") && err.contains("typo.toml"),
        "{err}"
    );
    // A file without the section bench needs.
    let p = dir.join("noworkload.toml");
    std::fs::write(&p, "seed = 3\n").unwrap();
    let err = String::from_utf8_lossy(&bench("http://127.0.0.1:9", &p, &out).stderr).into_owned();
    assert!(err.contains("has no [workload]"), "{err}");
    // A sweep is many points; bench takes one.
    let p = dir.join("sweep.toml");
    std::fs::write(&p, format!("{text}[sweep]\n\"seed\" = [1, 2]\n")).unwrap();
    let err = String::from_utf8_lossy(&bench("http://127.0.0.1:9", &p, &out).stderr).into_owned();
    assert!(err.contains("[sweep] (seed)"), "{err}");
    assert!(!out.exists(), "nothing is written for a bad file");
}

#[test]
fn session_turns_resend_the_answers_as_generated_so_the_servers_cache_finds_them() {
    let srv = common::start(&[]);
    let dir = tmp("sessions");
    let p = dir.join("sessions.toml");
    // 16-token blocks (the engine's); first turns are at most 32 + 16 = 48 tokens, later turns
    // at least 32 + 8 + 16 + 8 = 64.
    std::fs::write(
        &p,
        r#"name = "tiny-sessions"
seed = 3
[workload]
num_requests = 24
arrival = { type = "sessions", qps = 20.0, turns_min = 3, turns_max = 3, think_time_s = 0.01, system_prompt_tokens = 32, system_prompts = 1 }
lengths = { type = "independent", prompt = { type = "uniform", min = 8, max = 16 }, output = { type = "uniform", min = 16, max = 24 } }
"#,
    )
    .unwrap();
    let out = dir.join("run");
    let o = bench(&format!("http://{}", srv.addr), &p, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["bench"]["completed"], 24, "{summary}");
    assert_eq!(summary["bench"]["answers_without_token_ids"], 0);
    assert_eq!(summary["bench"]["cached_tokens_unknown"], 0);
    let mut rdr = csv::Reader::from_path(out.join("requests.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let (pt, ct) = (col("prompt_tokens"), col("cached_prompt_tokens"));
    let mut later = 0;
    for r in rdr.records() {
        let r = r.unwrap();
        let (prompt, cached) = (r[pt].parse::<u32>().unwrap(), r[ct].parse::<u32>().unwrap());
        assert!(cached < prompt, "{r:?}");
        if prompt > 48 {
            // The previous turn's stream (this prompt less at most 16 new tokens) had KV for all
            // but its last token: its full blocks are hits. Synthetic answers would miss from
            // the previous answer on (16 tokens or more).
            later += 1;
            let floor = (prompt - 17) / 16 * 16;
            assert!(cached >= floor, "cached {cached} < {floor}: {r:?}");
        }
    }
    // 24 turns: sessions start while others are in flight, so the run's last ones are cut off.
    assert!(later >= 12, "{later} later turns");
}

#[test]
fn sharegpt_conversations_become_sessions_the_bench_replays() {
    let dir = tmp("sharegpt");
    let input = dir.join("sharegpt.json");
    // ShareGPT's shape: a greeting before the first question (dropped), a broken alternation
    // (cut there), one with no answer at all (skipped), extra fields (ignored).
    std::fs::write(
        &input,
        r#"[
  {"id": "c1", "model": "x", "conversations": [
    {"from": "gpt", "value": "Hello! Ask me anything."},
    {"from": "human", "value": "What is a paged KV cache?"},
    {"from": "gpt", "value": "Fixed-size blocks of keys and values, allocated on demand."},
    {"from": "human", "value": "And prefix caching?"},
    {"from": "gpt", "value": "Blocks found again by the hash of everything before them."}]},
  {"id": "c2", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a scheduler."},
    {"role": "assistant", "content": "Sarathi."},
    {"role": "user", "content": "Another?"},
    {"role": "user", "content": "Please?"},
    {"role": "assistant", "content": "vLLM."}]},
  {"id": "c3", "conversations": [{"from": "human", "value": "Unanswered."}]}
]"#,
    )
    .unwrap();
    let model = common::root().join("tests/fixtures/tiny-llama");
    let conv = dir.join("conv.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["conversations", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("-o")
        .arg(&conv)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("2 conversations, 3 turns") && err.contains("1 cut"),
        "{err}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&conv)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], "c1");
    // A conversation's turns add up to its whole rendering, as the server would tokenize it.
    let codec = vajra_engine::tokenizer::TextCodec::load(&model, &[]).unwrap();
    let m = |role: &str, content: &str| vajra_engine::tokenizer::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let c1 = [
        m("user", "What is a paged KV cache?"),
        m(
            "assistant",
            "Fixed-size blocks of keys and values, allocated on demand.",
        ),
        m("user", "And prefix caching?"),
        m(
            "assistant",
            "Blocks found again by the hash of everything before them.",
        ),
    ];
    let whole = codec
        .encode(&codec.render_chat(&c1, false).unwrap(), false)
        .unwrap()
        .len() as u64;
    let turns = lines[0]["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    let sum: u64 = turns
        .iter()
        .map(|t| t[0].as_u64().unwrap() + t[1].as_u64().unwrap())
        .sum();
    assert_eq!(sum, whole);
    let first_prompt = codec
        .encode(&codec.apply_chat_template(&c1[..1]).unwrap(), false)
        .unwrap()
        .len() as u64;
    assert_eq!(turns[0][0].as_u64().unwrap(), first_prompt);

    // The bench replays them as sessions against our server.
    let srv = common::start(&[]);
    let exp = dir.join("conv.toml");
    std::fs::write(
        &exp,
        "name = \"conv\"\nseed = 2\n[workload]\nnum_requests = 12\narrival = { type = \"sessions\", qps = 50.0, think_time_s = 0.0, conversations = \"conv.jsonl\" }\n",
    )
    .unwrap();
    let out = dir.join("run");
    let o = bench(&format!("http://{}", srv.addr), &exp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut expected: Vec<u64> = Vec::new();
    for l in &lines {
        let mut stream = 0;
        for t in l["turns"].as_array().unwrap() {
            let (new, answer) = (t[0].as_u64().unwrap(), t[1].as_u64().unwrap());
            expected.push(stream + new);
            stream += new + answer;
        }
    }
    let mut rdr = csv::Reader::from_path(out.join("requests.csv")).unwrap();
    let pt = rdr
        .headers()
        .unwrap()
        .iter()
        .position(|x| x == "prompt_tokens")
        .unwrap();
    let mut n = 0;
    for r in rdr.records() {
        let p: u64 = r.unwrap()[pt].parse().unwrap();
        assert!(
            expected.contains(&p),
            "prompt of {p} tokens is no turn of {expected:?}"
        );
        n += 1;
    }
    assert_eq!(n, 12);
}
