//! The hostile-request catalogue: one tenant's malformed or abusive
//! generate requests, each with the gRPC code it must get (`Code::Ok`: it
//! must work). `tests/it/trust.rs` sends each once and checks its code,
//! then sends them in a loop while another tenant's answers are checked;
//! the load bench's `soak` scenario (`benches/load.rs`, which includes
//! this file by path) sends them beside ordinary traffic and counts the
//! answers. (The invalid UTF-8 prompt, which a typed client cannot send,
//! is `trust.rs`'s own.)

use svfit::server::pb::{self, generate_request::Input};
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request};

/// The adapters the requests name, as the server under test holds them.
pub struct Names<'a> {
    /// An adapter of the sending tenant, by its id.
    pub own: &'a str,
    /// The same adapter as `tenant/id`.
    pub own_qualified: &'a str,
    /// Another tenant's adapter, as `tenant/id`.
    pub other_tenants: &'a str,
    /// An id that names no adapter.
    pub unknown: &'a str,
}

/// One hostile request and the code it must get.
pub struct Attack {
    /// What the request does, for assertion messages.
    pub name: &'static str,
    pub body: pb::GenerateRequest,
    /// Metadata the request carries besides the caller's API key.
    pub metadata: Vec<(&'static str, AsciiMetadataValue)>,
    pub want: Code,
}

impl Attack {
    /// The request, with `key` as its bearer token when given.
    pub fn request(&self, key: Option<&str>) -> Request<pb::GenerateRequest> {
        let mut request = Request::new(self.body.clone());
        let metadata = request.metadata_mut();
        if let Some(key) = key {
            let bearer = format!("Bearer {key}").parse().expect("an ASCII key");
            metadata.insert("authorization", bearer);
        }
        for (name, value) in &self.metadata {
            metadata.insert(*name, value.clone());
        }
        request
    }
}

/// A greedy request for 4 tokens of "Hello" with `adapter`.
fn short(adapter: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        adapter: adapter.into(),
        input: Some(Input::Prompt("Hello".into())),
        sampling: Some(pb::Sampling {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: 4,
        ..Default::default()
    }
}

/// A short request on the base model with `mix` as its mix.
fn mixed(mix: impl IntoIterator<Item = (String, f32)>) -> pb::GenerateRequest {
    let mix = mix.into_iter();
    pb::GenerateRequest {
        mix: mix
            .map(|(adapter, weight)| pb::MixPart { adapter, weight })
            .collect(),
        ..short("")
    }
}

/// A short request on the base model with `sampling`.
fn sampled(sampling: pb::Sampling) -> pb::GenerateRequest {
    pb::GenerateRequest {
        sampling: Some(sampling),
        ..short("")
    }
}

/// A short request on the base model with `prompt`.
fn prompted(prompt: String) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(Input::Prompt(prompt)),
        ..short("")
    }
}

/// The whole catalogue, the adapters it names being `names`.
pub fn attacks(names: &Names) -> Vec<Attack> {
    let mut out = Vec::new();
    out.extend(stops(names));
    out.extend(mixes(names));
    out.extend(adapters_and_prompts(names));
    out.extend(numbers_and_metadata());
    out.extend(constraints(names));
    out
}

