//! Build steps: the gRPC code from `proto/` (compiled by `protox`, a
//! pure-Rust protobuf compiler, so no system `protoc` is needed), and extra
//! ggml bindings that `llama-cpp-sys-2` does not generate.
//!
//! `llama-cpp-sys-2` (links = "llama") exports `DEP_LLAMA_ROOT`, the CMake
//! install prefix of llama.cpp, whose `include/` holds every ggml header. We run
//! bindgen over the headers we need beyond `llama.h`, allowlisting only their own
//! symbols: the types they use (`ggml_backend_t`, ...) come from `llama-cpp-sys-2`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_protos();
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        generate_cuda_bindings();
    }
}

/// `proto/svfit/v1/svfit.proto` → tonic/prost code, plus the encoded file
/// descriptor set that server reflection serves.
fn compile_protos() {
    let proto = "proto/svfit/v1/svfit.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compile proto/svfit/v1/svfit.proto");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("svfit_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write the descriptor set");
    tonic_prost_build::configure()
        // Decode errors are INVALID_ARGUMENT (src/server/codec.rs).
        .codec_path("crate::server::codec::ProstCodec")
        .compile_fds(fds)
        .expect("generate the gRPC code");
}

fn generate_cuda_bindings() {
    let root = env::var("DEP_LLAMA_ROOT")
        .expect("llama-cpp-sys-2 exports DEP_LLAMA_ROOT (its CMake install prefix)");
    let include = PathBuf::from(root).join("include");
    let header = include.join("ggml-cuda.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let bindings = bindgen::Builder::default()
        .header(header.display().to_string())
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("ggml_backend_cuda_.*")
        .allowlist_function("ggml_backend_is_cuda")
        .allowlist_recursively(false)
        .raw_line("#[allow(unused_imports)] use llama_cpp_sys_2::*;")
        .generate()
        .expect("bindgen over ggml-cuda.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("ggml_cuda.rs"))
        .expect("write ggml_cuda.rs");
}
