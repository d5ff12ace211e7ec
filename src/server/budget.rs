//! The memory a server will hold, counted from its configuration, the
//! model's header and the factors' shapes before any weight is loaded
//! (`svfit serve --dry-run` prints it), and the limit it is checked
//! against: a configuration that does not fit is refused at start, with
//! the budget, instead of being killed by the OOM killer under load.

use std::fmt;

use crate::factors::{self, FactorFile, Shape};
use crate::ggml::gguf::GgufFile;
use crate::ggml::Type;
use crate::model::{self, Branch, Config, KvCache, LoraBranch};

use super::ServeConfig;

/// What the process takes besides the parts counted: code, the
/// tokenizer, threads' stacks, allocator slack (measured: 60–90 MB).
const RUNTIME: u64 = 128 << 20;

/// One line of a budget.
pub struct Item {
    pub what: &'static str,
    pub bytes: u64,
    /// How the number comes about.
    pub how: String,
}

/// The memory a server configuration holds once its caches are full.
pub struct Budget {
    pub items: Vec<Item>,
}

impl Budget {
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.items {
            writeln!(
                f,
                "  {:<14} {:>9.1} MB  {}",
                item.what,
                mb(item.bytes),
                item.how
            )?;
        }
        write!(f, "  {:<14} {:>9.1} MB", "total", mb(self.total()))
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The budget of serving `config`: the weights as the load holds them,
/// the factors and slot tables (ranks from the factor file `factors`, or
/// full ranks, a bound, where it is not computed yet), the KV cache, the
/// compute buffers of the largest step, both host caches at their limits.
/// `gguf` is the model's file.
pub fn of(
    config: &ServeConfig,
    gguf: &GgufFile,
    factors: Option<&FactorFile>,
) -> anyhow::Result<Budget> {
    let cfg = Config::from_gguf(gguf)?;
    let weights: u64 = gguf
        .tensors()
        .iter()
        .map(|t| model::held_bytes(config.load.weights, t))
        .sum();
    let (shapes, ranks) = match factors {
        Some(file) => (file.matrices().to_vec(), "ranks of the cached factors"),
        None => (
            full_ranks(gguf, config)?,
            "full ranks: factors not computed yet",
        ),
    };
    let e = &config.engine;
    let n_slots = e.adapter_slots + 1;
    let step = e.prefill_budget + e.max_sequences;
    let query = e.prefill_budget.min(e.context);
    let items = vec![
        Item {
            what: "weights",
            bytes: weights,
            how: format!(
                "{} tensors, --weights {}",
                gguf.tensors().len(),
                config.load.weights
            ),
        },
        Item {
            what: "factors",
            bytes: Branch::bytes_for(&shapes, n_slots, Type::Q8_0),
            how: format!(
                "{} matrices ({}, {ranks}), q8_0, {n_slots} slots",
                shapes.len(),
                config.factors.targets
            ),
        },
        Item {
            what: "LoRA slots",
            bytes: if e.lora.slots == 0 {
                0
            } else {
                LoraBranch::bytes_for(&cfg, &e.lora.kinds, e.lora.rank, e.lora.slots + 1)?
            },
            how: format!(
                "{} slots of rank {} on {} kinds, f32, placed at the first LoRA served \
                 (--lora-slots, --lora-rank, --lora-targets)",
                e.lora.slots,
                e.lora.rank,
                e.lora.kinds.len()
            ),
        },
        Item {
            what: "KV cache",
            bytes: KvCache::bytes(&cfg, e.kv_cells),
            how: format!(
                "{} cells x {} layers x {} wide, K and V f16",
                e.kv_cells,
                cfg.n_layer,
                cfg.n_embd_kv()
            ),
        },
        Item {
            what: "compute",
            bytes: model::compute_bytes_bound(&cfg, step, e.max_sequences, query, e.context),
            how: format!(
                "a step of {step} tokens, {query} of one sequence over {} cells",
                e.context
            ),
        },
        Item {
            what: "prefix cache",
            bytes: e.prefix_cache_bytes as u64,
            how: "--prefix-cache-mb, when full".into(),
        },
        Item {
            what: "adapter cache",
            bytes: config.adapter_cache_bytes as u64,
            how: "--adapter-cache-mb, when full".into(),
        },
        Item {
            what: "LoRA cache",
            bytes: if e.lora.slots == 0 {
                0
            } else {
                e.lora.cache_bytes as u64
            },
            how: "--lora-cache-mb, when full".into(),
        },
        Item {
            what: "runtime",
            bytes: RUNTIME,
            how: "code, tokenizer, threads, allocator".into(),
        },
    ];
    Ok(Budget { items })
}

/// Every target matrix at full rank: a bound of what any rank policy
/// keeps.
fn full_ranks(gguf: &GgufFile, config: &ServeConfig) -> anyhow::Result<Vec<Shape>> {
    Ok(factors::target_matrices(gguf, &config.factors.targets)?
        .into_iter()
        .map(|(target, slice)| {
            let n = gguf
                .tensor(&slice.tensor_name(target.layer))
                .map_or(0, |t| t.ne[0] as usize);
            let m = slice.rows.len();
            let rank = config.factors.policy.bound(m.min(n));
            Shape { target, m, n, rank }
        })
        .collect())
}

/// The memory a process may use, and what says so.
pub struct Limit {
    pub bytes: u64,
    pub source: String,
}

/// The limit a server is held to: `--memory-limit` where given, else the
/// least of the cgroup's `memory.max` (v2, or v1's limit) and the memory
/// the kernel reports available now.
pub fn limit(explicit: Option<u64>) -> Option<Limit> {
    if let Some(bytes) = explicit {
        return Some(Limit {
            bytes,
            source: "--memory-limit".into(),
        });
    }
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|s| (s, "the cgroup's memory.max"))
        .or_else(|| {
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
                .map(|s| (s, "the cgroup's memory.limit_in_bytes"))
        })
        .and_then(|(s, source)| {
            let bytes: u64 = s.trim().parse().ok()?;
            // v1 writes a huge number for "no limit".
            (bytes < 1 << 60).then(|| Limit {
                bytes,
                source: source.into(),
            })
        });
    let available = read("/proc/meminfo").and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(Limit {
            bytes: kb << 10,
            source: "MemAvailable in /proc/meminfo".into(),
        })
    });
    [cgroup, available]
        .into_iter()
        .flatten()
        .min_by_key(|l| l.bytes)
}

