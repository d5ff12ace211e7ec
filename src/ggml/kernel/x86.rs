//! The kernels' tiles on x86-64, for every weight
//! [`Format`](super::Format): each block's arithmetic that of ggml's AVX2
//! `ggml_vec_dot_*` for its type.

// Indexing reads best for register tiles.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{Format, TILE_PAIRS, TILE_ROWS};

const R: usize = TILE_ROWS;
/// A block of each row of a tile.
type Rows = [*const u8; R];
/// A block of each column pair of a tile.
type Pairs<const P: usize> = [*const u8; P];
/// A value per row and column pair of a tile.
type Tile<A, const P: usize> = [[A; P]; R];

/// What a tile accumulates: per row and column pair, and per column pair
/// for all rows at once.
struct Accs<B: Block + ?Sized, const P: usize> {
    tile: Tile<B::Acc, P>,
    pairs: [B::Extra; P],
}
/// How far ahead in a weight row to prefetch, in bytes (256 and 1024 were
/// no faster). Where weights stream from memory, prefetching every line
/// of a block and the next tile's rows before they start is what lets the
/// K-quant tiles run at their in-cache speed (docs/PERFORMANCE.md, 1B-shaped
/// models).
const PREFETCH: usize = 512;

/// An f16 read from `p`, widened.
///
/// # Safety
/// `p` points at 2 readable bytes.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// What happens to each result before it is stored (see `super::Then`).
#[derive(Clone, Copy)]
pub(super) enum Then {
    Store,
    ScaleBySlot {
        table: *const f32,
        slots: *const i32,
        n_slots: usize,
    },
    AddTo {
        y: *const f32,
    },
}

impl Then {
    /// The value stored for result `v` at row `r`, column `c` of an
    /// output with `n` rows.
    ///
    /// # Safety
    /// The pointers hold the sources checked by `kernel_node`.
    #[inline(always)]
    unsafe fn apply(self, v: f32, r: usize, c: usize, n: usize) -> f32 {
        // SAFETY: `slots` has an entry per column, `table` n_slots columns
        // of n rows, `y` n rows per column; a slot out of range (never:
        // batches are checked) is clamped, not read past.
        unsafe {
            match self {
                Then::Store => v,
                Then::ScaleBySlot {
                    table,
                    slots,
                    n_slots,
                } => {
                    let slot = (*slots.add(c)).clamp(0, n_slots as i32 - 1) as usize;
                    v * *table.add(slot * n + r)
                }
                Then::AddTo { y } => *y.add(c * n + r) + v,
            }
        }
    }
}

/// One product `W x` as the kernels read and write it: `w` points at `n`
/// rows of `k` weights as ggml stores them, `packed` at `b`
/// columns of `k` packed for the weights' type, `out` at room for the
/// `[n, b]` result (column-major), and `then` says what happens to each
/// result before it is stored. Passed by value: the tiles read it from
/// registers.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub w: *const u8,
    pub k: usize,
    pub n: usize,
    pub b: usize,
    pub packed: *const u8,
    pub out: *mut f32,
    pub then: Then,
}

/// Rows `first..last` of `product`, whose weights are of `format`.
///
/// # Safety
/// The CPU has the features of `available()`; the pointers of `product`
/// hold what its doc says; `first` and `last` are multiples of `TILE_ROWS`
/// within its `n` rows.
pub(super) unsafe fn rows(format: Format, product: Product, first: usize, last: usize) {
    // SAFETY: the caller's.
    unsafe {
        match format {
            Format::Q8_0 => rows_of::<Signed<Q8_0>>(product, first, last),
            Format::Q4_0 => rows_of::<Signed<Q4_0>>(product, first, last),
            Format::Q5_0 => rows_of::<Signed<Q5_0>>(product, first, last),
            Format::Q4_1 => rows_of::<Q4_1>(product, first, last),
            Format::Q4_K => rows_of::<Q4K>(product, first, last),
            Format::Q6_K => rows_of::<Q6K>(product, first, last),
        }
    }
}

