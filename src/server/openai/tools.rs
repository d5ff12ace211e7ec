//! Chat completions' function tools, in svfit's default tool format (the
//! Hermes format that Qwen 2.5's template writes; llama.cpp's built-in
//! templates, which svfit renders with, have no tool syntax of their own):
//!
//! - The tools are described in the system message, one JSON object per
//!   line inside `<tools></tools>` ([`system_text`]).
//! - The model calls one by writing
//!   `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`;
//!   parallel calls follow each other, a line apart.
//! - An assistant message's earlier `tool_calls` are written back in that
//!   form, and `role: "tool"` results as a user turn of
//!   `<tool_response>\n...\n</tool_response>` blocks ([`call_text`],
//!   [`response_text`]).
//!
//! The answer is constrained by a Lark grammar ([`Tools::grammar`]): with
//! `tool_choice: "required"` or a named function it is one or more calls
//! (one with `parallel_tool_calls: false`) whose arguments follow the
//! function's JSON schema; with `auto` it is either calls or a text that
//! does not begin with `<` (or the `response_format`'s JSON). [`Calls`]
//! reads the answer back into content and calls, whole or as it streams.

use serde_json::{json, Value};
use tonic::Status;

use super::invalid;
use super::values::{boolean, expected, fields, string, unknown};

/// At most this many tools per request (OpenAI's limit).
const MAX_TOOLS: usize = 128;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    description: Option<String>,
    /// The JSON schema of its arguments (an object).
    parameters: Value,
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools a request offers and how they may be used.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: Choice,
    /// `parallel_tool_calls`: more than one call per answer.
    pub parallel: bool,
}

/// `tools`: function tools, each named once.
pub fn functions(v: &Value) -> Result<Vec<Function>, Status> {
    let Value::Array(list) = v else {
        return Err(expected("tools", "an array", v));
    };
    if list.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("{} tools; at most {MAX_TOOLS} are allowed", list.len()),
        ));
    }
    let mut functions: Vec<Function> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        let mut function = None;
        for (key, value) in fields(&param, tool)? {
            let field = format!("{param}.{key}");
            match key {
                "type" if value == "function" => {}
                "type" => {
                    return Err(invalid(
                        &field,
                        format!("{value} is not supported (only function tools are)"),
                    ))
                }
                "function" => function = Some(read_function(&field, value)?),
                _ => return Err(unknown(&field)),
            }
        }
        let function = function.ok_or_else(|| invalid(&format!("{param}.function"), "required"))?;
        if functions.iter().any(|f| f.name == function.name) {
            return Err(invalid(
                &format!("{param}.function.name"),
                format!("'{}' names two tools", function.name),
            ));
        }
        functions.push(function);
    }
    Ok(functions)
}

fn read_function(param: &str, v: &Value) -> Result<Function, Status> {
    let mut name = None;
    let mut description = None;
    // No parameters: the function takes none.
    let mut parameters = json!({"type": "object", "properties": {}, "additionalProperties": false});
    for (key, value) in fields(param, v)? {
        let field = format!("{param}.{key}");
        match key {
            "name" => name = Some(function_name(&field, value)?),
            "description" => description = Some(string(&field, value)?),
            "parameters" if value.is_object() => parameters = value.clone(),
            "parameters" => return Err(expected(&field, "a JSON schema object", value)),
            // Every schema is enforced.
            "strict" => drop(boolean(&field, value)?),
            _ => return Err(unknown(&field)),
        }
    }
    Ok(Function {
        name: name.ok_or_else(|| invalid(&format!("{param}.name"), "required"))?,
        description,
        parameters,
    })
}

