//! Generation of one sequence: prefill the prompt in chunks, then sample
//! token by token, streaming text until an end-of-generation token, a stop
//! string, the token limit or the end of the context.

use crate::constraint::{Constraint, ConstraintError};
use crate::model::{Batch, KvCache, Model, ModelError, Slots, Tokenizer};
use crate::sampling::{Sampler, SamplingParams};

/// Prompt tokens decoded per graph run during prefill.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Stop,
    /// One of the stop strings appeared.
    StopString,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    Context,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::StopString => "stop_string",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// Why a sequence takes no more tokens: it finished, or its constraint
/// failed (a limit of the matcher reached mid-answer).
#[derive(Debug)]
pub enum Ended {
    Finished(FinishReason),
    Failed(ConstraintError),
}

impl From<FinishReason> for Ended {
    fn from(finish: FinishReason) -> Self {
        Ended::Finished(finish)
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// The slots to run with (0 and 0: the base model).
    pub adapter: Slots,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens; the context holds {n_ctx} (leave room for at least one generated token)")]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Checks that `prompt` fits a context of `n_ctx` tokens with room to generate.
pub fn check_prompt(prompt: &[u32], n_ctx: usize) -> Result<(), GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() >= n_ctx {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            n_ctx,
        });
    }
    Ok(())
}

/// Runs `request` alone in `cache` (which it clears), calling `on_text` with
/// each new piece of text as soon as it is known not to be part of a stop
/// string.
pub fn generate(
    model: &mut Model,
    cache: &mut KvCache,
    tokenizer: &Tokenizer,
    request: &Request,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let n_ctx = cache.size().min(model.config().n_ctx_train);
    let mut sequence = Sequence::new(request, n_ctx)?;
    cache.clear();
    const SEQ: u32 = 0;
    // Room for the whole generation up front: the sequence never moves.
    cache.reserve(SEQ, sequence.reservation())?;

    let mut logits = None;
    let mut batch = Batch::new();
    while let Some((start, chunk)) = sequence.next_prefill_chunk() {
        batch.clear();
        batch.add_sequence(chunk, start, SEQ, false);
        batch.set_slots(SEQ, request.adapter);
        logits = Some(model.decode(cache, &batch)?);
    }
    let mut logits = logits.expect("a non-empty prompt has one chunk");
    loop {
        match sequence.advance(logits.row(0), tokenizer, &mut on_text) {
            Ok(token) => {
                batch.clear();
                batch.add(token, sequence.position(), SEQ, true);
                batch.set_slots(SEQ, request.adapter);
                logits = model.decode(cache, &batch)?;
            }
            Err(Ended::Finished(finish)) => return Ok(sequence.finish(finish, &mut on_text)),
            Err(Ended::Failed(e)) => return Err(e.into()),
        }
    }
}

/// One sequence's generation state, shared by [`generate`] and the
/// serving engine so that both make exactly the same choices: prefill in
/// chunks of [`PREFILL_CHUNK`], then one sampled token per step.
pub struct Sequence {
    prompt: Vec<u32>,
    prefilled: usize,
    max_tokens: usize,
    n_ctx: usize,
    sampler: Sampler,
    history: Vec<u32>,
    tokens: Vec<u32>,
    text: TextStream,
    /// What the answer must match, if anything.
    constraint: Option<Constraint>,
    /// Time spent masking logits since [`Sequence::take_mask_time`].
    mask_time: std::time::Duration,
}

impl Sequence {
    /// Checks the prompt against a context of `n_ctx` tokens and the
    /// sampling parameters.
    pub fn new(request: &Request, n_ctx: usize) -> Result<Self, GenerateError> {
        check_prompt(&request.prompt, n_ctx)?;
        request
            .sampling
            .validate()
            .map_err(GenerateError::Sampling)?;
        Ok(Sequence {
            prompt: request.prompt.clone(),
            prefilled: 0,
            max_tokens: request.max_tokens,
            n_ctx,
            sampler: Sampler::new(request.sampling.clone()),
            history: request.prompt.clone(),
            tokens: Vec::new(),
            text: TextStream::new(&request.stop),
            constraint: None,
            mask_time: std::time::Duration::ZERO,
        })
    }

