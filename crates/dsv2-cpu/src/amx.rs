//! Prompt rows of q8 (and bf16-weight) products, and the prefill attention's products, on
//! Intel's AMX tiles (`tdpbf16ps`).
//!
//! Sapphire Rapids and later Xeons have, beside AVX-512, a tile unit: eight 1 KiB tile
//! registers and one instruction that multiplies a 16 × 32 bf16 tile by a 32 × 16 one into
//! a 16 × 16 f32 tile, 8,192 multiply-adds, issued every 16 cycles: 512 bf16 multiply-adds
//! a cycle a core, where that CPU's AVX-512 runs 32 (`vdpbf16ps`, one port) or 64 int8
//! ones in two terms' worth of `vpdpbusd` (two ports; `q8_bf16`'s header). A prompt's
//! products are bound by arithmetic, so the tiles take them where the CPU has them.
//!
//! The operands are `q8_bf16`'s, unchanged: the activations rounded to bf16 pairs
//! ([`BfRows`]: 16 tokens of one 32-value block are one `A` tile of 16 rows × 64 bytes,
//! a row stride apart) and a weight tile widened to bf16 pairs (`pack_tile`'s layout:
//! pair `kk` of 16 weight rows is 64 contiguous bytes, so one 32-value block of a
//! 16-row weight tile is one `B` tile, 1 KiB contiguous). One 32-value block is exactly
//! one full-width `tdpbf16ps`, so each block's sum is a tile from zero, stored and folded
//! into the f32 outputs with its block scale by AVX-512 (`acc = fma(s, f32(dw_b), acc)`),
//! as `q8_bf16`'s register tiles do. A row tile (16 tokens) runs against the two weight
//! tiles of a pair, software-pipelined over the blocks: block `b`'s two products issue
//! into one set of two sum tiles while block `b − 1`'s set is stored and block `b − 2`'s
//! stored sums are folded, so the tile unit, the stores and the vector FMAs overlap.
//!
//! **Numerics:** per output, each block's sum `s` is the tile unit's from 0 over the
//! block's 16 pairs, then `acc = fma(s, f32(dw_b), acc)` over blocks in order from 0:
//! `q8_bf16`'s arithmetic, except that the tile unit rounds a few block sums in the last
//! place differently from `vdpbf16ps`'s chain (on a Sapphire Rapids, 249 of 256 sums
//! equal: `which_sum_the_tiles_take`; outputs within 1.5e-7 of their row's largest). So
//! a CPU with AMX gives its own logits, as any bf16 kernel does, and never depends on the
//! batch: prompt rows always take the tiles there. The tile code is written once over
//! [`Tiles`]: the hardware ([`Amx`], inline assembly, as the tile intrinsics are not
//! stable Rust) and a scalar model of the same instructions (`Emulated`, in the tests),
//! against which the driver's indexing is tested bit for bit on any machine.
//!
//! The expanded (prefill) attention's two products (`prefill_bf16`: queries × keys,
//! probabilities × values) have no block scales, so there ([`dense`]) the sums stay in the
//! tiles over the whole summed dimension: two row tiles by two column tiles a step, four
//! `tdpbf16ps` per four tile loads, stored once at the end. On a 16-core Sapphire Rapids
//! that made a q8 prefill of 2,048 tokens 1.14× and of 4,096 1.18-1.20× faster.
//!
//! Linux hands out tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
//! [`available`] asks once per process, and is false where the kernel refuses.
//! `DSV2_AMX=0` turns the tiles off (the prompt rows then take the CPU's other path).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use dsv2_core::quant::{BLOCK, TILE};
use half::f16;

use crate::kernels::SyncPtr;
use crate::q8_bf16::BfRows;

/// Pairs of one 32-value block: the rows of one `B` tile.
const BLOCK_PAIRS: usize = BLOCK / 2;
/// Floats of one 16 × 16 f32 tile.
const C_TILE: usize = TILE * TILE;
/// Bytes of one tile row (16 pairs, or 16 floats).
const ROW_BYTES: usize = 64;
/// Outputs of a pair of weight tiles.
const PAIR_COLS: usize = 2 * TILE;

/// Whether this CPU runs [`pair`] and [`dense`] on its tiles: AMX-TILE and AMX-BF16
/// present, the bf16 kernels allowed ([`crate::flash_bf16::available`]: AVX-512 BF16,
/// `DSV2_CPU_ISA` native), `DSV2_AMX` not `0`, and the tile state granted by the OS.
/// Checked once.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("DSV2_AMX").map_or(true, |v| v != "0")
                && crate::flash_bf16::available()
                && x86::has_amx_bf16()
                && x86::request_tile_state()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The tile instructions [`pair`] and [`dense`] run: [`Amx`] on the hardware, `Emulated`
/// (tests) as a scalar model. In [`pair`] two sets of two sum tiles, `S` = 0 or 1,
/// alternate between blocks; in [`dense`] four sums accumulate over a whole product.
pub(crate) trait Tiles {
    /// Configures the calling thread's tiles: all eight 16 rows × 64 bytes.
    ///
    /// # Safety
    /// On [`Amx`], [`available`] must hold.
    unsafe fn configure(&mut self);

    /// Releases the calling thread's tile state.
    ///
    /// # Safety
    /// As [`Tiles::configure`], after it on this thread.
    unsafe fn release(&mut self);

    /// One block's sums of a row tile against two weight tiles into set `S`: for weight
    /// tile `j`, row `r` and column `n`, sum `(j, r, n)` of the set is `Σ_kk a[r·stride +
    /// kk] · b[j][16kk + n]` over the 16 pairs `kk` (a pair's two products as the tile
    /// unit takes them), from 0. `stride` is in bytes.
    ///
    /// # Safety
    /// After [`Tiles::configure`] on this thread; `a` readable for 16 rows of 64 bytes
    /// `stride` apart, `b[j]` for 1 KiB each.
    unsafe fn compute<const S: usize>(&mut self, a: *const u32, stride: usize, b: [*const u32; 2]);

