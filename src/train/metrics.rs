//! A run's `metrics.jsonl` (one JSON object per step and per evaluation)
//! and the loss plot drawn from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::plot;
use super::session::{io, SessionError};

/// `metrics.jsonl`: appended line by line. A resumed run first drops the
/// lines after its checkpoint's step (written before an interruption).
pub(super) struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    pub(super) fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self, SessionError> {
        let kept = match resumed_at {
            None => String::new(),
            Some(step) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
        };
        crate::home::write_atomic(path, |w| w.write_all(kept.as_bytes())).map_err(io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Metrics {
            path: path.to_path_buf(),
            file,
        })
    }

    pub(super) fn write<T: Serialize>(&mut self, record: &T) -> Result<(), SessionError> {
        let mut line = serde_json::to_string(record).unwrap_or_default();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io(&self.path))
    }
}

/// The loss curve of `metrics.jsonl` as an SVG.
pub(super) fn plot_metrics(metrics: &Path, out: &Path) -> Result<(), SessionError> {
    let text = std::fs::read_to_string(metrics).map_err(io(metrics))?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let step = v.get("step").and_then(|s| s.as_f64()).unwrap_or(0.0);
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(|l| l.as_f64()) {
            eval.push((step, l));
        }
    }
    let series = [
        plot::Series {
            name: "train loss".into(),
            color: [31, 119, 180],
            points: train,
            markers: false,
        },
        plot::Series {
            name: "eval loss".into(),
            color: [214, 39, 40],
            points: eval,
            markers: true,
        },
    ];
    let plot = plot::Plot {
        title: "svfit train",
        x_label: "step",
        y_label: "loss (nats/token)",
        series: &series,
        width: 800,
        height: 500,
    };
    plot.write(out).map_err(io(out))
}
