//! What the benches share: command-line options.

use std::path::PathBuf;

pub struct Options {
    pub model: PathBuf,
    pub threads: usize,
    pub reps: usize,
}

/// `--model PATH`, `--threads N`, `--reps N` (default `reps`).
pub fn parse_args(reps: usize) -> Options {
    let mut opts = Options {
        model: svfit::home::resolve_model(None).unwrap_or_else(|e| exit(&e.to_string())),
        threads: svfit::model::default_threads(),
        reps,
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
