//! The `svfit` command line: the clap types of every command and their
//! shared argument groups live here; each command's work is in its module
//! (`serve`, `inference`: generate and logits, `factors`: factorize, merge,
//! convert and adapter, `train`: train and eval, `check`: a device against
//! the CPU).

#[cfg(feature = "check")]
mod check;
mod factors;
mod inference;
mod serve;
mod train;

#[cfg(feature = "check")]
use check::CheckArgs;
use factors::{AdapterCommand, ConvertArgs, FactorizeArgs, MergeArgs};
use inference::{GenerateArgs, LogitsArgs};
use serve::ServeArgs;
use train::{EvalArgs, TrainArgs};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{ArgAction, Args, Parser, Subcommand};

use svfit::adapter::{self, Deltas, Loaded, LowRanks};
use svfit::factors::FactorsKey;
use svfit::generate::{self, Request};
use svfit::ggml::Type;
use svfit::model::tokenizer::Message;
use svfit::model::{self, Batch, LoadOptions, Model, Slots, Tokenizer, WeightFormat};
use svfit::sampling::SamplingParams;
use svfit::server::validation::Limits;
use svfit::{home, npy};

/// The ggml backends compiled in, for `--version`.
#[cfg(feature = "cuda")]
macro_rules! backends {
    () => {
        "cpu, cuda"
    };
}
#[cfg(not(feature = "cuda"))]
macro_rules! backends {
    () => {
        "cpu"
    };
}

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (ggml backends: ",
    backends!(),
    ")"
);

#[derive(Parser)]
#[command(
    name = "svfit",
    version = VERSION,
    about = "Serve one base LLM to many tenants with SVFit singular-value adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over gRPC and the OpenAI HTTP API to many tenants,
    /// each request with its own adapter.
    Serve(Box<ServeArgs>),
    /// Generate text from a raw prompt or a chat message, streamed to stdout.
    Generate(GenerateArgs),
    /// Write the logits of every position of a text as a float32 .npy file.
    Logits(LogitsArgs),
    /// Compute (or find cached) the SVD factors of the base model's target matrices: in
    /// parallel, with progress, resumed where an interrupted run stopped.
    Factorize(FactorizeArgs),
    /// Write a standalone GGUF with an adapter merged into the base weights
    /// (W' = W + U diag(sigma - S) Vt), or a LoRA (W' = W + scale B A),
    /// runnable by llama.cpp.
    Merge(MergeArgs),
    /// Write the model with its matrices in the types --weights holds them
    /// in (as on CPU), so llama.cpp runs exactly the weights svfit serves.
    Convert(ConvertArgs),
    /// Learn an adapter's singular values from JSONL data by backprop
    /// (writes the adapter, a checkpoint, metrics.jsonl and a loss plot).
    Train(Box<TrainArgs>),
    /// Score prompt/completion JSONL by greedy generation (with or without an
    /// adapter): exact answers and, for class labels, the label answered.
    Eval(EvalArgs),
    /// Create, inspect and perturb SVFit adapter files.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Check a compute device against the CPU on one model: logits, an
    /// adapter against the merged weights, batch invariance, a LoRA, the training
    /// gradient, training speed, and where every op ran.
    #[cfg(feature = "check")]
    Check(CheckArgs),
}

/// The base model's file: the one declaration of `--model`.
#[derive(Args)]
struct ModelFile {
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
}

impl ModelFile {
    fn path(&self) -> Result<PathBuf> {
        Ok(home::resolve_model(self.model.as_deref())?)
    }
}

/// Which of the model's factors: target matrices and rank policy.
#[derive(Args)]
struct FactorChoice {
    /// Target matrices of the factors (an adapter is made for one set):
    /// all-linear, or a comma list of q, k, v, o, gate, up, down
    #[arg(long, default_value = svfit::factors::DEFAULT_TARGETS)]
    targets: String,
    /// Singular values kept per matrix: energy:T (smallest r whose squared
    /// singular values reach fraction T of the total), rank:N, or full
    #[arg(long, default_value = svfit::factors::DEFAULT_RANK)]
    rank: String,
}

