//! Backends (CPU, GPU), buffers, tensor sets allocated on a backend, and the
//! scheduler that runs graphs over them.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use super::context::{Context, Graph, Tensor};
use super::{sys, GgmlError};

/// An owned ggml backend (one device's compute stream).
pub struct Backend {
    raw: NonNull<sys::ggml_backend>,
}

/// Turns off ggml's tiled K-quant product (`GGML_CPU_TILED_MM=0`), once
/// per process, before any product runs: it takes over products of 8 or
/// more columns and rounds them differently from fewer, so a sequence's
/// numbers would depend on its batch. ggml then computes every K-quant
/// product one column at a time, as the batched kernels (`kernel`) do. Set
/// for this process only (llama.cpp's oracle here follows it; a separate
/// `llama-server` does not). A value the user set is left as it is.
pub(crate) fn batch_invariant_products() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const KEY: &str = "GGML_CPU_TILED_MM";
        if std::env::var_os(KEY).is_none() {
            // SAFETY: called before this process creates a ggml backend or
            // model, so no ggml thread reads the environment yet; Rust's
            // own readers take std's environment lock, and glibc never
            // frees an environment array a concurrent `getenv` may hold.
            unsafe { std::env::set_var(KEY, "0") };
        }
    });
}

// SAFETY: backends are used from one thread at a time (their owner's).
unsafe impl Send for Backend {}

impl Backend {
    /// The CPU backend with `threads` worker threads.
    pub fn cpu(threads: usize) -> Result<Self, GgmlError> {
        batch_invariant_products();
        // SAFETY: returns null on failure.
        let raw = unsafe { sys::ggml_backend_cpu_init() };
        let backend = Self::wrap(raw, "the CPU backend")?;
        backend.set_threads(threads);
        Ok(backend)
    }

    /// The first device backend whose name or description contains `name`
    /// (case-insensitive), or the first GPU for "gpu"/"auto"; `Ok(None)` for
    /// "auto" when there is no GPU.
    pub fn device(name: &str) -> Result<Option<Self>, GgmlError> {
        let wanted = name.to_ascii_lowercase();
        for dev in devices() {
            let is_gpu = dev.kind == sys::GGML_BACKEND_DEVICE_TYPE_GPU
                || dev.kind == sys::GGML_BACKEND_DEVICE_TYPE_IGPU;
            let matches = match wanted.as_str() {
                "auto" | "gpu" => is_gpu,
                _ => {
                    dev.name.to_ascii_lowercase().contains(&wanted)
                        || dev.description.to_ascii_lowercase().contains(&wanted)
                }
            };
            if matches {
                // SAFETY: `dev.raw` comes from ggml's device registry; null params is allowed.
                let raw = unsafe { sys::ggml_backend_dev_init(dev.raw, std::ptr::null()) };
                return Self::wrap(raw, &dev.name).map(Some);
            }
        }
        match wanted.as_str() {
            "auto" => Ok(None),
            _ if wanted.starts_with("cuda") && super::cuda_device_count() == 0 => {
                Err(GgmlError::NoCuda(name.to_string()))
            }
            _ => Err(GgmlError::NoDevice(name.to_string())),
        }
    }

