//! The OpenAI API's JSON, without I/O: a chat or completion request body
//! becomes the same `GenerateRequest` the gRPC API takes (so the
//! validation layer checks both alike), and engine results become OpenAI's
//! response objects and stream chunks. `http.rs` does the transport.
//!
//! What a request may say: every field OpenAI defines is either honoured,
//! accepted because its value asks nothing of us (`n: 1`, `user`, zero
//! penalties, `stream: false`, `null` anywhere), or refused with a 400 that
//! names it; a field we do not know is refused unless it is `null`. Never
//! silently ignored. Extensions: `top_k`, `min_p`, `repetition_penalty`
//! (as vLLM names them) and `svfit.mix`.

use serde_json::{json, Map, Value};
use tonic::Status;

use super::pb;
use crate::engine::TokenLogprob;
use crate::sampling::MAX_TOP_LOGPROBS;

/// The two generation endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

/// A parsed request: what the validation layer checks, and how to answer.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The `model` as the client wrote it (echoed in responses).
    pub model: String,
    pub body: pb::GenerateRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// Alternatives per token, when log-probabilities are asked for.
    pub logprobs: Option<usize>,
}

/// A 400 about `param`.
pub fn invalid(param: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{param}: {message}"))
}

fn unsupported(param: &str, what: &str) -> Status {
    invalid(param, format!("{what} is not supported by this server"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expected(param: &str, what: &str, v: &Value) -> Status {
    invalid(param, format!("expected {what}, got {}", kind(v)))
}

fn string(param: &str, v: &Value) -> Result<String, Status> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| expected(param, "a string", v))
}

fn number(param: &str, v: &Value) -> Result<f32, Status> {
    let n = v.as_f64().ok_or_else(|| expected(param, "a number", v))?;
    // Out-of-range values become infinite and fail validation by name.
    Ok(n as f32)
}

fn integer(param: &str, v: &Value, min: i64, max: i64) -> Result<i64, Status> {
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ if v.is_number() => Err(invalid(
            param,
            format!("{v} is not an integer in [{min}, {max}]"),
        )),
        _ => Err(expected(param, "an integer", v)),
    }
}

/// The fields of object `v` that are not `null` (a `null` asks nothing).
fn fields<'a>(
    param: &str,
    v: &'a Value,
) -> Result<impl Iterator<Item = (&'a str, &'a Value)>, Status> {
    let Value::Object(map) = v else {
        return Err(expected(param, "an object", v));
    };
    Ok(map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.as_str(), v)))
}

/// A field this server does not know.
fn unknown(param: &str) -> Status {
    invalid(param, "unknown field (not supported by this server)")
}

fn boolean(param: &str, v: &Value) -> Result<bool, Status> {
    v.as_bool().ok_or_else(|| expected(param, "a boolean", v))
}