impl fmt::Display for Limit {
    /// The limit as a line under a [`Budget`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  {:<14} {:>9.1} MB  {}",
            "limit",
            mb(self.bytes),
            self.source
        )
    }
}

impl Budget {
    /// Whether the budget stays within `limit` (any budget fits no limit).
    pub fn fits(&self, limit: Option<&Limit>) -> bool {
        limit.is_none_or(|l| self.total() <= l.bytes)
    }
}

/// Refuses `budget` if it exceeds `limit`, with the budget in the error.
pub fn check(budget: &Budget, limit: Option<&Limit>) -> anyhow::Result<()> {
    match limit {
        Some(limit) if !budget.fits(Some(limit)) => anyhow::bail!(
            "this configuration needs {:.0} MB, more than the {:.0} MB it may use ({}):\n{budget}\n\
             lower --kv-cells, --ctx, --prefix-cache-mb, --adapter-cache-mb, --lora-slots, --lora-cache-mb or \
             --adapter-slots, or raise --memory-limit",
            mb(budget.total()),
            mb(limit.bytes),
            limit.source
        ),
        _ => Ok(()),
    }
}

/// Parses a `--memory-limit`: bytes, or a number with K, M, G or T (powers
/// of 1024; a trailing B or iB is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (such as 6G, 800M or 1073741824)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{s}' is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_nonsense_is_refused() {
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("800MiB"), Ok(800 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "-1G", "0", "lots", "1e30T", "NaN"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_budget_over_the_limit_is_refused_with_its_lines() {
        let budget = Budget {
            items: vec![
                Item {
                    what: "weights",
                    bytes: 3 << 30,
                    how: "test".into(),
                },
                Item {
                    what: "KV cache",
                    bytes: 1 << 30,
                    how: "test".into(),
                },
            ],
        };
        let limit = |gb: u64| Limit {
            bytes: gb << 30,
            source: "test".into(),
        };
        assert!(check(&budget, Some(&limit(4))).is_ok());
        assert!(check(&budget, None).is_ok());
        let err = check(&budget, Some(&limit(3))).unwrap_err().to_string();
        assert!(
            err.contains("needs 4096 MB, more than the 3072 MB"),
            "{err}"
        );
        assert!(err.contains("KV cache") && err.contains("total"), "{err}");
    }
}