    /// Stores set `S`: sum `(j, r, n)` to `c[256j + 16r + n]`.
    ///
    /// # Safety
    /// After [`Tiles::compute`] into set `S`; `c` writable for 2 KiB, 64-byte aligned.
    unsafe fn store<const S: usize>(&mut self, c: *mut f32);

    /// Zeroes the four sums of [`Tiles::accumulate`].
    ///
    /// # Safety
    /// After [`Tiles::configure`] on this thread.
    unsafe fn zero_sums(&mut self);

    /// One step of 16 pairs of `R` (1 or 2) row tiles against two column tiles,
    /// accumulated into the sums: sum `(i, j)`, row `r`, column `n` takes `Σ_kk
    /// a[(16i + r)·a_stride + kk] · b[j][kk·b_stride + n]` over the 16 pairs `kk`, in
    /// order, as the tile unit sums. Strides are in bytes.
    ///
    /// # Safety
    /// After [`Tiles::configure`] on this thread; `a` readable for `16R` rows of 64
    /// bytes, `b[j]` for 16 rows of 64 bytes.
    unsafe fn accumulate<const R: usize>(
        &mut self,
        a: *const u32,
        a_stride: usize,
        b: [*const u32; 2],
        b_stride: usize,
    );

    /// Stores the sums of `R` row tiles: sum `(i, j)`, row `r`, column `n` to
    /// `c[(16i + r)·c_stride + 16j + n]` (`c_stride` in bytes).
    ///
    /// # Safety
    /// After [`Tiles::zero_sums`]; those floats of `c` writable.
    unsafe fn store_sums<const R: usize>(&mut self, c: *mut f32, c_stride: usize);

    /// One step of 16 pairs of four row tiles against one column tile, accumulated into
    /// the sums of [`Tiles::zero_sums`]: sum `i`, row `r`, column `n` takes `Σ_kk
    /// a[i][r·a_stride + kk] · b[16kk + n]` over the 16 pairs `kk`, in order, as the tile
    /// unit sums (`b` is one contiguous tile; `a_stride` is in bytes). The decode
    /// attention's scores (`flash_tiles`): four tiles of cache rows against a query group.
    ///
    /// # Safety
    /// After [`Tiles::configure`] on this thread; each `a[i]` readable for 16 rows of 64
    /// bytes, `b` for 1 KiB.
    unsafe fn accumulate_rows(&mut self, a: [*const u32; 4], a_stride: usize, b: *const u32);

    /// Stores the four sums one after the other: sum `i`, row `r`, column `n` to `c[256i +
    /// 16r + n]`.
    ///
    /// # Safety
    /// After [`Tiles::zero_sums`]; `c` writable for 4 KiB.
    unsafe fn store_four(&mut self, c: *mut f32);
}

/// The tile unit itself.
pub(crate) struct Amx;

/// 64-byte aligned floats: a tile's store is line by line.
#[repr(C, align(64))]
struct Lines<const N: usize>([f32; N]);

/// One packed pair of weight tiles of a product and where its outputs go: `nt` tiles (1
/// or 2) from tile `t0`, `w[j]` packed (`k/2 · 16` pairs, `pack_tile`'s layout) with its
/// block scales `scales[j]` (16 per block; `w[1]`, `scales[1]` ignored for one tile),
/// into `y` (`[m, n]`: columns of tiles `t0..t0 + nt`, those past `n` dropped).
#[derive(Clone, Copy)]
pub(crate) struct PairJob<'a> {
    pub w: [&'a [u32]; 2],
    pub scales: [&'a [f16]; 2],
    pub nt: usize,
    pub t0: usize,
    pub y: SyncPtr,
    pub n: usize,
}

impl PairJob<'_> {
    fn check(&self, k: usize) {
        let nb = k / BLOCK;
        assert!((1..=2).contains(&self.nt) && self.t0 * TILE < self.n);
        for j in 0..self.nt {
            assert!(self.w[j].len() >= k / 2 * TILE && self.scales[j].len() >= nb * TILE);
        }
    }
}

/// Every row of `x` against the packed pair of `job`: `q8_bf16`'s `run_pair` on the
/// tiles. The lines of `prefetch` (the next pair's stored weights) are fetched into cache
/// meanwhile, spread over the blocks.
///
/// # Safety
/// On [`Amx`], [`available`] must hold; no one else may access the job's outputs of its
/// `y` meanwhile.
pub(crate) unsafe fn pair<T: Tiles>(tiles: &mut T, x: &BfRows, job: &PairJob<'_>, prefetch: &[u8]) {
    // SAFETY: the caller's contract.
    unsafe { pair_with::<T, true>(tiles, x, job, prefetch) }
}

