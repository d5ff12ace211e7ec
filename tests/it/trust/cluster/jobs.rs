//! A fine-tuning job on two replicas sharing one S3 store (moto, as the
//! cluster test): the file uploaded through one, the job created through
//! the other; both replicas' runners look for work, and exactly one runs
//! the job (the lease in its object); its adapter is then served by both,
//! with the same answers.

use super::*;
use crate::server::http::jobs::{rows, write_rows};
use crate::server::http::{call, openai_calls};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_run_a_job_once_and_both_serve_it() {
    let _machine = crate::common::alone();
    let dir = temp_dir("cluster-jobs");
    let dir = dir.path();
    let s3_port = free_port();
    let _store = s3(dir, s3_port, 0).await;
    let replicas = start_replicas(2, s3_port);
    let url = |r: &Replica| format!("http://{}/v1", local(r.http));
    let base = json!(base().model.file_name().unwrap().to_str().unwrap());
    let train = write_rows(&dir.join("train.jsonl"), &rows(false));
    let uploaded = openai_calls(
        &url(&replicas[0]),
        None,
        vec![call(
            "file_create",
            "none",
            json!({"path": train, "purpose": "fine-tune"}),
        )],
    );
    let file = uploaded[0]["file"]["id"].clone();
    assert!(file.is_string(), "{}", uploaded[0]);
    let created = openai_calls(
        &url(&replicas[1]),
        None,
        vec![call(
            "job_create",
            "none",
            json!({"model": base, "training_file": file, "suffix": "shared",
                   "hyperparameters": {"n_epochs": 1}}),
        )],
    );
    let job = created[0]["job"]["id"].clone();
    assert!(job.is_string(), "{}", created[0]);
    let done = openai_calls(
        &url(&replicas[0]),
        None,
        vec![
            call("job_wait", "none", json!({"id": job, "timeout": 600})),
            call("job_events", "none", json!({"id": job, "limit": 100})),
        ],
    );
    let finished = &done[0]["job"];
    assert_eq!(finished["status"], "succeeded", "{}", done[0]);
    let ran_on = finished["svfit"]["ran_on"].as_array().unwrap();
    assert_eq!(ran_on.len(), 1, "run by one replica, once: {finished}");
    let started = done[1]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Fine-tuning job"))
        })
        .count();
    assert_eq!(started, 1, "{}", done[1]);

    // Both replicas serve the adapter, alike.
    let model = finished["fine_tuned_model"].clone();
    let ask = |r: &Replica| -> Value {
        let (p, _) = &rows(true)[0];
        let chat = call(
            "chat",
            "none",
            json!({"model": model, "max_tokens": 4, "temperature": 0,
                   "messages": [{"role": "user", "content": p}]}),
        );
        openai_calls(&url(r), None, vec![chat]).remove(0)
    };
    let (a, b) = (ask(&replicas[0]), ask(&replicas[1]));
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["text"], b["text"], "{a} / {b}");
}