    /// Constrains the tokens sampled from now on (see [`crate::constraint`]).
    pub fn constrain(&mut self, constraint: Option<Constraint>) {
        self.constraint = constraint;
    }

    /// The time spent computing and applying the constraint's masks since
    /// the last call.
    pub fn take_mask_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.mask_time)
    }

    /// KV cells the whole generation can use: prompt + max tokens, at most
    /// the context.
    pub fn reservation(&self) -> usize {
        (self.prompt.len() + self.max_tokens).min(self.n_ctx)
    }

    /// The next prompt chunk to decode (start position, tokens); the logits
    /// of its last token matter only for the last chunk.
    pub fn next_prefill_chunk(&mut self) -> Option<(usize, &[u32])> {
        let start = self.prefilled;
        if start >= self.prompt.len() {
            return None;
        }
        let end = (start + PREFILL_CHUNK).min(self.prompt.len());
        self.prefilled = end;
        Some((start, &self.prompt[start..end]))
    }

    /// Marks the first `n` prompt tokens as prefilled already (their cells
    /// came from the prefix cache); at least one token stays to prefill,
    /// for the logits.
    pub fn skip_prefill(&mut self, n: usize) {
        self.prefilled = n.min(self.prompt.len().saturating_sub(1));
    }

    /// The prompt and the tokens generated so far.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Whether the whole prompt has been handed out.
    pub fn prefill_done(&self) -> bool {
        self.prefilled >= self.prompt.len()
    }

    /// Position of the last token (the one to decode next after `advance`).
    pub fn position(&self) -> usize {
        self.history.len() - 1
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens
    }

    /// Samples the next token from the logits of the last one (among the
    /// tokens the constraint allows, if there is one). `Ok(token)`: decode
    /// it next; `Err(ended)`: the generation is over.
    pub fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        on_text: &mut impl FnMut(&str),
    ) -> Result<u32, Ended> {
        if self.tokens.len() >= self.max_tokens {
            return Err(FinishReason::Length.into());
        }
        let token = match &mut self.constraint {
            None => self.sampler.sample(logits, &self.history),
            Some(constraint) => {
                let start = std::time::Instant::now();
                let mut allowed = logits.to_vec();
                let masked = constraint.mask(&mut allowed);
                self.mask_time += start.elapsed();
                masked.map_err(Ended::Failed)?;
                self.sampler.sample(&allowed, &self.history)
            }
        };
        if tokenizer.is_eog(token) {
            return Err(FinishReason::Stop.into());
        }
        let complete = match &mut self.constraint {
            None => false,
            Some(constraint) => constraint.consume(token).map_err(Ended::Failed)?,
        };
        self.tokens.push(token);
        self.history.push(token);
        if self.text.push(&tokenizer.piece(token), on_text) {
            return Err(FinishReason::StopString.into());
        }
        if complete {
            return Err(FinishReason::Stop.into());
        }
        if self.history.len() >= self.n_ctx {
            return Err(FinishReason::Context.into());
        }
        Ok(token)
    }

    /// Ends the generation: flushes held-back text (unless a stop string
    /// ended it).
    pub fn finish(self, finish: FinishReason, on_text: &mut impl FnMut(&str)) -> Generation {
        let text = self
            .text
            .finish(finish != FinishReason::StopString, on_text);
        Generation {
            tokens: self.tokens,
            text,
            finish,
        }
    }
}