/// [`pair`], or with `FOLD` false its tile work alone (the block sums computed and
/// stored, never folded into outputs: `amx_speed`'s ceiling; the outputs are then
/// meaningless).
///
/// # Safety
/// As [`pair`].
unsafe fn pair_with<T: Tiles, const FOLD: bool>(
    tiles: &mut T,
    x: &BfRows,
    job: &PairJob<'_>,
    prefetch: &[u8],
) {
    let (m, k) = (x.m(), x.k());
    let nb = k / BLOCK;
    assert!(k.is_multiple_of(BLOCK));
    job.check(k);
    // Tiles read whole tiles of 16 rows, the first 64 bytes of a block per row.
    assert!(x.readable_rows() >= m.next_multiple_of(TILE) && x.stride() >= k / 2);
    let stride = x.stride() * 4;
    let lines = prefetch.len().div_ceil(64);
    let lines_per_block = lines.div_ceil(m.div_ceil(TILE) * nb);
    let mut fetched = 0;
    let last = job.nt - 1;
    let weights = |b: usize| {
        // SAFETY: block b of each packed tile is 1 KiB at 256b (lengths checked above).
        unsafe {
            [
                job.w[0].as_ptr().add(b * C_TILE),
                job.w[last].as_ptr().add(b * C_TILE),
            ]
        }
    };
    let dw = |b: usize| {
        [
            &job.scales[0][b * TILE..][..TILE],
            &job.scales[last][b * TILE..][..TILE],
        ]
    };
    // Stored sums of blocks b − 1 (being stored) and b − 2 (being folded), by parity.
    let mut c = [Lines([0.0f32; 2 * C_TILE]), Lines([0.0f32; 2 * C_TILE])];
    // 16 tokens × the pair's 32 outputs.
    let mut acc = Lines([0.0f32; TILE * PAIR_COLS]);
    // SAFETY: the caller's contract.
    unsafe { tiles.configure() };
    for r0 in (0..m).step_by(TILE) {
        let a = x.row_ptr(r0);
        acc.0.fill(0.0);
        for b in 0..nb + 2 {
            // SAFETY: pairs 16b.. of rows r0..r0 + 16 lie in the rounded buffer (whole
            // tiles of 16 rows, checked above); each set is computed before it is
            // stored, and stored before it is computed again.
            unsafe {
                if b < nb {
                    let a = a.add(b * BLOCK_PAIRS);
                    if b % 2 == 0 {
                        tiles.compute::<0>(a, stride, weights(b));
                    } else {
                        tiles.compute::<1>(a, stride, weights(b));
                    }
                }
                if (1..=nb).contains(&b) {
                    let to = c[(b - 1) % 2].0.as_mut_ptr();
                    if (b - 1) % 2 == 0 {
                        tiles.store::<0>(to);
                    } else {
                        tiles.store::<1>(to);
                    }
                }
            }
            if FOLD && b >= 2 {
                fold(&c[b % 2].0, dw(b - 2), &mut acc.0);
            }
            for _ in 0..lines_per_block.min(lines - fetched) {
                prefetch_line(prefetch, fetched);
                fetched += 1;
            }
        }
        let rows = (m - r0).min(TILE);
        for i in 0..rows {
            for j in 0..job.nt {
                let col = (job.t0 + j) * TILE;
                let width = TILE.min(job.n - col);
                // SAFETY: row r0 + i, columns col..col + width of the job's `y` ([m, n]):
                // the caller's contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        acc.0[i * PAIR_COLS + j * TILE..].as_ptr(),
                        job.y.get().add((r0 + i) * job.n + col),
                        width,
                    )
                };
            }
        }
    }
    // SAFETY: configured above.
    unsafe { tiles.release() };
}

/// Rows of `A` one call of [`dense`] takes at most: two row tiles.
pub(crate) const DENSE_ROWS: usize = 2 * TILE;

/// `prefill_bf16::tile` on the tiles: `C[i][j] = Σ_kk A[i][kk] · B[kk][j]` for rows
/// `0..rows` (at most [`DENSE_ROWS`]) and columns `0..col_end` (a multiple of 64), the
/// sums kept in the tile unit over all of `kk`. `A` is bf16 pairs, row `i` at `a[i ·
/// a_stride..]`; `B` is packed as `prefill_bf16::pack_rows` does, column tile `t` of 64
/// columns at `b[t · kp · 64..]`, pair row `kk` of it 64 values (256 bytes) long. `C` row
/// `i` is `c[i · c_stride..]`. Pairs `kk_end..` up to the next multiple of 16 are read
/// too and must be 0 in `A` (or in `B`).
///
/// # Safety
/// On [`Amx`], [`available`] must hold. `a` readable for `rows` rounded up to 16 rows of
/// `kk_end` rounded up to 16 pairs (`a_stride` apart, in pairs), `b` for `kp · col_end`
/// values with `kp` at least `kk_end` rounded up to 16, and `c` writable for `rows`
/// rounded up to 16 rows of `col_end` floats, `c_stride` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dense<T: Tiles>(
    tiles: &mut T,
    a: *const u32,
    a_stride: usize,
    rows: usize,
    kk_end: usize,
    b: *const u32,
    kp: usize,
    col_end: usize,
    c: *mut f32,
    c_stride: usize,
) {
    assert!((1..=DENSE_ROWS).contains(&rows) && col_end.is_multiple_of(64));
    let steps = kk_end.div_ceil(BLOCK_PAIRS);
    assert!(
        steps * BLOCK_PAIRS <= kp,
        "B holds {kp} pairs, not {}",
        steps * BLOCK_PAIRS
    );
    let two = rows > TILE;
    // SAFETY: the caller's contract covers every row, pair and column read or written.
    unsafe {
        tiles.configure();
        for t0 in (0..col_end).step_by(64) {
            let bt = b.add(t0 * kp);
            for half in 0..2 {
                tiles.zero_sums();
                for s in 0..steps {
                    let a = a.add(s * BLOCK_PAIRS);
                    let bs = bt.add(s * BLOCK_PAIRS * 64 + half * 2 * TILE);
                    let b = [bs, bs.add(TILE)];
                    if two {
                        tiles.accumulate::<2>(a, a_stride * 4, b, 256);
                    } else {
                        tiles.accumulate::<1>(a, a_stride * 4, b, 256);
                    }
                }
                let c = c.add(t0 + half * 2 * TILE);
                if two {
                    tiles.store_sums::<2>(c, c_stride * 4);
                } else {
                    tiles.store_sums::<1>(c, c_stride * 4);
                }
            }
        }
        tiles.release();
    }
}

