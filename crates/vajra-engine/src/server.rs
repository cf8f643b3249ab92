//! The OpenAI-compatible HTTP server.
//!
//! The engine runs on its own thread; HTTP handlers (axum on tokio) talk to it over channels:
//!
//! ```text
//!   handler ──Command::Add(request, sink)──► engine thread: add, step, step, ...
//!   handler ◄──── RequestOutput per step ───┘   (a closed sink aborts the request)
//! ```
//!
//! A client that disconnects drops its handler (non-streaming) or its event stream
//! (streaming), which closes the sink; the engine thread sees the closed sink after its next
//! step and aborts the request, freeing its blocks. A concurrency limit answers 429 beyond it.
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`.

mod kv_link;
pub mod metrics;
pub mod openai;

pub use kv_link::KvLink;

use crate::engine::{Engine, GenerateRequest, RequestOutput};
use crate::tokenizer::TextCodec;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use metrics::EngineMetrics;
use openai::{ApiError, ChatBody, CompletionBody, PromptInput};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc as tmpsc, oneshot};
use vajra_core::ids::RequestId;
use vajra_core::request::FinishReason;

/// Default limit on requests in flight.
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name clients must send as `model`.
    pub model_name: String,
    /// Requests in flight beyond which new ones get 429.
    pub max_concurrent: usize,
    /// Append each finished request's lifecycle record (JSON lines) to this file.
    pub requests_log: Option<std::path::PathBuf>,
}

enum Command {
    Add {
        req: GenerateRequest,
        sink: tmpsc::UnboundedSender<RequestOutput>,
        /// The id, or the request parameter at fault and why.
        reply: oneshot::Sender<Result<RequestId, (String, String)>>,
    },
    /// A message on KV connection `conn` (disaggregated serving).
    Kv {
        conn: u32,
        msg: crate::kv_transport::KvMessage,
    },
    /// A decode server's new KV connection, with its writing half.
    KvConnected {
        conn: u32,
        writer: std::io::BufWriter<std::net::TcpStream>,
    },
    /// KV connection `conn` ended.
    KvClosed { conn: u32, why: String },
}

struct AppState {
    cfg: ServerConfig,
    codec: Arc<TextCodec>,
    max_model_len: u32,
    /// Tokens the KV pool holds: the longest request the server can take.
    kv_tokens: u64,
    commands: mpsc::Sender<Command>,
    metrics: EngineMetrics,
    in_flight: AtomicUsize,
}

/// Holds one slot of the concurrency limit until dropped.
struct Slot(Arc<AppState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn acquire(state: &Arc<AppState>) -> Result<Slot, ApiError> {
    let n = state.in_flight.fetch_add(1, Ordering::AcqRel);
    let slot = Slot(state.clone());
    if n >= state.cfg.max_concurrent {
        state.metrics.rejected();
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server is at its limit of {} concurrent requests; retry later",
                state.cfg.max_concurrent
            ),
            param: None,
            code: "rate_limit_exceeded",
        });
    }
    Ok(slot)
}

/// Starts the engine thread and returns the router.
pub fn router(engine: Engine, cfg: ServerConfig) -> Router {
    router_with_engine_thread(engine, cfg).0
}

/// [`router`], with the engine thread's handle: it ends once the router (and every clone of
/// its state) is dropped, after writing the run folder of [`Engine::record_run`].
pub fn router_with_engine_thread(
    engine: Engine,
    cfg: ServerConfig,
) -> (Router, std::thread::JoinHandle<()>) {
    router_with_kv_link(engine, cfg, None).expect("no link to fail")
}

/// [`router_with_engine_thread`] for one side of disaggregated serving (see
/// [`kv_link`](self::KvLink)): the engine's role must match the link's.
///
/// # Errors
/// A prefill server cannot reach its decode server's KV listener within 30 s.
pub fn router_with_kv_link(
    engine: Engine,
    cfg: ServerConfig,
    link: Option<KvLink>,
) -> std::io::Result<(Router, std::thread::JoinHandle<()>)> {
    let metrics = EngineMetrics::new();
    let (tx, rx) = mpsc::channel();
    let link = kv_link::Link::start(link, &tx)?;
    let state = Arc::new(AppState {
        codec: engine.codec().clone(),
        max_model_len: engine.max_model_len(),
        kv_tokens: {
            let kv = engine.kv();
            u64::from(kv.num_blocks()) * u64::from(kv.block_size())
        },
        commands: tx,
        metrics: metrics.clone(),
        in_flight: AtomicUsize::new(0),
        cfg: cfg.clone(),
    });
    let handle = std::thread::Builder::new()
        .name("vajra-engine-loop".into())
        .spawn(move || engine_loop(engine, rx, metrics, cfg.requests_log, link))
        .expect("spawn the engine thread");
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_text))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::map_response(openai_error_body));
    Ok((router, handle))
}

fn engine_loop(
    mut engine: Engine,
    rx: mpsc::Receiver<Command>,
    metrics: EngineMetrics,
    log: Option<std::path::PathBuf>,
    mut link: kv_link::Link,
) {
    let mut sinks: HashMap<RequestId, tmpsc::UnboundedSender<RequestOutput>> = HashMap::new();
    let mut log = log.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| tracing::error!(path = %p.display(), error = %e, "cannot open the requests log"))
            .ok()
    });
    // Every finished request, aborted ones included, with its reason and what it received.
    let mut record = move |o: &RequestOutput| {
        if let (Some(rec), Some(f)) = (&o.record, log.as_mut()) {
            use std::io::Write;
            let line = serde_json::to_string(rec).expect("records serialize");
            let _ = writeln!(f, "{line}");
        }
    };
    let handle = |engine: &mut Engine,
                  sinks: &mut HashMap<_, _>,
                  link: &mut kv_link::Link,
                  c: Command| match c {
        Command::Kv { conn, msg } => link.message(engine, conn, msg),
        Command::KvConnected { conn, writer } => link.connected(conn, writer),
        Command::KvClosed { conn, why } => link.closed(engine, conn, &why),
        Command::Add { req, sink, reply } => {
            let n = req.prompt.len();
            match engine.add_request(req) {
                Ok(id) => {
                    metrics.admitted(n);
                    sinks.insert(id, sink);
                    let _ = reply.send(Ok(id));
                }
                Err(e) => {
                    // The parameter the client can change: the KV-capacity and context
                    // limits are on prompt + max_tokens.
                    let param = match &e {
                        crate::EngineError::Core(vajra_core::CoreError::InvalidField {
                            field,
                            ..
                        }) if field == "prompt" => "prompt",
                        _ => "max_tokens",
                    };
                    let _ = reply.send(Err((param.to_owned(), e.to_string())));
                }
            }
        }
    };
    loop {
        // Nothing to step (requests handed off and waiting for the decode server's answer
        // included): wait for a command, or for the next offer of a hand-off.
        if !engine.has_schedulable() {
            metrics.update(&engine.stats(), engine.counters());
            let next = if link.needs_polling() {
                match rx.recv_timeout(std::time::Duration::from_millis(2)) {
                    Ok(c) => Ok(Some(c)),
                    Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
                }
            } else {
                rx.recv().map(Some).map_err(|_| ())
            };
            match next {
                Ok(Some(c)) => handle(&mut engine, &mut sinks, &mut link, c),
                Ok(None) => {}
                Err(()) => {
                    // Server gone: write the run folder if one is being recorded.
                    match engine.finish_run() {
                        Ok(Some(dir)) => {
                            tracing::info!(dir = %dir.display(), "wrote the run folder")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "cannot write the run folder"),
                    }
                    return;
                }
            }
        }
        while let Ok(c) = rx.try_recv() {
            handle(&mut engine, &mut sinks, &mut link, c);
        }
        let mut outputs = if engine.has_schedulable() {
            match engine.step() {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "engine step failed; aborting its requests");
                    let ids: Vec<RequestId> = sinks.keys().copied().collect();
                    ids.into_iter().filter_map(|id| engine.abort(id)).collect()
                }
            }
        } else {
            Vec::new()
        };
        link.after_step(&mut engine, &mut outputs);
        for o in outputs {
            metrics.observe(&o);
            record(&o);
            if link.relay(&o) {
                continue;
            }
            let id = o.id;
            let done = o.finish.is_some();
            let delivered = sinks.get(&id).is_some_and(|s| s.send(o).is_ok());
            if done || !delivered {
                sinks.remove(&id);
            }
            if !delivered
                && !done
                && !link.client_gone(&mut engine, id)
                && let Some(a) = engine.abort(id)
            {
                metrics.observe(&a);
                record(&a);
            }
        }
        // Clients gone without a new output this step (waiting requests, or disconnects).
        let closed: Vec<RequestId> = sinks
            .iter()
            .filter(|(_, s)| s.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            sinks.remove(&id);
            if link.client_gone(&mut engine, id) {
                continue;
            }
            if let Some(a) = engine.abort(id) {
                tracing::debug!(request = %id, "client disconnected; aborted");
                metrics.observe(&a);
                record(&a);
            }
        }
        metrics.update(&engine.stats(), engine.counters());
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    // The longest request that can run: the context, or the KV pool when it holds less.
    let longest = u64::from(s.max_model_len).min(s.kv_tokens);
    Json(json!({"object": "list", "data": [{
        "id": s.cfg.model_name, "object": "model", "created": 0, "owned_by": "vajra",
        "max_model_len": longest,
    }]}))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no route {}: the routes are POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics",
            uri.path()
        ),
        param: None,
        code: "not_found",
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed on {}", uri.path()),
        param: None,
        code: "method_not_allowed",
    }
}

/// Errors axum answers itself (413 for a body over the limit, 415, ...) as OpenAI JSON too.
async fn openai_error_body(r: Response) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let text = axum::body::to_bytes(r.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    ApiError {
        status,
        message: if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text
        },
        param: None,
        code: "invalid_request",
    }
    .into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.cfg.model_name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` does not exist; this server serves `{}`",
                s.cfg.model_name
            ),
            param: Some("model".into()),
            code: "model_not_found",
        }),
        _ => Ok(()),
    }
}

