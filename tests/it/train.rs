//! Training (METHOD.md §5): the gradient of every singular value against
//! central finite differences of the loss, on the tiny model.

use crate::common;

use std::path::Path;

use common::Rng;
use svfit::factors::{self, Factor, FactorsKey, TargetMatrix};
use svfit::model::{random, Arch, Learner, LoadOptions, Model};

fn factors_of(model: &Path, home: &Path, targets: &str) -> Vec<(TargetMatrix, Factor)> {
    let key = FactorsKey::for_model(model, targets, "full", "f32").unwrap();
    let path = factors::ensure(model, &key, home).unwrap();
    factors::read_factors(&path, &key).unwrap()
}

fn learner(model: &Path, home: &Path, targets: &str) -> Learner {
    let options = LoadOptions {
        device: "cpu".into(),
        threads: 2,
        ..LoadOptions::default()
    };
    let m = Model::load_for_training(model, &options, true).unwrap();
    Learner::new(m, &factors_of(model, home, targets)).unwrap()
}

#[test]
fn gradient_matches_finite_differences() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    check_gradient(
        &model,
        &dir.path().join("home"),
        "all-linear",
        1e-2,
        Probes::All,
    );
}

/// The same on a tiny model of every other family (q/k/v biases, q/k
/// norms, post-norms, GeGLU, sliding windows, soft-capped logits, Phi-3's
/// targets as parts of fused matrices).
///
/// Gemma's bound is 3e-2: its gradients are ten times smaller (largest
/// 0.16 against 1.0–1.6), so more of them sit near the check's floor (1% of
/// the largest), while the finite differences' f32 noise is the same share
/// of the largest gradient in every family (≈3e-4, seen: Qwen2 4.3e-4 of
/// 1.65, Gemma 4.4e-5 of 0.165). A smaller step makes Gemma's error grow
/// (7e-2 at h = 0.1): noise, not a wrong gradient.
#[test]
fn gradient_matches_finite_differences_in_every_family() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-families");
    for (arch, bound) in [
        (Arch::Qwen2, 1e-2),
        (Arch::Qwen3, 1e-2),
        (Arch::Gemma2, 3e-2),
        (Arch::Gemma3, 3e-2),
        (Arch::Phi3, 1e-2),
    ] {
        let model = dir.path().join(format!("{}.gguf", arch.name()));
        common::write_tiny_model(&model, &random::Shape::tiny(arch));
        eprintln!("== {}", arch.name());
        let home = dir.path().join("home");
        check_gradient(&model, &home, "all-linear", bound, Probes::EachMatrix);
        if arch == Arch::Phi3 {
            // The default targets: parts of attn_qkv adapted, the rest of
            // it and the gate/up halves plain views of their products,
            // which the gradient reaching q and v crosses too.
            check_gradient(&model, &home, "q,v", bound, Probes::EachMatrix);
        }
    }
}

/// Which singular values a gradient check probes.
enum Probes {
    All,
    /// The first two, the middle and the last of every matrix in every
    /// layer: each path through the graph at a quarter of the cost or
    /// less (the tiny llama's check probes them all).
    EachMatrix,
}

