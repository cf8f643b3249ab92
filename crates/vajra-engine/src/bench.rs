//! `vajra-engine bench`: replay an experiment file's workload against any OpenAI-compatible
//! server (this engine, vLLM, SGLang) and write a run folder with the simulator's own metrics
//! code, so `vajra-sim report` can put a measured run beside a simulated one.
//!
//! - Requests come from the experiment's `[workload]` through vajra-workload's
//!   [`RequestSource`] (open loop: Poisson, gamma, trace replay...; closed loop: N clients), with
//!   the experiment's seed, so the bench sends the very requests the simulator simulates.
//! - Prompts are token-id arrays of exactly the requested length (`prompt: [ids]`, which
//!   OpenAI's completions API and vLLM accept); requests sharing prefix groups share the ids of
//!   those groups. Outputs are exact through `max_tokens` and `ignore_eos`; the length received
//!   is checked against `usage` and the target.
//! - A session's turn k + 1 starts with turn k's prompt and the answer *as the server generated
//!   it* (`return_token_ids`, vLLM's extension, which this engine's server also answers), so the
//!   server's prefix cache finds the conversation as a real chat client's next turn would. A
//!   server that returns no token ids gets synthetic answer ids instead, counted in
//!   `answers_without_token_ids` (such a run's prefix hits cannot match the simulator's).
//! - The prompt tokens the server's prefix cache served come from `usage.prompt_tokens_details
//!   .cached_tokens` (OpenAI's field; vLLM sends it with `--enable-prompt-tokens-details`), so
//!   the measured run has a prefix hit rate; requests whose server did not say are counted in
//!   `cached_tokens_unknown`.
//! - Every streamed chunk is timestamped on the client. A failed request (connection error, a
//!   non-200 status, a timeout, a truncated stream) is counted with its reason and left out of
//!   the latency metrics; it never stops the run.
//!
//! Output folder: `summary.json` (the simulator's metrics plus a `bench` section with the
//! server, error counts and length checks), `requests.csv`/`.parquet`, an empty
//! `batches.parquet` (batches are the server's business), `cdf/`.

use crate::error::{EngineError, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration as StdDuration, Instant};
use tokio::sync::mpsc;
use vajra_core::request::{FinishReason, Prompt, Request};
use vajra_core::sched::output::FinishedRecord;
use vajra_core::time::Timestamp;
use vajra_experiment::Sections;
use vajra_metrics::summary::{ClusterFacts, SummaryFile};
use vajra_metrics::{Collector, Summary};
use vajra_workload::RequestSource;

/// What to run against which server.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The `model` field sent (None: the first model `/v1/models` lists).
    pub model: Option<String>,
    /// Experiment file whose `seed`, `[workload]` and `[slo]` are used.
    pub experiment: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Per-request timeout.
    pub timeout: StdDuration,
    /// Replace the workload's `num_requests`.
    pub num_requests: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

pub use vajra_metrics::summary::BenchFacts;

/// The server's step counters, when it exposes vajra's Prometheus metrics.
async fn step_counters(client: &reqwest::Client, url: &str) -> Option<[f64; 5]> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let get = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some([
        get("vajra_engine_steps_total")?,
        get("vajra_engine_scheduled_requests_total")?,
        get("vajra_engine_batched_tokens_total")?,
        get("vajra_engine_step_microseconds_total")?,
        get("vajra_engine_forward_microseconds_total")?,
    ])
}

/// One request's outcome, timestamps relative to the run's start.
struct Outcome {
    req: Request,
    /// The prompt's token ids, kept for a session turn (its next turn starts with them).
    prompt: Vec<u32>,
    sent: Timestamp,
    chunks: Vec<Timestamp>,
    usage_completion: Option<u32>,
    /// `usage.prompt_tokens_details.cached_tokens`, when the server sent it.
    usage_cached: Option<u32>,
    /// The generated token ids, when asked for and the server sent them.
    answer: Option<Vec<u32>>,
    finish: Option<String>,
    error: Option<String>,
}

fn bad(field: &str, v: impl std::fmt::Display, allowed: &str) -> EngineError {
    EngineError::invalid(field, v, allowed)
}

