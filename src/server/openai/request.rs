//! A chat or completion request body, field by field, into a
//! [`Parsed`]: each field is honoured, accepted as asking nothing, or
//! refused by name.

use serde_json::{json, Map, Value};
use tonic::Status;

use super::tools::{self, Choice, Function, Tools};
use super::values::{
    boolean, expected, fields, integer, kind, number, only_default, string, unknown, unsupported,
};
use super::{invalid, pb, Endpoint, Parsed};
use crate::constraint::json_options;
use crate::sampling::MAX_TOP_LOGPROBS;

/// Parses a request body for `endpoint`. `base_model` is the name that
/// selects the base model; any other `model` names an adapter.
pub fn parse(endpoint: Endpoint, bytes: &[u8], base_model: &str) -> Result<Parsed, Status> {
    let fields = json_object(bytes)?;
    let mut draft = Draft::new(endpoint);
    for (key, v) in &fields {
        if !v.is_null() {
            draft.read(key, v)?;
        }
    }
    draft.finish(base_model)
}

/// The body as a JSON object.
fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, Status> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(fields) => Ok(fields),
        other => Err(Status::invalid_argument(format!(
            "the body must be a JSON object, got {}",
            kind(&other)
        ))),
    }
}

/// What the fields read so far ask; the checks between fields wait for
/// [`Draft::finish`].
struct Draft<'a> {
    endpoint: Endpoint,
    body: pb::GenerateRequest,
    sampling: pb::Sampling,
    model: Option<String>,
    stream: bool,
    stream_options: Option<&'a Value>,
    logprobs: Option<usize>,
    top_logprobs: Option<usize>,
    max_tokens: Option<u32>,
    mix: Option<Vec<pb::MixPart>>,
    functions: Vec<Function>,
    tool_choice: Option<Choice>,
    parallel_tool_calls: bool,
}

impl<'a> Draft<'a> {
    fn new(endpoint: Endpoint) -> Self {
        Draft {
            endpoint,
            body: pb::GenerateRequest::default(),
            sampling: pb::Sampling {
                // OpenAI's defaults, not `svfit generate`'s: temperature 1
                // and nothing cut from the distribution.
                temperature: Some(1.0),
                top_p: Some(1.0),
                top_k: Some(0),
                min_p: Some(0.0),
                repeat_penalty: Some(1.0),
                ..Default::default()
            },
            model: None,
            stream: false,
            stream_options: None,
            logprobs: None,
            top_logprobs: None,
            max_tokens: None,
            mix: None,
            functions: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: true,
        }
    }

    /// Reads field `key` (not `null`) of the body.
    fn read(&mut self, key: &str, v: &'a Value) -> Result<(), Status> {
        if self.read_sampling(key, v)? {
            return Ok(());
        }
        match (self.endpoint, key) {
            (_, "model") => self.model = Some(string(key, v)?),
            (Endpoint::Chat, "messages") => self.body.input = Some(messages(v)?),
            (Endpoint::Completions, "prompt") => self.body.input = Some(prompt(v)?),
            (Endpoint::Chat, "max_completion_tokens") | (_, "max_tokens") => {
                let n = integer(key, v, 1, u32::MAX as i64)? as u32;
                if self.max_tokens.is_some_and(|m| m != n) {
                    return Err(invalid(
                        key,
                        "max_tokens and max_completion_tokens differ; set one",
                    ));
                }
                self.max_tokens = Some(n);
            }
            (_, "stop") => self.body.stop = stop(v)?,
            (_, "stream") => self.stream = boolean(key, v)?,
            (_, "stream_options") => self.stream_options = Some(v),
            (Endpoint::Chat, "logprobs") => {
                if boolean(key, v)? {
                    self.logprobs = Some(self.logprobs.unwrap_or(0));
                }
            }
            (Endpoint::Chat, "top_logprobs") => {
                self.top_logprobs = Some(integer(key, v, 0, MAX_TOP_LOGPROBS as i64)? as usize)
            }
            (Endpoint::Completions, "logprobs") => {
                self.logprobs = Some(integer(key, v, 0, MAX_TOP_LOGPROBS as i64)? as usize)
            }
            (_, "svfit") => self.mix = Some(extension(v)?),
            (_, "response_format") => self.body.constraint = response_format(v)?,
            (Endpoint::Chat, "tools") => self.functions = tools::functions(v)?,
            (Endpoint::Chat, "tool_choice") => self.tool_choice = Some(tools::choice(v)?),
            (Endpoint::Chat, "parallel_tool_calls") => self.parallel_tool_calls = boolean(key, v)?,
            _ => harmless(self.endpoint, key, v)?,
        }
        Ok(())
    }

