//! Fine-tuning jobs through the official `openai` client, on the default
//! model: a file uploaded and a job created on the base model trains an
//! adapter that answers held-out rows of the task better than the base
//! (the base answers in sentences, the data teaches one word); its events
//! carry a falling loss and its checkpoints one per epoch; another tenant
//! can neither see nor use any of it; a line that does not fit the job's
//! context fails the job in `validating_files`, naming the line; `cancel`
//! stops a running job within one step; quotas answer 429. And an
//! `svfit serve` killed with -9 mid-job resumes the job from its last
//! checkpoint, after restart, to an adapter equal bit for bit to an
//! uninterrupted job's with the same seed.
//!
//! Both hold the machine alone: a job trains at full speed while its own
//! server is idle, and ggml's spinning threads beside another test's
//! engine would slow both to a crawl.

use super::*;

const POSITIVE: &[&str] = &[
    "happy",
    "joyful",
    "wonderful",
    "excellent",
    "lovely",
    "delightful",
    "cheerful",
    "brilliant",
    "pleasant",
    "superb",
    "kind",
    "friendly",
    "beautiful",
    "glad",
    "great",
    "amazing",
    "fantastic",
    "gentle",
    "generous",
    "honest",
    "calm",
    "peaceful",
    "proud",
    "grateful",
    "hopeful",
    "warm",
    "fun",
    "love",
    "smile",
    "laugh",
    "success",
    "win",
    "praise",
    "brave",
    "charming",
    "clever",
];
const NEGATIVE: &[&str] = &[
    "sad",
    "angry",
    "terrible",
    "awful",
    "horrible",
    "nasty",
    "miserable",
    "cruel",
    "ugly",
    "painful",
    "hateful",
    "gloomy",
    "bitter",
    "rude",
    "selfish",
    "lonely",
    "afraid",
    "hurt",
    "disaster",
    "fail",
    "loss",
    "war",
    "death",
    "sick",
    "pain",
    "fear",
    "grief",
    "worse",
    "dreadful",
    "hostile",
    "greedy",
    "lazy",
    "boring",
    "evil",
    "guilty",
    "broken",
];

fn prompt(word: &str) -> String {
    format!("Is the sentiment of this English word positive or negative? Answer with one word.\n\nWord: {word}")
}

/// Every fourth word of each list is held out.
pub(crate) fn rows(held_out: bool) -> Vec<(String, &'static str)> {
    let mut rows = Vec::new();
    for (words, label) in [(POSITIVE, "positive"), (NEGATIVE, "negative")] {
        for (i, w) in words.iter().enumerate() {
            if (i % 4 == 3) == held_out {
                rows.push((prompt(w), label));
            }
        }
    }
    rows
}

pub(crate) fn write_rows(path: &Path, rows: &[(String, &str)]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .map(|(p, c)| json!({"prompt": p, "completion": c}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_string()
}

/// Greedy chat calls of `model` on the held-out rows.
fn answers(key: &str, model: &Value) -> Vec<Value> {
    rows(true)
        .iter()
        .map(|(p, _)| {
            call(
                "chat",
                key,
                json!({"model": model, "messages": [{"role": "user", "content": p}],
                       "max_tokens": 4, "temperature": 0}),
            )
        })
        .collect()
}

/// The share of held-out rows answered with exactly their label.
fn accuracy(results: &[Value]) -> f64 {
    let held_out = rows(true);
    assert_eq!(results.len(), held_out.len());
    let right = results
        .iter()
        .zip(&held_out)
        .filter(|(r, (_, label))| {
            assert_eq!(r["status"], 200, "{r}");
            r["text"].as_str().unwrap().trim() == *label
        })
        .count();
    right as f64 / held_out.len() as f64
}

/// The train losses of a job's events, by step.
fn losses(events: &Value) -> Vec<(u64, f64)> {
    let mut steps: Vec<(u64, f64)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["data"]["step"].as_u64()?,
                e["data"]["train_loss"].as_f64()?,
            ))
        })
        .collect();
    steps.sort_by_key(|s| s.0);
    steps
}

