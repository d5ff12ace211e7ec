//! `svfit generate` and `svfit logits`.

use super::*;

#[derive(Args)]
pub(super) struct GenerateArgs {
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
pub(super) struct LogitsArgs {
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

pub(super) fn run_generate(args: &GenerateArgs) -> Result<()> {
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

pub(super) fn run_logits(args: &LogitsArgs) -> Result<()> {
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
    adapter: Slots,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len() * model.config().n_vocab);
    let mut batch = Batch::new();
    for (i, chunk) in ids.chunks(generate::PREFILL_CHUNK).enumerate() {
        batch.clear();
        batch.add_sequence(chunk, i * generate::PREFILL_CHUNK, 0, true);
        batch.set_slots(0, adapter);
        out.extend_from_slice(model.decode(cache, &batch)?.as_slice());
    }
    Ok(out)
}

fn write_npy<T: npy::NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> Result<()> {
    npy::write(path, shape, data).with_context(|| format!("writing {}", path.display()))
}