/// Turns token bytes into text: emits only complete UTF-8, holds back a tail
/// that may be the start of a stop string, and cuts at the first stop string.
pub struct TextStream {
    stop: Vec<String>,
    pending: Vec<u8>,
    text: String,
    emitted: usize,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        TextStream {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a token's bytes; returns true when a stop string completed (the
    /// text is then cut before it).
    pub fn push(&mut self, bytes: &[u8], on_text: &mut impl FnMut(&str)) -> bool {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // Invalid bytes (not just an unfinished character): replace them.
                let lossy = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.text.push_str(&lossy);
                return self.advance(on_text);
            }
            Err(e) => e.valid_up_to(),
        };
        let complete: Vec<u8> = self.pending.drain(..valid).collect();
        self.text
            .push_str(std::str::from_utf8(&complete).expect("checked above"));
        self.advance(on_text)
    }

    fn advance(&mut self, on_text: &mut impl FnMut(&str)) -> bool {
        let search_from = self
            .emitted
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        let hit = self
            .stop
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.emit_up_to(self.text.len(), on_text);
            return true;
        }
        // Hold back the longest tail that a stop string starts with.
        let text = &self.text;
        let held = self
            .stop
            .iter()
            .filter_map(|s| {
                (1..s.len().min(text.len() + 1))
                    .rev()
                    .filter(|&n| s.is_char_boundary(n))
                    .find(|&n| text.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0);
        self.emit_up_to(self.text.len() - held, on_text);
        false
    }

    fn emit_up_to(&mut self, end: usize, on_text: &mut impl FnMut(&str)) {
        if end > self.emitted {
            on_text(&self.text[self.emitted..end]);
            self.emitted = end;
        }
    }

    /// Flushes what is held back (unless the stream stopped on a stop string)
    /// and returns the whole text.
    pub fn finish(mut self, flush: bool, on_text: &mut impl FnMut(&str)) -> String {
        if flush {
            if !self.pending.is_empty() {
                let rest = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.text.push_str(&rest);
                // The replacement characters may complete a stop string.
                if self.advance(on_text) {
                    return self.text;
                }
            }
            self.emit_up_to(self.text.len(), on_text);
        }
        self.text
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], stop: &[&str]) -> (Vec<String>, String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut stream = TextStream::new(&stop);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            if stream.push(p, &mut |t: &str| out.push(t.to_string())) {
                stopped = true;
                break;
            }
        }
        let text = stream.finish(!stopped, &mut |t: &str| out.push(t.to_string()));
        (out, text, stopped)
    }

    #[test]
    fn split_utf8_is_emitted_whole() {
        let euro = "€".as_bytes();
        let (out, text, _) = run(&[b"a", &euro[..1], &euro[1..], b"b"], &[]);
        assert_eq!(text, "a€b");
        assert_eq!(out, vec!["a", "€", "b"]);
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_emitted() {
        let (out, text, stopped) = run(&[b"Hello ", b"EN", b"D tail"], &["END"]);
        assert!(stopped);
        assert_eq!(text, "Hello ");
        assert_eq!(out.concat(), "Hello ");
    }

    #[test]
    fn multibyte_stop_strings_hold_back_and_cut_on_char_boundaries() {
        let (out, text, stopped) = run(&[b"caf", "é!".as_bytes()], &["é!", "éa"]);
        assert!(stopped);
        assert_eq!(text, "caf");
        assert_eq!(out.concat(), "caf");
        let (out, text, stopped) = run(&[b"x", "é".as_bytes(), b"y"], &["é!", "€", "日本"]);
        assert!(!stopped);
        assert_eq!(text, "xéy");
        assert_eq!(out, vec!["x", "éy"]);
    }

    #[test]
    fn a_stop_string_completed_by_the_final_flush_is_cut() {
        // Found by tests/it/fuzz.rs: an unfinished character becomes U+FFFD.
        let (out, text, _) = run(&[b"ok", &[194]], &["\u{FFFD}"]);
        assert_eq!(text, "ok");
        assert_eq!(out.concat(), "ok");
    }

    #[test]
    fn held_back_prefix_is_flushed_when_no_stop_follows() {
        let (out, text, stopped) = run(&[b"Hi E", b"N"], &["END"]);
        assert!(!stopped);
        assert_eq!(text, "Hi EN");
        assert_eq!(out.concat(), "Hi EN");
    }
}
