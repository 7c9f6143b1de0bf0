//! Prompt rows of q8 products in bf16 arithmetic: q8 weights × bf16 activations on
//! AVX-512 BF16 (`vdpbf16ps`).
//!
//! A prompt's products are bound by arithmetic, not memory. The int8 path
//! ([`crate::qmatmul`]) carries a q8 product's activations in two int8 terms (one term
//! alone costs q8 its 1e-2 logit budget), so each weight costs two `vpdpbusd`
//! multiply-adds, and its per-block float work and weight bias share the same pipes: on
//! Zen 4, where one `vpdpbusd` (64 multiply-adds) and one `vdpbf16ps` (32) issue per
//! cycle each, that tile reaches ~19 weight multiply-adds per cycle. Here the int8 weights
//! are widened once per tile to bf16, which holds every int8 value exactly, and the
//! activations are rounded to bf16 (8 significant bits with their own exponent, ~4× finer
//! than one int8 term of a 32-value block): one `vdpbf16ps` does 32 weight multiply-adds
//! and the block scale is one FMA per 16 of them.
//!
//! Which rows take this path is a property of the row, never of the batch: the backend
//! gives every row of a sequence computing a prompt chunk (more than one new token) to
//! this path and every decode row to the int8 one ([`crate::qmatmul::RowKinds`]), so a
//! request's logits do not depend on what else shares its step, as the attention's
//! expanded/absorbed split does not (`dsv2_engine::scheduler`).
//!
//! **Numerics:** for output `(i, r)`: `acc = 0`, then for each 32-value block `b` in
//! order, `s = 0`, `s = dp(s, x_kk, w_kk)` for the block's 16 pairs `kk` in order, and
//! `acc = fma(s, f32(dw_b), acc)`; where `x_kk` is the pair `(bf16(x[2kk]),
//! bf16(x[2kk+1]))` (rounded to nearest even, subnormals to 0), `w_kk` the pair of int8
//! weights as bf16 (exact), `dp` the instruction's step ([`crate::flash_bf16`], tested
//! against the instruction) and `dw_b` the f16 block scale widened exactly. The scalar
//! reference [`tile_reference`] and the AVX-512 BF16 kernel are tested bit for bit.
//! Where the CPU lacks AVX-512 BF16, prompt rows take f32 arithmetic on AVX2 CPUs without
//! an int8 dot product ([`crate::q8_f32`]) and the int8 path elsewhere (as with the bf16
//! attention and `lm_head`, the logits then depend on the CPU, never on the batch).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use dsv2_core::quant::{QuantFormat, BLOCK, TILE};
use half::{bf16, f16};

use crate::flash_bf16::{dp, pair, round};
use crate::kernels::SyncPtr;
use crate::qmatmul::QMatrix;
use crate::team;

/// Rows of one prompt a product must expect before they take this path: with fewer, the
/// widening of each weight tile costs more than the bf16 arithmetic saves and the int8
/// path is as fast (measured on 64 expert-sized matrices from memory, bf16 against two
/// int8 terms: 6 rows 0.5-0.75×, 12 rows 0.98-1.07×, 24 rows 1.12-1.24×, 48 rows
/// 1.16-1.23×; `prompt_speed`). A dense product expects a prompt's every token as a
/// row, a routed expert its share (`prompt_len · top_k / experts`).
pub(crate) const PROMPT_MIN_ROWS: u32 = 16;

/// Activation rows of a register tile.
const MR: usize = 6;
/// Weight tiles (of 16 rows) of a register tile.
const NC: usize = 2;
/// Pairs of one 32-value block.
const BLOCK_PAIRS: usize = BLOCK / 2;

/// Whether this CPU runs the bf16 arithmetic (AVX-512 F, BW and BF16; not disabled by
/// `DSV2_BF16_ATTENTION=0`, which turns off every bf16-arithmetic path).
pub(crate) fn available() -> bool {
    crate::flash_bf16::available()
}

/// Whether q8 prompt rows take this path: [`crate::flash_bf16::keeps_pace`] (AMD's
/// AVX-512 BF16), or AMX tiles to run it on ([`crate::amx::available`]). On Intel's
/// AVX-512 alone (one port for `vdpbf16ps`, two for `vpdpbusd`) the two int8 terms are
/// faster: a V2-Lite q8 prefill of 512 tokens on a 16-core Sapphire Rapids VM ran at
/// 173-182 tokens/s in bf16 and 260-272 in int8 terms; on its tiles, 343-499.
pub(crate) fn preferred() -> bool {
    crate::flash_bf16::keeps_pace() || crate::amx::available()
}

/// Activation rows rounded to bf16 in pairs: row `i` is `k/2` values, pair `kk` holding
/// `bf16(x[i, 2kk])` in its low half. Rows lie [`BfRows::stride`] values apart; where the
/// AMX tiles take them ([`crate::amx`]) the stride is 16 values (one cache line) longer
/// than a row, so that 16 rows of a wide matrix do not fall in one cache set, and the
/// buffer holds whole tiles of 16 rows (those past `m` are never read into an output).
#[derive(Default)]
pub(crate) struct BfRows {
    pairs: Vec<u32>,
    m: usize,
    k: usize,
    stride: usize,
}

impl BfRows {
    /// Rounds `x[m, k]` (`k` even) into these (reused) buffers, laid out for the AMX
    /// tiles where [`crate::amx::available`].
    pub(crate) fn round(&mut self, x: &[f32], m: usize, k: usize) {
        self.round_for(x, m, k, crate::amx::available())
    }

    /// [`BfRows::round`], laid out for the AMX tiles when `tiles`.
    pub(crate) fn round_for(&mut self, x: &[f32], m: usize, k: usize, tiles: bool) {
        assert!(k.is_multiple_of(2) && x.len() >= m * k, "x [{m}, {k}]");
        let kp = k / 2;
        let stride = if tiles { kp + 16 } else { kp };
        let alloc = if tiles { m.next_multiple_of(16) } else { m };
        if self.pairs.len() < alloc * stride {
            self.pairs.resize(alloc * stride, 0);
        }
        (self.m, self.k, self.stride) = (m, k, stride);
        let pairs = &mut self.pairs[..m * stride];
        let round = |x: &[f32], pairs: &mut [u32]| {
            #[cfg(target_arch = "x86_64")]
            if available() {
                // SAFETY: the features were detected; `pairs` holds `x.len() / 2` values.
                return unsafe { x86::round_rows(x, pairs) };
            }
            round_rows_reference(x, pairs)
        };
        if m * k >= 1 << 16 {
            // A prompt's rows, in parallel.
            team::for_each_chunk_mut(pairs, stride, |i, row| {
                round(&x[i * k..(i + 1) * k], &mut row[..kp])
            });
        } else if stride == kp {
            round(&x[..m * k], pairs);
        } else {
            for (i, row) in pairs.chunks_exact_mut(stride).enumerate() {
                round(&x[i * k..(i + 1) * k], &mut row[..kp]);
            }
        }
    }

    fn row(&self, i: usize) -> &[u32] {
        &self.pairs[i * self.stride..][..self.k / 2]
    }

    /// Rows rounded by the last [`BfRows::round`].
    pub(crate) fn m(&self) -> usize {
        self.m
    }

    /// Values of one row rounded by the last [`BfRows::round`] (twice its pairs).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// `u32` values from one row's start to the next's.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// Rows whose whole stride lies in the buffer: with the AMX layout, at least the
    /// rounded rows up to the next multiple of 16.
    pub(crate) fn readable_rows(&self) -> usize {
        self.pairs.len() / self.stride.max(1)
    }

    /// Row `i`'s first pair.
    pub(crate) fn row_ptr(&self, i: usize) -> *const u32 {
        assert!(i <= self.readable_rows());
        // SAFETY: within (or one past) the buffer, checked above.
        unsafe { self.pairs.as_ptr().add(i * self.stride) }
    }
}

