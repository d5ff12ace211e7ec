//! ggml contexts, tensors, graphs and the operators the model graph uses.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::{as_bytes, as_bytes_mut, sys, Element, GgmlError, Type};

/// An owned ggml context. Created with `no_alloc`: it holds tensor metadata
/// and graph nodes; tensor data lives in backend buffers.
pub struct Context {
    raw: NonNull<sys::ggml_context>,
    /// The batched kernels' packed inputs made in this context, by input
    /// node and quantization (`kernel`), so that each input is packed once
    /// per graph.
    pub(super) packs: RefCell<HashMap<(usize, usize), NonNull<sys::ggml_tensor>>>,
}

// SAFETY: a ggml context has no thread affinity; it is only used from one
// thread at a time because every mutation goes through this owner.
unsafe impl Send for Context {}

/// RoPE's parameters (no YaRN: its extrapolation factor is 0).
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    /// 0 rotates adjacent pairs of dims (llama), 2 the two halves (NeoX).
    pub mode: i32,
    pub n_dims: i32,
    /// The context length the model was trained with.
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    /// Positions are multiplied by this (1 / a linear scaling factor).
    pub freq_scale: f32,
}

impl Context {
    /// A metadata-only context with room for `n_tensors` tensors and one graph
    /// of `graph_size` nodes.
    pub fn new(n_tensors: usize, graph_size: usize) -> Result<Self, GgmlError> {
        Self::with_graphs(n_tensors, graph_size, false)
    }

    /// Like [`Context::new`], with room for graphs that carry gradients
    /// (training: [`Context::new_graph_with_grads`]).
    pub fn with_graphs(
        n_tensors: usize,
        graph_size: usize,
        grads: bool,
    ) -> Result<Self, GgmlError> {
        // SAFETY: pure size computations.
        let mem_size = unsafe {
            n_tensors * sys::ggml_tensor_overhead()
                + sys::ggml_graph_overhead_custom(graph_size, grads)
        };
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml_init allocates its own memory and returns null on failure.
        let raw = unsafe { sys::ggml_init(params) };
        NonNull::new(raw)
            .map(Context::from_raw)
            .ok_or_else(|| GgmlError::Alloc {
                what: format!("a context of {mem_size} bytes"),
            })
    }

    /// Forgets every tensor and graph of the context, keeping its memory for
    /// the next ones (no handle can outlive this: they borrow `self`).
    pub fn reset(&mut self) {
        self.packs.get_mut().clear();
        // SAFETY: `&mut self` proves no Tensor or Graph handle is alive.
        unsafe { sys::ggml_reset(self.as_ptr()) }
    }

    /// Wraps a context that ggml created (e.g. by `gguf_init_from_file`).
    pub(crate) fn from_raw(raw: NonNull<sys::ggml_context>) -> Self {
        Context {
            raw,
            packs: RefCell::default(),
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_context {
        self.raw.as_ptr()
    }

    /// Room left for new objects, in bytes.
    fn mem_left(&self) -> usize {
        // SAFETY: the context is live.
        unsafe { sys::ggml_get_mem_size(self.as_ptr()) - sys::ggml_used_mem(self.as_ptr()) }
    }

    /// A new tensor of `ty` with `shape` (ggml order: `shape[0]` is the
    /// contiguous dimension).
    pub fn new_tensor(&self, ty: Type, shape: &[i64]) -> Tensor<'_> {
        assert!(
            (1..=4).contains(&shape.len()),
            "ggml tensors have 1 to 4 dims"
        );
        // SAFETY: `shape` has 1..=4 entries as ggml_new_tensor reads n_dims of them.
        let raw = unsafe {
            sys::ggml_new_tensor(self.as_ptr(), ty.0, shape.len() as i32, shape.as_ptr())
        };
        self.wrap(raw)
    }

    /// Iterates the tensors of this context in creation order.
    pub fn tensors(&self) -> impl Iterator<Item = Tensor<'_>> + '_ {
        // SAFETY: the context is live.
        let first = unsafe { sys::ggml_get_first_tensor(self.as_ptr()) };
        std::iter::successors(NonNull::new(first), move |t| {
            // SAFETY: `t` is a tensor of this context.
            NonNull::new(unsafe { sys::ggml_get_next_tensor(self.as_ptr(), t.as_ptr()) })
        })
        .map(Tensor::from_raw)
    }

    /// A graph with room for `size` nodes.
    pub fn new_graph(&self, size: usize) -> Graph<'_> {
        // SAFETY: the context was sized for a graph (see `new`).
        let raw = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), size, false) };
        Graph {
            raw: NonNull::new(raw).expect("context sized for the graph"),
            _ctx: PhantomData,
        }
    }

    /// A graph with room for `size` nodes and their gradients, for
    /// [`Graph::build_backward`]. The context must come from
    /// [`Context::with_graphs`] with `grads`.
    pub fn new_graph_with_grads(&self, size: usize) -> Graph<'_> {
        // SAFETY: the context was sized for a graph with gradients.
        let raw = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), size, true) };
        Graph {
            raw: NonNull::new(raw).expect("context sized for the graph"),
            _ctx: PhantomData,
        }
    }

    pub(super) fn wrap(&self, raw: *mut sys::ggml_tensor) -> Tensor<'_> {
        // ggml aborts itself when a context runs out of memory; a null here
        // would be a sizing bug in this crate, not bad input.
        Tensor::from_raw(NonNull::new(raw).unwrap_or_else(|| {
            panic!(
                "ggml context out of memory ({} bytes left)",
                self.mem_left()
            )
        }))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context; nothing uses it after drop.
        unsafe { sys::ggml_free(self.as_ptr()) }
    }
}

