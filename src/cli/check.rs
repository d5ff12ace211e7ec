//! `svfit check`: a compute device against the CPU (`svfit::check`).

use super::*;

use svfit::check;
use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::ggml::Type;
use svfit::model::random::{self, Shape, Types};
use svfit::model::{Arch, SUPPORTED_ARCHITECTURES};

#[derive(Args)]
pub(super) struct CheckArgs {
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    train_compute: TrainCompute,
    /// Check a model with random weights and --model's tokenizer instead of
    /// --model itself: tiny (2 layers, 64 wide), like (--model's shapes and
    /// stored types; q4_1 for a --write-metadata file) or 1b (a real
    /// model's widths and depth, mostly q4_1: for --arch llama Llama 3.2
    /// 1B's at 16 layers, qwen2 Qwen2.5 0.5B's, qwen3 Qwen3 0.6B's, gemma2
    /// Gemma 2 2B's, gemma3 Gemma 3 1B's, phi3 Phi-3 mini's at 8 layers),
    /// 3b or 8b (llama only: Llama 3.2 3B's and Llama 3.1 8B's widths and
    /// depth). Every shape's vocabulary is the tokenizer's.
    #[arg(
        long,
        value_name = "tiny|like|1b|3b|8b",
        value_parser = ["tiny", "like", "1b", "3b", "8b"]
    )]
    random: Option<String>,
    /// The type of every block matrix of a tiny, 1b, 3b or 8b --random model
    /// (q4_0, q4_1, q5_0, q8_0, q4_k, q6_k or f16; embeddings q8_0)
    /// [default: a mix for tiny, mostly q4_1 for 1b]
    #[arg(long, requires = "random", value_parser = matrix_type)]
    random_type: Option<Type>,
    /// The family of the --random model, whose tensors and metadata keys
    /// it gets as llama.cpp's converter writes them [default: llama for
    /// tiny, 1b, 3b and 8b, --model's for like]
    #[arg(
        long,
        requires = "random",
        value_name = "llama|qwen2|qwen3|gemma2|gemma3|phi3"
    )]
    arch: Option<String>,
    /// Keep the random model at this path (to serve it afterwards)
    #[arg(long, requires = "random")]
    keep_model: Option<PathBuf>,
    /// Write the --random model to this file and stop, without checking it
    /// (a model of the family and shapes to serve or test elsewhere)
    #[arg(long, requires = "random", conflicts_with = "keep_model")]
    write_model: Option<PathBuf>,
    /// Write --model's metadata (tokenizer and shapes) without its weights
    /// to this file and stop: a few MB to carry to a machine that checks
    /// --random models of its shapes
    #[arg(long, conflicts_with = "random")]
    write_metadata: Option<PathBuf>,
    /// Also write the report as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tokens of each row in the training speed measurement
    #[arg(long, default_value_t = 256)]
    train_ctx: usize,
    /// Seconds of each training speed measurement (device, then CPU)
    #[arg(long, default_value_t = 10.0)]
    train_secs: f64,
}

/// Removes the directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn run_check(args: &CheckArgs) -> Result<()> {
    let arch = args.arch.as_deref().map(family).transpose()?;
    let source = args.base.path()?;
    if let Some(out) = &args.write_metadata {
        let mut w = GgufWriter::new(0)?;
        w.copy_metadata_from(&GgufFile::open(&source)?);
        w.write(out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "wrote the metadata of {} to {}",
            source.display(),
            out.display()
        );
        return Ok(());
    }
    if let (Some(kind), Some(out)) = (&args.random, &args.write_model) {
        return write_random(&source, kind, arch, args.random_type, out);
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("svfit-check-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("creating {}", scratch.0.display()))?;
    let model = match &args.random {
        None => source,
        Some(kind) => {
            let path = args
                .keep_model
                .clone()
                .unwrap_or_else(|| scratch.0.join(format!("random-{kind}.gguf")));
            write_random(&source, kind, arch, args.random_type, &path)?;
            path
        }
    };
    let options = check::Options {
        model,
        device: args.compute.device.clone(),
        threads: args.compute.threads(),
        home: home::home_dir(),
        scratch: scratch.0.clone(),
        train_ctx: args.train_ctx.max(8),
        train_time: std::time::Duration::from_secs_f64(args.train_secs.clamp(0.0, 3600.0)),
        batch_kernels: args.compute.batch_kernels,
        train_gemm: args.train_compute.gemm,
    };
    println!("checking {} on {}", options.model.display(), options.device);
    let report = check::run(&options, &mut |step| {
        let verdict = match step.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "info",
        };
        println!("{:<10} {verdict:<5} {}", step.name, step.result);
        if !step.target.is_empty() {
            println!("{:<16} target: {}", "", step.target);
        }
        let _ = std::io::stdout().flush();
    })?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed() {
        anyhow::bail!(
            "{} on {}: a check failed (see above)",
            report.model,
            report.device
        );
    }
    println!("all checks passed on {}", report.device);
    Ok(())
}