fn check_gradient(model: &Path, home: &Path, targets: &str, bound: f64, probes: Probes) {
    let mut learner = learner(model, home, targets);
    let n_vocab = learner.model().config().n_vocab;
    let row = svfit::check::short_row(n_vocab, 7);
    let n = learner.n_params();
    // Away from zero so every path through the branch is exercised.
    let mut rng = Rng::new(3);
    let base: Vec<f32> = rng.normals(n, 0.05);
    learner.set_deltas(&base).unwrap();
    let mut grad = vec![0f32; n];
    let loss = learner.gradient(&row, &mut grad).unwrap();
    let check = learner.evaluate(&row).unwrap();
    assert_eq!(
        loss, check.loss,
        "forward-only and backward graphs disagree on the loss"
    );
    // Against sixth-order central differences.
    let indices: Vec<usize> = match probes {
        Probes::All => (0..n).collect(),
        Probes::EachMatrix => {
            let mut at = 0;
            let mut indices = Vec::new();
            for (_, rank) in learner.matrices() {
                let mut picks = vec![0, 1.min(rank - 1), rank / 2, rank - 1];
                picks.dedup();
                indices.extend(picks.into_iter().map(|i| at + i));
                at += rank;
            }
            assert_eq!(at, n, "the matrices' ranks cover every singular value");
            indices
        }
    };
    let g = svfit::check::gradient_check(&mut learner, &row, &base, Some(&indices)).unwrap();
    eprintln!("{} of {n} singular values: {g:?}", indices.len());
    assert_eq!(g.checked, indices.len());
    assert!(
        g.worst < bound,
        "gradient check failed: {:.2e} at {}",
        g.worst,
        g.at
    );
}

/// Targets whose kept rank is near full train over their full-rank
/// factors in place of the weight (`Learner::with_full_rank`): the same
/// loss and the same gradient of the same values as the weight plus the
/// branch, in families with biases and norms, for kept ranks below full
/// (the factors computed again at full rank) and at full rank (`k`, `v`).
#[test]
fn full_rank_factors_train_the_same_values() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-full-rank");
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let model = dir.path().join(format!("{}.gguf", arch.name()));
        common::write_tiny_model(&model, &random::Shape::tiny(arch));
        let key = FactorsKey::for_model(&model, "all-linear", "rank:40", "f32").unwrap();
        let path = factors::ensure(&model, &key, &dir.path().join("home")).unwrap();
        let kept = factors::read_factors(&path, &key).unwrap();
        let matrices: Vec<TargetMatrix> = kept.iter().map(|(t, _)| t.clone()).collect();
        let full: Vec<Option<Factor>> = factors::full_rank(&model, &matrices, 2)
            .unwrap()
            .into_iter()
            .map(Some)
            .collect();
        let options = LoadOptions {
            device: "cpu".into(),
            threads: 2,
            ..LoadOptions::default()
        };
        let load = || Model::load_for_training(&model, &options, true).unwrap();
        let mut plain = Learner::new(load(), &kept).unwrap();
        let mut whole = Learner::with_full_rank(load(), &kept, &full).unwrap();
        assert_eq!(plain.n_full_rank(), 0);
        assert_eq!(
            whole.n_full_rank(),
            kept.len(),
            "{}: every target pays",
            arch.name()
        );
        assert_eq!(whole.n_params(), plain.n_params());

        let row = svfit::check::short_row(plain.model().config().n_vocab, 7);
        let deltas = Rng::new(5).normals(plain.n_params(), 0.05);
        let mut grads = [vec![0f32; deltas.len()], vec![0f32; deltas.len()]];
        let mut losses = [0f32; 2];
        for ((learner, grad), loss) in [&mut plain, &mut whole]
            .into_iter()
            .zip(&mut grads)
            .zip(&mut losses)
        {
            learner.set_deltas(&deltas).unwrap();
            *loss = learner.gradient(&row, grad).unwrap();
        }
        let largest = grads[0].iter().fold(0f32, |a, g| a.max(g.abs()));
        let worst = grads[0]
            .iter()
            .zip(&grads[1])
            .fold(0f32, |a, (p, w)| a.max((p - w).abs()));
        eprintln!(
            "{}: loss {} vs {}, gradient max difference {worst:.2e} of {largest:.2e}",
            arch.name(),
            losses[0],
            losses[1]
        );
        assert!((losses[0] - losses[1]).abs() < 1e-4 * losses[0].abs().max(1.0));
        assert!(largest > 0.0 && worst < 1e-3 * largest);
    }
}