/// A function name as OpenAI allows them: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn function_name(param: &str, v: &Value) -> Result<String, Status> {
    let name = string(param, v)?;
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(invalid(
            param,
            "a function name is 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    Ok(name)
}

/// `tool_choice`: `none`, `auto`, `required` or
/// `{"type": "function", "function": {"name": ...}}`.
pub fn choice(v: &Value) -> Result<Choice, Status> {
    let param = "tool_choice";
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(Choice::None),
            "auto" => Ok(Choice::Auto),
            "required" => Ok(Choice::Required),
            other => Err(invalid(
                param,
                format!(
                    "'{}' is not a choice (none, auto, required or a function)",
                    crate::store::shown(other)
                ),
            )),
        },
        Value::Object(_) => {
            let mut name = None;
            for (key, value) in fields(param, v)? {
                let field = format!("{param}.{key}");
                match key {
                    "type" if value == "function" => {}
                    "type" => return Err(invalid(&field, "only 'function' is supported")),
                    "function" => {
                        for (key, value) in fields(&field, value)? {
                            match key {
                                "name" => {
                                    name = Some(function_name(&format!("{field}.name"), value)?)
                                }
                                _ => return Err(unknown(&format!("{field}.{key}"))),
                            }
                        }
                    }
                    _ => return Err(unknown(&field)),
                }
            }
            let name = name.ok_or_else(|| invalid("tool_choice.function.name", "required"))?;
            Ok(Choice::Named(name))
        }
        other => Err(expected(param, "a string or an object", other)),
    }
}

impl Tools {
    /// The tools of a request; `None` when no call can be made (no tools,
    /// or `tool_choice: "none"`).
    pub fn new(
        functions: Vec<Function>,
        choice: Option<Choice>,
        parallel: bool,
    ) -> Result<Option<Tools>, Status> {
        let choice = choice.unwrap_or(if functions.is_empty() {
            Choice::None
        } else {
            Choice::Auto
        });
        match &choice {
            Choice::None => return Ok(None),
            Choice::Required if functions.is_empty() => {
                return Err(invalid("tool_choice", "'required' needs tools"))
            }
            Choice::Named(name) if !functions.iter().any(|f| &f.name == name) => {
                return Err(invalid(
                    "tool_choice.function.name",
                    format!("'{name}' is not one of the tools"),
                ))
            }
            _ if functions.is_empty() => return Ok(None),
            _ => {}
        }
        Ok(Some(Tools {
            functions,
            choice,
            parallel,
        }))
    }

    /// The system message's text that describes the tools and the format
    /// of a call.
    pub fn system_text(&self) -> String {
        let mut text = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for f in &self.functions {
            let mut function = json!({"name": f.name});
            if let Some(d) = &f.description {
                function["description"] = json!(d);
            }
            function["parameters"] = f.parameters.clone();
            text.push('\n');
            text.push_str(&json!({"type": "function", "function": function}).to_string());
        }
        text.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        text
    }

    /// The Lark grammar of the answer; `text` is the grammar of a text
    /// answer (`response_format`'s JSON) where `auto` allows one.
    pub fn grammar(&self, text: Option<Value>) -> String {
        let offered: Vec<&Function> = match &self.choice {
            Choice::Named(name) => self.functions.iter().filter(|f| &f.name == name).collect(),
            _ => self.functions.iter().collect(),
        };
        let variants: Vec<Value> = offered
            .iter()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut call = match <[Value; 1]>::try_from(variants) {
            Ok([one]) => one,
            Err(many) => json!({"anyOf": many}),
        };
        // Written as the format shows it, so that it reads back by rote.
        call["x-guidance"] = json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        });
        let calls = if self.parallel {
            r#"call ("\n" call)*"#
        } else {
            "call"
        };
        let start = match (&self.choice, text) {
            (Choice::Auto, None) => "start: (calls | TEXT)?\nTEXT: /[^<](?s:.*)/\n".to_string(),
            (Choice::Auto, Some(json)) => format!("start: calls | %json {json}\n"),
            _ => "start: calls\n".to_string(),
        };
        format!("{start}calls: {calls}\ncall: \"{OPEN}\\n\" %json {call} \"\\n{CLOSE}\"\n")
    }
}