/// Token ids of a synthetic prompt: shared prefix groups map to the same ids, the rest is
/// unique to the request. Ids avoid the first 256 (special and byte tokens in most vocabularies).
fn prompt_ids(req: &Request, vocab: u32) -> Vec<u32> {
    let span = u64::from(vocab.saturating_sub(256).max(1));
    let id_at = |key: u64, i: u64| {
        let mut z = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z ^= z >> 31;
        z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 29;
        256 + (z % span) as u32
    };
    match &req.prompt {
        Prompt::Tokens(t) => t.clone(),
        Prompt::Synthetic(s) => (0..u64::from(s.len))
            .map(|i| {
                let g = (s.group_tokens > 0)
                    .then(|| {
                        s.prefix_groups
                            .get((i / u64::from(s.group_tokens)) as usize)
                    })
                    .flatten();
                match g {
                    Some(&group) => id_at(group ^ 0x5eed, i),
                    None => id_at(req.id.0 + (1 << 40), i),
                }
            })
            .collect(),
    }
}

/// The conversations of the sessions in flight: each session's token stream so far (every
/// prompt token sent and every answer token received), which its next turn starts with.
#[derive(Default)]
struct Conversations {
    streams: HashMap<u64, Vec<u32>>,
}

impl Conversations {
    /// The prompt ids of `req`: for a session turn, the conversation so far and then the new
    /// tokens' ids; otherwise [`prompt_ids`].
    fn prompt(&self, req: &Request, vocab: u32) -> Vec<u32> {
        let mut ids = prompt_ids(req, vocab);
        if let Some(past) = req.session.and_then(|s| self.streams.get(&s)) {
            let n = past.len().min(ids.len());
            ids[..n].copy_from_slice(&past[..n]);
        }
        ids
    }

    /// A turn of `req`'s session completed: its prompt and its answer (as generated) extend
    /// the stream, which its session's last turn drops. Returns whether the answer's ids were
    /// known.
    fn answered(&mut self, req: &Request, prompt: Vec<u32>, answer: Option<&[u32]>) -> bool {
        let Some(session) = req.session else {
            return true;
        };
        if req.last_turn {
            self.streams.remove(&session);
        } else {
            let mut stream = prompt;
            stream.extend_from_slice(answer.unwrap_or_default());
            self.streams.insert(session, stream);
        }
        answer.is_some()
    }
}

async fn send(
    client: reqwest::Client,
    url: String,
    model: String,
    req: Request,
    prompt: Vec<u32>,
    start: Instant,
) -> Outcome {
    let now = || Timestamp(start.elapsed().as_nanos() as u64);
    let mut body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": req.sampling.max_tokens,
        "ignore_eos": true,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let session = req.session.is_some();
    if session {
        // Only a session turn needs them, and a server that knows no such field may refuse it.
        body["return_token_ids"] = serde_json::json!(true);
    }
    let sent = now();
    let mut out = Outcome {
        req,
        prompt: if session { prompt } else { Vec::new() },
        sent,
        chunks: Vec::new(),
        usage_completion: None,
        usage_cached: None,
        answer: None,
        finish: None,
        error: None,
    };
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(failure(&e, "connect"));
            return out;
        }
    };
    if !resp.status().is_success() {
        out.error = Some(format!("status {}", resp.status().as_u16()));
        return out;
    }
    let mut resp = resp;
    let mut buf = String::new();
    let mut done = false;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                out.error = Some(failure(&e, "stream"));
                return out;
            }
        };
        let at = now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    out.error = Some("malformed event".into());
                    return out;
                };
                if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
                    out.chunks.push(at);
                    if let Some(f) = c["finish_reason"].as_str() {
                        out.finish = Some(f.to_owned());
                    }
                    if let Some(ids) = c["token_ids"].as_array() {
                        let answer = out.answer.get_or_insert_with(Vec::new);
                        answer.extend(ids.iter().filter_map(|t| t.as_u64()).map(|t| t as u32));
                    }
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    out.usage_completion = Some(n as u32);
                }
                if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    out.usage_cached = Some(n as u32);
                }
            }
        }
    }
    if !done || out.finish.is_none() {
        out.error = Some("stream ended early".into());
    }
    out
}

/// The first model a server lists, and its `max_model_len` when it says.
async fn server_model(client: &reqwest::Client, url: &str) -> Result<(String, Option<u32>)> {
    let v: serde_json::Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .map_err(|e| {
            bad(
                "url",
                url,
                &format!("a reachable OpenAI-compatible server ({e})"),
            )
        })?
        .json()
        .await
        .map_err(|e| {
            bad(
                "url",
                url,
                &format!("a server whose /v1/models answers JSON ({e})"),
            )
        })?;
    let m = &v["data"][0];
    let id = m["id"].as_str().ok_or_else(|| {
        bad(
            "url",
            url,
            "a server listing at least one model in /v1/models",
        )
    })?;
    Ok((id.to_owned(), m["max_model_len"].as_u64().map(|x| x as u32)))
}

