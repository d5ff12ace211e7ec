//! `svfit train` and `svfit eval`, with the training progress printer and
//! Ctrl-C handling.

use super::*;

#[derive(Args)]
pub(super) struct TrainArgs {
    /// Training data, JSONL: {"prompt","completion"}, {"messages":[{"role","content"},...]}
    /// (loss on assistant turns) or {"text"} (loss on every token)
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Output adapter (.safetensors); A.ckpt, A.metrics.jsonl and
    /// A.loss.svg are written beside it
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
    #[command(flatten)]
    base: ModelFile,
    #[command(flatten)]
    factors: FactorChoice,
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
    /// AdamW weight decay: pulls sigma back toward S (0 = off)
    #[arg(long, default_value_t = svfit::train::DEFAULT_WEIGHT_DECAY)]
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
    #[command(flatten)]
    compute: Compute,
    #[command(flatten)]
    train_compute: TrainCompute,
    /// Frozen weights during training: auto (f32 when it fits in half the
    /// free memory), f32, or keep (as stored: less memory, slower backward;
    /// f32 and f16 models only, ggml has no backward through quantized ones)
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
    /// Start from this adapter's singular values instead of the base's (an
    /// SVFit adapter of the same model and factors: train it further)
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct EvalArgs {
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

pub(super) fn run_train(args: &TrainArgs) -> Result<()> {
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
        model: args.base.path()?,
        // Training holds its frozen weights as --frozen says.
        load: args.compute.load_options(WeightFormat::Keep),
        gemm: args.train_compute.gemm,
        full_rank: args.train_compute.full_rank,
        frozen: args.frozen.parse().map_err(anyhow::Error::msg)?,
        targets: match &saved {
            Some(s) => s.targets.parse()?,
            None => args.factors.targets.parse()?,
        },
        rank: match &saved {
            Some(s) => s.rank_policy.parse()?,
            None => args.factors.rank.parse()?,
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
        init: args
            .init
            .as_deref()
            .map(svfit::adapter::Adapter::read)
            .transpose()?,
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
        &|_| stop.load(std::sync::atomic::Ordering::SeqCst),
        &mut progress,
    )?;
    if progress.tty {
        eprintln!();
    }
    let mut loss = summary
        .final_loss
        .map(|l| format!(", last loss {l:.4}"))
        .unwrap_or_default();
    if let Some(l) = summary.eval_loss {
        loss += &format!(", held-out loss {l:.4}");
    }
    if let Some(a) = summary.eval_accuracy {
        loss += &format!(" (accuracy {:.1}%)", 100.0 * a);
    }
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

pub(super) fn run_eval(args: &EvalArgs) -> Result<()> {
    use svfit::train::eval::{read_records, Scorer};
    let (mut model, tokenizer) = args.model.load()?;
    let adapter = args.adapter.apply(&mut model, &args.model.path()?)?;
    let records = read_records(&args.data, args.limit)?;
    let mut scorer = Scorer::new(records.iter().map(|(_, c)| c.as_str()));
    let n_ctx = args.model.n_ctx(&model);
    let mut cache = model.new_cache(n_ctx)?;
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
        scorer.add(&answer, completion);
        if args.verbose {
            println!("{:>4} want {:<16} got {answer:?}", i + 1, completion);
        }
    }
    let n = scorer.examples;
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    println!("examples        {n}");
    println!(
        "exact answers   {} ({:.1}%)",
        scorer.exact,
        pct(scorer.exact)
    );
    if scorer.classes {
        println!(
            "label accuracy  {} ({:.1}%)  [first of {} labels named in the answer]",
            scorer.labelled,
            pct(scorer.labelled),
            scorer.labels.len()
        );
    }
    println!("time            {}", clock(started.elapsed().as_secs_f64()));
    Ok(())
}
