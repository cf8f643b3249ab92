//! `vajra-engine serve` end to end, over real HTTP, on the tiny Llama fixture: the OpenAI
//! endpoints (plain and streaming), bad requests answered 4xx with a message, 50 concurrent
//! streams that leave no block allocated, and a client that disconnects mid-stream.

mod common;

use common::{call, events, json, metric, request, start, wait_for};
use std::io::Read;

#[test]
fn completions_chat_streaming_models_and_health_answer_in_openai_form() {
    let srv = start(&[]);
    let a = &srv.addr;
    assert_eq!(call(a, "GET", "/health", None), (200, "ok".into()));
    let (st, body) = call(a, "GET", "/v1/models", None);
    assert_eq!(st, 200);
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    let (st, body) = call(
        a,
        "POST",
        "/v1/completions",
        Some(
            r#"{"model":"tiny","prompt":"Paris is","max_tokens":5,"temperature":0,"ignore_eos":true,"logprobs":2}"#,
        ),
    );
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens"], 4); // tests/fixtures/tiny-llama/cases.json
    assert_eq!(
        v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        v["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap()
            .len(),
        2
    );

    // Same request streamed: same text, chunks then [DONE], usage chunk on request.
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    let (st, body) = call(
        a,
        "POST",
        "/v1/completions",
        Some(
            r#"{"prompt":"Paris is","max_tokens":5,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    );
    assert_eq!(st, 200);
    let ev = events(&body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1].iter().map(|e| json(e)).collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);

    let (st, body) = call(
        a,
        "POST",
        "/v1/chat/completions",
        Some(
            r#"{"model":"tiny","messages":[{"role":"user","content":"hello"}],"max_tokens":4,"stream":true,"seed":5,"temperature":0.7}"#,
        ),
    );
    assert_eq!(st, 200);
    let ev = events(&body);
    let first = json(&ev[0]);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(ev.last().unwrap(), "[DONE]");

    let (st, body) = call(
        a,
        "POST",
        "/v1/chat/completions",
        Some(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_completion_tokens":3,"seed":5,"temperature":0.7,"ignore_eos":true}"#,
        ),
    );
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // A seeded request gives the same answer twice.
    let (_, again) = call(
        a,
        "POST",
        "/v1/chat/completions",
        Some(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_completion_tokens":3,"seed":5,"temperature":0.7,"ignore_eos":true}"#,
        ),
    );
    assert_eq!(
        json(&again)["choices"][0]["message"],
        v["choices"][0]["message"]
    );
}

#[test]
fn bad_requests_get_4xx_with_a_message_naming_the_problem() {
    let srv = start(&[]);
    let a = &srv.addr;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/completions", r#"{"prompt": "x", "#, 400, "malformed"),
        (
            "/v1/completions",
            r#"{"model":"gpt-9","prompt":"x"}"#,
            404,
            "gpt-9",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":0}"#,
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":-1}"#,
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","temperature":-1}"#,
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","top_p":0}"#,
            400,
            "top_p",
        ),
        ("/v1/completions", r#"{"prompt":"x","n":2}"#, 400, "n = 2"),
        (
            "/v1/completions",
            r#"{"prompt":"x","bogus_field":1}"#,
            400,
            "bogus_field",
        ),
        ("/v1/completions", r#"{"prompt":[1,2,99999]}"#, 400, "99999"),
        (
            "/v1/chat/completions",
            r#"{"messages":[]}"#,
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":-1}"#,
            400,
            "max_completion_tokens",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (st, resp) = call(a, "POST", path, Some(body));
        assert_eq!(st, *status, "{body} → {resp}");
        let v = json(&resp);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} does not mention {needle:?}"
        );
    }
    // A prompt longer than max_model_len (256 tokens for the tiny model).
    let long = "tokens ".repeat(400);
    let (st, resp) = call(
        a,
        "POST",
        "/v1/completions",
        Some(&format!(r#"{{"prompt":"{long}","max_tokens":4}}"#)),
    );
    assert_eq!(st, 400, "{resp}");
    assert!(
        json(&resp)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_model_len"),
        "{resp}"
    );
    // Still serving.
    assert_eq!(call(a, "GET", "/health", None).0, 200);
}

#[test]
fn fifty_concurrent_streams_all_complete_and_free_every_block() {
    let srv = start(&[]);
    let addr = srv.addr.clone();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt":"The scheduler hands out tokens {i}","max_tokens":{},"stream":true,"ignore_eos":true,"seed":{i}}}"#,
                    8 + i % 17
                );
                let (st, resp) = call(&addr, "POST", "/v1/completions", Some(&body));
                assert_eq!(st, 200);
                let ev = events(&resp);
                assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "stream {i} did not finish");
                let last = json(&ev[ev.len() - 2]);
                assert_eq!(last["choices"][0]["finish_reason"], "length", "stream {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_for("the engine to go idle", || {
        metric(&addr, "vajra_num_requests_running") == 0.0
    });
    assert_eq!(metric(&addr, "vajra_kv_blocks_allocated"), 0.0);
    assert_eq!(
        metric(
            &addr,
            "vajra_request_success_total{finished_reason=\"length\"}"
        ),
        50.0
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_leaves_no_blocks_allocated() {
    let log = std::env::temp_dir().join(format!("vajra-abort-log-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let srv = start(&[
        "--policy",
        "sarathi",
        "--requests-log",
        log.to_str().unwrap(),
    ]);
    let a = srv.addr.clone();
    let mut s = request(
        &a,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"Paris is","max_tokens":250,"stream":true,"ignore_eos":true}"#),
    );
    // Read until the first event, then hang up.
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    assert!(n > 0);
    drop(s);
    let ended = |a: &str| {
        metric(a, "vajra_request_success_total{finished_reason=\"abort\"}")
            + metric(a, "vajra_request_success_total{finished_reason=\"length\"}")
    };
    wait_for("the request to end", || ended(&a) == 1.0);
    // Aborted, not finished: the engine noticed the closed stream long before 250 tokens.
    assert_eq!(
        metric(&a, "vajra_request_success_total{finished_reason=\"abort\"}"),
        1.0
    );
    assert!(metric(&a, "vajra_generation_tokens_total") < 250.0);
    assert_eq!(metric(&a, "vajra_num_requests_running"), 0.0);
    assert_eq!(metric(&a, "vajra_kv_blocks_allocated"), 0.0);
    // The requests log has it too (it used to leave every aborted request out).
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0]["reason"]
            .to_string()
            .to_lowercase()
            .contains("abort"),
        "{text}"
    );
    assert!(lines[0]["output_tokens"].as_u64().unwrap() < 250, "{text}");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn run_dir_writes_the_simulators_run_folder_from_the_engines_own_records() {
    let dir = std::env::temp_dir().join(format!("vajra-run-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let srv = start(&["--run-dir", dir.to_str().unwrap()]);
    let a = srv.addr.clone();
    // The same prompt twice in a row: the second finds the first's blocks in the prefix cache.
    let body = r#"{"model":"tiny","prompt":"Paris is a city of many bridges and old stone streets along a wide river","max_tokens":4,"temperature":0,"ignore_eos":true}"#;
    for _ in 0..3 {
        let (st, b) = call(&a, "POST", "/v1/completions", Some(body));
        assert_eq!(st, 200, "{b}");
    }
    assert!(srv.interrupt(), "a clean shutdown");
    let summary = json(&std::fs::read_to_string(dir.join("summary.json")).unwrap());
    assert_eq!(summary["kind"], "served");
    assert_eq!(summary["requests_completed"], 3);
    assert_eq!(summary["output_tokens"], 12);
    let csv = std::fs::read_to_string(dir.join("requests.csv")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = rows.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let delay: f64 = r[col("scheduling_delay_s")]
            .parse()
            .expect("scheduling delay filled in");
        assert!(delay >= 0.0);
        assert_eq!(r[col("output_tokens")], "4");
    }
    let cached: u32 = rows
        .iter()
        .map(|r| r[col("cached_prompt_tokens")].parse::<u32>().unwrap())
        .sum();
    assert!(
        cached > 0,
        "the repeated prompts hit the prefix cache: {csv}"
    );
    for f in ["batches.parquet", "requests.parquet", "cdf/ttft_s.csv"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn what_official_clients_send_works_and_what_cannot_be_honoured_is_named() {
    let srv = start(&[]);
    let a = &srv.addr;
    let chat = "/v1/chat/completions";
    // Accepted: content parts, a developer message, defaults official clients send.
    let ok = [
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]}],"max_tokens":2}"#,
        r#"{"messages":[{"role":"developer","content":"Be brief."},{"role":"user","content":"Hi","name":"ann"}],"max_tokens":2}"#,
        r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"store":false,"metadata":{"k":"v"},"service_tier":"auto","user":"u1","parallel_tool_calls":true,"tool_choice":"none","tools":[],"response_format":{"type":"text"}}"#,
    ];
    for body in ok {
        let (st, resp) = call(a, "POST", chat, Some(body));
        assert_eq!(st, 200, "{body} → {resp}");
    }
    // Refused, each naming the parameter.
    let cases: &[(&str, &str, &str)] = &[
        (
            chat,
            r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
            "messages[0].role",
        ),
        (
            chat,
            r#"{"messages":[{"role":"","content":"x"}]}"#,
            "messages[0].role",
        ),
        (
            chat,
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            "messages[0].content[0].type",
        ),
        (
            chat,
            r#"{"messages":[{"role":"user","content":"x","colour":"red"}]}"#,
            "colour",
        ),
        (
            chat,
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            "tools",
        ),
        (
            chat,
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
            "response_format",
        ),
        // Type errors used to name "body".
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":"5"}"#,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":5.5}"#,
            "max_tokens",
        ),
        ("/v1/completions", r#"{"prompt":"x","seed":"abc"}"#, "seed"),
        (
            "/v1/completions",
            r#"{"prompt":"x","stream":"yes"}"#,
            "stream",
        ),
        ("/v1/completions", r#"{"prompt":"x","stop":5}"#, "stop"),
        ("/v1/completions", r#"{"prompt":null}"#, "prompt"),
        ("/v1/completions", r#"{"prompt":[1,-1]}"#, "prompt"),
        ("/v1/completions", r#"{"prompt":[1,1.5]}"#, "prompt"),
    ];
    for (path, body, param) in cases {
        let (st, resp) = call(a, "POST", path, Some(body));
        assert_eq!(st, 400, "{body} → {resp}");
        let v = json(&resp);
        assert_eq!(v["error"]["param"], *param, "{body} → {resp}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(param),
            "{body} → {resp}"
        );
    }
}

#[test]
fn sigterm_drains_writes_the_run_folder_and_exits_zero() {
    let dir = std::env::temp_dir().join(format!("vajra-sigterm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let srv = start(&["--run-dir", dir.to_str().unwrap(), "--drain-timeout-s", "5"]);
    let (st, b) = call(
        &srv.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"hello","max_tokens":3,"ignore_eos":true}"#),
    );
    assert_eq!(st, 200, "{b}");
    assert!(
        srv.terminate(),
        "SIGTERM is a clean shutdown (exit 0), not death by signal"
    );
    let summary = json(&std::fs::read_to_string(dir.join("summary.json")).unwrap());
    assert_eq!(summary["requests_completed"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_busy_port_fails_before_the_model_loads() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port, "--model"])
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("binding 127.0.0.1") && !err.contains("loaded"),
        "{err}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["serve", "--drain-timeout-s=-1", "--model", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("drain-timeout-s"),
        "{err}"
    );
}

#[test]
fn errors_are_openai_json_and_the_details_are_right() {
    let srv = start(&[]);
    let a = &srv.addr;
    // 404, 405 and 413 were plain text.
    for (method, path, body, status) in [
        ("GET", "/v1/nope", None, 404),
        ("GET", "/v1/completions", None, 405),
    ] {
        let (st, resp) = call(a, method, path, body);
        assert_eq!(st, status, "{resp}");
        assert!(json(&resp)["error"]["message"].is_string(), "{resp}");
    }
    let huge = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(3 << 20));
    let (st, resp) = call(a, "POST", "/v1/completions", Some(&huge));
    assert_eq!(st, 413, "{resp}");
    assert!(json(&resp)["error"]["message"].is_string(), "{resp}");
    let cases: &[(&str, &str, &str)] = &[
        // Was reported as `logprobs`.
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":50}"#,
            "top_logprobs",
        ),
        // Was accepted silently.
        (
            "/v1/completions",
            r#"{"prompt":"x","stop_token_ids":[1000000]}"#,
            "stop_token_ids",
        ),
    ];
    for (path, body, param) in cases {
        let (st, resp) = call(a, "POST", path, Some(body));
        assert_eq!(st, 400, "{body} → {resp}");
        assert_eq!(json(&resp)["error"]["param"], *param, "{resp}");
    }
    // Non-final chunks carry "usage": null when include_usage is set.
    let (st, resp) = call(
        a,
        "POST",
        "/v1/completions",
        Some(
            r#"{"prompt":"x","max_tokens":3,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
    );
    assert_eq!(st, 200);
    let chunks: Vec<serde_json::Value> = resp
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(json)
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    assert!(last["usage"]["completion_tokens"] == 3, "{resp}");
    assert!(
        !rest.is_empty()
            && rest
                .iter()
                .all(|c| c.get("usage") == Some(&serde_json::Value::Null)),
        "{resp}"
    );
    // /v1/models says the longest request the server can take: the tiny model's 8 MiB pool.
    let (_, m) = call(a, "GET", "/v1/models", None);
    let longest = json(&m)["data"][0]["max_model_len"].as_u64().unwrap();
    assert!(longest <= 256, "{m}");
    // --max-concurrent 0 would refuse everything.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args(["serve", "--max-concurrent", "0", "--model", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("max-concurrent"),
        "{err}"
    );
}

#[test]
fn completion_logprobs_carry_each_tokens_text_offset() {
    let srv = start(&[]);
    let (st, resp) = call(
        &srv.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"x","max_tokens":5,"ignore_eos":true,"temperature":0,"logprobs":1}"#),
    );
    assert_eq!(st, 200, "{resp}");
    let lp = &json(&resp)["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    // It used to be [] always.
    assert_eq!(offsets.len(), tokens.len(), "{resp}");
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at, "{resp}");
        at += t.chars().count() as u64;
    }
}

#[test]
fn token_ids_come_back_when_asked_and_a_replayed_answer_hits_the_prefix_cache() {
    let srv = start(&[]);
    let a = &srv.addr;
    let prompt: Vec<u32> = (100..140).collect();
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 20, "temperature": 0,
        "ignore_eos": true, "stream": true, "return_token_ids": true,
        "stream_options": {"include_usage": true}});
    let (st, text) = call(a, "POST", "/v1/completions", Some(&body.to_string()));
    assert_eq!(st, 200, "{text}");
    let ev = events(&text);
    let chunks: Vec<serde_json::Value> = ev[..ev.len() - 1].iter().map(|e| json(e)).collect();
    assert_eq!(
        chunks[0]["choices"][0]["prompt_token_ids"],
        serde_json::json!(prompt),
        "the first chunk carries the prompt's ids"
    );
    assert!(chunks[1]["choices"][0].get("prompt_token_ids").is_none());
    let answer: Vec<u64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array())
        .flatten()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(answer.len(), 20, "every generated token's id, once");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // The next turn: the conversation so far (prompt and the answer as generated) plus new
    // tokens. 59 of its tokens have KV (the last answer token never gets any): 3 full 16-token
    // blocks, 48 tokens, are found in the cache.
    let mut next: Vec<u64> = prompt.iter().map(|&t| u64::from(t)).collect();
    next.extend(&answer);
    next.extend(200..210);
    let body = serde_json::json!({"prompt": next, "max_tokens": 2, "ignore_eos": true,
        "return_token_ids": true});
    let (st, text) = call(a, "POST", "/v1/completions", Some(&body.to_string()));
    assert_eq!(st, 200, "{text}");
    let v = json(&text);
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 48);

    // Without the flag, no ids.
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 2});
    let (_, text) = call(a, "POST", "/v1/completions", Some(&body.to_string()));
    assert!(json(&text)["choices"][0].get("token_ids").is_none());
}

