//! The body of `POST /v1/fine_tuning/jobs`, checked: OpenAI's fields
//! mapped onto svfit's training defaults (those of `svfit train`), and
//! svfit's own under `svfit`. Unknown fields are refused, so a typo is not
//! silently trained without.

use serde_json::{Map, Value};
use tonic::Status;

use crate::server::openai::invalid;
use crate::train::{Hyper, DEFAULT_WEIGHT_DECAY};

/// `svfit train`'s peak learning rate, which `learning_rate_multiplier`
/// scales.
pub const BASE_LR: f32 = 2e-2;
const DEFAULT_EPOCHS: usize = 3;
const DEFAULT_BATCH: usize = 8;
const DEFAULT_CTX: usize = 512;
/// The longest `suffix` (OpenAI's limit).
const MAX_SUFFIX: usize = 64;

/// A job as asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: u64,
    pub hyper: Hyper,
    /// `learning_rate_multiplier` as given (echoed in the job).
    pub lr_multiplier: f64,
    pub metadata: Value,
}

/// Reads a create body; `seed` is used when the body has none.
pub fn parse(body: &Value, seed: u64) -> Result<JobRequest, Status> {
    let body = body
        .as_object()
        .ok_or_else(|| invalid("body", "expected a JSON object"))?;
    let mut hyper_fields = None;
    let mut svfit = None;
    for (key, value) in body {
        match key.as_str() {
            "model" | "training_file" | "validation_file" | "suffix" | "seed" | "metadata" => {}
            "hyperparameters" => hyper_fields = Some(("hyperparameters", value)),
            "method" => hyper_fields = method(value)?.or(hyper_fields),
            "integrations" if value.is_null() || value.as_array().is_some_and(|a| a.is_empty()) => {
            }
            "svfit" => svfit = Some(value),
            other => return Err(invalid(other, "unknown field")),
        }
    }
    let text = |key: &str| -> Result<Option<String>, Status> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(key, "expected a string")),
        }
    };
    let model = text("model")?.ok_or_else(|| invalid("model", "required"))?;
    let training_file =
        text("training_file")?.ok_or_else(|| invalid("training_file", "required"))?;
    let suffix = text("suffix")?;
    if let Some(s) = &suffix {
        let ok = !s.is_empty()
            && s.len() <= MAX_SUFFIX
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(invalid(
                "suffix",
                format!("use 1 to {MAX_SUFFIX} of A-Z a-z 0-9 . _ -"),
            ));
        }
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => seed,
        Some(v) => v
            .as_u64()
            .filter(|s| *s <= i32::MAX as u64)
            .ok_or_else(|| invalid("seed", "expected a whole number from 0 to 2147483647"))?,
    };
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    let fits = |m: &Map<String, Value>| {
        m.len() <= 16
            && m.iter()
                .all(|(k, v)| k.len() <= 64 && v.as_str().is_some_and(|v| v.len() <= 512))
    };
    if !(metadata.is_null() || metadata.as_object().is_some_and(fits)) {
        return Err(invalid(
            "metadata",
            "expected at most 16 keys of up to 64 characters, with string values of up to 512",
        ));
    }
    let empty = Map::new();
    let (where_, fields) = match hyper_fields {
        Some((name, Value::Object(m))) => (name, m),
        Some((_, Value::Null)) | None => ("hyperparameters", &empty),
        Some((name, _)) => return Err(invalid(name, "expected an object")),
    };
    let named = |key: &str| format!("{where_}.{key}");
    for key in fields.keys() {
        if !matches!(
            key.as_str(),
            "n_epochs" | "batch_size" | "learning_rate_multiplier"
        ) {
            return Err(invalid(&named(key), "unknown hyperparameter"));
        }
    }
    let epochs = auto_or(fields, "n_epochs", DEFAULT_EPOCHS as f64, 1.0, 50.0, &named)?;
    let batch = auto_or(
        fields,
        "batch_size",
        DEFAULT_BATCH as f64,
        1.0,
        256.0,
        &named,
    )?;
    let lr_multiplier = auto_or(fields, "learning_rate_multiplier", 1.0, 1e-3, 10.0, &named)?;
    if epochs.fract() != 0.0 || batch.fract() != 0.0 {
        return Err(invalid(
            &named("n_epochs"),
            "n_epochs and batch_size are whole numbers",
        ));
    }
    let mut hyper = Hyper {
        lr: BASE_LR * lr_multiplier as f32,
        warmup: 0,
        min_lr_ratio: 0.1,
        weight_decay: DEFAULT_WEIGHT_DECAY,
        clip: 1.0,
        batch: batch as usize,
        epochs: epochs as usize,
        max_steps: None,
        ctx: DEFAULT_CTX,
        seed,
    };
    if let Some(extra) = svfit {
        extensions(extra, &mut hyper)?;
    }
    Ok(JobRequest {
        model,
        training_file,
        validation_file: text("validation_file")?,
        suffix,
        seed,
        hyper,
        lr_multiplier,
        metadata,
    })
}