/// [`BfRows::round`]'s rounding, one value at a time.
fn round_rows_reference(x: &[f32], pairs: &mut [u32]) {
    for (p, x) in pairs.iter_mut().zip(x.chunks_exact(2)) {
        *p = pair(round(x[0]), round(x[1]));
    }
}

/// `u32` values of a packed tile of `k` columns ([`pack_tile`]).
pub(crate) fn packed_len(k: usize) -> usize {
    k / 2 * TILE
}

/// Widens one q8 tile (16 rows of `k` int8 weights in the interleaved layout of
/// [`dsv2_core::quant`]) to bf16 pairs: `out[kk·16 + r] = (bf16(q[r, 2kk]),
/// bf16(q[r, 2kk + 1]))`, exact.
pub(crate) fn pack_tile(q: &[u8], k: usize, out: &mut [u32]) {
    assert!(k.is_multiple_of(BLOCK) && q.len() >= k * TILE && out.len() >= packed_len(k));
    pack_tile_units(&q[..k * TILE], out)
}

/// Widens whole units ([`pack_units_reference`]'s layout) at this CPU's speed.
fn pack_tile_units(q: &[u8], out: &mut [u32]) {
    let units = q.len() / 64;
    assert!(q.len().is_multiple_of(64) && out.len() >= 2 * TILE * units);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were detected; the lengths are checked above.
        return unsafe { x86::pack_units(q.as_ptr(), units, out.as_mut_ptr()) };
    }
    pack_units_reference(q, out)
}

/// [`pack_tile`], one value at a time (the tests' reference). In the stored layout, byte
/// `4r + j` of 64-byte unit `g` of block `b` is `q[r, 32b + 4g + j]`.
#[cfg(test)]
pub(crate) fn pack_tile_reference(q: &[u8], k: usize, out: &mut [u32]) {
    pack_units_reference(&q[..k * TILE], &mut out[..packed_len(k)]);
}

/// Widens consecutive 64-byte units of the stored layout (4 weights of 16 rows each), unit
/// `u` into `out[32u..32u + 32]`: a tile is `k/4` units, and the tiles of a pair are
/// contiguous both stored and packed, so any run of a pair's units packs on its own.
fn pack_units_reference(q: &[u8], out: &mut [u32]) {
    let widen = |v: u8| round(v as i8 as f32);
    for (unit, out) in q.chunks_exact(64).zip(out.chunks_exact_mut(2 * TILE)) {
        for h in 0..2 {
            for r in 0..TILE {
                let (lo, hi) = (unit[4 * r + 2 * h], unit[4 * r + 2 * h + 1]);
                out[h * TILE + r] = pair(widen(lo), widen(hi));
            }
        }
    }
}

/// Stored weight units a register tile widens while it computes ([`pack_units_reference`]'s
/// layout): `src` holds whole 64-byte units, `dst` room for 32 values per unit that no one
/// else touches while the tile runs. Empty for none.
#[derive(Clone, Copy)]
pub(crate) struct PackShare<'a> {
    pub src: &'a [u8],
    pub dst: *mut u32,
}

impl PackShare<'_> {
    /// No packing.
    pub(crate) const NONE: PackShare<'static> = PackShare {
        src: &[],
        dst: std::ptr::null_mut(),
    };

    fn units(&self) -> usize {
        self.src.len() / 64
    }
}

/// One register tile's operands: `rows` activation rows (at most 6) against `tiles`
/// packed weight tiles (1 or 2) and their block scales.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub x: &'a BfRows,
    pub row0: usize,
    pub rows: usize,
    /// Packed tiles ([`pack_tile`]), `tiles` of them.
    pub w: [&'a [u32]; NC],
    /// Each tile's scales, 16 per block (`s[b·16 + r]`).
    pub scales: [&'a [f16]; NC],
    pub tiles: usize,
    /// Weights to prefetch while this tile computes (the next tiles' bytes a later
    /// packing reads from memory), spread over its blocks; empty for none.
    pub prefetch: &'a [u8],
    /// Units of the next tiles this tile widens between its blocks (already fetched
    /// into cache by an earlier tile's `prefetch`), in the shadow of its multiply-adds:
    /// a 6 × 32 tile widening 2 units a block runs at 104 instead of 110 G multiply-adds/s
    /// (`prompt_speed`), and products of 12-48 rows are 1-2% faster than with the widening
    /// on its own between pairs.
    pub pack: PackShare<'a>,
}

/// Output floats of one register tile: `out[(i·2 + c)·16 + r]`.
pub(crate) const OUT_LEN: usize = MR * NC * TILE;

impl Tile<'_> {
    fn check(&self) {
        let (k, nb) = (self.x.k, self.x.k / BLOCK);
        assert!((1..=MR).contains(&self.rows) && (1..=NC).contains(&self.tiles));
        assert!(self.row0 + self.rows <= self.x.m);
        for c in 0..self.tiles {
            assert!(self.w[c].len() >= packed_len(k) && self.scales[c].len() >= nb * TILE);
        }
        assert!(self.pack.src.len().is_multiple_of(64));
        assert!(self.pack.src.is_empty() || !self.pack.dst.is_null());
    }
}

/// Computes one register tile into `out` (`out[(i·2 + c)·16 + r]` for activation row
/// `row0 + i` and row `r` of tile `c`).
pub(crate) fn tile(t: Tile<'_>, out: &mut [f32; OUT_LEN]) {
    assert!(
        t.pack.src.is_empty(),
        "a tile that packs runs through tile_to"
    );
    // SAFETY: `out` holds rows of NC·16 values for every row of the tile; no packing.
    unsafe { tile_to(t, out.as_mut_ptr(), NC * TILE) }
}

/// [`tile`] writing `dst[i·stride + c·16 + r]`, and packing `t.pack`.
///
/// # Safety
/// Those values of `dst` must be valid for writes and not accessed concurrently; so must
/// `t.pack.dst[..32 · units]`.
unsafe fn tile_to(t: Tile<'_>, dst: *mut f32, stride: usize) {
    t.check();
    #[cfg(target_arch = "x86_64")]
    if available() {
        macro_rules! arms {
            ($(($m:literal, $n:literal)),*) => {
                match (t.rows, t.tiles) {
                    // SAFETY: the features were detected; the shapes are checked above;
                    // `dst` is the caller's contract.
                    $(($m, $n) => unsafe { x86::kern512::<$m, $n>(&t, dst, stride) },)*
                    _ => unreachable!(),
                }
            };
        }
        return arms!(
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1),
            (5, 1),
            (6, 1),
            (1, 2),
            (2, 2),
            (3, 2),
            (4, 2),
            (5, 2),
            (6, 2)
        );
    }
    let mut out = [0.0f32; OUT_LEN];
    tile_reference(t, &mut out);
    if t.pack.units() > 0 {
        // SAFETY: the caller's contract (`check`: not null).
        let pack = unsafe { std::slice::from_raw_parts_mut(t.pack.dst, 2 * TILE * t.pack.units()) };
        pack_units_reference(t.pack.src, pack);
    }
    for i in 0..t.rows {
        for c in 0..t.tiles {
            let from = &out[(i * NC + c) * TILE..][..TILE];
            // SAFETY: the caller's contract.
            unsafe {
                std::ptr::copy_nonoverlapping(from.as_ptr(), dst.add(i * stride + c * TILE), TILE)
            };
        }
    }
}

