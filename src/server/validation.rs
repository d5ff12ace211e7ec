//! Every check of an inference request, in one place between the transport
//! and the engine: a `GenerateRequest` and its metadata become a
//! [`ValidRequest`] or an INVALID_ARGUMENT (PERMISSION_DENIED for another
//! tenant's adapter) that names the field. Nothing here does I/O, so the
//! checks are cheap and fuzzed (`tests/it/fuzz.rs`); what needs the store or
//! the tokenizer comes after, off the async threads.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::auth::Caller;
use super::pb;
use crate::constraint::Spec;
use crate::model::tokenizer::Message;
use crate::sampling::SamplingParams;
use crate::store::shown;

/// Request limits (server flags; the defaults suit the default model).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of a prompt, or of all chat messages together.
    pub prompt_bytes: usize,
    pub chat_messages: usize,
    pub stop_strings: usize,
    /// Bytes of one stop string.
    pub stop_bytes: usize,
    /// Adapters in one mix.
    pub mix_parts: usize,
    /// Bytes of a constraint (a JSON schema, regex or grammar).
    pub constraint_bytes: usize,
    /// The largest `max_tokens` a request may ask for (the context).
    pub max_tokens: usize,
    /// `max_tokens` of requests that leave it 0.
    pub max_tokens_default: usize,
    /// Bytes of one file of the files API.
    pub file_bytes: usize,
    /// Files one tenant may keep.
    pub files_per_tenant: usize,
}

impl Limits {
    /// The largest encoded request that can pass: the prompt, the stop
    /// strings and the mix at their limits, plus room for the rest.
    pub fn max_message_bytes(&self) -> usize {
        let per_string = 8;
        self.prompt_bytes
            + self.chat_messages * 2 * per_string
            + self.stop_strings * (self.stop_bytes + per_string)
            + self.mix_parts * (2 * crate::store::MAX_NAME + 16)
            + self.constraint_bytes
            + (64 << 10)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            prompt_bytes: 64 << 10,
            chat_messages: 256,
            stop_strings: 16,
            stop_bytes: 128,
            mix_parts: 8,
            constraint_bytes: 64 << 10,
            max_tokens: 8192,
            max_tokens_default: 256,
            file_bytes: 64 << 20,
            files_per_tenant: 100,
        }
    }
}

/// Mix weights beyond this are refused: the mixed deltas must stay finite
/// and meaningful (a weight of 1 applies an adapter fully).
pub const MAX_MIX_WEIGHT: f32 = 16.0;

/// The longest deadline a request may set; longer ones are cut to it.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Which adapter a request runs with.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterChoice {
    Base,
    /// (tenant, id)
    One(String, String),
    /// (tenant, id, weight), each adapter once.
    Mix(Vec<(String, String, f32)>),
}

/// What to tokenize.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

/// A request that passed every check that needs no I/O.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub adapter: AdapterChoice,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub deadline: Option<Instant>,
    /// Alternatives per token to report with log-probabilities (`None`:
    /// none at all); the HTTP API sets it, gRPC has no such field.
    pub logprobs: Option<usize>,
    /// What the answer must match (compiled at submission).
    pub constraint: Option<Spec>,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// `n` of `what` in `field`, at most `limit`.
fn at_most(field: &str, n: usize, limit: usize, what: &str) -> Result<(), Status> {
    if n > limit {
        return Err(invalid(
            field,
            format!("{n} {what}; at most {limit} are allowed"),
        ));
    }
    Ok(())
}

/// Checks `body` (with its `metadata`) from `caller` against `limits`.
pub fn validate(
    body: pb::GenerateRequest,
    metadata: &MetadataMap,
    caller: &Caller,
    limits: &Limits,
) -> Result<ValidRequest, Status> {
    let adapter = adapter_choice(&body, metadata, caller, limits)?;
    let prompt = prompt(body.input, limits)?;
    let sampling = sampling(body.sampling.unwrap_or_default())?;
    let max_tokens = match body.max_tokens as usize {
        0 => limits.max_tokens_default.min(limits.max_tokens),
        n if n > limits.max_tokens => {
            return Err(invalid(
                "max_tokens",
                format!("{n} is more than the context holds ({})", limits.max_tokens),
            ))
        }
        n => n,
    };
    at_most("stop", body.stop.len(), limits.stop_strings, "strings")?;
    if let Some(long) = body.stop.iter().find(|s| s.len() > limits.stop_bytes) {
        return Err(invalid(
            "stop",
            format!(
                "a string of {} bytes; at most {} are allowed",
                long.len(),
                limits.stop_bytes
            ),
        ));
    }
    let constraint = constraint(body.constraint, limits)?;
    Ok(ValidRequest {
        adapter,
        prompt,
        sampling,
        max_tokens,
        stop: body.stop,
        deadline: deadline(metadata)?,
        logprobs: None,
        constraint,
    })
}

