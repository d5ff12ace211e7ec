//! This CPU runs what the build compiled in. ggml (in svfit and in the
//! llama.cpp oracle linked beside it) holds no AMX instruction, which a VM
//! can advertise and still refuse (see `.cargo/config.toml`); and every
//! product the suite relies on runs here, tried in a child process, so an
//! illegal instruction fails one test that names the signal instead of
//! killing the whole test binary halfway through. Every test that loads the
//! oracle goes through [`crate::common::reference`], which asks this first.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use svfit::model::{Batch, LoadOptions, Model, WeightFormat};
use svfit::oracle::Reference;

/// AMX's instructions, as objdump names them.
const AMX: [&str; 13] = [
    "ldtilecfg",
    "sttilecfg",
    "tilerelease",
    "tilezero",
    "tileloadd",
    "tileloaddt1",
    "tilestored",
    "tdpbssd",
    "tdpbsud",
    "tdpbusd",
    "tdpbuud",
    "tdpbf16ps",
    "tdpfp16ps",
];

/// The AMX instructions in `binary`'s code, with the symbol each is in
/// (the first few).
fn amx_instructions(binary: &Path) -> Vec<String> {
    let mut child = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "--no-addresses"])
        .arg(binary)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run objdump (binutils)");
    let mut found = Vec::new();
    let mut symbol = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("objdump's output is text");
        if line.ends_with(">:") {
            symbol = line;
            continue;
        }
        let mnemonic = line.split_whitespace().next().unwrap_or("");
        if AMX.contains(&mnemonic) && found.len() < 5 {
            found.push(format!("{mnemonic} in {symbol}"));
        }
    }
    assert!(
        child.wait().unwrap().success(),
        "objdump failed on {}",
        binary.display()
    );
    found
}

/// llama-server (the load bench's opponent) and the ggml and llama
/// libraries beside it, where `scripts/build-llama-server` has built them.
fn built_llama_server() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    let bin = Path::new(&home).join(".cache/svfit-anchors/build/bin");
    if !bin.join("llama-server").exists() {
        return Vec::new();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&bin)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.is_symlink())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name == "llama-server" || (name.starts_with("lib") && name.contains(".so"))
        })
        .collect();
    files.sort();
    files
}

/// No AMX instruction in svfit (whose ggml the tests' llama.cpp oracle
/// shares) nor in llama-server and its libraries where they are built: on a
/// machine that cannot run them this fails here, on any CPU, before one of
/// them faults.
#[test]
fn no_amx_instruction_in_ggml_builds() {
    let _machine = common::shared();
    let mut binaries = vec![PathBuf::from(env!("CARGO_BIN_EXE_svfit"))];
    let server = built_llama_server();
    if server.is_empty() {
        eprintln!("llama-server is not built here (scripts/build-llama-server): not scanned");
    }
    binaries.extend(server);
    // The scan itself finds AMX: in an object compiled with it.
    let dir = common::temp_dir("amx");
    let (source, object) = (dir.path().join("amx.c"), dir.path().join("amx.o"));
    std::fs::write(
        &source,
        "#include <immintrin.h>\nvoid zero(void) { _tile_zero(0); _tile_release(); }\n",
    )
    .unwrap();
    let cc = Command::new("cc")
        .args(["-O2", "-mamx-tile", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status()
        .expect("run cc");
    assert!(cc.success(), "cc -mamx-tile failed");
    let control = amx_instructions(&object);
    assert!(
        control.iter().any(|i| i.starts_with("tilezero")),
        "the scan misses AMX in an object built with it: {control:?}"
    );

    for binary in binaries {
        let found = amx_instructions(&binary);
        eprintln!("{}: {} AMX instructions", binary.display(), found.len());
        assert!(
            found.is_empty(),
            "{} holds AMX instructions, which fault on machines that advertise AMX \
             without granting its tile state: {found:?}",
            binary.display()
        );
    }
}

/// The products the suite runs, in this process: llama.cpp and our engine
/// (`keep` and `auto`, which takes the AVX-512 VNNI kernel where it runs)
/// on the default model (Q4_1) and a tiny one (Q8_0, Q4_1, F16), a prompt
/// of several tokens then one more.
fn products_run() {
    let (_dir, tiny) = common::tiny_model();
    for path in [common::default_model(), tiny] {
        let mut prompt = Batch::new();
        prompt.add_sequence(&[1, 2, 3, 4, 5, 6, 7, 8], 0, 0, true);
        let mut next = Batch::new();
        next.add(9, 8, 0, true);

        let reference = Reference::load(&path).unwrap();
        let mut session = reference.session(64, 1, 2).unwrap();
        session.decode(&prompt).unwrap();
        session.decode(&next).unwrap();

        for weights in [WeightFormat::Keep, WeightFormat::Auto] {
            let options = LoadOptions {
                device: "cpu".into(),
                threads: 2,
                weights,
                ..LoadOptions::default()
            };
            let mut model = Model::load(&path, &options).unwrap();
            let mut cache = model.new_cache(64).unwrap();
            model.decode(&mut cache, &prompt).unwrap();
            model.decode(&mut cache, &next).unwrap();
        }
    }
}

/// What [`products_run`] runs, alone in a process of its own (started by
/// [`common::products_run_here`]); `cargo test -- --ignored` runs it here.
#[test]
#[ignore = "run in a child process by llama_cpp_and_svfit_products_run_on_this_cpu"]
fn products_in_this_process() {
    products_run();
}

/// llama.cpp's and our products run on this CPU (in a child process: a
/// fault fails this test with its signal, not the suite).
#[test]
fn llama_cpp_and_svfit_products_run_on_this_cpu() {
    let _machine = common::shared();
    if let Err(e) = common::products_run_here() {
        panic!("{e}");
    }
}