    /// Reads `key` if it is one of the sampling fields; false if not.
    fn read_sampling(&mut self, key: &str, v: &Value) -> Result<bool, Status> {
        let sampling = &mut self.sampling;
        match key {
            "temperature" => sampling.temperature = Some(number(key, v)?),
            "top_p" => sampling.top_p = Some(number(key, v)?),
            "top_k" => {
                // vLLM's -1 and 0 both mean no limit.
                let k = integer(key, v, -1, u32::MAX as i64)?;
                sampling.top_k = Some(k.max(0) as u32);
            }
            "min_p" => sampling.min_p = Some(number(key, v)?),
            "repetition_penalty" => sampling.repeat_penalty = Some(number(key, v)?),
            "seed" => sampling.seed = Some(integer(key, v, i64::MIN, i64::MAX)? as u64),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The request, once every field is read: what is required, and what
    /// one field allows of another.
    fn finish(mut self, base_model: &str) -> Result<Parsed, Status> {
        let model = self
            .model
            .take()
            .ok_or_else(|| invalid("model", "required"))?;
        if self.body.input.is_none() {
            let field = match self.endpoint {
                Endpoint::Chat => "messages",
                Endpoint::Completions => "prompt",
            };
            return Err(invalid(field, "required"));
        }
        let include_usage = self.include_usage()?;
        let logprobs = self.logprobs()?;
        let tool_calls = self.offer_tools()?;
        match self.mix {
            Some(_) if model != base_model => {
                return Err(invalid(
                    "svfit.mix",
                    format!("a mix runs on the base model: set model to '{base_model}'"),
                ))
            }
            Some(parts) => self.body.mix = parts,
            None if model == base_model => {}
            None => self.body.adapter = model.clone(),
        }
        self.body.max_tokens = self.max_tokens.unwrap_or(0);
        self.body.sampling = Some(self.sampling);
        Ok(Parsed {
            model,
            body: self.body,
            stream: self.stream,
            include_usage,
            logprobs,
            tool_calls,
        })
    }

    /// Describes the tools in the system message and constrains the
    /// answer to calls (or, with `auto`, to calls or text); true when the
    /// answer may hold calls.
    fn offer_tools(&mut self) -> Result<bool, Status> {
        use pb::constraint::Kind;
        let functions = std::mem::take(&mut self.functions);
        let Some(tools) = Tools::new(functions, self.tool_choice.take(), self.parallel_tool_calls)?
        else {
            return Ok(false);
        };
        // A text answer keeps `response_format`'s JSON.
        let text = match self.body.constraint.take().and_then(|c| c.kind) {
            None | Some(Kind::JsonObject(false)) => None,
            Some(Kind::JsonObject(true)) => Some(json_options(json!({"type": "object"}))),
            Some(Kind::JsonSchema(schema)) => {
                let schema = serde_json::from_str(&schema)
                    .map_err(|e| invalid("response_format.json_schema", e))?;
                Some(json_options(schema))
            }
            Some(Kind::Regex(_) | Kind::Lark(_)) => {
                return Err(invalid(
                    "response_format",
                    "regex and lark formats do not combine with tools (json_schema does)",
                ))
            }
        };
        self.body.constraint = Some(pb::Constraint {
            kind: Some(Kind::Lark(tools.grammar(text))),
        });
        if let Some(pb::generate_request::Input::Chat(chat)) = &mut self.body.input {
            let described = tools.system_text();
            match chat.messages.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{described}", first.content)
                }
                _ => chat.messages.insert(
                    0,
                    pb::ChatMessage {
                        role: "system".into(),
                        content: described,
                    },
                ),
            }
        }
        Ok(true)
    }