/// A tensor handle, valid while the context that made it lives.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    raw: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'a Context>,
}

impl<'a> Tensor<'a> {
    pub(crate) fn from_raw(raw: NonNull<sys::ggml_tensor>) -> Self {
        Tensor {
            raw,
            _ctx: PhantomData,
        }
    }

    pub(crate) fn as_ptr(self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }

    fn get(&self) -> &sys::ggml_tensor {
        // SAFETY: the handle's lifetime keeps its context, and so the tensor, alive.
        unsafe { self.raw.as_ref() }
    }

    pub fn ty(self) -> Type {
        Type(self.get().type_)
    }

    /// Elements per dimension (ggml order).
    pub fn ne(self) -> [i64; 4] {
        self.get().ne
    }

    /// Strides in bytes per dimension.
    pub fn nb(self) -> [usize; 4] {
        self.get().nb
    }

    /// Whether the elements lie in order without gaps (not a view of a
    /// part of wider rows).
    pub fn is_contiguous(self) -> bool {
        // SAFETY: reads the shape of a live tensor.
        unsafe { sys::ggml_is_contiguous(self.as_ptr()) }
    }

    pub fn n_elements(self) -> i64 {
        self.ne().iter().product()
    }

    pub fn n_bytes(self) -> usize {
        // SAFETY: the tensor is live.
        unsafe { sys::ggml_nbytes(self.as_ptr()) }
    }

