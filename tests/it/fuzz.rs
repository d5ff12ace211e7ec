//! Fuzzing on stable Rust, for a bounded time: the parsers and checks that
//! see untrusted bytes must answer every input with a value or an error,
//! never a panic or a crash. Targets: the adapter file parser and its
//! validation, the GGUF reader and model config (the tiny model of each
//! family, its bytes mutated, or its keys set to values of any type, then
//! loaded and run when understood), request validation, the OpenAI API's
//! request bodies, constraints (schemas, regexes, grammars) compiled
//! against the default model, and the stop-string text stream.
//!
//! Inputs come from proptest strategies: byte targets mutate the seed
//! files in `tests/fuzz/corpus/<target>/` (flips, interesting values,
//! insertions, deletions, truncations, splices); structured targets draw
//! whole requests. Each target runs `SVFIT_FUZZ_SECS` seconds (default
//! 10, as in CI, where six targets share the suite's time; longer runs:
//! `SVFIT_FUZZ_SECS=600`); `SVFIT_FUZZ_SEED` replays a run (its seed is
//! printed).
//! A failure prints the shrunk input: add it to the corpus with the fix.
//! `cargo test --test it fuzz:: -- --ignored write_corpus` rewrites the seeds.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use svfit::adapter::Adapter;
use svfit::constraint::Spec;
use svfit::factors::{FactorsKey, SingularValues, TargetMatrix};
use svfit::generate::TextStream;
use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::model::{Arch, Batch, LoadOptions};
use svfit::server::auth::Caller;
use svfit::server::openai::{self, Endpoint};
use svfit::server::pb;
use svfit::server::validation::{self, AdapterChoice, Limits};
use tonic::metadata::MetadataMap;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("the {target} corpus: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "the {target} corpus is empty");
    seeds
}

/// Runs `check` on inputs drawn from `strategy` for the time budget.
fn fuzz<S: Strategy>(
    target: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let budget = Duration::from_secs(
        std::env::var("SVFIT_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let seed: u64 = std::env::var("SVFIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{target}: SVFIT_FUZZ_SEED={seed}, {budget:?}");
    let start = Instant::now();
    let (mut inputs, mut round) = (0u64, 0u64);
    while start.elapsed() < budget {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        let config = Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        if let Err(e) = runner.run(&strategy, &check) {
            panic!("{target} (SVFIT_FUZZ_SEED={seed}, round {round}): {e}");
        }
        inputs += 256;
        round += 1;
    }
    eprintln!("{target}: {inputs} inputs in {:?}", start.elapsed());
}

/// One edit of a seed file.
#[derive(Clone, Debug)]
enum Edit {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    /// A little-endian integer at `at` (lengths, counts, offsets).
    Word {
        at: usize,
        value: u64,
        width: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Copies `len` bytes from `from` over `at`.
    Splice {
        from: usize,
        at: usize,
        len: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x7f),
        Just(0xff),
        Just(0x8000_0000),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 62),
        any::<u64>(),
    ];
    prop_oneof![
        (at, 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        (
            at,
            interesting,
            prop_oneof![Just(1usize), Just(2), Just(4), Just(8)]
        )
            .prop_map(|(at, value, width)| Edit::Word { at, value, width }),
        (at, proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (at, 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        at.prop_map(|at| Edit::Truncate { at }),
        (at, at, 1usize..64).prop_map(|(from, at, len)| Edit::Splice { from, at, len }),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Flip { at, bit } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Edit::Set { at, byte } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b = *byte;
                }
            }
            Edit::Word { at, value, width } => {
                let at = at % n;
                for (k, b) in value.to_le_bytes()[..*width].iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            Edit::Insert { at, bytes: new } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Edit::Truncate { at } => bytes.truncate(at % n),
            Edit::Splice { from, at, len } => {
                let (from, at) = (from % n, at % n);
                let piece: Vec<u8> = bytes.iter().skip(from).take(*len).copied().collect();
                for (k, b) in piece.into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + k) {
                        *slot = b;
                    }
                }
            }
        }
    }
    bytes
}

