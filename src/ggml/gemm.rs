//! Blocked f32 products for training graphs on the CPU, as ggml custom ops.
//!
//! ggml's CPU kernels for f32 matrices are a dot product per output element
//! (`MUL_MAT`, the forward pass) and a scaled row addition per element of
//! the gradient (`OUT_PROD`, the backward pass through every product). Both
//! load their operands again for each few multiply-adds, and together they
//! took three quarters of a training step. llamafile's sgemm would help the
//! forward one, but it is a switch for the whole CPU backend and changes how
//! serving rounds its products (the batch-invariance the engine relies on).
//!
//! [`Graph::use_gemm`] instead rewrites a built graph: every f32 `MUL_MAT`
//! and `OUT_PROD` node (2-D, or batched as attention's are) becomes a
//! custom node that computes the same product with faer's blocked, packed
//! GEMM. Each ggml thread computes one band of the output with a sequential
//! GEMM, so the result may depend on the thread count but not on timing.
//! The rewrite runs after `ggml_build_backward_expand`, which cannot
//! differentiate a custom op, and only for graphs computed on the CPU (a
//! custom op runs on the host).
//! Only training graphs use it: serving keeps ggml's own products.

use std::os::raw::{c_int, c_void};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::context::Graph;
use super::sys;

/// Products smaller than this many multiply-adds stay with ggml: the GEMM's
/// packing costs more than it saves on them.
const MIN_MACS: i64 = 1 << 16;

/// Output columns of a thread's band are a multiple of this (one AVX-512
/// register of f32).
const BAND_ALIGN: usize = 16;

/// Which product a rewritten node computes (its user data).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
enum Op {
    /// `MUL_MAT(a [k, m], b [k, n]) -> [m, n]`: `dst[i, j] = Σ a[:, i] · b[:, j]`.
    MulMat = 0,
    /// `OUT_PROD(a [m, k], b [n, k]) -> [m, n]`:
    /// `dst[i, j] = Σ_l a[i, l] b[j, l]`.
    OutProd = 1,
}

/// ggml's `struct ggml_custom_op_params`, which a custom node keeps in its
/// `op_params` and `ggml_compute_forward_custom` reads back.
#[repr(C)]
struct CustomParams {
    fun: sys::ggml_custom_op_t,
    n_tasks: c_int,
    userdata: *mut c_void,
}

impl Graph<'_> {
    /// Rewrites every f32 `MUL_MAT` and `OUT_PROD` node of at least
    /// [`MIN_MACS`] multiply-adds (see `eligible`) into the GEMM's custom
    /// node. Call it after the backward graph is built and before the graph
    /// is allocated, for a graph computed on the CPU backend. Returns how
    /// many nodes changed.
    pub fn use_gemm(&mut self) -> usize {
        let mut rewritten = 0;
        for i in 0..self.n_nodes() {
            // SAFETY: `i` is below the node count; the node is live while the
            // graph's context is, and nothing computes the graph meanwhile.
            let node = unsafe { &mut *sys::ggml_graph_node(self.as_ptr(), i) };
            let Some(op) = eligible(node) else {
                continue;
            };
            let params = CustomParams {
                fun: Some(compute),
                n_tasks: -1,
                userdata: op as usize as *mut c_void,
            };
            assert!(std::mem::size_of::<CustomParams>() <= std::mem::size_of_val(&node.op_params));
            node.op = sys::GGML_OP_CUSTOM;
            node.op_params.fill(0);
            // SAFETY: `op_params` holds the struct (asserted above); the
            // write does not need alignment.
            unsafe {
                std::ptr::write_unaligned(
                    node.op_params.as_mut_ptr().cast::<CustomParams>(),
                    params,
                )
            };
            rewritten += 1;
        }
        rewritten
    }
}

