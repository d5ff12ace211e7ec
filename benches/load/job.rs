//! The `job` scenario's fine-tuning job: uploaded and created through the
//! in-process server's OpenAI API before each turn that runs beside one,
//! cancelled after it. The job trains a long run (many epochs) on a small
//! classification file, so it is still running when its turn ends.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{exit, fail, HttpError};

/// Rows of the job's training file.
const ROWS: usize = 64;

/// A job running beside a turn.
pub struct Running {
    pub id: String,
    /// Its last step when the turn's clock started.
    pub step: u64,
    pub started: Instant,
}

async fn call(port: u16, method: &str, path: &str, body: &str) -> Value {
    let (status, text) = super::http(port, method, path, body)
        .await
        .unwrap_or_else(fail);
    if status != 200 {
        exit(&format!("{method} {path}: HTTP {status}: {text}"));
    }
    serde_json::from_str(&text).unwrap_or_else(fail)
}

/// Uploads the training file (once per server); its id.
pub async fn upload(port: u16) -> String {
    let lines: Vec<String> = (0..ROWS)
        .map(|n| {
            let answer = if n % 2 == 0 { "even" } else { "odd" };
            json!({"prompt": format!("Is {n} odd or even? Answer with one word."), "completion": answer})
                .to_string()
        })
        .collect();
    let boundary = "svfit-bench-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--{boundary}--\r\n",
        lines.join("\n")
    );
    let response = multipart(port, boundary, body).await.unwrap_or_else(fail);
    let file: Value = serde_json::from_str(&response).unwrap_or_else(fail);
    file["id"]
        .as_str()
        .unwrap_or_else(|| exit(&format!("uploading the job's file: {file}")))
        .to_string()
}

async fn multipart(port: u16, boundary: &str, body: String) -> Result<String, HttpError> {
    use http_body_util::{BodyExt, Full};
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let io = hyper_util::rt::TokioIo::new(socket);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method("POST")
        .uri("/v1/files")
        .header(hyper::header::HOST, "127.0.0.1")
        .header(
            hyper::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(hyper::body::Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A job's last step (live, from the replica running it).
async fn step(port: u16, id: &str) -> u64 {
    let job = call(port, "GET", &format!("/v1/fine_tuning/jobs/{id}"), "").await;
    job["svfit"]["step"].as_u64().unwrap_or(0)
}

/// Creates a job on `model` and waits until it has taken a step.
pub async fn start(port: u16, model: &str, file: &str) -> Running {
    let body = json!({"model": model, "training_file": file,
                      "hyperparameters": {"n_epochs": 50, "batch_size": 8}});
    let job = call(port, "POST", "/v1/fine_tuning/jobs", &body.to_string()).await;
    let id = job["id"]
        .as_str()
        .unwrap_or_else(|| exit(&format!("{job}")))
        .to_string();
    let waited = Instant::now();
    loop {
        let step = step(port, &id).await;
        if step >= 1 {
            return Running {
                id,
                step,
                started: Instant::now(),
            };
        }
        if waited.elapsed() > Duration::from_secs(120) {
            exit("the bench's fine-tuning job took no step in 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cancels the job: the steps it took during the turn, and the seconds.
pub async fn stop(port: u16, job: Running) -> (u64, f64) {
    let elapsed = job.started.elapsed().as_secs_f64();
    let path = format!("/v1/fine_tuning/jobs/{}/cancel", job.id);
    let cancelled = call(port, "POST", &path, "").await;
    let last = cancelled["svfit"]["cancelled_at_step"]
        .as_u64()
        .unwrap_or(0);
    // The next turn starts once the job's runner has let go of it.
    let path = format!("/v1/fine_tuning/jobs/{}", job.id);
    while !call(port, "GET", &path, "").await["svfit"]["lease"].is_null() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (last.saturating_sub(job.step), elapsed)
}
