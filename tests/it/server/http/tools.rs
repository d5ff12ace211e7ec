//! Tool calls through the official `openai` client on the default model:
//! `tool_choice: required` and a named function answer with `tool_calls`
//! whose arguments validate against the function's schema (with and
//! without an adapter); the streamed deltas reassemble to the same calls;
//! a tool's result comes back as a `tool` message and the model answers in
//! text; bad tools are refused naming `tools`.

use super::*;

/// The tools offered, with the schemas their arguments are checked
/// against (by hand, in [`valid_call`]).
fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city today.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
            "strict": true,
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "The time now in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 32}},
                "required": ["timezone"],
                "additionalProperties": false,
            },
        }},
    ])
}

/// Whether `call` (an OpenAI tool call object) names one of [`tools`] and
/// its arguments are JSON valid under that tool's schema.
fn valid_call(call: &Value) -> bool {
    let Some(arguments) = call["function"]["arguments"].as_str() else {
        return false;
    };
    let Ok(Value::Object(args)) = serde_json::from_str::<Value>(arguments) else {
        return false;
    };
    let text = |key: &str, max: usize| {
        args.get(key)
            .and_then(Value::as_str)
            .is_some_and(|s| s.chars().count() <= max)
    };
    match call["function"]["name"].as_str() {
        Some("get_weather") => {
            args.len() == 2
                && text("city", 20)
                && matches!(args["unit"].as_str(), Some("celsius" | "fahrenheit"))
        }
        Some("get_time") => args.len() == 1 && text("timezone", 32),
        _ => false,
    }
}

/// The calls' functions and arguments, without their ids.
fn calls_of(result: &Value) -> Vec<(Value, Value)> {
    result["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool calls: {result}"))
        .iter()
        .map(|c| {
            (
                c["function"]["name"].clone(),
                c["function"]["arguments"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_calls_validate_stream_and_come_back() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-tools");
    let config = keyed_config(dir.path());
    write(Path::new(&config.adapters), "alice", "a1", &adapter(43));
    let base_model = base_model();
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}/v1", running.http_addr.unwrap());

    let ask = |model: &str, question: &str, extra: Value| {
        let mut p = json!({
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "tools": tools(),
            "max_tokens": 96,
            "temperature": 0,
        });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call("chat", "ka", p)
    };
    let weather = "What is the weather in Paris right now?";
    let mut calls = vec![
        ask(&base_model, weather, json!({"tool_choice": "required"})),
        ask(
            &base_model,
            weather,
            json!({"tool_choice": "required", "stream": true}),
        ),
        ask(
            "a1",
            weather,
            json!({"tool_choice": "required", "parallel_tool_calls": false}),
        ),
    ];
    // A named function, once, sampled, with and without the adapter.
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    for (i, model) in [base_model.as_str(), "a1"].iter().enumerate() {
        for seed in 0..5 {
            calls.push(ask(
                model,
                "What time is it in Tokyo?",
                json!({"tool_choice": named, "parallel_tool_calls": false,
                       "temperature": 0.8, "seed": seed + 10 * i}),
            ));
        }
    }
    let results = openai_calls(&url, None, calls);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["status"], 200, "{i}: {r}");
        assert_eq!(r["finish"], "tool_calls", "{i}: {r}");
        let calls = r["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{i}: {r}");
        for c in calls {
            assert!(valid_call(c), "answer {i} breaks its schema: {c}");
            assert_eq!(c["type"], "function");
            assert!(c["id"].as_str().unwrap().starts_with("call_"), "{c}");
        }
        if i >= 3 {
            assert_eq!(calls.len(), 1, "{r}");
            assert_eq!(calls[0]["function"]["name"], "get_time");
        }
    }
    // Content is null where the answer only called.
    assert_eq!(results[0]["text"], Value::Null, "{}", results[0]);
    assert_eq!(calls_of(&results[1]), calls_of(&results[0]));
    assert_eq!(results[2]["tool_calls"].as_array().unwrap().len(), 1);
    let ids: std::collections::HashSet<_> = results[0]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(
        ids.len(),
        results[0]["tool_calls"].as_array().unwrap().len()
    );

    // The result goes back as a `tool` message; the answer is text.
    let first = &results[0]["tool_calls"][0];
    let conversation = json!([
        {"role": "user", "content": weather},
        {"role": "assistant", "content": null, "tool_calls": [first]},
        {"role": "tool", "tool_call_id": first["id"], "content": "18 degrees, sunny"},
    ]);
    let follow = |choice: &str, stream: bool| {
        call(
            "chat",
            "ka",
            json!({"model": base_model, "messages": conversation, "tools": tools(),
                   "tool_choice": choice, "max_tokens": 24, "temperature": 0,
                   "stream": stream}),
        )
    };
    let bad_schema = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "dependentSchemas": {"a": {}}}}}]);
    let results = openai_calls(
        &url,
        None,
        vec![
            follow("none", false),
            follow("auto", false),
            follow("auto", true),
            call(
                "chat",
                "ka",
                json!({"model": base_model, "messages": [{"role": "user", "content": "x"}],
                       "tools": bad_schema, "tool_choice": "required"}),
            ),
            call(
                "chat",
                "ka",
                json!({"model": base_model, "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}),
            ),
        ],
    );
    let text = results[0]["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{}", results[0]);
    assert!(results[0]["tool_calls"].is_null(), "{}", results[0]);
    assert_ne!(results[0]["finish"], "tool_calls");
    // `auto` answers with text or calls, whole and streamed alike.
    let auto = &results[1];
    assert_eq!(auto["status"], 200, "{auto}");
    if auto["tool_calls"].is_null() {
        let text = auto["text"].as_str().unwrap();
        assert!(!text.starts_with('<'), "{auto}");
        assert_eq!(results[2]["text"], auto["text"]);
    } else {
        assert_eq!(calls_of(&results[2]), calls_of(auto));
        if auto["finish"] == "tool_calls" {
            assert!(auto["tool_calls"]
                .as_array()
                .unwrap()
                .iter()
                .all(valid_call));
        }
    }
    assert_eq!(results[2]["finish"], auto["finish"]);
    for (r, param, words) in [
        (&results[3], "tools", "dependentSchemas"),
        (&results[4], "response_format", "does not compile"),
    ] {
        assert_eq!(r["status"], 400, "{r}");
        assert_eq!(r["error"]["param"], param, "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{r}");
    }
    running.stop().await;
}
