use super::*;

const BASE: &str = "base.gguf";

fn chat(body: Value) -> Result<Parsed, Status> {
    parse(Endpoint::Chat, body.to_string().as_bytes(), BASE)
}

fn completion(body: Value) -> Result<Parsed, Status> {
    parse(Endpoint::Completions, body.to_string().as_bytes(), BASE)
}

fn refused_naming(result: Result<Parsed, Status>, param: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with(param),
        "{param}: {}",
        status.message()
    );
}

#[test]
fn what_common_clients_send_is_accepted() {
    let p = chat(json!({
        "model": "alice-support",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "n": 1, "user": "u1", "stream": false, "frequency_penalty": 0,
        "presence_penalty": 0.0, "logit_bias": {}, "tools": null,
        "max_completion_tokens": 7, "temperature": 0, "seed": -3,
        "stop": "END", "logprobs": true, "top_logprobs": 2,
    }))
    .unwrap();
    assert_eq!(p.body.adapter, "alice-support");
    assert_eq!(p.body.max_tokens, 7);
    assert_eq!(p.body.stop, vec!["END"]);
    assert_eq!(p.logprobs, Some(2));
    let s = p.body.sampling.unwrap();
    assert_eq!(s.temperature, Some(0.0));
    assert_eq!(s.seed, Some(-3i64 as u64));
    let Some(pb::generate_request::Input::Chat(c)) = p.body.input else {
        panic!("chat");
    };
    assert_eq!(c.messages[0].role, "system");
    assert_eq!(c.messages[1].content, "Hi");

    let p = completion(json!({"model": BASE, "prompt": ["Once"], "logprobs": 0})).unwrap();
    assert_eq!(p.body.adapter, "");
    assert_eq!(p.logprobs, Some(0));
    assert_eq!(p.body.sampling.unwrap().temperature, Some(1.0));
}

#[test]
fn response_formats_become_constraints() {
    use pb::constraint::Kind;
    let m = json!([{"role": "user", "content": "x"}]);
    let kind = |format: Value| {
        chat(json!({"model": BASE, "messages": m, "response_format": format}))
            .unwrap()
            .body
            .constraint
            .and_then(|c| c.kind)
    };
    assert_eq!(kind(json!({"type": "text"})), None);
    assert_eq!(
        kind(json!({"type": "json_object"})),
        Some(Kind::JsonObject(true))
    );
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let Some(Kind::JsonSchema(text)) = kind(json!({"type": "json_schema",
        "json_schema": {"name": "x", "strict": true, "schema": schema}}))
    else {
        panic!("a json_schema constraint")
    };
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), schema);
    assert_eq!(
        kind(json!({"type": "regex", "regex": "[0-9]+"})),
        Some(Kind::Regex("[0-9]+".into()))
    );
    assert_eq!(
        kind(json!({"type": "lark", "lark": "start: \"a\""})),
        Some(Kind::Lark("start: \"a\"".into()))
    );
}