/// Runs the benchmark and writes the run folder; returns what it counted.
///
/// # Errors
/// An unreadable or invalid experiment file, an unreachable server, or an output that cannot be
/// written. Failed requests are counted, not errors.
pub async fn run(cfg: &BenchConfig, vocab: u32) -> Result<BenchFacts> {
    // The experiment schema's own types: every section is checked (the scheduler, cluster and
    // predictor are the server's business, but a misspelt key is an error in any of them).
    let exp = Sections::load(&cfg.experiment)?;
    let mut workload = exp.require(&exp.workload, "workload")?.clone();
    if let Some(n) = cfg.num_requests {
        workload.num_requests = Some(n);
    }
    let slo = exp.slo.clone().unwrap_or_default();
    let seed = exp.seed();
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .build()
        .map_err(|e| bad("url", &cfg.url, &format!("an http:// URL ({e})")))?;
    let url = cfg.url.trim_end_matches('/').to_owned();
    let (listed, max_len) = server_model(&client, &url).await?;
    let model = cfg.model.clone().unwrap_or(listed);
    let base = exp.base();
    let max_tokens = workload.max_tokens.or(max_len).unwrap_or(u32::MAX);
    let mut source = RequestSource::new(&workload, seed, base, max_tokens)
        .map_err(|e| EngineError::model_file(&cfg.experiment, e))?;

    let counters_before = step_counters(&client, &url).await;
    let start = Instant::now();
    let now = || Timestamp(start.elapsed().as_nanos() as u64);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(workload.num_requests.unwrap_or(0));
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}")
                .expect("valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut collector = Collector::new(&slo, 1);
    std::fs::create_dir_all(&cfg.out).map_err(|e| EngineError::model_file(&cfg.out, e))?;
    collector
        .stream_batches(&cfg.out.join("batches.parquet"), 0)
        .map_err(|e| EngineError::model_file(&cfg.out, e))?;
    let mut facts = BenchFacts {
        url: url.clone(),
        model: model.clone(),
        ..BenchFacts::default()
    };
    let mut in_flight = 0u64;
    let mut conversations = Conversations::default();
    loop {
        while let Some(t) = source.peek_time() {
            if t > now() {
                break;
            }
            let req = source.pop().expect("a peeked request");
            facts.sent += 1;
            in_flight += 1;
            let prompt = conversations.prompt(&req, vocab);
            let (c, u, m, tx) = (client.clone(), url.clone(), model.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(send(c, u, m, req, prompt, start).await);
            });
        }
        if in_flight == 0 && source.peek_time().is_none() {
            break;
        }
        let wait = source
            .peek_time()
            .map(|t| StdDuration::from_nanos(t.0.saturating_sub(now().0)));
        let outcome = match wait {
            Some(w) => tokio::select! {
                o = rx.recv() => o,
                () = tokio::time::sleep(w) => None,
            },
            None => rx.recv().await,
        };
        let Some(mut o) = outcome else { continue };
        in_flight -= 1;
        bar.inc(1);
        let id = o.req.id;
        if o.req.session.is_some() && o.error.is_none() {
            let prompt = std::mem::take(&mut o.prompt);
            if !conversations.answered(&o.req, prompt, o.answer.as_deref()) {
                if facts.answers_without_token_ids == 0 {
                    eprintln!(
                        "warning: {url} returned no token ids (`return_token_ids`): the next turns \
                         of sessions carry synthetic answers, which its prefix cache cannot hit"
                    );
                }
                facts.answers_without_token_ids += 1;
            }
        }
        let rejected = o.error.is_none() && o.finish.as_deref() == Some("rejected");
        record(&mut collector, &mut facts, o);
        if rejected {
            // Not served by its TTFT deadline: a session ends there, as in the simulator.
            source.on_rejected(id, now());
        } else {
            source.on_finished(id, now());
        }
    }
    bar.finish_and_clear();
    let source_clipped = source.clipped();
    facts.wall_s = start.elapsed().as_secs_f64();
    if let (Some(a), Some(b)) = (counters_before, step_counters(&client, &url).await) {
        let steps = b[0] - a[0];
        facts.server_steps = Some(steps as u64);
        if steps > 0.0 {
            facts.server_mean_batch_size = Some((b[1] - a[1]) / steps);
            facts.server_mean_batch_tokens = Some((b[2] - a[2]) / steps);
            facts.server_mean_step_ms = Some((b[3] - a[3]) / steps / 1e3);
            facts.server_mean_forward_ms = Some((b[4] - a[4]) / steps / 1e3);
        }
    }
    collector
        .finish()
        .map_err(|e| EngineError::model_file(&cfg.out, e))?;
    let metrics = Summary::compute(
        &collector,
        &slo,
        &ClusterFacts {
            num_replicas: 1,
            stages: 1,
            num_blocks: 0,
            peak_flops: 0.0,
            peak_bytes_per_s: 0.0,
            issued: facts.sent,
            pools: Vec::new(),
            clipped: source_clipped,
        },
    );
    let name = exp.name.clone().unwrap_or_else(|| {
        cfg.experiment
            .file_stem()
            .map_or_else(|| "bench".into(), |s| s.to_string_lossy().into_owned())
    });
    let summary = SummaryFile {
        name,
        point: "measured".into(),
        seed: Some(seed),
        kind: Some("measured".into()),
        bench: Some(facts.clone()),
        metrics,
    };
    vajra_metrics::output::write_run(
        &cfg.out,
        &collector,
        &summary,
        vajra_metrics::output::Tables {
            csv: true,
            parquet: true,
        },
    )
    .map_err(|e| EngineError::model_file(&cfg.out, e))?;
    Ok(facts)
}

