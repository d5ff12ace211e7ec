//! Computing a model's factors at any size: matrices in parallel, each
//! kept on disk as it finishes, joined into the factor file at the end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{
    read_rows, target_matrices, write_factors, Factor, FactorError, FactorsKey, RankPolicy,
    TargetMatrix,
};
use crate::ggml::gguf::GgufFile;

/// One finished matrix of [`build`].
pub struct Progress<'a> {
    /// Matrices done, those of an earlier, interrupted run included.
    pub done: usize,
    pub total: usize,
    /// Of `done`, those an earlier run had finished.
    pub resumed: usize,
    /// The matrix's tensor name (`blk.3.attn_q.weight`).
    pub name: &'a str,
    pub rank: usize,
    pub full_rank: usize,
}

/// Where [`build`] keeps the matrices it has finished until the whole set
/// is written: `{out}.partial/`.
pub fn partial_dir(out: &Path) -> PathBuf {
    let mut dir = out.as_os_str().to_owned();
    dir.push(".partial");
    PathBuf::from(dir)
}

/// Computes the factors of every target matrix of the model at `model` and
/// writes them to `out`, `jobs` matrices at a time. Each finished matrix is
/// kept in [`partial_dir`] (a file each, written atomically) until all are
/// assembled into `out`, so a killed run resumes where it stopped, and
/// memory holds the working set of `jobs` matrices, never the whole set.
/// Calls `progress` after each matrix; returns every matrix's rank.
pub fn build(
    model: &Path,
    key: &FactorsKey,
    out: &Path,
    jobs: usize,
    progress: impl Fn(Progress) + Sync,
) -> Result<Vec<(TargetMatrix, usize)>, FactorError> {
    let matrices = target_matrices(&GgufFile::open(model)?, &key.targets)?;
    let dir = partial_dir(out);
    std::fs::create_dir_all(&dir).map_err(|source| FactorError::Io {
        path: dir.clone(),
        source,
    })?;
    let part = |t: &TargetMatrix| dir.join(format!("{}.safetensors", t.prefix()));
    let finished: Vec<bool> = matrices
        .iter()
        .map(|(t, _)| read_part(&part(t), key, t).is_ok())
        .collect();
    let resumed = finished.iter().filter(|&&f| f).count();
    let todo: Vec<usize> = (0..matrices.len()).filter(|&i| !finished[i]).collect();
    let done = AtomicUsize::new(resumed);
    let par = par_of(jobs, todo.len());
    for_each(model, todo.len(), jobs, |gguf, j| {
        let (t, slice) = &matrices[todo[j]];
        let name = format!("{}.weight", t.prefix());
        let (w, m, n) = read_rows(gguf, &slice.tensor_name(t.layer), slice.rows.clone())?;
        let f = Factor::of_matrix_with(&w, m, n, key.policy, par)
            .ok_or_else(|| FactorError::Svd(name.clone()))?;
        drop(w);
        let rank = f.rank();
        write_factors(&part(t), key, &[(t.clone(), f)])?;
        progress(Progress {
            done: done.fetch_add(1, Ordering::Relaxed) + 1,
            total: matrices.len(),
            resumed,
            name: &name,
            rank,
            full_rank: m.min(n),
        });
        Ok(())
    })?;
    let mut parts = Vec::with_capacity(matrices.len());
    let mut ranks = Vec::with_capacity(matrices.len());
    for (t, _) in &matrices {
        let path = part(t);
        let (header, rank) = read_part(&path, key, t)?;
        parts.push((path, header));
        ranks.push((t.clone(), rank));
    }
    crate::tensorfile::concat(out, &parts, key.metadata()).map_err(|source| FactorError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    // The set is whole: the parts are no longer needed.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ranks)
}

/// The full-rank factors of `matrices` of the model at `model`, in
/// memory, `jobs` matrices at a time (training over full-rank factors,
/// `model::Learner::with_full_rank`): the same SVD as [`build`]'s.
pub fn full_rank(
    model: &Path,
    matrices: &[TargetMatrix],
    jobs: usize,
) -> Result<Vec<Factor>, FactorError> {
    let config = crate::model::Config::from_gguf(&GgufFile::open(model)?)?;
    let slices = matrices
        .iter()
        .map(|t| t.slice(&config))
        .collect::<Result<Vec<_>, _>>()?;
    let out = Mutex::new(vec![None; matrices.len()]);
    let par = par_of(jobs, matrices.len());
    for_each(model, matrices.len(), jobs, |gguf, i| {
        let (t, slice) = (&matrices[i], &slices[i]);
        let (w, m, n) = read_rows(gguf, &slice.tensor_name(t.layer), slice.rows.clone())?;
        let f = Factor::of_matrix_with(&w, m, n, RankPolicy::Full, par)
            .ok_or_else(|| FactorError::Svd(format!("{}.weight", t.prefix())))?;
        if let Ok(mut out) = out.lock() {
            out[i] = Some(f);
        }
        Ok(())
    })?;
    let mut out = out.into_inner().unwrap_or_default();
    out.resize(matrices.len(), None);
    (out.into_iter().zip(matrices))
        .map(|(f, t)| f.ok_or_else(|| FactorError::Svd(format!("{}.weight", t.prefix()))))
        .collect()
}

/// faer's parallelism for each SVD when `jobs` threads share `n` matrices:
/// all its threads for one job, else one thread per matrix.
fn par_of(jobs: usize, n: usize) -> faer::Par {
    if jobs.clamp(1, n.max(1)) == 1 {
        faer::Par::rayon(0)
    } else {
        faer::Par::Seq
    }
}

/// Calls `each(gguf, i)` for every `i` below `n` on `jobs` threads, each
/// with its own handle on the model; after the first error no more start,
/// and it is returned.
fn for_each(
    model: &Path,
    n: usize,
    jobs: usize,
    each: impl Fn(&GgufFile, usize) -> Result<(), FactorError> + Sync,
) -> Result<(), FactorError> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(None);
    let work = || -> Result<(), FactorError> {
        let gguf = GgufFile::open(model)?;
        loop {
            if failed.lock().map_or(true, |f| f.is_some()) {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return Ok(());
            }
            each(&gguf, i)?;
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(|| {
                if let Err(e) = work() {
                    if let Ok(mut failed) = failed.lock() {
                        failed.get_or_insert(e);
                    }
                }
            });
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The header of a finished matrix's file of [`build`] and the matrix's
/// rank, after checking that the file is whole and holds `t`'s factors of
/// `key`.
fn read_part(
    path: &Path,
    key: &FactorsKey,
    t: &TargetMatrix,
) -> Result<(crate::tensorfile::Header, usize), FactorError> {
    let invalid = |reason: String| FactorError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let header = super::file::read_header(path, key)?;
    let p = t.prefix();
    let shape = |suffix: &str| {
        header
            .tensors
            .iter()
            .find(|s| s.name == format!("{p}.{suffix}"))
            .map(|s| s.shape.clone())
    };
    match (shape("U"), shape("S"), shape("Vt")) {
        (Some(u), Some(s), Some(vt))
            if header.tensors.len() == 3
                && s.len() == 1
                && u.len() == 2
                && vt.len() == 2
                && u[1] == s[0]
                && vt[0] == s[0] =>
        {
            Ok((header, s[0]))
        }
        _ => Err(invalid(format!("not the factors of {p}"))),
    }
}
