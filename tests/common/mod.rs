//! Shared test fixtures: a tiny random-weight llama GGUF written by the tests
//! themselves, the default model's path, and logit comparisons.

pub mod hostile;
pub mod serve;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::ggml::Type;
use svfit::model::random::{self, Types};
use svfit::model::Logits;
use svfit::oracle::Reference;

pub use svfit::model::random::Shape;
pub use svfit::rng::Rng;

/// The tiny test model's shape.
pub const TINY: Shape = Shape::TINY;

/// Writes a tiny llama model with random weights in a mix of stored types
/// (f32, f16, q8_0, q4_1), tied embeddings, and no tokenizer ("no_vocab").
pub fn write_tiny_model(path: &Path, shape: &Shape) {
    write_model_seeded(path, shape, 42);
}

/// The same with another seed: other weights, same shapes.
pub fn write_model_seeded(path: &Path, shape: &Shape, seed: u64) {
    random::write(path, shape, &Types::Mixed, None, seed).unwrap();
}

/// Writes `src` again at `out`: every key, then `edit` (which may set keys
/// and add tensors), then every tensor `keep` keeps, as stored.
pub fn rewrite(
    src: &Path,
    out: &Path,
    keep: impl Fn(&str) -> bool,
    edit: impl FnOnce(&mut GgufWriter),
) {
    let gguf = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new(gguf.tensors().len() + 8).unwrap();
    w.copy_metadata_from(&gguf);
    edit(&mut w);
    for t in gguf.tensors().iter().filter(|t| keep(&t.name)) {
        let bytes = gguf.read_tensor_bytes(t).unwrap();
        w.add_tensor(&t.name, t.ty, t.shape(), bytes).unwrap();
    }
    w.write(out).unwrap();
}

/// Adds the f32 vector `values` as the tensor `name`.
pub fn add_f32(w: &mut GgufWriter, name: &str, values: &[f32]) {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.add_tensor(name, Type::F32, &[values.len() as i64], bytes)
        .unwrap();
}