/// [`rows`] for the blocks `B`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
unsafe fn rows_of<B: Block>(product: Product, first: usize, last: usize) {
    let pairs = product.b.div_ceil(2);
    let mut r = first;
    while r < last {
        let mut p = 0;
        while p < pairs {
            let tile = (pairs - p).min(TILE_PAIRS);
            // SAFETY: rows r..r + TILE_ROWS and pairs p..p + tile are in range.
            unsafe {
                match tile {
                    TILE_PAIRS => tile_of::<B, TILE_PAIRS>(product, r, p),
                    3 => tile_of::<B, 3>(product, r, p),
                    2 => tile_of::<B, 2>(product, r, p),
                    _ => tile_of::<B, 1>(product, r, p),
                }
            }
            p += tile;
        }
        r += TILE_ROWS;
    }
}

/// One tile of `product`: rows `r0..r0 + TILE_ROWS` times column pairs
/// `p0..p0 + P`, block by block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
unsafe fn tile_of<B: Block, const P: usize>(product: Product, r0: usize, p0: usize) {
    let Product {
        w: matrix,
        k,
        n,
        b,
        packed,
        out,
        then,
    } = product;
    let nb = k / B::QK;
    // SAFETY (whole body): the caller's ranges; loads are unaligned.
    unsafe {
        // The tile's rows, read side by side block by block.
        let w = matrix.add(r0 * nb * B::BYTES);
        // SAFETY: `Accs` is SIMD registers, for which no bits are invalid.
        let mut acc = std::mem::zeroed::<Accs<B, P>>();
        for kb in 0..nb {
            let rows: [*const u8; R] = std::array::from_fn(|i| w.add((i * nb + kb) * B::BYTES));
            // Every cache line of each row's block PREFETCH bytes ahead
            // (a hint: never faults, so the address may leave the matrix);
            // past a row's end, the same row of the next tile, which is
            // read next (rows are contiguous: R - 1 rows further on). Each
            // of the R streams then starts warm.
            for row in rows {
                for line in (0..B::BYTES).step_by(64) {
                    let ahead = kb * B::BYTES + PREFETCH + line;
                    let next = if ahead >= nb * B::BYTES {
                        (R - 1) * nb * B::BYTES
                    } else {
                        0
                    };
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(PREFETCH + line + next) as *const i8
                    );
                }
            }
            let pairs: Pairs<P> =
                std::array::from_fn(|j| packed.add(((p0 + j) * nb + kb) * B::PACKED));
            B::step(rows, pairs, &mut acc);
        }
        for (i, tile) in acc.tile.iter().enumerate() {
            for (j, &one) in tile.iter().enumerate() {
                let (c, row) = (2 * (p0 + j), r0 + i);
                let [v0, v1] = B::finish(one, &acc.pairs[j], i);
                *out.add(c * n + row) = then.apply(v0, row, c, n);
                if c + 1 < b {
                    *out.add((c + 1) * n + row) = then.apply(v1, row, c + 1, n);
                }
            }
        }
    }
}

/// A weight block type as the tiles read it: its size, its packed input's
/// and the arithmetic of one block of a tile.
trait Block {
    /// The weight type.
    const FORMAT: Format;
    /// Weights and bytes of one block.
    const QK: usize = Self::FORMAT.block().0;
    const BYTES: usize = Self::FORMAT.block().1;
    /// Bytes of one block of a packed column pair.
    const PACKED: usize = Self::FORMAT.input().block().1;
    /// What a (row, column pair) accumulates over the blocks, and what a
    /// column pair accumulates for all the tile's rows at once (`()` for
    /// nothing): SIMD registers, zero when all bits are.
    type Acc: Copy;
    type Extra: Copy;

    /// Adds one block of the `R` rows times the `P` column pairs.
    ///
    /// # Safety
    /// The CPU has the kernels' features; `w[i]` points at a block of
    /// row `i`, `x[j]` at the same block of pair `j`.
    unsafe fn step<const P: usize>(w: Rows, x: Pairs<P>, acc: &mut Accs<Self, P>);

