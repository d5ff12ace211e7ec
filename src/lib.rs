//! svfit: serve one frozen base LLM to many tenants, each fine-tuned with an
//! SVFit adapter (a vector of singular values per target matrix).
//!
//! `unsafe` lives in `ggml` alone (the FFI wrappers); everything else is
//! safe Rust, and the compiler holds it to that.

#![deny(unsafe_code)]

pub mod adapter;
#[cfg(feature = "check")]
pub mod check;
pub mod constraint;
pub mod engine;
pub mod factors;
pub mod generate;
#[allow(unsafe_code)]
pub mod ggml;
pub mod home;
pub mod lora;
pub mod merge;
pub mod model;
pub mod npy;
#[cfg(feature = "check")]
pub mod oracle;
pub mod prefix_cache;
pub mod rng;
pub mod sampling;
pub mod server;
pub mod store;
pub mod tensorfile;
pub mod train;