/// A seed file with up to 8 edits, or (rarely) random bytes.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        15 => (
            proptest::sample::select(seeds),
            proptest::collection::vec(edit(), 0..8)
        )
            .prop_map(|(seed, edits)| apply(seed, &edits)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// The factors the adapter seeds are made for: two layers of q and v,
/// small ranks, no model needed.
fn fuzz_factors() -> (FactorsKey, SingularValues) {
    let key = FactorsKey {
        base_sha256: "f".repeat(64),
        targets: "q,v".parse().unwrap(),
        policy: "energy:0.99".parse().unwrap(),
        dtype: "f16".parse().unwrap(),
    };
    let singular = (0..2)
        .flat_map(|layer| {
            ["attn_q", "attn_v"].map(|kind| {
                let rank = 3 + layer;
                let values = (0..rank).map(|i| 4.0 / (i + 1) as f32).collect();
                (TargetMatrix { layer, kind }, values)
            })
        })
        .collect();
    (key, singular)
}

#[test]
fn adapter_files() {
    let _machine = crate::common::shared();
    let (key, singular) = fuzz_factors();
    let path = Path::new("fuzzed.safetensors");
    fuzz("adapter", mutated(corpus("adapter")), |bytes| {
        if let Ok(adapter) = Adapter::parse(&bytes, path) {
            if adapter.validate(path, &key, &singular).is_ok() {
                let deltas = adapter.deltas(&singular);
                prop_assert_eq!(deltas.len(), singular.len());
                prop_assert!(deltas.iter().flat_map(|(_, d)| d).all(|v| v.is_finite()));
            }
        }
        Ok(())
    });
}

#[test]
fn gguf_files() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("fuzz-gguf");
    let path = dir.path().join("fuzzed.gguf");
    fuzz("gguf", mutated(corpus("gguf")), |bytes| {
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(gguf) = GgufFile::open(&path) {
            let _ = svfit::model::understand(&gguf);
            for info in gguf.tensors() {
                if let Ok(data) = gguf.read_tensor_bytes(info) {
                    prop_assert_eq!(data.len(), info.n_bytes);
                }
            }
        }
        Ok(())
    });
}

/// A metadata value of any GGUF type the writer has, or none (the key
/// removed): the interesting counts, negatives, values past u32 and
/// floats that are not numbers.
#[derive(Clone, Debug)]
enum Value {
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    Str(String),
    Bool(bool),
    Bools(Vec<bool>),
    Absent,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(2),
            Just(6),
            Just(16),
            Just(32),
            Just(u32::MAX),
            any::<u32>()
        ]
        .prop_map(Value::U32),
        prop_oneof![Just(-1i64), Just(i64::MIN), Just(1 << 40), any::<i64>()].prop_map(Value::I64),
        prop_oneof![Just(u64::MAX), Just(1 << 62), Just(1 << 32)].prop_map(Value::U64),
        float().prop_map(Value::F32),
        text(8).prop_map(Value::Str),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<bool>(), 0..4).prop_map(Value::Bools),
        Just(Value::Absent),
    ]
}

/// The `{arch}.` keys the engine reads, Gemma 3's own among them.
const FAMILY_KEYS: &[&str] = &[
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "rope.freq_base_swa",
    "final_logit_softcapping",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "embedding_length",
    "feed_forward_length",
    "block_count",
    "context_length",
    "vocab_size",
];

/// Sets `{arch}.key` to `value` (removes it for `Absent`).
fn set(w: &mut GgufWriter, key: &str, value: &Value) {
    let _ = match value {
        Value::U32(v) => w.set_u32(key, *v),
        Value::I64(v) => w.set_i64(key, *v),
        Value::U64(v) => w.set_u64(key, *v),
        Value::F32(v) => w.set_f32(key, *v),
        Value::Str(v) => w.set_str(key, v),
        Value::Bool(v) => w.set_bool(key, *v),
        Value::Bools(v) => w.set_bool_array(key, v),
        Value::Absent => w.remove_key(key),
    };
}

