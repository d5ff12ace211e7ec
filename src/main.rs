//! The `svfit` command line (`src/cli/`).

#![deny(unsafe_code)]

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::run()
}