    /// The two columns' results of row `row`.
    ///
    /// # Safety
    /// The CPU has the kernels' features.
    unsafe fn finish(acc: Self::Acc, extra: &Self::Extra, row: usize) -> [f32; 2];
}

/// The 32 nibbles of 16 bytes at `p` as 32 bytes: low nibbles first, as
/// ggml's `bytes_from_nibbles_32`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's: 16 readable bytes.
    let low = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(low), low);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Adds to each column pair's sums the products of the unsigned weights
/// `q` and the pair's inputs `x`, summed in 2s (ggml's `maddubs`), times
/// `scale` and summed in 2s again (its `madd`): exact in 32 bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn add_scaled<const P: usize>(
    sums: &mut [__m512i; P],
    q: __m512i,
    x: &[__m512i; P],
    scale: __m512i,
) {
    for (sum, &x) in sums.iter_mut().zip(x) {
        *sum = _mm512_dpwssd_epi32(*sum, _mm512_maddubs_epi16(q, x), scale);
    }
}

/// The two columns' results of an accumulator of 8 lanes per column, each
/// summed as ggml's `hsum_float_8`.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsums(acc: __m512) -> [f32; 2] {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    [hsum(_mm512_castps512_ps256(acc)), hsum(high)]
}

/// ggml's `hsum_float_8`, in its order.
#[inline]
#[target_feature(enable = "avx")]
fn hsum(x: __m256) -> f32 {
    let mut res = _mm256_extractf128_ps::<1>(x);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// A block of 32 signed weights and an f16 scale, read by [`Signed`].
trait Unpack {
    const FORMAT: Format;
    /// The block's 32 weights as signed bytes, and its scale.
    ///
    /// # Safety
    /// The CPU has the kernels' features; `p` points at a block.
    unsafe fn unpack(p: *const u8) -> (__m256i, f32);
}

/// Q8_0: the scale, then 32 signed bytes.
struct Q8_0;
/// Q4_0: the scale, then 32 nibbles, each 8 above its weight.
struct Q4_0;
/// Q5_0: the scale, 32 high bits, then 32 nibbles; each weight's 5 bits
/// are 16 above it.
struct Q5_0;

impl Unpack for Q8_0 {
    const FORMAT: Format = Format::Q8_0;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: the caller's.
        unsafe { (_mm256_loadu_si256(p.add(2) as *const __m256i), f16_at(p)) }
    }
}

impl Unpack for Q4_0 {
    const FORMAT: Format = Format::Q4_0;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: the caller's.
        unsafe {
            let q = _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8));
            (q, f16_at(p))
        }
    }
}

impl Unpack for Q5_0 {
    const FORMAT: Format = Format::Q5_0;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: the caller's.
        unsafe {
            let high = (p.add(2) as *const u32).read_unaligned();
            // 0xF0 (-16 with the nibble) where the high bit is clear.
            let minus = _mm256_andnot_si256(_mm256_movm_epi8(high), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles(p.add(6)), minus), f16_at(p))
        }
    }
}

/// Blocks of 32 signed weights times Q8_0 inputs, as ggml's
/// `ggml_vec_dot_q8_0_q8_0`, `_q4_0_q8_0` and `_q5_0_q8_0`: per block the
/// exact integer dot product of each group of 4 in its lane, converted,
/// fused multiply-add with the product of the two scales. The integer
/// product is one VNNI instruction per row and column pair: the inputs
/// shifted into unsigned bytes (x + 128: Q8_0 inputs are never -128) times
/// the signed weights, summed onto -128 × the weights' sum of the lane.
struct Signed<U>(PhantomData<U>);

