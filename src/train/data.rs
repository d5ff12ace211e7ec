//! Training data: JSONL records → token sequences with a loss mask, and
//! packing of examples into rows of at most `ctx` tokens.
//!
//! Each line is one of
//! - `{"prompt": P, "completion": C}`: P as a user turn of the model's chat
//!   template, C as the assistant's answer; loss on the answer (and the
//!   template's end of turn);
//! - `{"messages": [{"role": R, "content": X}, …]}`: the whole conversation
//!   through the template; loss on every assistant turn;
//! - `{"text": T}`: plain text, loss on every token.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::tokenizer::{Message, Tokenizer, TokenizerError};
use crate::model::TrainRow;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no usable examples ({skipped} lines skipped{first})", first = first.as_deref().map(|f| format!("; first: {f}")).unwrap_or_default())]
    Empty {
        path: PathBuf,
        skipped: usize,
        first: Option<String>,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// One JSONL record, as written by the user.
#[derive(Debug, Deserialize)]
struct Record {
    prompt: Option<String>,
    completion: Option<String>,
    messages: Option<Vec<RecordMessage>>,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RecordMessage {
    role: String,
    content: String,
}

/// A tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// `loss[i]`: whether predicting `tokens[i + 1]` counts.
    pub loss: Vec<bool>,
    /// The completion text of a prompt/completion record.
    pub completion: Option<String>,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.loss[..self.loss.len().saturating_sub(1)]
            .iter()
            .filter(|&&l| l)
            .count()
    }
}

/// A data file read and tokenized.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// `(line, reason)` of every skipped line.
    pub skipped: Vec<(usize, String)>,
    /// Examples whose prompt was cut at the front to fit `ctx`.
    pub truncated: usize,
    /// sha256 of the file's bytes.
    pub sha256: String,
}

impl Dataset {
    /// Reads `path` (JSONL). Lines that cannot be used are skipped and
    /// counted, or with `strict` fail the whole read with their line number.
    pub fn read(
        path: &Path,
        tokenizer: &Tokenizer,
        ctx: usize,
        strict: bool,
    ) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(path, std::io::BufReader::new(file), tokenizer, ctx, strict)
    }

    /// The same from `reader` (an uploaded file's bytes, say), named `path`
    /// in errors.
    pub fn from_reader(
        path: &Path,
        reader: impl std::io::BufRead,
        tokenizer: &Tokenizer,
        ctx: usize,
        strict: bool,
    ) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut hasher = Sha256::new();
        let mut data = Dataset {
            path: path.to_path_buf(),
            examples: Vec::new(),
            skipped: Vec::new(),
            truncated: 0,
            sha256: String::new(),
        };
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(io)?;
            hasher.update(&line);
            hasher.update(b"\n");
            let number = i + 1;
            let text = match std::str::from_utf8(&line) {
                Ok(t) if t.trim().is_empty() => continue,
                Ok(t) => t,
                Err(_) => {
                    data.skip(number, "not UTF-8".into(), strict)?;
                    continue;
                }
            };
            match parse(text, tokenizer, ctx) {
                Ok(Parsed { example, truncated }) => {
                    data.truncated += truncated as usize;
                    data.examples.push(example);
                }
                Err(reason) => data.skip(number, reason, strict)?,
            }
        }
        data.sha256 = format!("{:x}", hasher.finalize());
        if data.examples.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                skipped: data.skipped.len(),
                first: data.skipped.first().map(|(l, r)| format!("line {l}: {r}")),
            });
        }
        Ok(data)
    }

    fn skip(&mut self, line: usize, reason: String, strict: bool) -> Result<(), DataError> {
        if strict {
            return Err(DataError::Line {
                path: self.path.clone(),
                line,
                reason,
            });
        }
        self.skipped.push((line, reason));
        Ok(())
    }

    /// Moves the last `fraction` of the examples (after a shuffle with
    /// `seed`) into a held-out set.
    pub fn split_off(&mut self, fraction: f64, seed: u64) -> Dataset {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        shuffle(&mut order, seed);
        let n_eval = ((self.examples.len() as f64 * fraction).round() as usize)
            .clamp(1, self.examples.len().saturating_sub(1).max(1));
        let held: BTreeSet<usize> = order[order.len() - n_eval..].iter().copied().collect();
        let mut eval = Vec::with_capacity(n_eval);
        let mut train = Vec::with_capacity(self.examples.len() - n_eval);
        for (i, e) in std::mem::take(&mut self.examples).into_iter().enumerate() {
            if held.contains(&i) {
                eval.push(e);
            } else {
                train.push(e);
            }
        }
        self.examples = train;
        Dataset {
            path: self.path.clone(),
            examples: eval,
            skipped: Vec::new(),
            truncated: 0,
            sha256: self.sha256.clone(),
        }
    }

    /// Tokens in all examples.
    pub fn n_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.tokens.len()).sum()
    }

    /// The class labels, when every example is a prompt/completion pair and
    /// the completions take few distinct values (classification data:
    /// accuracy is then reported).
    pub fn labels(&self) -> Option<BTreeSet<String>> {
        let mut labels = BTreeSet::new();
        for e in &self.examples {
            labels.insert(e.completion.as_deref()?.trim().to_string());
        }
        are_class_labels(labels.len(), self.examples.len()).then_some(labels)
    }
}

