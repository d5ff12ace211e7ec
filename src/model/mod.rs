//! A llama-architecture model on ggml: GGUF → config + weights on a backend,
//! the forward graph, the multi-sequence KV cache, and the tokenizer.

mod batch;
mod config;
mod graph;
pub mod kv_cache;
mod lora;
#[cfg(feature = "check")]
pub mod random;
mod svfit;
pub mod tokenizer;
mod train;
mod weights;

use std::borrow::Cow;
use std::path::Path;

pub use batch::{Batch, SeqId, Slots};
pub use config::{Arch, Config, SUPPORTED_ARCHITECTURES};
pub use graph::compute_bytes_bound;
pub use kv_cache::KvCache;
pub use lora::LoraBranch;
pub use svfit::{Branch, Slot};
pub use tokenizer::Tokenizer;
pub use train::{full_rank_pays, Learner, RowLoss, TrainRow};

use crate::adapter::LowRank;
use crate::factors::{Factor, FactorFile, Shape, TargetMatrix};
use crate::ggml::gguf::{GgufError, GgufFile, GgufWriteError};
use crate::ggml::{kernel, Backend, Context, GgmlError, Scheduler, Type};
use kv_cache::SeqGroup;
pub use weights::{held_bytes, write_converted, MatrixSlice, WeightFormat};
use weights::{Holding, Weights};

/// The config of the model in `gguf`, once every metadata key and every
/// tensor of the file is accounted for (read, or known not to change what
/// the engine computes). Loading checks the same; `svfit factorize`,
/// `merge` and `convert` ask this before they read a matrix.
pub fn understand(gguf: &GgufFile) -> Result<Config, ModelError> {
    let config = Config::from_gguf(gguf)?;
    weights::check_tensors(gguf, &config)?;
    Ok(config)
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error(transparent)]
    Write(#[from] GgufWriteError),
    #[error("unsupported architecture '{0}' (supported: {list})", list = SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture(String),
    #[error("unsupported model feature: {0}")]
    Unsupported(String),
    /// A key, value or tensor the engine does not compute as llama.cpp would.
    #[error("{0}: this file needs support that svfit lacks")]
    NeedsSupport(String),
    #[error("invalid model metadata: {0}")]
    Metadata(String),
    #[error("tensor '{0}' is missing from the model")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("the context is full: {needed} tokens do not fit in the {free} free of {size} cells")]
    CacheFull {
        needed: usize,
        free: usize,
        size: usize,
    },
    #[error("token id {token} is outside the vocabulary of {n_vocab}")]
    InvalidToken { token: u32, n_vocab: usize },
    #[error("position {pos} is outside the model's context of {n_ctx}")]
    InvalidPosition { pos: i64, n_ctx: usize },
    #[error("empty batch")]
    EmptyBatch,
    #[error("SVFit factors do not fit this model: {0}")]
    Factors(String),
    #[error(
        "adapter slot {slot} does not exist (the model has {n_slots} slots; slot 0 is the base)"
    )]
    Slot { slot: Slot, n_slots: usize },
}

/// Where the model runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// "cpu", "auto" (the first GPU if any, else CPU), or a device name such
    /// as "cuda0".
    pub device: String,
    pub threads: usize,
    /// How the weight matrices are held.
    pub weights: WeightFormat,
    /// Whether products with Q8_0, Q4_0, Q5_0, Q4_1, Q4_K and Q6_K matrices
    /// on a CPU go through the batched kernels (`ggml::kernel`) where the
    /// CPU runs them (AVX-512 VNNI); off, ggml's own products compute the
    /// same numbers (to compare speed). On by default.
    pub batch_kernels: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: "cpu".into(),
            threads: default_threads(),
            weights: WeightFormat::Keep,
            batch_kernels: true,
        }
    }
}

/// One thread per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Logits of the tokens that asked for them, in batch order.
#[derive(Clone, Debug)]
pub struct Logits {
    n_vocab: usize,
    data: Vec<f32>,
}

impl Logits {
    #[cfg(feature = "check")]
    pub(crate) fn new(n_vocab: usize, data: Vec<f32>) -> Self {
        Logits { n_vocab, data }
    }

    pub fn n_rows(&self) -> usize {
        self.data.len() / self.n_vocab.max(1)
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.n_vocab..(i + 1) * self.n_vocab]
    }

    /// The rows in the order `rows` names them.
    fn reorder(self, rows: &[usize]) -> Self {
        let data = rows
            .iter()
            .flat_map(|&r| self.row(r).iter().copied())
            .collect();
        Logits {
            n_vocab: self.n_vocab,
            data,
        }
    }

    /// All rows, row-major `[n_rows, n_vocab]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
}