/// An earlier assistant message's `tool_calls`, in the default format;
/// each `arguments` must be JSON text.
pub fn call_text(param: &str, v: &Value) -> Result<String, Status> {
    let Value::Array(list) = v else {
        return Err(expected(param, "an array", v));
    };
    let mut text = Vec::with_capacity(list.len().min(MAX_TOOLS));
    for (i, call) in list.iter().enumerate() {
        let param = format!("{param}[{i}]");
        let (mut name, mut arguments) = (None, None);
        for (key, value) in fields(&param, call)? {
            let field = format!("{param}.{key}");
            match key {
                "id" => drop(string(&field, value)?),
                "type" if value == "function" => {}
                "type" => return Err(invalid(&field, "only 'function' is supported")),
                "function" => {
                    for (key, value) in fields(&field, value)? {
                        let field = format!("{field}.{key}");
                        match key {
                            "name" => name = Some(function_name(&field, value)?),
                            "arguments" => {
                                let args = string(&field, value)?;
                                let parsed: Value = serde_json::from_str(&args)
                                    .map_err(|e| invalid(&field, format!("not valid JSON: {e}")))?;
                                arguments = Some(parsed);
                            }
                            _ => return Err(unknown(&field)),
                        }
                    }
                }
                _ => return Err(unknown(&field)),
            }
        }
        let name = name.ok_or_else(|| invalid(&format!("{param}.function.name"), "required"))?;
        let arguments = arguments.unwrap_or_else(|| json!({}));
        let call = json!({"name": name, "arguments": arguments});
        text.push(format!("{OPEN}\n{call}\n{CLOSE}"));
    }
    Ok(text.join("\n"))
}

/// A tool's result as the user turn shows it.
pub fn response_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// A piece of an answer read by [`Calls`].
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Text for `content`.
    Content(String),
    /// Call `index` begins: its function's name.
    Call { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, text: String },
}

/// Where [`Calls`] is in the answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Place {
    /// Nothing read yet: a `<` begins calls, anything else is content.
    #[default]
    Start,
    Content,
    /// Before a call or after one.
    Between,
    /// Inside `<tool_call>`, before the arguments.
    Header,
    /// In the arguments; `sent` bytes of them were given out.
    Arguments {
        sent: usize,
        scan: Scan,
    },
    /// After a call's closing `}`, before `</tool_call>`.
    Closing,
}

/// How far the arguments were scanned as JSON: `at` bytes, inside `depth`
/// objects and arrays (the call's own object included), and whether in a
/// string (after a backslash). The call's object closes at depth 0.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scan {
    at: usize,
    depth: usize,
    string: bool,
    escaped: bool,
}

impl Scan {
    /// Inside the call's object, at the first byte of the arguments.
    const START: Scan = Scan {
        at: 0,
        depth: 1,
        string: false,
        escaped: false,
    };

    /// Scans `text` on from `at`; the offset of the call's closing `}` once
    /// it is reached. Byte-wise: no byte of a multi-byte UTF-8 character
    /// is ASCII.
    fn find_close(&mut self, text: &[u8]) -> Option<usize> {
        while let Some(&c) = text.get(self.at) {
            if self.string {
                match c {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.string = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => self.string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            return Some(self.at);
                        }
                    }
                    _ => {}
                }
            }
            self.at += 1;
        }
        None
    }
}

/// Reads an answer back into content and calls as it arrives: each piece
/// of text gives the pieces that it completes. The arguments are given out
/// as they are written, scanned as JSON (so a `}` or `</tool_call>` inside
/// a string is text), up to the call's closing `}`; whitespace waits until
/// what follows it shows whether it is the arguments'.
#[derive(Default)]
pub struct Calls {
    place: Place,
    pending: String,
    calls: usize,
}

impl Calls {
    /// Whether a call has begun.
    pub fn called(&self) -> bool {
        self.calls > 0 || matches!(self.place, Place::Arguments { .. })
    }