/// The constraint's kind and text, within the size limit: a JSON schema
/// must parse (an object, or `true`); a regex or grammar must not be empty.
fn constraint(c: Option<pb::Constraint>, limits: &Limits) -> Result<Option<Spec>, Status> {
    use pb::constraint::Kind;
    let sized = |field: &str, text: &str| {
        if text.len() > limits.constraint_bytes {
            return Err(invalid(
                field,
                format!(
                    "{} bytes; at most {} are allowed",
                    text.len(),
                    limits.constraint_bytes
                ),
            ));
        }
        if text.trim().is_empty() {
            return Err(invalid(field, "empty"));
        }
        Ok(())
    };
    let Some(kind) = c.and_then(|c| c.kind) else {
        return Ok(None);
    };
    Ok(match kind {
        Kind::JsonObject(false) => None,
        Kind::JsonObject(true) => Some(Spec::JsonObject),
        Kind::JsonSchema(text) => {
            let field = "constraint.json_schema";
            sized(field, &text)?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| invalid(field, format!("not valid JSON: {e}")))?;
            if !(schema.is_object() || schema == serde_json::Value::Bool(true)) {
                return Err(invalid(field, "a schema is a JSON object"));
            }
            Some(Spec::JsonSchema(schema))
        }
        Kind::Regex(text) => {
            sized("constraint.regex", &text)?;
            Some(Spec::Regex(text))
        }
        Kind::Lark(text) => {
            sized("constraint.lark", &text)?;
            Some(Spec::Lark(text))
        }
    })
}

fn adapter_choice(
    body: &pb::GenerateRequest,
    metadata: &MetadataMap,
    caller: &Caller,
    limits: &Limits,
) -> Result<AdapterChoice, Status> {
    let header = match metadata.get("x-svfit-adapter") {
        None => "",
        Some(v) => v
            .to_str()
            .map_err(|_| invalid("x-svfit-adapter", "not visible ASCII"))?,
    };
    let reference = if body.adapter.is_empty() {
        header
    } else {
        &body.adapter
    };
    if body.mix.is_empty() {
        if reference.is_empty() {
            return Ok(AdapterChoice::Base);
        }
        let (tenant, id) = caller.adapter(reference)?;
        return Ok(AdapterChoice::One(tenant, id));
    }
    if !reference.is_empty() {
        return Err(invalid("mix", "set either adapter or mix, not both"));
    }
    at_most("mix", body.mix.len(), limits.mix_parts, "parts")?;
    let mut seen = HashSet::new();
    let mut parts = Vec::with_capacity(body.mix.len());
    for part in &body.mix {
        let (tenant, id) = caller.adapter(&part.adapter)?;
        if !(part.weight.is_finite() && part.weight.abs() <= MAX_MIX_WEIGHT) {
            return Err(invalid(
                "mix",
                format!(
                    "the weight of '{id}' is {}; weights lie in [-{MAX_MIX_WEIGHT}, {MAX_MIX_WEIGHT}]",
                    part.weight
                ),
            ));
        }
        if !seen.insert((tenant.clone(), id.clone())) {
            return Err(invalid(
                "mix",
                format!("'{tenant}/{id}' appears twice; name each adapter once"),
            ));
        }
        parts.push((tenant, id, part.weight));
    }
    Ok(AdapterChoice::Mix(parts))
}

fn prompt(input: Option<pb::generate_request::Input>, limits: &Limits) -> Result<Prompt, Status> {
    let too_long = |field: &str, bytes: usize| {
        invalid(
            field,
            format!(
                "{bytes} bytes; at most {} are allowed (--max-prompt-bytes)",
                limits.prompt_bytes
            ),
        )
    };
    match input {
        Some(pb::generate_request::Input::Prompt(p)) => {
            if p.is_empty() {
                return Err(invalid("prompt", "empty"));
            }
            if p.len() > limits.prompt_bytes {
                return Err(too_long("prompt", p.len()));
            }
            Ok(Prompt::Text(p))
        }
        Some(pb::generate_request::Input::Chat(chat)) => {
            if chat.messages.is_empty() {
                return Err(invalid("chat", "no messages"));
            }
            at_most(
                "chat",
                chat.messages.len(),
                limits.chat_messages,
                "messages",
            )?;
            let bytes: usize = chat
                .messages
                .iter()
                .map(|m| m.role.len() + m.content.len())
                .sum();
            if bytes > limits.prompt_bytes {
                return Err(too_long("chat", bytes));
            }
            Ok(Prompt::Chat(
                chat.messages
                    .iter()
                    .map(|m| Message::new(&m.role, &m.content))
                    .collect(),
            ))
        }
        None => Err(invalid("input", "set prompt or chat")),
    }
}