pub struct Model {
    config: Config,
    weights: Weights,
    sched: Scheduler,
    /// Reused for every forward graph (sized for `graph_groups` sequences).
    graph_ctx: Context,
    graph_groups: usize,
    /// The SVFit factors and adapter slots, once attached.
    svfit: Option<Branch>,
    /// The LoRA slot tables, once attached.
    lora: Option<LoraBranch>,
    /// Whether matrices (weights and factors) go through the batched
    /// kernels: asked by `LoadOptions::batch_kernels` and run by the backend.
    batch_kernels: bool,
}

impl Model {
    /// Loads a llama GGUF: validates metadata and every weight's shape, then
    /// places the weights (in their stored types) on the chosen backend.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        Self::load_with(path, options, None)
    }

    /// Loads a model for training: with `f32_weights` the matrices are
    /// dequantized to f32 (backward through quantized weights is ~10× slower
    /// on CPU, and CUDA's backward takes f32 only); without, they stay as
    /// stored and go through ggml's own products, whatever `--weights` says
    /// (our batched kernels have no backward).
    pub fn load_for_training(
        path: &Path,
        options: &LoadOptions,
        f32_weights: bool,
    ) -> Result<Self, ModelError> {
        let holding = if f32_weights {
            Holding::Train
        } else {
            Holding::Stored
        };
        Self::load_with(path, options, Some(holding))
    }

    /// `holding`: how the matrices are held (`None`: as `options.weights`
    /// says for the device).
    fn load_with(
        path: &Path,
        options: &LoadOptions,
        holding: Option<Holding>,
    ) -> Result<Self, ModelError> {
        let mut gguf = GgufFile::open(path)?;
        let config = Config::from_gguf(&gguf)?;
        let mut backends = Vec::new();
        if options.device != "cpu" {
            backends.extend(Backend::device(&options.device)?);
        }
        backends.push(Backend::cpu(options.threads)?);
        let holding = holding.unwrap_or(Holding::Serve(options.weights));
        let batch_kernels = options.batch_kernels && kernel::available_on(&backends[0]);
        let weights = Weights::load(&mut gguf, &config, &backends[0], holding, batch_kernels)?;
        // Graph room for this many sequences per batch; grows on demand.
        const GROUPS: usize = 16;
        let size = graph::graph_size(&config, GROUPS);
        let sched = Scheduler::new(backends, size)?;
        Ok(Model {
            graph_ctx: Context::new(2 * size, size)?,
            graph_groups: GROUPS,
            svfit: None,
            lora: None,
            batch_kernels,
            config,
            weights,
            sched,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Name of the backend that holds the weights ("CPU", "CUDA0", ...).
    pub fn device_name(&self) -> String {
        self.sched.primary().name()
    }

    /// Records from now on where the nodes of each graph run (`svfit
    /// check`; off by default, as it reads every node's backend).
    pub fn record_placement(&mut self) {
        self.sched.record_placement();
    }

    /// Where the nodes of the last graph ran, once recorded.
    pub fn placement(&self) -> Option<crate::ggml::Placement> {
        self.sched.placement().cloned()
    }

    /// Places SVD factors of this model's target matrices on its backend,
    /// with `n_slots` adapter slots (slot 0 is the base model), replacing
    /// any attached before. `factor_type` is how U and Vt are held: q8_0
    /// (the default of the CLI), f16 or f32.
    pub fn attach_factors(
        &mut self,
        factors: &[(TargetMatrix, Factor)],
        n_slots: usize,
        factor_type: Type,
    ) -> Result<(), ModelError> {
        let shapes: Vec<Shape> = factors
            .iter()
            .map(|(t, f)| Shape {
                target: t.clone(),
                m: f.m,
                n: f.n,
                rank: f.rank(),
            })
            .collect();
        self.attach(
            &shapes,
            &mut |i| Ok(Cow::Borrowed(&factors[i].1)),
            n_slots,
            factor_type,
        )
    }

    /// [`Model::attach_factors`] from a factor file, one matrix at a time:
    /// memory holds the factors as placed and one matrix read from the
    /// file, never the whole set.
    pub fn attach_factor_file(
        &mut self,
        file: &FactorFile,
        n_slots: usize,
        factor_type: Type,
    ) -> Result<(), ModelError> {
        let mut load = |i| {
            file.factor(i)
                .map(Cow::Owned)
                .map_err(|e| ModelError::Factors(e.to_string()))
        };
        self.attach(file.matrices(), &mut load, n_slots, factor_type)
    }

    fn attach<'f>(
        &mut self,
        shapes: &[Shape],
        load: &mut dyn FnMut(usize) -> Result<Cow<'f, Factor>, ModelError>,
        n_slots: usize,
        factor_type: Type,
    ) -> Result<(), ModelError> {
        self.svfit = None;
        let backend = self.sched.primary();
        self.svfit = Some(Branch::new(
            &self.config,
            shapes,
            load,
            n_slots,
            factor_type,
            backend,
            self.batch_kernels,
        )?);
        Ok(())
    }

    /// Bytes of the compute buffers now: they grow to the largest batch run
    /// so far (see [`compute_bytes_bound`]).
    pub fn compute_bytes(&self) -> usize {
        self.sched.buffer_bytes()
    }

    /// The attached SVFit factors and slots.
    pub fn branch(&self) -> Option<&Branch> {
        self.svfit.as_ref()
    }

    /// Places LoRA slot tables for the target kinds `kinds` ("attn_q", ...)
    /// of every layer: `n_slots` slots (slot 0 is no LoRA) of rank up to
    /// `rank`, replacing any attached before.
    pub fn attach_lora(
        &mut self,
        kinds: &[&'static str],
        rank: usize,
        n_slots: usize,
    ) -> Result<(), ModelError> {
        self.lora = None;
        let backend = self.sched.primary();
        self.lora = Some(LoraBranch::new(
            &self.config,
            kinds,
            rank,
            n_slots,
            backend,
        )?);
        Ok(())
    }

    /// The attached LoRA slot tables.
    pub fn lora_branch(&self) -> Option<&LoraBranch> {
        self.lora.as_ref()
    }

    /// Loads a LoRA (per `blk.L.kind`, `ΔW = B A`) into LoRA slot `slot`
    /// (1 or more); sequences on that slot use it from their next batch.
    pub fn set_lora(&mut self, slot: Slot, lora: &[(String, LowRank)]) -> Result<(), ModelError> {
        match &self.lora {
            Some(branch) => branch.set_slot(slot, lora),
            None => Err(ModelError::Slot { slot, n_slots: 1 }),
        }
    }

    /// Loads an adapter's deltas (`sigma - S` per `blk.L.kind`) into `slot`
    /// (1 or more); sequences on that slot use it from their next batch.
    pub fn set_adapter(
        &mut self,
        slot: Slot,
        deltas: &[(String, Vec<f32>)],
    ) -> Result<(), ModelError> {
        match &self.svfit {
            Some(branch) => branch.set_slot(slot, deltas),
            None => Err(ModelError::Slot { slot, n_slots: 1 }),
        }
    }

    /// A KV cache of `n_cells` tokens (shared by all sequences).
    pub fn new_cache(&self, n_cells: usize) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config, n_cells.max(1), self.sched.primary())
    }

    /// Runs `batch` through the model, storing its K/V in `cache`; returns the
    /// logits of the tokens marked for output, in batch order. On error the
    /// cache is unchanged.
    pub fn decode(&mut self, cache: &mut KvCache, batch: &Batch) -> Result<Logits, ModelError> {
        self.validate(batch)?;
        // Attention runs per sequence over contiguous tokens: group them.
        let order = batch.order_by_sequence();
        let grouped = order.as_ref().map(|o| batch.permuted(o));
        let run_batch = grouped.as_ref().unwrap_or(batch);
        let (cells, groups) = cache.place(run_batch)?;
        let logits = match self.run(cache, run_batch, &cells, &groups) {
            Ok(logits) => logits,
            Err(e) => {
                cache.unplace(&groups);
                return Err(e);
            }
        };
        Ok(match order {
            Some(order) => logits.reorder(&batch_output_rows(batch, &order)),
            None => logits,
        })
    }

    fn validate(&self, batch: &Batch) -> Result<(), ModelError> {
        if batch.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        let n_vocab = self.config.n_vocab;
        if let Some(&token) = batch.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::InvalidToken { token, n_vocab });
        }
        if let Some(&pos) = batch.positions.iter().find(|&&p| p < 0) {
            return Err(ModelError::InvalidPosition {
                pos: pos as i64,
                n_ctx: self.config.n_ctx_train,
            });
        }
        let n_slots = self.svfit.as_ref().map_or(1, Branch::n_slots);
        if let Some(&(_, slot)) = batch.adapters.iter().find(|&&(_, s)| s as usize >= n_slots) {
            return Err(ModelError::Slot { slot, n_slots });
        }
        let n_slots = self.lora.as_ref().map_or(1, LoraBranch::n_slots);
        if let Some(&(_, slot)) = batch.loras.iter().find(|&&(_, s)| s as usize >= n_slots) {
            return Err(ModelError::Slot { slot, n_slots });
        }
        Ok(())
    }

    fn run(
        &mut self,
        cache: &KvCache,
        batch: &Batch,
        cells: &[i64],
        groups: &[SeqGroup],
    ) -> Result<Logits, ModelError> {
        // A batch that wants no logits still computes one row (the last), so
        // the graph always has an output.
        let mut out_rows: Vec<i32> = (0..batch.len() as i32)
            .filter(|&i| batch.outputs[i as usize])
            .collect();
        let n_wanted = out_rows.len();
        if out_rows.is_empty() {
            out_rows.push(batch.len() as i32 - 1);
        }
        let shape = graph::Shape {
            n_tokens: batch.len(),
            n_outputs: out_rows.len(),
            groups,
        };
        if groups.len() > self.graph_groups {
            let groups = groups.len().next_power_of_two();
            let room = graph::graph_size(&self.config, groups);
            self.graph_ctx = Context::new(2 * room, room)?;
            self.sched.resize(room)?;
            self.graph_groups = groups;
        }
        // The SVFit branch only when some token is not on the base.
        let slots = batch.token_slots();
        let branch = self
            .svfit
            .as_ref()
            .filter(|_| slots.iter().any(|&s| s != 0));
        let lora_slots = batch.token_lora_slots();
        let lora = self
            .lora
            .as_ref()
            .filter(|_| lora_slots.iter().any(|&s| s != 0));
        self.graph_ctx.reset();
        let ctx = &self.graph_ctx;
        let mut gf = ctx.new_graph(graph::graph_size(&self.config, groups.len()));
        let builder = graph::Builder {
            ctx,
            cfg: &self.config,
            weights: &self.weights,
            differentiable: false,
        };
        let (inputs, logits) = builder.forward(&mut gf, cache, (branch, lora), &shape);
        let allocated = self.sched.alloc(&mut gf)?;

        let tokens: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
        inputs.tokens.write(&tokens)?;
        inputs.positions.write(&batch.positions)?;
        inputs.kv_cells.write(cells)?;
        inputs.v_elements.write(&cache.v_indices(cells))?;
        // A model whose layers all have (or none has) a sliding window
        // reads one set of masks; the other stays unallocated.
        let window = self.config.sliding_window.as_ref().map(|w| w.size);
        let masks = inputs.kq_masks.iter().map(|m| (m, None));
        let swa = inputs.kq_masks_swa.iter().flatten().map(|m| (m, window));
        for (i, (mask, window)) in masks.chain(swa).enumerate() {
            if mask.is_allocated() {
                let g = &groups[i % groups.len()];
                mask.write(&cache.mask(batch, g, window))?;
            }
        }
        if let Some(rows) = inputs.out_rows {
            rows.write(&out_rows)?;
        }
        // Slot inputs that no target matrix reads stay unallocated.
        if let Some(t) = inputs.slots.filter(|t| t.is_allocated()) {
            t.write(&slots)?;
        }
        if let Some(t) = inputs.out_slots.filter(|t| t.is_allocated()) {
            let out: Vec<i32> = out_rows.iter().map(|&r| slots[r as usize]).collect();
            t.write(&out)?;
        }
        if let Some(t) = inputs.lora_slots.filter(|t| t.is_allocated()) {
            t.write(&lora_slots)?;
        }
        if let Some(t) = inputs.out_lora_slots.filter(|t| t.is_allocated()) {
            let out: Vec<i32> = out_rows.iter().map(|&r| lora_slots[r as usize]).collect();
            t.write(&out)?;
        }
        allocated.compute()?;

        let mut data = logits.read_f32_vec()?;
        data.truncate(n_wanted * self.config.n_vocab);
        Ok(Logits {
            n_vocab: self.config.n_vocab,
            data,
        })
    }
}

/// For each output token of `batch` in batch order, its row among the
/// outputs of the batch permuted by `order`.
fn batch_output_rows(batch: &Batch, order: &[usize]) -> Vec<usize> {
    let mut row_of = vec![0; batch.len()];
    let mut row = 0;
    for &original in order {
        if batch.outputs[original] {
            row_of[original] = row;
            row += 1;
        }
    }
    (0..batch.len())
        .filter(|&i| batch.outputs[i])
        .map(|i| row_of[i])
        .collect()
}