/// Which factors: base model, targets, rank policy, dtype.
#[derive(Args)]
struct FactorArgs {
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    factors: FactorChoice,
    /// Element type of U and Vt in the factor file: f16 or f32
    #[arg(long, default_value = "f16")]
    dtype: String,
}

impl FactorArgs {
    /// The model path and the factors key these arguments name.
    fn key(&self) -> Result<(PathBuf, svfit::factors::FactorsKey)> {
        let model = self.base.path()?;
        let choice = &self.factors;
        let key = FactorsKey::for_model(&model, &choice.targets, &choice.rank, &self.dtype)?;
        Ok((model, key))
    }
}

/// Where a model runs: every command that loads one takes these.
#[derive(Args)]
struct Compute {
    /// Compute device: auto (the first GPU, else the CPU), cpu, cuda or a
    /// device name such as cuda0
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads [default: one per core]
    #[arg(long)]
    threads: Option<usize>,
    /// Quantized products (Q8_0, Q4_0, Q5_0, Q4_1, Q4_K, Q6_K) on a CPU
    /// with AVX-512 VNNI through svfit's batched kernels (1), or ggml's own
    /// products, the same numbers slower in batches (0, to compare)
    #[arg(long = "batch-kernels", env = "SVFIT_BATCH_KERNELS", value_name = "1|0",
          default_value = "1", value_parser = on_unless_zero, action = ArgAction::Set)]
    batch_kernels: bool,
}

impl Compute {
    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(model::default_threads)
    }

    /// How to load a model on this device, with its matrices held as
    /// `weights` says.
    fn load_options(&self, weights: WeightFormat) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            threads: self.threads(),
            weights,
            batch_kernels: self.batch_kernels,
        }
    }
}

/// How training computes on the CPU: `train` and `check` take it.
#[derive(Args)]
struct TrainCompute {
    /// Training's f32 products on a CPU through faer's GEMM (1: 3-4x the
    /// tokens/s), or through ggml's own kernels (0, to compare)
    #[arg(long = "train-gemm", env = "SVFIT_TRAIN_GEMM", value_name = "1|0",
          default_value = "1", value_parser = on_unless_zero, action = ArgAction::Set)]
    gemm: bool,
    /// Targets whose kept rank is near full train over their full-rank
    /// factors in place of the weight (1: fewer multiply-adds, the same
    /// values trained), or as the weight plus the branch (0, to compare)
    #[arg(long = "train-full-rank", env = "SVFIT_TRAIN_FULL_RANK", value_name = "1|0",
          default_value = "1", value_parser = on_unless_zero, action = ArgAction::Set)]
    full_rank: bool,
}

/// A switch given as a number or in the environment: "0" is off, anything
/// else on (as the environment variables have always read).
fn on_unless_zero(value: &str) -> Result<bool, std::convert::Infallible> {
    Ok(value != "0")
}

/// Which model to load and how to run it.
#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    compute: Compute,
    /// Context size in tokens (KV cache cells); capped at the model's training context
    #[arg(long = "ctx", default_value_t = 4096)]
    ctx: usize,
    /// How the weight matrices are held: auto or keep (as stored, the
    /// same numbers as llama.cpp on the file; on CPU through the batched
    /// kernels where one reads the type), or re-quantized, which changes
    /// the model's numbers: q8_0 (lossy for types above 8 bits) or f16
    /// (lossy for f32 and bf16)
    #[arg(long, default_value = "auto")]
    weights: WeightFormat,
}

impl ModelArgs {
    fn load_options(&self) -> LoadOptions {
        self.compute.load_options(self.weights)
    }

    fn path(&self) -> Result<PathBuf> {
        self.base.path()
    }