fn job_call(endpoint: &str, key: &str, of: usize, extra: Value) -> Value {
    let mut params = json!({"id": {"id_of": of}});
    params
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    call(endpoint, key, params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_trains_an_adapter_that_serves_at_once() {
    let _machine = crate::common::alone();
    let dir = temp_dir("http-jobs");
    let mut config = keyed_config(dir.path());
    config.jobs.per_tenant = 2;
    let running = server::start(config.clone()).await.unwrap();
    let url = format!("http://{}/v1", running.http_addr.unwrap());
    let base = json!(config.model.file_name().unwrap().to_str().unwrap());
    let train = write_rows(&dir.path().join("train.jsonl"), &rows(false));
    // Fits the server's context (the upload passes), not the job's 24.
    let long = format!(
        "{}\n",
        json!({"prompt": "Say it.", "completion": "word ".repeat(40)})
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{long}",
            std::fs::read_to_string(&train)
                .unwrap()
                .lines()
                .next()
                .unwrap()
        ),
    )
    .unwrap();
    let bad = bad.to_str().unwrap().to_string();
    let upload = |path: &str| {
        call(
            "file_create",
            "ka",
            json!({"path": path, "purpose": "fine-tune"}),
        )
    };
    let create = |of: usize, hyper: Value| {
        call(
            "job_create",
            "ka",
            json!({"model": base, "training_file": {"id_of": of},
             "seed": 5, "suffix": "sentiment", "hyperparameters": hyper}),
        )
    };
    let per_epoch = rows(false).len().div_ceil(8) as u64;
    let calls = vec![
        upload(&train),                                         // 0
        upload(&bad),                                           // 1
        create(0, json!({"n_epochs": 2, "batch_size": 8})),     // 2
        job_call("job_wait", "ka", 2, json!({"timeout": 600})), // 3
        job_call("job_events", "ka", 2, json!({"limit": 7})),   // 4
        job_call("job_checkpoints", "ka", 2, json!({})),        // 5
        call("job_list", "ka", json!({})),                      // 6
        // Bob: none of Alice's jobs, files or models.
        call("job_list", "kb", json!({})),          // 7
        job_call("job_get", "kb", 2, json!({})),    // 8
        job_call("job_events", "kb", 2, json!({})), // 9
        job_call("job_cancel", "kb", 2, json!({})), // 10
        call(
            "chat",
            "kb",
            json!({"model": {"model_of": 3}, "max_tokens": 2,
             "messages": [{"role": "user", "content": "hi"}]}),
        ), // 11
        // The bad file's job, with a context its second line does not fit.
        json!({"endpoint": "job_create", "key": "ka",
               "params": {"model": base, "training_file": {"id_of": 1}},
               "extra_body": {"svfit": {"ctx": 24}}}), // 12
        job_call("job_wait", "ka", 12, json!({"timeout": 120})), // 13
        call(
            "job_create",
            "kb",
            json!({"model": base, "training_file": {"id_of": 0}}),
        ), // 14
        call(
            "job_create",
            "ka",
            json!({"model": "other.gguf", "training_file": {"id_of": 0}}),
        ), // 15
        // One more epoch, from the first job's adapter.
        call(
            "job_create",
            "ka",
            json!({"model": {"model_of": 3}, "training_file": {"id_of": 0},
                   "hyperparameters": {"n_epochs": 1}}),
        ), // 16
        job_call("job_wait", "ka", 16, json!({"timeout": 300})), // 17
        job_call("job_events", "ka", 16, json!({"limit": 50})),  // 18
    ];
    let results = openai_calls(&url, None, calls);
    let job = &results[3]["job"];
    assert_eq!(job["status"], "succeeded", "{}", results[3]);
    let model = job["fine_tuned_model"].as_str().unwrap().to_string();
    let id = job["id"].as_str().unwrap();
    assert_eq!(model, format!("ft-sentiment-{}", &id["ftjob-".len()..]));
    assert!(job["trained_tokens"].as_u64().unwrap() > 0, "{job}");
    assert_eq!(job["hyperparameters"]["n_epochs"], 2);
    assert_eq!(job["svfit"]["ran_on"].as_array().unwrap().len(), 1, "{job}");
    // Events, followed through pages of 7: a falling loss at every step.
    let events = json!(results[4]["events"]);
    let steps = losses(&events);
    let all: Vec<u64> = (1..=2 * per_epoch).collect();
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        all,
        "{events}"
    );
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let n = steps.len();
    assert!(
        mean(&steps[n - 3..]) < 0.5 * mean(&steps[..3]),
        "the loss should fall: {steps:?}"
    );
    let checkpoints = results[5]["checkpoints"].as_array().unwrap();
    let at: Vec<u64> = checkpoints
        .iter()
        .map(|c| c["step_number"].as_u64().unwrap())
        .collect();
    assert_eq!(
        at,
        vec![2 * per_epoch, per_epoch],
        "newest first, one per epoch: {}",
        results[5]
    );
    assert_eq!(results[6]["jobs"][0]["id"], job["id"]);
    assert_eq!(results[7]["jobs"], json!([]), "{}", results[7]);
    for r in &results[8..12] {
        assert_eq!(r["status"], 404, "{r}");
    }
    let failed = &results[13]["job"];
    assert_eq!(failed["status"], "failed", "{}", results[13]);
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 2:") && message.contains("--ctx 24"),
        "{failed}"
    );
    assert_eq!(failed["error"]["code"], "invalid_training_file");
    // Bob's job on Alice's file: not found (to him).
    assert_eq!(results[14]["status"], 400, "{}", results[14]);
    assert!(results[14]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not found"));
    assert_eq!(results[15]["status"], 400, "{}", results[15]);
    // Trained on from the first job's adapter: its first step starts
    // where the first job ended, far below where the first job began.
    let further = &results[17]["job"];
    assert_eq!(further["status"], "succeeded", "{}", results[17]);
    assert_eq!(further["model"], job["fine_tuned_model"]);
    assert_ne!(further["fine_tuned_model"], job["fine_tuned_model"]);
    let again = losses(&json!(results[18]["events"]));
    assert!(
        again[0].1 < 0.5 * steps[0].1,
        "from {again:?}, first job {steps:?}"
    );

    // The base answers in sentences; the job's adapter with the label.
    let mut chats = answers("ka", &base);
    chats.extend(answers("ka", &json!(model)));
    let results = openai_calls(&url, None, chats);
    let half = results.len() / 2;
    let (before, after) = (accuracy(&results[..half]), accuracy(&results[half..]));
    println!("held-out accuracy: base {before:.2}, fine-tuned {after:.2}");
    assert!(
        after >= 0.75 && after > before + 0.25,
        "base {before}, tuned {after}"
    );

    // Cancel: a long job stopped within one step of the cancel.
    let file = json!(results_file_id(&url));
    let results = openai_calls(
        &url,
        None,
        vec![
            call(
                "job_create",
                "ka",
                json!({"model": base, "training_file": file, "hyperparameters": {"n_epochs": 40}}),
            ), // 0
            call(
                "job_create",
                "ka",
                json!({"model": base, "training_file": file}),
            ), // 1
            call(
                "job_create",
                "ka",
                json!({"model": base, "training_file": file}),
            ), // 2: over the quota
            job_call("job_wait", "ka", 0, json!({"steps": 3, "timeout": 120})), // 3
            job_call("job_cancel", "ka", 0, json!({})),                         // 4
            job_call("job_wait", "ka", 0, json!({"timeout": 60})),              // 5
            job_call("job_cancel", "ka", 0, json!({})),                         // 6
            job_call("job_cancel", "ka", 1, json!({})),                         // 7
        ],
    );
    assert_eq!(results[2]["status"], 429, "{}", results[2]);
    assert_eq!(results[3]["job"]["status"], "running", "{}", results[3]);
    assert_eq!(results[4]["job"]["status"], "cancelled", "{}", results[4]);
    let job = &results[5]["job"];
    assert_eq!(job["status"], "cancelled", "{}", results[5]);
    let (at, last) = (
        job["svfit"]["cancelled_at_step"].as_u64().unwrap(),
        job["svfit"]["step"].as_u64().unwrap(),
    );
    assert!(
        at >= 3 && last <= at + 1,
        "cancelled at step {at}, stopped after {last}"
    );
    assert_eq!(results[6]["status"], 400, "{}", results[6]);
    assert_eq!(results[7]["job"]["status"], "cancelled", "{}", results[7]);
    running.stop().await;
}