    /// Reads `text`, the next stretch of the answer.
    pub fn read(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// The end of the answer: what is left (an unfinished call's
    /// arguments, text that began like a call but was not one).
    pub fn end(&mut self) -> Vec<Piece> {
        let mut out = self.read("");
        let rest = std::mem::take(&mut self.pending);
        match self.place {
            Place::Arguments { sent, .. } => {
                if let Some(text) = rest.get(sent..).filter(|t| !t.is_empty()) {
                    out.push(Piece::Arguments {
                        index: self.calls,
                        text: text.to_string(),
                    });
                }
                self.calls += 1;
            }
            Place::Header => out.push(Piece::Content(format!("{OPEN}{rest}"))),
            // Between calls, the start of another (or this one's end) cut
            // short.
            Place::Between if OPEN.starts_with(rest.trim_start()) => {}
            Place::Closing if CLOSE.starts_with(rest.trim_start()) => {}
            _ if rest.is_empty() => {}
            _ => out.push(Piece::Content(rest)),
        }
        self.place = Place::Content;
        out
    }

    /// One step over the pending text; false when it needs more.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        let pending = &mut self.pending;
        match self.place {
            Place::Start if pending.is_empty() => false,
            Place::Start => {
                self.place = if pending.starts_with('<') {
                    Place::Between
                } else {
                    Place::Content
                };
                true
            }
            Place::Content => {
                if !pending.is_empty() {
                    out.push(Piece::Content(std::mem::take(pending)));
                }
                false
            }
            Place::Between => {
                let rest = pending.trim_start();
                if let Some(after) = rest.strip_prefix(OPEN) {
                    *pending = after.to_string();
                    self.place = Place::Header;
                    true
                } else if OPEN.starts_with(rest) {
                    false
                } else {
                    // Not a call (only a cut answer gets here).
                    self.place = Place::Content;
                    true
                }
            }
            Place::Header => match header(pending) {
                Header::More => false,
                Header::Not => {
                    *pending = format!("{OPEN}{pending}");
                    self.place = Place::Content;
                    true
                }
                Header::Name(name, used) => {
                    out.push(Piece::Call {
                        index: self.calls,
                        name,
                    });
                    pending.drain(..used);
                    self.place = Place::Arguments {
                        sent: 0,
                        scan: Scan::START,
                    };
                    true
                }
            },
            Place::Arguments { sent, mut scan } => {
                let close = scan.find_close(pending.as_bytes());
                let upto = pending[..close.unwrap_or(scan.at)].trim_end();
                if let Some(text) = upto.get(sent..).filter(|t| !t.is_empty()) {
                    out.push(Piece::Arguments {
                        index: self.calls,
                        text: text.to_string(),
                    });
                }
                let sent = sent.max(upto.len());
                match close {
                    Some(at) => {
                        pending.drain(..=at);
                        self.calls += 1;
                        self.place = Place::Closing;
                        true
                    }
                    None => {
                        self.place = Place::Arguments { sent, scan };
                        false
                    }
                }
            }
            Place::Closing => {
                let rest = pending.trim_start();
                if let Some(after) = rest.strip_prefix(CLOSE) {
                    *pending = after.to_string();
                    self.place = Place::Between;
                    true
                } else if CLOSE.starts_with(rest) {
                    false
                } else {
                    // Not the end of a call (only a cut answer gets here).
                    self.place = Place::Content;
                    true
                }
            }
        }
    }
}

/// A call's header: `{"name": "NAME", "arguments": `.
enum Header {
    More,
    Not,
    /// The name, and the bytes the header took.
    Name(String, usize),
}

fn header(text: &str) -> Header {
    let mut rest = text;
    let mut name = None;
    for part in [
        "{",
        "\"name\"",
        ":",
        "\"",
        "NAME",
        ",",
        "\"arguments\"",
        ":",
    ] {
        rest = rest.trim_start();
        if part == "NAME" {
            let Some(end) = rest.find('"') else {
                return Header::More;
            };
            name = Some(rest[..end].to_string());
            rest = &rest[end + 1..];
            continue;
        }
        if let Some(after) = rest.strip_prefix(part) {
            rest = after;
        } else if part.starts_with(rest) {
            return Header::More;
        } else {
            return Header::Not;
        }
    }
    let rest = rest.trim_start();
    if rest.is_empty() {
        // The arguments' first byte tells where they begin.
        return Header::More;
    }
    Header::Name(name.unwrap_or_default(), text.len() - rest.len())
}

/// Content and calls of a whole answer.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub content: String,
    /// Each call's function name and arguments.
    pub calls: Vec<(String, String)>,
}

impl Answer {
    pub fn add(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(text) => self.content.push_str(&text),
                Piece::Call { name, .. } => self.calls.push((name, String::new())),
                Piece::Arguments { text, .. } => {
                    if let Some((_, arguments)) = self.calls.last_mut() {
                        arguments.push_str(&text);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
