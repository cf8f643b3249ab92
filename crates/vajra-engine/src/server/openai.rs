//! OpenAI request bodies, their validation into engine requests, and error bodies.
//!
//! Bodies are parsed strictly: an unknown field, a wrong type or a value out of range is a 400
//! with an OpenAI-style error that names the parameter. Fields that OpenAI defines but the
//! engine does not implement (`n` > 1, `best_of`, `logit_bias`, `suffix`, `echo`) are refused
//! with a message rather than ignored.

use crate::tokenizer::ChatMessage;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use vajra_core::sampling::{DEFAULT_MAX_TOKENS, SamplingParams};

/// An error answered as `{"error": {...}}` with a status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: &'static str,
}

impl ApiError {
    /// A 400 naming a parameter.
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            404 => "NotFoundError",
            429 => "RateLimitError",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // When to retry: a slot frees as soon as any request in flight ends.
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

/// `prompt` of a completion: text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of one text.
    TextBatch(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields both endpoints share (flattened into each body).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Model name; must be the served one.
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k (vLLM extension).
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension).
    pub min_p: Option<f64>,
    /// Number of choices; only 1.
    pub n: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stop token ids (vLLM extension).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Seed.
    pub seed: Option<u64>,
    /// Presence penalty.
    pub presence_penalty: Option<f64>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f64>,
    /// Repetition penalty (vLLM extension).
    pub repetition_penalty: Option<f64>,
    /// Keep going past EOS (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// End user id (recorded nowhere; accepted for compatibility).
    pub user: Option<String>,
    /// Scheduling priority (vLLM extension; lower first).
    pub priority: Option<i32>,
    /// Put the generated token ids in every choice (`token_ids`, each chunk's new ones when
    /// streaming) and the prompt's in the first (`prompt_token_ids`), as vLLM does: a client
    /// that replays a conversation sends back exactly the tokens the server generated.
    pub return_token_ids: Option<bool>,
    /// Unsupported: refused unless absent or empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionBody {
    /// The prompt.
    pub prompt: PromptInput,
    /// Log-probabilities of this many top tokens (0–20).
    pub logprobs: Option<i64>,
    /// Unsupported unless false.
    pub echo: Option<bool>,
    /// Unsupported unless 1.
    pub best_of: Option<i64>,
    /// Unsupported.
    pub suffix: Option<String>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// One message of a chat request as OpenAI clients send it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageIn {
    /// `system`, `developer` (read as `system`), `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or a list of content parts (only `text` parts are supported).
    pub content: Option<ContentIn>,
    /// A participant's name (accepted, not used).
    #[serde(default)]
    pub name: Option<String>,
}

/// A message's `content`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentIn {
    /// Plain text.
    Text(String),
    /// Content parts, e.g. `[{"type": "text", "text": "Hi"}]`.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others, such as `image_url`, are refused as unsupported).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// The chat roles a template is given.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// The conversation for the chat template: roles checked, content parts joined.
///
/// # Errors
/// An unknown role, a message without content, or a content part that is not text, naming
/// `messages[i]...`.
pub fn messages(msgs: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad(
                    format!("messages[{i}].role"),
                    format!(
                        "messages[{i}].role = {:?}: allowed are {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match &m.content {
                Some(ContentIn::Text(t)) => t.clone(),
                Some(ContentIn::Parts(parts)) => {
                    let mut text = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push(t.as_str()),
                            ("text", None) => {
                                return Err(ApiError::bad(
                                    format!("messages[{i}].content[{j}].text"),
                                    format!("messages[{i}].content[{j}] is a text part without `text`"),
                                ));
                            }
                            (other, _) => {
                                return Err(unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    &format!("content parts of type {other:?} (this server takes text parts)"),
                                ));
                            }
                        }
                    }
                    text.join("\n")
                }
                None => {
                    return Err(ApiError::bad(
                        format!("messages[{i}].content"),
                        format!("messages[{i}] has no content (tool calls are not supported)"),
                    ));
                }
            };
            let role = if m.role == "developer" {
                "system".to_owned()
            } else {
                m.role.clone()
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// A 400 for an option this server does not implement.
pub fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("{param}: {what} are not supported"),
        param: Some(param.to_owned()),
        code: "unsupported_value",
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    /// The conversation.
    pub messages: Vec<MessageIn>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// How many top alternatives per token (0–20), with `logprobs`.
    pub top_logprobs: Option<i64>,
    /// Tools: refused unless absent or empty (no tool calling).
    pub tools: Option<Vec<Value>>,
    /// `none` or `auto` without tools are accepted; anything else is refused.
    pub tool_choice: Option<Value>,
    /// Whether calls may run in parallel (accepted, meaningless without tools).
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text"}` is accepted; JSON modes are refused.
    pub response_format: Option<Value>,
    /// Stored completions (accepted, nothing is stored).
    pub store: Option<bool>,
    /// Request metadata (accepted, not used).
    pub metadata: Option<Value>,
    /// Service tier (accepted, not used: one tier).
    pub service_tier: Option<String>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonParams,
}