/// A row of short examples attends example by example (each padded to the
/// longest, `Learner::set_attention_by_example`): the same loss and
/// gradient as attention over the whole row with a mask, in families with
/// a sliding window (the examples are longer than Gemma's tiny window of
/// 16), GQA and biases.
#[test]
fn attention_by_example_matches_the_whole_row() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-by-example");
    for arch in [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Phi3,
    ] {
        let model = dir.path().join(format!("{}.gguf", arch.name()));
        common::write_tiny_model(&model, &random::Shape::tiny(arch));
        let mut learner = learner(&model, &dir.path().join("home"), "all-linear");
        let n_vocab = learner.model().config().n_vocab;
        let mut rng = Rng::new(11);
        let mut row = svfit::model::TrainRow::default();
        for len in [17, 18, 5, 16, 17] {
            let loss: Vec<bool> = (0..len).map(|i| i >= len / 3).collect();
            row.push(&rng.tokens(len, n_vocab), &loss);
        }
        assert!(row.attends_by_example());
        let deltas = rng.normals(learner.n_params(), 0.05);
        learner.set_deltas(&deltas).unwrap();
        let mut runs = Vec::new();
        for by_example in [true, false] {
            learner.set_attention_by_example(by_example);
            let mut grad = vec![0f32; deltas.len()];
            let loss = learner.gradient(&row, &mut grad).unwrap();
            let eval = learner.evaluate(&row).unwrap();
            runs.push((loss, grad, eval.hits));
        }
        let [(loss, grad, hits), (whole_loss, whole_grad, whole_hits)] = &runs[..] else {
            unreachable!()
        };
        let largest = whole_grad.iter().fold(0f32, |a, g| a.max(g.abs()));
        let worst = grad
            .iter()
            .zip(whole_grad)
            .fold(0f32, |a, (p, w)| a.max((p - w).abs()));
        eprintln!(
            "{}: loss {loss} vs {whole_loss}, gradient max difference {worst:.2e} of {largest:.2e}",
            arch.name()
        );
        assert!((loss - whole_loss).abs() < 1e-4 * whole_loss.abs().max(1.0));
        assert!(largest > 0.0 && worst < 1e-3 * largest);
        assert_eq!(hits, whole_hits);
    }
}

// ---- `svfit train` on the default model, as a user runs it ----

use std::process::{Command, Output};

use common::temp_dir;

/// A factor cache shared by the tests of this file (q,v factors of the
/// default model take a few seconds to compute).
const HOME: &str = "/tmp/svfit-test-train-home";

fn svfit(args: &[&str]) -> Output {
    let model = common::default_model();
    let mut command = Command::new(env!("CARGO_BIN_EXE_svfit"));
    command
        .args(args)
        .env("SVFIT_HOME", HOME)
        .env("SVFIT_MODEL", &model);
    command.output().expect("run svfit")
}