/// Constraints of hostile shapes and sizes: each compiles within its
/// bounds and runs, or is refused.
fn constraints(names: &Names) -> Vec<Attack> {
    use pb::constraint::Kind;
    let constrained = |adapter: &str, kind: Kind| pb::GenerateRequest {
        constraint: Some(pb::Constraint { kind: Some(kind) }),
        ..short(adapter)
    };
    let mut nested = String::from(r#"{"type": "integer"}"#);
    for _ in 0..100 {
        nested =
            format!(r#"{{"type": "object", "properties": {{"a": {nested}}}, "required": ["a"]}}"#);
    }
    let over = format!(r#"{{"description": "{}"}}"#, "x".repeat(70_000));
    vec![
        attack(
            "a regex of catastrophic-backtracking shape",
            constrained(names.own, Kind::Regex("(a+)+$".into())),
            Code::Ok,
        ),
        attack(
            "a regex with a huge repetition count",
            constrained("", Kind::Regex("[a-z]{1,60000}".into())),
            Code::Ok,
        ),
        // Past the JSON parser's nesting bound: refused, not a stack overflow.
        attack(
            "a JSON schema nested 100 deep",
            constrained("", Kind::JsonSchema(nested)),
            Code::InvalidArgument,
        ),
        attack(
            "a JSON schema that admits nothing",
            constrained(
                "",
                Kind::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#.into()),
            ),
            Code::InvalidArgument,
        ),
        attack(
            "a Lark grammar that does not parse",
            constrained("", Kind::Lark("start: ((".into())),
            Code::InvalidArgument,
        ),
        attack(
            "a JSON schema over the constraint limit",
            constrained("", Kind::JsonSchema(over)),
            Code::InvalidArgument,
        ),
        // Larger than any valid request: refused before it is decoded.
        attack(
            "a 1 MB JSON schema",
            constrained("", Kind::JsonSchema("x".repeat(1 << 20))),
            Code::OutOfRange,
        ),
    ]
}

/// An attack without metadata.
fn attack(name: &'static str, body: pb::GenerateRequest, want: Code) -> Attack {
    Attack {
        name,
        body,
        metadata: Vec::new(),
        want,
    }
}

/// Stop strings: unusual characters, too many, too long.
fn stops(names: &Names) -> Vec<Attack> {
    let non_ascii = || vec!["é".into(), "日本".into(), "🦀".into()];
    vec![
        attack(
            "non-ASCII stop strings",
            pb::GenerateRequest {
                stop: [non_ascii(), vec!["\u{0}".into()]].concat(),
                ..short("")
            },
            Code::Ok,
        ),
        attack(
            "non-ASCII stop strings with an adapter",
            pb::GenerateRequest {
                stop: non_ascii(),
                ..short(names.own)
            },
            Code::Ok,
        ),
        // Larger than any valid request: refused before it is decoded.
        attack(
            "thousands of long stop strings",
            pb::GenerateRequest {
                stop: (0..5000)
                    .map(|i| format!("{i}{}", "x".repeat(200)))
                    .collect(),
                ..short("")
            },
            Code::OutOfRange,
        ),
        attack(
            "too many stop strings",
            pb::GenerateRequest {
                stop: (0..100).map(|i| i.to_string()).collect(),
                ..short("")
            },
            Code::InvalidArgument,
        ),
        attack(
            "a long stop string",
            pb::GenerateRequest {
                stop: vec!["é".repeat(100)],
                ..short("")
            },
            Code::InvalidArgument,
        ),
    ]
}

/// Mixes: too many parts, one adapter twice, weights out of range.
fn mixes(names: &Names) -> Vec<Attack> {
    let parts = |n: usize| (0..n).map(|i| (format!("a{i}"), 0.5));
    let mut out = vec![
        attack("a 30,000-part mix", mixed(parts(30_000)), Code::OutOfRange),
        attack("a 100-part mix", mixed(parts(100)), Code::InvalidArgument),
        attack(
            "one adapter twice in a mix",
            mixed([names.own, names.own_qualified].map(|a| (a.into(), 0.5))),
            Code::InvalidArgument,
        ),
    ];
    for weight in [1e30, f32::NAN, f32::NEG_INFINITY] {
        let body = mixed([(names.own.into(), weight)]);
        out.push(attack("an extreme mix weight", body, Code::InvalidArgument));
    }
    for weight in [1e30, f32::NAN] {
        let body = mixed([names.own, names.unknown].map(|a| (a.into(), weight)));
        let name = "extreme weights in a two-part mix";
        out.push(attack(name, body, Code::InvalidArgument));
    }
    out
}

/// Adapter ids that are too long, another tenant's or unknown; prompts
/// over the request's size, the prompt's limit or the context.
fn adapters_and_prompts(names: &Names) -> Vec<Attack> {
    let words = |n: usize| prompted("word ".repeat(n));
    vec![
        attack(
            "a 10,000-character adapter id",
            short(&"é".repeat(10_000)),
            Code::InvalidArgument,
        ),
        attack(
            "another tenant's adapter",
            short(names.other_tenants),
            Code::PermissionDenied,
        ),
        attack("an unknown adapter", short(names.unknown), Code::NotFound),
        attack("a 1 MB prompt", words(200_000), Code::OutOfRange),
        attack("a 100 kB prompt", words(20_000), Code::InvalidArgument),
        attack(
            "a prompt longer than the context",
            words(12_000),
            Code::InvalidArgument,
        ),
        attack(
            "an empty chat",
            pb::GenerateRequest {
                input: Some(Input::Chat(pb::Chat { messages: vec![] })),
                ..short("")
            },
            Code::InvalidArgument,
        ),
    ]
}

/// Extreme numbers (max_tokens, sampling) and metadata (deadlines, a
/// non-ASCII adapter header).
fn numbers_and_metadata() -> Vec<Attack> {
    let huge = pb::Sampling {
        temperature: Some(1e30),
        top_k: Some(u32::MAX),
        ..Default::default()
    };
    let deadline = |value| vec![("grpc-timeout", AsciiMetadataValue::from_static(value))];
    let header = AsciiMetadataValue::try_from(&b"caf\xc3\xa9"[..]).expect("header bytes");
    vec![
        attack(
            "max_tokens of 4 billion",
            pb::GenerateRequest {
                max_tokens: u32::MAX,
                ..short("")
            },
            Code::InvalidArgument,
        ),
        attack(
            "extreme but valid sampling",
            sampled(pb::Sampling {
                repeat_penalty: Some(1e30),
                repeat_last_n: Some(u32::MAX),
                seed: Some(u64::MAX),
                ..huge
            }),
            Code::Ok,
        ),
        attack(
            "extreme sampling with a NaN top_p",
            sampled(pb::Sampling {
                top_p: Some(f32::NAN),
                ..huge
            }),
            Code::InvalidArgument,
        ),
        attack(
            "a tiny temperature",
            sampled(pb::Sampling {
                temperature: Some(f32::MIN_POSITIVE),
                ..Default::default()
            }),
            Code::Ok,
        ),
        attack(
            "a NaN top_p",
            sampled(pb::Sampling {
                top_p: Some(f32::NAN),
                ..Default::default()
            }),
            Code::InvalidArgument,
        ),
        Attack {
            metadata: deadline("99999999H"),
            ..attack("a 99999999-hour deadline", short(""), Code::Ok)
        },
        Attack {
            metadata: deadline("123456789012S"),
            ..attack("a 12-digit grpc-timeout", short(""), Code::InvalidArgument)
        },
        Attack {
            metadata: vec![("x-svfit-adapter", header)],
            ..attack(
                "a non-ASCII adapter header",
                short(""),
                Code::InvalidArgument,
            )
        },
    ]
}