/// Refuses `v` unless it is one of the values that ask nothing of us.
fn only_default(param: &str, v: &Value, harmless: &[Value]) -> Result<(), Status> {
    if harmless.contains(v) {
        return Ok(());
    }
    Err(invalid(
        param,
        format!(
            "{} is not supported by this server (accepted: {})",
            shown_json(v),
            harmless
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// A JSON value for an error message, cut to a readable length.
fn shown_json(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// Parses a request body for `endpoint`. `base_model` is the name that
/// selects the base model; any other `model` names an adapter.
pub fn parse(endpoint: Endpoint, bytes: &[u8], base_model: &str) -> Result<Parsed, Status> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(Status::invalid_argument(format!(
            "the body must be a JSON object, got {}",
            kind(&value)
        )));
    };
    let mut body = pb::GenerateRequest::default();
    let mut sampling = pb::Sampling {
        // OpenAI's defaults, not `svfit generate`'s: temperature 1 and
        // nothing cut from the distribution.
        temperature: Some(1.0),
        top_p: Some(1.0),
        top_k: Some(0),
        min_p: Some(0.0),
        repeat_penalty: Some(1.0),
        ..Default::default()
    };
    let mut model = None;
    let mut stream = false;
    let mut stream_options = None;
    let mut logprobs = None;
    let mut top_logprobs = None;
    let mut max_tokens = None;
    let mut mix = None;
    for (key, v) in &fields {
        let key = key.as_str();
        if v.is_null() {
            continue;
        }
        match (endpoint, key) {
            (_, "model") => model = Some(string(key, v)?),
            (Endpoint::Chat, "messages") => body.input = Some(messages(v)?),
            (Endpoint::Completions, "prompt") => body.input = Some(prompt(v)?),
            (Endpoint::Chat, "max_completion_tokens") | (_, "max_tokens") => {
                let n = integer(key, v, 1, u32::MAX as i64)? as u32;
                if max_tokens.is_some_and(|m| m != n) {
                    return Err(invalid(
                        key,
                        "max_tokens and max_completion_tokens differ; set one",
                    ));
                }
                max_tokens = Some(n);
            }
            (_, "temperature") => sampling.temperature = Some(number(key, v)?),
            (_, "top_p") => sampling.top_p = Some(number(key, v)?),
            (_, "top_k") => {
                // vLLM's -1 and 0 both mean no limit.
                let k = integer(key, v, -1, u32::MAX as i64)?;
                sampling.top_k = Some(k.max(0) as u32);
            }
            (_, "min_p") => sampling.min_p = Some(number(key, v)?),
            (_, "repetition_penalty") => sampling.repeat_penalty = Some(number(key, v)?),
            (_, "seed") => sampling.seed = Some(integer(key, v, i64::MIN, i64::MAX)? as u64),
            (_, "stop") => body.stop = stop(v)?,
            (_, "n") => only_default(key, v, &[json!(1)])?,
            (Endpoint::Completions, "best_of") => only_default(key, v, &[json!(1)])?,
            (_, "stream") => stream = boolean(key, v)?,
            (_, "stream_options") => stream_options = Some(v),
            (Endpoint::Chat, "logprobs") => {
                if boolean(key, v)? {
                    logprobs = Some(logprobs.unwrap_or(0));
                }
            }
            (Endpoint::Chat, "top_logprobs") => {
                top_logprobs = Some(integer(key, v, 0, MAX_TOP_LOGPROBS as i64)? as usize)
            }
            (Endpoint::Completions, "logprobs") => {
                logprobs = Some(integer(key, v, 0, MAX_TOP_LOGPROBS as i64)? as usize)
            }
            (Endpoint::Completions, "echo") => only_default(key, v, &[json!(false)])?,
            (Endpoint::Completions, "suffix") => only_default(key, v, &[json!("")])?,
            (_, "frequency_penalty" | "presence_penalty") => {
                // OpenAI's penalties subtract from logits; our repetition
                // penalty divides them (`repetition_penalty`): not the same.
                if number(key, v)? != 0.0 {
                    return Err(invalid(
                        key,
                        "only 0 is supported (OpenAI's additive penalties are not implemented; \
                         repetition_penalty is the multiplicative one)",
                    ));
                }
            }
            (_, "logit_bias") => only_default(key, v, &[json!({})])?,
            (_, "user") => {
                string(key, v)?;
            }
            (Endpoint::Chat, "tools" | "functions") => only_default(key, v, &[json!([])])?,
            (Endpoint::Chat, "tool_choice" | "function_call") => {
                only_default(key, v, &[json!("none"), json!("auto")])?
            }
            // Without tools there are no calls to run in parallel.
            (Endpoint::Chat, "parallel_tool_calls") => {
                boolean(key, v)?;
            }
            (Endpoint::Chat, "response_format") => {
                only_default(key, v, &[json!({"type": "text"})])?
            }
            (Endpoint::Chat, "modalities") => only_default(key, v, &[json!(["text"])])?,
            (Endpoint::Chat, "store") => only_default(key, v, &[json!(false)])?,
            // Tags of stored completions; nothing is stored.
            (Endpoint::Chat, "metadata") => {
                if !v.is_object() {
                    return Err(expected(key, "an object", v));
                }
            }
            (_, "service_tier") => only_default(key, v, &[json!("auto"), json!("default")])?,
            (_, "svfit") => mix = Some(extension(v)?),
            _ => return Err(unknown(key)),
        }
    }
    let model = model.ok_or_else(|| invalid("model", "required"))?;
    if body.input.is_none() {
        let field = match endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        };
        return Err(invalid(field, "required"));
    }
    let include_usage = match stream_options {
        None => false,
        Some(_) if !stream => {
            return Err(invalid(
                "stream_options",
                "only allowed when stream is true",
            ))
        }
        Some(v) => stream_options_usage(v)?,
    };
    if let Some(top) = top_logprobs {
        if logprobs.is_none() {
            return Err(invalid("top_logprobs", "requires logprobs: true"));
        }
        logprobs = Some(top);
    }
    match mix {
        Some(_) if model != base_model => {
            return Err(invalid(
                "svfit.mix",
                format!("a mix runs on the base model: set model to '{base_model}'"),
            ))
        }
        Some(parts) => body.mix = parts,
        None if model == base_model => {}
        None => body.adapter = model.clone(),
    }
    body.max_tokens = max_tokens.unwrap_or(0);
    body.sampling = Some(sampling);
    Ok(Parsed {
        model,
        body,
        stream,
        include_usage,
        logprobs,
    })
}

fn stream_options_usage(v: &Value) -> Result<bool, Status> {
    let mut usage = false;
    for (key, v) in fields("stream_options", v)? {
        match key {
            "include_usage" => usage = boolean("stream_options.include_usage", v)?,
            other => return Err(unknown(&format!("stream_options.{other}"))),
        }
    }
    Ok(usage)
}

/// `messages`: roles system, developer (as system), user and assistant;
/// content a string or text parts.
fn messages(v: &Value) -> Result<pb::generate_request::Input, Status> {
    let Value::Array(list) = v else {
        return Err(expected("messages", "an array", v));
    };
    let mut messages = Vec::with_capacity(list.len().min(1024));
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let mut role = None;
        let mut content = String::new();
        for (key, v) in fields(&param, m)? {
            let field = format!("{param}.{key}");
            match key {
                "role" => role = Some(string(&field, v)?),
                "content" => content = message_content(&field, v)?,
                "tool_calls" => only_default(&field, v, &[json!([])])?,
                "refusal" => {}
                "name" | "tool_call_id" | "function_call" | "audio" => {
                    return Err(unsupported(&field, "this message field"))
                }
                _ => return Err(unknown(&field)),
            }
        }
        let role = match role.as_deref() {
            Some("developer") => "system".to_string(),
            Some(r @ ("system" | "user" | "assistant")) => r.to_string(),
            Some(other) => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!(
                        "'{}' is not supported (system, developer, user or assistant)",
                        crate::store::shown(other)
                    ),
                ))
            }
            None => return Err(invalid(&format!("{param}.role"), "required")),
        };
        messages.push(pb::ChatMessage { role, content });
    }
    Ok(pb::generate_request::Input::Chat(pb::Chat { messages }))
}

