//! The one-pass decode attention of [`crate::flash`] over a bf16 latent cache, on Intel's
//! AMX tiles ([`crate::amx`]).
//!
//! Long-context decode is bound by its attention's arithmetic: 17,408 multiply-adds per
//! cached position, layer and token on V2-Lite (16 heads × (576 + 512)). On a 16-core
//! Sapphire Rapids the f32 kernel took ~30 ms of a ~120 ms batch-8 step at 4K positions;
//! the tile unit does 512 bf16 multiply-adds a cycle a core, 16× the FMAs. Per chunk of
//! [`CHUNK_ROWS`] cache rows, and per group of 16 heads:
//!
//! - **scores** `Sᵀ = K · Qᵀ`: the chunk's four 16-row tiles of cache rows, loaded where
//!   they lie in the cache (a paged block holds whole tiles; a short last tile is copied
//!   out), against the group's query in bf16 pairs ([`crate::flash_bf16::transpose_group`],
//!   whose 16 lanes of a pair are one row of a `B` tile): four sums over `w / 32` steps;
//! - the **online softmax** of [`crate::flash`] on the stored sums (positions × heads);
//! - the **probabilities** rounded to bf16 and transposed to heads × positions, each
//!   alone in its pair (one tile with the value in the pair's low half, one in the high);
//! - the **weighted sum** `O = P · V` against the same row tiles as they lie: a `B` row
//!   is one cache row, whose pair `n` holds latent columns `2n` and `2n + 1`, so the
//!   low-half probabilities sum the even columns and the high-half ones the odd columns.
//!   The unit does twice the multiply-adds of a sum over interleaved pairs of rows, but
//!   nothing is copied or shuffled (the first version interleaved the rows: 14.1 µs a
//!   chunk on one core, in cache, against 9.3 this way). Two row tiles by two column
//!   tiles a step, 64 columns a block, the last columns first (the score steps read them
//!   last, so they are still in L1); each block's four stored sums are folded as `o' =
//!   fma(o, α, Σ)` while the unit computes the next block's.
//!
//! The tile loads, not the products, bound it: on a Sapphire Rapids core a chunk's scores
//! (72 `tdpbf16ps`) take ~2.1-2.5 µs and its weighted sums (128) ~2.5 µs, ~60 cycles a
//! product where the unit issues one every 16, and a whole chunk ~6.4 µs in cache, ~10.4
//! from memory with each score step asking for its lines two steps early.
//! **Numerics**: [`crate::flash_bf16`]'s (the query and the probabilities rounded to bf16,
//! every sum and the softmax f32), with the tile unit's sums:
//! - score `(j, head)` = `(Σ_kk q_kk · x_j,kk) · scale`, one chain from 0 of the unit's
//!   pair steps over the row's `w / 2` pairs in order ([`fold_chunk_reference`], whose
//!   step is [`crate::flash_bf16::dp`]);
//! - the softmax step is [`crate::flash::softmax_step`];
//! - `acc = Σ_j p_j · x_j` over the chunk's positions in order from 0, each a pair step
//!   whose other product is 0 (`dp(acc, (p_j, 0), (x_j,col, x_j,col+1))` for an even
//!   column, `dp(acc, (0, p_j), (x_j,col−1, x_j,col))` for an odd one), padded with zero
//!   positions to a whole tile of 16; then `o' = fma(o, α, acc)`.
//!
//! Written once over [`Tiles`] and checked bit for bit against the reference on the
//! scalar model of the tiles on any machine; on the hardware the tile unit rounds a few
//! sums in the last place differently from the chain (as [`crate::amx`]'s products), so
//! a CPU with AMX has its own logits. They never depend on the batch or the thread count:
//! a token's chunks, tasks and combination are [`crate::flash`]'s.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use half::bf16;

use crate::amx::{prefetch_line, Tiles};
use crate::flash::{group_state_len, groups, softmax_step, Shape, CHUNK_ROWS, GROUP};
use crate::flash_bf16::{dp, pair, query_len, round};

/// Rows (and pairs, and columns) of one tile.
const TILE: usize = 16;
/// Floats of one 16 × 16 tile.
const TILE_LEN: usize = TILE * TILE;
/// Row tiles of a chunk.
const ROW_TILES: usize = CHUNK_ROWS / TILE;
/// Latent columns of one weighted-sum block: two column tiles of 16 pairs.
const COL_BLOCK: usize = 4 * TILE;
/// Score steps between asking for a line of the chunk and loading it.
const PREFETCH_STEPS: usize = 2;
/// Floats of one weighted-sum block's stored sums: 32 rows (the even columns of 16 heads,
/// then their odd columns) of 32 (two column tiles).
const SUMS_LEN: usize = 4 * TILE_LEN;

/// Whether a bf16 cache's decode attention takes the tiles: [`crate::amx::available`],
/// and not turned off by `DSV2_AMX_ATTENTION=0` (which leaves the attention to the
/// CPU's other kernels, the tiles to the prompt rows). Checked once.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        crate::amx::available() && std::env::var("DSV2_AMX_ATTENTION").map_or(true, |v| v != "0")
    })
}