/// The tiny models of every family with up to 6 of their keys set to
/// values of any type: each file is refused with an error, or understood,
/// loaded and run on a few tokens; never a panic or a crash.
#[test]
fn family_metadata() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("fuzz-family");
    let path = dir.path().join("fuzzed.gguf");
    let seeds: Vec<PathBuf> = ["gemma3", "llama", "phi3", "qwen2", "qwen3"]
        .iter()
        .map(|arch| corpus_dir("gguf").join(format!("tiny-{arch}.gguf")))
        .collect();
    let edits = proptest::collection::vec((proptest::sample::select(FAMILY_KEYS), value()), 1..6);
    let strategy = (proptest::sample::select(seeds), edits);
    let one_thread = LoadOptions {
        threads: 1,
        ..LoadOptions::default()
    };
    fuzz("family metadata", strategy, |(seed, edits)| {
        let src = GgufFile::open(&seed).unwrap();
        let arch = src.get_str("general.architecture").unwrap().unwrap();
        let mut w = GgufWriter::new(src.tensors().len()).unwrap();
        w.copy_metadata_from(&src);
        for (key, value) in &edits {
            set(&mut w, &format!("{arch}.{key}"), value);
        }
        for t in src.tensors() {
            let bytes = src.read_tensor_bytes(t).unwrap();
            w.add_tensor(&t.name, t.ty, t.shape(), bytes).unwrap();
        }
        w.write(&path).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        if svfit::model::understand(&gguf).is_err() {
            return Ok(());
        }
        let mut model = svfit::model::Model::load(&path, &one_thread)
            .map_err(|e| TestCaseError::fail(format!("understood, but not loaded: {e}")))?;
        let mut cache = model.new_cache(8).unwrap();
        let mut batch = Batch::new();
        batch.add_sequence(&[1, 2, 3], 0, 0, true);
        // An error is an answer too; a panic or a crash is not.
        let _ = model.decode(&mut cache, &batch);
        Ok(())
    });
}

/// Text of any kind: ASCII, multi-byte characters, separators.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[a-z/._-]{{0,{max}}}")).unwrap(),
        proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect()),
        proptest::collection::vec(
            prop_oneof![
                Just('é'),
                Just('/'),
                Just('日'),
                Just('🦀'),
                Just('a'),
                Just('\0')
            ],
            0..max
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(f32::MIN_POSITIVE),
        Just(f32::MAX),
        -2.0f32..2.0,
        any::<f32>(),
    ]
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    let mix = proptest::collection::vec(
        (text(12), float()).prop_map(|(adapter, weight)| pb::MixPart { adapter, weight }),
        0..12,
    );
    let input = prop_oneof![
        Just(None),
        text(64).prop_map(|p| Some(pb::generate_request::Input::Prompt(p))),
        proptest::collection::vec(
            (text(8), text(32)).prop_map(|(role, content)| pb::ChatMessage { role, content }),
            0..4
        )
        .prop_map(|messages| Some(pb::generate_request::Input::Chat(pb::Chat { messages }))),
    ];
    let sampling = (
        proptest::option::of(float()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(float()),
        proptest::option::of(float()),
        proptest::option::of(float()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)| {
                pb::Sampling {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty,
                    repeat_last_n,
                    seed,
                }
            },
        );
    use pb::constraint::Kind;
    let constraint = proptest::option::of(
        prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(Kind::JsonObject(b))),
            text(40).prop_map(|t| Some(Kind::JsonSchema(t))),
            Just(Some(Kind::JsonSchema(r#"{"type": "object"}"#.into()))),
            text(40).prop_map(|t| Some(Kind::Regex(t))),
            text(40).prop_map(|t| Some(Kind::Lark(t))),
        ]
        .prop_map(|kind| pb::Constraint { kind }),
    );
    (
        text(24),
        mix,
        input,
        proptest::option::of(sampling),
        prop_oneof![Just(0u32), 1u32..10_000, any::<u32>()],
        proptest::collection::vec(text(24), 0..24),
        constraint,
    )
        .prop_map(
            |(adapter, mix, input, sampling, max_tokens, stop, constraint)| pb::GenerateRequest {
                adapter,
                mix,
                input,
                sampling,
                max_tokens,
                stop,
                constraint,
            },
        )
}

/// Header values: what a client may put in `grpc-timeout` and
/// `x-svfit-adapter` (any bytes a header may carry).
fn header() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(prop_oneof![
        proptest::string::string_regex("[0-9]{0,14}[HMSmun]?")
            .unwrap()
            .prop_map(String::into_bytes),
        proptest::collection::vec(
            any::<u8>().prop_filter("a header byte", |b| *b == b'\t'
                || (0x20..0x7f).contains(b)
                || *b >= 0x80),
            0..24
        ),
    ])
}