    fn load(&self) -> Result<(Model, Tokenizer)> {
        let path = self.path()?;
        let model = Model::load(&path, &self.load_options())
            .with_context(|| format!("loading model {}", path.display()))?;
        let tokenizer = Tokenizer::load(&path)?;
        Ok((model, tokenizer))
    }

    fn n_ctx(&self, model: &Model) -> usize {
        self.ctx.clamp(1, model.config().n_ctx_train)
    }
}

/// Which adapter (or weighted mix of adapters) to apply.
#[derive(Args)]
struct AdapterArgs {
    /// Adapter to apply to the base model: an SVFit adapter file
    /// (.safetensors), or a LoRA (a PEFT directory, a GGUF LoRA, or the
    /// file `svfit adapter import` keeps)
    #[arg(long, conflicts_with = "mix")]
    adapter: Option<PathBuf>,
    /// A weighted mix, as A.safetensors=0.7,B.safetensors=0.3: SVFit
    /// adapters of the same factors mix their deltas (sum of weight x
    /// delta), LoRAs their updates (sum of weight x B A, exactly)
    #[arg(long)]
    mix: Option<String>,
}

/// A validated adapter or mix: its factors and combined deltas, and its
/// LoRAs' combined updates.
struct Resolved {
    /// The SVFit parts' factors, when there are SVFit parts.
    factors: Option<(FactorsKey, PathBuf)>,
    deltas: Deltas,
    lora: LowRanks,
    /// What was applied, for messages and metadata.
    description: String,
}

impl Resolved {
    /// The factors of an SVFit adapter (or mix); a LoRA has none.
    fn factors(&self) -> Result<(&FactorsKey, &PathBuf)> {
        match &self.factors {
            Some((key, path)) => Ok((key, path)),
            None => anyhow::bail!(
                "{} is a LoRA, not an SVFit adapter: merge a LoRA with `svfit merge --lora`",
                self.description
            ),
        }
    }
}

impl AdapterArgs {
    /// `(path, weight)` of each adapter named.
    fn parts(&self) -> Result<Vec<(PathBuf, f32)>> {
        if let Some(path) = &self.adapter {
            return Ok(vec![(path.clone(), 1.0)]);
        }
        let Some(mix) = &self.mix else {
            return Ok(Vec::new());
        };
        mix.split(',')
            .map(|part| {
                let (path, weight) = part
                    .rsplit_once('=')
                    .with_context(|| format!("--mix part '{part}' is not FILE=WEIGHT"))?;
                let weight: f32 = weight
                    .trim()
                    .parse()
                    .ok()
                    .filter(|w: &f32| w.is_finite())
                    .with_context(|| format!("--mix weight '{weight}' is not a finite number"))?;
                Ok((PathBuf::from(path.trim()), weight))
            })
            .collect()
    }

    /// Reads and validates the adapters against the model at `model`:
    /// SVFit adapters, and LoRAs (a PEFT directory, a GGUF LoRA, or a LoRA
    /// kept as an adapter by `svfit adapter import`).
    fn resolve(&self, model: &Path) -> Result<Option<Resolved>> {
        let parts = self.parts()?;
        if parts.is_empty() {
            return Ok(None);
        }
        let sha =
            home::sha256_file(model).with_context(|| format!("reading {}", model.display()))?;
        let home = home::home_dir();
        let mut loaded: Vec<(PathBuf, Loaded)> = Vec::new();
        let mut weighted = Vec::new();
        let mut loras: Vec<(f32, LowRanks)> = Vec::new();
        for (path, weight) in &parts {
            if let Some(lora) = read_lora(path, model, &sha)? {
                loras.push((*weight, lora));
                continue;
            }
            let l = Loaded::open(path, model, &sha, &home)?;
            if let Some((first, f)) = loaded.first() {
                if f.key != l.key {
                    return Err(adapter::AdapterError::MixedFactors {
                        first: first.clone(),
                        first_id: f.key.id(),
                        other: path.clone(),
                        other_id: l.key.id(),
                    }
                    .into());
                }
            }
            weighted.push((*weight, l.deltas()));
            loaded.push((path.clone(), l));
        }
        let weighted_refs: Vec<(f32, &Deltas)> = weighted.iter().map(|(w, d)| (*w, d)).collect();
        let lora_refs: Vec<(f32, &LowRanks)> = loras.iter().map(|(w, l)| (*w, l)).collect();
        let description = parts
            .iter()
            .map(|(p, w)| format!("{}={w}", p.display()))
            .collect::<Vec<_>>()
            .join(",");
        let factors = (!loaded.is_empty()).then(|| {
            let key = loaded.swap_remove(0).1.key;
            (key.clone(), key.path(&home))
        });
        Ok(Some(Resolved {
            factors,
            deltas: adapter::mix(&weighted_refs),
            lora: adapter::mix_lora(&lora_refs),
            description,
        }))
    }