/// Whether an attention of `shape` over a cache of `block_size`-row blocks suits the
/// tiles: whole steps of 32 values in a row, whole 64-column blocks of latent, and cache
/// blocks of whole 16-row tiles (V2-Lite's and V2's 512 + 64 in blocks of 16 do).
pub(crate) fn fits(shape: Shape, block_size: usize) -> bool {
    shape.w.is_multiple_of(2 * TILE)
        && shape.c.is_multiple_of(COL_BLOCK)
        && shape.c <= shape.w
        && block_size.is_multiple_of(TILE)
}

/// Where each part of a fold's scratch lies, in 4-byte values from its 64-byte aligned
/// start; every part starts on a 64-byte line.
struct Layout {
    /// Each group's scores, then probabilities: [`CHUNK_ROWS`] rows of 16 heads.
    p: usize,
    /// Each group's `α`.
    alpha: usize,
    /// Each group's probability tiles ([`probability_tiles`]): per row tile, 32 rows of
    /// 16 positions.
    pt: usize,
    /// Two weighted-sum blocks' stored sums, alternating.
    ct: usize,
    /// A short last row tile, copied: 16 rows of `w / 2` pairs.
    kt: usize,
    /// Values in all.
    len: usize,
}

fn layout(h: usize, w: usize) -> Layout {
    let g = groups(h);
    let p = 0;
    let alpha = p + g * CHUNK_ROWS * GROUP;
    let pt = alpha + g * GROUP;
    let ct = pt + g * ROW_TILES * 2 * TILE_LEN;
    let kt = ct + 2 * SUMS_LEN;
    let len = kt + TILE * w / 2;
    Layout {
        p,
        alpha,
        pt,
        ct,
        kt,
        len,
    }
}

/// Floats of a fold's scratch (its parts, and room to align them to a 64-byte line).
pub(crate) fn scratch_len(h: usize, w: usize) -> usize {
    layout(h, w).len + 16
}