/// The product `node` computes, if the GEMM computes it: f32 operands and
/// result with unit element strides (but for `OUT_PROD`'s second operand,
/// often a transposed view), large enough to pay. Dimensions 2 and 3 are
/// batches, `a`'s broadcast over the result's as ggml does (grouped-query
/// attention: result slice `i` reads `a`'s slice `i / (ne_dst / ne_a)`).
fn eligible(node: &sys::ggml_tensor) -> Option<Op> {
    let op = match node.op {
        sys::GGML_OP_MUL_MAT => Op::MulMat,
        sys::GGML_OP_OUT_PROD => Op::OutProd,
        _ => return None,
    };
    let (a, b) = (node.src[0], node.src[1]);
    if a.is_null() || b.is_null() {
        return None;
    }
    // SAFETY: a node's sources are live tensors of its context.
    let (a, b) = unsafe { (&*a, &*b) };
    let f32 = |t: &sys::ggml_tensor| t.type_ == sys::GGML_TYPE_F32;
    let batches = (2..4).all(|d| node.ne[d] == b.ne[d] && a.ne[d] > 0 && node.ne[d] % a.ne[d] == 0);
    let strides = a.nb[0] == 4 && node.nb[0] == 4 && (op == Op::OutProd || b.nb[0] == 4);
    if !(f32(a) && f32(b) && f32(node) && batches && strides) {
        return None;
    }
    // MUL_MAT: a [k, m], b [k, n]; OUT_PROD: a [m, k], b [n, k].
    let per_slice = match op {
        Op::MulMat => a.ne[0] * a.ne[1] * b.ne[1],
        Op::OutProd => a.ne[0] * a.ne[1] * b.ne[0],
    };
    (per_slice * node.ne[2] * node.ne[3] >= MIN_MACS).then_some(op)
}

/// A `rows × cols` view of slice `(i2, i3)` of an f32 tensor whose
/// element `(r, c)` is `ne`-index `(c, r)` when `transpose` is false (a
/// ggml row is a matrix row), `(r, c)` when it is true.
///
/// # Safety
/// `t` is a live, allocated f32 tensor and the slice is within it.
unsafe fn view<'a>(t: &sys::ggml_tensor, i2: i64, i3: i64, transpose: bool) -> MatRef<'a, f32> {
    let (s0, s1) = (t.nb[0] as isize / 4, t.nb[1] as isize / 4);
    let (n0, n1) = (t.ne[0] as usize, t.ne[1] as usize);
    // SAFETY: the tensor's own shape and strides address its data.
    unsafe {
        let data = slice(t, i2, i3);
        if transpose {
            MatRef::from_raw_parts(data, n0, n1, s0, s1)
        } else {
            MatRef::from_raw_parts(data, n1, n0, s1, s0)
        }
    }
}

/// The first element of slice `(i2, i3)` of an f32 tensor.
///
/// # Safety
/// `t` is a live, allocated f32 tensor and the slice is within it.
unsafe fn slice(t: &sys::ggml_tensor, i2: i64, i3: i64) -> *mut f32 {
    let offset = i2 as usize * t.nb[2] + i3 as usize * t.nb[3];
    // SAFETY: the offset is within the tensor's data (the caller's slice).
    unsafe { t.data.cast::<u8>().add(offset).cast::<f32>() }
}

/// The custom node's body: for each batch slice, `out = lhs · rhs` as faer
/// matrices, with `out`'s rows ggml's columns of the result (`ne[1]`, the
/// tokens) and its columns ggml's rows (`ne[0]`, the features). Thread
/// `ith` of `nth` computes one band of the larger of the two dimensions of
/// every slice.
unsafe extern "C" fn compute(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    // SAFETY: ggml calls us with a node `use_gemm` rewrote (`eligible`
    // held): sources and result allocated, shapes as its `Op` says, every
    // slice index below within its tensor; 0 <= ith < nth.
    unsafe {
        let dst = &*dst;
        let (a, b) = (&*dst.src[0], &*dst.src[1]);
        let mul_mat = userdata as usize == Op::MulMat as usize;
        let (ith, nth) = (ith as usize, nth.max(1) as usize);
        let (rows, cols) = (dst.ne[1] as usize, dst.ne[0] as usize);
        for i3 in 0..dst.ne[3] {
            for i2 in 0..dst.ne[2] {
                let (a2, a3) = (i2 / (dst.ne[2] / a.ne[2]), i3 / (dst.ne[3] / a.ne[3]));
                let (lhs, rhs) = if mul_mat {
                    // lhs[j, l] = b[l, j]; rhs[l, i] = a[l, i].
                    (view(b, i2, i3, false), view(a, a2, a3, true))
                } else {
                    // lhs[j, l] = b[j, l]; rhs[l, i] = a[i, l].
                    (view(b, i2, i3, true), view(a, a2, a3, false))
                };
                let out = MatMut::from_raw_parts_mut(
                    slice(dst, i2, i3),
                    rows,
                    cols,
                    dst.nb[1] as isize / 4,
                    1,
                );
                if cols >= rows {
                    let (start, end) = band(cols, ith, nth, BAND_ALIGN);
                    if start < end {
                        let (out, rhs) = (
                            out.subcols_mut(start, end - start),
                            rhs.subcols(start, end - start),
                        );
                        matmul(out, Accum::Replace, lhs, rhs, 1.0, Par::Seq);
                    }
                } else {
                    let (start, end) = band(rows, ith, nth, 1);
                    if start < end {
                        let (out, lhs) = (
                            out.subrows_mut(start, end - start),
                            lhs.subrows(start, end - start),
                        );
                        matmul(out, Accum::Replace, lhs, rhs, 1.0, Par::Seq);
                    }
                }
            }
        }
    }
}

