//! Constrained decoding: a request's JSON schema, regular expression or
//! Lark grammar, compiled by llguidance against the model's vocabulary,
//! masks each step's logits so that only the tokens it allows can be
//! sampled, and ends the answer when it is complete.
//!
//! A [`Compiler`] holds the vocabulary's token trie, built once per model;
//! each request compiles its [`Spec`] into a [`Constraint`] (its own
//! matcher) before it reaches the engine, so a slow grammar costs its own
//! request the time, not the batch. Compile and per-token work are bounded
//! by llguidance's limits (grammar size, lexer fuel, Earley items); a
//! constraint that exceeds them is refused, or ends its own sequence.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::model::Tokenizer;

/// What an answer must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid under this JSON Schema.
    JsonSchema(Value),
    /// Text matching this regular expression (whole).
    Regex(String),
    /// Text of this grammar, in llguidance's Lark dialect.
    Lark(String),
}

impl Spec {
    /// The grammar llguidance compiles.
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Spec::JsonObject => TopLevelGrammar::from_json_schema(json_options(
                serde_json::json!({"type": "object"}),
            )),
            Spec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(json_options(schema.clone()))
            }
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// JSON may hold whitespace between its tokens as a model writes it
/// unconstrained, compact or indented: one space, or one line break and up
/// to 16 spaces or tabs. No more: a model cannot spend its tokens on blank
/// lines. A schema's own `x-guidance` options (llguidance's) win.
pub fn json_options(mut schema: Value) -> Value {
    if let Value::Object(fields) = &mut schema {
        fields.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_pattern": r"\x20|\r?\n[\x20\t]{0,16}"}),
        );
    }
    schema
}

/// Why a constraint was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    #[error("the constraint does not compile: {0}")]
    Compile(String),
    #[error("the constraint failed while generating: {0}")]
    Step(String),
    #[error("the vocabulary's token trie could not be built: {0}")]
    Vocabulary(String),
}

/// Compiles constraints for one model's vocabulary.
pub struct Compiler {
    factory: ParserFactory,
    /// The end-of-generation tokens: allowed wherever the constraint may
    /// end (llguidance knows one of them).
    eog: Vec<u32>,
}

impl Compiler {
    /// Builds the vocabulary's token trie: each token's bytes, control
    /// tokens marked special (never text a grammar can produce).
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, ConstraintError> {
        let n = tokenizer.n_vocab();
        let mut words = Vec::with_capacity(n as usize);
        let mut eog = Vec::new();
        for token in 0..n {
            if tokenizer.is_eog(token) {
                eog.push(token);
            }
            let bytes = if tokenizer.is_control(token) {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend(tokenizer.piece(token));
                marked
            } else {
                tokenizer.piece(token)
            };
            words.push(bytes);
        }
        let eos = tokenizer.eos().or(eog.first().copied()).unwrap_or(0);
        let trie = TokTrie::from(&TokRxInfo::new(n, eos), &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        Ok(Compiler { factory, eog })
    }

    /// Compiles `spec` for one answer; the error names what llguidance
    /// refused (a schema feature, a syntax error, a limit).
    pub fn compile(&self, spec: &Spec) -> Result<Constraint, ConstraintError> {
        let parser = self
            .factory
            .create_parser(spec.grammar())
            .map_err(|e| ConstraintError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Compile(e));
        }
        Ok(Constraint {
            matcher,
            eog: self.eog.clone(),
        })
    }
}

/// One answer's constraint: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
    eog: Vec<u32>,
}

impl Constraint {
    /// Sets to -inf the logits of the tokens that may not come next; an
    /// end-of-generation token stays only where the answer may end.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let allowed: SimpleVob = self.matcher.compute_mask().map_err(step_error)?;
        let eos = allowed.is_allowed(self.matcher_eos());
        let eog: Vec<(usize, f32)> = self
            .eog
            .iter()
            .filter_map(|&t| Some((t as usize, *logits.get(t as usize)?)))
            .collect();
        // 32 tokens per word of the mask; tokens past it are not allowed.
        let words = allowed.as_slice();
        for (chunk, logits) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(chunk).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (bit, logit) in logits.iter_mut().enumerate() {
                if bits >> bit & 1 == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        for (token, logit) in eog {
            logits[token] = if eos { logit } else { f32::NEG_INFINITY };
        }
        Ok(())
    }

    /// Takes the sampled `token` (not an end-of-generation one); true when
    /// the answer is complete and nothing may follow.
    pub fn consume(&mut self, token: u32) -> Result<bool, ConstraintError> {
        self.matcher.consume_token(token).map_err(step_error)?;
        Ok(self.matcher.is_stopped())
    }

    /// The end-of-sequence token the matcher's trie knows.
    fn matcher_eos(&self) -> u32 {
        self.matcher
            .tok_env()
            .map_or(u32::MAX, |env| env.tok_trie().eos_token())
    }
}

fn step_error(e: anyhow::Error) -> ConstraintError {
    ConstraintError::Step(e.to_string())
}