    /// Applies the adapter (if any) to `model`: its factors in slot tables
    /// and the deltas in slot 1, and its LoRA in LoRA slot 1. Returns the
    /// slots to run with.
    fn apply(&self, model: &mut Model, model_path: &Path) -> Result<Slots> {
        let Some(resolved) = self.resolve(model_path)? else {
            return Ok(Slots::default());
        };
        let mut slots = Slots::default();
        if let Some((key, path)) = &resolved.factors {
            let factors = svfit::factors::read_factors(path, key)?;
            model.attach_factors(&factors, 2, Type::Q8_0)?;
            model.set_adapter(1, &resolved.deltas)?;
            slots.svfit = 1;
        }
        if !resolved.lora.is_empty() {
            let mut kinds: Vec<&'static str> = Vec::new();
            for (prefix, _) in &resolved.lora {
                let kind = prefix.rsplit('.').next().unwrap_or_default();
                if let Some(k) = svfit::factors::KINDS.iter().find(|k| k.1 == kind) {
                    if !kinds.contains(&k.1) {
                        kinds.push(k.1);
                    }
                }
            }
            let rank = resolved.lora.iter().map(|(_, u)| u.rank).max().unwrap_or(1);
            model.attach_lora(&kinds, rank, 2)?;
            model.set_lora(1, &resolved.lora)?;
            slots.lora = 1;
        }
        Ok(slots)
    }
}

/// The LoRA at `path` for the model at `model` (whose sha256 is `sha`), or
/// `None` when `path` is an SVFit adapter.
fn read_lora(path: &Path, model: &Path, sha: &str) -> Result<Option<LowRanks>> {
    if !path.is_dir() {
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .with_context(|| format!("reading {}", path.display()))?;
        if &magic != b"GGUF" {
            let adapter = adapter::Adapter::read(path)?;
            if !adapter.is_lora() {
                return Ok(None);
            }
            if adapter.base_sha256 != sha {
                anyhow::bail!(
                    "{}: a LoRA of the model with sha256 {}, not of {} ({sha})",
                    path.display(),
                    adapter.base_sha256,
                    model.display()
                );
            }
            return Ok(Some(adapter.lora));
        }
    }
    let gguf = svfit::ggml::gguf::GgufFile::open(model)?;
    let config = model::Config::from_gguf(&gguf)?;
    let lora = svfit::lora::Lora::read(path, &gguf)?;
    Ok(Some(lora.low_ranks(&config)?))
}

/// Parses the command line and runs the command; errors are one line.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run_serve(&args),
        Command::Generate(args) => inference::run_generate(&args),
        Command::Logits(args) => inference::run_logits(&args),
        Command::Factorize(args) => factors::run_factorize(&args),
        Command::Merge(args) => factors::run_merge(&args),
        Command::Convert(args) => factors::run_convert(&args),
        Command::Adapter(command) => factors::run_adapter(&command),
        Command::Train(args) => train::run_train(&args),
        Command::Eval(args) => train::run_eval(&args),
        #[cfg(feature = "check")]
        Command::Check(args) => check::run_check(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once (our errors often
/// quote their source already).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}