    pub fn name(self) -> String {
        // SAFETY: `name` is a fixed-size NUL-terminated array inside the tensor.
        unsafe { CStr::from_ptr(self.get().name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn set_name(self, name: &str) -> Self {
        if let Ok(c) = CString::new(name) {
            // SAFETY: ggml copies (and truncates) the name into the tensor.
            unsafe { sys::ggml_set_name(self.as_ptr(), c.as_ptr()) };
        }
        self
    }

    /// Marks the tensor as a graph input: the scheduler allocates it and the
    /// caller fills it before compute.
    pub fn set_input(self) -> Self {
        // SAFETY: sets a flag on a live tensor.
        unsafe { sys::ggml_set_input(self.as_ptr()) };
        self
    }

    /// Marks the tensor as a graph output: its memory is not reused.
    pub fn set_output(self) -> Self {
        // SAFETY: sets a flag on a live tensor.
        unsafe { sys::ggml_set_output(self.as_ptr()) };
        self
    }

    /// Marks a leaf tensor as a trainable parameter: the backward graph
    /// computes its gradient.
    pub fn set_param(self) -> Self {
        // SAFETY: sets a flag on a live leaf tensor (ggml asserts it is a leaf).
        unsafe { sys::ggml_set_param(self.as_ptr()) };
        self
    }

    /// Marks a scalar f32 node as the loss the backward graph differentiates.
    pub fn set_loss(self) -> Self {
        // SAFETY: sets a flag on a live scalar node (ggml asserts the shape).
        unsafe { sys::ggml_set_loss(self.as_ptr()) };
        self
    }

    /// Whether the tensor has backend memory (a graph input that no node
    /// reads is left unallocated by the scheduler).
    pub fn is_allocated(self) -> bool {
        !self.get().buffer.is_null() || !self.get().view_src.is_null()
    }

    fn check_transfer(self, bytes: usize) -> Result<(), GgmlError> {
        if !self.is_allocated() {
            return Err(GgmlError::Unallocated { name: self.name() });
        }
        if bytes != self.n_bytes() {
            return Err(GgmlError::Size {
                name: self.name(),
                expected: self.n_bytes(),
                actual: bytes,
            });
        }
        Ok(())
    }

    /// Copies `values` into the tensor's backend memory (the whole tensor).
    pub fn write<T: Element>(self, values: &[T]) -> Result<(), GgmlError> {
        let bytes = as_bytes(values);
        self.check_transfer(bytes.len())?;
        // SAFETY: the tensor is allocated and `bytes` covers exactly its size.
        unsafe {
            sys::ggml_backend_tensor_set(self.as_ptr(), bytes.as_ptr().cast(), 0, bytes.len())
        };
        Ok(())
    }

    /// Copies the whole tensor out of backend memory into `out`.
    pub fn read<T: Element>(self, out: &mut [T]) -> Result<(), GgmlError> {
        let bytes = as_bytes_mut(out);
        self.check_transfer(bytes.len())?;
        // SAFETY: the tensor is allocated and `bytes` covers exactly its size.
        unsafe {
            sys::ggml_backend_tensor_get(self.as_ptr(), bytes.as_mut_ptr().cast(), 0, bytes.len())
        };
        Ok(())
    }

    /// The whole of an f32 tensor, without first zeroing a buffer (logits
    /// of a large vocabulary are megabytes per step).
    pub fn read_f32_vec(self) -> Result<Vec<f32>, GgmlError> {
        let n = self.n_elements() as usize;
        let bytes = n * std::mem::size_of::<f32>();
        // A tensor of another type holds another number of bytes: refused.
        self.check_transfer(bytes)?;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        // SAFETY: the tensor is allocated and holds exactly `n` f32 values,
        // which ggml copies into the vector's capacity before its length is
        // set over them.
        unsafe {
            sys::ggml_backend_tensor_get(self.as_ptr(), out.as_mut_ptr().cast(), 0, bytes);
            out.set_len(n);
        }
        Ok(out)
    }

    fn check_range(self, offset: usize, len: usize) -> Result<(), GgmlError> {
        self.check_transfer(self.n_bytes())?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.n_bytes())
        {
            return Err(GgmlError::Size {
                name: self.name(),
                expected: self.n_bytes(),
                actual: offset.saturating_add(len),
            });
        }
        Ok(())
    }

    /// Copies `data` into the tensor's memory at byte `offset`.
    pub fn write_at(self, offset: usize, data: &[u8]) -> Result<(), GgmlError> {
        self.check_range(offset, data.len())?;
        // SAFETY: the range lies inside the allocated tensor.
        unsafe {
            sys::ggml_backend_tensor_set(self.as_ptr(), data.as_ptr().cast(), offset, data.len())
        };
        Ok(())
    }

    /// Copies bytes `offset..offset + out.len()` of the tensor into `out`.
    pub fn read_at(self, offset: usize, out: &mut [u8]) -> Result<(), GgmlError> {
        self.check_range(offset, out.len())?;
        // SAFETY: the range lies inside the allocated tensor.
        unsafe {
            sys::ggml_backend_tensor_get(self.as_ptr(), out.as_mut_ptr().cast(), offset, out.len())
        };
        Ok(())
    }

    /// The tensor's bytes, read from backend memory.
    pub fn read_bytes(self) -> Result<Vec<u8>, GgmlError> {
        let mut out = vec![0u8; self.n_bytes()];
        self.read(&mut out)?;
        Ok(out)
    }

    /// The tensor's host memory when it lives in a host buffer (CPU).
    ///
    /// # Safety
    /// Nothing else may read or write the tensor's data while the slice
    /// lives; handles are `Copy`, so the caller must make sure of it (see
    /// [`TensorSet::host_bytes_mut`](super::TensorSet::host_bytes_mut),
    /// which does through a `&mut` borrow of the set).
    pub(crate) unsafe fn host_bytes_mut(self) -> Option<&'a mut [u8]> {
        let t = self.get();
        if t.buffer.is_null() || t.data.is_null() {
            return None;
        }
        // SAFETY: the buffer is live while the tensor is.
        if !unsafe { sys::ggml_backend_buffer_is_host(t.buffer) } {
            return None;
        }
        // SAFETY: a host buffer tensor's data pointer addresses n_bytes bytes,
        // valid as long as the tensor; the caller guarantees exclusive use.
        Some(unsafe { std::slice::from_raw_parts_mut(t.data.cast::<u8>(), self.n_bytes()) })
    }
}

/// A computation graph, built in a [`Context`].
pub struct Graph<'a> {
    raw: NonNull<sys::ggml_cgraph>,
    _ctx: PhantomData<&'a Context>,
}

