//! DeepSeekMoE on the device, with no host round-trip.
//!
//! Up to a few tokens (bf16), the experts run as GEMV-style kernels instead of steps 3-4
//! below: `moe_small_up` (gate and up of every chosen and shared expert, SwiGLU fused)
//! and `moe_small_down_all` (every expert's down projection of an output row pair and
//! their weighted sum in one block; or `moe_small_down`, one block per output rows and
//! expert, then `moe_small_combine`), so each chosen expert's weights are read once with
//! 16-byte loads.
//!
//! 1. The shared experts run first, straight into `out`.
//! 2. Router logits `[rows, E]` in f32 (a GEMM of the bf16 activations and weights with
//!    f32 output: the products are exact, as in the reference's f32 router), then
//!    `moe_route` (softmax, greedy or group-limited top-k, scaling) per token.
//! 3. `moe_plan` groups the `rows * k` (token, expert) pairs by expert into tiles of
//!    `m_tile` rows and writes the address arrays of three pointer-batched cuBLAS GEMMs
//!    (gate, up, down). The host only knows an upper bound on the number of tiles, so the
//!    batches run over that bound; tiles past the used ones compute on padding rows.
//! 4. `moe_gather` copies each tile row's token; the GEMMs and SwiGLU run on all tiles;
//!    `moe_combine` adds each token's weighted expert outputs (f32 sum, one rounding) to
//!    the shared experts' output.

use dsv2_backend::MoeWeights;

use crate::device::{DevMem, Gemm};
use crate::error::{unsupported, Result};
use crate::scratch::{Scratch, Slot};
use crate::{CudaBackend, CudaBuffer, CudaWeight, ROW_THREADS};

/// Limits of the kernels: experts (one plan thread each, plus one), top-k, groups.
const MAX_EXPERTS: usize = 1023;
const MAX_TOP_K: usize = 16;
const MAX_GROUPS: usize = 64;
/// Pointer arrays written by moe_plan (see TilePtrs in moe.cu).
const NUM_PTR_ARRAYS: usize = 7;

/// Rows per expert tile: about the mean number of pairs per used expert, as a power of
/// two in 16..=128 (small tiles waste little on decode steps, large ones make prefill
/// GEMMs efficient).
fn tile_rows(pairs: usize, experts: usize) -> usize {
    let mean = pairs.div_ceil(experts.min(pairs).max(1));
    mean.next_power_of_two().clamp(16, 128)
}

/// Rows per expert tile forced by `DSV2_CUDA_MOE_TILE` (16, 32, 64 or 128; for
/// comparisons: 64 and 32 measured slower than the default's 128 at 4 x 512 and
/// 4 x 2048 prompt tokens of V2-Lite on the H200), read once from the environment.
fn tile_override() -> Option<usize> {
    static TILE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *TILE.get_or_init(|| {
        std::env::var("DSV2_CUDA_MOE_TILE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|m| [16, 32, 64, 128].contains(m))
    })
}

/// Upper bound on the tiles `pairs` pairs can need: every used expert wastes at most
/// `m_tile - 1` rows, and at most `min(experts, pairs)` experts are used.
fn max_tiles(pairs: usize, experts: usize, m_tile: usize) -> usize {
    (pairs + experts.min(pairs) * (m_tile - 1)) / m_tile
}

/// The checked shape of a MoE layer.
struct Shape {
    num_experts: usize,
    d: usize,
    k: usize,
    n_group: usize,
    topk_group: usize,
    inter: usize,
}

fn shape(moe: &MoeWeights<CudaWeight>) -> Result<Shape> {
    let op = "moe";
    let (num_experts, d) = moe.gate.matrix("moe router")?;
    let r = &moe.routing;
    let k = r.top_k;
    if num_experts > MAX_EXPERTS
        || k == 0
        || k > MAX_TOP_K
        || k > num_experts
        || moe.experts.len() != num_experts
    {
        return Err(unsupported(
            op,
            format!("{num_experts} experts ({} loaded), top-{k}: at most {MAX_EXPERTS} experts and top-{MAX_TOP_K}", moe.experts.len()),
        ));
    }
    let (n_group, topk_group) = r.groups.unwrap_or((0, 0));
    if r.groups.is_some()
        && (n_group == 0
            || n_group > MAX_GROUPS
            || num_experts % n_group != 0
            || topk_group > n_group
            || topk_group == 0)
    {
        return Err(unsupported(
            op,
            format!("{num_experts} experts in {n_group} groups, top {topk_group} groups"),
        ));
    }
    let (inter, d_in) = moe.experts[0].gate_proj.matrix("expert gate_proj")?;
    if d_in != d {
        return Err(unsupported(
            op,
            format!("experts take {d_in} inputs, the router {d}"),
        ));
    }
    Ok(Shape {
        num_experts,
        d,
        k,
        n_group,
        topk_group,
        inter,
    })
}

/// The residual add and RMSNorm in front of a MoE block (`Backend::add_rms_norm_moe`).
pub(crate) struct NormInput<'a> {
    pub acc: &'a mut CudaBuffer,
    pub weight: &'a CudaWeight,
    pub eps: f32,
    pub normed: &'a mut CudaBuffer,
}