/// Submits a request to the engine thread; returns its output stream.
async fn submit(
    s: &AppState,
    req: GenerateRequest,
) -> Result<(RequestId, tmpsc::UnboundedReceiver<RequestOutput>), ApiError> {
    let (sink, outputs) = tmpsc::unbounded_channel();
    let (reply, answer) = oneshot::channel();
    let gone = || ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the engine thread has stopped".into(),
        param: None,
        code: "engine_stopped",
    };
    s.commands
        .send(Command::Add { req, sink, reply })
        .map_err(|_| gone())?;
    match answer.await.map_err(|_| gone())? {
        Ok(id) => Ok((id, outputs)),
        Err((param, msg)) => Err(ApiError::bad(param, msg)),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_name(f: Option<FinishReason>) -> Value {
    match f {
        None => Value::Null,
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Abort) => json!("abort"),
        // Under `late_requests = "reject"`: not scheduled by its TTFT deadline, never served.
        Some(FinishReason::Rejected) => json!("rejected"),
    }
}

/// OpenAI's usage object; `prompt_tokens_details.cached_tokens` is the prompt tokens the
/// prefix cache served (known when the request finished).
fn usage(o: &RequestOutput) -> Value {
    let (prompt, completion) = (o.prompt_tokens, o.output_tokens);
    let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    if let Some(r) = &o.record {
        u["prompt_tokens_details"] = json!({"cached_tokens": r.cached_prompt_tokens});
    }
    u
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

struct Shaped {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    codec: Arc<TextCodec>,
    /// Top-N logprobs asked for (completion: `logprobs`; chat: `top_logprobs` when `logprobs`).
    logprobs: Option<u32>,
    /// The prompt's token ids, when the request asked for token ids (`return_token_ids`).
    prompt_ids: Option<Vec<u32>>,
}

impl Shaped {
    /// `base`: characters of the completion text before this output (streamed chunks).
    fn logprobs(&self, o: &RequestOutput, base: usize) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        let text = |t: u32| self.codec.decode(&[t]).unwrap_or_default();
        match self.kind {
            Kind::Completion => json!({
                "tokens": o.logprobs.iter().map(|l| text(l.token)).collect::<Vec<_>>(),
                "token_logprobs": o.logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": o.logprobs.iter().map(|l| {
                    l.top.iter().map(|&(t, lp)| (text(t), json!(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                // Where each token's text starts in the completion's text, in characters.
                "text_offset": o.logprobs.iter().scan(base, |at, l| {
                    let start = *at;
                    *at += text(l.token).chars().count();
                    Some(start)
                }).collect::<Vec<_>>(),
            }),
            Kind::Chat => json!({"content": o.logprobs.iter().map(|l| json!({
                "token": text(l.token), "logprob": l.logprob, "bytes": text(l.token).into_bytes(),
                "top_logprobs": l.top.iter().map(|&(t, lp)| json!({"token": text(t), "logprob": lp, "bytes": text(t).into_bytes()})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()}),
        }
    }

    /// Adds the token ids the request asked for to a choice: `tokens` (this chunk's or the
    /// whole answer's) and, with `prompt`, the prompt's.
    fn token_ids(&self, choice: &mut Value, tokens: &[u32], prompt: bool) {
        if let Some(p) = &self.prompt_ids {
            choice["token_ids"] = json!(tokens);
            if prompt {
                choice["prompt_token_ids"] = json!(p);
            }
        }
    }

    fn chunk(&self, o: &RequestOutput, first: bool, base: usize) -> Value {
        let (object, mut choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": o.text, "logprobs": self.logprobs(o, base), "finish_reason": finish_name(o.finish)}),
            ),
            Kind::Chat => {
                let mut delta = json!({"content": o.text});
                if first {
                    delta["role"] = json!("assistant");
                }
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": self.logprobs(o, base), "finish_reason": finish_name(o.finish)}),
                )
            }
        };
        self.token_ids(&mut choice, &o.tokens, first);
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    fn whole(&self, o: &RequestOutput) -> Value {
        let mut choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": o.text, "logprobs": self.logprobs(o, 0), "finish_reason": finish_name(o.finish)})
            }
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": o.text}, "logprobs": self.logprobs(o, 0), "finish_reason": finish_name(o.finish)})
            }
        };
        self.token_ids(&mut choice, &o.tokens, true);
        let object = if self.kind == Kind::Chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage(o)})
    }
}

async fn respond(
    s: Arc<AppState>,
    slot: Slot,
    shaped: Shaped,
    req: GenerateRequest,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let (_id, mut outputs) = submit(&s, req).await?;
    if !stream {
        let mut all: Option<RequestOutput> = None;
        while let Some(o) = outputs.recv().await {
            let done = o.finish.is_some();
            match &mut all {
                None => all = Some(o),
                Some(a) => crate::engine::merge(a, o),
            }
            if done {
                break;
            }
        }
        drop(slot);
        let o = all.ok_or_else(|| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the engine dropped the request".into(),
            param: None,
            code: "internal_error",
        })?;
        return Ok(Json(shaped.whole(&o)).into_response());
    }
    let events = sse_events(slot, shaped, outputs, include_usage);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn sse_events(
    slot: Slot,
    shaped: Shaped,
    mut outputs: tmpsc::UnboundedReceiver<RequestOutput>,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let (tx, rx) = tmpsc::unbounded_channel::<Event>();
    // The stream owns `outputs` through this task's lifetime: when the client goes, axum drops
    // the stream, `rx` closes, the task ends and drops `outputs`, which closes the engine's sink.
    tokio::spawn(async move {
        let _slot = slot;
        let mut first = true;
        let mut sent_chars = 0;
        loop {
            let o = tokio::select! {
                o = outputs.recv() => o,
                () = tx.closed() => return,
            };
            let Some(o) = o else { return };
            let done = o.finish.is_some();
            let mut chunk = shaped.chunk(&o, first, sent_chars);
            sent_chars += o.text.chars().count();
            if include_usage {
                // OpenAI sends `"usage": null` on every chunk but the last one's usage chunk.
                chunk["usage"] = Value::Null;
            }
            if tx.send(Event::default().data(chunk.to_string())).is_err() {
                return;
            }
            first = false;
            if done {
                if include_usage {
                    let u = json!({"id": shaped.id, "object": if shaped.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": shaped.created, "model": shaped.model, "choices": [], "usage": usage(&o)});
                    let _ = tx.send(Event::default().data(u.to_string()));
                }
                let _ = tx.send(Event::default().data("[DONE]"));
                return;
            }
        }
    });
    futures_util::StreamExt::map(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        Ok::<Event, std::convert::Infallible>,
    )
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn response_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}-{}",
        unix_now(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let b: CompletionBody = openai::parse(&body)?;
    check_model(&s, b.common.model.as_deref())?;
    if b.echo == Some(true) {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("best_of", "only best_of = 1 is supported"));
    }
    if b.suffix.is_some() {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    let prompt = match &b.prompt {
        PromptInput::Text(t) => s.codec.encode(t, true),
        PromptInput::TextBatch(v) if v.len() == 1 => s.codec.encode(&v[0], true),
        PromptInput::TextBatch(v) => {
            return Err(ApiError::bad(
                "prompt",
                format!(
                    "a list of {} prompts: only one prompt per request is supported",
                    v.len()
                ),
            ));
        }
        PromptInput::Tokens(t) => Ok(t.clone()),
    }
    .map_err(|e| ApiError::bad("prompt", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    let vocab = s.codec.vocab_size();
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad(
            "prompt",
            format!("token id {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let max = openai::max_tokens(
        b.common.max_tokens,
        "max_tokens",
        prompt.len(),
        s.max_model_len,
        false,
    )?;
    let sampling = openai::sampling(&b.common, max, b.logprobs)?;
    generate(s, Kind::Completion, prompt, sampling, &b.common).await
}

/// Admits a validated request under the concurrency limit and answers it, whole or streamed.
async fn generate(
    s: Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    sampling: vajra_core::sampling::SamplingParams,
    common: &openai::CommonParams,
) -> Result<Response, ApiError> {
    let vocab = s.codec.vocab_size();
    if let Some(t) = sampling
        .stop_token_ids
        .iter()
        .find(|&&t| t as usize >= vocab)
    {
        return Err(ApiError::bad(
            "stop_token_ids",
            format!("stop token id {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let slot = acquire(&s)?;
    let shaped = Shaped {
        kind,
        id: response_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model: s.cfg.model_name.clone(),
        created: unix_now(),
        codec: s.codec.clone(),
        logprobs: sampling.logprobs,
        prompt_ids: (common.return_token_ids == Some(true)).then(|| prompt.clone()),
    };
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let req = GenerateRequest {
        prompt,
        sampling,
        priority: common.priority.unwrap_or(0),
    };
    respond(s.clone(), slot, shaped, req, common.stream, include_usage).await
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let b: ChatBody = openai::parse(&body)?;
    check_model(&s, b.common.model.as_deref())?;
    if b.messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "messages is empty: at least one message is required",
        ));
    }
    b.check_unsupported()?;
    let messages = openai::messages(&b.messages)?;
    let text = s
        .codec
        .apply_chat_template(&messages)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let prompt = s
        .codec
        .encode(&text, false)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let (given, field) = match (b.max_completion_tokens, b.common.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let max = openai::max_tokens(given, field, prompt.len(), s.max_model_len, true)?;
    let top = match (b.logprobs, b.top_logprobs) {
        (Some(true), Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::bad(
                "top_logprobs",
                format!("top_logprobs = {n}: allowed an integer from 0 to 20"),
            ));
        }
        (Some(true), n) => Some(n.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs",
                "top_logprobs needs logprobs = true",
            ));
        }
        _ => None,
    };
    let sampling = openai::sampling(&b.common, max, top)?;
    generate(s, Kind::Chat, prompt, sampling, &b.common).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_concurrent: usize) -> Arc<AppState> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny-llama");
        let (tx, _rx) = mpsc::channel();
        Arc::new(AppState {
            cfg: ServerConfig {
                model_name: "m".into(),
                max_concurrent,
                requests_log: None,
            },
            codec: Arc::new(TextCodec::load(&dir, &[]).unwrap()),
            max_model_len: 16,
            kv_tokens: 1024,
            commands: tx,
            metrics: EngineMetrics::new(),
            in_flight: AtomicUsize::new(0),
        })
    }

    #[test]
    fn requests_beyond_the_concurrency_limit_get_429_until_a_slot_frees() {
        let s = state(2);
        let a = acquire(&s).unwrap();
        let _b = acquire(&s).unwrap();
        let refused = acquire(&s).err().unwrap();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            refused.message.contains("limit of 2"),
            "{}",
            refused.message
        );
        let r = refused.clone().into_response();
        assert_eq!(
            r.headers()[header::RETRY_AFTER],
            "1",
            "429 says when to retry"
        );
        drop(a);
        assert!(acquire(&s).is_ok(), "a freed slot admits again");
        assert!(
            s.metrics
                .render()
                .contains("vajra_requests_rejected_total 1")
        );
    }
}
