//! What the benches share: command-line options and exits. Each bench uses
//! part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use svfit::model::WeightFormat;

/// `--model PATH`, `--threads N`, `--reps N`, `--weights LIST` (default
/// `auto`, the file as stored; `auto,q8_0` also runs the lossy layout), and the CPU kernels' switches `--batch-kernels 1|0`
/// (`SVFIT_BATCH_KERNELS`) and `--train-gemm 1|0` (`SVFIT_TRAIN_GEMM`).
#[derive(clap::Parser)]
#[command(about = "an svfit benchmark (see its file under benches/)")]
pub struct Options {
    #[arg(long, default_value_os_t = svfit::home::resolve_model(None).unwrap_or_else(fail))]
    pub model: PathBuf,
    #[arg(long, default_value_t = svfit::model::default_threads())]
    pub threads: usize,
    /// Repetitions [default: the bench's own]
    #[arg(long = "reps")]
    reps_flag: Option<usize>,
    #[arg(skip)]
    pub reps: usize,
    /// Weight layouts to compare
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub weights: Vec<WeightFormat>,
    /// The batched kernels where the CPU runs them (0: ggml's products)
    #[arg(long = "batch-kernels", env = "SVFIT_BATCH_KERNELS", value_name = "1|0",
          default_value = "1", value_parser = on_unless_zero, action = clap::ArgAction::Set)]
    pub batch_kernels: bool,
    /// Training products through faer's GEMM on the CPU (0: ggml's kernels)
    #[arg(long = "train-gemm", env = "SVFIT_TRAIN_GEMM", value_name = "1|0",
          default_value = "1", value_parser = on_unless_zero, action = clap::ArgAction::Set)]
    pub train_gemm: bool,
    /// Passed by `cargo bench`
    #[arg(long, hide = true)]
    bench: bool,
}

/// "0" is off, anything else on (as `svfit`'s switches read).
pub fn on_unless_zero(value: &str) -> Result<bool, std::convert::Infallible> {
    Ok(value != "0")
}

/// The options, with `reps` repetitions unless `--reps` says otherwise.
pub fn parse_args(reps: usize) -> Options {
    <Options as clap::Parser>::parse().with_default_reps(reps)
}

impl Options {
    /// `reps` repetitions unless `--reps` said otherwise.
    pub fn with_default_reps(mut self, reps: usize) -> Self {
        self.reps = self.reps_flag.unwrap_or(reps);
        self
    }

    /// The model's file name, for report headers.
    pub fn model_name(&self) -> String {
        self.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

pub fn exit(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

/// Exits with `e` (for `unwrap_or_else`).
pub fn fail<T, E: std::fmt::Display>(e: E) -> T {
    exit(&e.to_string())
}