/// Most dynamic shared memory of `moe_norm_route` (the default limit of a block).
const NORM_ROUTE_MAX_SMEM: usize = 48 << 10;

/// `add_rms_norm_moe` through the small-batch kernels, the norm, router and routing in
/// one launch (`moe_norm_route`); `x` is the residual delta on entry and the block's
/// output on return. Ok(false) (nothing launched) where the small-batch path does not
/// apply: the caller runs the unfused ops.
pub(crate) fn norm_moe(
    be: &CudaBackend,
    scratch: &mut Scratch,
    n: NormInput<'_>,
    x: &mut CudaBuffer,
    rows: usize,
    moe: &MoeWeights<CudaWeight>,
) -> Result<bool> {
    let op = "add_rms_norm_moe";
    let s = shape(moe)?;
    let smem = 2 * rows * s.d * 2 + rows * s.num_experts * 4;
    if rows == 0
        || !small_batch_applies(be, moe, rows, s.d, s.inter)?
        || smem > NORM_ROUTE_MAX_SMEM
        || n.weight.vector(op)? != s.d
    {
        return Ok(false);
    }
    for (what, buf) in [
        ("accumulator", &*n.acc),
        ("input", &*x),
        ("normed", &*n.normed),
    ] {
        be.check_len(op, what, buf, rows * s.d)?;
    }
    let dev = &be.dev;
    let r = &moe.routing;
    let pairs = rows * s.k;
    let ids = scratch.get(dev, Slot::RouteIds, pairs * 4)?;
    let weights = scratch.get(dev, Slot::RouteWeights, pairs * 4)?;
    let logits = scratch.get(dev, Slot::Router, rows * s.num_experts * 4)?;
    let (sh_gate, sh_up, inter_sh) = shared_up(moe)?;
    let (_, hid_sh) = hidden(be, scratch, rows, s.k, s.inter, inter_sh)?;
    let router_blocks = s.num_experts.div_ceil(8);
    // The shared experts' gate and up in the same launch, 16 rows a block
    // (`DSV2_CUDA_SHARED_IN_ROUTE=0`: in moe_small_up instead).
    let shared_in_route =
        sh_gate != 0 && std::env::var("DSV2_CUDA_SHARED_IN_ROUTE").map_or(true, |v| v != "0");
    let (sh_gate, sh_up, shared_blocks) = if shared_in_route {
        (sh_gate, sh_up, rows * inter_sh.div_ceil(16))
    } else {
        (0, 0, 0)
    };
    dev.launch(
        if dev.row1_applies(rows, 2) {
            &dev.kernels.moe_norm_route_r1
        } else {
            &dev.kernels.moe_norm_route
        },
        "moe_norm_route",
        (router_blocks + shared_blocks, 1),
        256,
        smem as u32,
        &[
            n.acc.ptr().into(),
            x.ptr().into(),
            n.weight.ptr().into(),
            n.eps.into(),
            n.normed.ptr().into(),
            (rows as i32).into(),
            (s.d as i32).into(),
            moe.gate.ptr().into(),
            logits.into(),
            ids.into(),
            weights.into(),
            (s.num_experts as i32).into(),
            (s.k as i32).into(),
            (s.n_group as i32).into(),
            (s.topk_group as i32).into(),
            (r.norm_topk_prob as i32).into(),
            r.routed_scaling_factor.into(),
            (dev.sync.ptr() + crate::device::SYNC_COUNTER).into(),
            (router_blocks as i32).into(),
            sh_gate.into(),
            sh_up.into(),
            (inter_sh as i32).into(),
            hid_sh.into(),
        ],
    )?;
    let table = expert_table(be, moe, s.inter, s.d)?;
    small_batch(
        be,
        scratch,
        n.normed,
        rows,
        moe,
        SmallArgs {
            ids,
            weights,
            table,
            num_experts: s.num_experts,
            k: s.k,
            d: s.d,
            inter: s.inter,
            shared_up_done: shared_in_route,
        },
        x,
    )?;
    Ok(true)
}