/// [`crate::flash::fold_chunk`] on the tiles: one chunk of bf16 cache `rows` folded into
/// the states of head groups `groups` (`state`: theirs, one after the other), for the
/// token's query `qt` from [`crate::flash_bf16::transpose_group`] (all its groups).
/// `scratch` holds [`scratch_len`] floats, any values (all are written before read).
/// Each score step asks for the chunk's lines `ahead` steps on, and the weighted sums
/// for the first `ahead` steps' lines of `next` (the task's next chunk, as stored).
/// `simd` takes the AVX-512 BF16 helpers around the tiles (which compute the same values
/// as the scalar ones).
///
/// The rows of each whole 16-row tile must lie `w` values apart, as in a cache block
/// ([`fits`]).
///
/// # Safety
/// After `tiles.configure()` on this thread (a task configures once for all its chunks:
/// [`TaskTiles`]); `simd` only where [`crate::flash_bf16::available`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn fold_chunk<T: Tiles>(
    tiles: &mut T,
    shape: Shape,
    groups: Range<usize>,
    qt: &[u32],
    rows: &[&[bf16]],
    next: &[&[u8]],
    state: &mut [f32],
    scratch: &mut [f32],
    simd: bool,
    ahead: usize,
) {
    let Shape { h, c, w, scale } = shape;
    let n = rows.len();
    assert!(
        (1..=CHUNK_ROWS).contains(&n)
            && fits(shape, TILE)
            && rows.iter().all(|r| r.len() >= w)
            && qt.len() >= query_len(h, w)
            && groups.end <= self::groups(h)
            && state.len() >= groups.len() * group_state_len(c)
            && scratch.len() >= scratch_len(h, w),
        "flash tiles chunk shapes"
    );
    let pairs = w / 2;
    let at = layout(h, w);
    let aligned = scratch.as_ptr().align_offset(64);
    let scratch = &mut scratch[aligned..][..at.len];
    let s = scratch.as_mut_ptr();
    // SAFETY (the parts): disjoint ranges of `scratch`, in bounds by `layout`; u32 and
    // f32 have one size and alignment.
    let part = |from: usize| unsafe { s.add(from) };
    let (p, alpha, ct) = (part(at.p), part(at.alpha), part(at.ct));
    let (pt, kt) = (part(at.pt) as *mut u32, part(at.kt) as *mut u32);
    // The row tiles: whole ones where they lie; a short last one copied, its rows past
    // the chunk zero; a tile past the chunk reads the first (its sums are never used).
    let stride = w * 2;
    let mut a = [std::ptr::null::<u32>(); ROW_TILES];
    for t in 0..ROW_TILES {
        let first = 16 * t;
        a[t] = if first + TILE <= n {
            let base = rows[first].as_ptr();
            assert!(
                (1..TILE).all(|r| std::ptr::eq(rows[first + r].as_ptr(), base.wrapping_add(r * w))),
                "flash tiles: rows {first}..{} of a chunk are not one cache block's",
                first + TILE
            );
            base as *const u32
        } else if first < n {
            // SAFETY: the copy's TILE rows of `pairs` values lie in the `kt` part.
            let copy = unsafe { std::slice::from_raw_parts_mut(kt, TILE * pairs) };
            for (r, dst) in copy.chunks_exact_mut(pairs).enumerate() {
                match rows.get(first + r) {
                    Some(x) => {
                        for (k, d) in dst.iter_mut().enumerate() {
                            *d = pair(x[2 * k].to_bits(), x[2 * k + 1].to_bits());
                        }
                    }
                    None => dst.fill(0),
                }
            }
            kt as *const u32
        } else {
            a[0]
        };
    }
    let gs = group_state_len(c);
    let steps = pairs / TILE;
    let row_tiles = n.div_ceil(TILE);
    // A step's lines of the chunk: one line of each row (the tiles' loads wait on each
    // other, so the lines are asked for `ahead` steps early).
    let fetch_step = |step: usize| {
        for row in rows {
            prefetch_line(&row[..w], step);
        }
    };
    for step in 0..ahead {
        fetch_step(step);
    }
    // The next chunk's first `ahead` steps, asked for over the weighted sums.
    let next_lines = next.len() * ahead;
    // SAFETY: the caller's contract for the tiles; every pointer below stays in its part
    // of `scratch`, in `qt` or in the checked rows.
    unsafe {
        for (gi, g) in groups.clone().enumerate() {
            let pg = p.add(gi * CHUNK_ROWS * GROUP);
            let q = qt.as_ptr().add(g * pairs * GROUP);
            tiles.zero_sums();
            for step in 0..steps {
                if gi == 0 {
                    fetch_step(step + ahead);
                }
                let a = a.map(|a| a.byte_add(64 * step));
                tiles.accumulate_rows(a, stride, q.add(step * TILE * GROUP));
            }
            tiles.store_four(pg);
            let scores = std::slice::from_raw_parts_mut(pg, n * GROUP);
            for v in scores.iter_mut() {
                *v *= scale;
            }
            let ml = &mut state[gi * gs..][..2 * GROUP];
            let al = softmax(scores, ml, simd);
            std::ptr::copy_nonoverlapping(al.as_ptr(), alpha.add(gi * GROUP), GROUP);
            let tiles_of_p = std::slice::from_raw_parts_mut(
                pt.add(gi * ROW_TILES * 2 * TILE_LEN),
                ROW_TILES * 2 * TILE_LEN,
            );
            probability_tiles(scores, n, tiles_of_p, simd);
        }
        // The weighted sums, a group's 64 columns a block: block i's sums are folded
        // while the unit computes block i + 1's. The last columns come first: the score
        // steps read them last, so their lines are still in L1.
        let gn = groups.len();
        let col_of = |i: usize| (c / COL_BLOCK - 1 - i / gn) * COL_BLOCK;
        let blocks = c / COL_BLOCK * gn;
        let per_block = next_lines.div_ceil(blocks);
        let state = state.as_mut_ptr();
        let fold = |i: usize| {
            let (col0, gi) = (col_of(i), i % gn);
            let heads = (h - (groups.start + gi) * GROUP).min(GROUP);
            let sums = std::slice::from_raw_parts(ct.add(i % 2 * SUMS_LEN), SUMS_LEN);
            let alpha = std::slice::from_raw_parts(alpha.add(gi * GROUP), GROUP);
            let o = std::slice::from_raw_parts_mut(state.add(gi * gs + 2 * GROUP), heads * c);
            fold_sums(sums, alpha, heads, c, col0, o, simd);
        };
        for i in 0..=blocks {
            if i < blocks {
                let (col0, gi) = (col_of(i), i % gn);
                tiles.zero_sums();
                for (t, a) in a.iter().enumerate().take(row_tiles) {
                    let b = a.byte_add(2 * col0);
                    tiles.accumulate::<2>(
                        pt.add((gi * ROW_TILES + t) * 2 * TILE_LEN),
                        4 * TILE,
                        [b, b.byte_add(4 * TILE)],
                        stride,
                    );
                }
                tiles.store_sums::<2>(ct.add(i % 2 * SUMS_LEN), 4 * 2 * TILE);
                for line in (i * per_block..(i + 1) * per_block).take_while(|&l| l < next_lines) {
                    let (row, step) = (line % next.len(), line / next.len());
                    prefetch_line(next[row], step);
                }
            }
            if i >= 1 {
                fold(i - 1);
            }
        }
    }
}

/// The calling thread's tiles, configured for [`fold_chunk_amx`] until dropped: one
/// attention task's chunks share one configuration (`ldtilecfg`, then `tilerelease` at
/// the end).
pub(crate) struct TaskTiles(std::marker::PhantomData<*const ()>);

impl TaskTiles {
    /// Configures the calling thread's tiles.
    ///
    /// # Panics
    /// Where [`available`] is false.
    pub(crate) fn start() -> TaskTiles {
        assert!(
            available(),
            "the decode attention's AMX tiles are not available"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tile state is granted (`available`).
        unsafe {
            crate::amx::Amx.configure()
        };
        TaskTiles(std::marker::PhantomData)
    }
}

impl Drop for TaskTiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: configured by `start` on this thread (the type is not `Send`).
        unsafe {
            crate::amx::Amx.release()
        };
    }
}