fn ok(out: Output) -> Output {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "svfit failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

/// A small classification task: is a number odd or even.
fn write_data(path: &Path, numbers: impl Iterator<Item = u32>) {
    let lines: Vec<String> = numbers
        .map(|n| {
            let answer = if n % 2 == 0 { "even" } else { "odd" };
            serde_json::json!({
                "prompt": format!("Is {n} odd or even? Answer with one word."),
                "completion": answer,
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `(step, loss)` of every step line of a metrics.jsonl.
fn step_losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?))
        })
        .collect()
}

fn sigmas(adapter: &Path) -> Vec<f32> {
    svfit::adapter::Adapter::read(adapter)
        .unwrap()
        .sigma
        .into_iter()
        .flat_map(|(_, s)| s)
        .collect()
}

fn resume(checkpoint: &Path) {
    let checkpoint = checkpoint.to_str().unwrap();
    ok(svfit(&["train", "--resume", checkpoint, "--device", "cpu"]));
}

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train", "--data", data, "--out", out, "--epochs", "2", "--batch", "4", "--ctx", "128",
        "--lr", "0.05", "--device", "cpu",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn resume_continues_exactly() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-resume");
    let data = dir.path().join("data.jsonl");
    write_data(&data, 10..22);
    let data = data.to_str().unwrap();
    let whole = dir.path().join("whole.safetensors");
    let parts = dir.path().join("parts.safetensors");
    let (whole_s, parts_s) = (whole.to_str().unwrap(), parts.to_str().unwrap());

    ok(svfit(&train_args(data, whole_s, &[])));
    // One epoch (3 steps), stop, resume for the second.
    let stopped = ok(svfit(&train_args(data, parts_s, &["--stop-after", "3"])));
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    assert!(!parts.exists(), "a stopped run writes no adapter");
    let checkpoint = dir.path().join("parts.ckpt");
    resume(&checkpoint);

    let a = step_losses(&dir.path().join("whole.metrics.jsonl"));
    let b = step_losses(&dir.path().join("parts.metrics.jsonl"));
    assert_eq!(a.len(), 6, "{a:?}");
    assert_eq!(
        a.iter().map(|s| s.0).collect::<Vec<_>>(),
        b.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!((la - lb).abs() < 1e-4, "step {step}: {la} vs {lb}");
    }
    assert!(a[5].1 < a[0].1, "the loss should fall: {a:?}");
    let (sa, sb) = (sigmas(&whole), sigmas(&parts));
    let worst = sa
        .iter()
        .zip(&sb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "adapters differ by {worst}");
    check_plot(&dir.path().join("whole.loss.svg"), a.len());
    check_plot(&dir.path().join("parts.loss.svg"), b.len());
}

/// The loss plot is an SVG document whose elements open and close in
/// pairs, with the train loss curve of `steps` points and no eval loss
/// drawn (the run has no held-out data), both named in the legend.
fn check_plot(path: &Path, steps: usize) {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.ends_with("</svg>\n"), "{svg}");
    for element in ["svg", "g", "text", "defs", "clipPath"] {
        let opened = svg.matches(&format!("<{element}>")).count()
            + svg.matches(&format!("<{element} ")).count();
        let closed = svg.matches(&format!("</{element}>")).count();
        assert_eq!(opened, closed, "<{element}> in {svg}");
    }
    let curve = svg
        .split("data-name=\"train loss\"")
        .nth(1)
        .and_then(|g| g.split("points=\"").nth(1))
        .and_then(|p| p.split('"').next())
        .expect("a train loss polyline");
    assert_eq!(curve.split(' ').count(), steps, "{curve}");
    let eval = svg.split("data-name=\"eval loss\"").nth(1).expect("eval");
    assert!(
        !eval[..eval.find("</g>").unwrap()].contains("<rect"),
        "{eval}"
    );
    for name in ["train loss", "eval loss", "step", "svfit train"] {
        assert!(svg.contains(&format!(">{name}</text>")), "{name}");
    }
}