/// A message's content: a string, or an array of text parts (joined).
fn message_content(param: &str, v: &Value) -> Result<String, Status> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                let param = format!("{param}[{i}]");
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => return Err(invalid(&param, "a text part needs text")),
                    (Some(other), _) => {
                        return Err(unsupported(
                            &param,
                            &format!("content of type '{}'", crate::store::shown(other)),
                        ))
                    }
                    (None, _) => return Err(invalid(&param, "expected a part with a type")),
                }
            }
            Ok(text)
        }
        other => Err(expected(param, "a string or an array of parts", other)),
    }
}

/// `prompt`: a string, or an array holding one string.
fn prompt(v: &Value) -> Result<pb::generate_request::Input, Status> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => return Err(invalid("prompt", "empty")),
            [Value::Number(_), ..] => return Err(unsupported("prompt", "a prompt of token ids")),
            [_] => return Err(expected("prompt", "a string", &items[0])),
            _ => return Err(unsupported("prompt", "more than one prompt per request")),
        },
        other => return Err(expected("prompt", "a string", other)),
    };
    Ok(pb::generate_request::Input::Prompt(text))
}

/// `stop`: a string or an array of strings (the limits are the
/// validation layer's).
fn stop(v: &Value) -> Result<Vec<String>, Status> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => {
            // Bounded before copying; the validation layer names the limit.
            if items.len() > 1024 {
                return Err(invalid("stop", format!("{} strings", items.len())));
            }
            items.iter().map(|s| string("stop", s)).collect()
        }
        other => Err(expected("stop", "a string or an array of strings", other)),
    }
}

