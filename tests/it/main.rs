//! The integration tests, in one binary (one link of llama.cpp for all):
//! whether this CPU runs the build, parity with llama.cpp, the engine, the
//! CLI, factors, adapters, the SVFit path against its oracles, training,
//! fuzzing, the server (gRPC, the OpenAI HTTP API, the prefix cache) and
//! hostile or concurrent use of it (`trust`, with the replicas behind nginx
//! in `trust::cluster`). Each test holds `common::shared()`; the latency
//! and cluster tests hold `common::alone()`. Run one module with
//! `cargo test --test it server::`.
#![allow(
    clippy::await_holding_lock,
    reason = "the machine lock is held for a whole test, which block_on runs on its own thread"
)]

#[path = "../common/mod.rs"]
mod common;

mod adapter;
mod budget;
mod cli;
mod cpu;
mod demo;
mod engine;
mod examples;
mod factorize;
mod fuzz;
mod lora;
mod lora_serving;
mod parity;
mod server;
mod svfit;
mod train;
mod trust;