impl<'a> Graph<'a> {
    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.raw.as_ptr()
    }

    /// Adds `t` and everything it depends on to the graph, in order.
    pub fn expand(&mut self, t: Tensor<'a>) {
        // SAFETY: graph and tensor are live; the graph was sized by its context.
        unsafe { sys::ggml_build_forward_expand(self.as_ptr(), t.as_ptr()) }
    }

    /// Appends the backward pass of the loss node (see [`Tensor::set_loss`])
    /// to this forward graph. `accumulators` pairs nodes with allocated
    /// tensors of their shape that receive their gradients: the loss (whose
    /// accumulator must hold 1.0) and the parameters whose gradients are
    /// read back. [`Graph::reset_gradients`] prepares them before compute.
    pub fn build_backward(&mut self, ctx: &'a Context, accumulators: &[(Tensor<'a>, Tensor<'a>)]) {
        let n = self.n_nodes().max(0) as usize;
        let mut accs: Vec<*mut sys::ggml_tensor> = vec![std::ptr::null_mut(); n];
        for (i, acc) in accs.iter_mut().enumerate() {
            // SAFETY: `i` is below the node count.
            let node = unsafe { sys::ggml_graph_node(self.as_ptr(), i as i32) };
            if let Some((_, a)) = accumulators.iter().find(|(t, _)| t.as_ptr() == node) {
                *acc = a.as_ptr();
            }
        }
        // SAFETY: the graph was made with gradients and holds a loss and a
        // parameter (ggml asserts both); `accs` has one entry per node.
        unsafe { sys::ggml_build_backward_expand(ctx.as_ptr(), self.as_ptr(), accs.as_mut_ptr()) }
    }

    /// Sets the loss gradient to 1 and every other gradient accumulator to
    /// 0, before each compute of a backward graph.
    pub fn reset_gradients(&mut self) {
        // SAFETY: the graph has gradients and its accumulators are allocated.
        unsafe { sys::ggml_graph_reset(self.as_ptr()) }
    }

    pub fn n_nodes(&self) -> i32 {
        // SAFETY: the graph is live.
        unsafe { sys::ggml_graph_n_nodes(self.as_ptr()) }
    }
}