/// The `svfit` extension object: `{"mix": [{"adapter": ID, "weight": W}, ...]}`.
fn extension(v: &Value) -> Result<Vec<pb::MixPart>, Status> {
    let mut parts = None;
    for (key, v) in fields("svfit", v)? {
        match key {
            "mix" => {
                let Value::Array(list) = v else {
                    return Err(expected("svfit.mix", "an array", v));
                };
                if list.len() > 1024 {
                    return Err(invalid("svfit.mix", format!("{} parts", list.len())));
                }
                let mut mix = Vec::with_capacity(list.len());
                for (i, part) in list.iter().enumerate() {
                    let param = format!("svfit.mix[{i}]");
                    let adapter = part
                        .get("adapter")
                        .ok_or_else(|| invalid(&param, "needs adapter"))?;
                    let weight = part
                        .get("weight")
                        .ok_or_else(|| invalid(&param, "needs weight"))?;
                    if part.as_object().is_some_and(|o| o.len() > 2) {
                        return Err(invalid(&param, "only adapter and weight"));
                    }
                    mix.push(pb::MixPart {
                        adapter: string(&format!("{param}.adapter"), adapter)?,
                        weight: number(&format!("{param}.weight"), weight)?,
                    });
                }
                parts = Some(mix);
            }
            other => return Err(unknown(&format!("svfit.{other}"))),
        }
    }
    let parts = parts.ok_or_else(|| invalid("svfit", "expected mix"))?;
    if parts.is_empty() {
        return Err(invalid("svfit.mix", "empty"));
    }
    Ok(parts)
}