#[test]
fn bad_data_lines_are_reported_or_refused() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-bad");
    let data = dir.path().join("data.jsonl");
    let mut text = String::new();
    text.push_str("{\"prompt\": \"Is 3 odd or even?\", \"completion\": \"odd\"}\n");
    text.push_str("not json\n");
    text.push_str("{\"prompt\": \"only a prompt\"}\n");
    text.push_str("{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n");
    text.push_str("{\"text\": \"Some plain text to learn.\"}\n");
    std::fs::write(&data, text).unwrap();
    let out_path = dir.path().join("a.safetensors");
    let (d, o) = (data.to_str().unwrap(), out_path.to_str().unwrap());

    let strict = svfit(&[
        "train", "--data", d, "--out", o, "--strict", "--device", "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(!strict.status.success());
    assert!(stderr.contains("data.jsonl:2:"), "names the line: {stderr}");
    assert!(!out_path.exists());

    let lenient = ok(svfit(&[
        "train",
        "--data",
        d,
        "--out",
        o,
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]));
    let stderr = String::from_utf8_lossy(&lenient.stderr);
    assert!(
        stderr.contains("2 examples") && stderr.contains("3 lines skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(out_path.exists());
}

/// The tokens whose prediction is in the loss, as text.
fn loss_text(tokenizer: &svfit::model::Tokenizer, e: &svfit::train::data::Example) -> String {
    let next: Vec<u32> = (0..e.tokens.len() - 1)
        .filter(|&i| e.loss[i])
        .map(|i| e.tokens[i + 1])
        .collect();
    tokenizer.decode(&next)
}

#[test]
fn records_put_the_loss_on_the_answers() {
    let _machine = crate::common::shared();
    use svfit::model::Tokenizer;
    use svfit::train::data::Dataset;
    let dir = temp_dir("train-records");
    let data = dir.path().join("data.jsonl");
    let records = [
        serde_json::json!({"prompt": "Is 3 odd or even?", "completion": "odd"}),
        serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]}),
        serde_json::json!({"text": "Plain text is learned everywhere."}),
    ];
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let tokenizer = Tokenizer::load(&common::default_model()).unwrap();
    let set = Dataset::read(&data, &tokenizer, 512, true).unwrap();
    assert_eq!(set.examples.len(), 3);
    let [answer, chat, text] = &set.examples[..] else {
        unreachable!()
    };
    assert_eq!(loss_text(&tokenizer, answer), "odd<|im_end|>\n");
    let rendered = tokenizer.decode(&answer.tokens);
    assert!(
        rendered
            .starts_with("<|im_start|>user\nIs 3 odd or even?<|im_end|>\n<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    assert_eq!(
        loss_text(&tokenizer, chat),
        "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    );
    assert_eq!(
        loss_text(&tokenizer, text),
        tokenizer.decode(&text.tokens[1..])
    );
    assert_eq!(text.n_targets(), text.tokens.len() - 1);
    // A prompt longer than --ctx is cut at the front, the answer kept.
    let short = Dataset::read(&data, &tokenizer, 12, false).unwrap();
    let cut = &short.examples[0];
    assert!(cut.tokens.len() <= 12 && short.truncated >= 1);
    assert_eq!(loss_text(&tokenizer, cut), "odd<|im_end|>\n");
}

#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-sigint");
    let data = dir.path().join("data.jsonl");
    write_data(&data, 30..54);
    let out = dir.path().join("a.safetensors");
    let args = train_args(data.to_str().unwrap(), out.to_str().unwrap(), &[]);
    let child = Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(&args)
        .env("SVFIT_HOME", HOME)
        .env("SVFIT_MODEL", common::default_model())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first step is logged.
    let metrics = dir.path().join("a.metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("\"loss\"")) {
        assert!(std::time::Instant::now() < deadline, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(stopped.status.success(), "{stderr}");
    assert!(
        stderr.contains("writing a checkpoint") && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(!out.exists(), "an interrupted run writes no adapter");
    let steps = step_losses(&metrics).len();
    assert!(
        (1..12).contains(&steps),
        "stopped after {steps} of 12 steps"
    );

    let checkpoint = dir.path().join("a.ckpt");
    resume(&checkpoint);
    let done = step_losses(&metrics);
    assert_eq!(
        done.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(out.exists());
}

/// ggml has no backward through quantized matrices (it aborts the whole
/// process): `--frozen keep` on the default model (Q4_1) is refused with
/// the way out, before anything slow runs, and nothing is written.
#[test]
fn frozen_quantized_weights_are_refused_not_aborted() {
    let _machine = crate::common::shared();
    let dir = temp_dir("train-frozen-keep");
    let data = dir.path().join("train.jsonl");
    write_data(&data, 0..16);
    let out = dir.path().join("a.safetensors");
    let run = svfit(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--frozen",
        "keep",
        "--max-steps",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is q4_1") && stderr.contains("use --frozen f32"),
        "{stderr}"
    );
    assert!(!out.exists());
}
