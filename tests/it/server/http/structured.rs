//! Constrained decoding over both APIs on the default model: JSON-schema
//! answers from the `openai` client parse and validate with and without an
//! adapter, `json_object` answers parse, a constrained and a free sequence
//! share batches without the free one changing by a bit, a greedy
//! constrained answer equals the free one where that already matches, and
//! bad constraints are refused by name.

use super::*;

/// The schema every structured answer is checked against (by hand below).
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": false,
    })
}

/// Whether `value` is valid under [`person_schema`].
fn is_person(value: &Value) -> bool {
    let Some(fields) = value.as_object() else {
        return false;
    };
    let name = fields.get("name").and_then(Value::as_str);
    let age = fields.get("age").and_then(Value::as_i64);
    fields.len() == 2
        && name.is_some_and(|n| n.chars().count() <= 24)
        && age.is_some_and(|a| (0..=120).contains(&a))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_schema_answers_validate_with_and_without_an_adapter() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-structured");
    let config = keyed_config(dir.path());
    write(Path::new(&config.adapters), "alice", "a1", &adapter(41));
    let base_model = base_model();
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}/v1", running.http_addr.unwrap());

    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "person", "strict": true, "schema": person_schema()}});
    let chat = |model: &str, i: usize, extra: Value| {
        let mut p = json!({
            "model": model,
            "messages": [{"role": "user",
                          "content": format!("Invent person number {i}: a name and an age, as JSON.")}],
            "max_tokens": 160,
            "temperature": 0.7,
            "seed": i,
            "response_format": format,
        });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call("chat", "ka", p)
    };
    let mut calls = Vec::new();
    for model in [base_model.as_str(), "a1"] {
        for i in 0..50 {
            calls.push(chat(model, i, json!({})));
        }
    }
    // The same answer streamed, and any JSON object.
    calls.push(chat(&base_model, 7, json!({"stream": true})));
    calls.push(chat(
        &base_model,
        3,
        json!({"response_format": {"type": "json_object"}}),
    ));
    let results = openai_calls(&url, None, calls);
    let mut names = std::collections::HashSet::new();
    for (i, r) in results[..100].iter().enumerate() {
        assert_eq!(r["status"], 200, "{r}");
        let text = r["text"].as_str().unwrap();
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("answer {i} is not JSON ({e}): {text:?}"));
        assert!(is_person(&value), "answer {i} breaks the schema: {text}");
        assert_eq!(r["finish"], "stop", "{r}");
        names.insert(value["name"].as_str().unwrap().to_string());
    }
    assert!(names.len() > 5, "sampled answers differ: {names:?}");
    let streamed = &results[100];
    assert_eq!(streamed["status"], 200, "{streamed}");
    assert_eq!(streamed["text"], results[7]["text"]);
    let object = &results[101];
    assert_eq!(object["status"], 200, "{object}");
    let text = object["text"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(value.is_object(), "{text}");
    running.stop().await;
}

/// A free sequence's tokens are the same whether a constrained one shares
/// its batches or not; a greedy answer under a constraint it already meets
/// is the free answer, token for token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn constraints_change_only_their_own_sequence() {
    let _machine = crate::common::shared();
    let dir = temp_dir("grpc-structured");
    let running = server::start(config(dir.path())).await.unwrap();
    let (client, _) = clients(&running).await;
    const LONG: u32 = 48;

    let free = greedy("", PROMPTS[0], LONG);
    let alone = client
        .clone()
        .generate(free.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alone.finish_reason, "length");

    // Beside constrained sequences that keep running as long.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut constrained = greedy("", PROMPTS[1], LONG);
        constrained.constraint = Some(constraint(pb::constraint::Kind::Regex(format!(
            "[a-z ]{{{}}}",
            60 + i
        ))));
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.generate(constrained).await.unwrap().into_inner()
        }));
    }
    let mut c = client.clone();
    let shared = c.generate(free.clone()).await.unwrap().into_inner();
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(
            answer
                .text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == ' '),
            "{:?}",
            answer.text
        );
    }
    assert_eq!(shared.token_ids, alone.token_ids);
    assert_eq!(shared.text, alone.text);

    // A constraint the free answer meets: no braces or angle brackets.
    assert!(!alone.text.contains(['{', '}', '<', '>']), "{}", alone.text);
    let mut constrained = free.clone();
    constrained.constraint = Some(constraint(pb::constraint::Kind::Regex("[^{}<>]*".into())));
    let answer = c.generate(constrained).await.unwrap().into_inner();
    assert_eq!(answer.token_ids, alone.token_ids);
    assert_eq!(answer.finish_reason, "length");

    // A regex that ends the answer: it stops when nothing more may follow.
    let mut digits = greedy("", "Count: 1, 2, 3,", LONG);
    digits.constraint = Some(constraint(pb::constraint::Kind::Regex(
        " [0-9]{1,3}".into(),
    )));
    let answer = c.generate(digits).await.unwrap().into_inner();
    assert_eq!(answer.finish_reason, "stop");
    let number = answer.text.strip_prefix(' ').unwrap();
    assert!(
        (1..=3).contains(&number.len()) && number.bytes().all(|b| b.is_ascii_digit()),
        "{:?}",
        answer.text
    );
    running.stop().await;
}