/// Fetches the `l`-th 64-byte line of `values` into the cache (a hint; also
/// `flash_tiles`'). Past the slice's end it does nothing.
#[inline(always)]
pub(crate) fn prefetch_line<T>(values: &[T], l: usize) {
    if 64 * l >= std::mem::size_of_val(values) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch of any address is harmless (this one is in the slice).
    unsafe {
        use std::arch::x86_64::*;
        _mm_prefetch::<_MM_HINT_T0>((values.as_ptr() as *const i8).add(64 * l))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, l);
}

/// For weight tile `j`, token `r` and column `n`: `acc[32r + 16j + n] = fma(c[256j + 16r +
/// n], f32(dw[j][n]), acc[32r + 16j + n])`.
fn fold(c: &[f32; 2 * C_TILE], dw: [&[f16]; 2], acc: &mut [f32; TILE * PAIR_COLS]) {
    #[cfg(target_arch = "x86_64")]
    if crate::flash_bf16::available() {
        // SAFETY: AVX-512 F (implied by the bf16 kernels).
        return unsafe { x86::fold(c, dw, acc) };
    }
    fold_reference(c, dw, acc)
}

/// [`fold`], one value at a time.
fn fold_reference(c: &[f32; 2 * C_TILE], dw: [&[f16]; 2], acc: &mut [f32; TILE * PAIR_COLS]) {
    for (j, dw) in dw.iter().enumerate() {
        for r in 0..TILE {
            for n in 0..TILE {
                let a = &mut acc[r * PAIR_COLS + TILE * j + n];
                *a = c[j * C_TILE + TILE * r + n].mul_add(dw[n].to_f32(), *a);
            }
        }
    }
}

