//! The metrics endpoint's content: every metric's `# TYPE` and `# HELP`
//! line and every sample's name with its full label set, as served before
//! the registry was built once at start. Values vary and are not compared.

use std::collections::BTreeSet;

use crate::common;
use common::serve::*;
use svfit::server;

/// What a scrape answered before the registry was built once (sorted):
/// the `# TYPE`, `# HELP` and `# EOF` lines, then every sample's name and
/// labels.
const EXPECTED: &str = include_str!("metrics.shape");

/// The whole answer of the metrics listener at `addr` to `GET /metrics`:
/// status line, headers and body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    answer
}

/// The body's lines without sample values: `# TYPE`, `# HELP` and
/// `# EOF` lines as they are, a sample as its name and labels.
fn shape(body: &str) -> BTreeSet<String> {
    body.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(_) => line.to_string(),
            None => line
                .rsplit_once(' ')
                .map_or(line, |(sample, _value)| sample)
                .to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_keep_their_names_types_help_and_labels() {
    let _machine = common::shared();
    let dir = common::temp_dir("server-metrics");
    let running = server::start(config(dir.path())).await.unwrap();
    let (mut client, _) = clients(&running).await;
    client.generate(greedy("", PROMPTS[1], 2)).await.unwrap();
    let answer = scrape(running.metrics_addr.unwrap()).await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    let want: BTreeSet<String> = EXPECTED.lines().map(str::to_string).collect();
    let got = shape(body);
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing: {missing:#?}\nextra: {extra:#?}"
    );
    running.stop().await;
}
