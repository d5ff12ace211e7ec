//! What the benches share: command-line options.

use std::path::PathBuf;

use svfit::model::WeightFormat;

pub struct Options {
    pub model: PathBuf,
    pub threads: usize,
    pub reps: usize,
    /// Weight layouts to compare (`--weights keep,auto`).
    pub weights: Vec<WeightFormat>,
}

/// `--model PATH`, `--threads N`, `--reps N` (default `reps`), `--weights
/// LIST` (default `keep,auto`).
pub fn parse_args(reps: usize) -> Options {
    let mut opts = Options {
        model: svfit::home::resolve_model(None).unwrap_or_else(|e| exit(&e.to_string())),
        threads: svfit::model::default_threads(),
        reps,
        weights: vec![WeightFormat::Keep, WeightFormat::Auto],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| exit(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--model" => opts.model = PathBuf::from(value()),
            "--threads" => {
                opts.threads = value()
                    .parse()
                    .unwrap_or_else(|_| exit("--threads takes a number"))
            }
            "--reps" => {
                opts.reps = value()
                    .parse()
                    .unwrap_or_else(|_| exit("--reps takes a number"))
            }
            "--weights" => {
                opts.weights = value()
                    .split(',')
                    .map(|w| w.parse().unwrap_or_else(|e: String| exit(&e)))
                    .collect()
            }
            "--bench" => {}
            other => exit(&format!("unknown option {other}")),
        }
    }
    opts
}

impl Options {
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