pub(crate) fn moe(
    be: &CudaBackend,
    scratch: &mut Scratch,
    x: &CudaBuffer,
    rows: usize,
    moe: &MoeWeights<CudaWeight>,
    out: &mut CudaBuffer,
) -> Result<()> {
    let op = "moe";
    let Shape {
        num_experts,
        d,
        k,
        n_group,
        topk_group,
        inter,
    } = shape(moe)?;
    let r = &moe.routing;
    be.check_len(op, "input", x, rows * d)?;
    be.check_len(op, "output", out, rows * d)?;
    if rows == 0 {
        return Ok(());
    }
    let small = small_batch_applies(be, moe, rows, d, inter)?;
    if !small {
        if let Some(shared) = &moe.shared_experts {
            be.mlp_impl(scratch, x, rows, shared, out)?;
        }
    }
    let dev = &be.dev;
    let e = be.elem();
    let kern = &dev.kernels;
    // Routing.
    let pairs = rows * k;
    let ids = scratch.get(dev, Slot::RouteIds, pairs * 4)?;
    let weights = scratch.get(dev, Slot::RouteWeights, pairs * 4)?;
    if small {
        // Router and routing of each token in one block.
        dev.launch(
            &kern.moe_route_small,
            "moe_route_small",
            (rows, 1),
            1024,
            0,
            &[
                x.ptr().into(),
                moe.gate.ptr().into(),
                ids.into(),
                weights.into(),
                (num_experts as i32).into(),
                (k as i32).into(),
                (n_group as i32).into(),
                (topk_group as i32).into(),
                (r.norm_topk_prob as i32).into(),
                r.routed_scaling_factor.into(),
                (d as i32).into(),
            ],
        )?;
        let table = expert_table(be, moe, inter, d)?;
        return small_batch(
            be,
            scratch,
            x,
            rows,
            moe,
            SmallArgs {
                ids,
                weights,
                table,
                num_experts,
                k,
                d,
                inter,
                shared_up_done: false,
            },
            out,
        );
    }
    let logits = scratch.get(dev, Slot::Router, rows * num_experts * 4)?;
    be.gemm_rows("moe router", x.ptr(), rows, &moe.gate, logits, true)?;
    dev.launch(
        &kern.moe_route,
        "moe_route",
        (rows.div_ceil(4), 1),
        128,
        0,
        &[
            logits.into(),
            ids.into(),
            weights.into(),
            (rows as i32).into(),
            (num_experts as i32).into(),
            (k as i32).into(),
            (n_group as i32).into(),
            (topk_group as i32).into(),
            (r.norm_topk_prob as i32).into(),
            r.routed_scaling_factor.into(),
        ],
    )?;
    // Tiles (of 8 rows for the GEMV tiles of a few dozen tokens).
    let tile_gemv = be.dev.bf16
        && rows <= TILE_GEMV_MAX_ROWS
        && d.is_multiple_of(8)
        && inter.is_multiple_of(8)
        && std::env::var("DSV2_CUDA_MOE_TILE_GEMV").map_or(true, |v| v != "0");
    let m_tile = if tile_gemv {
        TILE_GEMV_M
    } else {
        tile_override().unwrap_or_else(|| tile_rows(pairs, num_experts))
    };
    let tiles = max_tiles(pairs, num_experts, m_tile);
    let tile_rows_total = tiles * m_tile;
    let row_token = scratch.get(dev, Slot::RowToken, tile_rows_total * 4)?;
    let slot_of = scratch.get(dev, Slot::PairRow, pairs * 4)?;
    let ptrs = scratch.get(dev, Slot::TilePtrs, NUM_PTR_ARRAYS * tiles * 8)?;
    let x_in = scratch.get(dev, Slot::ExpertIn, tile_rows_total * d * e)?;
    let gate_out = scratch.get(dev, Slot::ExpertGate, tile_rows_total * inter * e)?;
    let up_out = scratch.get(dev, Slot::ExpertUp, tile_rows_total * inter * e)?;
    let down_out = scratch.get(dev, Slot::ExpertOut, tile_rows_total * d * e)?;
    let table = expert_table(be, moe, inter, d)?;
    dev.launch(
        &kern.moe_plan,
        "moe_plan",
        (1, 1),
        1024,
        0,
        &[
            ids.into(),
            (pairs as i32).into(),
            (k as i32).into(),
            (num_experts as i32).into(),
            (m_tile as i32).into(),
            (tiles as i32).into(),
            table.into(),
            x_in.into(),
            gate_out.into(),
            up_out.into(),
            down_out.into(),
            (d as i32).into(),
            (inter as i32).into(),
            (e as i32).into(),
            row_token.into(),
            slot_of.into(),
            ptrs.into(),
        ],
    )?;
    let array = |i: usize| ptrs + (i * tiles * 8) as u64;
    if tile_gemv {
        dev.launch(
            &kern.moe_tile_up,
            "moe_tile_up",
            (inter.div_ceil(8), tiles),
            128,
            0,
            &[
                x.ptr().into(),
                row_token.into(),
                array(0).into(),
                array(1).into(),
                (inter as i32).into(),
                (d as i32).into(),
                gate_out.into(),
            ],
        )?;
        dev.launch(
            &kern.moe_tile_down,
            "moe_tile_down",
            (d.div_ceil(8), tiles),
            128,
            0,
            &[
                gate_out.into(),
                row_token.into(),
                array(2).into(),
                (inter as i32).into(),
                (d as i32).into(),
                down_out.into(),
            ],
        )?;
    } else {
        tiled_gemms(
            be,
            x,
            &TiledArgs {
                row_token,
                ptrs,
                tiles,
                m_tile,
                x_in,
                gate_out,
                up_out,
                d,
                inter,
            },
        )?;
    }
    let vec = be.dev.bf16 && crate::vec_kernels() && d.is_multiple_of(8);
    dev.launch(
        if vec {
            &kern.moe_combine_v
        } else {
            &kern.moe_combine
        },
        "moe_combine",
        (rows, 1),
        ROW_THREADS,
        0,
        &[
            down_out.into(),
            slot_of.into(),
            weights.into(),
            out.ptr().into(),
            (d as i32).into(),
            (k as i32).into(),
            (moe.shared_experts.is_some() as i32).into(),
        ],
    )
}