/// Llama 3's RoPE frequency factors as its converter computes
/// `rope_freqs.weight` (factor 8, low and high frequency factors 1 and 4),
/// for heads of `head_dim`, RoPE base `base` and an original context of
/// `n_ctx_orig` tokens.
pub fn llama3_rope_factors(head_dim: usize, base: f32, n_ctx_orig: f32) -> Vec<f32> {
    let (factor, low, high) = (8.0f32, 1.0f32, 4.0f32);
    (0..head_dim / 2)
        .map(|i| {
            let freq = base.powf(-2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < n_ctx_orig / high {
                1.0
            } else if wavelen > n_ctx_orig / low {
                factor
            } else {
                let smooth = (n_ctx_orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The tiny model as a Llama 3.x file: RoPE base 500000 and
/// `rope_freqs.weight`, its factors for an original context of 64 tokens
/// (so that the tests' short sequences span all three of the formula's
/// cases: 1, 2.44 and 8). With `own_head`, an output head of its own: a
/// random model whose head is tied to the embeddings predicts the token it
/// was given, so greedy decoding repeats one token; an untied random head
/// makes greedy answers vary (and top-1 near-ties common).
pub fn write_llama3_model(path: &Path, own_head: bool) {
    let plain = path.with_extension("plain.gguf");
    write_tiny_model(&plain, &TINY);
    let factors = llama3_rope_factors(TINY.n_embd / TINY.n_head, 500_000.0, 64.0);
    let (e, v) = (TINY.n_embd, TINY.n_vocab);
    let head = Rng::new(3).normals(e * v, 1.0 / (e as f32).sqrt());
    let head: Vec<u8> = head.iter().flat_map(|x| x.to_le_bytes()).collect();
    rewrite(
        &plain,
        path,
        |_| true,
        |w| {
            w.set_f32("llama.rope.freq_base", 500_000.0).unwrap();
            add_f32(w, "rope_freqs.weight", &factors);
            if own_head {
                w.add_tensor("output.weight", Type::F32, &[e as i64, v as i64], head)
                    .unwrap();
            }
        },
    );
    std::fs::remove_file(plain).unwrap();
}

pub use tempfile::TempDir;

/// A fresh directory under the system temp dir, named after `tag` (so a
/// test's leftovers are recognisable), removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("svfit-test-{tag}-"))
        .tempdir()
        .unwrap()
}

/// A tiny model in a fresh temp dir.
pub fn tiny_model() -> (TempDir, PathBuf) {
    let dir = temp_dir("tiny");
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

/// Gemma 3 270M (Q4_K_M); CI fetches it with `scripts/bootstrap --model
/// gemma3-270m` (scripts/test does).
pub fn gemma_model() -> PathBuf {
    let path = svfit::home::models_dir().join(svfit::home::GEMMA3_MODEL_FILE);
    assert!(
        path.exists(),
        "Gemma 3 270M is missing at {}: run scripts/bootstrap --model gemma3-270m",
        path.display()
    );
    path
}

pub use svfit::check::Agreement;

/// The library's comparison, for rows of equal shapes and a reference that
/// is not constant.
pub fn compare(ours: &[&[f32]], reference: &[&[f32]]) -> Agreement {
    let a = svfit::check::compare(ours, reference).expect("logits of the same shape");
    assert!(
        a.std > 1e-3,
        "reference logits are constant (std {})",
        a.std
    );
    a
}

/// `n` greedy tokens after `prompt` (sequence 0 on `slots`), from `decode`.
pub fn greedy_tokens(
    decode: &mut dyn FnMut(&svfit::model::Batch) -> Logits,
    prompt: &[u32],
    slots: svfit::model::Slots,
    n: usize,
) -> Vec<u32> {
    let mut batch = svfit::model::Batch::new();
    batch.add_sequence(prompt, 0, 0, false);
    batch.set_slots(0, slots);
    let mut out = Vec::new();
    while out.len() < n {
        let logits = decode(&batch);
        let token = svfit::sampling::argmax(logits.row(logits.n_rows() - 1));
        out.push(token);
        batch.clear();
        batch.add(token, prompt.len() + out.len() - 1, 0, true);
        batch.set_slots(0, slots);
    }
    out
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

/// Whether llama.cpp's and our products run on this CPU, asked once per
/// test process of a child process (the test binary running
/// `cpu::products_in_this_process`): a build whose ggml executes an
/// instruction this machine refuses dies there, and the error names the
/// signal, where in-process it would kill every test at once.
pub fn products_run_here() -> Result<(), String> {
    static ANSWER: OnceLock<Result<(), String>> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let test = "cpu::products_in_this_process";
            let exe = std::env::current_exe().map_err(|e| format!("the test binary: {e}"))?;
            let out = std::process::Command::new(exe)
                .args([test, "--exact", "--ignored", "--test-threads=1"])
                .output()
                .map_err(|e| format!("could not start {test}: {e}"))?;
            let status = out.status;
            let ran = String::from_utf8_lossy(&out.stdout).contains("1 passed");
            if status.success() && ran {
                return Ok(());
            }
            let why = match status.signal() {
                Some(4) => "died of SIGILL: ggml was built with an instruction this CPU \
                            does not run (README: Which CPU a build runs on)"
                    .to_string(),
                Some(signal) => format!("died of signal {signal}"),
                None if !ran => format!("did not run ({status})"),
                None => format!("failed ({status})"),
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            let mut tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            tail.reverse();
            let last = match tail.is_empty() {
                true => String::new(),
                false => format!("; it printed last:\n{}", tail.join("\n")),
            };
            Err(format!(
                "llama.cpp's and svfit's products on this CPU ({test} in a child process) {why}{last}"
            ))
        })
        .clone()
}

/// llama.cpp (the oracle) on `path`, once [`products_run_here`] says its
/// products run on this CPU.
pub fn reference(path: &Path) -> Reference {
    if let Err(e) = products_run_here() {
        panic!("{e}");
    }
    Reference::load(path).unwrap()
}
