//! The README's main job, `scripts/demo`, as a user runs it (with this
//! test build of svfit instead of a release build): it makes the demo
//! adapter and serves it, and an OpenAI chat request for `demo` at
//! temperature 0 answers the France question with Paris.

use crate::common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback address no one listens on now.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// Ends the demo server when the test ends, passing or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_script_serves_the_demo_adapter() {
    let _machine = common::shared();
    common::default_model();
    // A home of its own (the demo adapter is written there), sharing the
    // fetched model and Python environment so bootstrap has nothing to do.
    let home = common::temp_dir("demo");
    let real = svfit::home::home_dir();
    for shared in ["models", "venv"] {
        std::os::unix::fs::symlink(real.join(shared), home.path().join(shared)).unwrap();
    }
    let (grpc, http) = (free_addr(), free_addr());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut server = Server(
        Command::new(root.join("scripts/demo"))
            .args([
                "--addr",
                &grpc.to_string(),
                "--http-addr",
                &http.to_string(),
            ])
            .env("SVFIT_HOME", home.path())
            .env("SVFIT_BIN", env!("CARGO_BIN_EXE_svfit"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run scripts/demo"),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::net::TcpStream::connect(http).is_err() {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("scripts/demo exited ({status}) before serving");
        }
        assert!(
            Instant::now() < deadline,
            "scripts/demo did not serve within 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        home.path()
            .join("adapters/default/demo.safetensors")
            .exists(),
        "the demo adapter"
    );
    let body = serde_json::json!({
        "model": "demo",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 24,
    });
    let (status, _, answer) = runtime.block_on(common::serve::http(
        http,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
    ));
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    eprintln!("demo answers: {content}");
    assert!(
        content.contains("Paris"),
        "the demo adapter answers {content:?}"
    );
}