/// Buffers and shape of the tiled expert GEMMs.
struct TiledArgs {
    row_token: u64,
    ptrs: u64,
    tiles: usize,
    m_tile: usize,
    x_in: u64,
    gate_out: u64,
    up_out: u64,
    d: usize,
    inter: usize,
}

/// The gather, the three pointer-batched GEMMs and SwiGLU over moe_plan's tiles.
fn tiled_gemms(be: &CudaBackend, x: &CudaBuffer, a: &TiledArgs) -> Result<()> {
    let dev = &be.dev;
    let kern = &dev.kernels;
    let (tiles, m_tile, d, inter) = (a.tiles, a.m_tile, a.d, a.inter);
    let (row_token, ptrs, x_in, gate_out, up_out) =
        (a.row_token, a.ptrs, a.x_in, a.gate_out, a.up_out);
    let tile_rows_total = tiles * m_tile;
    // bf16 rows of whole 16-byte chunks: the vectorized kernels, which skip padding rows.
    let vec = dev.bf16 && crate::vec_kernels() && d.is_multiple_of(8) && inter.is_multiple_of(8);
    dev.launch(
        if vec {
            &kern.moe_gather_v
        } else {
            &kern.moe_gather
        },
        "moe_gather",
        (tile_rows_total, 1),
        ROW_THREADS,
        0,
        &[
            x.ptr().into(),
            row_token.into(),
            x_in.into(),
            (d as i32).into(),
        ],
    )?;
    // The experts: out_tile[m_tile, N] = in_tile[m_tile, K] · Wᵀ per tile.
    let array = |i: usize| ptrs + (i * tiles * 8) as u64;
    let proj = |n: usize, kk: usize| Gemm {
        trans_a: true,
        trans_b: false,
        m: n,
        n: m_tile,
        k: kk,
        a: 0,
        lda: kk,
        b: 0,
        ldb: kk,
        c: 0,
        ldc: n,
    };
    dev.gemm_pointers(
        "expert gate_proj",
        &proj(inter, d),
        array(0),
        array(3),
        array(4),
        tiles,
    )?;
    dev.gemm_pointers(
        "expert up_proj",
        &proj(inter, d),
        array(1),
        array(3),
        array(5),
        tiles,
    )?;
    if vec {
        let chunks = tile_rows_total * inter / 8;
        dev.launch(
            &kern.moe_silu_rows,
            "silu_mul",
            (chunks.div_ceil(ROW_THREADS as usize).clamp(1, 8192), 1),
            ROW_THREADS,
            0,
            &[
                gate_out.into(),
                up_out.into(),
                row_token.into(),
                (inter as i32).into(),
                (chunks as u64).into(),
            ],
        )?;
    } else {
        be.silu_mul(gate_out, up_out, tile_rows_total * inter)?;
    }
    dev.gemm_pointers(
        "expert down_proj",
        &proj(d, inter),
        array(2),
        array(4),
        array(6),
        tiles,
    )
}