/// Whether `distinct` completion values over `examples` records look like
/// class labels (few, each shared by several records): then accuracy is
/// reported.
pub fn are_class_labels(distinct: usize, examples: usize) -> bool {
    distinct <= 32 && distinct * 2 <= examples
}

struct Parsed {
    example: Example,
    truncated: bool,
}

fn parse(line: &str, tokenizer: &Tokenizer, ctx: usize) -> Result<Parsed, String> {
    let record: Record =
        serde_json::from_str(line).map_err(|e| format!("not a valid record: {e}"))?;
    let (pieces, completion) =
        match record {
            Record {
                prompt: Some(prompt),
                completion: Some(completion),
                messages: None,
                text: None,
            } => {
                if completion.is_empty() {
                    return Err("empty \"completion\"".into());
                }
                let messages = [
                    Message::new("user", &prompt),
                    Message::new("assistant", &completion),
                ];
                (chat_pieces(&messages, tokenizer)?, Some(completion))
            }
            Record {
                prompt: None,
                completion: None,
                messages: Some(messages),
                text: None,
            } => {
                let messages: Vec<Message> = messages
                    .iter()
                    .map(|m| match m.role.as_str() {
                        "system" | "user" | "assistant" => Ok(Message::new(&m.role, &m.content)),
                        other => Err(format!(
                            "message role '{other}' is not system, user or assistant"
                        )),
                    })
                    .collect::<Result<_, _>>()?;
                (chat_pieces(&messages, tokenizer)?, None)
            }
            Record {
                prompt: None,
                completion: None,
                messages: None,
                text: Some(text),
            } => (vec![(text, true)], None),
            _ => return Err(
                "expected exactly one of {\"prompt\",\"completion\"}, {\"messages\"} or {\"text\"}"
                    .into(),
            ),
        };
    let mut tokens: Vec<u32> = Vec::new();
    let mut loss = Vec::new();
    for (i, (text, counts)) in pieces.iter().enumerate() {
        for t in tokenizer.encode(text, i == 0) {
            // A token of a loss piece is predicted from the one before it.
            if *counts && !tokens.is_empty() {
                loss[tokens.len() - 1] = true;
            }
            tokens.push(t);
            loss.push(false);
        }
    }
    let example = Example {
        tokens,
        loss,
        completion,
    };
    fit(example, ctx)
}

/// Cuts an example that is longer than `ctx` at the front (keeping every
/// loss token); refuses one whose loss span alone is too long.
fn fit(mut e: Example, ctx: usize) -> Result<Parsed, String> {
    if e.n_targets() == 0 {
        return Err("no tokens to learn (empty answer or text)".into());
    }
    if e.tokens.len() <= ctx {
        return Ok(Parsed {
            example: e,
            truncated: false,
        });
    }
    let first_loss = e.loss.iter().position(|&l| l).unwrap_or(0);
    let cut = e.tokens.len() - ctx;
    if cut <= first_loss {
        e.tokens.drain(..cut);
        e.loss.drain(..cut);
    } else if first_loss == 0 {
        // Plain text: keep the first ctx tokens.
        e.tokens.truncate(ctx);
        e.loss.truncate(ctx);
    } else {
        return Err(format!(
            "{} tokens, and the part to learn does not fit --ctx {ctx}",
            e.tokens.len()
        ));
    }
    Ok(Parsed {
        example: e,
        truncated: true,
    })
}