    fn wrap(raw: *mut sys::ggml_backend, what: &str) -> Result<Self, GgmlError> {
        NonNull::new(raw)
            .map(|raw| Backend { raw })
            .ok_or_else(|| GgmlError::Alloc {
                what: what.to_string(),
            })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_backend {
        self.raw.as_ptr()
    }

    pub fn name(&self) -> String {
        // SAFETY: returns a C string owned by the backend.
        let ptr = unsafe { sys::ggml_backend_name(self.as_ptr()) };
        c_str(ptr)
    }

    pub fn is_cpu(&self) -> bool {
        // SAFETY: the backend is live.
        unsafe { sys::ggml_backend_is_cpu(self.as_ptr()) }
    }

    /// Sets the worker threads (CPU backend only; others ignore it).
    pub fn set_threads(&self, threads: usize) {
        if self.is_cpu() {
            // SAFETY: the backend is a live CPU backend.
            unsafe { sys::ggml_backend_cpu_set_n_threads(self.as_ptr(), threads.max(1) as i32) }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: we own the backend.
        unsafe { sys::ggml_backend_free(self.as_ptr()) }
    }
}

/// One device known to ggml.
pub struct DeviceInfo {
    raw: sys::ggml_backend_dev_t,
    pub name: String,
    pub description: String,
    kind: sys::ggml_backend_dev_type,
}

/// The devices ggml was built with (CPU always; CUDA with the `cuda` feature).
pub fn devices() -> Vec<DeviceInfo> {
    // SAFETY: the registry is initialised statically by ggml.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n)
        .filter_map(|i| {
            // SAFETY: i < count.
            let raw = unsafe { sys::ggml_backend_dev_get(i) };
            if raw.is_null() {
                return None;
            }
            // SAFETY: `raw` is a registered device.
            let (name, description, kind) = unsafe {
                (
                    c_str(sys::ggml_backend_dev_name(raw)),
                    c_str(sys::ggml_backend_dev_description(raw)),
                    sys::ggml_backend_dev_type(raw),
                )
            };
            Some(DeviceInfo {
                raw,
                name,
                description,
                kind,
            })
        })
        .collect()
}

fn c_str(ptr: *const std::os::raw::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings that outlive this call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// An owned backend buffer.
pub struct Buffer {
    raw: NonNull<sys::ggml_backend_buffer>,
}

// SAFETY: buffers have no thread affinity; access goes through their owner.
unsafe impl Send for Buffer {}

impl Buffer {
    pub fn size(&self) -> usize {
        // SAFETY: the buffer is live.
        unsafe { sys::ggml_backend_buffer_get_size(self.raw.as_ptr()) }
    }

    /// Sets every byte of the buffer to `value`.
    pub fn clear(&self, value: u8) {
        // SAFETY: the buffer is live.
        unsafe { sys::ggml_backend_buffer_clear(self.raw.as_ptr(), value) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: we own the buffer; the tensors pointing into it are dropped
        // with it (TensorSet owns both).
        unsafe { sys::ggml_backend_buffer_free(self.raw.as_ptr()) }
    }
}

/// Index of a tensor in a [`TensorSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorId(usize);

impl TensorId {
    /// The first tensor of a set.
    pub const FIRST: TensorId = TensorId(0);
}

/// Tensors allocated together in one backend buffer, with the context that
/// describes them. Weights, KV caches and adapter tables are tensor sets.
pub struct TensorSet {
    tensors: Vec<NonNull<sys::ggml_tensor>>,
    by_name: HashMap<String, TensorId>,
    buffer: Buffer,
    // Holds the tensors' metadata; dropped after the buffer, which is fine:
    // freeing a buffer does not touch it.
    _ctx: Context,
    // The file the tensors' data lies in, for a set placed in a mapped
    // file: dropped after the buffer, which does not own it.
    _map: Option<memmap2::Mmap>,
}

// SAFETY: the set owns its context and buffer; raw tensor pointers point into
// the context, which moves with it.
unsafe impl Send for TensorSet {}

impl TensorSet {
    /// Allocates every tensor of `ctx` in one buffer on `backend`.
    pub fn allocate(ctx: Context, backend: &Backend) -> Result<Self, GgmlError> {
        let tensors: Vec<_> = ctx
            .tensors()
            .map(|t| NonNull::new(t.as_ptr()).expect("non-null"))
            .collect();
        // SAFETY: the context and backend are live; returns null on failure
        // (including a context without tensors).
        let raw = unsafe { sys::ggml_backend_alloc_ctx_tensors(ctx.as_ptr(), backend.as_ptr()) };
        let buffer =
            NonNull::new(raw)
                .map(|raw| Buffer { raw })
                .ok_or_else(|| GgmlError::Alloc {
                    what: format!(
                        "a buffer for {} tensors on {}",
                        tensors.len(),
                        backend.name()
                    ),
                })?;
        Ok(Self::assemble(ctx, tensors, buffer, None))
    }

    /// The set of `ctx`'s `tensors`, allocated in `buffer` (over `map`).
    fn assemble(
        ctx: Context,
        tensors: Vec<NonNull<sys::ggml_tensor>>,
        buffer: Buffer,
        map: Option<memmap2::Mmap>,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (Tensor::from_raw(*t).name(), TensorId(i)))
            .collect();
        TensorSet {
            tensors,
            by_name,
            buffer,
            _ctx: ctx,
            _map: map,
        }
    }

    /// Where each tensor of `ctx` lies in a file of `len` bytes, from
    /// `offset(name)`, if every one has an offset, lies inside and is
    /// aligned to 32 bytes (what [`TensorSet::map_cpu`] needs).
    pub fn placements(
        ctx: &Context,
        len: usize,
        offset: impl Fn(&str) -> Option<usize>,
    ) -> Option<Vec<usize>> {
        ctx.tensors()
            .map(|t| {
                let at = offset(&t.name())?;
                let end = at.checked_add(t.n_bytes())?;
                (end <= len && at.is_multiple_of(32)).then_some(at)
            })
            .collect()
    }

    /// Places the tensors of `ctx` in `map` (a file mapped read-only) at
    /// `places` ([`TensorSet::placements`]), as a CPU buffer over the map:
    /// nothing is copied, pages are read from the file (or found in the
    /// page cache) as products touch them, and the kernel can drop clean
    /// ones under pressure.
    pub fn map_cpu(ctx: Context, map: memmap2::Mmap, places: &[usize]) -> Result<Self, GgmlError> {
        let tensors: Vec<_> = ctx
            .tensors()
            .map(|t| NonNull::new(t.as_ptr()).expect("non-null"))
            .collect();
        let alloc = || GgmlError::Alloc {
            what: format!("a mapped buffer for {} tensors", tensors.len()),
        };
        if places.len() != tensors.len() {
            return Err(alloc());
        }
        let base = map.as_ptr().cast_mut().cast::<std::ffi::c_void>();
        // SAFETY: the map is page-aligned and lives as long as the buffer
        // (both move into the set), which does not free it. Its pages are
        // read-only: nothing writes to weights (they are never the
        // destination of an op or of a `write`).
        let raw = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(base, map.len()) };
        let buffer = Buffer {
            raw: NonNull::new(raw).ok_or_else(alloc)?,
        };
        for (&t, &at) in tensors.iter().zip(places) {
            // SAFETY: the tensor is unallocated and no view; `at` and its
            // bytes lie inside the buffer, 32-aligned (`placements`).
            let status = unsafe {
                sys::ggml_backend_tensor_alloc(buffer.raw.as_ptr(), t.as_ptr(), base.add(at))
            };
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(alloc());
            }
        }
        Ok(Self::assemble(ctx, tensors, buffer, Some(map)))
    }

    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        Tensor::from_raw(self.tensors[id.0])
    }

