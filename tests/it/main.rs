//! The integration tests, in one binary (one link of llama.cpp for all):
//! parity with llama.cpp, the engine, the CLI, factors, adapters, the
//! SVFit path against its oracles, training, fuzzing, and the server
//! (gRPC, the OpenAI HTTP API, the prefix cache). `tests/trust.rs` is its
//! own binary: its latency and cluster tests need the machine to
//! themselves, which only a binary of their own (run after this one) gives.
//! Run one module with `cargo test --test it server::`.

#[path = "../common/mod.rs"]
mod common;

mod adapter;
mod cli;
mod engine;
mod factorize;
mod fuzz;
mod parity;
mod server;
mod svfit;
mod train;