fn sampling(s: pb::Sampling) -> Result<SamplingParams, Status> {
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.map_or(defaults.top_k, |v| v as usize),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        min_p: s.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: s.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        repeat_last_n: s
            .repeat_last_n
            .map_or(defaults.repeat_last_n, |v| v as usize),
        seed: s.seed.unwrap_or(defaults.seed),
    };
    params.validate().map_err(|e| invalid("sampling", e))?;
    Ok(params)
}

/// The deadline from the `grpc-timeout` header ("100m", "5S", ...: at most
/// 8 digits and a unit), cut to [`MAX_DEADLINE`].
pub fn deadline(metadata: &MetadataMap) -> Result<Option<Instant>, Status> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || {
        invalid(
            "grpc-timeout",
            format!(
                "'{}' is not 1 to 8 digits and a unit (H M S m u n)",
                shown(&String::from_utf8_lossy(value.as_bytes()))
            ),
        )
    };
    let text = value.to_str().map_err(|_| bad())?;
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    let now = Instant::now();
    Ok(Some(
        now.checked_add(timeout.min(MAX_DEADLINE)).unwrap_or(now),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller {
            tenant: "alice".into(),
            admin: false,
        }
    }

    fn request() -> pb::GenerateRequest {
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt("hi".into())),
            ..Default::default()
        }
    }

    fn check(body: pb::GenerateRequest) -> Result<ValidRequest, Status> {
        validate(body, &MetadataMap::new(), &caller(), &Limits::default())
    }

    #[test]
    fn each_limit_names_its_field() {
        let cases: Vec<(&str, pb::GenerateRequest)> = vec![
            (
                "stop",
                pb::GenerateRequest {
                    stop: vec!["x".into(); 17],
                    ..request()
                },
            ),
            (
                "stop",
                pb::GenerateRequest {
                    stop: vec!["x".repeat(129)],
                    ..request()
                },
            ),
            (
                "max_tokens",
                pb::GenerateRequest {
                    max_tokens: 9000,
                    ..request()
                },
            ),
            (
                "prompt",
                pb::GenerateRequest {
                    input: Some(pb::generate_request::Input::Prompt("x".repeat(300 << 10))),
                    ..request()
                },
            ),
            (
                "mix",
                pb::GenerateRequest {
                    mix: (0..9)
                        .map(|i| pb::MixPart {
                            adapter: format!("a{i}"),
                            weight: 1.0,
                        })
                        .collect(),
                    ..request()
                },
            ),
            (
                "mix",
                pb::GenerateRequest {
                    mix: vec![pb::MixPart {
                        adapter: "a".into(),
                        weight: 1e30,
                    }],
                    ..request()
                },
            ),
            (
                "mix",
                pb::GenerateRequest {
                    mix: vec![
                        pb::MixPart {
                            adapter: "a".into(),
                            weight: 0.5,
                        },
                        pb::MixPart {
                            adapter: "alice/a".into(),
                            weight: 0.5,
                        },
                    ],
                    ..request()
                },
            ),
            (
                "sampling",
                pb::GenerateRequest {
                    sampling: Some(pb::Sampling {
                        top_p: Some(f32::NAN),
                        ..Default::default()
                    }),
                    ..request()
                },
            ),
        ];
        for (field, body) in cases {
            let status = check(body).unwrap_err();
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{}",
                status.message()
            );
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    #[test]
    fn long_ids_are_not_echoed_whole() {
        let body = pb::GenerateRequest {
            adapter: "é".repeat(10_000),
            ..request()
        };
        let status = check(body).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() < 400, "{}", status.message());
    }

    #[test]
    fn other_tenants_adapters_are_denied() {
        let body = pb::GenerateRequest {
            adapter: "bob/a".into(),
            ..request()
        };
        assert_eq!(
            check(body).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn timeouts_of_any_size_are_clamped_or_refused() {
        let at = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            deadline(&m)
        };
        let far = at("99999999H").unwrap().unwrap();
        assert!(far <= Instant::now() + MAX_DEADLINE);
        assert!(at("100m").unwrap().is_some());
        for bad in ["", "m", "123456789S", "12x", "-5S", "1.5S"] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}
