//! The `svfit` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use svfit::adapter::{self, Deltas, Loaded};
use svfit::factors::FactorsKey;
use svfit::generate::{self, Request};
use svfit::ggml::Type;
use svfit::model::tokenizer::Message;
use svfit::model::{self, Batch, LoadOptions, Model, Slot, Tokenizer, WeightFormat};
use svfit::sampling::SamplingParams;
use svfit::server::validation::Limits;
use svfit::{home, npy};

#[derive(Parser)]
#[command(
    name = "svfit",
    version,
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
    /// Compute (or find cached) the SVD factors of the base model's target matrices.
    Factorize(FactorizeArgs),
    /// Write a standalone GGUF with an adapter merged into the base weights
    /// (W' = W + U diag(sigma - S) Vt), runnable by llama.cpp.
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
}

#[derive(Subcommand)]
enum AdapterCommand {
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
        /// The base model it must belong to [default: the default model]
        #[arg(long, env = "SVFIT_MODEL")]
        model: Option<PathBuf>,
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
        /// The base model [default: the default model]
        #[arg(long, env = "SVFIT_MODEL")]
        model: Option<PathBuf>,
    },
}

/// Which factors: base model, targets, rank policy, dtype.
#[derive(Args)]
struct FactorArgs {
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
    /// Target matrices: all-linear, or a comma list of q, k, v, o, gate, up, down
    #[arg(long, default_value = "q,v")]
    targets: String,
    /// Singular values kept per matrix: energy:T (smallest r whose squared
    /// singular values reach fraction T of the total), rank:N, or full
    #[arg(long, default_value = "energy:0.99")]
    rank: String,
    /// Element type of U and Vt in the factor file: f16 or f32
    #[arg(long, default_value = "f16")]
    dtype: String,
}

impl FactorArgs {
    /// The model path and the factors key these arguments name.
    fn key(&self) -> Result<(PathBuf, svfit::factors::FactorsKey)> {
        let model = home::resolve_model(self.model.as_deref())?;
        let key = svfit::factors::FactorsKey {
            base_sha256: home::sha256_file(&model)
                .with_context(|| format!("reading {}", model.display()))?,
            targets: self.targets.parse()?,
            policy: self.rank.parse()?,
            dtype: self.dtype.parse()?,
        };
        Ok((model, key))
    }
}

#[derive(Args)]
struct ConvertArgs {
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
    /// The layout to write: auto (what `svfit serve` uses on CPU), keep, q8_0 or f16
    #[arg(long, default_value = "auto")]
    weights: WeightFormat,
    /// Output GGUF file
    #[arg(long)]
    out: PathBuf,
}

fn run_convert(args: &ConvertArgs) -> Result<()> {
    let model = home::resolve_model(args.model.as_deref())?;
    let n = model::write_converted(&model, args.weights, &args.out)
        .with_context(|| format!("converting {}", model.display()))?;
    println!(
        "wrote {} ({n} matrices converted for --weights {})",
        args.out.display(),
        args.weights
    );
    Ok(())
}

#[derive(Args)]
struct FactorizeArgs {
    #[command(flatten)]
    factors: FactorArgs,
    /// Recompute even when the cache has these factors
    #[arg(long)]
    force: bool,
}

/// Which model to load and how to run it.
#[derive(Args)]
struct ModelArgs {
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
    /// CPU threads [default: one per core]
    #[arg(long)]
    threads: Option<usize>,
    /// Compute device: "cpu", "auto" (the first GPU, else CPU) or a device name such as "cuda0"
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Context size in tokens (KV cache cells); capped at the model's training context
    #[arg(long = "ctx", default_value_t = 4096)]
    ctx: usize,
    /// How the weight matrices are held: auto (on CPU, Q8_0 for matrices
    /// stored in fewer than 8 bits: batches run several times faster),
    /// keep (as stored, bit-exact with llama.cpp on the same file), q8_0
    /// or f16
    #[arg(long, default_value = "auto")]
    weights: WeightFormat,
}

