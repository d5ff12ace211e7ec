//! Scoring generated answers against reference completions (`svfit eval`):
//! exact answers after normalising case, outer spaces and a final '.' or
//! '!', and, when the completions look like class labels
//! ([`super::data::are_class_labels`]), the first label the answer names.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context as _;

/// `{"prompt","completion"}` records of a JSONL file, the first `limit`.
pub fn read_records(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) else {
            anyhow::bail!(
                "{}:{}: svfit eval needs {{\"prompt\",\"completion\"}} records",
                path.display(),
                i + 1
            );
        };
        records.push((prompt, completion));
    }
    records.truncate(limit.unwrap_or(usize::MAX));
    if records.is_empty() {
        anyhow::bail!("{}: no records", path.display());
    }
    Ok(records)
}

/// An answer or completion as compared.
pub fn normalize(s: &str) -> String {
    s.trim().trim_end_matches(['.', '!']).trim().to_lowercase()
}

/// Counts of exact and label-correct answers.
pub struct Scorer {
    /// The distinct completions, normalised.
    pub labels: BTreeSet<String>,
    /// Whether they are class labels (then `labelled` means something).
    pub classes: bool,
    pub examples: usize,
    pub exact: usize,
    pub labelled: usize,
}

impl Scorer {
    /// A scorer for answers to records with these completions.
    pub fn new<'a>(completions: impl IntoIterator<Item = &'a str>) -> Self {
        let mut n = 0;
        let labels: BTreeSet<String> = completions
            .into_iter()
            .inspect(|_| n += 1)
            .map(normalize)
            .collect();
        Scorer {
            classes: super::data::are_class_labels(labels.len(), n),
            labels,
            examples: 0,
            exact: 0,
            labelled: 0,
        }
    }

    /// Scores one answer.
    pub fn add(&mut self, answer: &str, completion: &str) {
        let (got, want) = (normalize(answer), normalize(completion));
        self.examples += 1;
        self.exact += usize::from(got == want);
        // The first class label the answer names, as a whole word.
        let named = self
            .classes
            .then(|| {
                self.labels
                    .iter()
                    .filter_map(|l| first_word_match(&got, l).map(|at| (at, l)))
                    .min()
                    .map(|(_, l)| l)
            })
            .flatten();
        self.labelled += usize::from(named == Some(&want));
    }
}

/// Byte offset of the first whole-word occurrence of `word` in `text`.
fn first_word_match(text: &str, word: &str) -> Option<usize> {
    let is_word = |c: char| c.is_alphanumeric();
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_named_as_whole_words_first_one_wins() {
        let completions = ["Sport", "sport.", "Tech", "tech", "business", "business"];
        let mut s = Scorer::new(completions);
        assert!(s.classes);
        s.add("Sport!", "sport");
        s.add("It is about sports and tech", "tech");
        s.add("business, then sport", "business");
        assert_eq!((s.examples, s.exact, s.labelled), (3, 1, 3));
        s.add("sportsmanship", "sport");
        assert_eq!(s.labelled, 3, "no whole-word label");
    }
}