/// Adds a finished request to the metrics, or counts its failure.
fn record(c: &mut Collector, facts: &mut BenchFacts, o: Outcome) {
    if let Some(e) = o.error {
        *facts.errors.entry(e).or_default() += 1;
        return;
    }
    let reason = match o.finish.as_deref() {
        Some("length") => FinishReason::Length,
        Some("abort") => FinishReason::Abort,
        Some("rejected") => FinishReason::Rejected,
        _ => FinishReason::Stop,
    };
    let target = o.req.sampling.max_tokens;
    let n = o.usage_completion.unwrap_or(o.chunks.len() as u32);
    if n != target && reason != FinishReason::Rejected {
        facts.length_mismatches += 1;
    }
    if o.usage_cached.is_none() {
        facts.cached_tokens_unknown += 1;
    }
    facts.completed += 1;
    let id = o.req.id;
    c.on_arrival(id, o.sent);
    // One streamed chunk per engine step: each carries the step's token(s). A rejected
    // request's one chunk carries none.
    if reason != FinishReason::Rejected {
        for &t in &o.chunks {
            c.on_token(id, t);
        }
    }
    c.on_finished(&FinishedRecord {
        id,
        reason,
        tenant: o.req.tenant,
        priority: o.req.priority,
        slo_class: o.req.slo_class,
        arrival: o.sent,
        deadline: o
            .req
            .deadline
            .map(|d| Timestamp(o.sent.0 + d.0.saturating_sub(o.req.arrival.0))),
        first_scheduled: None,
        first_token: o.chunks.first().copied().filter(|_| n > 0),
        finished_at: o.chunks.last().copied().unwrap_or(o.sent),
        prompt_tokens: o.req.prompt.len(),
        output_tokens: n,
        cached_prompt_tokens: o.usage_cached.unwrap_or(0),
        num_preemptions: 0,
        disagg: None,
    });
}

/// How a request failed, as counted in the summary: `timeout`, or `what` went wrong otherwise.
fn failure(e: &reqwest::Error, what: &str) -> String {
    if e.is_timeout() { "timeout" } else { what }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vajra_core::ids::RequestId;
    use vajra_core::request::SyntheticPrompt;

    fn req(id: u64, len: u32, groups: Vec<u64>) -> Request {
        Request::new(
            RequestId(id),
            Prompt::Synthetic(SyntheticPrompt {
                len,
                prefix_groups: groups,
                group_tokens: 4,
                output_in_groups: false,
            }),
            8,
            Timestamp::ZERO,
        )
    }

    #[test]
    fn prompts_have_the_requested_length_and_share_only_their_prefix_groups() {
        let a = prompt_ids(&req(1, 10, vec![7, 8]), 1000);
        let b = prompt_ids(&req(2, 10, vec![7, 9]), 1000);
        assert_eq!(a.len(), 10);
        assert_eq!(a[..4], b[..4], "group 7 shared");
        assert_ne!(a[4..8], b[4..8], "groups 8 and 9 differ");
        assert_ne!(a[8..], b[8..], "the rest is unique");
        assert!(a.iter().all(|&t| (256..1000).contains(&t)));
    }
}
