//! What a training run holds in memory beside the model's file: the frozen
//! weights (f32, or as stored when f32 does not fit) and the full-rank
//! factors that stand for a target's weight where they pay and fit.

use std::path::Path;

use super::session::{Observer, SessionError};
use crate::factors::{self, Factor, TargetMatrix};
use crate::ggml::Type;
use crate::model::{full_rank_pays, Model};

/// How frozen weights are held during training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frozen {
    /// f32 when it fits in half the free memory, else as stored.
    Auto,
    F32,
    /// As stored (quantized): less memory, ~10× slower backward on CPU.
    Keep,
}

impl std::str::FromStr for Frozen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Frozen::Auto),
            "f32" => Ok(Frozen::F32),
            "keep" => Ok(Frozen::Keep),
            other => Err(format!("--frozen '{other}': use auto, f32 or keep")),
        }
    }
}

/// Bytes of memory available to allocate (Linux `MemAvailable`).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether to dequantize the frozen weights, and why (printed).
pub(super) fn choose_frozen(
    frozen: Frozen,
    model: &Path,
    device: &str,
) -> Result<(bool, String), SessionError> {
    let gpu = match device {
        "cpu" => false,
        "auto" | "gpu" => crate::ggml::cuda_device_count() > 0,
        _ => true,
    };
    let gguf = crate::ggml::gguf::GgufFile::open(model).map_err(crate::model::ModelError::from)?;
    let f32_bytes: u64 = gguf
        .tensors()
        .iter()
        .map(|t| t.ne.iter().product::<i64>() as u64 * 4)
        .sum();
    let mb = |b: u64| b as f64 / 1e6;
    // ggml has no backward through quantized matrices (it aborts the
    // process): those stay f32 or the run stops here, with the reason.
    let quantized = gguf
        .tensors()
        .iter()
        .find(|t| t.name.starts_with("blk.") && ![Type::F32, Type::F16].contains(&t.ty))
        .map(|t| format!("{} is {}", t.name, t.ty));
    let refuse = |why: String| {
        Err(SessionError::Frozen(format!(
            "{why}, and training through quantized weights is not supported: use --frozen f32 \
             (it needs {:.0} MB)",
            mb(f32_bytes)
        )))
    };
    Ok(match frozen {
        Frozen::F32 => (true, format!("f32 (asked; {:.0} MB)", mb(f32_bytes))),
        Frozen::Keep => match quantized {
            Some(which) => return refuse(format!("--frozen keep: {which}")),
            None => (
                false,
                "as stored (asked; backward ~10x slower on CPU)".into(),
            ),
        },
        Frozen::Auto if gpu => (
            true,
            format!(
                "f32 ({:.0} MB; GPU backward needs f32 weights)",
                mb(f32_bytes)
            ),
        ),
        Frozen::Auto => match available_memory() {
            Some(free) if f32_bytes * 2 > free && quantized.is_some() => {
                return refuse(format!(
                    "f32 weights need {:.0} MB, more than half of the {:.0} MB free",
                    mb(f32_bytes),
                    mb(free)
                ))
            }
            Some(free) if f32_bytes * 2 > free => (
                false,
                format!(
                    "as stored: f32 needs {:.0} MB, {:.0} MB free (backward ~10x slower)",
                    mb(f32_bytes),
                    mb(free)
                ),
            ),
            free => (
                true,
                format!(
                    "f32 ({:.0} MB{})",
                    mb(f32_bytes),
                    free.map(|f| format!(" of {:.0} MB free", mb(f)))
                        .unwrap_or_default()
                ),
            ),
        },
    })
}

/// The full-rank factors (`full[i]` for `factors[i]`) of the targets whose
/// training graph they shorten ([`full_rank_pays`]) and whose kept factors
/// are not full rank already, computed now (the factor file keeps the
/// rank only). None when they and the SVD's working set would take more
/// than a quarter of the free memory: the run is the same, slower.
pub(super) fn full_rank_factors(
    path: &Path,
    model: &Model,
    factors: &[(TargetMatrix, Factor)],
    observer: &mut dyn Observer,
) -> Result<Vec<Option<Factor>>, SessionError> {
    let want: Vec<usize> = (0..factors.len())
        .filter(|&i| {
            let (t, f) = &factors[i];
            f.rank() < f.m.min(f.n) && full_rank_pays(model.config(), t, f.m, f.n, f.rank())
        })
        .collect();
    let mut full = vec![None; factors.len()];
    if want.is_empty() {
        return Ok(full);
    }
    let jobs = factors::default_jobs();
    let of = |i: &usize| &factors[*i].1;
    let bytes: usize = want
        .iter()
        .map(of)
        .map(|f| 4 * f.m.min(f.n) * (f.m + f.n))
        .sum();
    // The SVD holds about 3 copies of a matrix in f64 per job.
    let working = jobs * 3 * 8 * want.iter().map(of).map(|f| f.m * f.n).max().unwrap_or(0);
    match available_memory() {
        Some(free) if 4 * (bytes + working) as u64 > free => {
            observer.message(&format!(
                "the full-rank factors would take {:.0} MB of {:.0} MB free: training over the \
                 kept ones only",
                (bytes + working) as f64 / 1e6,
                free as f64 / 1e6
            ));
            return Ok(full);
        }
        _ => {}
    }
    let matrices: Vec<TargetMatrix> = want.iter().map(|&i| factors[i].0.clone()).collect();
    for (i, f) in want
        .into_iter()
        .zip(factors::full_rank(path, &matrices, jobs)?)
    {
        full[i] = Some(f);
    }
    Ok(full)
}
