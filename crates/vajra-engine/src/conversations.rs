//! `vajra-engine conversations`: token counts of real multi-turn conversations, for the
//! simulator's sessions (`workload.arrival.conversations`).
//!
//! Input: ShareGPT-style JSON, an array of `{"id": .., "conversations": [{"from": "human",
//! "value": ".."}, {"from": "gpt", "value": ".."}, ...]}` (`messages` with `role`/`content`,
//! OpenAI's spelling, is read too), or JSONL with one such object a line. The array is read
//! element by element, so a ShareGPT dump of hundreds of megabytes never sits in memory whole.
//!
//! Each conversation becomes its turns as a chat client replays them: turn k's prompt is the
//! model's chat template over every message up to user message k (with the generation prompt),
//! its answer is what assistant message k adds to that rendering. So a turn's new tokens hold
//! the template's role markers too, and `new + answer` summed over the turns is the
//! conversation's length as the server sees it. Counts come from the model's own tokenizer;
//! when a rendering extends the previous one (true of the usual templates), only the added text
//! is tokenized, so a long conversation costs its length, not its length squared.
//!
//! Roles: `human`/`user` are the user, `gpt`/`assistant`/`chatgpt`/`bard`/`bing`/`model` the
//! assistant, `system` a leading system message (part of the first turn). A conversation is cut
//! where the user/assistant alternation breaks (and a trailing user message without an answer
//! is dropped); one left without a complete turn, or with an unknown role, is skipped and
//! counted by reason.
//!
//! Output: JSONL, `{"id": .., "turns": [[new_tokens, answer_tokens], ...]}` a line.

use crate::error::{EngineError, Result};
use crate::tokenizer::{ChatMessage, TextCodec};
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

/// One message as the input spells it.
#[derive(Deserialize)]
struct RawMessage {
    #[serde(alias = "role")]
    from: String,
    #[serde(alias = "content")]
    value: String,
}

/// One conversation as the input spells it (other fields are ignored).
#[derive(Deserialize)]
struct RawConversation {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(alias = "messages")]
    conversations: Vec<RawMessage>,
}

/// What a conversion wrote and skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Converted {
    /// Conversations written.
    pub conversations: u64,
    /// Turns written.
    pub turns: u64,
    /// New tokens over all turns.
    pub new_tokens: u64,
    /// Answer tokens over all turns.
    pub answer_tokens: u64,
    /// Conversations skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Conversations cut where the user/assistant alternation broke.
    pub cut: u64,
}

/// A conversation's messages as user/assistant pairs (a leading system message goes with the
/// first), or why it has none.
fn pairs(raw: Vec<RawMessage>, cut: &mut bool) -> std::result::Result<Vec<ChatMessage>, String> {
    let mut out: Vec<ChatMessage> = Vec::new();
    for (i, m) in raw.into_iter().enumerate() {
        let role = match m.from.to_ascii_lowercase().as_str() {
            "human" | "user" => "user",
            "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => "assistant",
            "system" if i == 0 => "system",
            other => return Err(format!("role `{other}`")),
        };
        let expected = match out.last().map(|m| m.role.as_str()) {
            None | Some("system" | "assistant") => "user",
            _ => "assistant",
        };
        if role == "system" {
            out.push(ChatMessage {
                role: role.into(),
                content: m.value,
            });
            continue;
        }
        if role == "assistant" && out.is_empty() {
            // ShareGPT dumps often open with the assistant's greeting: not a turn.
            continue;
        }
        if role != expected {
            *cut = true;
            break;
        }
        out.push(ChatMessage {
            role: role.into(),
            content: m.value,
        });
    }
    if out.last().is_some_and(|m| m.role == "user") {
        out.pop();
    }
    if out.iter().any(|m| m.role == "assistant") {
        Ok(out)
    } else {
        Err("no user message followed by an answer".into())
    }
}

/// Tokens of successive renderings, tokenizing only what each adds when it extends the last.
struct Renderer<'a> {
    codec: &'a TextCodec,
    text: String,
    tokens: usize,
}

impl Renderer<'_> {
    fn tokens_of(&mut self, rendered: String) -> Result<usize> {
        self.tokens = match rendered.strip_prefix(self.text.as_str()) {
            Some(added) if !self.text.is_empty() => {
                self.tokens + self.codec.encode(added, false)?.len()
            }
            _ => self.codec.encode(&rendered, false)?.len(),
        };
        self.text = rendered;
        Ok(self.tokens)
    }
}