/// Limits small enough that random requests reach them.
fn small_limits() -> Limits {
    Limits {
        stop_strings: 4,
        stop_bytes: 16,
        mix_parts: 3,
        constraint_bytes: 24,
        prompt_bytes: 48,
        chat_messages: 2,
        max_tokens: 4096,
        max_tokens_default: 64,
        ..Limits::default()
    }
}

#[test]
fn request_validation() {
    let _machine = crate::common::shared();
    let limits = small_limits();
    let callers = [
        Caller {
            tenant: "alice".into(),
            admin: false,
        },
        Caller {
            tenant: "root".into(),
            admin: true,
        },
    ];
    let strategy = (request(), header(), header(), 0..2usize);
    fuzz("request", strategy, |(body, timeout, adapter, who)| {
        let mut metadata = MetadataMap::new();
        for (name, value) in [("grpc-timeout", timeout), ("x-svfit-adapter", adapter)] {
            if let Some(v) =
                value.and_then(|v| tonic::metadata::MetadataValue::try_from(&v[..]).ok())
            {
                metadata.insert(name, v);
            }
        }
        let caller = &callers[who];
        let Ok(valid) = validation::validate(body, &metadata, caller, &limits) else {
            return Ok(());
        };
        prop_assert!(valid.stop.len() <= limits.stop_strings);
        prop_assert!(valid.stop.iter().all(|s| s.len() <= limits.stop_bytes));
        prop_assert!((1..=limits.max_tokens).contains(&valid.max_tokens));
        prop_assert!(valid.sampling.validate().is_ok());
        match &valid.constraint {
            None | Some(Spec::JsonObject) => {}
            Some(Spec::JsonSchema(schema)) => prop_assert!(schema.is_object() || *schema == true),
            Some(Spec::Regex(text) | Spec::Lark(text)) => {
                prop_assert!(!text.trim().is_empty() && text.len() <= limits.constraint_bytes)
            }
        }
        if let Some(deadline) = valid.deadline {
            prop_assert!(deadline <= Instant::now() + validation::MAX_DEADLINE);
        }
        let named = |tenant: &str, id: &str| {
            svfit::store::check_name("tenant", tenant).is_ok()
                && svfit::store::check_name("adapter id", id).is_ok()
                && (caller.admin || tenant == caller.tenant)
        };
        match &valid.adapter {
            AdapterChoice::Base => {}
            AdapterChoice::One(tenant, id) => prop_assert!(named(tenant, id)),
            AdapterChoice::Mix(parts) => {
                prop_assert!(!parts.is_empty() && parts.len() <= limits.mix_parts);
                let distinct: std::collections::HashSet<_> =
                    parts.iter().map(|(t, i, _)| (t, i)).collect();
                prop_assert_eq!(distinct.len(), parts.len());
                for (tenant, id, weight) in parts {
                    prop_assert!(named(tenant, id));
                    prop_assert!(weight.is_finite() && weight.abs() <= validation::MAX_MIX_WEIGHT);
                }
            }
        }
        Ok(())
    });
}