    /// `stream_options.include_usage`; stream options need a stream.
    fn include_usage(&self) -> Result<bool, Status> {
        match self.stream_options {
            None => Ok(false),
            Some(_) if !self.stream => Err(invalid(
                "stream_options",
                "only allowed when stream is true",
            )),
            Some(v) => stream_options_usage(v),
        }
    }

    /// Alternatives per token; chat's `top_logprobs` needs `logprobs`.
    fn logprobs(&self) -> Result<Option<usize>, Status> {
        match self.top_logprobs {
            Some(_) if self.logprobs.is_none() => {
                Err(invalid("top_logprobs", "requires logprobs: true"))
            }
            Some(top) => Ok(Some(top)),
            None => Ok(self.logprobs),
        }
    }
}

/// The fields that change nothing we do: accepted when their value asks
/// nothing of us (or, for `user` and a few others, any well-typed value),
/// refused by name otherwise; unknown fields are refused.
fn harmless(endpoint: Endpoint, key: &str, v: &Value) -> Result<(), Status> {
    match (endpoint, key) {
        (_, "n") => only_default(key, v, &[json!(1)]),
        (Endpoint::Completions, "best_of") => only_default(key, v, &[json!(1)]),
        (Endpoint::Completions, "echo") => only_default(key, v, &[json!(false)]),
        (Endpoint::Completions, "suffix") => only_default(key, v, &[json!("")]),
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
            Ok(())
        }
        (_, "logit_bias") => only_default(key, v, &[json!({})]),
        (_, "user") => string(key, v).map(drop),
        // The deprecated forms of `tools` and `tool_choice`.
        (Endpoint::Chat, "functions") => only_default(key, v, &[json!([])]),
        (Endpoint::Chat, "function_call") => only_default(key, v, &[json!("none"), json!("auto")]),
        (Endpoint::Chat, "modalities") => only_default(key, v, &[json!(["text"])]),
        (Endpoint::Chat, "store") => only_default(key, v, &[json!(false)]),
        // Tags of stored completions; nothing is stored.
        (Endpoint::Chat, "metadata") if !v.is_object() => Err(expected(key, "an object", v)),
        (Endpoint::Chat, "metadata") => Ok(()),
        (_, "service_tier") => only_default(key, v, &[json!("auto"), json!("default")]),
        _ => Err(unknown(key)),
    }
}

/// `response_format`: `text` (nothing), `json_object`, `json_schema`
/// (OpenAI's), and svfit's `regex` and `lark`. The schema, regex or
/// grammar is checked and compiled as gRPC's `constraint` is.
fn response_format(v: &Value) -> Result<Option<pb::Constraint>, Status> {
    use pb::constraint::Kind;
    if !v.is_object() {
        return Err(expected("response_format", "an object", v));
    }
    let kind = match v.get("type") {
        Some(kind) => string("response_format.type", kind)?,
        None => return Err(invalid("response_format.type", "required")),
    };
    // The fields each type takes besides `type`.
    let mut body = None;
    for (key, value) in fields("response_format", v)? {
        match (kind.as_str(), key) {
            (_, "type") => {}
            ("json_schema", "json_schema") | ("regex", "regex") | ("lark", "lark") => {
                body = Some(value)
            }
            _ => return Err(unknown(&format!("response_format.{key}"))),
        }
    }
    let needed =
        |field: &str| body.ok_or_else(|| invalid(&format!("response_format.{field}"), "required"));
    let kind = match kind.as_str() {
        "text" => return Ok(None),
        "json_object" => Kind::JsonObject(true),
        "json_schema" => Kind::JsonSchema(json_schema(needed("json_schema")?)?),
        "regex" => Kind::Regex(string("response_format.regex", needed("regex")?)?),
        "lark" => Kind::Lark(string("response_format.lark", needed("lark")?)?),
        other => {
            return Err(invalid(
                "response_format.type",
                format!(
                    "'{}' is not supported (text, json_object, json_schema, regex or lark)",
                    crate::store::shown(other)
                ),
            ))
        }
    };
    Ok(Some(pb::Constraint { kind: Some(kind) }))
}