    /// The host memory of tensor `id` when the set lives in a host buffer
    /// (CPU), to fill it without an intermediate copy; the `&mut` borrow of
    /// the set makes it the only access to the tensor's data meanwhile.
    pub fn host_bytes_mut(&mut self, id: TensorId) -> Option<&mut [u8]> {
        // SAFETY: `self` is borrowed mutably for the slice's lifetime, and
        // every other access to the set's tensors goes through `self`.
        unsafe { Tensor::from_raw(self.tensors[id.0]).host_bytes_mut() }
    }

    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.by_name.get(name).copied()
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }
}

/// Runs graphs over one or more backends (device first, CPU last), placing
/// each node on the first backend that holds its weights and supports it.
pub struct Scheduler {
    raw: NonNull<sys::ggml_backend_sched>,
    backends: Vec<Backend>,
    /// Where the last graph's nodes landed, once `record_placement` asked
    /// for it (reading every node's backend is work a serving step skips).
    placement: Option<Placement>,
}

/// Where the nodes of the last graph allocated ran.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Placement {
    /// Nodes per backend, by backend name.
    pub nodes: Vec<(String, usize)>,
    /// The ops of nodes not on the first backend, with their counts
    /// ("MUL_MAT x2").
    pub elsewhere: Vec<String>,
}

impl Placement {
    /// "1203 on CUDA0, 4 on CPU".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{n} on {name}"))
            .collect();
        parts.join(", ")
    }
}

fn new_sched(
    backends: &[Backend],
    graph_size: usize,
) -> Result<NonNull<sys::ggml_backend_sched>, GgmlError> {
    let mut raws: Vec<_> = backends.iter().map(Backend::as_ptr).collect();
    // SAFETY: `raws` holds live backends; default buffer types (null).
    let raw = unsafe {
        sys::ggml_backend_sched_new(
            raws.as_mut_ptr(),
            std::ptr::null_mut(),
            raws.len() as i32,
            graph_size,
            false,
            true,
        )
    };
    NonNull::new(raw).ok_or_else(|| GgmlError::Alloc {
        what: "a backend scheduler".to_string(),
    })
}