/// Most tokens of the GEMV expert tiles (`moe_tile_up` / `moe_tile_down`), and their rows
/// per tile (TILE_M in moe.cu). `DSV2_CUDA_MOE_TILE_GEMV=0` turns them off.
const TILE_GEMV_MAX_ROWS: usize = 16;
const TILE_GEMV_M: usize = 8;

/// Most tokens the small-batch kernels take by default (`DSV2_CUDA_MOE_SMALL_MAX`
/// overrides it; 0 turns them off).
const SMALL_MAX_ROWS: usize = 4;

/// True when the small-batch MoE kernels run this call: bf16, at most
/// [`SMALL_MAX_ROWS`] tokens, widths that allow 16-byte loads, and shared experts (if
/// any) whose input width matches.
fn small_batch_applies(
    be: &CudaBackend,
    moe: &MoeWeights<CudaWeight>,
    rows: usize,
    d: usize,
    inter: usize,
) -> Result<bool> {
    let max = std::env::var("DSV2_CUDA_MOE_SMALL_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SMALL_MAX_ROWS);
    if !be.dev.bf16 || rows > max || !d.is_multiple_of(8) || !inter.is_multiple_of(8) {
        return Ok(false);
    }
    if let Some(sh) = &moe.shared_experts {
        let (si, sd) = sh.gate_proj.matrix("shared gate_proj")?;
        if sd != d
            || si % 8 != 0
            || sh.up_proj.matrix("shared up_proj")? != (si, d)
            || sh.down_proj.matrix("shared down_proj")? != (d, si)
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Routing results and shapes the small-batch kernels need.
struct SmallArgs {
    ids: u64,
    weights: u64,
    table: u64,
    num_experts: usize,
    k: usize,
    d: usize,
    inter: usize,
    /// The shared experts' SwiGLU products are already in the hidden buffer
    /// (`moe_norm_route` computed them).
    shared_up_done: bool,
}

/// The shared experts' gate and up weights and intermediate width (zeros without).
fn shared_up(moe: &MoeWeights<CudaWeight>) -> Result<(u64, u64, usize)> {
    Ok(match &moe.shared_experts {
        Some(sh) => (
            sh.gate_proj.ptr(),
            sh.up_proj.ptr(),
            sh.gate_proj.matrix("shared gate_proj")?.0,
        ),
        None => (0, 0, 0),
    })
}

/// The small-batch kernels' SwiGLU products: (routed `[rows * k, inter]`, shared
/// `[rows, inter_sh]` right after them).
fn hidden(
    be: &CudaBackend,
    scratch: &mut Scratch,
    rows: usize,
    k: usize,
    inter: usize,
    inter_sh: usize,
) -> Result<(u64, u64)> {
    let e = be.elem();
    let routed = rows * k * inter;
    let hid = scratch.get(&be.dev, Slot::MoeHidden, (routed + rows * inter_sh) * e)?;
    Ok((hid, hid + (routed * e) as u64))
}

/// The routed and shared experts of a few tokens in two launches (see moe.cu).
fn small_batch(
    be: &CudaBackend,
    scratch: &mut Scratch,
    x: &CudaBuffer,
    rows: usize,
    moe: &MoeWeights<CudaWeight>,
    a: SmallArgs,
    out: &mut CudaBuffer,
) -> Result<()> {
    let dev = &be.dev;
    let (sh_gate, sh_up, inter_sh) = shared_up(moe)?;
    let sh_down = moe
        .shared_experts
        .as_ref()
        .map_or(0, |sh| sh.down_proj.ptr());
    let pairs = rows * a.k;
    let (hid, hid_sh) = hidden(be, scratch, rows, a.k, a.inter, inter_sh)?;
    let has_shared = moe.shared_experts.is_some();
    // Without the shared experts' part (done already, or absent), only the routed rows.
    let up_shared = has_shared && !a.shared_up_done;
    let (sh_gate, sh_up) = if up_shared { (sh_gate, sh_up) } else { (0, 0) };
    let width = if up_shared {
        a.inter.max(inter_sh)
    } else {
        a.inter
    };
    let kern = &dev.kernels;
    let (up_rpw, down_rpw) = small_rows_per_warp();
    dev.launch(
        &kern.moe_small_up,
        "moe_small_up",
        (
            width.div_ceil(4 * up_rpw),
            pairs + if up_shared { rows } else { 0 },
        ),
        128,
        0,
        &[
            x.ptr().into(),
            a.ids.into(),
            a.table.into(),
            (a.num_experts as i32).into(),
            (a.k as i32).into(),
            (rows as i32).into(),
            sh_gate.into(),
            sh_up.into(),
            (a.inter as i32).into(),
            (inter_sh as i32).into(),
            (a.d as i32).into(),
            hid.into(),
            hid_sh.into(),
            (up_rpw as i32).into(),
        ],
    )?;
    if down_all() && a.k + 2 <= 32 {
        // Every product of an output row pair and their combination in one block.
        return dev.launch(
            &kern.moe_small_down_all,
            "moe_small_down_all",
            (a.d.div_ceil(2), rows),
            32 * (a.k as u32 + 2),
            0,
            &[
                hid.into(),
                hid_sh.into(),
                a.ids.into(),
                a.table.into(),
                (a.num_experts as i32).into(),
                (a.k as i32).into(),
                sh_down.into(),
                (a.inter as i32).into(),
                (inter_sh as i32).into(),
                (a.d as i32).into(),
                (has_shared as i32).into(),
                a.weights.into(),
                out.ptr().into(),
            ],
        );
    }
    let part = scratch.get(dev, Slot::MoePartial, rows * (a.k + 1) * a.d * 4)?;
    dev.launch(
        &kern.moe_small_down,
        "moe_small_down",
        (a.d.div_ceil(4 * down_rpw), rows * (a.k + 1)),
        128,
        0,
        &[
            hid.into(),
            hid_sh.into(),
            a.ids.into(),
            a.table.into(),
            (a.num_experts as i32).into(),
            (a.k as i32).into(),
            sh_down.into(),
            (a.inter as i32).into(),
            (inter_sh as i32).into(),
            (a.d as i32).into(),
            (has_shared as i32).into(),
            part.into(),
            (down_rpw as i32).into(),
        ],
    )?;
    dev.launch(
        &kern.moe_small_combine,
        "moe_small_combine",
        (rows, a.d.div_ceil(256)),
        256,
        0,
        &[
            part.into(),
            a.weights.into(),
            (a.k as i32).into(),
            (a.d as i32).into(),
            (has_shared as i32).into(),
            out.ptr().into(),
        ],
    )
}

/// Weight rows per warp of `moe_small_up` and `moe_small_down` (`DSV2_CUDA_MOE_UP_RPW`,
/// `DSV2_CUDA_MOE_DOWN_RPW`: 1, 2 or 4). Two in up, with twice the warps of four: 2.87
/// against 2.98 ms a V2-Lite decode step at batch 1 and context 1K on the H200 (captured
/// steps, same call).
const SMALL_UP_ROWS_PER_WARP: usize = 2;
const SMALL_DOWN_ROWS_PER_WARP: usize = 2;

/// The rows per warp of `moe_small_up` and `moe_small_down`, read once from the
/// environment.
fn small_rows_per_warp() -> (usize, usize) {
    static RPW: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    let read = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|r| [1, 2, 4].contains(r))
            .unwrap_or(default)
    };
    *RPW.get_or_init(|| {
        (
            read("DSV2_CUDA_MOE_UP_RPW", SMALL_UP_ROWS_PER_WARP),
            read("DSV2_CUDA_MOE_DOWN_RPW", SMALL_DOWN_ROWS_PER_WARP),
        )
    })
}

/// The small-batch down projections and their weighted sum as one launch,
/// `moe_small_down_all` (default; 3.16-3.17 against 3.19-3.20 ms a V2-Lite decode step
/// at batch 1 in one A/B call on the H200, of a build whose other kernels were slower);
/// `DSV2_CUDA_MOE_DOWN_ALL=0`: `moe_small_down` then `moe_small_combine`. Read once from
/// the environment.
fn down_all() -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALL.get_or_init(|| std::env::var("DSV2_CUDA_MOE_DOWN_ALL").map_or(true, |v| v != "0"))
}

