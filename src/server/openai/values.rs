//! Readers of JSON values for request bodies: each error names the field
//! (`param`) in the request's terms.

use serde_json::Value;
use tonic::Status;

use super::invalid;

pub(super) fn unsupported(param: &str, what: &str) -> Status {
    invalid(param, format!("{what} is not supported by this server"))
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn expected(param: &str, what: &str, v: &Value) -> Status {
    invalid(param, format!("expected {what}, got {}", kind(v)))
}

pub(super) fn string(param: &str, v: &Value) -> Result<String, Status> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| expected(param, "a string", v))
}

pub(super) fn number(param: &str, v: &Value) -> Result<f32, Status> {
    let n = v.as_f64().ok_or_else(|| expected(param, "a number", v))?;
    // Out-of-range values become infinite and fail validation by name.
    Ok(n as f32)
}

pub(super) fn integer(param: &str, v: &Value, min: i64, max: i64) -> Result<i64, Status> {
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ if v.is_number() => Err(invalid(
            param,
            format!("{v} is not an integer in [{min}, {max}]"),
        )),
        _ => Err(expected(param, "an integer", v)),
    }
}

/// The fields of object `v` that are not `null` (a `null` asks nothing).
pub(super) fn fields<'a>(
    param: &str,
    v: &'a Value,
) -> Result<impl Iterator<Item = (&'a str, &'a Value)>, Status> {
    let Value::Object(map) = v else {
        return Err(expected(param, "an object", v));
    };
    Ok(map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.as_str(), v)))
}

/// A field this server does not know.
pub(super) fn unknown(param: &str) -> Status {
    invalid(param, "unknown field (not supported by this server)")
}

pub(super) fn boolean(param: &str, v: &Value) -> Result<bool, Status> {
    v.as_bool().ok_or_else(|| expected(param, "a boolean", v))
}

/// Refuses `v` unless it is one of the values that ask nothing of us.
pub(super) fn only_default(param: &str, v: &Value, harmless: &[Value]) -> Result<(), Status> {
    if harmless.contains(v) {
        return Ok(());
    }
    Err(invalid(
        param,
        format!(
            "{} is not supported by this server (accepted: {})",
            shown_json(v),
            harmless
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// A JSON value for an error message, cut to a readable length.
pub(super) fn shown_json(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}