#[test]
fn tools_are_described_constrained_and_their_results_shown() {
    use pb::constraint::Kind;
    let body = json!({
        "model": BASE,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c0", "type": "function",
                 "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "c1", "type": "function",
                 "function": {"name": "weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "weather", "description": "Today's weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": true}}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
    });
    let p = chat(body.clone()).unwrap();
    assert!(p.tool_calls);
    let Some(pb::generate_request::Input::Chat(c)) = &p.body.input else {
        panic!("chat");
    };
    let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert!(c.messages[0].content.starts_with("Be brief.\n\n# Tools"));
    assert!(c.messages[0]
        .content
        .contains(r#"{"type":"function","function":{"name":"weather","description""#));
    assert_eq!(
        c.messages[2].content,
        "<tool_call>\n{\"name\":\"weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>\n\
         <tool_call>\n{\"name\":\"weather\",\"arguments\":{\"city\":\"Rome\"}}\n</tool_call>"
    );
    assert_eq!(
        c.messages[3].content,
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    );
    let Some(Kind::Lark(grammar)) = p.body.constraint.and_then(|c| c.kind) else {
        panic!("a grammar");
    };
    assert!(
        grammar.starts_with("start: calls\ncalls: call\n"),
        "{grammar}"
    );

    // `none` offers nothing; no tools, nothing either.
    let mut none = body.clone();
    none["tool_choice"] = json!("none");
    let p = chat(none).unwrap();
    assert!(!p.tool_calls && p.body.constraint.is_none());
    let Some(pb::generate_request::Input::Chat(c)) = &p.body.input else {
        panic!("chat");
    };
    assert_eq!(c.messages[0].content, "Be brief.");
    // `auto` with a JSON format: calls or that JSON.
    let mut auto = body;
    auto["tool_choice"] = json!("auto");
    auto["response_format"] = json!({"type": "json_object"});
    let p = chat(auto).unwrap();
    let Some(Kind::Lark(grammar)) = p.body.constraint.and_then(|c| c.kind) else {
        panic!("a grammar");
    };
    assert!(grammar.starts_with("start: calls | %json {"), "{grammar}");
}

#[test]
fn what_asks_for_behaviour_we_lack_is_refused_by_name() {
    let m = json!([{"role": "user", "content": "x"}]);
    let cases = [
        (json!({"model": "a", "messages": m, "n": 2}), "n"),
        (
            json!({"model": "a", "messages": m, "frequency_penalty": 0.5}),
            "frequency_penalty",
        ),
        (
            json!({"model": "a", "messages": m, "logit_bias": {"1": 5}}),
            "logit_bias",
        ),
        (
            json!({"model": "a", "messages": m, "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"model": "a", "messages": m, "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"model": "a", "messages": m, "response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"model": "a", "messages": m,
                   "response_format": {"type": "json_schema", "json_schema": {"schema": []}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"model": "a", "messages": m,
                   "response_format": {"type": "json_object", "regex": "a+"}}),
            "response_format.regex",
        ),
        (
            json!({"model": "a", "messages": m, "reasoning_effort": "low"}),
            "reasoning_effort",
        ),
        (
            json!({"model": "a", "messages": m, "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            json!({"model": "a", "messages": m, "top_logprobs": 21, "logprobs": true}),
            "top_logprobs",
        ),
        (
            json!({"model": "a", "messages": m, "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"model": "a", "messages": m, "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "a", "messages": m, "max_tokens": 4, "max_completion_tokens": 5}),
            "max_",
        ),
        (
            json!({"model": "a", "messages": [{"role": "function", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "a", "messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"model": "a", "messages": [{"role": "user", "content": "x",
                   "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        (
            json!({"model": "a", "messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function",
                 "function": {"name": "f", "arguments": "{"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"model": "a", "messages": m, "tools": [
                {"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"model": "a", "messages": m, "tools": [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}}]}),
            "tools[1].function.name",
        ),
        (
            json!({"model": "a", "messages": m, "tools": [
                {"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"model": "a", "messages": m, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"model": "a", "messages": m, "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"model": "a", "messages": m,
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"model": "a", "messages": m,
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "response_format": {"type": "regex", "regex": "a"}}),
            "response_format",
        ),
        (
            json!({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "a", "messages": m, "svfit": {"mix": [{"adapter": "x", "weight": 1}]}}),
            "svfit.mix",
        ),
        (json!({"messages": m}), "model"),
        (json!({"model": "a"}), "messages"),
        (json!({"model": "a", "messages": m, "seed": 1.5}), "seed"),
        (json!({"model": "a", "messages": "hi"}), "messages"),
    ];
    for (body, param) in cases {
        refused_naming(chat(body), param);
    }
    refused_naming(
        completion(json!({"model": "a", "prompt": [1, 2]})),
        "prompt",
    );
    refused_naming(
        completion(json!({"model": "a", "prompt": ["a", "b"]})),
        "prompt",
    );
    refused_naming(
        completion(json!({"model": "a", "prompt": "x", "echo": true})),
        "echo",
    );
    refused_naming(
        completion(json!({"model": "a", "prompt": "x", "logprobs": true})),
        "logprobs",
    );
    refused_naming(
        completion(json!({"model": "a", "prompt": "x", "messages": []})),
        "messages",
    );
    let status = parse(Endpoint::Chat, b"[1]", BASE).unwrap_err();
    assert!(
        status.message().contains("JSON object"),
        "{}",
        status.message()
    );
    assert!(parse(Endpoint::Chat, b"{", BASE).is_err());
}

#[test]
fn a_mix_runs_on_the_base_model_name() {
    let p = completion(json!({
        "model": BASE, "prompt": "x",
        "svfit": {"mix": [{"adapter": "a", "weight": 0.7}, {"adapter": "b", "weight": 0.3}]},
    }))
    .unwrap();
    assert_eq!(p.body.adapter, "");
    assert_eq!(p.body.mix.len(), 2);
    assert_eq!(p.body.mix[1].adapter, "b");
}