/// [`tile`], one value at a time.
pub(crate) fn tile_reference(t: Tile<'_>, out: &mut [f32; OUT_LEN]) {
    t.check();
    let nb = t.x.k / BLOCK;
    for i in 0..t.rows {
        let x = t.x.row(t.row0 + i);
        for c in 0..t.tiles {
            for r in 0..TILE {
                let mut acc = 0.0f32;
                for b in 0..nb {
                    let pairs = b * BLOCK_PAIRS..(b + 1) * BLOCK_PAIRS;
                    let mut s = 0.0f32;
                    for (&xp, kk) in x[pairs.clone()].iter().zip(pairs) {
                        s = dp(s, xp, t.w[c][kk * TILE + r]);
                    }
                    acc = s.mul_add(t.scales[c][b * TILE + r].to_f32(), acc);
                }
                out[(i * NC + c) * TILE + r] = acc;
            }
        }
    }
}

thread_local! {
    /// The calling thread's activations in bf16 (reused across calls).
    static ROWS: RefCell<BfRows> = RefCell::new(BfRows::default());
    /// The calling thread's packed weight tiles (reused across calls).
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = x[m, k] · wᵀ` for a q8 `w` in this module's arithmetic, all rows as prompt
/// rows. Parallel over pairs of weight tiles: each pair is widened once, by the thread
/// that claims it, and every activation row runs against it.
///
/// # Panics
/// If `w` is not q8 or the shapes disagree.
pub(crate) fn matmul(x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]) {
    with_rows(x, m, w.cols, |rows| matmul_rows(rows, Weights::Q8(w), y))
}

/// `y[m, n] = bf16(x)[m, k] · w[n, k]ᵀ` for bf16 weights `w` (row-major) on this module's
/// register tiles, the block scale 1: a prompt's `kv_b_proj` expansion of its context,
/// which the decode-shaped [`crate::bf16dot`] ran at ~60% of this rate. Each task packs
/// its 16-row tiles into pairs once (one gather a pair of columns) and runs every row
/// against them; per output the arithmetic is fixed, as for q8 weights.
///
/// # Panics
/// If [`available`] is false, `k` is not a multiple of 32 or above [`BF16_MAX_COLS`], or
/// a slice is short.
pub(crate) fn matmul_bf16(x: &[f32], m: usize, w: &[bf16], n: usize, y: &mut [f32]) {
    assert!(available(), "AVX-512 BF16 is not available or turned off");
    let k = w.len().checked_div(n).unwrap_or(0);
    assert!(
        k <= BF16_MAX_COLS && w.len() == n * k && x.len() >= m * k,
        "matmul_bf16 shapes"
    );
    with_rows(x, m, k, |rows| matmul_rows(rows, Weights::Bf16 { w, n }, y))
}

/// Widest bf16 weight rows [`matmul_bf16`] takes (the unit scales it reads are a static
/// table of this many columns' blocks).
pub(crate) const BF16_MAX_COLS: usize = 4096;

/// Unit block scales of bf16 weights: 16 rows × the blocks of [`BF16_MAX_COLS`].
static UNIT_SCALES: [f16; TILE * BF16_MAX_COLS / BLOCK] = [f16::ONE; TILE * BF16_MAX_COLS / BLOCK];

/// A product's weights as the register tiles take them.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// q8 tiles in the stored layout.
    Q8(QMatrix<'a>),
    /// bf16 rows `[n, k]`, a block scale of 1.
    Bf16 { w: &'a [bf16], n: usize },
}

/// Packs rows `16t..16t + 16` of bf16 `w` (`[n, k]`, rows past `n` as zeros) into pairs:
/// `out[kk·16 + r] = (w[16t + r, 2kk], w[16t + r, 2kk + 1])`.
fn pack_bf16_tile(w: &[bf16], n: usize, k: usize, t: usize, out: &mut [u32]) {
    assert!(k.is_multiple_of(2) && w.len() >= n * k && out.len() >= packed_len(k));
    #[cfg(target_arch = "x86_64")]
    if available() && (t + 1) * TILE <= n {
        // SAFETY: the features were detected; rows 16t..16t + 16 lie in `w`, `out` holds
        // k/2 · 16 values (checked above).
        return unsafe { x86::pack_bf16(w[t * TILE * k..].as_ptr(), k, out.as_mut_ptr()) };
    }
    pack_bf16_tile_reference(w, n, k, t, out)
}

/// [`pack_bf16_tile`], one value at a time.
fn pack_bf16_tile_reference(w: &[bf16], n: usize, k: usize, t: usize, out: &mut [u32]) {
    for r in 0..TILE {
        let row = t * TILE + r;
        for kk in 0..k / 2 {
            out[kk * TILE + r] = if row < n {
                let (lo, hi) = (w[row * k + 2 * kk], w[row * k + 2 * kk + 1]);
                lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
            } else {
                0
            };
        }
    }
}

/// [`matmul`] of two matrices of the same width (a prompt's gate and up projections, or
/// query and latent ones), with `x` rounded once; bit-identical to two calls.
pub(crate) fn matmul_pair(
    x: &[f32],
    m: usize,
    a: QMatrix<'_>,
    ya: &mut [f32],
    b: QMatrix<'_>,
    yb: &mut [f32],
) {
    assert_eq!(a.cols, b.cols, "matmul_pair widths");
    with_rows(x, m, a.cols, |rows| {
        let products = [
            Product::new(rows, Weights::Q8(a), ya),
            Product::new(rows, Weights::Q8(b), yb),
        ];
        matmul_rows_of(rows, products)
    })
}

/// Runs `f` on `x` (`m` rows of `k`) rounded into this thread's buffers (fresh ones when
/// those are borrowed already).
fn with_rows<R>(x: &[f32], m: usize, k: usize, f: impl FnOnce(&BfRows) -> R) -> R {
    crate::scratch::with_local(&ROWS, |rows| {
        rows.round(x, m, k);
        f(rows)
    })
}

fn matmul_rows(x: &BfRows, weights: Weights<'_>, y: &mut [f32]) {
    matmul_rows_of(x, [Product::new(x, weights, y)])
}

/// One product of [`matmul_rows_of`]: its weights, their padded last tile, its output.
struct Product<'a> {
    weights: Weights<'a>,
    /// Output rows (weight rows) and tiles of 16 of them.
    n: usize,
    tiles: usize,
    /// The ragged last tile of q8 weights copied into a full one.
    pad: Option<(Vec<u8>, Vec<f16>)>,
    /// `y` (`[m, n]`), written by the tasks at disjoint columns.
    y: SyncPtr,
}

impl<'a> Product<'a> {
    /// The product of `x` by `weights` into `y`.
    ///
    /// # Panics
    /// If the shapes disagree, or q8 weights are not q8.
    fn new(x: &BfRows, weights: Weights<'a>, y: &'a mut [f32]) -> Product<'a> {
        let (m, k) = (x.m, x.k);
        let n = match weights {
            Weights::Q8(w) => {
                assert_eq!(
                    w.format,
                    QuantFormat::Q8,
                    "bf16 prompt rows need q8 weights"
                );
                assert_eq!(w.cols, k, "matmul shapes");
                w.rows
            }
            Weights::Bf16 { n, .. } => n,
        };
        assert!(k.is_multiple_of(BLOCK) && y.len() >= m * n, "matmul shapes");
        let tiles = n.div_ceil(TILE);
        let pad = match weights {
            Weights::Q8(w) if !n.is_multiple_of(TILE) && m > 0 => {
                Some(crate::qmatmul::padded_tile(&w, tiles - 1))
            }
            _ => None,
        };
        Product {
            weights,
            n,
            tiles,
            pad,
            y: SyncPtr(y.as_mut_ptr()),
        }
    }

    fn pairs(&self) -> usize {
        self.tiles.div_ceil(NC)
    }

    /// Tile t's block scales (1 for bf16 weights).
    fn scales_of(&self, t: usize, nb: usize) -> &[f16] {
        match (self.weights, &self.pad) {
            (Weights::Q8(_), Some((_, s))) if (t + 1) * TILE > self.n => s,
            (Weights::Q8(w), _) => &w.scales[t * TILE * nb..][..TILE * nb],
            (Weights::Bf16 { .. }, _) => &UNIT_SCALES[..TILE * nb],
        }
    }

    /// Tile t widened into `out`.
    fn pack(&self, t: usize, k: usize, out: &mut [u32]) {
        match (self.weights, &self.pad) {
            (Weights::Q8(_), Some((q, _))) if (t + 1) * TILE > self.n => pack_tile(q, k, out),
            (Weights::Q8(w), _) => pack_tile(&w.q[t * TILE * k..][..TILE * k], k, out),
            (Weights::Bf16 { w, n }, _) => pack_bf16_tile(w, n, k, t, out),
        }
    }

    /// Pair p's weights as stored, to fetch and widen ahead: those of full q8 pairs (none
    /// into a padded copy, nor for bf16 weights: packed between pairs).
    fn stored_pair(&self, p: usize, k: usize) -> &[u8] {
        match self.weights {
            Weights::Q8(w) if (p + 1) * NC * TILE <= self.n => {
                &w.q[p * NC * TILE * k..][..NC * TILE * k]
            }
            _ => &[],
        }
    }
}

/// Products of the same rows `x` by several matrices in one parallel loop over their
/// tile pairs (product 0's pairs, then product 1's, ...): one loop's start and tail for a
/// prompt's gate and up projections instead of two, and the first pair of each product
/// after the first widened ahead like any other. Per output the arithmetic is
/// [`matmul`]'s.
fn matmul_rows_of<const P: usize>(x: &BfRows, products: [Product<'_>; P]) {
    let k = x.k;
    let nb = k / BLOCK;
    // Product j's pairs are global pairs first[j]..first[j + 1].
    let mut first = [0usize; P];
    let mut total = 0;
    for (f, product) in first.iter_mut().zip(&products) {
        *f = total;
        total += product.pairs();
    }
    if x.m == 0 || total == 0 {
        return;
    }
    let locate = |g: usize| {
        let j = first.partition_point(|&f| f <= g) - 1;
        (&products[j], g - first[j])
    };
    let len = packed_len(k);
    let threads = team::threads();
    #[cfg(target_arch = "x86_64")]
    if crate::amx::available() {
        // On the AMX tiles: each task claims one pair at a time, widens it, claims the
        // next and runs every row tile against its pair while the next pair's weights
        // are fetched. (Chunks of 2-8 pairs, each row tile run against all of them while
        // in cache, were slower on a 16-core Sapphire Rapids: q8 prefill of 512 tokens
        // 398-408 tokens/s against 481-499, alternating.)
        let next_pair = AtomicUsize::new(0);
        let claim = || Some(next_pair.fetch_add(1, Ordering::Relaxed)).filter(|&g| g < total);
        team::for_each(threads, |_| {
            crate::scratch::with_local(&PACKED, |packed| {
                if packed.len() < NC * len {
                    packed.resize(NC * len, 0);
                }
                let mut next = claim();
                while let Some(g) = next {
                    let (product, p) = locate(g);
                    let t0 = p * NC;
                    let nt = NC.min(product.tiles - t0);
                    let (a, b) = packed[..NC * len].split_at_mut(len);
                    product.pack(t0, k, a);
                    if nt > 1 {
                        product.pack(t0 + 1, k, b);
                    }
                    next = claim();
                    let prefetch = next.map_or(&[][..], |g| {
                        let (product, p) = locate(g);
                        product.stored_pair(p, k)
                    });
                    let job = crate::amx::PairJob {
                        w: [a, b],
                        scales: [
                            product.scales_of(t0, nb),
                            product.scales_of(t0 + nt - 1, nb),
                        ],
                        nt,
                        t0,
                        y: product.y,
                        n: product.n,
                    };
                    // SAFETY: the tiles are available and `x` rounded for them; tasks
                    // write disjoint columns of `y`.
                    unsafe { crate::amx::pair(&mut crate::amx::Amx, x, &job, prefetch) };
                }
            })
        });
        return;
    }
    let chunks = GuidedChunks::new(total, threads);
    // One task per thread, each claiming chunks of pairs until none is left; it claims
    // its next chunk as it starts its chunk's last pair, so that pair's row tiles widen
    // the next chunk's first pair too.
    team::for_each(threads, |_| {
        crate::scratch::with_local(&PACKED, |packed| {
            if packed.len() < 2 * NC * len {
                packed.resize(2 * NC * len, 0);
            }
            // The pair computing, and the next one, which its row tiles widen.
            let (mut current, mut following) = packed[..2 * NC * len].split_at_mut(NC * len);
            let mut packed_ahead = false;
            let mut chunk = chunks.claim();
            while let Some(pairs_of_chunk) = chunk.take() {
                for g in pairs_of_chunk.clone() {
                    let (product, p) = locate(g);
                    let t0 = p * NC;
                    let nt = NC.min(product.tiles - t0);
                    if !packed_ahead {
                        let (a, b) = current.split_at_mut(len);
                        product.pack(t0, k, a);
                        if nt > 1 {
                            product.pack(t0 + 1, k, b);
                        }
                    }
                    let next_pair = if g + 1 < pairs_of_chunk.end {
                        Some(g + 1)
                    } else {
                        chunk = chunks.claim();
                        chunk.as_ref().map(|c| c.start)
                    };
                    // The next pair's weights (contiguous in the stored layout), fetched
                    // and widened over this pair's row tiles; none over a ragged last
                    // pair (its tiles write through a copy that does not pack).
                    let full = (t0 + nt) * TILE <= product.n;
                    let next = match next_pair {
                        Some(g) if full => {
                            let (product, p) = locate(g);
                            product.stored_pair(p, k)
                        }
                        _ => &[][..],
                    };
                    let scales = [
                        product.scales_of(t0, nb),
                        product.scales_of(t0 + nt - 1, nb),
                    ];
                    let (a, b) = current.split_at(len);
                    // SAFETY: `following` holds NC·len values, 32 per unit of `next`, and
                    // is this task's alone.
                    unsafe {
                        run_pair(
                            x,
                            [a, b],
                            scales,
                            nt,
                            t0,
                            next,
                            following.as_mut_ptr(),
                            product.y,
                            product.n,
                        )
                    };
                    packed_ahead = !next.is_empty();
                    std::mem::swap(&mut current, &mut following);
                }
            }
        })
    });
}

/// Most tile pairs of one chunk.
const PAIRS_PER_CHUNK: usize = 8;

/// Consecutive tile pairs handed out in chunks that shrink as the work runs out
/// ("guided" scheduling: a share of what is left, at most [`PAIRS_PER_CHUNK`]), so the
/// threads finish together; within a chunk each pair's weights are fetched from memory
/// while the one before computes.
struct GuidedChunks {
    next: AtomicUsize,
    pairs: usize,
    threads: usize,
}

impl GuidedChunks {
    fn new(pairs: usize, threads: usize) -> GuidedChunks {
        GuidedChunks {
            next: AtomicUsize::new(0),
            pairs,
            threads: threads.max(1),
        }
    }

    /// The next chunk, or `None` when every pair is handed out.
    fn claim(&self) -> Option<std::ops::Range<usize>> {
        let mut start = self.next.load(Ordering::Relaxed);
        loop {
            let left = self.pairs.checked_sub(start).filter(|&l| l > 0)?;
            let size = left.div_ceil(2 * self.threads).clamp(1, PAIRS_PER_CHUNK);
            match self.next.compare_exchange_weak(
                start,
                start + size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(start..start + size),
                Err(now) => start = now,
            }
        }
    }
}

/// Every activation row against one packed pair of tiles (`nt` of them, from tile
/// `t0`), into `y` (`[m, n]`). Meanwhile the next pair's stored weights `next` are
/// fetched and widened into `next_packed`: row tile `i` prefetches share `i` and widens
/// share `i - 1` (in cache by then), the last share is widened at the end.
///
/// # Safety
/// `next_packed[..32 · next.len() / 64]` valid for writes and not accessed concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn run_pair(
    x: &BfRows,
    w: [&[u32]; NC],
    scales: [&[f16]; NC],
    nt: usize,
    t0: usize,
    next: &[u8],
    next_packed: *mut u32,
    y_ptr: SyncPtr,
    n: usize,
) {
    let m = x.m;
    let row_tiles = m.div_ceil(MR);
    let share = next.len().div_ceil(row_tiles).next_multiple_of(64);
    let share_of = |i: usize| {
        let from = (i * share).min(next.len());
        &next[from..(from + share).min(next.len())]
    };
    let pack_of = |i: usize| {
        let src = share_of(i);
        if src.is_empty() {
            return PackShare::NONE;
        }
        PackShare {
            src,
            // SAFETY: unit i·share/64 of the next pair, within `next_packed` (the
            // caller's contract) as `src` is within `next`.
            dst: unsafe { next_packed.add(i * share / 64 * 2 * TILE) },
        }
    };
    // Full tiles write their outputs in place; a ragged last one goes through
    // `out` (its caller packs no next pair over it).
    let in_place = (t0 + nt) * TILE <= n;
    let mut out = [0.0f32; OUT_LEN];
    for i in 0..row_tiles {
        let i0 = i * MR;
        let rows = MR.min(m - i0);
        let t = Tile {
            x,
            row0: i0,
            rows,
            w,
            scales,
            tiles: nt,
            prefetch: share_of(i),
            pack: if i > 0 {
                pack_of(i - 1)
            } else {
                PackShare::NONE
            },
        };
        if in_place {
            // SAFETY: rows i0.., columns of tiles t0..t0 + nt of `y` ([m, n]):
            // tasks write disjoint columns; the packing is the caller's contract.
            unsafe { tile_to(t, y_ptr.get().add(i0 * n + t0 * TILE), n) };
        } else {
            tile(t, &mut out);
            for i in 0..rows {
                for c in 0..nt {
                    let r0 = (t0 + c) * TILE;
                    let width = TILE.min(n - r0);
                    // SAFETY: row i0 + i, columns r0..r0 + width of `y`, as above.
                    unsafe {
                        let dst = y_ptr.get().add((i0 + i) * n + r0);
                        std::ptr::copy_nonoverlapping(
                            out[(i * NC + c) * TILE..].as_ptr(),
                            dst,
                            width,
                        );
                    }
                }
            }
        }
    }
    let last = pack_of(row_tiles - 1);
    if !last.src.is_empty() {
        // SAFETY: the caller's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(last.dst, 2 * TILE * last.units()) };
        pack_tile_units(last.src, dst);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, BLOCK_PAIRS};
    use crate::flash_bf16::x86::{bh, bits};
    use dsv2_core::quant::TILE;
    use std::arch::x86_64::*;

    /// [`super::BfRows::round`]: 32 values per `vcvtne2ps2bf16` (consecutive values are
    /// the low and high halves of a pair); a tail one value at a time.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `pairs` holds `x.len() / 2` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_rows(x: &[f32], pairs: &mut [u32]) {
        let full = x.len() / 32;
        for c in 0..full {
            // SAFETY: values 32c..32c + 32 of `x`, pairs 16c..16c + 16 of `pairs`.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr().add(32 * c));
                let hi = _mm512_loadu_ps(x.as_ptr().add(32 * c + 16));
                let v = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(pairs.as_mut_ptr().add(16 * c) as *mut _, bits(v));
            }
        }
        super::round_rows_reference(&x[32 * full..], &mut pairs[16 * full..]);
    }

    /// [`super::pack_tile_units`]: each 64-byte unit (4 consecutive weights of 16 rows)
    /// becomes two vectors of pairs ([`pack_unit`]).
    ///
    /// # Safety
    /// AVX-512 F/BW; `q` holds `units` units, `out` `32 · units` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_units(q: *const u8, units: usize, out: *mut u32) {
        for u in 0..units {
            // SAFETY: unit u of the tile; pairs 2u, 2u + 1 of `out`.
            unsafe { pack_unit(q.add(64 * u), out.add(32 * u)) }
        }
    }

    /// One 64-byte unit (4 consecutive weights of 16 rows) into 32 pairs, exactly:
    /// each int8 `q`, biased to `u = q ^ 0x80` (`q + 128`), is masked in place into the
    /// mantissa of a float whose last place there is 1 (2^23 for a lane's byte 0, 2^15
    /// for its byte 1; bytes 2 and 3 shifted down first), one `vpternlogd` for the mask,
    /// bias and exponent together, and the float minus its exponent and bias is `q`, whose
    /// bf16 is the top half. 13 vector operations, 3 of them shifts; 0.03 ns a weight
    /// on one core against 0.05 for sign-extending shifts and `vcvtdq2ps` (15, 9 shifts).
    ///
    /// # Safety
    /// AVX-512 F; `q[..64]` readable, `out[..32]` writable.
    #[inline(always)]
    unsafe fn pack_unit(q: *const u8, out: *mut u32) {
        // (x & mask) ^ magic, as `vpternlogd`'s truth table: A = 0xF0, B = 0xCC, C = 0xAA.
        const AND_XOR: i32 = 0x6A;
        // The masked byte as mantissa bits under `magic` (exponent and bias), less the
        // float `base` (the exponent's value plus 128): the byte's int8 value.
        let widen = |x: __m512i, mask: i32, magic: i32, base: f32| {
            let f = _mm512_ternarylogic_epi32::<AND_XOR>(
                x,
                _mm512_set1_epi32(mask),
                _mm512_set1_epi32(magic),
            );
            _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(f), _mm512_set1_ps(base)))
        };
        let low = |x| widen(x, 0xFF, 0x4B00_0080, 8_388_608.0 + 128.0);
        let high = |x| widen(x, 0xFF00, 0x4700_8000, 32_768.0 + 128.0);
        // SAFETY: the caller's contract.
        unsafe {
            let v = _mm512_loadu_si512(q as *const _);
            let v2 = _mm512_srli_epi32(v, 16);
            // The low halves of f1, f3 are 0: a value's bf16 is its top half.
            _mm512_storeu_si512(
                out as *mut _,
                _mm512_or_si512(high(v), _mm512_srli_epi32(low(v), 16)),
            );
            _mm512_storeu_si512(
                out.add(16) as *mut _,
                _mm512_or_si512(high(v2), _mm512_srli_epi32(low(v2), 16)),
            );
        }
    }

    /// [`super::pack_bf16_tile`] of a full tile: column pair `kk` of the 16 rows is one
    /// gather of a 32-bit lane per row.
    ///
    /// # Safety
    /// AVX-512 F; `w[..16·k]` readable (16 rows of `k`, `k` even), `out[..k/2·16]`
    /// writable.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_bf16(w: *const half::bf16, k: usize, out: *mut u32) {
        let stride = (k / 2) as i32;
        let index = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride),
        );
        let base = w as *const u32;
        for kk in 0..k / 2 {
            // SAFETY: lane r reads pair kk of row r, within the 16 rows; `out` the
            // caller's contract.
            unsafe {
                let v = _mm512_i32gather_epi32::<4>(index, base.add(kk) as *const _);
                _mm512_storeu_si512(out.add(kk * TILE) as *mut _, v);
            }
        }
    }

    /// [`super::tile`]'s `M × N` register tile.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `t` checked ([`Tile::check`]), `t.rows == M`, `t.tiles == N`;
    /// `dst[i·stride + c·16 ..+ 16]` valid for writes for `i < M`, `c < N`; so is
    /// `t.pack.dst[..32 · units]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn kern512<const M: usize, const N: usize>(
        t: &Tile<'_>,
        dst: *mut f32,
        stride: usize,
    ) {
        let nb = t.x.k / dsv2_core::quant::BLOCK;
        let x: [*const u32; M] = std::array::from_fn(|i| t.x.row(t.row0 + i).as_ptr());
        let w: [*const u32; N] = std::array::from_fn(|c| t.w[c].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        // Prefetch lines and packed units per block.
        let lines = t.prefetch.len().div_ceil(64);
        let per_block = lines.div_ceil(nb);
        let units = t.pack.src.len() / 64;
        let units_per_block = units.div_ceil(nb);
        for b in 0..nb {
            for l in b * per_block..((b + 1) * per_block).min(lines) {
                // SAFETY: a prefetch of any address is harmless (this one is in the slice).
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(t.prefetch.as_ptr().add(64 * l) as *const i8)
                };
            }
            for u in b * units_per_block..((b + 1) * units_per_block).min(units) {
                // SAFETY: unit u of `t.pack.src`; `dst` the caller's contract.
                unsafe { pack_unit(t.pack.src.as_ptr().add(64 * u), t.pack.dst.add(32 * u)) };
            }
            let mut s = [[_mm512_setzero_ps(); N]; M];
            for kk in b * BLOCK_PAIRS..(b + 1) * BLOCK_PAIRS {
                // SAFETY (loads): pair kk < k/2 of each row and each packed tile.
                unsafe {
                    let wv: [__m512bh; N] = std::array::from_fn(|c| {
                        bh(_mm512_loadu_si512(w[c].add(kk * TILE) as *const _))
                    });
                    for i in 0..M {
                        let xv = bh(_mm512_set1_epi32(*x[i].add(kk) as i32));
                        for c in 0..N {
                            s[i][c] = _mm512_dpbf16_ps(s[i][c], xv, wv[c]);
                        }
                    }
                }
            }
            for c in 0..N {
                // SAFETY: the 16 scales of block b.
                let dw = unsafe {
                    _mm512_cvtph_ps(_mm256_loadu_si256(
                        t.scales[c].as_ptr().add(b * TILE) as *const _
                    ))
                };
                for i in 0..M {
                    acc[i][c] = _mm512_fmadd_ps(s[i][c], dw, acc[i][c]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: the caller's contract.
                unsafe { _mm512_storeu_ps(dst.add(i * stride + c * TILE), *v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bits, test_values};
    use dsv2_core::quant::{dequantize_row, quantize_rows};

    /// A q8 matrix of random weights: its planes.
    struct Q8 {
        rows: usize,
        cols: usize,
        q: Vec<u8>,
        scales: Vec<f16>,
    }

    impl Q8 {
        fn view(&self) -> QMatrix<'_> {
            QMatrix {
                format: QuantFormat::Q8,
                rows: self.rows,
                cols: self.cols,
                q: &self.q,
                scales: &self.scales,
                terms: 2,
            }
        }
    }

    fn q8(rows: usize, cols: usize, seed: u64) -> Q8 {
        let w = test_values(rows * cols, seed);
        let mut q = vec![0u8; rows * cols];
        let mut scales = vec![f16::ZERO; rows * cols / BLOCK];
        quantize_rows(QuantFormat::Q8, &w, cols, &mut q, &mut scales);
        Q8 {
            rows,
            cols,
            q,
            scales,
        }
    }

    #[test]
    fn packing_widens_every_weight_exactly() {
        let q = q8(16, 96, 1);
        let m = q.view();
        let mut fast = vec![0u32; packed_len(96)];
        let mut slow = vec![1u32; packed_len(96)];
        pack_tile(m.q, 96, &mut fast);
        pack_tile_reference(m.q, 96, &mut slow);
        assert_eq!(fast, slow);
        // Every byte value in every position of a unit.
        let every: Vec<u8> = (0..16 * 64).map(|i| (i * 7 + i / 256) as u8).collect();
        let (mut fast, mut slow) = (vec![0u32; packed_len(64)], vec![1u32; packed_len(64)]);
        pack_tile(&every, 64, &mut fast);
        pack_tile_reference(&every, 64, &mut slow);
        assert_eq!(fast, slow);
        // Every int8 value, through the reference's widening.
        for v in i8::MIN..=i8::MAX {
            let f = f32::from_bits((round(v as f32) as u32) << 16);
            assert_eq!(f, v as f32);
        }
    }

    #[test]
    fn rounding_rows_matches_the_scalar_rounding() {
        let mut x = test_values(3 * 70, 2);
        x[5] = 1e-40; // subnormal: to 0
        x[6] = -1e-41;
        x[7] = 1.0 + f32::EPSILON * 64.0; // a tie in bf16
        let mut fast = BfRows::default();
        fast.round(&x, 3, 70);
        let mut slow = vec![0u32; 3 * 35];
        round_rows_reference(&x, &mut slow);
        for i in 0..3 {
            assert_eq!(fast.row(i), &slow[i * 35..][..35]);
        }
    }

    /// The kernel against the scalar reference, bit for bit, on every tile shape, and the
    /// whole product against f64 sums of the same bf16 operands.
    #[test]
    fn matches_the_reference_bit_for_bit() {
        let (n, k) = (40, 160);
        let q = q8(n, k, 3);
        let w = q.view();
        let x = test_values(9 * k, 4);
        let mut rows = BfRows::default();
        rows.round(&x, 9, k);
        let pad = crate::qmatmul::padded_tile(&w, 2);
        let mut packs = Vec::new();
        for t in 0..3 {
            let mut p = vec![0u32; packed_len(k)];
            let src = if t == 2 {
                &pad.0[..]
            } else {
                &w.q[t * TILE * k..][..TILE * k]
            };
            pack_tile_reference(src, k, &mut p);
            packs.push(p);
        }
        let nb = k / BLOCK;
        let scales = |t: usize| -> &[f16] {
            if t == 2 {
                &pad.1
            } else {
                &w.scales[t * TILE * nb..][..TILE * nb]
            }
        };
        for rows_in in 1..=MR {
            for tiles in 1..=NC {
                for t0 in [0, 1] {
                    let t1 = t0 + tiles - 1;
                    let tile_args = Tile {
                        x: &rows,
                        row0: 9 - rows_in,
                        rows: rows_in,
                        w: [&packs[t0], &packs[t1]],
                        scales: [scales(t0), scales(t1)],
                        tiles,
                        prefetch: &w.q[..64 * rows_in],
                        pack: PackShare::NONE,
                    };
                    let (mut fast, mut slow) = ([0.0f32; OUT_LEN], [0.0f32; OUT_LEN]);
                    tile(tile_args, &mut fast);
                    tile_reference(tile_args, &mut slow);
                    assert_eq!(fast.map(f32::to_bits), slow.map(f32::to_bits));
                }
            }
        }
        let mut y = vec![0.0f32; 9 * n];
        matmul(&x, 9, w, &mut y);
        let mut deq = vec![0.0f32; n * k];
        for (r, row) in deq.chunks_exact_mut(k).enumerate() {
            dequantize_row(QuantFormat::Q8, n, k, &q.q, &q.scales, r, row);
        }
        assert_near_f64_sums(&x, 9, k, n, |r, j| deq[r * k + j] as f64, &y);
    }

    /// `y[m, n]` within 1e-5 of f64 sums of bf16(x) times `w(r, j)`.
    fn assert_near_f64_sums(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: impl Fn(usize, usize) -> f64,
        y: &[f32],
    ) {
        for i in 0..m {
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|j| {
                        let xb = f32::from_bits((round(x[i * k + j]) as u32) << 16);
                        xb as f64 * w(r, j)
                    })
                    .sum();
                let got = y[i * n + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "n={n} {i},{r}: {got} vs {want}"
                );
            }
        }
    }

    /// Whole products, whose tasks widen each next pair of tiles while the pair before
    /// computes (in shares of its row tiles, across chunks), against the scalar reference
    /// tile by tile, bit for bit.
    #[test]
    fn products_equal_the_reference_tile_by_tile() {
        let k = 160;
        for (m, n) in [(1, 64), (7, 100), (20, 200), (61, 96), (13, 512)] {
            let q = q8(n, k, 20 + n as u64);
            let w = q.view();
            let x = test_values(m * k, 21 + m as u64);
            let mut rows = BfRows::default();
            rows.round(&x, m, k);
            let mut y = vec![0.0f32; m * n];
            matmul(&x, m, w, &mut y);
            let nb = k / BLOCK;
            let tiles = n.div_ceil(TILE);
            let pad = crate::qmatmul::padded_tile(&w, tiles - 1);
            for t in 0..tiles {
                let (src, scales) = if (t + 1) * TILE > n {
                    (&pad.0[..], &pad.1[..])
                } else {
                    (
                        &w.q[t * TILE * k..][..TILE * k],
                        &w.scales[t * TILE * nb..][..TILE * nb],
                    )
                };
                let mut packed = vec![0u32; packed_len(k)];
                pack_tile_reference(src, k, &mut packed);
                for i in 0..m {
                    let t_args = Tile {
                        x: &rows,
                        row0: i,
                        rows: 1,
                        w: [&packed, &packed],
                        scales: [scales, scales],
                        tiles: 1,
                        prefetch: &[],
                        pack: PackShare::NONE,
                    };
                    let mut out = [0.0f32; OUT_LEN];
                    tile_reference(t_args, &mut out);
                    // The AMX tiles' block sums round a few last places differently
                    // from `vdpbf16ps`'s chain (`amx::tests`): within 1e-6 of the
                    // tile's largest output there, bit for bit elsewhere.
                    let top = out[..TILE].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    for r in 0..TILE.min(n - t * TILE) {
                        let (got, want) = (y[i * n + t * TILE + r], out[r]);
                        if crate::amx::available() {
                            assert!(
                                (got - want).abs() <= 1e-6 * top,
                                "m={m} n={n}: row {i}, column {}: {got} {want}",
                                t * TILE + r
                            );
                        } else {
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "m={m} n={n}: row {i}, column {}",
                                t * TILE + r
                            );
                        }
                    }
                }
            }
        }
    }

    /// Two products of the same rows in one loop ([`matmul_pair`]: the pairs of the
    /// second follow the first's, the first of them widened ahead by the first product's
    /// last pair) equal each product alone, bit for bit: full and ragged last tiles on
    /// either side of the boundary, one row to several row tiles.
    #[test]
    fn a_pair_of_products_in_one_loop_equals_each_alone() {
        let k = 160;
        for (m, na, nb) in [
            (1, 64, 32),
            (7, 100, 37),
            (20, 200, 200),
            (61, 96, 512),
            (48, 320, 8),
        ] {
            let (qa, qb) = (q8(na, k, 40 + na as u64), q8(nb, k, 41 + nb as u64));
            let x = test_values(m * k, 42 + m as u64);
            let (mut ya, mut yb) = (vec![0.0f32; m * na], vec![0.0f32; m * nb]);
            matmul_pair(&x, m, qa.view(), &mut ya, qb.view(), &mut yb);
            let (mut wa, mut wb) = (vec![0.0f32; m * na], vec![0.0f32; m * nb]);
            matmul(&x, m, qa.view(), &mut wa);
            matmul(&x, m, qb.view(), &mut wb);
            assert_eq!(bits(&ya), bits(&wa), "m={m} first of {na}, {nb}");
            assert_eq!(bits(&yb), bits(&wb), "m={m} second of {na}, {nb}");
        }
    }

    /// bf16 weights on the same tiles (unit scales): the packing against the scalar one
    /// (full and ragged tiles), and the product against f64 sums of the bf16 operands and
    /// row by row against itself (each row's arithmetic is fixed).
    #[test]
    fn bf16_weights_on_the_tiles() {
        if !available() {
            return;
        }
        let k = 96;
        for n in [16, 40, 100] {
            let w: Vec<bf16> = test_values(n * k, 30 + n as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            for t in 0..n.div_ceil(TILE) {
                let (mut fast, mut slow) = (vec![1u32; packed_len(k)], vec![2u32; packed_len(k)]);
                pack_bf16_tile(&w, n, k, t, &mut fast);
                pack_bf16_tile_reference(&w, n, k, t, &mut slow);
                assert_eq!(fast, slow, "n={n} tile {t}");
            }
            let m = 13;
            let x = test_values(m * k, 31);
            let mut y = vec![0.0f32; m * n];
            matmul_bf16(&x, m, &w, n, &mut y);
            for i in 0..m {
                let mut alone = vec![0.0f32; n];
                matmul_bf16(&x[i * k..(i + 1) * k], 1, &w, n, &mut alone);
                assert_eq!(bits(&y[i * n..(i + 1) * n]), bits(&alone), "n={n} row {i}");
            }
            assert_near_f64_sums(&x, m, k, n, |r, j| w[r * k + j].to_f64(), &y);
        }
    }

    /// Guided chunks cover every pair once, in order, shrinking to single pairs.
    #[test]
    fn guided_chunks_cover_the_pairs_in_shrinking_chunks() {
        for (pairs, threads) in [(1, 2), (44, 2), (64, 2), (7, 4), (200, 3)] {
            let chunks = GuidedChunks::new(pairs, threads);
            let ranges: Vec<_> = std::iter::from_fn(|| chunks.claim()).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, pairs);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && !w[1].is_empty());
            }
            assert!(ranges.iter().all(|r| r.len() <= PAIRS_PER_CHUNK));
            assert_eq!(ranges.last().unwrap().len(), 1, "{pairs} {threads}");
            assert!(chunks.claim().is_none());
        }
        let chunks = GuidedChunks::new(44, 2);
        let sizes: Vec<_> = std::iter::from_fn(|| chunks.claim())
            .map(|r| r.len())
            .collect();
        assert_eq!(sizes, [8, 8, 7, 6, 4, 3, 2, 2, 1, 1, 1, 1]);
    }

    /// A product whose rows mix both kinds: each prompt row is this path's result for
    /// the row alone, each other row the int8 path's (so neither depends on the other
    /// rows); a ragged row count of weights; every row one kind gives either path alone.
    #[test]
    fn prompt_rows_take_this_path_and_the_others_int8() {
        use crate::qmatmul::{qmatmul, qmatmul_prompt, PromptRows};
        let (m, n, k) = (11, 37, 96);
        let q = q8(n, k, 9);
        let w = q.view();
        let x = test_values(m * k, 10);
        let mask = [
            false, true, true, false, false, true, true, true, true, true, false,
        ];
        // Rows of prompts of 40 tokens against rows of 7-token prompts, at a threshold
        // of 16.
        let lens: Vec<u32> = mask.iter().map(|&p| if p { 40 } else { 7 }).collect();
        let prompt = PromptRows::of(&lens, m, 16);
        assert!(matches!(prompt, PromptRows::Lens { .. }));
        let mut y = vec![0.0f32; m * n];
        qmatmul_prompt(&x, m, w, prompt, &mut y);
        // Float prompt rows: this path, or f32 on AVX2 without an int8 dot product.
        let in_float = crate::qmatmul::prompt_rows_in_float(&w);
        assert_eq!(in_float, preferred() || crate::q8_f32::available());
        let float_rows = |x: &[f32], m: usize, w: QMatrix<'_>, y: &mut [f32]| {
            if preferred() {
                matmul(x, m, w, y)
            } else {
                crate::q8_f32::matmul(x, m, w, y)
            }
        };
        for (i, &prompt) in mask.iter().enumerate() {
            let row = &x[i * k..(i + 1) * k];
            let mut alone = vec![0.0f32; n];
            if prompt && in_float {
                float_rows(row, 1, w, &mut alone);
            } else {
                qmatmul(row, 1, w, &mut alone);
            }
            assert_eq!(bits(&y[i * n..(i + 1) * n]), bits(&alone), "row {i}");
        }
        let (mut all, mut none) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        qmatmul_prompt(&x, m, w, PromptRows::All, &mut all);
        qmatmul_prompt(&x, m, w, PromptRows::None, &mut none);
        let mut want = vec![0.0f32; m * n];
        qmatmul(&x, m, w, &mut want);
        assert_eq!(none, want);
        if in_float {
            float_rows(&x, m, w, &mut want);
        }
        assert_eq!(all, want);
        // A pair of products of the same input: as two products, bit for bit.
        let q2 = q8(21, k, 11);
        let w2 = q2.view();
        let (mut ya, mut yb) = (vec![0.0f32; m * n], vec![0.0f32; m * 21]);
        crate::qmatmul::qmatmul_pair(&x, m, w, &mut ya, w2, &mut yb, prompt);
        let mut want_b = vec![0.0f32; m * 21];
        qmatmul_prompt(&x, m, w2, prompt, &mut want_b);
        assert_eq!((&ya, &yb), (&y, &want_b));
        // One activation term: every row int8, whatever its kind.
        let one = QMatrix { terms: 1, ..w };
        assert!(!crate::qmatmul::prompt_rows_in_float(&one));
        qmatmul_prompt(&x, m, one, PromptRows::All, &mut all);
        qmatmul(&x, m, one, &mut want);
        assert_eq!(all, want);
    }

    /// Prompt products of V2-Lite's shapes, this path against the int8 one (two terms):
    /// `cargo test --release -p dsv2-cpu --lib prompt_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn prompt_speed() {
        use crate::min_time;
        {
            // The register tile alone, on cache-resident operands (one core).
            let k = 2048;
            let q = q8(32, k, 5);
            let w = q.view();
            let x = test_values(6 * k, 6);
            let mut rows = BfRows::default();
            rows.round(&x, 6, k);
            let (mut a, mut b) = (vec![0u32; packed_len(k)], vec![0u32; packed_len(k)]);
            pack_tile(&w.q[..TILE * k], k, &mut a);
            pack_tile(&w.q[TILE * k..], k, &mut b);
            let nb = k / BLOCK;
            let t = Tile {
                x: &rows,
                row0: 0,
                rows: 6,
                w: [&a, &b],
                scales: [&w.scales[..TILE * nb], &w.scales[TILE * nb..]],
                tiles: 2,
                prefetch: &[],
                pack: PackShare::NONE,
            };
            let mut out = [0.0f32; OUT_LEN];
            let secs = min_time(10, || {
                for _ in 0..100 {
                    tile(t, &mut out)
                }
            });
            eprintln!(
                "6x32 tile: {:.1} GMAC/s on one core",
                100.0 * (6 * 32 * k) as f64 / secs / 1e9
            );
            // The same tile widening an eighth of the next pair meanwhile (a 48-row
            // product's share: 2 units a block).
            let mut next = vec![0u32; 2 * packed_len(k)];
            let share = &w.q[..TILE * k / 4];
            let packing = Tile {
                pack: PackShare {
                    src: share,
                    dst: next.as_mut_ptr(),
                },
                ..t
            };
            let secs = min_time(10, || {
                for _ in 0..100 {
                    // SAFETY: `next` holds 32 values per unit of `share`; `out` the tile.
                    unsafe { tile_to(packing, out.as_mut_ptr(), NC * TILE) }
                }
            });
            eprintln!(
                "6x32 tile widening 2 units a block: {:.1} GMAC/s on one core",
                100.0 * (6 * 32 * k) as f64 / secs / 1e9
            );
            let secs = min_time(10, || {
                for _ in 0..100 {
                    pack_tile(&w.q[..TILE * k], k, &mut a)
                }
            });
            eprintln!(
                "packing: {:.2} ns per weight",
                secs / 100.0 / (TILE * k) as f64 * 1e9
            );
        }
        {
            // Expert-sized products from memory: 64 distinct 1408 × 2048 matrices in turn
            // (185 MB), few rows each, as a short prompt's routed experts.
            let (n, k) = (1408, 2048);
            let experts: Vec<Q8> = (0..64).map(|e| q8(n, k, 100 + e)).collect();
            for m in [6, 12, 24, 48] {
                let x = test_values(m * k, 8);
                let mut y = vec![0.0f32; m * n];
                let t_bf = min_time(3, || {
                    for e in &experts {
                        matmul(&x, m, e.view(), &mut y)
                    }
                });
                let t_i8 = min_time(3, || {
                    for e in &experts {
                        crate::qmatmul::qmatmul(&x, m, e.view(), &mut y)
                    }
                });
                // The same matrices as 32 gate and up pairs, each pair in one loop.
                let mut y2 = vec![0.0f32; m * n];
                let t_pair = min_time(3, || {
                    for e in experts.chunks_exact(2) {
                        matmul_pair(&x, m, e[0].view(), &mut y, e[1].view(), &mut y2)
                    }
                });
                let macs = (64 * m * n * k) as f64;
                eprintln!(
                    "64 experts from memory, m={m}: bf16 {:.1} GMAC/s (as 32 pairs {:.1}), \
                     int8 two terms {:.1} GMAC/s ({:.2}x)",
                    macs / t_bf / 1e9,
                    macs / t_pair / 1e9,
                    macs / t_i8 / 1e9,
                    t_i8 / t_bf
                );
            }
        }
        {
            // A prompt's `kv_b_proj` expansion (V2-Lite: 4096 × 512 bf16), 512 context rows:
            // these tiles against `bf16dot`.
            let (m, n, k) = (512, 4096, 512);
            let w: Vec<bf16> = test_values(n * k, 12)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let x = test_values(m * k, 13);
            let mut y = vec![0.0f32; m * n];
            let t_tiles = min_time(10, || matmul_bf16(&x, m, &w, n, &mut y));
            let t_dot = min_time(10, || crate::bf16dot::matmul(&x, m, &w, n, k, &mut y));
            let macs = (m * n * k) as f64;
            eprintln!(
                "kv_b m={m} n={n} k={k} bf16 weights: tiles {:.1} GMAC/s, bf16dot {:.1} GMAC/s \
                 ({:.2}x)",
                macs / t_tiles / 1e9,
                macs / t_dot / 1e9,
                t_dot / t_tiles
            );
        }
        for (m, n, k) in [
            (48, 1408, 2048),
            (48, 2048, 1408),
            (512, 2048, 2048),
            (512, 3072, 2048),
        ] {
            let q = q8(n, k, 7);
            let x = test_values(m * k, 8);
            let mut y = vec![0.0f32; m * n];
            let w = q.view();
            let t_bf = min_time(10, || matmul(&x, m, w, &mut y));
            let t_i8 = min_time(10, || crate::qmatmul::qmatmul(&x, m, w, &mut y));
            let macs = (m * n * k) as f64;
            eprintln!(
                "m={m} n={n} k={k}: bf16 {:.1} GMAC/s, int8 two terms {:.1} GMAC/s ({:.2}x)",
                macs / t_bf / 1e9,
                macs / t_i8 / 1e9,
                t_i8 / t_bf
            );
        }
    }
}
