//! The training bench's own tasks (`examples/review-sentiment`,
//! `examples/dates`): their generators give the same bytes for the same
//! arguments, balanced labels, and held-out splits that training never sees.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Runs `examples/NAME/make-data.py --out DIR`; {split: [(prompt, completion)]}.
fn make(name: &str, out: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}/make-data.py"));
    let run = Command::new("python3")
        .arg(&script)
        .arg("--out")
        .arg(out)
        .output()
        .expect("python3 runs");
    assert!(
        run.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    ["train", "dev", "eval"]
        .into_iter()
        .map(|split| {
            let text = std::fs::read_to_string(out.join(format!("{split}.jsonl"))).unwrap();
            let rows = text
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        v["prompt"].as_str().unwrap().to_string(),
                        v["completion"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (split.to_string(), rows)
        })
        .collect()
}

/// The text after the instruction: the sentence or the date.
fn item(prompt: &str) -> &str {
    prompt.rsplit_once(": ").map_or(prompt, |(_, x)| x)
}

fn same_bytes_twice(name: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let dir = tempfile::tempdir().unwrap();
    let first = make(name, &dir.path().join("a"));
    let again = make(name, &dir.path().join("b"));
    for split in ["train", "dev", "eval"] {
        let read = |d: &str| std::fs::read(dir.path().join(d).join(format!("{split}.jsonl")));
        assert_eq!(read("a").unwrap(), read("b").unwrap(), "{name} {split}");
    }
    assert_eq!(first, again);
    first
}

#[test]
fn review_sentiment_is_balanced_and_holds_out_words_and_phrasings() {
    let _machine = crate::common::shared();
    let splits = same_bytes_twice("review-sentiment");
    let words = |split: &str| -> BTreeSet<String> {
        splits[split]
            .iter()
            .flat_map(|(p, _)| item(p).split(|c: char| !c.is_alphabetic()))
            .map(str::to_lowercase)
            .collect()
    };
    let train_words = words("train");
    let train_sentences: BTreeSet<_> = splits["train"].iter().map(|(p, _)| item(p)).collect();
    for (split, n) in [("train", 600), ("dev", 200), ("eval", 200)] {
        let rows = &splits[split];
        assert_eq!(rows.len(), n, "{split}");
        let positive = rows.iter().filter(|(_, c)| c == "positive").count();
        assert_eq!(positive * 2, n, "{split} is balanced");
        assert!(rows.iter().all(|(_, c)| c == "positive" || c == "negative"));
        if split != "train" {
            // Adjectives and some phrasings of the held-out splits are new.
            let new: Vec<_> = words(split).difference(&train_words).cloned().collect();
            assert!(new.len() >= 20, "{split}: only {new:?} unseen");
            assert!(rows.iter().all(|(p, _)| !train_sentences.contains(item(p))));
        }
    }
    // The label is the sentence's, not a word's: a negation turns it.
    let (p, c) = splits["train"]
        .iter()
        .find(|(p, _)| item(p).contains(" not ") && item(p).ends_with(" at all."))
        .expect("a negated sentence");
    let adjective = item(p).split_whitespace().rev().nth(2).unwrap();
    let plain = splits["train"]
        .iter()
        .find(|(q, _)| item(q).ends_with(&format!(" was {adjective}.")));
    if let Some((_, d)) = plain {
        assert_ne!(c, d, "{p} against the plain sentence");
    }
}

#[test]
fn dates_are_right_and_eval_has_forms_training_never_has() {
    let _machine = crate::common::shared();
    let splits = same_bytes_twice("dates");
    let months = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    for (split, rows) in &splits {
        for (prompt, iso) in rows {
            let date = item(prompt);
            let parts: Vec<u32> = iso.split('-').map(|x| x.parse().unwrap()).collect();
            let [year, month, day] = parts[..] else {
                panic!("{split}: {iso} is not YYYY-MM-DD")
            };
            assert!(
                (1900..=2099).contains(&year)
                    && (1..=12).contains(&month)
                    && (1..=31).contains(&day)
            );
            assert!(date.contains(&year.to_string()), "{split}: {date} -> {iso}");
            let name = months[month as usize - 1];
            let numeric = [format!("{month:02}"), format!("{day:02}")];
            assert!(
                date.contains(&name[..3]) || numeric.iter().all(|x| date.contains(x.as_str())),
                "{split}: {date} -> {iso}"
            );
        }
    }
    let train_dates: BTreeSet<_> = splits["train"].iter().map(|(p, _)| item(p)).collect();
    for split in ["dev", "eval"] {
        let repeated: Vec<_> = splits[split]
            .iter()
            .map(|(p, _)| item(p))
            .filter(|d| train_dates.contains(d))
            .collect();
        assert!(
            repeated.is_empty(),
            "{split} repeats training dates: {repeated:?}"
        );
    }
    let spelled = |split: &str| {
        splits[split]
            .iter()
            .filter(|(p, _)| {
                ["first of", "third of", "tenth of"]
                    .iter()
                    .any(|w| item(p).contains(w))
            })
            .count()
    };
    assert_eq!(spelled("train"), 0, "ordinals in words are held out");
    assert!(spelled("eval") > 0);
    let year_first = |split: &str| {
        splits[split]
            .iter()
            .filter(|(p, _)| {
                item(p).starts_with(|c: char| c.is_ascii_digit()) && item(p).contains(", ")
            })
            .count()
    };
    assert_eq!(year_first("train"), 0);
    assert!(year_first("eval") > 0);
}