/// OpenAI's finish reasons: ours ending on a stop token or string are
/// `stop`; on the token limit or the context, `length`.
pub fn finish_reason(ours: &str) -> &'static str {
    match ours {
        "length" | "context" => "length",
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

    /// One choice of a whole response or chunk: `text` as a message,
    /// delta or text, with its log-probabilities.
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
        choice.insert("finish_reason".into(), json!(finish.map(finish_reason)));
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

    /// The whole (non-streamed) response.
    pub fn response(
        &self,
        text: &str,
        logprobs: Option<Value>,
        finish: &str,
        usage: Value,
    ) -> Value {
        let choice = self.choice(
            false,
            json!(text),
            logprobs.unwrap_or(Value::Null),
            Some(finish),
        );
        self.envelope(false, vec![choice], Some(usage))
    }

    /// A streamed chunk: `text` (null: none), and `finish` on the last.
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

    const BASE: &str = "base.gguf";

    fn chat(body: Value) -> Result<Parsed, Status> {
        parse(Endpoint::Chat, body.to_string().as_bytes(), BASE)
    }

    fn completion(body: Value) -> Result<Parsed, Status> {
        parse(Endpoint::Completions, body.to_string().as_bytes(), BASE)
    }

    fn refused_naming(result: Result<Parsed, Status>, param: &str) {
        let status = result.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with(param),
            "{param}: {}",
            status.message()
        );
    }

    #[test]
    fn what_common_clients_send_is_accepted() {
        let p = chat(json!({
            "model": "alice-support",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "n": 1, "user": "u1", "stream": false, "frequency_penalty": 0,
            "presence_penalty": 0.0, "logit_bias": {}, "tools": null,
            "max_completion_tokens": 7, "temperature": 0, "seed": -3,
            "stop": "END", "logprobs": true, "top_logprobs": 2,
        }))
        .unwrap();
        assert_eq!(p.body.adapter, "alice-support");
        assert_eq!(p.body.max_tokens, 7);
        assert_eq!(p.body.stop, vec!["END"]);
        assert_eq!(p.logprobs, Some(2));
        let s = p.body.sampling.unwrap();
        assert_eq!(s.temperature, Some(0.0));
        assert_eq!(s.seed, Some(-3i64 as u64));
        let Some(pb::generate_request::Input::Chat(c)) = p.body.input else {
            panic!("chat");
        };
        assert_eq!(c.messages[0].role, "system");
        assert_eq!(c.messages[1].content, "Hi");

        let p = completion(json!({"model": BASE, "prompt": ["Once"], "logprobs": 0})).unwrap();
        assert_eq!(p.body.adapter, "");
        assert_eq!(p.logprobs, Some(0));
        assert_eq!(p.body.sampling.unwrap().temperature, Some(1.0));
    }

    #[test]
    fn what_asks_for_behaviour_we_lack_is_refused_by_name() {
        let m = json!([{"role": "user", "content": "x"}]);
        let cases = [
            (json!({"model": "a", "messages": m, "n": 2}), "n"),
            (
                json!({"model": "a", "messages": m, "frequency_penalty": 0.5}),
                "frequency_penalty",
            ),
            (
                json!({"model": "a", "messages": m, "logit_bias": {"1": 5}}),
                "logit_bias",
            ),
            (
                json!({"model": "a", "messages": m, "tools": [{"type": "function"}]}),
                "tools",
            ),
            (
                json!({"model": "a", "messages": m, "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"model": "a", "messages": m, "reasoning_effort": "low"}),
                "reasoning_effort",
            ),
            (
                json!({"model": "a", "messages": m, "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                json!({"model": "a", "messages": m, "top_logprobs": 21, "logprobs": true}),
                "top_logprobs",
            ),
            (
                json!({"model": "a", "messages": m, "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"model": "a", "messages": m, "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "a", "messages": m, "max_tokens": 4, "max_completion_tokens": 5}),
                "max_",
            ),
            (
                json!({"model": "a", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"model": "a", "messages": m, "svfit": {"mix": [{"adapter": "x", "weight": 1}]}}),
                "svfit.mix",
            ),
            (json!({"messages": m}), "model"),
            (json!({"model": "a"}), "messages"),
            (json!({"model": "a", "messages": m, "seed": 1.5}), "seed"),
            (json!({"model": "a", "messages": "hi"}), "messages"),
        ];
        for (body, param) in cases {
            refused_naming(chat(body), param);
        }
        refused_naming(
            completion(json!({"model": "a", "prompt": [1, 2]})),
            "prompt",
        );
        refused_naming(
            completion(json!({"model": "a", "prompt": ["a", "b"]})),
            "prompt",
        );
        refused_naming(
            completion(json!({"model": "a", "prompt": "x", "echo": true})),
            "echo",
        );
        refused_naming(
            completion(json!({"model": "a", "prompt": "x", "logprobs": true})),
            "logprobs",
        );
        refused_naming(
            completion(json!({"model": "a", "prompt": "x", "messages": []})),
            "messages",
        );
        let status = parse(Endpoint::Chat, b"[1]", BASE).unwrap_err();
        assert!(
            status.message().contains("JSON object"),
            "{}",
            status.message()
        );
        assert!(parse(Endpoint::Chat, b"{", BASE).is_err());
    }

    #[test]
    fn a_mix_runs_on_the_base_model_name() {
        let p = completion(json!({
            "model": BASE, "prompt": "x",
            "svfit": {"mix": [{"adapter": "a", "weight": 0.7}, {"adapter": "b", "weight": 0.3}]},
        }))
        .unwrap();
        assert_eq!(p.body.adapter, "");
        assert_eq!(p.body.mix.len(), 2);
        assert_eq!(p.body.mix[1].adapter, "b");
    }

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