/// `method: {type: "supervised", supervised: {hyperparameters}}`: the
/// hyper-parameters' object, if any.
fn method(value: &Value) -> Result<Option<(&'static str, &Value)>, Status> {
    let kind = value.get("type").and_then(Value::as_str);
    match kind {
        Some("supervised") => Ok(value
            .get("supervised")
            .and_then(|s| s.get("hyperparameters"))
            .map(|h| ("method.supervised.hyperparameters", h))),
        Some(other) => Err(invalid(
            "method.type",
            format!(
                "'{}' is not trained here (supervised only)",
                crate::store::shown(other)
            ),
        )),
        None => Err(invalid("method.type", "required")),
    }
}

/// A hyper-parameter given as a number in `[low, high]`, `"auto"`, or not
/// at all (`default`).
fn auto_or(
    fields: &Map<String, Value>,
    key: &str,
    default: f64,
    low: f64,
    high: f64,
    named: &dyn Fn(&str) -> String,
) -> Result<f64, Status> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) if s == "auto" => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|n| (low..=high).contains(n))
            .ok_or_else(|| invalid(&named(key), format!("expected \"auto\" or {low} to {high}"))),
    }
}

/// svfit's own options: `ctx`, `warmup`, `weight_decay`, `clip`,
/// `max_steps`, `min_lr_ratio`.
fn extensions(extra: &Value, hyper: &mut Hyper) -> Result<(), Status> {
    let fields = extra
        .as_object()
        .ok_or_else(|| invalid("svfit", "expected an object"))?;
    for (key, value) in fields {
        let named = format!("svfit.{key}");
        let number = |low: f64, high: f64| {
            value
                .as_f64()
                .filter(|n| n.is_finite() && (low..=high).contains(n))
                .ok_or_else(|| invalid(&named, format!("expected {low} to {high}")))
        };
        let whole = |low: f64, high: f64| {
            number(low, high).and_then(|n| {
                (n.fract() == 0.0)
                    .then_some(n as u64)
                    .ok_or_else(|| invalid(&named, "expected a whole number"))
            })
        };
        match key.as_str() {
            "ctx" => hyper.ctx = whole(8.0, 32768.0)? as usize,
            "warmup" => hyper.warmup = whole(0.0, 1e9)?,
            "max_steps" => hyper.max_steps = Some(whole(1.0, 1e9)?),
            "weight_decay" => hyper.weight_decay = number(0.0, 10.0)? as f32,
            "clip" => hyper.clip = number(0.0, 1e6)? as f32,
            "min_lr_ratio" => hyper.min_lr_ratio = number(0.0, 1.0)? as f32,
            _ => return Err(invalid(&named, "unknown option")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_fields_map_onto_the_trainer() {
        let body = json!({
            "model": "base.gguf", "training_file": "file-1", "suffix": "support",
            "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
            "svfit": {"ctx": 64, "max_steps": 9},
        });
        let r = parse(&body, 1).unwrap();
        assert_eq!((r.hyper.epochs, r.hyper.batch, r.hyper.ctx), (2, 8, 64));
        assert_eq!((r.hyper.seed, r.hyper.max_steps), (7, Some(9)));
        assert_eq!(r.hyper.lr, BASE_LR * 0.5);
        assert_eq!(r.suffix.as_deref(), Some("support"));
        let plain = parse(&json!({"model": "m", "training_file": "f"}), 3).unwrap();
        assert_eq!((plain.hyper.epochs, plain.seed), (DEFAULT_EPOCHS, 3));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!({"training_file": "f"}), "model"),
            (json!({"model": "m"}), "training_file"),
            (
                json!({"model": "m", "training_file": "f", "epochs": 2}),
                "epochs",
            ),
            (
                json!({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 0}}),
                "hyperparameters.n_epochs",
            ),
            (
                json!({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 2.5}}),
                "hyperparameters.n_epochs",
            ),
            (
                json!({"model": "m", "training_file": "f", "method": {"type": "dpo"}}),
                "method.type",
            ),
            (
                json!({"model": "m", "training_file": "f", "suffix": "a b"}),
                "suffix",
            ),
            (
                json!({"model": "m", "training_file": "f", "svfit": {"ctx": 1e300}}),
                "svfit.ctx",
            ),
            (
                json!({"model": "m", "training_file": "f", "seed": -1}),
                "seed",
            ),
        ];
        for (body, param) in cases {
            let e = parse(&body, 0).unwrap_err();
            assert!(
                e.message().starts_with(&format!("{param}:")),
                "{body}: {}",
                e.message()
            );
        }
    }
}