/// The rendered conversation as `(text, loss)` pieces: template text without
/// loss, each assistant turn with loss. Needs a template that renders a
/// conversation as a prefix of its continuation (ChatML and most others).
fn chat_pieces(messages: &[Message], tokenizer: &Tokenizer) -> Result<Vec<(String, bool)>, String> {
    let template = |m: &[Message], open: bool| {
        tokenizer
            .apply_chat_template(m, open)
            .map_err(|e| e.to_string())
    };
    let mut pieces = Vec::new();
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template(&messages[..i], true)?;
        let after = template(&messages[..=i], false)?;
        let (Some(context), Some(answer)) =
            (before.strip_prefix(&done), after.strip_prefix(&before))
        else {
            return Err("the chat template does not render this conversation turn by turn".into());
        };
        if !context.is_empty() {
            pieces.push((context.to_string(), false));
        }
        pieces.push((answer.to_string(), true));
        done = after;
    }
    if pieces.iter().all(|(_, loss)| !loss) {
        return Err("no assistant message to learn".into());
    }
    Ok(pieces)
}

/// A packed row and the examples in it (their positions in the packed
/// sequence), in row order.
#[derive(Clone, Debug)]
pub struct Packed {
    pub row: TrainRow,
    pub examples: Vec<usize>,
}

/// Packs examples (in the given order) into rows of at most `ctx` tokens,
/// first fit.
pub fn pack<'e>(examples: impl IntoIterator<Item = &'e Example>, ctx: usize) -> Vec<Packed> {
    let mut rows: Vec<Packed> = Vec::new();
    for (i, e) in examples.into_iter().enumerate() {
        let fits = rows
            .iter()
            .position(|p| p.row.len() + e.tokens.len() <= ctx);
        let packed = match fits {
            Some(r) => &mut rows[r],
            None => {
                rows.push(Packed {
                    row: TrainRow::default(),
                    examples: Vec::new(),
                });
                rows.last_mut().expect("pushed")
            }
        };
        packed.row.push(&e.tokens, &e.loss);
        packed.examples.push(i);
    }
    rows
}

/// A deterministic Fisher–Yates shuffle (`Rng` from `seed`).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = crate::rng::Rng::new(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(tokens: usize, loss_from: usize) -> Example {
        Example {
            tokens: (0..tokens as u32).collect(),
            loss: (0..tokens).map(|i| i + 1 >= loss_from).collect(),
            completion: None,
        }
    }

    #[test]
    fn fit_cuts_the_prompt_and_keeps_the_answer() {
        let parsed = fit(example(10, 7), 6).unwrap();
        assert!(parsed.truncated);
        assert_eq!(parsed.example.tokens, vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(parsed.example.n_targets(), 3);
        assert!(fit(example(10, 2), 6).is_err());
    }

    #[test]
    fn pack_is_first_fit_and_keeps_losses() {
        let examples = [example(5, 3), example(4, 1), example(3, 2)];
        let rows = pack(&examples, 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].examples, vec![0, 2]);
        assert_eq!(rows[1].examples, vec![1]);
        let first = &rows[0].row;
        assert_eq!(first.len(), 8);
        assert_eq!(first.positions, vec![0, 1, 2, 3, 4, 0, 1, 2]);
        assert_eq!(first.segments, vec![0, 0, 0, 0, 0, 1, 1, 1]);
        let targets: usize = rows.iter().map(|r| r.row.targets.len()).sum();
        assert_eq!(
            targets,
            examples.iter().map(Example::n_targets).sum::<usize>()
        );
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 1);
        shuffle(&mut b, 1);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, (0..50).collect::<Vec<_>>());
    }
}