impl ModelArgs {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            threads: self.threads.unwrap_or_else(model::default_threads),
            weights: self.weights,
        }
    }

    fn path(&self) -> Result<PathBuf> {
        Ok(home::resolve_model(self.model.as_deref())?)
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

/// Which SVFit adapter (or weighted mix of adapters) to apply.
#[derive(Args)]
struct AdapterArgs {
    /// SVFit adapter file (.safetensors) to apply to the base model
    #[arg(long, conflicts_with = "mix")]
    adapter: Option<PathBuf>,
    /// A weighted mix of adapters of the same factors, as
    /// A.safetensors=0.7,B.safetensors=0.3: delta = sum of weight x delta
    #[arg(long)]
    mix: Option<String>,
}

/// A validated adapter or mix: its factors and combined deltas.
struct Resolved {
    key: FactorsKey,
    factors: PathBuf,
    deltas: Deltas,
    /// What was applied, for messages and metadata.
    description: String,
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

    /// Reads and validates the adapters against the model at `model`.
    fn resolve(&self, model: &Path) -> Result<Option<Resolved>> {
        let parts = self.parts()?;
        if parts.is_empty() {
            return Ok(None);
        }
        let sha =
            home::sha256_file(model).with_context(|| format!("reading {}", model.display()))?;
        let home = home::home_dir();
        let mut loaded: Vec<(PathBuf, Loaded)> = Vec::new();
        for (path, _) in &parts {
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
            loaded.push((path.clone(), l));
        }
        let deltas: Vec<Deltas> = loaded.iter().map(|(_, l)| l.deltas()).collect();
        let weighted: Vec<(f32, &Deltas)> = parts.iter().map(|(_, w)| *w).zip(&deltas).collect();
        let description = parts
            .iter()
            .map(|(p, w)| format!("{}={w}", p.display()))
            .collect::<Vec<_>>()
            .join(",");
        let key = loaded.swap_remove(0).1.key;
        Ok(Some(Resolved {
            factors: key.path(&home),
            key,
            deltas: adapter::mix(&weighted),
            description,
        }))
    }

    /// Applies the adapter (if any) to `model`: its factors in slot tables,
    /// the deltas in slot 1. Returns the slot to run with.
    fn apply(&self, model: &mut Model, model_path: &Path) -> Result<Slot> {
        let Some(resolved) = self.resolve(model_path)? else {
            return Ok(0);
        };
        let factors = svfit::factors::read_factors(&resolved.factors, &resolved.key)?;
        model.attach_factors(&factors, 2, Type::Q8_0)?;
        model.set_adapter(1, &resolved.deltas)?;
        Ok(1)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Raw prompt, tokenized as given (special tokens parsed)
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template
    #[arg(long)]
    chat: Option<String>,
    /// A system message for --chat
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Stop after this many generated tokens
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy and deterministic
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: keep tokens up to this cumulative probability
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the top token's probability
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repetition penalty considers
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); it is not printed
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Text to score, tokenized exactly as given (special tokens parsed; BOS
    /// only where the model's metadata asks for it)
    #[arg(long)]
    text: String,
    /// Output .npy file: float32 [n_tokens, n_vocab]
    #[arg(long)]
    out: PathBuf,
    /// Also write the token ids as an int32 .npy file [n_tokens]
    #[arg(long)]
    ids_out: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the gRPC API (loopback only unless --api-keys or --allow-remote)
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: std::net::SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/chat/completions,
    /// /v1/completions, /v1/models; `model` names an adapter or the base
    /// model's file name), or `none` to turn it off. Same keys, limits and
    /// TLS as gRPC
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_http_addr)]
    http_addr: HttpAddr,
    #[command(flatten)]
    model: ModelArgs,
    /// Target matrices the served adapters are made for
    #[arg(long, default_value = "q,v")]
    targets: String,
    /// Rank policy of the served factors
    #[arg(long, default_value = "energy:0.99")]
    rank: String,
    /// Adapter store: a directory (DIR/<tenant>/<id>.safetensors), or with the
    /// s3 feature an object store URL such as s3://bucket/prefix (credentials
    /// from AWS_* variables) [default: $SVFIT_HOME/adapters]
    #[arg(long)]
    adapters: Option<String>,
    /// Host memory for the prefix cache, in MB (0 turns it off): the KV of
    /// prompts already seen, in blocks of 64 tokens keyed by the adapter
    /// version and every token before, so a request that starts like an
    /// earlier one (a shared system prompt, the previous turns of a chat)
    /// prefills only the rest, with exactly the same result. Least recently
    /// used blocks are dropped
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// Host memory for validated adapters, in MB (least recently used are dropped)
    #[arg(long, default_value_t = 256)]
    adapter_cache_mb: usize,
    /// Adapters resident on the compute device at once (one batch may mix them all)
    #[arg(long, default_value_t = 32)]
    adapter_slots: usize,
    /// Sequences decoded together at most
    #[arg(long, default_value_t = 32)]
    max_sequences: usize,
    /// KV cache cells shared by all sequences [default: 8 x --ctx]
    #[arg(long)]
    kv_cells: Option<usize>,
    /// Requests waiting for admission at most (more get RESOURCE_EXHAUSTED)
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Requests of one tenant waiting for admission at most (more get
    /// RESOURCE_EXHAUSTED), so one tenant cannot fill the queue
    #[arg(long, default_value_t = 256)]
    tenant_queue: usize,
    /// max_tokens of requests that do not set it
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Bytes of a request's prompt (or of its chat messages together) at most
    #[arg(long, default_value_t = Limits::default().prompt_bytes)]
    max_prompt_bytes: usize,
    /// Chat messages in one request at most
    #[arg(long, default_value_t = Limits::default().chat_messages)]
    max_chat_messages: usize,
    /// Stop strings in one request at most
    #[arg(long, default_value_t = Limits::default().stop_strings)]
    max_stop_strings: usize,
    /// Bytes of one stop string at most
    #[arg(long, default_value_t = Limits::default().stop_bytes)]
    max_stop_bytes: usize,
    /// Adapters in one mix at most
    #[arg(long, default_value_t = Limits::default().mix_parts)]
    max_mix: usize,
    /// Adapters one tenant may pin (all tenants together may pin one less
    /// than --adapter-slots)
    #[arg(long, default_value_t = 4)]
    pins_per_tenant: usize,
    /// Open connections at most, per API (more wait until one closes)
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Requests per second of one tenant on average, over both services
    /// (more get RESOURCE_EXHAUSTED with retry-after; 0: no limit)
    #[arg(long, default_value_t = 100.0)]
    tenant_rate: f64,
    /// Requests of one tenant at once above --tenant-rate
    #[arg(long, default_value_t = 200.0)]
    tenant_burst: f64,
    /// Seconds that requests already queued or running get to finish after
    /// SIGTERM (health turns NOT_SERVING and new requests are refused at once)
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Seconds an adapter upload may take once its turn has come (a few
    /// are buffered at a time; a stalled one gets DEADLINE_EXCEEDED)
    #[arg(long, default_value_t = 60.0)]
    upload_timeout: f64,
    /// API key file: lines of 'KEY TENANT' ('*' as the tenant makes an admin key)
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// TLS certificate (PEM); needs --tls-key
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Listen on a non-loopback address without API keys
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Output GGUF file
    #[arg(long)]
    out: PathBuf,
    /// Stored type of the merged matrices: f16, f32, or keep (the base's own
    /// type, re-quantized: with 4-bit bases small deltas are mostly lost)
    #[arg(long = "type", default_value = "f16")]
    ty: String,
}

#[derive(Args)]
struct TrainArgs {
    /// Training data, JSONL: {"prompt","completion"}, {"messages":[{"role","content"},...]}
    /// (loss on assistant turns) or {"text"} (loss on every token)
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Output adapter (.safetensors); A.ckpt, A.metrics.jsonl and
    /// A.loss.png are written beside it
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Held-out data (JSONL) evaluated after every epoch
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Without --eval: hold out this share of --data for evaluation (0 = none)
    #[arg(long, default_value_t = 0.0)]
    eval_split: f64,
    /// Fail on the first unusable line (default: skip and count them)
    #[arg(long)]
    strict: bool,
    /// GGUF model file [default: the SmolLM2-135M-Instruct model in $SVFIT_HOME/models]
    #[arg(long, env = "SVFIT_MODEL")]
    model: Option<PathBuf>,
    /// Target matrices: all-linear, or a comma list of q, k, v, o, gate, up, down
    #[arg(long, default_value = "q,v")]
    targets: String,
    /// Singular values kept per matrix (see `svfit factorize --help`)
    #[arg(long, default_value = "energy:0.99")]
    rank: String,
    /// Passes over the training data
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many optimizer steps in all (the schedule ends there)
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate, as a relative change of a singular value per step
    /// (the optimizer trains p = (sigma - S) / S; spectral shifts want rates
    /// far above LoRA's)
    #[arg(long, default_value_t = 2e-2)]
    lr: f32,
    /// Warm-up steps [default: a tenth of the steps]
    #[arg(long)]
    warmup: Option<u64>,
    /// The cosine decay ends at lr x this
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f32,
    /// AdamW weight decay (pulls sigma back toward S)
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the gradient to this L2 norm (0 = off)
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Examples per optimizer step (their gradients are accumulated)
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per packed row; longer prompts are cut at the front
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Seed of the data order (and of --eval-split)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device: auto (the first GPU, else CPU), cpu, cuda or a device name such as cuda0
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads [default: one per core]
    #[arg(long)]
    threads: Option<usize>,
    /// Frozen weights during training: auto (f32 when it fits in half the
    /// free memory), f32, or keep (as stored: less memory, slower backward)
    #[arg(long, default_value = "auto")]
    frozen: String,
    /// Continue from a checkpoint (A.ckpt): its data, output and
    /// hyper-parameters are used; the data must be unchanged
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this many optimizer steps in all, writing a checkpoint
    /// (the schedule still plans the whole run; --resume continues it)
    #[arg(long)]
    stop_after: Option<u64>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// JSONL of {"prompt","completion"} records
    #[arg(long)]
    data: PathBuf,
    /// Tokens generated per answer at most
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Score only the first N records
    #[arg(long)]
    limit: Option<usize>,
    /// Print every prompt's answer
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(&args),
        Command::Generate(args) => run_generate(&args),
        Command::Logits(args) => run_logits(&args),
        Command::Factorize(args) => run_factorize(&args),
        Command::Merge(args) => run_merge(&args),
        Command::Convert(args) => run_convert(&args),
        Command::Adapter(command) => run_adapter(&command),
        Command::Train(args) => run_train(&args),
        Command::Eval(args) => run_eval(&args),
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

/// `--http-addr`: an address, or `none`.
#[derive(Clone, Copy)]
struct HttpAddr(Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "none" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{e} (an address such as 127.0.0.1:8080, or none)"))
}

fn run_serve(args: &ServeArgs) -> Result<()> {
    use svfit::engine::EngineConfig;
    let model = args.model.path()?;
    let factors = FactorsKey {
        base_sha256: home::sha256_file(&model)
            .with_context(|| format!("reading {}", model.display()))?,
        targets: args.targets.parse()?,
        policy: args.rank.parse()?,
        dtype: "f16".parse()?,
    };
    let config = svfit::server::ServeConfig {
        addr: args.addr,
        load: args.model.load_options(),
        model,
        factors,
        home: home::home_dir(),
        adapters: args.adapters.clone().unwrap_or_else(|| {
            home::home_dir()
                .join("adapters")
                .to_string_lossy()
                .into_owned()
        }),
        adapter_cache_bytes: args.adapter_cache_mb << 20,
        engine: EngineConfig {
            max_sequences: args.max_sequences.max(1),
            context: args.model.ctx.max(2),
            kv_cells: args.kv_cells.unwrap_or(8 * args.model.ctx),
            adapter_slots: args.adapter_slots.max(1),
            queue_limit: args.queue,
            tenant_queue_limit: args.tenant_queue,
            prefill_budget: generate::PREFILL_CHUNK,
            prefix_cache_bytes: args.prefix_cache_mb << 20,
        },
        limits: Limits {
            prompt_bytes: args.max_prompt_bytes,
            chat_messages: args.max_chat_messages,
            stop_strings: args.max_stop_strings,
            stop_bytes: args.max_stop_bytes,
            mix_parts: args.max_mix,
            max_tokens: args.model.ctx,
            max_tokens_default: args.max_tokens,
        },
        pins_per_tenant: args.pins_per_tenant,
        max_connections: args.max_connections,
        tenant_rate: args.tenant_rate,
        tenant_burst: args.tenant_burst,
        upload_timeout: std::time::Duration::from_secs_f64(args.upload_timeout),
        api_keys: args.api_keys.clone(),
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        metrics_addr: args.metrics_addr,
        http_addr: args.http_addr.0,
        allow_remote: args.allow_remote,
    };
    init_logs();
    let runtime = tokio::runtime::Runtime::new()?;
    let drain = std::time::Duration::from_secs_f64(args.drain_timeout);
    runtime.block_on(async {
        let mut running = svfit::server::start(config).await?;
        eprintln!(
            "svfit serving on {} (Ctrl-C stops; SIGTERM drains)",
            running.addr
        );
        if let Some(http) = running.http_addr {
            let scheme = if args.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            eprintln!("svfit OpenAI-compatible API on {scheme}://{http}/v1");
        }
        if let Some(metrics) = running.metrics_addr {
            eprintln!("svfit metrics on http://{metrics}/metrics");
        }
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = running.wait() => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => {
                eprintln!("svfit draining (at most {:.0} s)", drain.as_secs_f64());
                let cut = running.drain(drain).await;
                eprintln!("svfit stopped; {cut} requests cut off at the deadline");
                Ok(())
            }
        }
    })
}

/// The server's logs: one line per event on stderr, `key=value` fields;
/// `RUST_LOG` filters them (default: info for svfit and its requests,
/// warnings from tonic and the rest).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,svfit=info,request=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn run_generate(args: &GenerateArgs) -> Result<()> {
    let (mut model, tokenizer) = args.model.load()?;
    let adapter = args.adapter.apply(&mut model, &args.model.path()?)?;
    let prompt_text = match (&args.prompt, &args.chat) {
        (Some(p), _) => p.clone(),
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", user));
            tokenizer.apply_chat_template(&messages, true)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let request = Request {
        prompt: tokenizer.encode(&prompt_text, true),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed: args.seed,
        },
        adapter,
    };
    let n_ctx = args.model.n_ctx(&model);
    generate::check_prompt(&request.prompt, n_ctx)?;
    let mut cache = model.new_cache(n_ctx)?;
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    generate::generate(&mut model, &mut cache, &tokenizer, &request, |text| {
        if write_error.is_none() {
            write_error = stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
                .err();
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    Ok(())
}

fn run_logits(args: &LogitsArgs) -> Result<()> {
    let (mut model, tokenizer) = args.model.load()?;
    let adapter = args.adapter.apply(&mut model, &args.model.path()?)?;
    let ids = tokenizer.encode(&args.text, true);
    let n_ctx = args.model.n_ctx(&model);
    if ids.is_empty() {
        anyhow::bail!("the text has no tokens");
    }
    if ids.len() > n_ctx {
        anyhow::bail!(
            "the text has {} tokens; the context holds {n_ctx}",
            ids.len()
        );
    }
    let mut cache = model.new_cache(n_ctx)?;
    let logits = all_logits(&mut model, &mut cache, &ids, adapter)?;
    let n_vocab = model.config().n_vocab;
    write_npy(&args.out, &[ids.len(), n_vocab], &logits)?;
    if let Some(path) = &args.ids_out {
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        write_npy(path, &[ids.len()], &ids)?;
    }
    eprintln!(
        "wrote logits [{}, {n_vocab}] to {}",
        ids.len(),
        args.out.display()
    );
    Ok(())
}

/// Logits of every position of `ids` as one sequence, row-major.
fn all_logits(
    model: &mut Model,
    cache: &mut model::KvCache,
    ids: &[u32],
    adapter: Slot,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len() * model.config().n_vocab);
    let mut batch = Batch::new();
    for (i, chunk) in ids.chunks(generate::PREFILL_CHUNK).enumerate() {
        batch.clear();
        batch.add_sequence(chunk, i * generate::PREFILL_CHUNK, 0, true);
        batch.set_adapter(0, adapter);
        out.extend_from_slice(model.decode(cache, &batch)?.as_slice());
    }
    Ok(out)
}

fn write_npy<T: npy::NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> Result<()> {
    npy::write(path, shape, data).with_context(|| format!("writing {}", path.display()))
}

fn run_factorize(args: &FactorizeArgs) -> Result<()> {
    use svfit::factors;
    let (path, key) = args.factors.key()?;
    let out = key.path(&home::home_dir());
    let ranks: Vec<_> = if out.exists() && !args.force {
        eprintln!("factors already cached at {}", out.display());
        factors::read_singular_values(&out, &key)?
            .into_iter()
            .map(|(t, s)| (t, s.len()))
            .collect()
    } else {
        let start = std::time::Instant::now();
        let done = factors::build(&path, &key, |i, total, name, rank, full| {
            let secs = start.elapsed().as_secs_f64();
            eprint!("\r[{i:>3}/{total}] {name:<28} rank {rank:>4} of {full:>4}  {secs:>5.1}s");
        })?;
        eprintln!();
        factors::write_factors(&out, &key, &done)?;
        eprintln!("wrote {}", out.display());
        done.into_iter().map(|(t, f)| (t, f.rank())).collect()
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
fn load_adapter(path: &Path, model: Option<&Path>) -> Result<Loaded> {
    let model = home::resolve_model(model)?;
    let sha = home::sha256_file(&model).with_context(|| format!("reading {}", model.display()))?;
    Ok(Loaded::open(path, &model, &sha, &home::home_dir())?)
}

fn run_merge(args: &MergeArgs) -> Result<()> {
    let ty: svfit::merge::MergeType = args.ty.parse()?;
    let model = home::resolve_model(args.model.as_deref())?;
    let resolved = args
        .adapter
        .resolve(&model)?
        .context("name the adapter to merge with --adapter FILE or --mix A=W,B=W")?;
    let factors = svfit::factors::read_factors(&resolved.factors, &resolved.key)?;
    let info = [
        (
            "svfit.merged.adapters".to_string(),
            resolved.description.clone(),
        ),
        ("svfit.merged.factors_id".to_string(), resolved.key.id()),
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

fn run_adapter(command: &AdapterCommand) -> Result<()> {
    use svfit::adapter::Adapter;
    use svfit::factors;
    match command {
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
        AdapterCommand::Inspect { adapter, model } => {
            let Loaded {
                adapter: a,
                singular,
                ..
            } = load_adapter(adapter, model.as_deref())?;
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
            model,
        } => {
            if !scale.is_finite() || *scale < 0.0 {
                anyhow::bail!("--scale must be a finite number >= 0, got {scale}");
            }
            let Loaded {
                adapter: mut a,
                singular,
                ..
            } = load_adapter(adapter, model.as_deref())?;
            let mut rng = svfit::sampling::SplitMix64::new(*seed);
            for ((_, sigma), (_, s)) in a.sigma.iter_mut().zip(&singular) {
                for (v, base) in sigma.iter_mut().zip(s) {
                    *v = base * (1.0 + scale * rng.normal());
                }
            }
            a.info.insert(
                "svfit.perturbed".into(),
                format!("scale {scale}, seed {seed}"),
            );
            a.write(out)?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}

/// Ctrl-C during training: the first asks for a checkpoint and a clean
/// stop after the current step; the second quits at once.
fn stop_on_ctrl_c() -> &'static std::sync::atomic::AtomicBool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    let spawned = std::thread::Builder::new().name("ctrl-c".into()).spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                if STOP.swap(true, Ordering::SeqCst) {
                    eprintln!("\nstopped without a checkpoint");
                    std::process::exit(130);
                }
                eprintln!(
                    "\nstopping after this step, writing a checkpoint (Ctrl-C again quits now)"
                );
            }
        });
    });
    if spawned.is_err() {
        eprintln!("warning: no Ctrl-C handler; Ctrl-C will stop without a checkpoint");
    }
    &STOP
}

/// Progress on stderr: one updating line on a terminal, a line every 10
/// steps otherwise.
struct Progress {
    started: std::time::Instant,
    tty: bool,
    tokens: usize,
    first_step: Option<u64>,
}

impl svfit::train::session::Observer for Progress {
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn event(&mut self, event: &svfit::train::Event<'_>, total: u64) {
        use svfit::train::Event;
        match event {
            Event::Step(r) => {
                let first = *self.first_step.get_or_insert(r.step - 1);
                self.tokens += r.tokens;
                let secs = self.started.elapsed().as_secs_f64();
                let done = (r.step - first) as f64;
                let eta = secs / done.max(1.0) * (total - r.step) as f64;
                let line = format!(
                    "epoch {} step {}/{total} loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s ETA {}",
                    r.epoch,
                    r.step,
                    r.loss,
                    r.lr,
                    r.grad_norm,
                    self.tokens as f64 / secs.max(1e-9),
                    clock(eta),
                );
                if self.tty {
                    eprint!("\r{line}\x1b[K");
                } else if r.step % 10 == 0 || r.step == total {
                    eprintln!("{line}");
                }
            }
            Event::Eval(r) => {
                if self.tty {
                    eprint!("\r\x1b[K");
                }
                let accuracy = r
                    .eval_accuracy
                    .map(|a| format!(", accuracy {:.1}%", 100.0 * a))
                    .unwrap_or_default();
                eprintln!(
                    "eval after step {}: loss {:.4}{accuracy}",
                    r.step, r.eval_loss
                );
            }
            Event::EpochEnd(_) => {}
        }
    }
}

/// `1h02m03s`-style durations.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

fn run_train(args: &TrainArgs) -> Result<()> {
    use svfit::train::session::{self, Checkpoint, Options};
    use svfit::train::{Hyper, Outcome};
    let resume = args
        .resume
        .as_ref()
        .map(|path| Checkpoint::read(path))
        .transpose()?;
    let saved = resume.as_ref().map(|c| c.info.clone());
    let pick = |given: &Option<PathBuf>, saved: Option<PathBuf>| {
        given
            .clone()
            .or(saved)
            .context("--data and --out are needed without --resume")
    };
    let data = pick(&args.data, saved.as_ref().map(|s| s.data.clone()))?;
    let out = pick(&args.out, saved.as_ref().map(|s| s.out.clone()))?;
    let options = Options {
        model: home::resolve_model(args.model.as_deref())?,
        load: LoadOptions {
            device: args.device.clone(),
            threads: args.threads.unwrap_or_else(model::default_threads),
            // Training holds its frozen weights as --frozen says.
            weights: WeightFormat::Keep,
        },
        frozen: args.frozen.parse().map_err(anyhow::Error::msg)?,
        targets: match &saved {
            Some(s) => s.targets.parse()?,
            None => args.targets.parse()?,
        },
        rank: match &saved {
            Some(s) => s.rank_policy.parse()?,
            None => args.rank.parse()?,
        },
        eval: args
            .eval
            .clone()
            .or_else(|| saved.as_ref().and_then(|s| s.eval.clone())),
        eval_split: saved.as_ref().map_or(args.eval_split, |s| s.eval_split),
        strict: args.strict || saved.as_ref().is_some_and(|s| s.strict),
        data,
        out,
        hyper: Hyper {
            lr: args.lr,
            warmup: args.warmup.unwrap_or(0),
            min_lr_ratio: args.min_lr_ratio,
            weight_decay: args.weight_decay,
            clip: args.clip,
            batch: args.batch,
            epochs: args.epochs,
            max_steps: args.max_steps,
            ctx: args.ctx,
            seed: args.seed,
        },
        default_warmup: args.warmup.is_none(),
        stop_after: args.stop_after,
        home: home::home_dir(),
    };
    if !(0.0..1.0).contains(&options.eval_split) {
        anyhow::bail!("--eval-split must be in [0, 1), got {}", options.eval_split);
    }
    let stop = stop_on_ctrl_c();
    let mut progress = Progress {
        started: std::time::Instant::now(),
        tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        tokens: 0,
        first_step: None,
    };
    let summary = session::run(
        &options,
        resume,
        &|| stop.load(std::sync::atomic::Ordering::SeqCst),
        &mut progress,
    )?;
    if progress.tty {
        eprintln!();
    }
    let loss = summary
        .final_loss
        .map(|l| format!(", last loss {l:.4}"))
        .unwrap_or_default();
    match (summary.outcome, &summary.adapter) {
        (Outcome::Finished, Some(adapter)) => eprintln!(
            "wrote {} ({} steps in {}{loss}); metrics {}, plot {}",
            adapter.display(),
            summary.steps,
            clock(summary.seconds),
            summary.metrics.display(),
            summary.plot.display()
        ),
        _ => eprintln!(
            "stopped after step {}; continue with: svfit train --resume {}",
            summary.steps,
            summary.checkpoint.display()
        ),
    }
    Ok(())
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let (mut model, tokenizer) = args.model.load()?;
    let adapter = args.adapter.apply(&mut model, &args.model.path()?)?;
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", args.data.display(), i + 1))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(prompt), Some(completion)) = (field("prompt"), field("completion")) else {
            anyhow::bail!(
                "{}:{}: svfit eval needs {{\"prompt\",\"completion\"}} records",
                args.data.display(),
                i + 1
            );
        };
        records.push((prompt, completion));
    }
    records.truncate(args.limit.unwrap_or(usize::MAX));
    if records.is_empty() {
        anyhow::bail!("{}: no records", args.data.display());
    }
    let norm = |s: &str| s.trim().trim_end_matches(['.', '!']).trim().to_lowercase();
    let labels: std::collections::BTreeSet<String> = records.iter().map(|(_, c)| norm(c)).collect();
    let classes = svfit::train::data::are_class_labels(labels.len(), records.len());
    let n_ctx = args.model.n_ctx(&model);
    let mut cache = model.new_cache(n_ctx)?;
    let (mut exact, mut labelled) = (0usize, 0usize);
    let started = std::time::Instant::now();
    for (i, (prompt, completion)) in records.iter().enumerate() {
        let chat = tokenizer.apply_chat_template(&[Message::new("user", prompt)], true)?;
        let request = Request {
            prompt: tokenizer.encode(&chat, true),
            max_tokens: args.max_tokens,
            stop: Vec::new(),
            sampling: SamplingParams::greedy(),
            adapter,
        };
        let answer = generate::generate(&mut model, &mut cache, &tokenizer, &request, |_| {})?.text;
        let got = norm(&answer);
        exact += (got == norm(completion)) as usize;
        // The first class label the answer names, as a whole word.
        let named = classes
            .then(|| {
                labels
                    .iter()
                    .filter_map(|l| first_word_match(&got, l).map(|at| (at, l)))
                    .min()
                    .map(|(_, l)| l.clone())
            })
            .flatten();
        labelled += (named.as_deref() == Some(norm(completion).as_str())) as usize;
        if args.verbose {
            println!("{:>4} want {:<16} got {answer:?}", i + 1, completion);
        }
    }
    let n = records.len();
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    println!("examples        {n}");
    println!("exact answers   {exact} ({:.1}%)", pct(exact));
    if classes {
        println!(
            "label accuracy  {labelled} ({:.1}%)  [first of {} labels named in the answer]",
            pct(labelled),
            labels.len()
        );
    }
    println!("time            {}", clock(started.elapsed().as_secs_f64()));
    Ok(())
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