/// Graph operators. Each returns a new node in `self`; operands may come from
/// any context that outlives `'a`.
impl Context {
    pub fn mul_mat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY (all operators below): operands are live tensors; ggml checks
        // shapes with its own asserts, which our graph builder satisfies.
        self.wrap(unsafe { sys::ggml_mul_mat(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    /// Per-token products with one of several matrices (ggml's
    /// `MUL_MAT_ID`, the product of mixture-of-experts layers, and of a
    /// batch of LoRAs: BGMV): `stack` holds matrices `[k, m, n_matrices]`,
    /// `b` is `[k, used, tokens]`, `ids` (i32 `[used, tokens]`) names the
    /// matrix of each; the result is `[m, used, tokens]`. On the CPU each
    /// output value is one dot product of a matrix row and a token's
    /// column, whatever else the batch holds.
    pub fn mul_mat_id<'a>(
        &'a self,
        stack: Tensor<'a>,
        b: Tensor<'a>,
        ids: Tensor<'a>,
    ) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_mul_mat_id(self.as_ptr(), stack.as_ptr(), b.as_ptr(), ids.as_ptr())
        })
    }

    /// `dst[i, j] = Σ_l a[i, l] b[j, l]` (ggml's `OUT_PROD`, which its
    /// backward pass builds for every product).
    pub fn out_prod<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_out_prod(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_add(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_mul(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_scale(self.as_ptr(), a.as_ptr(), s) })
    }

    /// Mean over rows of the cross-entropy of `softmax(logits)` against the
    /// probability rows `labels` (same shape); a scalar.
    pub fn cross_entropy_loss<'a>(&'a self, logits: Tensor<'a>, labels: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_cross_entropy_loss(self.as_ptr(), logits.as_ptr(), labels.as_ptr())
        })
    }

    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_rms_norm(self.as_ptr(), a.as_ptr(), eps) })
    }

    /// `silu(gate) * up`, the SwiGLU activation with separate inputs.
    pub fn swiglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_swiglu_split(self.as_ptr(), gate.as_ptr(), up.as_ptr()) })
    }

    /// Rows `rows` (i32) of `a`, converted to f32.
    pub fn get_rows<'a>(&'a self, a: Tensor<'a>, rows: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_get_rows(self.as_ptr(), a.as_ptr(), rows.as_ptr()) })
    }

    /// Writes the rows of `src` into `dst` at row indices `rows` (i64); returns
    /// a view of `dst` that must be expanded into the graph.
    pub fn set_rows<'a>(
        &'a self,
        dst: Tensor<'a>,
        src: Tensor<'a>,
        rows: Tensor<'a>,
    ) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_set_rows(self.as_ptr(), dst.as_ptr(), src.as_ptr(), rows.as_ptr())
        })
    }

    /// Rotary position embedding without YaRN, as `rope` says;
    /// `freq_factors` (f32, one per pair of dims) divide its frequencies.
    pub fn rope<'a>(
        &'a self,
        a: Tensor<'a>,
        positions: Tensor<'a>,
        freq_factors: Option<Tensor<'a>>,
        rope: Rope,
    ) -> Tensor<'a> {
        let factors = freq_factors.map_or(std::ptr::null_mut(), |f| f.as_ptr());
        // SAFETY: see `mul_mat`; the factors are null (allowed) or a
        // tensor of this lifetime.
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.as_ptr(),
                a.as_ptr(),
                positions.as_ptr(),
                factors,
                rope.n_dims,
                rope.mode,
                rope.n_ctx_orig,
                rope.freq_base,
                rope.freq_scale,
                0.0,
                1.0,
                32.0,
                1.0,
            )
        })
    }

    /// `gelu(gate) * up` (GELU's tanh approximation), the GeGLU activation
    /// with separate inputs.
    pub fn geglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_geglu_split(self.as_ptr(), gate.as_ptr(), up.as_ptr()) })
    }

    /// `a * s + b`, elementwise.
    pub fn scale_bias<'a>(&'a self, a: Tensor<'a>, s: f32, b: f32) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_scale_bias(self.as_ptr(), a.as_ptr(), s, b) })
    }

    pub fn sub<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_sub(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    pub fn sqr<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_sqr(self.as_ptr(), a.as_ptr()) })
    }

    pub fn exp<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_exp(self.as_ptr(), a.as_ptr()) })
    }

    /// `log(1 + exp(a))`.
    pub fn softplus<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_softplus(self.as_ptr(), a.as_ptr()) })
    }

    pub fn tanh<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_tanh(self.as_ptr(), a.as_ptr()) })
    }

    /// `softmax(a * scale + mask)` along rows; `mask` (f32) broadcasts over
    /// `a`'s heads.
    pub fn soft_max_ext<'a>(&'a self, a: Tensor<'a>, mask: Tensor<'a>, scale: f32) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_soft_max_ext(self.as_ptr(), a.as_ptr(), mask.as_ptr(), scale, 0.0)
        })
    }

    /// Marks a matrix product to accumulate in f32 (backends that would use
    /// f16 otherwise).
    pub fn prec_f32<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: `a` is a live node; sets an op parameter.
        unsafe { sys::ggml_prec_set_acc(a.as_ptr(), sys::GGML_PREC_F32) };
        a
    }

    pub fn reshape_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_reshape_2d(self.as_ptr(), a.as_ptr(), ne0, ne1) })
    }

    /// `a` and `b` joined along dimension `dim`.
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_concat(self.as_ptr(), a.as_ptr(), b.as_ptr(), dim) })
    }

    pub fn reshape_3d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_reshape_3d(self.as_ptr(), a.as_ptr(), ne0, ne1, ne2) })
    }

    pub fn reshape_4d<'a>(&'a self, a: Tensor<'a>, ne: [i64; 4]) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_reshape_4d(self.as_ptr(), a.as_ptr(), ne[0], ne[1], ne[2], ne[3])
        })
    }

    /// A 3-d view of `a` with byte strides `nb1`, `nb2`, starting `offset` bytes in.
    pub fn view_3d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne: [i64; 3],
        nb1: usize,
        nb2: usize,
        offset: usize,
    ) -> Tensor<'a> {
        // SAFETY: see `mul_mat`; ggml asserts the view stays inside `a`.
        self.wrap(unsafe {
            sys::ggml_view_3d(
                self.as_ptr(),
                a.as_ptr(),
                ne[0],
                ne[1],
                ne[2],
                nb1,
                nb2,
                offset,
            )
        })
    }

    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe {
            sys::ggml_permute(
                self.as_ptr(),
                a.as_ptr(),
                axes[0],
                axes[1],
                axes[2],
                axes[3],
            )
        })
    }

    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: see `mul_mat`.
        self.wrap(unsafe { sys::ggml_cont(self.as_ptr(), a.as_ptr()) })
    }
}

#[cfg(test)]
mod tests;