/// The id of Alice's first training file.
fn results_file_id(url: &str) -> String {
    let files = openai_calls(
        url,
        None,
        vec![call("file_list", "ka", json!({"order": "asc"}))],
    );
    files[0]["files"][0]["id"].as_str().unwrap().to_string()
}

/// `svfit serve` as a process on HTTP port `http`, with 2 s job leases.
fn spawn_server(adapters: &Path, http: u16) -> Process {
    let b = base();
    let mut command = Command::new(env!("CARGO_BIN_EXE_svfit"));
    command
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--threads",
            "2",
        ])
        .args(["--job-lease", "2", "--model"])
        .arg(&b.model)
        .args(b.targets_args())
        .arg("--adapters")
        .arg(adapters)
        .env("SVFIT_HOME", &b.home)
        .env("RUST_LOG", "warn");
    start_process(command)
}

fn sigma_bits(adapters: &Path, model: &Value) -> Vec<u32> {
    let path = adapters
        .join("default")
        .join(format!("{}.safetensors", model.as_str().unwrap()));
    let adapter = svfit::adapter::Adapter::read(&path).unwrap();
    adapter
        .sigma
        .iter()
        .flat_map(|(_, s)| s.iter().map(|v| v.to_bits()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_killed_with_9_resumes_to_the_same_adapter() {
    let _machine = crate::common::alone();
    let dir = temp_dir("http-jobs-kill");
    let adapters = dir.path().join("adapters");
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{http}/v1");
    let base = json!(base().model.file_name().unwrap().to_str().unwrap());
    let train = write_rows(&dir.path().join("train.jsonl"), &rows(false));
    let per_epoch = rows(false).len().div_ceil(8) as u64;
    let create = |file: &Value| {
        call(
            "job_create",
            "none",
            json!({"model": base, "training_file": file, "seed": 11,
                   "hyperparameters": {"n_epochs": 3}}),
        )
    };

    let mut server = spawn_server(&adapters, http);
    let results = openai_calls(
        &url,
        None,
        vec![
            call(
                "file_create",
                "none",
                json!({"path": train, "purpose": "fine-tune"}),
            ),
            create(&json!({"id_of": 0})),
            // Past the first epoch's checkpoint.
            job_call(
                "job_wait",
                "none",
                1,
                json!({"steps": per_epoch + 2, "timeout": 300}),
            ),
        ],
    );
    assert_eq!(results[2]["job"]["status"], "running", "{}", results[2]);
    let file = results[0]["file"]["id"].clone();
    let job = results[1]["job"]["id"].clone();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = spawn_server(&adapters, http);
    let results = openai_calls(
        &url,
        None,
        vec![
            call("job_wait", "none", json!({"id": job, "timeout": 300})),
            call("job_events", "none", json!({"id": job, "limit": 100})),
            create(&file),
            job_call("job_wait", "none", 2, json!({"timeout": 300})),
            job_call("job_events", "none", 2, json!({"limit": 100})),
        ],
    );
    let (resumed, whole) = (&results[0]["job"], &results[3]["job"]);
    assert_eq!(resumed["status"], "succeeded", "{}", results[0]);
    assert_eq!(whole["status"], "succeeded", "{}", results[3]);
    assert_eq!(
        resumed["svfit"]["ran_on"].as_array().unwrap().len(),
        2,
        "{resumed}"
    );
    let messages: Vec<&str> = results[1]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let from = format!("resumed from its checkpoint at step {per_epoch}");
    assert!(messages.iter().any(|m| m.contains(&from)), "{messages:?}");
    // The same losses at every step, and the same adapter, bit for bit.
    let (a, b) = (losses(&results[1]["events"]), losses(&results[4]["events"]));
    assert_eq!(a.len() as u64, 3 * per_epoch, "{a:?}");
    assert_eq!(a, b);
    let (a, b) = (
        sigma_bits(&adapters, &resumed["fine_tuned_model"]),
        sigma_bits(&adapters, &whole["fine_tuned_model"]),
    );
    assert!(!a.is_empty());
    assert!(
        a == b,
        "the resumed job's adapter differs from the uninterrupted one's"
    );
    drop(server);
}