/// `response_format.json_schema`: its `schema` as JSON text; `name`,
/// `description` and `strict` name and describe it (every schema is
/// enforced strictly).
fn json_schema(v: &Value) -> Result<String, Status> {
    let mut schema = None;
    for (key, value) in fields("response_format.json_schema", v)? {
        let param = format!("response_format.json_schema.{key}");
        match key {
            "schema" => schema = Some(value),
            "name" | "description" => drop(string(&param, value)?),
            "strict" => drop(boolean(&param, value)?),
            _ => return Err(unknown(&param)),
        }
    }
    match schema {
        Some(schema @ Value::Object(_)) => Ok(schema.to_string()),
        Some(other) => Err(expected(
            "response_format.json_schema.schema",
            "an object",
            other,
        )),
        // OpenAI's default: any JSON value.
        None => Ok("{}".into()),
    }
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

/// `messages`: roles system, developer (as system), user, assistant (with
/// its earlier `tool_calls`) and tool (a call's result, shown as a user
/// turn); content a string or text parts.
fn messages(v: &Value) -> Result<pb::generate_request::Input, Status> {
    let Value::Array(list) = v else {
        return Err(expected("messages", "an array", v));
    };
    let mut messages: Vec<pb::ChatMessage> = Vec::with_capacity(list.len().min(1024));
    // Whether the last message holds tool results (the next joins it).
    let mut results = false;
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let mut role = None;
        let mut content = String::new();
        let mut calls = None;
        let mut call_id = None;
        for (key, v) in fields(&param, m)? {
            let field = format!("{param}.{key}");
            match key {
                "role" => role = Some(string(&field, v)?),
                "content" => content = message_content(&field, v)?,
                "tool_calls" => calls = Some((field.clone(), tools::call_text(&field, v)?)),
                "tool_call_id" => call_id = Some((field.clone(), string(&field, v)?)),
                "refusal" => {}
                "name" | "function_call" | "audio" => {
                    return Err(unsupported(&field, "this message field"))
                }
                _ => return Err(unknown(&field)),
            }
        }
        let role = match role.as_deref() {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some(other) => {
                return Err(invalid(
                    &format!("{param}.role"),
                    format!(
                        "'{}' is not supported (system, developer, user, assistant or tool)",
                        crate::store::shown(other)
                    ),
                ))
            }
            None => return Err(invalid(&format!("{param}.role"), "required")),
        };
        match (role, calls, call_id) {
            (_, Some((field, _)), _) if role != "assistant" => {
                return Err(invalid(&field, "only assistant messages make tool calls"))
            }
            (_, _, Some((field, _))) if role != "tool" => {
                return Err(invalid(&field, "only tool messages answer a call"))
            }
            ("tool", _, None) => return Err(invalid(&format!("{param}.tool_call_id"), "required")),
            ("tool", _, Some(_)) => {
                let result = tools::response_text(&content);
                match messages.last_mut() {
                    Some(last) if results => last.content = format!("{}\n{result}", last.content),
                    _ => messages.push(pb::ChatMessage {
                        role: "user".into(),
                        content: result,
                    }),
                }
                results = true;
                continue;
            }
            (_, Some((_, calls)), _) if !calls.is_empty() => {
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&calls);
            }
            _ => {}
        }
        results = false;
        messages.push(pb::ChatMessage {
            role: role.to_string(),
            content,
        });
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

#[cfg(test)]
mod tests;
