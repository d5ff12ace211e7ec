//! The engine's KV cache and batch semantics on the tiny model: full caches
//! and bad tokens are errors that change nothing, sequences free their cells,
//! and interleaved batches give the same rows as grouped ones.

use crate::common;

use svfit::model::{Batch, LoadOptions, Model, ModelError};

fn tiny() -> (common::TempDir, Model) {
    let (dir, path) = common::tiny_model();
    let model = Model::load(
        &path,
        &LoadOptions {
            device: "cpu".into(),
            threads: 2,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    (dir, model)
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    common::Rng::new(seed).tokens(n, common::TINY.n_vocab)
}

#[test]
fn full_cache_is_an_error_that_changes_nothing() {
    let _machine = crate::common::shared();
    let (_dir, mut model) = tiny();
    let mut cache = model.new_cache(128).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(&tokens(100, 1), 0, 0, false);
    model.decode(&mut cache, &batch).unwrap();
    assert_eq!(cache.seq_len(0), 100);
    assert_eq!(cache.n_free(), 0);

    batch.clear();
    batch.add_sequence(&tokens(10, 2), 0, 1, false);
    let err = model.decode(&mut cache, &batch).unwrap_err();
    assert!(matches!(err, ModelError::CacheFull { .. }), "{err}");
    assert!(err.to_string().contains("context is full"), "{err}");
    assert_eq!((cache.seq_len(0), cache.seq_len(1)), (100, 0));

    cache.remove_seq(0);
    assert_eq!(cache.n_free(), 128);
    model.decode(&mut cache, &batch).unwrap();
    assert_eq!(cache.seq_len(1), 10);
}

#[test]
fn invalid_token_is_an_error_that_changes_nothing() {
    let _machine = crate::common::shared();
    let (_dir, mut model) = tiny();
    let mut cache = model.new_cache(256).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(&tokens(5, 3), 0, 0, false);
    model.decode(&mut cache, &batch).unwrap();
    batch.clear();
    batch.add(common::TINY.n_vocab as u32, 5, 0, true);
    let err = model.decode(&mut cache, &batch).unwrap_err();
    assert!(matches!(err, ModelError::InvalidToken { .. }), "{err}");
    assert_eq!(cache.seq_len(0), 5);
    assert!(
        model.decode(&mut cache, &Batch::new()).is_err(),
        "empty batch"
    );
}

#[test]
fn interleaved_batch_gives_the_rows_of_a_grouped_one() {
    let _machine = crate::common::shared();
    let (_dir, mut model) = tiny();
    let (a, b) = (tokens(6, 4), tokens(6, 5));
    let mut interleaved = Batch::new();
    let mut grouped = Batch::new();
    for i in 0..6 {
        interleaved.add(a[i], i, 7, true);
        interleaved.add(b[i], i, 9, true);
    }
    grouped.add_sequence(&a, 0, 7, true);
    grouped.add_sequence(&b, 0, 9, true);
    let mut cache = model.new_cache(256).unwrap();
    let x = model.decode(&mut cache, &interleaved).unwrap();
    let mut cache = model.new_cache(256).unwrap();
    let y = model.decode(&mut cache, &grouped).unwrap();
    for i in 0..6 {
        assert_eq!(x.row(2 * i), y.row(i), "sequence 7, token {i}");
        assert_eq!(x.row(2 * i + 1), y.row(6 + i), "sequence 9, token {i}");
    }
}

#[test]
fn many_sequences_in_one_batch_match_each_alone() {
    let _machine = crate::common::shared();
    let (_dir, mut model) = tiny();
    // More sequences than the graph is first sized for (it grows).
    let seqs: Vec<Vec<u32>> = (0..20).map(|s| tokens(3 + s % 4, 100 + s as u64)).collect();
    let mut batch = Batch::new();
    for (s, t) in seqs.iter().enumerate() {
        batch.add_sequence(t, 0, s as u32, true);
    }
    let mut cache = model.new_cache(20 * 64).unwrap();
    let together = model.decode(&mut cache, &batch).unwrap();
    let mut row = 0;
    for (s, t) in seqs.iter().enumerate() {
        let mut alone = Batch::new();
        alone.add_sequence(t, 0, 0, true);
        let mut cache = model.new_cache(64).unwrap();
        let logits = model.decode(&mut cache, &alone).unwrap();
        for i in 0..t.len() {
            assert_eq!(together.row(row), logits.row(i), "sequence {s}, token {i}");
            row += 1;
        }
    }
}