// SAFETY: the scheduler and its backends are used from one thread at a time.
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// `backends` must end with the CPU backend.
    pub fn new(backends: Vec<Backend>, graph_size: usize) -> Result<Self, GgmlError> {
        let raw = new_sched(&backends, graph_size)?;
        Ok(Scheduler {
            raw,
            backends,
            placement: None,
        })
    }

    /// Replaces the scheduler with one for graphs of up to `graph_size` nodes.
    pub fn resize(&mut self, graph_size: usize) -> Result<(), GgmlError> {
        let raw = new_sched(&self.backends, graph_size)?;
        // SAFETY: the old scheduler is ours and no graph is in flight.
        unsafe { sys::ggml_backend_sched_free(self.raw.as_ptr()) };
        self.raw = raw;
        Ok(())
    }

    /// Bytes of the compute buffers the scheduler holds now (they grow to
    /// the largest graph allocated so far).
    pub fn buffer_bytes(&self) -> usize {
        self.backends
            .iter()
            // SAFETY: scheduler and backends are live; the call only reads.
            .map(|b| unsafe {
                sys::ggml_backend_sched_get_buffer_size(self.raw.as_ptr(), b.as_ptr())
            })
            .sum()
    }

    /// The backend that holds weights and caches (the first one).
    pub fn primary(&self) -> &Backend {
        &self.backends[0]
    }

    /// Allocates the graph's intermediate tensors (and inputs); the inputs
    /// are written next, then [`Allocated::compute`] runs it. The returned
    /// value borrows both, so only the graph this scheduler allocated can be
    /// computed, and nothing else is allocated meanwhile.
    pub fn alloc<'s, 'g, 'c>(
        &'s mut self,
        graph: &'g mut Graph<'c>,
    ) -> Result<Allocated<'s, 'g, 'c>, GgmlError> {
        // SAFETY: scheduler and graph are live.
        let ok = unsafe {
            sys::ggml_backend_sched_reset(self.raw.as_ptr());
            sys::ggml_backend_sched_alloc_graph(self.raw.as_ptr(), graph.as_ptr())
        };
        if ok {
            if self.placement.is_some() {
                self.placement = Some(self.place(graph));
            }
            Ok(Allocated { sched: self, graph })
        } else {
            Err(GgmlError::Alloc {
                what: format!("compute buffers for a graph of {} nodes", graph.n_nodes()),
            })
        }
    }

    /// Records from now on where each graph's nodes run.
    pub fn record_placement(&mut self) {
        self.placement.get_or_insert_with(Placement::default);
    }

    /// Where the last graph allocated runs (`None` unless recorded).
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// Reads each node's backend off the scheduler (with one backend,
    /// everything is on it).
    fn place(&self, graph: &Graph) -> Placement {
        let n = graph.n_nodes().max(0) as usize;
        let mut counts = vec![0usize; self.backends.len() + 1];
        let mut elsewhere: std::collections::BTreeMap<String, usize> = Default::default();
        if self.backends.len() == 1 {
            counts[0] = n;
        } else {
            for i in 0..n {
                // SAFETY: the graph and scheduler are live; i < n_nodes.
                let node = unsafe { sys::ggml_graph_node(graph.as_ptr(), i as i32) };
                // SAFETY: `node` is a node of the graph just allocated.
                let backend =
                    unsafe { sys::ggml_backend_sched_get_tensor_backend(self.raw.as_ptr(), node) };
                let at = self
                    .backends
                    .iter()
                    .position(|b| b.as_ptr() == backend)
                    .unwrap_or(self.backends.len());
                counts[at] += 1;
                if at != 0 {
                    // SAFETY: as above; the description is a static string.
                    let op = c_str(unsafe { sys::ggml_op_desc(node) });
                    *elsewhere.entry(op).or_default() += 1;
                }
            }
        }
        let names = self
            .backends
            .iter()
            .map(Backend::name)
            .chain(std::iter::once("unassigned".to_string()));
        Placement {
            nodes: names.zip(counts).collect(),
            elsewhere: elsewhere
                .into_iter()
                .map(|(op, k)| format!("{op} x{k}"))
                .collect(),
        }
    }
}

/// A graph allocated on a scheduler ([`Scheduler::alloc`]).
pub struct Allocated<'s, 'g, 'c> {
    sched: &'s mut Scheduler,
    graph: &'g mut Graph<'c>,
}

impl Allocated<'_, '_, '_> {
    /// Zeroes the gradients of a graph built with them (before each
    /// backward pass).
    pub fn reset_gradients(&mut self) {
        self.graph.reset_gradients();
    }

    /// Computes the graph and waits for it.
    pub fn compute(self) -> Result<(), GgmlError> {
        // SAFETY: the graph was allocated by this scheduler, and neither
        // has been used since (both are borrowed by `self`).
        let status = unsafe {
            sys::ggml_backend_sched_graph_compute(self.sched.raw.as_ptr(), self.graph.as_ptr())
        };
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(GgmlError::Compute(status))
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: freed before `backends` (fields drop after this body).
        unsafe { sys::ggml_backend_sched_free(self.raw.as_ptr()) }
    }
}

/// A C string for ggml, or `None` when `s` holds a NUL byte.
pub(crate) fn c_string(s: &str) -> Option<CString> {
    CString::new(s).ok()
}
