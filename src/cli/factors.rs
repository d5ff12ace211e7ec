//! `svfit factorize`, `merge`, `convert` and `adapter ...`.

use super::*;

#[derive(Subcommand)]
pub(super) enum AdapterCommand {
    /// Write the identity adapter (sigma = S: the base model unchanged).
    Init {
        #[command(flatten)]
        factors: FactorArgs,
        /// Output adapter file (.safetensors)
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an adapter's base, targets, ranks and per-matrix |delta|, after validating it against the model.
    Inspect {
        /// Adapter file
        adapter: PathBuf,
        /// The base model it must belong to
        #[command(flatten)]
        base: ModelFile,
    },
    /// Add random deltas: sigma = S * (1 + scale * z), z ~ N(0, 1) (for demos and tests).
    Perturb {
        /// Adapter file to start from (its factors define S)
        adapter: PathBuf,
        /// Relative size of the deltas (0.05 = about 5% of S)
        #[arg(long)]
        scale: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output adapter file
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        base: ModelFile,
    },
    /// Write an adapter (or a mix) as an exact LoRA for other runtimes: a
    /// GGUF LoRA for llama.cpp (`--lora FILE`) or a PEFT adapter directory.
    /// Its update U diag(sigma' - sigma) Vt is a LoRA B A of the rank of its
    /// non-zero deltas, scale 1.
    Export(ExportArgs),
    /// Keep a LoRA (a PEFT directory or a GGUF LoRA) as an svfit adapter
    /// file, checked against the base: the file the server's store holds
    /// and `--adapter` takes, uploaded, versioned and served like any
    /// adapter (the scale folded into B; fused tensors cut per matrix).
    Import {
        /// PEFT directory (adapter_model.safetensors + adapter_config.json)
        /// or GGUF LoRA file
        lora: PathBuf,
        /// The base model it belongs to
        #[command(flatten)]
        base: ModelFile,
        /// Output adapter file (.safetensors)
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub(super) struct ExportArgs {
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// gguf-lora (a file for llama.cpp's --lora) or peft (a directory with
    /// adapter_model.safetensors and adapter_config.json, Hugging Face's
    /// module names and row order)
    #[arg(long, value_enum)]
    format: svfit::lora::Format,
    /// Output file (gguf-lora) or directory (peft)
    #[arg(long)]
    out: PathBuf,
    /// Keep at most N deltas per matrix, the largest (the LoRA's rank); the
    /// relative error of the update dropped is reported. Default: all of
    /// them (exact)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rank: Option<u32>,
}

#[derive(Args)]
pub(super) struct ConvertArgs {
    #[command(flatten)]
    base: ModelFile,
    /// The types to write: auto and keep (as stored), q8_0 or f16
    #[arg(long, default_value = "auto")]
    weights: WeightFormat,
    /// Output GGUF file
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub(super) struct FactorizeArgs {
    #[command(flatten)]
    factors: FactorArgs,
    /// Recompute even when the cache has these factors (and ignore the
    /// matrices an interrupted run left)
    #[arg(long)]
    force: bool,
    /// Matrices factorized at a time (each holds its own working set:
    /// about 3 copies of the matrix in f64) [default: the number of cores]
    #[arg(long)]
    jobs: Option<usize>,
}

/// `[ 12/ 64] blk.5.attn_q.weight  rank 1841 of 2048  41.3s  ETA 1m 40s`;
/// the ETA is from this run's pace, matrices an earlier run finished
/// aside.
fn progress_line(p: &svfit::factors::Progress, elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let here = p.done - p.resumed;
    let eta = (secs / here.max(1) as f64 * (p.total - p.done) as f64).round() as u64;
    let resumed = if p.resumed > 0 {
        format!(" ({} resumed)", p.resumed)
    } else {
        String::new()
    };
    format!(
        "[{:>4}/{}]{resumed} {:<28} rank {:>5} of {:>5}  {secs:>6.1}s  ETA {}m {:02}s ",
        p.done,
        p.total,
        p.name,
        p.rank,
        p.full_rank,
        eta / 60,
        eta % 60
    )
}

#[derive(Args)]
pub(super) struct MergeArgs {
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// A LoRA to merge instead of an SVFit adapter: a PEFT directory
    /// (adapter_config.json, adapter_model.safetensors) or a GGUF LoRA file
    /// (llama.cpp's), checked against the model
    #[arg(long, conflicts_with_all = ["adapter", "mix"])]
    lora: Option<PathBuf>,
    /// Output GGUF file
    #[arg(long)]
    out: PathBuf,
    /// Stored type of the merged matrices: f16, f32, or keep (the base's own
    /// type, re-quantized: with 4-bit bases small deltas are mostly lost)
    #[arg(long = "type", default_value = "f16")]
    ty: String,
}

/// Fails unless the engine understands every key and tensor of `model`.
fn understood(model: &Path) -> Result<()> {
    let gguf = svfit::ggml::gguf::GgufFile::open(model)?;
    model::understand(&gguf).with_context(|| format!("{}", model.display()))?;
    Ok(())
}

pub(super) fn run_convert(args: &ConvertArgs) -> Result<()> {
    let model = args.base.path()?;
    understood(&model)?;
    let n = model::write_converted(&model, args.weights, &args.out)
        .with_context(|| format!("converting {}", model.display()))?;
    println!(
        "wrote {} ({n} matrices converted for --weights {})",
        args.out.display(),
        args.weights
    );
    Ok(())
}

pub(super) fn run_factorize(args: &FactorizeArgs) -> Result<()> {
    use svfit::factors;
    let (path, key) = args.factors.key()?;
    understood(&path)?;
    let out = key.path(&home::home_dir());
    let ranks: Vec<_> = if out.exists() && !args.force {
        eprintln!("factors already cached at {}", out.display());
        factors::read_singular_values(&out, &key)?
            .into_iter()
            .map(|(t, s)| (t, s.len()))
            .collect()
    } else {
        if args.force {
            // Matrices an interrupted run left are recomputed too.
            let _ = std::fs::remove_dir_all(factors::partial_dir(&out));
        }
        let start = std::time::Instant::now();
        let jobs = args.jobs.unwrap_or_else(factors::default_jobs);
        let ranks = factors::build(&path, &key, &out, jobs, |p| {
            eprint!("\r{}", progress_line(&p, start.elapsed()));
        })?;
        eprintln!();
        eprintln!("wrote {}", out.display());
        ranks
    };
    println!("{:<12} {:>6} {:>8} {:>6}", "matrix", "min", "mean", "max");
    for (kind, min, mean, max) in factors::rank_summary(&ranks) {
        println!("{kind:<12} {min:>6} {mean:>8.1} {max:>6}");
    }
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "factors: {} matrices, {:.1} MB ({}, {})",
        ranks.len(),
        bytes as f64 / 1e6,
        key.policy,
        key.dtype
    );
    Ok(())
}

/// An adapter read from `path` and validated against the model's factors
/// (computed and cached if missing).
fn load_adapter(path: &Path, model: &Path) -> Result<Loaded> {
    let sha = home::sha256_file(model).with_context(|| format!("reading {}", model.display()))?;
    Ok(Loaded::open(path, model, &sha, &home::home_dir())?)
}

pub(super) fn run_merge(args: &MergeArgs) -> Result<()> {
    let ty: svfit::merge::MergeType = args.ty.parse()?;
    let model = args.base.path()?;
    understood(&model)?;
    if let Some(path) = &args.lora {
        let gguf = svfit::ggml::gguf::GgufFile::open(&model)?;
        let lora = svfit::lora::Lora::read(path, &gguf)?;
        let info = [("svfit.merged.lora".to_string(), path.display().to_string())];
        let start = std::time::Instant::now();
        let n = svfit::merge::merge_lora(&model, &lora, ty, &info, &args.out)?;
        let max_rank = lora.updates.values().map(|u| u.rank).max().unwrap_or(0);
        eprintln!(
            "wrote {} ({n} matrices merged as {}, LoRA rank up to {max_rank}, {:.1}s)",
            args.out.display(),
            args.ty,
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let resolved = args
        .adapter
        .resolve(&model)?
        .context("name the adapter to merge with --adapter FILE, --mix A=W,B=W or --lora PATH")?;
    let (key, factors_path) = resolved.factors()?;
    let factors = svfit::factors::read_factors(factors_path, key)?;
    let info = [
        (
            "svfit.merged.adapters".to_string(),
            resolved.description.clone(),
        ),
        ("svfit.merged.factors_id".to_string(), key.id()),
    ];
    let start = std::time::Instant::now();
    let n = svfit::merge::merge(&model, &factors, &resolved.deltas, ty, &info, &args.out)?;
    eprintln!(
        "wrote {} ({n} matrices merged as {}, {:.1}s)",
        args.out.display(),
        args.ty,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(super) fn run_adapter(command: &AdapterCommand) -> Result<()> {
    use svfit::adapter::Adapter;
    use svfit::factors;
    match command {
        AdapterCommand::Import { lora, base, out } => {
            let model = base.path()?;
            let gguf = svfit::ggml::gguf::GgufFile::open(&model)?;
            let config = svfit::model::Config::from_gguf(&gguf)?;
            let read = svfit::lora::Lora::read(lora, &gguf)?;
            let updates = read.low_ranks(&config)?;
            let sha = home::sha256_file(&model)
                .with_context(|| format!("reading {}", model.display()))?;
            let source = match read.format {
                svfit::lora::Format::Peft => "peft",
                svfit::lora::Format::GgufLora => "gguf-lora",
            };
            let adapter = Adapter::from_lora(&sha, updates, source);
            adapter.write(out)?;
            eprintln!(
                "wrote {} (a LoRA of {} matrices, targets {}, {})",
                out.display(),
                adapter.lora.len(),
                adapter.targets,
                adapter.rank_policy
            );
        }
        AdapterCommand::Init { factors: args, out } => {
            let (model, key) = args.key()?;
            let path = factors::ensure(&model, &key, &home::home_dir())?;
            let singular = factors::read_singular_values(&path, &key)?;
            Adapter::identity(&key, &singular).write(out)?;
            let n: usize = singular.iter().map(|(_, s)| s.len()).sum();
            eprintln!(
                "wrote {} ({} matrices, {n} singular values)",
                out.display(),
                singular.len()
            );
        }
        AdapterCommand::Inspect { adapter, base } => {
            let read = Adapter::read(adapter)?;
            if read.is_lora() {
                return inspect_lora(&read, &base.path()?);
            }
            let Loaded {
                adapter: a,
                singular,
                ..
            } = load_adapter(adapter, &base.path()?)?;
            println!("base sha256  {}", a.base_sha256);
            println!("factors      {}", a.factors_id);
            println!("targets      {}", a.targets);
            println!("rank policy  {}", a.rank_policy);
            let mut info: Vec<_> = a.info.iter().collect();
            info.sort();
            for (k, v) in info {
                println!("{k:<12} {v}");
            }
            println!(
                "{:<24} {:>6} {:>12} {:>12}",
                "matrix", "rank", "|delta|", "|delta|/|S|"
            );
            for ((prefix, delta), (_, s)) in a.deltas(&singular).iter().zip(&singular) {
                let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let (d, sn) = (norm(delta), norm(s));
                println!(
                    "{prefix:<24} {:>6} {d:>12.5} {:>12.5}",
                    s.len(),
                    d / sn.max(f64::MIN_POSITIVE)
                );
            }
        }
        AdapterCommand::Perturb {
            adapter,
            scale,
            seed,
            out,
            base,
        } => {
            if !scale.is_finite() || *scale < 0.0 {
                anyhow::bail!("--scale must be a finite number >= 0, got {scale}");
            }
            let Loaded {
                adapter: mut a,
                singular,
                ..
            } = load_adapter(adapter, &base.path()?)?;
            a.perturb(&singular, *scale, *seed);
            a.info.insert(
                "svfit.perturbed".into(),
                format!("scale {scale}, seed {seed}"),
            );
            a.write(out)?;
            eprintln!("wrote {}", out.display());
        }
        AdapterCommand::Export(args) => run_export(args)?,
    }
    Ok(())
}

fn run_export(args: &ExportArgs) -> Result<()> {
    let model = args.base.path()?;
    understood(&model)?;
    let resolved = args
        .adapter
        .resolve(&model)?
        .context("name the adapter to export with --adapter FILE or --mix A=W,B=W")?;
    let (key, factors_path) = resolved.factors()?;
    let factors = svfit::factors::read_factors(factors_path, key)?;
    let rank = args.rank.map(|r| r as usize);
    let done = svfit::lora::export(
        &model,
        &factors,
        &resolved.deltas,
        args.format,
        rank,
        &args.out,
    )
    .with_context(|| format!("exporting {}", resolved.description))?;
    eprintln!(
        "wrote {} ({} matrices, rank up to {}, {} parameters; update dropped: {:.3e} of |dW|)",
        args.out.display(),
        done.matrices,
        done.max_rank,
        done.parameters,
        done.dropped
    );
    Ok(())
}

/// `svfit adapter inspect` of a LoRA kept as an adapter: its base (checked
/// against the model), targets and each matrix's rank and shape.
fn inspect_lora(a: &svfit::adapter::Adapter, model: &Path) -> Result<()> {
    let sha = home::sha256_file(model).with_context(|| format!("reading {}", model.display()))?;
    if a.base_sha256 != sha {
        anyhow::bail!(
            "a LoRA of the model with sha256 {}, not of {} ({sha})",
            a.base_sha256,
            model.display()
        );
    }
    println!("format       LoRA ({})", svfit::adapter::LORA_FORMAT);
    println!("base sha256  {}", a.base_sha256);
    println!("targets      {}", a.targets);
    println!("rank         {}", a.rank_policy);
    let mut info: Vec<_> = a.info.iter().collect();
    info.sort();
    for (k, v) in info {
        println!("{k:<12} {v}");
    }
    println!("{:<24} {:>6} {:>14}", "matrix", "rank", "[m, n]");
    for (prefix, u) in &a.lora {
        let shape = format!("[{}, {}]", u.b.len() / u.rank, u.a.len() / u.rank);
        println!("{prefix:<24} {:>6} {shape:>14}", u.rank);
    }
    Ok(())
}