fn constraint(kind: pb::constraint::Kind) -> pb::Constraint {
    pb::Constraint { kind: Some(kind) }
}

/// Bad constraints, over both APIs: each refused with INVALID_ARGUMENT /
/// 400 naming the problem, and the server serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_constraints_are_refused_by_name() {
    use pb::constraint::Kind;
    let _machine = crate::common::shared();
    let dir = temp_dir("bad-constraints");
    let running = server::start(config(dir.path())).await.unwrap();
    let (mut client, _) = clients(&running).await;
    let over = format!(
        r#"{{"type": "object", "description": "{}"}}"#,
        "x".repeat(70_000)
    );
    let cases = [
        (
            Kind::JsonSchema("{".into()),
            "constraint.json_schema: not valid JSON",
        ),
        (
            Kind::JsonSchema("[1]".into()),
            "constraint.json_schema: a schema",
        ),
        (
            Kind::JsonSchema(over),
            "constraint.json_schema: 70037 bytes",
        ),
        (Kind::Regex(String::new()), "constraint.regex: empty"),
        (
            Kind::Regex("a(".into()),
            "constraint: the constraint does not compile",
        ),
        (
            Kind::Lark("start: (".into()),
            "constraint: the constraint does not compile",
        ),
        // Admits nothing.
        (
            Kind::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#.into()),
            "constraint: the constraint does not compile",
        ),
        // A keyword llguidance does not implement is named.
        (
            Kind::JsonSchema(r#"{"type": "object", "dependentSchemas": {"a": {}}}"#.into()),
            "dependentSchemas",
        ),
    ];
    for (kind, message) in cases {
        let mut request = greedy("", PROMPTS[0], 4);
        request.constraint = Some(constraint(kind));
        let status = client.generate(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(message),
            "{message}: {}",
            status.message()
        );
    }
    // A 1 MB schema is over any valid request: refused before decoding.
    let mut huge = greedy("", PROMPTS[0], 4);
    huge.constraint = Some(constraint(Kind::JsonSchema("x".repeat(1 << 20))));
    let status = client.generate(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    // A schema nested past serde_json's bound (128 levels) is refused, not
    // a stack overflow; one within it compiles and runs; and the server
    // answers the next request.
    let mut nested = String::from(r#"{"type": "integer"}"#);
    for _ in 0..100 {
        nested = format!(r#"{{"type": "object", "properties": {{"a": {nested}}}}}"#);
    }
    let mut request = greedy("", PROMPTS[0], 8);
    request.constraint = Some(constraint(Kind::JsonSchema(nested)));
    let status = client.generate(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("recursion limit"), "{status:?}");
    // 60 deep is within it: compiled and answered.
    let mut nested = String::from(r#"{"type": "integer"}"#);
    for _ in 0..60 {
        nested =
            format!(r#"{{"type": "object", "properties": {{"a": {nested}}}, "required": ["a"]}}"#);
    }
    let mut request = greedy("", PROMPTS[0], 8);
    request.constraint = Some(constraint(Kind::JsonSchema(nested)));
    let text = client.generate(request).await.unwrap().into_inner().text;
    assert!(text.starts_with('{'), "{text:?}");
    let after = client
        .generate(greedy("", PROMPTS[0], 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.token_ids.len(), 4);

    // Over HTTP: the same refusal, an OpenAI-shaped 400 naming the field.
    let addr = running.http_addr.unwrap();
    let body = json!({"model": base_model(), "messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "regex", "regex": "a("}});
    let got = http(addr, "POST", "/v1/chat/completions", &[], &body.to_string()).await;
    let error = openai_error(400, &got);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("does not compile"),
        "{error}"
    );
    running.stop().await;
}