/// The `(new tokens, answer tokens)` of each turn of `messages` (see [`pairs`]).
fn turns(codec: &TextCodec, messages: &[ChatMessage]) -> Result<Vec<(u64, u64)>> {
    let mut r = Renderer {
        codec,
        text: String::new(),
        tokens: 0,
    };
    let mut out = Vec::new();
    let mut stream = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = r.tokens_of(codec.render_chat(&messages[..i], true)?)?;
        let whole = r.tokens_of(codec.render_chat(&messages[..=i], false)?)?;
        // A template that renders an earlier turn differently once answered (some drop past
        // reasoning) can make these shrink; a turn still adds and answers something.
        out.push((
            prompt.saturating_sub(stream).max(1) as u64,
            whole.saturating_sub(prompt).max(1) as u64,
        ));
        stream = whole;
    }
    Ok(out)
}

/// Feeds every conversation of a JSON array to `f`, one at a time.
struct Each<'f, F>(&'f mut F);

impl<'de, F: FnMut(RawConversation) -> Result<()>> Visitor<'de> for Each<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(c) = seq.next_element::<RawConversation>()? {
            (self.0)(c).map_err(A::Error::custom)?;
        }
        Ok(())
    }
}

impl<'de, F: FnMut(RawConversation) -> Result<()>> DeserializeSeed<'de> for Each<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

/// Converts `input` (ShareGPT-style JSON or JSONL) into a conversation file at `out`, with
/// `codec`'s tokenizer and chat template; stops after `max` conversations written.
///
/// # Errors
/// An unreadable input (with its line and column where it is malformed), a model without a
/// chat template, or an output that cannot be written.
pub fn convert(codec: &TextCodec, input: &Path, out: &Path, max: Option<u64>) -> Result<Converted> {
    let open = std::fs::File::open(input).map_err(|e| EngineError::model_file(input, e))?;
    let file = std::fs::File::create(out).map_err(|e| EngineError::model_file(out, e))?;
    let mut w = BufWriter::new(file);
    let mut done = Converted::default();
    let mut one = |c: RawConversation| -> Result<()> {
        if max.is_some_and(|m| done.conversations >= m) {
            return Ok(());
        }
        let mut cut = false;
        let messages = match pairs(c.conversations, &mut cut) {
            Ok(m) => m,
            Err(why) => {
                *done.skipped.entry(why).or_default() += 1;
                return Ok(());
            }
        };
        let turns = turns(codec, &messages)?;
        done.cut += u64::from(cut);
        done.conversations += 1;
        done.turns += turns.len() as u64;
        done.new_tokens += turns.iter().map(|t| t.0).sum::<u64>();
        done.answer_tokens += turns.iter().map(|t| t.1).sum::<u64>();
        let line = serde_json::json!({"id": c.id, "turns": turns});
        writeln!(w, "{line}").map_err(|e| EngineError::model_file(out, e))
    };
    let jsonl = input.extension().is_some_and(|e| e == "jsonl");
    if jsonl {
        for (i, line) in BufReader::new(open).lines().enumerate() {
            let line = line.map_err(|e| EngineError::model_file(input, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let c: RawConversation = serde_json::from_str(&line).map_err(|e| {
                EngineError::model_file(
                    input,
                    format!("line {}: {e} (expected {{\"conversations\": [{{\"from\": .., \"value\": ..}}, ...]}})", i + 1),
                )
            })?;
            one(c)?;
        }
    } else {
        let mut de = serde_json::Deserializer::from_reader(BufReader::new(open));
        Each(&mut one).deserialize(&mut de).map_err(|e| {
            EngineError::model_file(
                input,
                format!("{e} (expected a JSON array of {{\"conversations\": [{{\"from\": .., \"value\": ..}}, ...]}})"),
            )
        })?;
    }
    w.flush().map_err(|e| EngineError::model_file(out, e))?;
    if done.conversations == 0 {
        return Err(EngineError::model_file(
            input,
            format!(
                "no conversation with a user message followed by an answer (skipped: {:?})",
                done.skipped
            ),
        ));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: &str, value: &str) -> RawMessage {
        RawMessage {
            from: from.into(),
            value: value.into(),
        }
    }

    #[test]
    fn turns_pair_users_with_answers_and_cut_where_the_alternation_breaks() {
        let mut cut = false;
        let m = pairs(
            vec![
                msg("gpt", "Hi! How can I help?"),
                msg("system", "late system"),
            ],
            &mut cut,
        );
        assert!(
            m.is_err(),
            "a system message after the first is an unknown role here"
        );
        let m = pairs(
            vec![
                msg("system", "be brief"),
                msg("human", "a"),
                msg("gpt", "b"),
                msg("human", "c"),
                msg("human", "d"),
                msg("gpt", "e"),
            ],
            &mut cut,
        )
        .unwrap();
        assert!(cut);
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant"],
            "cut at the second user in a row"
        );
        let mut cut = false;
        assert!(pairs(vec![msg("human", "only a question")], &mut cut).is_err());
        assert!(!cut);
    }
}