#[test]
fn late_requests_reject_ends_requests_unserved_at_the_ttft_target() {
    let dir = std::env::temp_dir().join(format!("vajra-late-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exp = dir.join("late.toml");
    std::fs::write(
        &exp,
        "[scheduler]\nmax_num_seqs = 1\nlate_requests = \"reject\"\npolicy = { type = \"sarathi\", chunk_size = 64 }\n[slo]\nttft_s = 0.02\n",
    )
    .unwrap();
    let srv = start(&["--experiment", exp.to_str().unwrap()]);
    let addr = srv.addr.clone();
    // One request runs at a time, 60 tokens each: most of twenty sent at once are still
    // waiting, never scheduled, 20 ms after they arrived.
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt":"late {i}","max_tokens":60,"stream":true,"ignore_eos":true,"stream_options":{{"include_usage":true}}}}"#
                );
                let (st, resp) = call(&addr, "POST", "/v1/completions", Some(&body));
                assert_eq!(st, 200, "{resp}");
                let ev = events(&resp);
                assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
                let usage = json(&ev[ev.len() - 2])["usage"].clone();
                let last = json(&ev[ev.len() - 3]);
                (
                    last["choices"][0]["finish_reason"].as_str().unwrap().to_owned(),
                    usage["completion_tokens"].as_u64().unwrap(),
                )
            })
        })
        .collect();
    let ends: Vec<(String, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let rejected = ends.iter().filter(|e| e.0 == "rejected").count();
    assert!(rejected >= 5, "{ends:?}");
    for (reason, tokens) in &ends {
        match reason.as_str() {
            "rejected" => assert_eq!(*tokens, 0, "a rejected request got no tokens"),
            "length" => assert_eq!(*tokens, 60),
            r => panic!("finish reason {r}"),
        }
    }
    assert_eq!(
        metric(
            &addr,
            "vajra_request_success_total{finished_reason=\"rejected\"}"
        ),
        rejected as f64
    );

    // Rejecting needs a target to reject at.
    std::fs::write(
        &exp,
        "[scheduler]\nlate_requests = \"reject\"\npolicy = { type = \"sarathi\", chunk_size = 64 }\n",
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vajra-engine"))
        .args([
            "serve",
            "--port",
            "0",
            "--experiment",
            exp.to_str().unwrap(),
            "--model",
        ])
        .arg(common::root().join("tests/fixtures/tiny-llama"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("[slo] ttft_s"), "{err}");
}