/// [`fold_chunk`] on this CPU's tiles, configured by `task`, with the AVX-512 BF16
/// helpers: the attention's call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fold_chunk_amx(
    task: &TaskTiles,
    shape: Shape,
    groups: Range<usize>,
    qt: &[u32],
    rows: &[&[bf16]],
    next: &[&[u8]],
    state: &mut [f32],
    scratch: &mut [f32],
) {
    let _ = task;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `task` configured this thread's tiles (so they are available, and with them
    // AVX-512 BF16: `crate::amx::available` requires `crate::flash_bf16::available`).
    unsafe {
        fold_chunk(
            &mut crate::amx::Amx,
            shape,
            groups,
            qt,
            rows,
            next,
            state,
            scratch,
            true,
            PREFETCH_STEPS,
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (shape, groups, qt, rows, next, state, scratch);
}

/// The softmax step of [`crate::flash`] (in AVX-512 when `simd`: the same values).
fn softmax(p: &mut [f32], ml: &mut [f32], simd: bool) -> [f32; GROUP] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        assert!(p.len().is_multiple_of(GROUP) && ml.len() >= 2 * GROUP);
        // SAFETY: AVX-512 F (the caller's `simd`); the slices' lengths checked above.
        return unsafe {
            crate::flash::x86::softmax_step512(p.as_mut_ptr(), p.len() / GROUP, ml.as_mut_ptr())
        };
    }
    let _ = simd;
    softmax_step(p, ml)
}

/// A chunk's probabilities (`p`: `n` rows of 16 heads) as the weighted sum's `A` tiles:
/// for row tile `t`, `pt[512t + 16·head + k]` holds `bf16(p[16t + k][head])` in a pair's
/// low half and `pt[512t + 16·(16 + head) + k]` the same in its high half (the other half
/// 0; positions past `n` 0), for the tiles `t < ⌈n / 16⌉`.
fn probability_tiles(p: &[f32], n: usize, pt: &mut [u32], simd: bool) {
    assert!(p.len() >= n * GROUP && pt.len() >= n.div_ceil(TILE) * 2 * TILE_LEN);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX-512 F/BW/BF16 (the caller's `simd`); lengths checked above.
        return unsafe { x86::probability_tiles(p, n, pt) };
    }
    let _ = simd;
    probability_tiles_reference(p, n, pt)
}

fn probability_tiles_reference(p: &[f32], n: usize, pt: &mut [u32]) {
    let pb = |j: usize, head: usize| if j < n { round(p[j * GROUP + head]) } else { 0 };
    for t in 0..n.div_ceil(TILE) {
        for head in 0..GROUP {
            for k in 0..TILE {
                let v = pb(TILE * t + k, head);
                pt[2 * TILE_LEN * t + TILE * head + k] = pair(v, 0);
                pt[2 * TILE_LEN * t + TILE * (TILE + head) + k] = pair(0, v);
            }
        }
    }
}

/// A weighted-sum block's stored sums folded into the group's outputs: sum row `16i +
/// head`, column `16j + n` is the head's output column `col0 + 32j + 2n + i`, and `o[head·c
/// + col] = fma(o, α[head], sum)`, for the group's `heads`.
fn fold_sums(
    sums: &[f32],
    alpha: &[f32],
    heads: usize,
    c: usize,
    col0: usize,
    o: &mut [f32],
    simd: bool,
) {
    assert!(
        sums.len() >= SUMS_LEN
            && alpha.len() >= heads
            && o.len() >= (heads - 1) * c + col0 + COL_BLOCK
    );
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX-512 F (the caller's `simd`); lengths checked above.
        return unsafe { x86::fold_sums(sums, alpha, heads, c, col0, o) };
    }
    let _ = simd;
    for head in 0..heads {
        for j in 0..2 {
            for n in 0..TILE {
                for i in 0..2 {
                    let sum = sums[(TILE * i + head) * 2 * TILE + TILE * j + n];
                    let d = &mut o[head * c + col0 + 2 * TILE * j + 2 * n + i];
                    *d = d.mul_add(alpha[head], sum);
                }
            }
        }
    }
}