impl<U: Unpack> Block for Signed<U> {
    const FORMAT: Format = U::FORMAT;
    /// Per row and column pair, 8 lanes per column; nothing per pair.
    type Acc = __m512;
    type Extra = ();

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn step<const P: usize>(w: Rows, x: Pairs<P>, acc: &mut Accs<Self, P>) {
        // SAFETY: the caller's.
        unsafe {
            let zero = _mm512_setzero_si512();
            let offset = _mm512_set1_epi8(-128);
            let mut q = [zero; R];
            let mut minus_offset = [zero; R];
            let mut scale_w = [_mm512_setzero_ps(); R];
            for i in 0..R {
                let (bytes, d) = U::unpack(w[i]);
                // The block's 32 bytes in both halves (one per column).
                q[i] = _mm512_broadcast_i64x4(bytes);
                minus_offset[i] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, q[i]));
                scale_w[i] = _mm512_set1_ps(d);
            }
            for j in 0..P {
                let xq = _mm512_loadu_si512(x[j] as *const __m512i);
                let shifted = _mm512_xor_si512(xq, offset);
                let scale_x = _mm512_loadu_ps(x[j].add(64) as *const f32);
                for i in 0..R {
                    // Σ (x + 128) w - 128 Σ w: the exact sums of 4
                    // products of ggml's mul_sum_i8_pairs_float.
                    let dot = _mm512_dpbusd_epi32(minus_offset[i], shifted, q[i]);
                    let scale = _mm512_mul_ps(scale_w[i], scale_x);
                    acc.tile[i][j] =
                        _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc.tile[i][j]);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(acc: __m512, _: &(), _: usize) -> [f32; 2] {
        hsums(acc)
    }
}

/// Q4_1 times Q8_1, as ggml's `ggml_vec_dot_q4_1_q8_1`: the scale and the
/// minimum, then 32 nibbles; per block the exact integer dot product in 8
/// lanes, fused multiply-add with the product of the scales, and the
/// minimum times the input's sum added to a running sum apart.
struct Q4_1;

impl Block for Q4_1 {
    const FORMAT: Format = Format::Q4_1;
    /// The dot products' 8 lanes per column; per column pair, the sums of
    /// minimum × input sum of each row and column (lanes 2i and 2i + 1).
    type Acc = __m512;
    type Extra = __m256;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn step<const P: usize>(w: Rows, x: Pairs<P>, acc: &mut Accs<Self, P>) {
        // SAFETY: the caller's.
        unsafe {
            let zero = _mm512_setzero_si512();
            let mut q = [zero; R];
            let mut scale_w = [_mm512_setzero_ps(); R];
            let mut min_w = [0f32; R];
            for i in 0..R {
                q[i] = _mm512_broadcast_i64x4(nibbles(w[i].add(4)));
                scale_w[i] = _mm512_set1_ps(f16_at(w[i]));
                min_w[i] = f16_at(w[i].add(2));
            }
            // Each row's minimum twice, once per column of a pair.
            let [m0, m1, m2, m3] = min_w;
            let mins = _mm256_set_ps(m3, m3, m2, m2, m1, m1, m0, m0);
            for j in 0..P {
                let xq = _mm512_loadu_si512(x[j] as *const __m512i);
                let scale_x = _mm512_loadu_ps(x[j].add(64) as *const f32);
                // The pair's two sums, for every row.
                let sums = _mm256_castpd_ps(_mm256_broadcast_sd(&*(x[j].add(128) as *const f64)));
                // ggml's `summs += m * s`, contracted to one rounding.
                acc.pairs[j] = _mm256_fmadd_ps(mins, sums, acc.pairs[j]);
                for i in 0..R {
                    let dot = _mm512_dpbusd_epi32(zero, q[i], xq);
                    let scale = _mm512_mul_ps(scale_w[i], scale_x);
                    acc.tile[i][j] =
                        _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc.tile[i][j]);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(dots: __m512, mins: &__m256, row: usize) -> [f32; 2] {
        let [a, b] = hsums(dots);
        let mut m = [0f32; 8];
        // SAFETY: 8 lanes into 8 floats.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), *mins) };
        [a + m[2 * row], b + m[2 * row + 1]]
    }
}

/// Q4_K times Q8_K, as ggml's `ggml_vec_dot_q4_K_q8_K`: per block of 256
/// (scale, minimum, 8 × 6-bit scales and minimums, 256 nibbles) the exact
/// integer sum of each sub-block's dot products times its scale in 8 lanes,
/// fused multiply-add with the product of the scales; the minimums times
/// the input's sums of 32 in 4 lanes apart.
struct Q4K;

impl Block for Q4K {
    const FORMAT: Format = Format::Q4_K;
    /// 8 lanes per column, and the minimums' 4 lanes per column.
    type Acc = (__m512, __m256);
    type Extra = ();

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn step<const P: usize>(w: Rows, x: Pairs<P>, acc: &mut Accs<Self, P>) {
        // SAFETY: the caller's.
        unsafe {
            // Each row's 8 scales, then 8 minimums, as bytes (ggml's
            // unpacking of the 12 bytes of 6-bit values).
            let mut scales = [[0u8; 16]; R];
            let mut mins = [_mm256_setzero_si256(); R];
            let (mut d_w, mut dmin_w) = ([0f32; R], [0f32; R]);
            for i in 0..R {
                let mut u = [0u32; 4];
                std::ptr::copy_nonoverlapping(w[i].add(4), u.as_mut_ptr() as *mut u8, 12);
                const M1: u32 = 0x3f3f3f3f;
                const M2: u32 = 0x0f0f0f0f;
                const M3: u32 = 0x03030303;
                u[3] = ((u[2] >> 4) & M2) | (((u[1] >> 6) & M3) << 4);
                let low = u[1] & M1;
                u[1] = (u[2] & M2) | (((u[0] >> 6) & M3) << 4);
                u[2] = low;
                u[0] &= M1;
                let bytes = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
                _mm_storeu_si128(scales[i].as_mut_ptr() as *mut __m128i, bytes);
                mins[i] =
                    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_srli_si128::<8>(bytes)));
                (d_w[i], dmin_w[i]) = (f16_at(w[i]), f16_at(w[i].add(2)));
            }
            let zero = _mm512_setzero_si512();
            let low = _mm256_set1_epi8(0xF);
            let mut sums = [[zero; P]; R];
            for g in 0..8 {
                let xq: [__m512i; P] =
                    std::array::from_fn(|j| _mm512_loadu_si512(x[j].add(g * 64) as *const __m512i));
                for i in 0..R {
                    let bits = _mm256_loadu_si256(w[i].add(16 + g / 2 * 32) as *const __m256i);
                    let q = if g % 2 == 0 {
                        bits
                    } else {
                        _mm256_srli_epi16::<4>(bits)
                    };
                    let q = _mm512_broadcast_i64x4(_mm256_and_si256(q, low));
                    let scale = _mm512_set1_epi16(scales[i][g] as i16);
                    add_scaled(&mut sums[i], q, &xq, scale);
                }
            }
            for j in 0..P {
                let scale_x = _mm512_loadu_ps(x[j].add(512) as *const f32);
                let sums32 = _mm256_loadu_si256(x[j].add(640) as *const __m256i);
                let scale4_x = _mm256_loadu_ps(x[j].add(672) as *const f32);
                let minus_scale4_x = _mm256_xor_ps(scale4_x, _mm256_set1_ps(-0.0));
                for i in 0..R {
                    let (dots, mins_acc) = &mut acc.tile[i][j];
                    let d = _mm512_mul_ps(scale_x, _mm512_set1_ps(d_w[i]));
                    *dots = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sums[i][j]), *dots);
                    let dmin = _mm256_mul_ps(minus_scale4_x, _mm256_set1_ps(dmin_w[i]));
                    let prod = _mm256_madd_epi16(mins[i], sums32);
                    *mins_acc = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), *mins_acc);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish((dots, mins): Self::Acc, _: &(), _: usize) -> [f32; 2] {
        let [a, b] = hsums(dots);
        let sum4 = |m: __m128| {
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
        };
        [
            a + sum4(_mm256_castps256_ps128(mins)),
            b + sum4(_mm256_extractf128_ps::<1>(mins)),
        ]
    }
}

/// Q6_K times Q8_K, as ggml's `ggml_vec_dot_q6_K_q8_K`: per block of 256
/// (low nibbles, high 2-bit pairs, 16 signed scales, the scale) the exact
/// integer sum of each sub-block's dot products times its scale in 8 lanes,
/// less 32 × the scaled input sums, converted, fused multiply-add with the
/// product of the scales.
struct Q6K;

impl Block for Q6K {
    const FORMAT: Format = Format::Q6_K;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn step<const P: usize>(w: Rows, x: Pairs<P>, acc: &mut Accs<Self, P>) {
        // SAFETY: the caller's: 4 rows of blocks of 210 bytes, pairs of
        // packed Q8_K blocks.
        unsafe {
            let mut scales16 = [_mm512_setzero_si512(); R];
            let d_w: [f32; R] = std::array::from_fn(|i| f16_at(w[i].add(208)));
            for i in 0..R {
                let s = _mm_loadu_si128(w[i].add(192) as *const __m128i);
                scales16[i] = _mm512_broadcast_i64x4(_mm256_cvtepi8_epi16(s));
            }
            let zero = _mm512_setzero_si512();
            let low = _mm256_set1_epi8(0xF);
            // Lanes 0-7 and 16-23 pick scale 0, lanes 8-15 and 24-31 scale 1.
            let halves = _mm512_srli_epi16::<3>(_mm512_and_si512(
                _mm512_set_epi16(
                    31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
                    11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                ),
                _mm512_set1_epi16(8),
            ));
            let mut sums = [[zero; P]; R];
            for g in 0..8 {
                let (half, t) = (g / 4, g % 4);
                let pick = _mm512_add_epi16(halves, _mm512_set1_epi16(2 * g as i16));
                let xq: [__m512i; P] =
                    std::array::from_fn(|j| _mm512_loadu_si512(x[j].add(g * 64) as *const __m512i));
                for i in 0..R {
                    let ql = _mm256_loadu_si256(w[i].add(half * 64 + t % 2 * 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(w[i].add(128 + half * 32) as *const __m256i);
                    let (ql, qh) = match t {
                        0 => (
                            ql,
                            _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3))),
                        ),
                        1 => (
                            ql,
                            _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12))),
                        ),
                        2 => (
                            _mm256_srli_epi16::<4>(ql),
                            _mm256_and_si256(qh, _mm256_set1_epi8(48)),
                        ),
                        _ => (
                            _mm256_srli_epi16::<4>(ql),
                            _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(-64))),
                        ),
                    };
                    let q = _mm256_or_si256(_mm256_and_si256(ql, low), qh);
                    let q = _mm512_broadcast_i64x4(q);
                    // Scale 2g for the first 16 weights of the run, 2g + 1
                    // for the last 16, in each column's half.
                    add_scaled(
                        &mut sums[i],
                        q,
                        &xq,
                        _mm512_permutexvar_epi16(pick, scales16[i]),
                    );
                }
            }
            for j in 0..P {
                let scale_x = _mm512_loadu_ps(x[j].add(512) as *const f32);
                let sums16 = _mm512_loadu_si512(x[j].add(576) as *const __m512i);
                for i in 0..R {
                    let less = _mm512_slli_epi32::<5>(_mm512_madd_epi16(sums16, scales16[i]));
                    let sum = _mm512_sub_epi32(sums[i][j], less);
                    let d = _mm512_mul_ps(scale_x, _mm512_set1_ps(d_w[i]));
                    acc.tile[i][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc.tile[i][j]);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(acc: __m512, _: &(), _: usize) -> [f32; 2] {
        hsums(acc)
    }

    /// Per row and column pair, 8 lanes per column; nothing per pair.
    type Acc = __m512;
    type Extra = ();
}