impl ChatBody {
    /// Refuses the options official clients may send that this server cannot honour.
    ///
    /// # Errors
    /// Tools, a tool choice other than `none`/`auto`, or a JSON response format.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tools", "tool definitions"));
        }
        if let Some(c) = &self.tool_choice
            && !matches!(c.as_str(), Some("none" | "auto"))
        {
            return Err(unsupported(
                "tool_choice",
                &format!("tool choices other than \"none\" or \"auto\" ({c})"),
            ));
        }
        if let Some(f) = &self.response_format
            && f.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(unsupported(
                "response_format",
                &format!("response formats other than {{\"type\": \"text\"}} ({f})"),
            ));
        }
        Ok(())
    }
}

/// Parses a body, turning serde's message into a 400 that names the field at fault: the
/// unknown or missing one serde names, else (flattened fields lose their names in serde's
/// message) the top-level key without which the body would parse.
///
/// # Errors
/// Malformed JSON, a wrong type or an unknown field.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let named = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.contains("field"))
            .map(str::to_owned);
        let param = named
            .or_else(|| culprit::<T>(body))
            .unwrap_or_else(|| "body".to_owned());
        let message = if param == "body" {
            format!("malformed request body: {msg}")
        } else {
            format!("malformed request body: {param}: {msg}")
        };
        ApiError::bad(param, message)
    })
}

/// The top-level key of a JSON object body whose value alone makes it fail to parse: the body
/// without it parses, or fails only because that key is missing.
fn culprit<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let without = |k: &String| {
        let mut rest = map.clone();
        rest.remove(k);
        serde_json::from_value::<T>(Value::Object(rest))
    };
    // A key without which the body parses; else a required key whose value is wrong (the
    // body then fails only for its absence).
    map.keys()
        .find(|k| without(k).is_ok())
        .cloned()
        .or_else(|| {
            map.keys()
                .find(|k| {
                    without(k)
                        .err()
                        .is_some_and(|e| e.to_string().contains(&format!("missing field `{k}`")))
                })
                .cloned()
        })
}

fn float(v: Option<f64>, default: f32) -> f32 {
    v.map_or(default, |x| x as f32)
}

/// Builds sampling parameters; `max_tokens` is resolved by the caller (it depends on the prompt).
///
/// # Errors
/// A value out of range or an unsupported option, naming the parameter.
pub fn sampling(
    c: &CommonParams,
    max_tokens: u32,
    logprobs: Option<i64>,
) -> Result<SamplingParams, ApiError> {
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::bad(
            "n",
            format!("n = {n}: only n = 1 is supported"),
        ));
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
    }
    let top_k = match c.top_k {
        None => -1,
        Some(k) => i32::try_from(k).map_err(|_| {
            ApiError::bad(
                "top_k",
                format!("top_k = {k}: allowed -1, 0 or an integer ≥ 1"),
            )
        })?,
    };
    let logprobs = match logprobs {
        None => None,
        Some(n) => Some(
            u32::try_from(n)
                .map_err(|_| ApiError::bad("logprobs", format!("{n}: allowed 0 to 20")))?,
        ),
    };
    let p = SamplingParams {
        temperature: float(c.temperature, 1.0),
        top_p: float(c.top_p, 1.0),
        top_k,
        min_p: float(c.min_p, 0.0),
        max_tokens,
        stop: match &c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        seed: c.seed,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        presence_penalty: float(c.presence_penalty, 0.0),
        frequency_penalty: float(c.frequency_penalty, 0.0),
        repetition_penalty: float(c.repetition_penalty, 1.0),
        logprobs,
    };
    p.validate().map_err(|e| {
        let param = match &e {
            vajra_core::CoreError::InvalidField { field, .. } => field.clone(),
            _ => "body".into(),
        };
        ApiError::bad(param, e.to_string())
    })?;
    Ok(p)
}

/// Resolves `max_tokens`: the value given (≥ 1), else `default` (completions: 16, OpenAI's
/// default; chat: what is left of the context, as vLLM does).
///
/// # Errors
/// A value below 1 or a prompt that leaves no room in the context.
pub fn max_tokens(
    given: Option<i64>,
    field: &str,
    prompt_len: usize,
    max_model_len: u32,
    chat: bool,
) -> Result<u32, ApiError> {
    let room = i64::from(max_model_len) - prompt_len as i64;
    if room < 1 {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "the prompt has {prompt_len} tokens; this model's context (max_model_len) is {max_model_len} tokens, so at most {} prompt tokens leave room for output",
                max_model_len.saturating_sub(1)
            ),
        ));
    }
    match given {
        Some(n) if n < 1 => Err(ApiError::bad(
            field,
            format!("{field} = {n}: allowed an integer ≥ 1"),
        )),
        Some(n) if n > room => Err(ApiError::bad(
            field,
            format!(
                "{field} = {n} with a {prompt_len}-token prompt exceeds the context of {max_model_len} tokens (at most {room})"
            ),
        )),
        Some(n) => Ok(n as u32),
        None if chat => Ok(room as u32),
        None => Ok(DEFAULT_MAX_TOKENS.min(room as u32)),
    }
}