/// Thread `ith`'s share `[start, end)` of `len`, in bands that are
/// multiples of `align` (the last one takes the rest).
fn band(len: usize, ith: usize, nth: usize, align: usize) -> (usize, usize) {
    let per = len.div_ceil(nth).div_ceil(align) * align;
    ((ith * per).min(len), ((ith + 1) * per).min(len))
}

#[cfg(test)]
mod tests {
    use super::band;
    use crate::ggml::{Backend, Context, Scheduler, TensorSet, Type};
    use crate::rng::Rng;

    /// Every product shape training builds (2-D, batched with grouped-query
    /// broadcast, `OUT_PROD` of a transposed view), through ggml's kernels
    /// and through the GEMM, on 3 threads (uneven bands): equal to f32
    /// rounding.
    #[test]
    fn gemm_equals_ggml() {
        let (k, m, n) = (64i64, 48i64, 37i64);
        let shapes: [(&str, [i64; 4], [i64; 4]); 4] = [
            ("mul_mat", [k, m, 1, 1], [k, n, 1, 1]),
            ("mul_mat batched", [k, m, 3, 1], [k, n, 9, 1]),
            ("out_prod of a transpose", [m, k, 1, 1], [k, n, 1, 1]),
            ("out_prod batched", [m, k, 3, 1], [k, n, 9, 1]),
        ];
        let mut rng = Rng::new(5);
        for (name, a_shape, b_shape) in shapes {
            let ctx = Context::new(2, 0).unwrap();
            ctx.new_tensor(Type::F32, &a_shape).set_name("a");
            ctx.new_tensor(Type::F32, &b_shape).set_name("b");
            let backend = Backend::cpu(3).unwrap();
            let set = TensorSet::allocate(ctx, &backend).unwrap();
            let t = |name: &str| set.get(set.find(name).unwrap());
            for (t, shape) in [(t("a"), a_shape), (t("b"), b_shape)] {
                let len = shape.iter().product::<i64>() as usize;
                t.write(&(0..len).map(|_| rng.normal()).collect::<Vec<f32>>())
                    .unwrap();
            }
            let mut results = Vec::new();
            let mut sched = Scheduler::new(vec![backend], 16).unwrap();
            for gemm in [false, true] {
                let g = Context::new(16, 16).unwrap();
                let mut graph = g.new_graph(16);
                let (a, b) = (t("a"), t("b"));
                let out = if name.starts_with("mul_mat") {
                    g.mul_mat(a, b)
                } else {
                    g.out_prod(a, g.permute(b, [1, 0, 2, 3]))
                }
                .set_output();
                graph.expand(out);
                if gemm {
                    assert_eq!(graph.use_gemm(), 1, "{name}");
                }
                sched.alloc(&mut graph).unwrap().compute().unwrap();
                let mut v = vec![0f32; out.n_elements() as usize];
                out.read(&mut v).unwrap();
                results.push(v);
            }
            let (ggml, ours) = (&results[0], &results[1]);
            let worst = ggml
                .iter()
                .zip(ours)
                .map(|(e, o)| (e - o).abs())
                .fold(0f32, f32::max);
            // Sums of 64 products of unit normals: |sum| ~ 8, rounding ~1e-6.
            assert!(worst < 1e-4, "{name}: largest difference {worst}");
            assert!(
                ggml.iter().any(|&v| v.abs() > 1.0),
                "{name}: a real product"
            );
        }
    }

    #[test]
    fn bands_cover_the_range_once() {
        for len in [0, 1, 15, 16, 17, 576, 1000, 1536] {
            for nth in 1..=5 {
                for align in [1, 16] {
                    let mut next = 0;
                    for ith in 0..nth {
                        let (s, e) = band(len, ith, nth, align);
                        assert!(s <= e);
                        if s < e {
                            assert_eq!(s, next);
                            next = e;
                        }
                    }
                    assert_eq!(next, len, "len {len} nth {nth} align {align}");
                }
            }
        }
    }
}
