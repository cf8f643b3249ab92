//! Text in and out: the Hugging Face tokenizer (`tokenizer.json`), the chat template
//! (`tokenizer_config.json` or `chat_template.jinja`, rendered with minijinja), end-of-sequence
//! tokens (`generation_config.json`, `config.json`, `tokenizer_config.json`), and an
//! incremental detokenizer that never emits half a UTF-8 character.

use crate::error::{EngineError, Result};
use crate::spec::token_ids;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer and chat template.
pub struct TextCodec {
    tok: tokenizers::Tokenizer,
    /// The chat template, compiled once at load (an error kept for the first chat request, so a
    /// broken template does not stop plain completions).
    chat: std::result::Result<minijinja::Environment<'static>, String>,
    bos_token: String,
    eos_token: String,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("eos_ids", &self.eos_ids)
            .field("has_chat_template", &self.chat.is_ok())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| EngineError::model_file(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::model_file(path, e)),
    }
}

/// A special token given as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextCodec {
    /// Loads the tokenizer files of the model folder `dir`; `config_eos` are the end tokens
    /// `config.json` names.
    ///
    /// # Errors
    /// `tokenizer.json` missing or unreadable, or a malformed JSON side file.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path,
                what: "the Hugging Face tokenizer".into(),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::model_file(&path, e))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let mut chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(
                std::fs::read_to_string(&jinja).map_err(|e| EngineError::model_file(&jinja, e))?,
            );
        }
        let bos_token = token_text(tc.get("bos_token")).unwrap_or_default();
        let eos_token = token_text(tc.get("eos_token")).unwrap_or_default();
        let gen_path = dir.join("generation_config.json");
        let generation = read_json(&gen_path)?;
        let mut eos_ids = match &generation {
            Some(g) => token_ids(
                g.get("eos_token_id"),
                "generation_config.json: eos_token_id",
            )?,
            None => Vec::new(),
        };
        eos_ids.extend_from_slice(config_eos);
        if let Some(id) = tok.token_to_id(&eos_token) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(TextCodec {
            tok,
            chat: compile_chat_template(chat_template),
            bos_token,
            eos_token,
            eos_ids,
        })
    }

    /// Token ids that end generation (unless a request sets `ignore_eos`).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Encodes text; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    ///
    /// # Errors
    /// A tokenizer failure.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tok
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Decodes ids, skipping special tokens.
    ///
    /// # Errors
    /// A tokenizer failure.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Renders a conversation with the model's chat template (`add_generation_prompt` set).
    ///
    /// # Errors
    /// The model has no chat template, or the template fails (e.g. `raise_exception`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_chat(messages, true)
    }

    /// Renders a conversation with the model's chat template; `add_generation_prompt` appends
    /// what opens the assistant's answer.
    ///
    /// # Errors
    /// As [`Self::apply_chat_template`].
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self
            .chat
            .as_ref()
            .map_err(|e| EngineError::Template(e.clone()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

/// A minijinja environment holding the chat template as `chat`, with the Python string methods
/// and the `raise_exception` function Hugging Face templates use.
fn compile_chat_template(
    src: Option<String>,
) -> std::result::Result<minijinja::Environment<'static>, String> {
    let src = src.ok_or("the model folder has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)")?;
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", src)
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// Turns a growing list of token ids into text deltas, holding back bytes that do not yet form
/// whole characters (the tokenizer renders those as U+FFFD).
///
/// Decodes a short window (`prefix..`) rather than the whole output each time, starting a few
/// prompt tokens back so that tokenizers that drop a leading space decode the first output token
/// as they would in context.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    prefix: usize,
    read: usize,
}

/// Prompt tokens decoded before the first output token, for context.
const CONTEXT_TOKENS: usize = 5;

impl IncrementalDetokenizer {
    /// Starts after a prompt of `prompt_len` tokens.
    pub fn new(prompt_len: usize) -> Self {
        IncrementalDetokenizer {
            prefix: prompt_len.saturating_sub(CONTEXT_TOKENS),
            read: prompt_len,
        }
    }

    /// The new text once `tokens` (prompt and output) gained tokens since the last call; empty
    /// while the last tokens are an incomplete character.
    ///
    /// # Errors
    /// A tokenizer failure.
    pub fn step(&mut self, codec: &TextCodec, tokens: &[u32]) -> Result<String> {
        let before = codec.decode(&tokens[self.prefix..self.read])?;
        let now = codec.decode(&tokens[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && let Some(delta) = now.get(before.len()..)
        {
            self.prefix = self.read;
            self.read = tokens.len();
            return Ok(delta.to_owned());
        }
        Ok(String::new())
    }
}