/// The module's arithmetic, one value at a time (the tests' reference).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn fold_chunk_reference(
    shape: Shape,
    groups: Range<usize>,
    qt: &[u32],
    rows: &[&[bf16]],
    state: &mut [f32],
    scratch: &mut [f32],
) {
    let Shape { h, c, w, scale } = shape;
    let n = rows.len();
    let pairs = w / 2;
    let x = |j: usize, k: usize| if j < n { rows[j][k].to_bits() } else { 0 };
    let p = &mut scratch[..CHUNK_ROWS * GROUP];
    for (g, st) in groups.zip(state.chunks_exact_mut(group_state_len(c))) {
        let heads = (h - g * GROUP).min(GROUP);
        let q = &qt[g * pairs * GROUP..][..pairs * GROUP];
        let p = &mut p[..n * GROUP];
        for j in 0..n {
            for lane in 0..GROUP {
                let mut acc = 0.0f32;
                for kk in 0..pairs {
                    acc = dp(
                        acc,
                        pair(x(j, 2 * kk), x(j, 2 * kk + 1)),
                        q[kk * GROUP + lane],
                    );
                }
                p[j * GROUP + lane] = acc * scale;
            }
        }
        let (ml, o) = st.split_at_mut(2 * GROUP);
        let alpha = softmax_step(p, ml);
        let pb = |j: usize, head: usize| if j < n { round(p[j * GROUP + head]) } else { 0 };
        for head in 0..heads {
            for col in 0..c {
                let mut acc = 0.0f32;
                for j in 0..n.next_multiple_of(TILE) {
                    let v = pb(j, head);
                    let (a, even) = if col % 2 == 0 {
                        (pair(v, 0), col)
                    } else {
                        (pair(0, v), col - 1)
                    };
                    acc = dp(acc, a, pair(x(j, even), x(j, even + 1)));
                }
                let dst = &mut o[head * c + col];
                *dst = dst.mul_add(alpha[head], acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP, TILE, TILE_LEN};
    use crate::flash_bf16::x86::transpose;
    use std::arch::x86_64::*;

    /// [`super::probability_tiles_reference`]: 16 rows rounded (`vcvtneps2bf16`) and
    /// widened to one value a lane, transposed into the low-half tile, shifted into the
    /// high-half one.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; `p` holds `n` rows of 16, `pt` the tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn probability_tiles(p: &[f32], n: usize, pt: &mut [u32]) {
        for t in 0..n.div_ceil(TILE) {
            let mut v: [__m512i; 16] = std::array::from_fn(|k| {
                let j = TILE * t + k;
                if j < n {
                    // SAFETY: row j < n of `p`.
                    let row = unsafe { _mm512_loadu_ps(p.as_ptr().add(j * GROUP)) };
                    let bf: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(row)) };
                    _mm512_cvtepu16_epi32(bf)
                } else {
                    _mm512_setzero_si512()
                }
            });
            // SAFETY: the caller's features.
            unsafe { transpose(&mut v) };
            for (head, v) in v.iter().enumerate() {
                // SAFETY: rows `head` and `16 + head` of tile t lie in `pt`.
                unsafe {
                    let at = pt.as_mut_ptr().add(2 * TILE_LEN * t + TILE * head);
                    _mm512_storeu_si512(at as *mut _, *v);
                    _mm512_storeu_si512(at.add(TILE_LEN) as *mut _, _mm512_slli_epi32::<16>(*v));
                }
            }
        }
    }

    /// Lane `m` of the interleave of the even-column sums `e` and the odd-column sums
    /// `o` of one column tile: `[e0, o0, e1, o1, ...]` from lane `8·half`.
    const fn interleave_index(half: usize) -> [i32; 16] {
        let mut index = [0i32; 16];
        let mut m = 0;
        while m < 16 {
            index[m] = (8 * half + m / 2 + 16 * (m % 2)) as i32;
            m += 1;
        }
        index
    }

    const INTERLEAVE: [[i32; 16]; 2] = [interleave_index(0), interleave_index(1)];

    /// [`super::fold_sums`] in vectors of 16 columns: the even and odd sums of a column
    /// tile interleaved back into column order.
    ///
    /// # Safety
    /// AVX-512 F; the lengths checked by the caller.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold_sums(
        sums: &[f32],
        alpha: &[f32],
        heads: usize,
        c: usize,
        col0: usize,
        o: &mut [f32],
    ) {
        // SAFETY: 16 i32 values each.
        let index = INTERLEAVE.map(|i| unsafe { _mm512_loadu_si512(i.as_ptr() as *const _) });
        for (head, &alpha) in alpha.iter().enumerate().take(heads) {
            let a = _mm512_set1_ps(alpha);
            for j in 0..2 {
                // SAFETY: rows `head` and `16 + head` of column tile j of the sums, and
                // 32 outputs of the head's row.
                unsafe {
                    let even = _mm512_loadu_ps(sums.as_ptr().add(head * 2 * TILE + TILE * j));
                    let odd =
                        _mm512_loadu_ps(sums.as_ptr().add((TILE + head) * 2 * TILE + TILE * j));
                    for (half, index) in index.iter().enumerate() {
                        let d = o
                            .as_mut_ptr()
                            .add(head * c + col0 + 2 * TILE * j + TILE * half);
                        let s = _mm512_permutex2var_ps(even, *index, odd);
                        _mm512_storeu_ps(d, _mm512_fmadd_ps(_mm512_loadu_ps(d), a, s));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::tests::Emulated;
    use crate::flash::{reset_state, state_len};
    use crate::flash_bf16::transpose_group;
    use crate::test_values;

    /// A token's cache rows in blocks of 16 rows of `w` values (as the paged cache holds
    /// them), with a few subnormal values; `rows(j)` is row j.
    struct Cache {
        values: Vec<bf16>,
        w: usize,
    }

    impl Cache {
        fn new(n: usize, w: usize, seed: u64) -> Cache {
            let values = test_values(n.next_multiple_of(TILE) * w, seed)
                .into_iter()
                .enumerate()
                .map(|(i, v)| bf16::from_f32(if i % 97 == 5 { v * 1e-39 } else { v }))
                .collect();
            Cache { values, w }
        }

        fn row(&self, j: usize) -> &[bf16] {
            &self.values[j * self.w..][..self.w]
        }
    }

    /// A fold of one chunk: query pairs, rows, state, scratch.
    type Fold<'a> = &'a mut dyn FnMut(&[u32], &[&[bf16]], &mut [f32], &mut [f32]);

    /// One token's positions folded chunk by chunk by `fold`, into a fresh state.
    fn fold_all(shape: Shape, q_cat: &[f32], cache: &Cache, n: usize, fold: Fold<'_>) -> Vec<f32> {
        let Shape { h, c, w, .. } = shape;
        let mut qt = vec![0u32; query_len(h, w)];
        for g in 0..groups(h) {
            transpose_group(q_cat, h, w, g, &mut qt[g * w / 2 * GROUP..]);
        }
        let mut state = vec![0.0; state_len(h, c)];
        reset_state(&mut state, c);
        // Stale values in the scratch: the fold must write before it reads.
        let mut scratch = vec![f32::NAN; scratch_len(h, w) + 5];
        for s0 in (0..n).step_by(CHUNK_ROWS) {
            let rows: Vec<&[bf16]> = (s0..n.min(s0 + CHUNK_ROWS)).map(|j| cache.row(j)).collect();
            fold(&qt, &rows, &mut state, &mut scratch[5..]);
        }
        state
    }

    /// Every shape a token's chunks take (whole chunks, a short last chunk of 1-63 rows,
    /// a short last tile), V2-Lite's heads and V2's group count with a short group.
    fn shapes() -> Vec<(Shape, Vec<usize>)> {
        [
            (16, 512, 64, vec![1, 17, 64, 100, 129]),
            (4, 64, 32, vec![1, 2, 15, 16, 31, 32, 33, 63, 64, 65, 130]),
            (40, 128, 32, vec![7, 70]),
        ]
        .into_iter()
        .map(|(h, c, dr, ns)| {
            let w = c + dr;
            let shape = Shape {
                h,
                c,
                w,
                scale: 1.0 / (w as f32).sqrt(),
            };
            (shape, ns)
        })
        .collect()
    }

    fn check<T: Tiles>(tiles: &mut T, simd: bool, exact: bool) -> f32 {
        let mut worst = 0.0f32;
        for (shape, ns) in shapes() {
            let Shape { h, c, w, .. } = shape;
            assert!(fits(shape, 16));
            for n in ns {
                let q_cat: Vec<f32> = test_values(h * w, (h * n) as u64)
                    .into_iter()
                    .map(|v| 3.0 * v)
                    .collect();
                let cache = Cache::new(n, w, 1000 + n as u64);
                let all = 0..groups(h);
                let want = fold_all(shape, &q_cat, &cache, n, &mut |qt, r, st, sc| {
                    fold_chunk_reference(shape, all.clone(), qt, r, st, sc)
                });
                // The groups in two calls, as the attention splits them with few tasks.
                let split = groups(h) / 2;
                let got = fold_all(shape, &q_cat, &cache, n, &mut |qt, r, st, sc| {
                    for part in [0..split, split..groups(h)] {
                        if part.is_empty() {
                            continue;
                        }
                        let gs = group_state_len(c);
                        let st = &mut st[part.start * gs..part.end * gs];
                        // SAFETY: the caller's tiles are available; `simd` as checked.
                        unsafe {
                            tiles.configure();
                            fold_chunk(tiles, shape, part, qt, r, &[], st, sc, simd, 2);
                            tiles.release();
                        }
                    }
                });
                let gs = group_state_len(c);
                for g in 0..groups(h) {
                    let heads = (h - g * GROUP).min(GROUP);
                    for head in 0..heads {
                        let base = g * gs;
                        let pick = |s: &[f32], i: usize| s[base + i];
                        for i in [head, GROUP + head] {
                            let (got, want) = (pick(&got, i), pick(&want, i));
                            if exact {
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "h {h} c {c} n {n}: max/sum of head {head}"
                                );
                            }
                            worst = worst.max((got - want).abs() / want.abs().max(1.0));
                        }
                        let o = |s: &[f32]| s[base + 2 * GROUP + head * c..][..c].to_vec();
                        let (o_got, o_want) = (o(&got), o(&want));
                        let top = o_want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for col in 0..c {
                            if exact {
                                assert_eq!(
                                    o_got[col].to_bits(),
                                    o_want[col].to_bits(),
                                    "h {h} c {c} n {n} head {head} col {col}"
                                );
                            }
                            worst = worst.max((o_got[col] - o_want[col]).abs() / top);
                        }
                    }
                }
            }
        }
        worst
    }

    /// The driver's indexing on the scalar model of the tiles, bit for bit, with the
    /// scalar helpers and (where the CPU has them) the AVX-512 BF16 ones.
    #[test]
    fn the_driver_matches_the_reference_on_the_model() {
        check(&mut Emulated::new(), false, true);
        if crate::flash_bf16::available() {
            check(&mut Emulated::new(), true, true);
        } else {
            eprintln!("no AVX-512 BF16 here: the SIMD helpers skipped");
        }
    }

    /// The probability tiles (a 16 × 16 transpose) and the fold (an interleave) against
    /// their plain definitions.
    #[test]
    fn the_simd_helpers_match_their_references() {
        if !crate::flash_bf16::available() {
            eprintln!("no AVX-512 BF16 here: skipped");
            return;
        }
        for n in [1, 2, 15, 16, 17, 33, 64] {
            let p: Vec<f32> = test_values(n * GROUP, n as u64)
                .into_iter()
                .map(|v| v * 7.0)
                .collect();
            let len = ROW_TILES * 2 * TILE_LEN;
            let (mut fast, mut slow) = (vec![7u32; len], vec![7u32; len]);
            probability_tiles(&p, n, &mut fast, true);
            probability_tiles_reference(&p, n, &mut slow);
            assert_eq!(fast, slow, "probabilities, n {n}");
        }
        let sums = test_values(SUMS_LEN, 3);
        let alpha = test_values(GROUP, 4);
        for heads in [16, 5] {
            let c = 192;
            let o = test_values(heads * c, 5);
            for col0 in [0, 64, 128] {
                let (mut fast, mut slow) = (o.clone(), o.clone());
                fold_sums(&sums, &alpha, heads, c, col0, &mut fast, true);
                fold_sums(&sums, &alpha, heads, c, col0, &mut slow, false);
                assert_eq!(crate::bits(&fast), crate::bits(&slow), "fold, col0 {col0}");
            }
        }
    }

    /// bf16 pairs of random values.
    fn random_pairs(n: usize, seed: u64) -> Vec<u32> {
        test_values(2 * n, seed)
            .chunks_exact(2)
            .map(|v| pair(round(v[0]), round(v[1])))
            .collect()
    }

    /// The largest difference between two sets of sums, relative to the largest sum.
    fn difference(got: &[f32], want: &[f32]) -> f32 {
        let top = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .fold(0.0f32, |m, (g, w)| m.max((g - w).abs() / top))
    }

    /// On a CPU with AMX: the two tile steps the attention takes, on the tiles and on the
    /// model, from the same operands (rows of a cache block's stride, probabilities alone
    /// in their pairs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_tile_steps_match_the_model() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let stride = 288; // pairs of a V2-Lite cache row
        let rows = random_pairs(4 * TILE * stride, 1);
        let q = random_pairs(3 * TILE_LEN, 2);
        fn run_scores<T: Tiles>(t: &mut T, rows: &[u32], q: &[u32], stride: usize) -> Vec<f32> {
            let mut out = vec![0.0f32; 4 * TILE_LEN];
            // SAFETY: the tiles available (checked); 4 tiles of 16 rows of 3 steps in
            // `rows`, 3 steps in `q`, 4 KiB in `out`.
            unsafe {
                t.configure();
                t.zero_sums();
                for step in 0..3 {
                    let a =
                        std::array::from_fn(|i| rows.as_ptr().add(i * TILE * stride + TILE * step));
                    t.accumulate_rows(a, 4 * stride, q.as_ptr().add(step * TILE_LEN));
                }
                t.store_four(out.as_mut_ptr());
                t.release();
            }
            out
        }
        fn run_sums<T: Tiles>(t: &mut T, rows: &[u32], p: &[u32], stride: usize) -> Vec<f32> {
            let mut out = vec![0.0f32; 4 * TILE_LEN];
            // SAFETY: as above; two tiles of 32 probability rows, two row tiles of `rows`.
            unsafe {
                t.configure();
                t.zero_sums();
                for tile in 0..2 {
                    let b = rows.as_ptr().add(tile * TILE * stride + 64);
                    t.accumulate::<2>(
                        p.as_ptr().add(tile * 2 * TILE_LEN),
                        4 * TILE,
                        [b, b.add(TILE)],
                        4 * stride,
                    );
                }
                t.store_sums::<2>(out.as_mut_ptr(), 4 * 2 * TILE);
                t.release();
            }
            out
        }
        // Each row tile's probabilities: 16 rows alone in the low half, 16 in the high.
        let p: Vec<u32> = random_pairs(4 * TILE_LEN, 3)
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if i % (2 * TILE_LEN) < TILE_LEN {
                    v & 0xFFFF
                } else {
                    v & 0xFFFF_0000
                }
            })
            .collect();
        let hw = run_scores(&mut crate::amx::Amx, &rows, &q, stride);
        let model = run_scores(&mut Emulated::new(), &rows, &q, stride);
        let scores_diff = difference(&hw, &model);
        let hw = run_sums(&mut crate::amx::Amx, &rows, &p, stride);
        let model = run_sums(&mut Emulated::new(), &rows, &p, stride);
        let sums_diff = difference(&hw, &model);
        eprintln!(
            "AMX tile steps against the model: scores {scores_diff:e}, weighted sums {sums_diff:e} of the largest"
        );
        assert!(scores_diff <= 1e-6 && sums_diff <= 1e-6);
    }

    /// On a CPU with AMX: the driver on the tiles against the reference. The unit's sums
    /// differ from the chain in last places (above), and a score a last place off may
    /// round its probability to the neighbouring bf16 value: one term of a weighted sum
    /// off by 2^-8 of itself, ~4e-4 of an output of 64 such terms.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_tiles_match_the_reference() {
        if !crate::amx::available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let worst = check(&mut crate::amx::Amx, true, false);
        eprintln!("AMX decode attention: largest difference {worst:e} of a head's largest output");
        assert!(worst <= 2e-3, "{worst:e}");
    }

    /// One core folding V2-Lite chunks (16 heads, 64 rows of 576 bf16 values) on the
    /// tiles: one chunk again and again (in cache), the same with the tiles configured
    /// for each chunk, and 2,048 chunks of a 151 MB cache in turn, each prefetching the
    /// next (from memory): `cargo test --release -p dsv2-cpu --lib tiles_fold_timing --
    /// --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn tiles_fold_timing() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let (h, c, w) = (16, 512, 576);
        let shape = Shape {
            h,
            c,
            w,
            scale: 0.05,
        };
        let q_cat = test_values(h * w, 1);
        let chunks = 2048;
        let cache = Cache::new(chunks * CHUNK_ROWS, w, 9);
        let chunk = |i: usize| -> Vec<&[bf16]> {
            (0..CHUNK_ROWS)
                .map(|j| cache.row(i * CHUNK_ROWS + j))
                .collect()
        };
        let bytes = |rows: &[&[bf16]]| -> Vec<&[u8]> {
            rows.iter()
                .map(|r| unsafe {
                    std::slice::from_raw_parts(r.as_ptr() as *const u8, 2 * r.len())
                })
                .collect()
        };
        let mut qt = vec![0u32; query_len(h, w)];
        transpose_group(&q_cat, h, w, 0, &mut qt);
        let mut state = vec![0.0; state_len(h, c)];
        let mut scratch = vec![0.0; scratch_len(h, w)];
        reset_state(&mut state, c);
        let macs = (CHUNK_ROWS * h * (w + c)) as f64;
        let report = |what: &str, reps: usize, secs: f64| {
            let us = secs / reps as f64 * 1e6;
            eprintln!(
                "tiles fold, {what}: {us:.2} us a chunk, {:.1} GMAC/s, {:.1} GB/s of cache rows on one core",
                macs / us / 1e3,
                (CHUNK_ROWS * w * 2) as f64 / us / 1e3
            );
        };
        let rows = chunk(0);
        let reps = 20000;
        let fold = |task: &TaskTiles,
                    rows: &[&[bf16]],
                    next: &[&[u8]],
                    state: &mut [f32],
                    scratch: &mut [f32],
                    ahead: usize| {
            let _ = task;
            // SAFETY: `task` configured the tiles; AVX-512 BF16 with them.
            unsafe {
                fold_chunk(
                    &mut crate::amx::Amx,
                    shape,
                    0..1,
                    &qt,
                    rows,
                    next,
                    state,
                    scratch,
                    true,
                    ahead,
                )
            }
        };
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            {
                let task = TaskTiles::start();
                for _ in 0..reps / 5 {
                    fold(&task, &rows, &[], &mut state, &mut scratch, PREFETCH_STEPS);
                    reset_state(&mut state, c);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        report("in cache (best of 5 runs)", reps / 5, best);
        for ahead in [0, PREFETCH_STEPS] {
            for with_next in [false, true] {
                let t = std::time::Instant::now();
                let task = TaskTiles::start();
                for i in 0..chunks {
                    let rows = chunk(i);
                    let next = if with_next && i + 1 < chunks {
                        chunk(i + 1)
                    } else {
                        Vec::new()
                    };
                    fold(&task, &rows, &bytes(&next), &mut state, &mut scratch, ahead);
                }
                drop(task);
                let what = format!("from memory, {ahead} steps ahead, next chunk {with_next}");
                report(&what, chunks, t.elapsed().as_secs_f64());
                reset_state(&mut state, c);
            }
        }
    }

    /// One core, the phases of a V2-Lite chunk's fold alone, in cache: `cargo test
    /// --release -p dsv2-cpu --lib tiles_phase_timing -- --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn tiles_phase_timing() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let (c, w) = (512, 576);
        let stride = w / 2;
        let rows = random_pairs(CHUNK_ROWS * stride, 1);
        let q = random_pairs(stride * GROUP, 2);
        let pt = random_pairs(ROW_TILES * 2 * TILE_LEN, 3);
        let mut out = vec![0.0f32; 2 * SUMS_LEN];
        let reps = 20000;
        let time = |what: &str, f: &mut dyn FnMut()| {
            f();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            let us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
            eprintln!("tiles phase {what}: {us:.2} us a chunk");
        };
        let task = TaskTiles::start();
        let mut amx = crate::amx::Amx;
        time("scores (72 tdpbf16ps)", &mut || unsafe {
            amx.zero_sums();
            for step in 0..stride / TILE {
                let a = std::array::from_fn(|i| rows.as_ptr().add(i * TILE * stride + TILE * step));
                amx.accumulate_rows(a, 4 * stride, q.as_ptr().add(step * TILE_LEN));
            }
            amx.store_four(out.as_mut_ptr());
        });
        time("weighted sums (128 tdpbf16ps)", &mut || unsafe {
            for block in 0..c / COL_BLOCK {
                amx.zero_sums();
                for t in 0..ROW_TILES {
                    let b = rows.as_ptr().add(t * TILE * stride + block * COL_BLOCK / 2);
                    amx.accumulate::<2>(
                        pt.as_ptr().add(t * 2 * TILE_LEN),
                        4 * TILE,
                        [b, b.add(TILE)],
                        4 * stride,
                    );
                }
                amx.store_sums::<2>(out.as_mut_ptr().add(block % 2 * SUMS_LEN), 4 * 2 * TILE);
            }
        });
        drop(task);
        let scores: Vec<f32> = test_values(CHUNK_ROWS * GROUP, 4);
        let mut p = scores.clone();
        let mut ml = vec![0.0f32; 2 * GROUP];
        time("scale and softmax", &mut || {
            p.copy_from_slice(&scores);
            for v in p.iter_mut() {
                *v *= 0.05;
            }
            ml[..GROUP].fill(f32::NEG_INFINITY);
            ml[GROUP..].fill(0.0);
            softmax(&mut p, &mut ml, true);
        });
        let mut tiles_of_p = vec![0u32; ROW_TILES * 2 * TILE_LEN];
        time("probability tiles", &mut || {
            probability_tiles(&p, CHUNK_ROWS, &mut tiles_of_p, true)
        });
        let sums = test_values(SUMS_LEN, 5);
        let alpha = test_values(GROUP, 6);
        let mut o = test_values(GROUP * c, 7);
        time("8 folds of sums", &mut || {
            for block in 0..c / COL_BLOCK {
                fold_sums(&sums, &alpha, GROUP, c, block * COL_BLOCK, &mut o, true);
            }
        });
    }
}