/// Constraints from random text and random JSON, compiled against the
/// default model's vocabulary: each gives a constraint or an error, never
/// a panic; a compiled one masks logits and takes a token it allows.
#[test]
fn constraint_compilation() {
    use svfit::constraint::Compiler;
    let _machine = crate::common::shared();
    let tokenizer = svfit::model::Tokenizer::load(&common::default_model()).unwrap();
    let compiler = Compiler::new(&tokenizer).unwrap();
    let n_vocab = tokenizer.n_vocab() as usize;
    let regex = proptest::string::string_regex(r"[a-z0-9()|*+?{}\\\[\]^$.,: -]{0,24}").unwrap();
    let lark = proptest::string::string_regex(r#"(start: )?[a-z"|()*+?%{}:/ \n]{0,32}"#).unwrap();
    let keyword = prop_oneof![
        Just("type"),
        Just("properties"),
        Just("required"),
        Just("items"),
        Just("enum"),
        Just("minimum"),
        Just("maxLength"),
        Just("pattern"),
        Just("$ref"),
        Just("anyOf"),
        Just("additionalProperties"),
    ];
    let schema = proptest::collection::vec((keyword, json_value()), 0..4).prop_map(|kv| {
        serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    });
    let spec = prop_oneof![
        regex.prop_map(Spec::Regex),
        lark.prop_map(Spec::Lark),
        schema.prop_map(Spec::JsonSchema),
        json_value().prop_map(Spec::JsonSchema),
    ];
    fuzz("constraint", spec, |spec| {
        let Ok(mut constraint) = compiler.compile(&spec) else {
            return Ok(());
        };
        let mut logits = vec![0f32; n_vocab];
        if constraint.mask(&mut logits).is_ok() {
            if let Some(token) = logits.iter().position(|l| l.is_finite()) {
                let _ = constraint.consume(token as u32);
            }
        }
        Ok(())
    });
}

/// A JSON value of OpenAI's request fields (and others), nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-3i64..30).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text(12).prop_map(Value::String),
        Just(json!("user")),
        Just(json!("text")),
        Just(json!("tool")),
        Just(json!("function")),
        Just(json!("required")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((field_name(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    const KNOWN: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "include_usage",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "tool_calls",
        "tool_call_id",
        "function",
        "name",
        "parameters",
        "arguments",
        "response_format",
        "svfit",
        "mix",
        "adapter",
        "weight",
        "role",
        "content",
        "type",
        "text",
        "echo",
        "suffix",
        "best_of",
    ];
    prop_oneof![
        4 => proptest::sample::select(KNOWN).prop_map(str::to_string),
        1 => text(8),
    ]
}

#[test]
fn openai_request_bodies() {
    let _machine = crate::common::shared();
    let limits = small_limits();
    let caller = Caller {
        tenant: "alice".into(),
        admin: false,
    };
    let object = proptest::collection::vec((field_name(), json_value()), 0..10).prop_map(|kv| {
        serde_json::Value::Object(kv.into_iter().collect())
            .to_string()
            .into_bytes()
    });
    let bodies = prop_oneof![4 => object, 1 => mutated(corpus("openai"))];
    fuzz("openai", (bodies, any::<bool>()), |(bytes, chat)| {
        let endpoint = if chat {
            Endpoint::Chat
        } else {
            Endpoint::Completions
        };
        let Ok(parsed) = openai::parse(endpoint, &bytes, "base.gguf") else {
            return Ok(());
        };
        prop_assert!(parsed.body.input.is_some());
        prop_assert!(parsed
            .logprobs
            .is_none_or(|n| n <= svfit::sampling::MAX_TOP_LOGPROBS));
        prop_assert!(parsed.body.adapter.is_empty() || parsed.body.mix.is_empty());
        if let Ok(valid) = validation::validate(parsed.body, &MetadataMap::new(), &caller, &limits)
        {
            prop_assert!(valid.sampling.validate().is_ok());
            prop_assert!(valid.stop.len() <= limits.stop_strings);
        }
        Ok(())
    });
}

#[test]
fn stop_strings_in_streamed_text() {
    let _machine = crate::common::shared();
    let pieces = proptest::collection::vec(
        prop_oneof![
            text(6).prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..4),
        ],
        0..24,
    );
    let stops = proptest::collection::vec(text(6), 0..5);
    fuzz("stop", (pieces, stops), |(pieces, stops)| {
        let mut stream = TextStream::new(&stops);
        let mut emitted = String::new();
        let mut stopped = false;
        for piece in &pieces {
            if stream.push(piece, &mut |t: &str| emitted.push_str(t)) {
                stopped = true;
                break;
            }
        }
        let text = stream.finish(!stopped, &mut |t: &str| emitted.push_str(t));
        prop_assert_eq!(&emitted, &text, "everything kept is emitted, once");
        for stop in stops.iter().filter(|s| !s.is_empty()) {
            prop_assert!(!text.contains(stop.as_str()), "'{}' in {:?}", stop, text);
        }
        Ok(())
    });
}

/// Rewrites the seed files of the byte targets.
#[test]
#[ignore]
fn write_corpus() {
    let _machine = crate::common::shared();
    let (key, singular) = fuzz_factors();
    let dir = corpus_dir("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let mut identity = Adapter::identity(&key, &singular);
    identity.write(&dir.join("identity.safetensors")).unwrap();
    identity
        .info
        .insert(svfit::store::VERSION_KEY.into(), "7".into());
    for (_, sigma) in identity.sigma.iter_mut() {
        sigma.iter_mut().for_each(|v| *v *= 1.5);
    }
    identity.write(&dir.join("scaled-v7.safetensors")).unwrap();

    let dir = corpus_dir("gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = common::Shape {
        n_vocab: 32,
        n_embd: 32,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 32,
        n_layer: 1,
        n_ctx: 64,
        ..common::TINY
    };
    common::write_tiny_model(&dir.join("tiny-llama.gguf"), &spec);
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3] {
        let shape = common::Shape {
            arch: arch.name(),
            // Gemma's heads wider than n_embd / n_head, as its files have.
            head_dim: (arch == Arch::Gemma3).then_some(32),
            ..spec.clone()
        };
        let path = dir.join(format!("tiny-{}.gguf", arch.name()));
        common::write_tiny_model(&path, &shape);
    }

    let dir = corpus_dir("openai");
    std::fs::create_dir_all(&dir).unwrap();
    let seeds = [
        serde_json::json!({"model": "a1", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2}),
        serde_json::json!({"model": "base.gguf", "prompt": ["Once"], "stop": ["\n", "END"],
            "svfit": {"mix": [{"adapter": "a", "weight": 0.5}, {"adapter": "b", "weight": 0.5}]},
            "logprobs": 3, "seed": 7, "top_p": 0.9, "n": 1, "user": "u"}),
        serde_json::json!({"model": "a1", "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c0",
                    "type": "function", "function": {"name": "w", "arguments": "{\"c\": 1}"}}]},
                {"role": "tool", "tool_call_id": "c0", "content": "sunny"}],
            "tools": [{"type": "function", "function": {"name": "w", "description": "d",
                "parameters": {"type": "object", "properties": {"c": {"type": "integer"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "w"}},
            "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object"}}}}),
    ];
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("request-{i}.json")), seed.to_string()).unwrap();
    }
}