/// The family `--arch` names.
fn family(name: &str) -> Result<Arch> {
    Arch::from_name(name).with_context(|| {
        format!(
            "--arch {name}: unsupported architecture (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        )
    })
}

/// The `1b` shape of a family: a real model's widths and depth (its
/// vocabulary is replaced by the tokenizer's).
fn real_shape(arch: Arch) -> Shape {
    let shape = |head_dim, n_embd, n_head, n_head_kv, n_ff, n_layer| Shape {
        arch: arch.name(),
        head_dim: Some(head_dim),
        n_embd,
        n_head,
        n_head_kv,
        n_ff,
        n_layer,
        ..Shape::ONE_B
    };
    match arch {
        Arch::Llama => Shape::ONE_B,
        // Qwen2.5 0.5B.
        Arch::Qwen2 => shape(64, 896, 14, 2, 4864, 24),
        // Qwen3 0.6B: heads wider than n_embd / n_head.
        Arch::Qwen3 => shape(128, 1024, 16, 8, 3072, 28),
        // Gemma 2 2B: heads of 256.
        Arch::Gemma2 => shape(256, 2304, 8, 4, 9216, 26),
        // Gemma 3 1B: one KV head of 256.
        Arch::Gemma3 => shape(256, 1152, 4, 1, 6912, 26),
        // Phi-3 mini's widths (3.8B), 8 of its 32 layers: about 1B.
        Arch::Phi3 => shape(96, 3072, 32, 32, 8192, 8),
    }
}

/// A `--random-type`.
fn matrix_type(name: &str) -> Result<Type, String> {
    let types = [
        Type::Q4_0,
        Type::Q4_1,
        Type::Q5_0,
        Type::Q8_0,
        Type::Q4_K,
        Type::Q6_K,
        Type::F16,
    ];
    types
        .into_iter()
        .find(|ty| ty.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            format!("unknown type '{name}' (use q4_0, q4_1, q5_0, q8_0, q4_k, q6_k or f16)")
        })
}

/// Writes a random model of the named shape and family (`None`: llama,
/// or for `like` the family of `source`) with `source`'s tokenizer, its
/// block matrices of type `ty` where given.
fn write_random(
    source: &Path,
    kind: &str,
    arch: Option<Arch>,
    ty: Option<Type>,
    out: &Path,
) -> Result<()> {
    let gguf = GgufFile::open(source)?;
    let n_vocab = gguf
        .get_arr_len("tokenizer.ggml.tokens")?
        .with_context(|| format!("{} has no tokenizer", source.display()))?;
    let (shape, types) = match kind {
        "tiny" => (Shape::tiny(arch.unwrap_or(Arch::Llama)), Types::Mixed),
        "1b" => (real_shape(arch.unwrap_or(Arch::Llama)), Types::Quantized),
        "3b" | "8b" => match arch.unwrap_or(Arch::Llama) {
            Arch::Llama if kind == "3b" => (Shape::THREE_B, Types::Quantized),
            Arch::Llama => (Shape::EIGHT_B, Types::Quantized),
            other => anyhow::bail!("--random {kind} is a llama shape, not {}", other.name()),
        },
        _ if ty.is_some() => anyhow::bail!("--random-type is for --random tiny, 1b, 3b and 8b"),
        // The stored types, or a quantized model's for a metadata file.
        _ if gguf.tensors().is_empty() => (Shape::of(&gguf)?, Types::Quantized),
        _ => (Shape::of(&gguf)?, Types::Like(&gguf)),
    };
    let types = ty.map_or(types, Types::All);
    let shape = Shape {
        n_vocab,
        arch: arch.map_or(shape.arch, Arch::name),
        ..shape
    };
    println!(
        "writing a random {kind} {} model ({:.0}M parameters) to {}",
        shape.arch,
        shape.n_params() as f64 / 1e6,
        out.display()
    );
    random::write(out, &shape, &types, Some(&gguf), 7)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
