//! Disaggregated serving over real HTTP and a real KV connection (loopback), on the tiny Llama
//! fixture: `serve --role decode --kv-listen` and `serve --role prefill --decode-peer` give the
//! colocated server's greedy output; 50 concurrent streams, a third of which hang up after
//! their first event, end with no block held on either server; a decode server killed
//! mid-stream ends the client's stream (finish reason `abort`), never hangs it, and the prefill
//! server holds no block afterwards.

mod common;

use common::{Server, call, events, json, metric, request, start, start_noting, wait_for};
use std::io::Read;

/// A decode server and a prefill server in front of it.
fn pair() -> (Server, Server) {
    let (decode, kv) = start_noting(
        &["--role", "decode", "--kv-listen", "127.0.0.1:0"],
        Some("taking hand-offs on"),
    );
    let kv = kv.expect("the decode server prints its KV address");
    let prefill = start(&["--role", "prefill", "--decode-peer", &kv]);
    (decode, prefill)
}

fn completion(addr: &str, prompt: &str, max_tokens: u32) -> serde_json::Value {
    let body = format!(
        r#"{{"prompt":{},"max_tokens":{max_tokens},"temperature":0,"ignore_eos":true}}"#,
        serde_json::to_string(prompt).unwrap()
    );
    let (st, resp) = call(addr, "POST", "/v1/completions", Some(&body));
    assert_eq!(st, 200, "{resp}");
    json(&resp)
}

#[test]
fn one_prefill_one_decode_gives_the_colocated_servers_greedy_text() {
    let colocated = start(&[]);
    let (decode, prefill) = pair();
    for (i, prompt) in [
        "The scheduler hands out tokens",
        "Paris is",
        "A much longer prompt, so that it spans more than one block of the cache, and then some more words",
    ]
    .iter()
    .enumerate()
    {
        let want = completion(&colocated.addr, prompt, 12 + i as u32);
        let got = completion(&prefill.addr, prompt, 12 + i as u32);
        assert_eq!(
            got["choices"][0]["text"], want["choices"][0]["text"],
            "prompt {i}"
        );
        assert_eq!(got["choices"][0]["finish_reason"], "length");
        assert_eq!(
            got["usage"]["completion_tokens"],
            want["usage"]["completion_tokens"]
        );
    }
    // The decode server generated the tokens (and counts them in its metrics).
    assert!(metric(&decode.addr, "vajra_generation_tokens_total") >= 36.0);
    // A decode server takes no request of its own.
    let (st, _) = call(
        &decode.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"Paris is","max_tokens":4}"#),
    );
    assert_eq!(st, 400);
}

#[test]
fn fifty_streams_with_disconnects_leave_no_block_on_either_server() {
    let (decode, prefill) = pair();
    let addr = prefill.addr.clone();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt":"The scheduler hands out tokens {i}","max_tokens":{},"stream":true,"ignore_eos":true,"seed":{i}}}"#,
                    8 + i % 17
                );
                if i % 3 == 0 {
                    // Hang up after the first bytes.
                    let mut s = request(&addr, "POST", "/v1/completions", Some(&body));
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                    return;
                }
                let (st, resp) = call(&addr, "POST", "/v1/completions", Some(&body));
                assert_eq!(st, 200);
                let ev = events(&resp);
                assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "stream {i}");
                let last = json(&ev[ev.len() - 2]);
                assert_eq!(last["choices"][0]["finish_reason"], "length", "stream {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (who, a) in [("prefill", &prefill.addr), ("decode", &decode.addr)] {
        wait_for(&format!("the {who} server to hold no block"), || {
            metric(a, "vajra_num_requests_running") == 0.0
                && metric(a, "vajra_kv_blocks_allocated") == 0.0
        });
    }
}

#[test]
fn a_decode_server_killed_mid_stream_ends_the_streams_and_frees_the_prefill_blocks() {
    let (decode, prefill) = pair();
    // Forty long streams (the tiny model's whole context), so some are mid-stream at the kill.
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let addr = prefill.addr.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"prompt":"Paris is {i}","max_tokens":240,"stream":true,"ignore_eos":true}}"#
                );
                call(&addr, "POST", "/v1/completions", Some(&body))
            })
        })
        .collect();
    wait_for("tokens to flow", || {
        metric(&prefill.addr, "vajra_generation_tokens_total") >= 40.0
    });
    drop(decode);
    let mut aborted = 0;
    for c in clients {
        // Every stream ends (a hang would time the call out), as finished or as aborted.
        let (st, resp) = c.join().unwrap();
        assert_eq!(st, 200);
        let ev = events(&resp);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{resp}");
        let last = json(&ev[ev.len() - 2]);
        let reason = last["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(reason == "length" || reason == "abort", "{reason}");
        aborted += usize::from(reason == "abort");
    }
    eprintln!("{aborted} of 40 streams were cut by the kill");
    wait_for("the prefill server to hold no block", || {
        metric(&prefill.addr, "vajra_kv_blocks_allocated") == 0.0
    });
    // A new request fails at once rather than hang.
    let v = completion(&prefill.addr, "Paris is", 4);
    assert_eq!(v["choices"][0]["finish_reason"], "abort");
}
