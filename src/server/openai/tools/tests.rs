use super::*;

fn whole(text: &str) -> Answer {
    let mut calls = Calls::default();
    let mut answer = Answer::default();
    answer.add(calls.read(text));
    answer.add(calls.end());
    answer
}

/// Read a byte at a time where the text is ASCII.
fn streamed(text: &str) -> (Answer, Vec<Piece>) {
    let mut calls = Calls::default();
    let mut all = Vec::new();
    for c in text.chars() {
        all.extend(calls.read(&c.to_string()));
    }
    all.extend(calls.end());
    let mut answer = Answer::default();
    answer.add(all.clone());
    (answer, all)
}

#[test]
fn calls_read_back_whole_and_streamed_alike() {
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \
                \"at\": {\"h\": 1}}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \
                \"arguments\": {}}\n</tool_call>";
    let expected = Answer {
        content: String::new(),
        calls: vec![
            (
                "get_weather".into(),
                r#"{"city": "Paris", "at": {"h": 1}}"#.into(),
            ),
            ("now".into(), "{}".into()),
        ],
    };
    assert_eq!(whole(text), expected);
    let (answer, pieces) = streamed(text);
    assert_eq!(answer, expected);
    // The arguments came out as they were written, not at the end.
    let parts = pieces
        .iter()
        .filter(|p| matches!(p, Piece::Arguments { index: 0, .. }))
        .count();
    assert!(parts > 10, "{pieces:?}");
}

#[test]
fn braces_and_tags_inside_strings_are_arguments() {
    let text = "<tool_call>\n{\"name\": \"say\", \"arguments\": {\"text\": \"a } b \\\" ] \
                </tool_call> c\"}}\n</tool_call>";
    let expected = vec![(
        "say".to_string(),
        r#"{"text": "a } b \" ] </tool_call> c"}"#.to_string(),
    )];
    assert_eq!(whole(text).calls, expected);
    assert_eq!(streamed(text).0.calls, expected);
    assert_eq!(whole(text).content, "");
}

#[test]
fn text_is_content_and_cut_calls_keep_what_was_written() {
    assert_eq!(whole("Hello <tool_call>").content, "Hello <tool_call>");
    assert!(whole("Hello").calls.is_empty());
    let cut = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2";
    let answer = whole(cut);
    assert_eq!(answer.calls, vec![("f".into(), "{\"a\": [1, 2".into())]);
    assert_eq!(streamed(cut).0, answer);
    let cut = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool";
    assert_eq!(whole(cut).calls, vec![("f".into(), "{}".into())]);
    assert_eq!(whole(cut).content, "");
    // Text that begins like a call but is not one.
    assert_eq!(whole("<b>bold</b>").content, "<b>bold</b>");
    assert_eq!(whole("<tool_call>\n[1]").content, "<tool_call>\n[1]");
    assert_eq!(streamed("<tool_call>\n[1]").0.content, "<tool_call>\n[1]");
}

#[test]
fn the_grammar_offers_what_the_choice_allows() {
    let functions = functions(&json!([
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "b"}},
    ]))
    .unwrap();
    let tools = |choice, parallel| {
        Tools::new(functions.clone(), Some(choice), parallel)
            .unwrap()
            .unwrap()
    };
    let g = tools(Choice::Named("b".into()), false).grammar(None);
    assert!(g.starts_with("start: calls\ncalls: call\n"), "{g}");
    assert!(g.contains(r#"{"const":"b"}"#) && !g.contains(r#"{"const":"a"}"#));
    let g = tools(Choice::Auto, true).grammar(None);
    assert!(g.contains("TEXT") && g.contains("anyOf"), "{g}");
    assert!(Tools::new(functions.clone(), Some(Choice::None), true)
        .unwrap()
        .is_none());
    assert!(Tools::new(Vec::new(), Some(Choice::Required), true).is_err());
    assert!(Tools::new(functions, Some(Choice::Named("c".into())), true).is_err());
}
