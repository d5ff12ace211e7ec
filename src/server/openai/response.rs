//! OpenAI's response objects and stream chunks from engine results.

use serde_json::{json, Map, Value};

use super::tools::Piece;
use super::{pb, Endpoint};
use crate::engine::TokenLogprob;

/// OpenAI's finish reasons: ours ending on a stop token or string are
/// `stop` (`tool_calls` when the answer `called` a tool); on the token
/// limit or the context, `length`.
pub fn finish_reason(ours: &str, called: bool) -> &'static str {
    match ours {
        "length" | "context" => "length",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// The ids and objects a response is made of.
pub struct Answer<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

impl Answer<'_> {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    pub fn id(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", self.id),
            Endpoint::Completions => format!("cmpl-{}", self.id),
        }
    }

    /// A tool call's id: unique to the request and the call.
    fn call_id(&self, index: usize) -> String {
        format!("call_{}_{index}", self.id)
    }

    /// One choice of a whole response or chunk: `text` as a message,
    /// delta or text, with its log-probabilities; `finish` is OpenAI's.
    fn choice(&self, chunk: bool, text: Value, logprobs: Value, finish: Option<&str>) -> Value {
        let mut choice = Map::new();
        choice.insert("index".into(), json!(0));
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => {
                choice.insert(
                    "message".into(),
                    json!({"role": "assistant", "content": text}),
                );
            }
            (Endpoint::Chat, true) => {
                let delta = if text.is_null() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                choice.insert("delta".into(), delta);
            }
            (Endpoint::Completions, _) => {
                let text = if text.is_null() { json!("") } else { text };
                choice.insert("text".into(), text);
            }
        }
        choice.insert("logprobs".into(), logprobs);
        choice.insert("finish_reason".into(), json!(finish));
        Value::Object(choice)
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut out = json!({
            "id": self.id(),
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            out["usage"] = usage;
        }
        out
    }

    /// The whole (non-streamed) response; `calls` are its tool calls
    /// (function name and arguments), and a chat answer that made some
    /// has no content unless it wrote text too.
    pub fn response(
        &self,
        text: &str,
        calls: &[(String, String)],
        logprobs: Option<Value>,
        finish: &str,
        usage: Value,
    ) -> Value {
        let called = !calls.is_empty();
        let content = if called && text.is_empty() {
            Value::Null
        } else {
            json!(text)
        };
        let finish = finish_reason(finish, called);
        let mut choice = self.choice(
            false,
            content,
            logprobs.unwrap_or(Value::Null),
            Some(finish),
        );
        if called {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, (name, arguments))| {
                    json!({"id": self.call_id(i), "type": "function",
                           "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            choice["message"]["tool_calls"] = Value::Array(calls);
        }
        self.envelope(false, vec![choice], Some(usage))
    }

    /// A streamed chunk of a chat answer that may call tools: its content,
    /// or a call's first delta (id and name), or more of its arguments.
    pub fn piece_chunk(
        &self,
        piece: &Piece,
        logprobs: Option<Value>,
        usage: Option<Value>,
    ) -> Value {
        let call = match piece {
            Piece::Content(text) => return self.chunk(Some(text), logprobs, None, usage),
            Piece::Call { index, name } => json!({
                "index": index, "id": self.call_id(*index), "type": "function",
                "function": {"name": name, "arguments": ""},
            }),
            Piece::Arguments { index, text } => {
                json!({"index": index, "function": {"arguments": text}})
            }
        };
        let mut chunk = self.chunk(None, logprobs, None, usage);
        chunk["choices"][0]["delta"] = json!({ "tool_calls": [call] });
        chunk
    }

    /// A streamed chunk: `text` (null: none), and `finish` (OpenAI's) on
    /// the last.
    /// `usage` is `Some(null)` on every chunk when the client asked for a
    /// usage chunk, as OpenAI does.
    pub fn chunk(
        &self,
        text: Option<&str>,
        logprobs: Option<Value>,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Value {
        let choice = self.choice(
            true,
            text.map_or(Value::Null, |t| json!(t)),
            logprobs.unwrap_or(Value::Null),
            finish,
        );
        self.envelope(true, vec![choice], usage)
    }

    /// The first chat chunk, which says who speaks.
    pub fn role_chunk(&self, usage: Option<Value>) -> Value {
        let choice = json!({
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        });
        self.envelope(true, vec![choice], usage)
    }

    /// The usage chunk after the last (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Value) -> Value {
        self.envelope(true, Vec::new(), Some(usage))
    }

    /// Log-probabilities in this endpoint's shape; `offset` is the byte
    /// offset of the first token in the completion text (completions
    /// report one per token). `piece` gives a token's bytes.
    pub fn logprobs(
        &self,
        tokens: &[TokenLogprob],
        offset: &mut usize,
        piece: &dyn Fn(u32) -> Vec<u8>,
    ) -> Value {
        let text = |t: u32| String::from_utf8_lossy(&piece(t)).into_owned();
        match self.endpoint {
            Endpoint::Chat => {
                let entry = |t: u32, logprob: f32| {
                    let bytes = piece(t);
                    json!({
                        "token": String::from_utf8_lossy(&bytes),
                        "logprob": logprob,
                        "bytes": bytes,
                    })
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|lp| {
                        let mut e = entry(lp.token, lp.logprob);
                        e["top_logprobs"] =
                            Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Endpoint::Completions => {
                let mut offsets = Vec::with_capacity(tokens.len());
                for lp in tokens {
                    offsets.push(*offset);
                    *offset += piece(lp.token).len();
                }
                json!({
                    "tokens": tokens.iter().map(|lp| text(lp.token)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens
                        .iter()
                        .map(|lp| {
                            // Two tokens may read the same; the likelier stays.
                            let mut top = Map::new();
                            for &(t, l) in lp.top.iter().rev() {
                                top.insert(text(t), json!(l));
                            }
                            Value::Object(top)
                        })
                        .collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }
}

/// `usage` of a response.
pub fn usage(usage: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens as u64 + usage.completion_tokens as u64,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

/// Merges the `logprobs` of two stretches of one answer (same endpoint).
pub fn append_logprobs(into: &mut Option<Value>, more: Value) {
    let Some(into) = into else {
        *into = Some(more);
        return;
    };
    if let (Value::Object(a), Value::Object(b)) = (into, more) {
        for (key, list) in b {
            if let (Some(Value::Array(a)), Value::Array(b)) = (a.get_mut(&key), list) {
                a.extend(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_take_each_endpoints_shape() {
        let tokens = [
            TokenLogprob {
                token: 1,
                logprob: -0.5,
                top: vec![(1, -0.5), (2, -1.5)],
            },
            TokenLogprob {
                token: 2,
                logprob: -1.0,
                top: vec![(2, -1.0), (1, -2.0)],
            },
        ];
        let piece = |t: u32| {
            if t == 1 {
                b"ab".to_vec()
            } else {
                b"c".to_vec()
            }
        };
        let answer = |endpoint| Answer {
            endpoint,
            id: "x",
            created: 0,
            model: "m",
        };
        let mut offset = 3;
        let c = answer(Endpoint::Completions).logprobs(&tokens, &mut offset, &piece);
        assert_eq!(c["tokens"], json!(["ab", "c"]));
        assert_eq!(c["text_offset"], json!([3, 5]));
        assert_eq!(c["top_logprobs"][1]["ab"], json!(-2.0));
        assert_eq!(offset, 6);
        let c = answer(Endpoint::Chat).logprobs(&tokens, &mut offset, &piece);
        assert_eq!(c["content"][0]["bytes"], json!([97, 98]));
        assert_eq!(c["content"][1]["top_logprobs"][1]["token"], json!("ab"));
        let mut all = None;
        append_logprobs(&mut all, c.clone());
        append_logprobs(&mut all, c);
        assert_eq!(all.unwrap()["content"].as_array().unwrap().len(), 4);
    }
}
