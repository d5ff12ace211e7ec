//! `svfit check`: a compute device against the CPU (`svfit::check`).

use super::*;

use svfit::check;
use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::model::random::{self, Shape, Types};

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
    /// stored types; q4_1 for a --write-metadata file) or 1b (16 layers,
    /// 2048 wide, mostly q4_1)
    #[arg(long, value_name = "tiny|like|1b", value_parser = ["tiny", "like", "1b"])]
    random: Option<String>,
    /// Keep the random model at this path (to serve it afterwards)
    #[arg(long, requires = "random")]
    keep_model: Option<PathBuf>,
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
            write_random(&source, kind, &path)?;
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
        q8_0_kernel: args.compute.q8_0_kernel,
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

/// Writes a random model of the named shape with `source`'s tokenizer.
fn write_random(source: &Path, kind: &str, out: &Path) -> Result<()> {
    let gguf = GgufFile::open(source)?;
    let n_vocab = gguf
        .get_arr_len("tokenizer.ggml.tokens")?
        .with_context(|| format!("{} has no tokenizer", source.display()))?;
    let (shape, types) = match kind {
        "tiny" => (Shape::TINY, Types::Mixed),
        "1b" => (Shape::ONE_B, Types::Quantized),
        // The stored types, or a quantized model's for a metadata file.
        _ if gguf.tensors().is_empty() => (Shape::of(&gguf)?, Types::Quantized),
        _ => (Shape::of(&gguf)?, Types::Like(&gguf)),
    };
    let shape = Shape { n_vocab, ..shape };
    println!(
        "writing a random {kind} model ({:.0}M parameters) to {}",
        shape.n_params() as f64 / 1e6,
        out.display()
    );
    random::write(out, &shape, &types, Some(&gguf), 7)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
