//! The files API through the official `openai` client: an upload of
//! training JSONL (chat and prompt/completion lines) is listed, retrieved
//! and read back byte for byte, and deleted; another tenant cannot see,
//! read or delete it; a bad line is refused naming it, and so are a wrong
//! purpose, an empty file, one over `--max-file-bytes` and a tenant over
//! its file quota; the files live on disk beside the adapters and survive
//! a restart.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_upload_list_read_delete_per_tenant() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-files");
    let mut config = keyed_config(dir.path());
    config.limits.file_bytes = 4096;
    config.limits.files_per_tenant = 2;
    let running = server::start(config.clone()).await.unwrap();
    let url = format!("http://{}/v1", running.http_addr.unwrap());

    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let good = concat!(
        r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}"#,
        "\n",
        r#"{"prompt": "2 + 2 =", "completion": " 4"}"#,
        "\n",
    );
    let good = write("train.jsonl", good);
    let bad = write(
        "bad.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n",
    );
    let empty = write("empty.jsonl", "");
    let big = write("big.jsonl", &"x".repeat(5000));
    let create = |key: &str, path: &str, purpose: &str| {
        call(
            "file_create",
            key,
            json!({"path": path, "purpose": purpose}),
        )
    };
    let on =
        |endpoint: &str, key: &str, of: usize| call(endpoint, key, json!({"id": {"id_of": of}}));
    let results = openai_calls(
        &url,
        None,
        vec![
            create("ka", &good, "fine-tune"),                             // 0
            call("file_list", "ka", json!({})),                           // 1
            on("file_get", "ka", 0),                                      // 2
            on("file_content", "ka", 0),                                  // 3
            call("file_list", "kb", json!({})),                           // 4
            on("file_get", "kb", 0),                                      // 5
            on("file_content", "kb", 0),                                  // 6
            on("file_delete", "kb", 0),                                   // 7
            create("ka", &bad, "fine-tune"),                              // 8
            create("ka", &good, "assistants"),                            // 9
            create("ka", &empty, "fine-tune"),                            // 10
            create("ka", &big, "fine-tune"),                              // 11
            create("ka", &good, "fine-tune"),                             // 12
            create("ka", &good, "fine-tune"),                             // 13: over the quota
            call("file_list", "ka", json!({"purpose": "fine-tune"})),     // 14
            call("file_list", "ka", json!({"limit": 1})),                 // 15
            call("file_list", "ka", json!({"limit": 1, "order": "asc"})), // 16
        ],
    );
    let file = &results[0]["file"];
    assert_eq!(results[0]["status"], 200, "{}", results[0]);
    assert!(file["id"].as_str().unwrap().starts_with("file-"), "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["bytes"], std::fs::metadata(&good).unwrap().len());
    assert_eq!(results[1]["files"][0]["id"], file["id"], "{}", results[1]);
    assert_eq!(results[2]["file"], *file);
    assert_eq!(
        results[3]["content"],
        std::fs::read_to_string(&good).unwrap()
    );
    // Bob sees nothing of Alice's.
    assert_eq!(results[4]["files"], json!([]), "{}", results[4]);
    for r in &results[5..8] {
        assert_eq!(r["status"], 404, "{r}");
    }
    let refused = |r: &Value, status: u16, words: &str| {
        assert_eq!(r["status"], status, "{r}");
        let message = r["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "want '{words}': {r}");
    };
    refused(&results[8], 400, "bad.jsonl:2:");
    refused(&results[9], 400, "'assistants' is not stored here");
    refused(&results[10], 400, "file: empty");
    refused(&results[11], 400, "file");
    assert_eq!(results[12]["status"], 200, "{}", results[12]);
    refused(&results[13], 429, "keeps 2 files, its quota");
    assert_eq!(results[14]["files"].as_array().unwrap().len(), 2);
    // Pages of one, followed by the SDK: the same files, in either order.
    let ids = |r: &Value| -> Vec<Value> {
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].clone())
            .collect()
    };
    assert_eq!(ids(&results[15]), ids(&results[14]), "{}", results[15]);
    let mut ascending = ids(&results[16]);
    ascending.reverse();
    assert_eq!(ascending, ids(&results[14]), "{}", results[16]);

    // On disk beside the adapters; a restarted server has them.
    let id = file["id"].as_str().unwrap().to_string();
    let on_disk = Path::new(&config.adapters)
        .join(".files/alice")
        .join(format!("{id}.jsonl"));
    assert_eq!(
        std::fs::read(&on_disk).unwrap(),
        std::fs::read(&good).unwrap()
    );
    running.stop().await;
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}/v1", running.http_addr.unwrap());
    let id = json!(id);
    let results = openai_calls(
        &url,
        None,
        vec![
            call("file_get", "ka", json!({"id": id})),
            call("file_delete", "ka", json!({"id": id})),
            call("file_get", "ka", json!({"id": id})),
            call("file_delete", "ka", json!({"id": id})),
            call("file_list", "ka", json!({})),
            call("file_get", "ka", json!({"id": "../alice/x"})),
        ],
    );
    assert_eq!(results[0]["file"]["id"], id);
    assert_eq!(results[1]["deleted"]["deleted"], true, "{}", results[1]);
    assert_eq!(results[2]["status"], 404);
    assert_eq!(results[3]["status"], 404);
    assert_eq!(results[4]["files"].as_array().unwrap().len(), 1);
    assert_eq!(results[5]["status"], 404);
    assert!(!on_disk.exists());
    running.stop().await;
}
