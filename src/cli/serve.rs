//! `svfit serve`: the server's configuration from the flags, and its
//! lifetime (Ctrl-C stops, SIGTERM drains).

use super::*;
use svfit::engine::LoraConfig;
use svfit::server::jobs::JobsConfig;

#[derive(Args)]
pub(super) struct ServeArgs {
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
    #[command(flatten)]
    factors: FactorChoice,
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
    /// LoRAs resident on the compute device at once (PEFT and GGUF LoRAs,
    /// uploaded like adapters); 0 serves no LoRAs. Each slot holds f32 A and
    /// B of --lora-rank on every --lora-targets matrix
    #[arg(long, default_value_t = LoraConfig::default().slots)]
    lora_slots: usize,
    /// The largest LoRA rank served (a mix of LoRAs has their ranks' sum)
    #[arg(long, default_value_t = LoraConfig::default().rank)]
    lora_rank: usize,
    /// Host memory for validated LoRAs, in MB (least recently used are
    /// dropped; SVFit adapters have --adapter-cache-mb)
    #[arg(long, default_value_t = LoraConfig::default().cache_bytes >> 20)]
    lora_cache_mb: usize,
    /// Matrices LoRAs may adapt, as q,k,v,o,gate,up,down (or all-linear);
    /// a LoRA of another matrix is refused on upload
    #[arg(long, default_value = "all-linear")]
    lora_targets: String,
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
    /// Bytes of a request's constraint (JSON schema, regex or grammar) at
    /// most; compiling one is bounded by llguidance's limits too
    #[arg(long, default_value_t = Limits::default().constraint_bytes)]
    max_constraint_bytes: usize,
    /// Bytes of one file uploaded to the files API (/v1/files) at most
    #[arg(long, default_value_t = Limits::default().file_bytes)]
    max_file_bytes: usize,
    /// Files one tenant may keep in the files API at most
    #[arg(long, default_value_t = Limits::default().files_per_tenant)]
    max_files_per_tenant: usize,
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
    /// Seconds that requests already accepted get to finish after SIGTERM
    /// (at once, health turns NOT_SERVING and both ports close: new
    /// connections are refused, open ones get GOAWAY)
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
    /// The memory the server may hold, such as 6G or 800M: a configuration
    /// whose budget (weights, factors, KV cache, compute buffers, both
    /// caches when full; see --dry-run) is larger is refused at start
    /// [default: the least of the cgroup's limit and the memory available]
    #[arg(long, value_parser = svfit::server::budget::parse_size)]
    memory_limit: Option<u64>,
    /// Print the memory budget of this configuration and whether it fits,
    /// then exit (nothing is loaded; where the factors are not computed
    /// yet, full ranks are counted, a bound)
    #[arg(long)]
    dry_run: bool,
    /// Fine-tuning jobs (POST /v1/fine_tuning/jobs) this replica trains at
    /// once, in this process beside serving; 0 trains none here (another
    /// replica on the same --adapters store runs them)
    #[arg(long, default_value_t = JobsConfig::default().runners)]
    train_jobs: usize,
    /// The share of the compute a training job takes while requests are in
    /// flight (0.01 to 1): training and serving take turns, so a request
    /// waits at most one training turn (one packed row's forward and
    /// backward); with no request in flight a job trains at full speed
    #[arg(long, default_value_t = JobsConfig::default().share, value_parser = parse_share)]
    train_share: f64,
    /// Seconds a replica's claim on a running job lasts unless renewed: a
    /// job whose replica died resumes from its last checkpoint after this
    #[arg(long, default_value_t = JobsConfig::default().lease.as_secs_f64())]
    job_lease: f64,
    /// Unfinished fine-tuning jobs of one tenant at most
    #[arg(long, default_value_t = JobsConfig::default().per_tenant)]
    max_jobs_per_tenant: usize,
    /// Optimizer steps one fine-tuning job may take at most
    #[arg(long, default_value_t = JobsConfig::default().max_steps)]
    max_job_steps: u64,
}

/// `--train-share`: a share in [0.01, 1].
fn parse_share(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|x| (0.01..=1.0).contains(x))
        .ok_or_else(|| format!("'{s}': expected a number from 0.01 to 1"))
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

pub(super) fn run_serve(args: &ServeArgs) -> Result<()> {
    use svfit::engine::EngineConfig;
    let model = args.model.path()?;
    let factors = FactorsKey::for_model(&model, &args.factors.targets, &args.factors.rank, "f16")?;
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
            lora: LoraConfig {
                slots: args.lora_slots,
                rank: args.lora_rank.max(1),
                kinds: lora_kinds(&args.lora_targets)?,
                cache_bytes: args.lora_cache_mb << 20,
            },
        },
        limits: Limits {
            prompt_bytes: args.max_prompt_bytes,
            chat_messages: args.max_chat_messages,
            stop_strings: args.max_stop_strings,
            stop_bytes: args.max_stop_bytes,
            mix_parts: args.max_mix,
            constraint_bytes: args.max_constraint_bytes,
            max_tokens: args.model.ctx,
            max_tokens_default: args.max_tokens,
            file_bytes: args.max_file_bytes,
            files_per_tenant: args.max_files_per_tenant,
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
        memory_limit: args.memory_limit,
        jobs: JobsConfig {
            runners: args.train_jobs,
            share: args.train_share,
            lease: std::time::Duration::from_secs_f64(args.job_lease.clamp(1.0, 86_400.0)),
            per_tenant: args.max_jobs_per_tenant,
            max_steps: args.max_job_steps,
        },
    };
    if args.dry_run {
        return dry_run(&config);
    }
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
        // `None`: Ctrl-C; `Some(true)`: SIGTERM; `Some(false)`: the server
        // stopped by itself (with the error `wait` returns).
        let mut failed = Ok(());
        let signal = tokio::select! {
            result = running.wait() => {
                failed = result;
                Some(false)
            }
            _ = tokio::signal::ctrl_c() => None,
            _ = terminate.recv() => Some(true),
        };
        match signal {
            // A fine-tuning job stops after its current turn, to resume.
            None => running.stop_jobs().await,
            Some(true) => {
                eprintln!("svfit draining (at most {:.0} s)", drain.as_secs_f64());
                let cut = running.drain(drain).await;
                eprintln!("svfit stopped; {cut} requests cut off at the deadline");
            }
            Some(false) => {}
        }
        failed
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

/// `serve --dry-run`: the budget, the limit, and whether it fits (exit
/// status 1 where it does not).
fn dry_run(config: &svfit::server::ServeConfig) -> Result<()> {
    use svfit::factors::FactorFile;
    use svfit::server::budget;
    let gguf = svfit::ggml::gguf::GgufFile::open(&config.model)?;
    let path = config.factors.path(&config.home);
    let factors = path
        .exists()
        .then(|| FactorFile::open(&path, &config.factors))
        .transpose()?;
    let budget = budget::of(config, &gguf, factors.as_ref())?;
    println!("memory budget of serving {}:", config.model.display());
    println!("{budget}");
    let limit = budget::limit(config.memory_limit);
    match &limit {
        Some(l) => println!("{l}"),
        None => println!("  no limit found"),
    }
    if !budget.fits(limit.as_ref()) {
        anyhow::bail!("this configuration does not fit: `svfit serve` would refuse it");
    }
    println!("fits");
    Ok(())
}

/// The target kinds of `--lora-targets`.
fn lora_kinds(targets: &str) -> Result<Vec<&'static str>> {
    let targets: svfit::factors::Targets = targets
        .parse()
        .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?;
    Ok(targets.kinds().to_vec())
}