/// A thread's peak rate on the tiles: `rounds` rounds of 12 `tdpbf16ps` into four
/// independent sum tiles, in registers; returns the multiply-adds done.
///
/// # Panics
/// If [`available`] is false.
pub(crate) fn peak_macs(rounds: usize) -> u64 {
    assert!(available(), "AMX tiles are not available");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the tile state is granted (checked above).
    unsafe {
        x86::configure();
        for _ in 0..rounds {
            for _ in 0..crate::peak::CHAINS / 4 {
                std::arch::asm!(
                    "tdpbf16ps tmm4, tmm0, tmm2",
                    "tdpbf16ps tmm5, tmm0, tmm3",
                    "tdpbf16ps tmm6, tmm1, tmm2",
                    "tdpbf16ps tmm7, tmm1, tmm3",
                    options(nostack, nomem),
                );
            }
        }
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
    (rounds * crate::peak::CHAINS * TILE * TILE * BLOCK) as u64
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Amx {
    unsafe fn configure(&mut self) {
        // SAFETY: the caller's contract (the OS granted the tile state).
        unsafe { x86::configure() }
    }

    unsafe fn release(&mut self) {
        // SAFETY: as `configure`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) }
    }

    // tmm0: the row tile; tmm1, tmm2: the weight tiles; set 0 in tmm4, tmm5, set 1 in
    // tmm6, tmm7 (weight tile j in the set's j-th).
    #[inline(always)]
    unsafe fn compute<const S: usize>(&mut self, a: *const u32, stride: usize, b: [*const u32; 2]) {
        macro_rules! compute {
            ($c0:literal, $c1:literal) => {
                // SAFETY: the trait's contract.
                unsafe {
                    std::arch::asm!(
                        concat!("tilezero ", $c0),
                        concat!("tilezero ", $c1),
                        "tileloadd tmm0, [{a} + {s}*1]",
                        "tileloadd tmm1, [{b0} + {l}*1]",
                        "tileloadd tmm2, [{b1} + {l}*1]",
                        concat!("tdpbf16ps ", $c0, ", tmm0, tmm1"),
                        concat!("tdpbf16ps ", $c1, ", tmm0, tmm2"),
                        a = in(reg) a,
                        s = in(reg) stride,
                        b0 = in(reg) b[0],
                        b1 = in(reg) b[1],
                        l = in(reg) ROW_BYTES,
                        options(nostack, readonly),
                    )
                }
            };
        }
        if S == 0 {
            compute!("tmm4", "tmm5")
        } else {
            compute!("tmm6", "tmm7")
        }
    }

    #[inline(always)]
    unsafe fn store<const S: usize>(&mut self, c: *mut f32) {
        macro_rules! store {
            ($c0:literal, $c1:literal) => {
                // SAFETY: the trait's contract.
                unsafe {
                    std::arch::asm!(
                        concat!("tilestored [{c} + {l}*1], ", $c0),
                        concat!("tilestored [{c} + {l}*1 + 1024], ", $c1),
                        c = in(reg) c,
                        l = in(reg) ROW_BYTES,
                        options(nostack),
                    )
                }
            };
        }
        if S == 0 {
            store!("tmm4", "tmm5")
        } else {
            store!("tmm6", "tmm7")
        }
    }

    // The sums of row tile i and column tile j in tmm(4 + 2i + j); the row tiles in tmm0,
    // tmm1, the column tiles in tmm2, tmm3.
    unsafe fn zero_sums(&mut self) {
        // SAFETY: the trait's contract.
        unsafe {
            std::arch::asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            )
        }
    }

    #[inline(always)]
    unsafe fn accumulate<const R: usize>(
        &mut self,
        a: *const u32,
        a_stride: usize,
        b: [*const u32; 2],
        b_stride: usize,
    ) {
        // SAFETY: the trait's contract.
        unsafe {
            if R == 2 {
                std::arch::asm!(
                    "tileloadd tmm0, [{a0} + {sa}*1]",
                    "tileloadd tmm2, [{b0} + {sb}*1]",
                    "tileloadd tmm3, [{b1} + {sb}*1]",
                    "tileloadd tmm1, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm4, tmm0, tmm2",
                    "tdpbf16ps tmm5, tmm0, tmm3",
                    "tdpbf16ps tmm6, tmm1, tmm2",
                    "tdpbf16ps tmm7, tmm1, tmm3",
                    a0 = in(reg) a,
                    a1 = in(reg) a.byte_add(TILE * a_stride),
                    sa = in(reg) a_stride,
                    b0 = in(reg) b[0],
                    b1 = in(reg) b[1],
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            } else {
                std::arch::asm!(
                    "tileloadd tmm0, [{a0} + {sa}*1]",
                    "tileloadd tmm2, [{b0} + {sb}*1]",
                    "tileloadd tmm3, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm4, tmm0, tmm2",
                    "tdpbf16ps tmm5, tmm0, tmm3",
                    a0 = in(reg) a,
                    sa = in(reg) a_stride,
                    b0 = in(reg) b[0],
                    b1 = in(reg) b[1],
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
        }
    }

    // The sums in tmm4..tmm7; the column tile in tmm0, the row tiles in turn in tmm1,
    // tmm2, tmm3, tmm1 (the unit waits for a tile's last reader before reloading it).
    #[inline(always)]
    unsafe fn accumulate_rows(&mut self, a: [*const u32; 4], a_stride: usize, b: *const u32) {
        // SAFETY: the trait's contract.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm0, [{b} + {l}*1]",
                "tileloadd tmm1, [{a0} + {s}*1]",
                "tdpbf16ps tmm4, tmm1, tmm0",
                "tileloadd tmm2, [{a1} + {s}*1]",
                "tdpbf16ps tmm5, tmm2, tmm0",
                "tileloadd tmm3, [{a2} + {s}*1]",
                "tdpbf16ps tmm6, tmm3, tmm0",
                "tileloadd tmm1, [{a3} + {s}*1]",
                "tdpbf16ps tmm7, tmm1, tmm0",
                a0 = in(reg) a[0],
                a1 = in(reg) a[1],
                a2 = in(reg) a[2],
                a3 = in(reg) a[3],
                s = in(reg) a_stride,
                b = in(reg) b,
                l = in(reg) ROW_BYTES,
                options(nostack, readonly),
            )
        }
    }

    #[inline(always)]
    unsafe fn store_four(&mut self, c: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe {
            std::arch::asm!(
                "tilestored [{c} + {l}*1], tmm4",
                "tilestored [{c} + {l}*1 + 1024], tmm5",
                "tilestored [{c} + {l}*1 + 2048], tmm6",
                "tilestored [{c} + {l}*1 + 3072], tmm7",
                c = in(reg) c,
                l = in(reg) ROW_BYTES,
                options(nostack),
            )
        }
    }

    unsafe fn store_sums<const R: usize>(&mut self, c: *mut f32, c_stride: usize) {
        // SAFETY: the trait's contract.
        unsafe {
            std::arch::asm!(
                "tilestored [{c} + {s}*1], tmm4",
                "tilestored [{c} + {s}*1 + 64], tmm5",
                c = in(reg) c,
                s = in(reg) c_stride,
                options(nostack),
            );
            if R == 2 {
                std::arch::asm!(
                    "tilestored [{c} + {s}*1], tmm6",
                    "tilestored [{c} + {s}*1 + 64], tmm7",
                    c = in(reg) c.byte_add(TILE * c_stride),
                    s = in(reg) c_stride,
                    options(nostack),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{C_TILE, PAIR_COLS, TILE};
    use half::f16;
    use std::arch::x86_64::*;

    /// CPUID.(7, 0):EDX bits 24 (AMX-TILE) and 22 (AMX-BF16).
    pub(super) fn has_amx_bf16() -> bool {
        // Leaf 7 exists on every CPU with AVX-512 (checked first by the caller).
        let leaf = __cpuid_count(7, 0);
        leaf.edx >> 24 & 1 == 1 && leaf.edx >> 22 & 1 == 1
    }

    /// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`), which it grants per process; false where refused (an
    /// older kernel, another OS, or the state not enabled in XCR0).
    pub(super) fn request_tile_state() -> bool {
        #[cfg(target_os = "linux")]
        {
            const SYS_ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            let ret: i64;
            // SAFETY: a system call that changes no memory of ours; rcx and r11 are
            // clobbered by `syscall`.
            unsafe {
                std::arch::asm!(
                    "syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack),
                )
            };
            ret == 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The tile configuration: palette 1, tiles 0-7 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut t = 0;
        while t < 8 {
            bytes[16 + 2 * t] = super::ROW_BYTES as u8;
            bytes[48 + t] = TILE as u8;
            t += 1;
        }
        Config(bytes)
    };

    /// `ldtilecfg` of [`CONFIG`] (which also zeroes every tile).
    ///
    /// # Safety
    /// The tile state granted ([`super::available`]).
    pub(super) unsafe fn configure() {
        // SAFETY: the caller's contract; CONFIG is 64 readable bytes.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{}]",
                in(reg) &CONFIG as *const Config,
                options(nostack, readonly),
            )
        }
    }

    /// [`super::fold`] in vectors of 16.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold(
        c: &[f32; 2 * C_TILE],
        dw: [&[f16]; 2],
        acc: &mut [f32; TILE * PAIR_COLS],
    ) {
        assert!(dw[0].len() >= TILE && dw[1].len() >= TILE);
        // SAFETY (all loads and stores): 16 scales per slice (checked above); row r of
        // sum tile j and accumulator row r, half j, lie in the arrays.
        unsafe {
            let d = [
                _mm512_cvtph_ps(_mm256_loadu_si256(dw[0].as_ptr() as *const _)),
                _mm512_cvtph_ps(_mm256_loadu_si256(dw[1].as_ptr() as *const _)),
            ];
            for r in 0..TILE {
                for (j, d) in d.iter().enumerate() {
                    let s = _mm512_load_ps(c.as_ptr().add(j * C_TILE + TILE * r));
                    let a = acc.as_mut_ptr().add(r * PAIR_COLS + TILE * j);
                    _mm512_store_ps(a, _mm512_fmadd_ps(s, *d, _mm512_load_ps(a)));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::q8_bf16::{pack_tile_reference, packed_len};
    use crate::test_values;
    use dsv2_core::quant::{quantize_rows, QuantFormat};

    /// The tile instructions as scalar Rust: each block's sum the chain of `vdpbf16ps`
    /// steps ([`crate::flash_bf16::dp`]) that `q8_bf16`'s reference takes.
    pub(crate) struct Emulated {
        sets: [[f32; 2 * C_TILE]; 2],
        sums: [[f32; C_TILE]; 4],
    }

    impl Emulated {
        pub(crate) fn new() -> Emulated {
            Emulated {
                sets: [[f32::NAN; 2 * C_TILE]; 2],
                sums: [[f32::NAN; C_TILE]; 4],
            }
        }
    }

    impl Tiles for Emulated {
        unsafe fn configure(&mut self) {
            self.sets = [[0.0; 2 * C_TILE]; 2];
        }

        unsafe fn release(&mut self) {}

        unsafe fn compute<const S: usize>(
            &mut self,
            a: *const u32,
            stride: usize,
            b: [*const u32; 2],
        ) {
            for (j, bj) in b.iter().enumerate() {
                for r in 0..TILE {
                    for n in 0..TILE {
                        let mut s = 0.0f32;
                        for kk in 0..BLOCK_PAIRS {
                            // SAFETY: the trait's contract.
                            let (x, w) = unsafe {
                                (*a.byte_add(r * stride).add(kk), *bj.add(TILE * kk + n))
                            };
                            s = crate::flash_bf16::dp(s, x, w);
                        }
                        self.sets[S][j * C_TILE + TILE * r + n] = s;
                    }
                }
            }
        }

        unsafe fn store<const S: usize>(&mut self, c: *mut f32) {
            // SAFETY: the trait's contract.
            unsafe { std::ptr::copy_nonoverlapping(self.sets[S].as_ptr(), c, 2 * C_TILE) };
        }

        unsafe fn zero_sums(&mut self) {
            self.sums = [[0.0; C_TILE]; 4];
        }

        unsafe fn accumulate<const R: usize>(
            &mut self,
            a: *const u32,
            a_stride: usize,
            b: [*const u32; 2],
            b_stride: usize,
        ) {
            for i in 0..R {
                for (j, bj) in b.iter().enumerate() {
                    for r in 0..TILE {
                        for n in 0..TILE {
                            let s = &mut self.sums[2 * i + j][TILE * r + n];
                            for kk in 0..BLOCK_PAIRS {
                                // SAFETY: the trait's contract.
                                let (x, w) = unsafe {
                                    (
                                        *a.byte_add((TILE * i + r) * a_stride).add(kk),
                                        *bj.byte_add(kk * b_stride).add(n),
                                    )
                                };
                                *s = crate::flash_bf16::dp(*s, x, w);
                            }
                        }
                    }
                }
            }
        }

        unsafe fn store_sums<const R: usize>(&mut self, c: *mut f32, c_stride: usize) {
            for i in 0..R {
                for j in 0..2 {
                    for r in 0..TILE {
                        // SAFETY: the trait's contract.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.sums[2 * i + j][TILE * r..].as_ptr(),
                                c.byte_add((TILE * i + r) * c_stride).add(TILE * j),
                                TILE,
                            )
                        };
                    }
                }
            }
        }

        unsafe fn accumulate_rows(&mut self, a: [*const u32; 4], a_stride: usize, b: *const u32) {
            for (i, ai) in a.iter().enumerate() {
                for r in 0..TILE {
                    for n in 0..TILE {
                        // SAFETY: the trait's contract.
                        self.step(i, r, n, |kk| unsafe {
                            (*ai.byte_add(r * a_stride).add(kk), *b.add(TILE * kk + n))
                        });
                    }
                }
            }
        }

        unsafe fn store_four(&mut self, c: *mut f32) {
            for (i, sum) in self.sums.iter().enumerate() {
                // SAFETY: the trait's contract.
                unsafe { std::ptr::copy_nonoverlapping(sum.as_ptr(), c.add(C_TILE * i), C_TILE) };
            }
        }
    }

    impl Emulated {
        /// Sum `i`'s value at row `r`, column `n` takes one step of 16 pairs.
        fn step(&mut self, i: usize, r: usize, n: usize, pairs: impl Fn(usize) -> (u32, u32)) {
            let s = &mut self.sums[i][TILE * r + n];
            for kk in 0..BLOCK_PAIRS {
                let (x, w) = pairs(kk);
                *s = crate::flash_bf16::dp(*s, x, w);
            }
        }
    }

    /// Packed q8 weight tiles of `n` rows (whole tiles) and their scales.
    fn weights(n: usize, k: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<f16>>) {
        let w = test_values(n * k, seed);
        let mut q = vec![0u8; n * k];
        let mut scales = vec![f16::ZERO; n * k / BLOCK];
        quantize_rows(QuantFormat::Q8, &w, k, &mut q, &mut scales);
        let tiles = n / TILE;
        let packed = (0..tiles)
            .map(|t| {
                let mut p = vec![0u32; packed_len(k)];
                pack_tile_reference(&q[t * TILE * k..][..TILE * k], k, &mut p);
                p
            })
            .collect();
        let scales = (0..tiles)
            .map(|t| scales[t * TILE * k / BLOCK..][..TILE * k / BLOCK].to_vec())
            .collect();
        (packed, scales)
    }

    /// The reference: `q8_bf16`'s per-output chain over the same operands.
    fn reference(x: &BfRows, w: &[u32], s: &[f16], i: usize, r: usize) -> f32 {
        let xr = unsafe { std::slice::from_raw_parts(x.row_ptr(i), x.k() / 2) };
        let mut acc = 0.0f32;
        for b in 0..x.k() / BLOCK {
            let mut sum = 0.0f32;
            for kk in b * BLOCK_PAIRS..(b + 1) * BLOCK_PAIRS {
                sum = crate::flash_bf16::dp(sum, xr[kk], w[kk * TILE + r]);
            }
            acc = sum.mul_add(s[b * TILE + r].to_f32(), acc);
        }
        acc
    }

    /// Runs [`pair`] on `T` for every shape of rows (1..=97: whole and ragged row tiles),
    /// of `k` (3 and 19 blocks) and of the pair (one pair, one tile, ragged output widths), and checks every
    /// output against the reference: bit for bit when `exact`, else returns the largest
    /// difference relative to the row's largest output.
    fn check<T: Tiles>(tiles: &mut T, exact: bool) -> f32 {
        let mut worst = 0.0f32;
        for k in [96, 608] {
            worst = worst.max(check_width(tiles, exact, k));
        }
        worst
    }

    fn check_width<T: Tiles>(tiles: &mut T, exact: bool, k: usize) -> f32 {
        let (w, s) = weights(32, k, 7);
        let wl = [&w[0][..], &w[1][..]];
        let sl = [&s[0][..], &s[1][..]];
        let shapes = [(2, 32), (1, 16), (2, 29), (1, 7)];
        let mut worst = 0.0f32;
        for m in [1, 5, 16, 17, 31, 32, 33, 48, 70, 97] {
            let xs = test_values(m * k, m as u64);
            let mut x = BfRows::default();
            x.round_for(&xs, m, k, true);
            let mut ys: Vec<Vec<f32>> =
                shapes.iter().map(|&(_, n)| vec![f32::NAN; m * n]).collect();
            for (&(nt, n), y) in shapes.iter().zip(&mut ys) {
                let job = PairJob {
                    w: wl,
                    scales: sl,
                    nt,
                    t0: 0,
                    y: SyncPtr(y.as_mut_ptr()),
                    n,
                };
                // SAFETY: `y` is ours; `x` rounded for the tiles.
                unsafe { pair(tiles, &x, &job, &[0u8; 300]) };
            }
            for (&(_, n), y) in shapes.iter().zip(&ys) {
                for i in 0..m {
                    let top = (0..n)
                        .map(|c| reference(&x, wl[c / TILE], sl[c / TILE], i, c % TILE).abs())
                        .fold(0.0f32, f32::max);
                    for c in 0..n {
                        let want = reference(&x, wl[c / TILE], sl[c / TILE], i, c % TILE);
                        let got = y[i * n + c];
                        if exact {
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "m {m} n {n} row {i} col {c}"
                            );
                        }
                        worst = worst.max((got - want).abs() / top.max(f32::MIN_POSITIVE));
                    }
                }
            }
        }
        worst
    }

    /// [`dense`] on `T` against `prefill_bf16`'s reference chain on every shape (1-32 rows,
    /// ragged `kk_end`, one or two column tiles, strided rows): equal values (a chain
    /// over the zero pairs past `kk_end` may turn a -0 into +0) when `exact`, else the
    /// largest difference relative to the row's largest output.
    fn check_dense<T: Tiles>(tiles: &mut T, exact: bool) -> f32 {
        let mut worst = 0.0f32;
        for (rows, kk_end, col_end) in [
            (1usize, 1usize, 64usize),
            (5, 16, 64),
            (16, 17, 128),
            (17, 96, 64),
            (32, 40, 128),
            (31, 7, 64),
        ] {
            let kp = kk_end.next_multiple_of(16) + 16;
            let a_stride = kp + 3;
            let r16 = rows.next_multiple_of(16);
            let bits = |v: Vec<f32>| -> Vec<u32> {
                v.chunks_exact(2)
                    .map(|p| {
                        crate::flash_bf16::pair(
                            crate::flash_bf16::round(p[0]),
                            crate::flash_bf16::round(p[1]),
                        )
                    })
                    .collect()
            };
            let mut a = bits(test_values(2 * r16 * a_stride, (rows * kk_end) as u64));
            for i in 0..r16 {
                a[i * a_stride + kk_end..(i + 1) * a_stride].fill(0);
            }
            let b = bits(test_values(2 * kp * col_end, (kk_end + col_end) as u64));
            let c_stride = col_end + 16;
            let mut c = vec![f32::NAN; r16 * c_stride];
            // SAFETY: the buffers hold what `dense` reads and writes.
            unsafe {
                dense(
                    tiles,
                    a.as_ptr(),
                    a_stride,
                    rows,
                    kk_end,
                    b.as_ptr(),
                    kp,
                    col_end,
                    c.as_mut_ptr(),
                    c_stride,
                )
            };
            let mut want = vec![0.0f32; r16 * c_stride];
            let t = crate::prefill_bf16::Tile {
                a: &a,
                a_stride,
                rows: 1,
                kk_end,
                b: &b,
                kp,
                col_end,
                c_stride,
            };
            for i in 0..rows {
                crate::prefill_bf16::tile_reference(
                    crate::prefill_bf16::Tile {
                        a: &a[i * a_stride..],
                        ..t
                    },
                    &mut want[i * c_stride..],
                );
                let top = want[i * c_stride..][..col_end]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                for j in 0..col_end {
                    let (got, want) = (c[i * c_stride + j], want[i * c_stride + j]);
                    if exact {
                        assert!(
                            got == want,
                            "rows {rows} kk {kk_end} row {i} col {j}: {got} {want}"
                        );
                    }
                    worst = worst.max((got - want).abs() / top.max(f32::MIN_POSITIVE));
                }
            }
        }
        worst
    }

    /// Both drivers' indexing on the scalar model of the tiles: the q8 pairs bit for bit,
    /// the dense tiles equal to the reference chain.
    #[test]
    fn the_drivers_match_the_reference_on_the_model() {
        check(&mut Emulated::new(), true);
        check_dense(&mut Emulated::new(), true);
    }

    /// On a CPU with AMX: both drivers on the tiles against the same references.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_tiles_match_the_reference() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        for (what, worst) in [
            (
                "q8 pairs against the vdpbf16ps chain",
                check(&mut Amx, false),
            ),
            (
                "dense tiles against the chain",
                check_dense(&mut Amx, false),
            ),
        ] {
            eprintln!("AMX {what}: largest difference {worst:e} of the row's largest output");
            assert!(worst <= 1e-6, "{what}: {worst:e}");
        }
    }

    /// On a CPU with AMX: which arithmetic one block's sum in the tiles is, printed as the
    /// outputs each model of it matches bit for bit (odd element of a pair first, as
    /// `vdpbf16ps`; even first; each pair's two products summed exactly, then added;
    /// the whole block summed exactly, then rounded once).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn which_sum_the_tiles_take() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let widen = |b: u32| f32::from_bits(b << 16) as f64;
        let xs = test_values(TILE * BLOCK, 11);
        let mut x = BfRows::default();
        x.round_for(&xs, TILE, BLOCK, true);
        let (w, _) = weights(2 * TILE, BLOCK, 12);
        let mut c = Lines([0.0f32; 2 * C_TILE]);
        // SAFETY: AMX available; one row tile of 16 rows, two weight tiles, two sums.
        unsafe {
            let tiles = &mut Amx;
            tiles.configure();
            tiles.compute::<0>(x.row_ptr(0), x.stride() * 4, [w[0].as_ptr(), w[1].as_ptr()]);
            tiles.store::<0>(c.0.as_mut_ptr());
            tiles.release();
        }
        let mut matches = [0usize; 4];
        for r in 0..TILE {
            let xr = unsafe { std::slice::from_raw_parts(x.row_ptr(r), BLOCK_PAIRS) };
            for n in 0..TILE {
                let got = c.0[TILE * r + n];
                let (mut odd, mut even, mut pairs, mut exact) = (0.0f32, 0.0f32, 0.0f32, 0.0f64);
                for kk in 0..BLOCK_PAIRS {
                    let (a, b) = (xr[kk], w[0][kk * TILE + n]);
                    odd = crate::flash_bf16::dp(odd, a, b);
                    let lo = widen(a & 0xFFFF) * widen(b & 0xFFFF);
                    let hi = widen(a >> 16) * widen(b >> 16);
                    even = ((even as f64 + lo) as f32 as f64 + hi) as f32;
                    pairs = (pairs as f64 + (lo + hi)) as f32;
                    exact += lo + hi;
                }
                for (i, v) in [odd, even, pairs, exact as f32].into_iter().enumerate() {
                    matches[i] += (v.to_bits() == got.to_bits()) as usize;
                }
            }
        }
        eprintln!(
            "tdpbf16ps block sums matching, of 256: odd first {}, even first {}, pairs exact {}, block exact {}",
            matches[0], matches[1], matches[2], matches[3]
        );
    }

    /// One pair of weight tiles against a prompt's rows on one core, the operands in
    /// cache: `cargo test --release -p dsv2-cpu --lib amx_speed -- --ignored --nocapture`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn amx_speed() {
        if !available() {
            eprintln!("no AMX tiles on this CPU: skipped");
            return;
        }
        let k = 2048;
        let (w, s) = weights(2 * TILE, k, 21);
        for m in [16, 48, 512] {
            let xs = test_values(m * k, 22);
            let mut x = BfRows::default();
            x.round_for(&xs, m, k, true);
            let mut y = vec![0.0f32; m * 2 * TILE];
            let job = PairJob {
                w: [&w[0], &w[1]],
                scales: [&s[0], &s[1]],
                nt: 2,
                t0: 0,
                y: SyncPtr(y.as_mut_ptr()),
                n: 2 * TILE,
            };
            // SAFETY: AMX available, `y` ours.
            let secs = crate::min_time(10, || unsafe { pair(&mut Amx, &x, &job, &[]) });
            let tiles_alone = crate::min_time(10, || unsafe {
                pair_with::<Amx, false>(&mut Amx, &x, &job, &[])
            });
            let macs = (m * 2 * TILE * k) as f64;
            eprintln!(
                "AMX pair, m={m} k={k}: {:.1} GMAC/s on one core ({:.1} without the folds)",
                macs / secs / 1e9,
                macs / tiles_alone / 1e9
            );
            // Every thread at once, on the same rows and weights, each its own outputs.
            let threads = crate::team::threads();
            let mut ys = vec![0.0f32; threads * m * 2 * TILE];
            let base = SyncPtr(ys.as_mut_ptr());
            let secs = crate::min_time(5, || {
                crate::team::for_each(threads, |t| {
                    let job = PairJob {
                        // SAFETY: thread t's own outputs.
                        y: SyncPtr(unsafe { base.get().add(t * m * 2 * TILE) }),
                        ..job
                    };
                    for _ in 0..4 {
                        // SAFETY: AMX available.
                        unsafe { pair(&mut Amx, &x, &job, &[]) }
                    }
                })
            });
            eprintln!(
                "AMX pair, m={m} k={k}: {:.1} GMAC/s on {threads} threads",
                4.0 * threads as f64 * macs / secs / 1e9
            );
        }
    }
}
