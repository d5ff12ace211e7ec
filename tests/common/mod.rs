//! Shared test fixtures: a tiny random-weight llama GGUF written by the tests
//! themselves, the default model's path, and logit comparisons.

pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use svfit::ggml::gguf::GgufWriter;
use svfit::ggml::{self, Type};
use svfit::model::Logits;

/// Hyper-parameters of the tiny test model.
pub struct TinySpec {
    pub arch: &'static str,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_ctx: usize,
    pub seed: u64,
}

pub const TINY: TinySpec = TinySpec {
    arch: "llama",
    n_vocab: 512,
    n_embd: 64,
    n_head: 4,
    n_head_kv: 2,
    n_ff: 128,
    n_layer: 2,
    n_ctx: 512,
    seed: 42,
};

/// A deterministic normal generator for weights.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }

    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// Writes a tiny llama model with random weights in a mix of stored types
/// (f32, f16, q8_0, q4_1), tied embeddings, and no tokenizer ("no_vocab").
pub fn write_tiny_model(path: &Path, spec: &TinySpec) {
    let mut rng = Rng::new(spec.seed);
    let mut w = GgufWriter::new(256).unwrap();
    let arch = spec.arch;
    w.set_str("general.architecture", arch).unwrap();
    w.set_str("general.name", "svfit-tiny").unwrap();
    let u = |k: &str| format!("{arch}.{k}");
    w.set_u32(&u("block_count"), spec.n_layer as u32).unwrap();
    w.set_u32(&u("context_length"), spec.n_ctx as u32).unwrap();
    w.set_u32(&u("embedding_length"), spec.n_embd as u32)
        .unwrap();
    w.set_u32(&u("feed_forward_length"), spec.n_ff as u32)
        .unwrap();
    w.set_u32(&u("attention.head_count"), spec.n_head as u32)
        .unwrap();
    w.set_u32(&u("attention.head_count_kv"), spec.n_head_kv as u32)
        .unwrap();
    w.set_u32(
        &u("rope.dimension_count"),
        (spec.n_embd / spec.n_head) as u32,
    )
    .unwrap();
    w.set_u32(&u("vocab_size"), spec.n_vocab as u32).unwrap();
    w.set_f32(&u("rope.freq_base"), 10000.0).unwrap();
    w.set_f32(&u("attention.layer_norm_rms_epsilon"), 1e-5)
        .unwrap();
    w.set_str("tokenizer.ggml.model", "no_vocab").unwrap();

    let add = |w: &mut GgufWriter, name: &str, ty: Type, shape: &[usize], values: Vec<f32>| {
        let bytes = ggml::quantize(ty, &values, shape[0]).unwrap();
        let shape: Vec<i64> = shape.iter().map(|&n| n as i64).collect();
        w.add_tensor(name, ty, &shape, bytes).unwrap();
    };
    let (e, f, v) = (spec.n_embd, spec.n_ff, spec.n_vocab);
    let kv = spec.n_embd / spec.n_head * spec.n_head_kv;
    let norm = |rng: &mut Rng| (0..e).map(|_| 1.0 + 0.1 * rng.normal()).collect::<Vec<_>>();
    add(
        &mut w,
        "token_embd.weight",
        Type::Q8_0,
        &[e, v],
        rng.normals(e * v, 1.0),
    );
    add(
        &mut w,
        "output_norm.weight",
        Type::F32,
        &[e],
        norm(&mut rng),
    );
    let proj = |n_in: usize| 1.0 / (n_in as f32).sqrt();
    for l in 0..spec.n_layer {
        let name = |k: &str| format!("blk.{l}.{k}.weight");
        add(&mut w, &name("attn_norm"), Type::F32, &[e], norm(&mut rng));
        add(
            &mut w,
            &name("attn_q"),
            Type::F16,
            &[e, e],
            rng.normals(e * e, proj(e)),
        );
        add(
            &mut w,
            &name("attn_k"),
            Type::F16,
            &[e, kv],
            rng.normals(e * kv, proj(e)),
        );
        add(
            &mut w,
            &name("attn_v"),
            Type::Q8_0,
            &[e, kv],
            rng.normals(e * kv, proj(e)),
        );
        add(
            &mut w,
            &name("attn_output"),
            Type::Q4_1,
            &[e, e],
            rng.normals(e * e, proj(e)),
        );
        add(&mut w, &name("ffn_norm"), Type::F32, &[e], norm(&mut rng));
        add(
            &mut w,
            &name("ffn_gate"),
            Type::F32,
            &[e, f],
            rng.normals(e * f, proj(e)),
        );
        add(
            &mut w,
            &name("ffn_up"),
            Type::F32,
            &[e, f],
            rng.normals(e * f, proj(e)),
        );
        add(
            &mut w,
            &name("ffn_down"),
            Type::Q8_0,
            &[f, e],
            rng.normals(f * e, proj(f)),
        );
    }
    w.write(path).unwrap();
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("svfit-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny model in a fresh temp dir.
pub fn tiny_model() -> (TempDir, PathBuf) {
    let dir = TempDir::new("tiny");
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&path, &TINY);
    (dir, path)
}

/// The default model; CI fetches it with scripts/bootstrap.
pub fn default_model() -> PathBuf {
    let path = svfit::home::default_model_path();
    assert!(
        path.exists(),
        "the default model is missing at {}: run scripts/bootstrap",
        path.display()
    );
    path
}

/// How close two sets of logits rows are.
#[derive(Debug)]
pub struct Agreement {
    pub rows: usize,
    /// Fraction of rows whose argmax agrees.
    pub top1: f64,
    /// Mean |a - b| over all values, divided by the std of `reference`.
    pub mean_abs_rel: f64,
    /// Max |a - b|, divided by the std of `reference`.
    pub max_abs_rel: f64,
    /// Standard deviation of the reference logits (a sanity check: not ~0).
    pub std: f64,
}

pub fn compare(ours: &[&[f32]], reference: &[&[f32]]) -> Agreement {
    assert_eq!(ours.len(), reference.len(), "row counts differ");
    let n: usize = reference.iter().map(|r| r.len()).sum();
    let mean = reference
        .iter()
        .flat_map(|r| r.iter())
        .map(|&x| x as f64)
        .sum::<f64>()
        / n as f64;
    let var = reference
        .iter()
        .flat_map(|r| r.iter())
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    let std = var.sqrt().max(1e-12);
    let mut agree = 0;
    let mut sum_abs = 0.0;
    let mut max_abs: f64 = 0.0;
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len(), b.len(), "row widths differ");
        if svfit::sampling::argmax(a) == svfit::sampling::argmax(b) {
            agree += 1;
        }
        for (x, y) in a.iter().zip(b.iter()) {
            let d = (*x as f64 - *y as f64).abs();
            sum_abs += d;
            max_abs = max_abs.max(d);
        }
    }
    assert!(std > 1e-3, "reference logits are constant (std {std})");
    Agreement {
        rows: ours.len(),
        top1: agree as f64 / ours.len() as f64,
        mean_abs_rel: sum_abs / n as f64 / std,
        max_abs_rel: max_abs / std,
        std,
    }
}

pub fn rows(logits: &Logits) -> Vec<&[f32]> {
    (0..logits.n_rows()).map(|i| logits.row(i)).collect()
}

/// The machine. Every test holds it shared while it runs, so tests run in
/// parallel; the few that measure latency or run a cluster of processes
/// hold it alone, so nothing else runs beside them. (Waiting writers go
/// first: a test that wants it alone waits only for those running.)
static MACHINE: RwLock<()> = RwLock::new(());

pub fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

pub fn alone() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}