/// The device table `[3, E]` of the experts' gate, up and down weight addresses, made at
/// the layer's first use (checking that every expert has the same shape).
fn expert_table(
    be: &CudaBackend,
    moe: &MoeWeights<CudaWeight>,
    inter: usize,
    d: usize,
) -> Result<u64> {
    let mut tables = be.expert_tables.lock().unwrap_or_else(|e| e.into_inner());
    let key = moe.gate.ptr();
    let mut addrs = Vec::with_capacity(3 * moe.experts.len());
    for (i, proj) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
        for (x, expert) in moe.experts.iter().enumerate() {
            let w = [&expert.gate_proj, &expert.up_proj, &expert.down_proj][i];
            let want = if i == 2 { (d, inter) } else { (inter, d) };
            let got = w.matrix("moe expert")?;
            if got != want {
                return Err(unsupported(
                    "moe",
                    format!("expert {x} {proj} is {got:?}, expected {want:?}"),
                ));
            }
            addrs.push(w.ptr());
        }
    }
    // Reuse the table while it still names these experts (a later model could reuse the
    // router's address).
    if let Some((known, mem)) = tables.get(&key) {
        if *known == addrs {
            return Ok(mem.ptr());
        }
    }
    let mem: DevMem = be.dev.alloc(addrs.len() * 8)?;
    be.dev.htod(mem.ptr(), &addrs, "moe expert table")?;
    let ptr = mem.ptr();
    tables.insert(key, (addrs, mem));
    Ok(ptr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_bound_covers_the_worst_split() {
        for &(pairs, experts) in &[(6, 64), (384, 64), (1536, 64), (24, 8), (1, 8), (3120, 160)] {
            let m = tile_rows(pairs, experts);
            let bound = max_tiles(pairs, experts, m);
            // Worst case: as many experts as possible with one pair over a full tile.
            let used = experts.min(pairs);
            let mut counts = vec![1usize; used];
            counts[0] += pairs - used;
            let need: usize = counts.iter().map(|c| c.div_ceil(m)).sum();
            assert!(
                need <= bound,
                "pairs {pairs} experts {experts}: {need} > {bound}"
            );
            // And the bound is tight for a decode step.
            if pairs <= experts {
                assert_eq!(bound, pairs);
            }
        }
    }
}
