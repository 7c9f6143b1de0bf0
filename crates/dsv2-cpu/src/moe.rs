//! Dense SwiGLU MLPs and the DeepSeekMoE block.

use dsv2_backend::routing::{route_token, softmax_in_place};
use dsv2_backend::{Mlp, MoeWeights};

use std::cell::RefCell;

use crate::kernels::{round_bf16, silu, SyncPtr};
use crate::qmatmul::{decode_tiles_per_task, qmatmul_rows, QActivations, QMatrix};
use crate::scratch::{take, take_empty};
use crate::team;
use crate::{CpuBackend, CpuWeight};

/// The SwiGLU product `silu(g) * u` in place in `gate`, with the bf16 reference's rounding
/// points in bf16 mode.
fn swiglu(be: &CpuBackend, gate: &mut [f32], up: &[f32]) {
    if be.bf16() {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = round_bf16(round_bf16(silu(round_bf16(*g))) * round_bf16(*u));
        }
    } else {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
}

/// `out[rows, D] = down(silu(gate(x)) * up(x))` with the reference's bf16 rounding
/// points (each projection, the SiLU, the product).
pub(crate) fn mlp_rows(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    mlp: &Mlp<CpuWeight>,
    out: &mut [f32],
) {
    let inter = mlp.gate_proj.rows();
    let mut gate = take::<f32>(rows * inter);
    let mut up = take::<f32>(rows * inter);
    mlp.gate_proj.matmul(be, x, rows, &mut gate);
    mlp.up_proj.matmul(be, x, rows, &mut up);
    swiglu(be, &mut gate, &up);
    let d = mlp.down_proj.rows();
    mlp.down_proj.matmul(be, &gate, rows, &mut out[..rows * d]);
    be.round(&mut out[..rows * d]);
}

/// The MoE block: f32 router and softmax, top-k routing, each chosen expert run once on
/// all of its tokens, the weighted sum in f32 (rounded once), plus the shared experts.
pub(crate) fn moe(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    moe: &MoeWeights<CpuWeight>,
    out: &mut [f32],
) {
    let d = moe.gate.cols();
    let num_experts = moe.gate.rows();
    let k = moe.routing.top_k;
    // Router: f32 logits of the (bf16-representable, in bf16 mode) activations.
    let mut probs = take::<f32>(rows * num_experts);
    moe.gate.matmul(be, x, rows, &mut probs);
    let mut ids = take::<u32>(rows * k);
    let mut weights = take::<f32>(rows * k);
    for t in 0..rows {
        let p = &mut probs[t * num_experts..(t + 1) * num_experts];
        softmax_in_place(p);
        route_token(
            p,
            &moe.routing,
            &mut ids[t * k..(t + 1) * k],
            &mut weights[t * k..(t + 1) * k],
        );
    }
    if rows == 1 && one_token_quantized(be, x, moe, &ids, &weights, out) {
        return;
    }
    // Group tokens by expert: each expert's weights are read once per step.
    let mut routed = take::<f32>(rows * d);
    let mut gathered = take_empty::<f32>();
    let mut member_rows = take_empty::<u32>();
    let mut member_weights = take_empty::<f32>();
    let mut expert_out = take_empty::<f32>();
    for (e, expert) in moe.experts.iter().enumerate() {
        member_rows.vec().clear();
        member_weights.vec().clear();
        for t in 0..rows {
            for j in 0..k {
                if ids[t * k + j] as usize == e {
                    member_rows.vec().push(t as u32);
                    member_weights.vec().push(weights[t * k + j]);
                }
            }
        }
        if member_rows.is_empty() {
            continue;
        }
        gathered.vec().clear();
        for &t in member_rows.iter() {
            let t = t as usize;
            gathered.vec().extend_from_slice(&x[t * d..(t + 1) * d]);
        }
        let n = member_rows.len();
        expert_out.vec().resize(n * d, 0.0);
        mlp_rows(be, &gathered, n, expert, &mut expert_out);
        for (m, (&t, &w)) in member_rows.iter().zip(member_weights.iter()).enumerate() {
            let t = t as usize;
            for (acc, v) in routed[t * d..(t + 1) * d]
                .iter_mut()
                .zip(&expert_out[m * d..(m + 1) * d])
            {
                *acc += w * v;
            }
        }
    }
    be.round(&mut routed);
    match &moe.shared_experts {
        Some(shared) => {
            mlp_rows(be, x, rows, shared, out);
            for (o, r) in out[..rows * d].iter_mut().zip(&routed) {
                *o += r;
            }
            be.round(&mut out[..rows * d]);
        }
        None => out[..rows * d].copy_from_slice(&routed),
    }
}

/// Most MLPs (chosen routed experts + the shared one) of the one-token path.
const MAX_MLPS: usize = 9;

thread_local! {
    /// Quantized activations of each MLP of the one-token path (reused across steps).
    static MLP_ACTS: RefCell<Vec<QActivations>> = const { RefCell::new(Vec::new()) };
}

/// The MoE block for one token with quantized experts, as [`moe`] computes it (the same
/// products, roundings and summation order, so bit-identical) in three parallel loops
/// instead of three per expert: the gate and up projections of every chosen expert and
/// the shared experts together, then all their down projections. A decode step at
/// batch 1 runs ~8 MLPs of ~2-3 MB each per layer; each loop has a fixed cost (starting
/// the other threads, waiting for the slowest task), so fewer, larger loops spend more
/// of the step streaming weights. Returns false (having done nothing) when a weight is
/// not quantized or the block has more MLPs than [`MAX_MLPS`].
fn one_token_quantized(
    be: &CpuBackend,
    x: &[f32],
    moe: &MoeWeights<CpuWeight>,
    ids: &[u32],
    weights: &[f32],
    out: &mut [f32],
) -> bool {
    let d = moe.gate.cols();
    // The MLPs in the order their outputs are summed: chosen experts by id, then shared.
    let mut order = [0u32; MAX_MLPS];
    let chosen = ids.len();
    if chosen + 1 > MAX_MLPS {
        return false;
    }
    order[..chosen].copy_from_slice(ids);
    order[..chosen].sort_unstable();
    let mlp = |i: usize| -> &Mlp<CpuWeight> {
        if i < chosen {
            &moe.experts[order[i] as usize]
        } else {
            moe.shared_experts.as_ref().expect("a shared MLP")
        }
    };
    let count = chosen + usize::from(moe.shared_experts.is_some());
    let mut gate_up: [Option<QMatrix<'_>>; 2 * MAX_MLPS] = [None; 2 * MAX_MLPS];
    let mut down: [Option<QMatrix<'_>>; MAX_MLPS] = [None; MAX_MLPS];
    for i in 0..count {
        let m = mlp(i);
        gate_up[2 * i] = m.gate_proj.qmatrix();
        gate_up[2 * i + 1] = m.up_proj.qmatrix();
        down[i] = m.down_proj.qmatrix();
        if gate_up[2 * i].is_none() || gate_up[2 * i + 1].is_none() || down[i].is_none() {
            return false;
        }
    }
    let gate_up = &gate_up[..2 * count];
    let down = &down[..count];
    // Outputs: gate and up rows of MLP i at gate_up_at[2i], gate_up_at[2i + 1].
    let mut gate_up_at = [0usize; 2 * MAX_MLPS + 1];
    for (j, w) in gate_up.iter().enumerate() {
        gate_up_at[j + 1] = gate_up_at[j] + w.as_ref().expect("quantized").rows;
    }
    // Quantized activations: x at [MAX_MLPS], each MLP's hidden row at [i] (buffers
    // kept in a thread-local between steps).
    let mut acts = MLP_ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    acts.resize_with(MAX_MLPS + 1, QActivations::default);
    acts[MAX_MLPS].quantize(x, 1, d);
    let mut hidden = take::<f32>(gate_up_at[2 * count]);
    let base = SyncPtr(hidden.as_mut_ptr());
    let gate_up_outs: [SyncPtr; 2 * MAX_MLPS] =
        // SAFETY: gate_up_at[j] ≤ hidden.len() (its last entry is the length).
        std::array::from_fn(|j| SyncPtr(unsafe { base.get().add(gate_up_at[j.min(2 * count)]) }));
    // SAFETY: matrix j writes hidden[gate_up_at[j]..gate_up_at[j + 1]], its own rows.
    unsafe { run_tiles(gate_up, |_| &acts[MAX_MLPS], &gate_up_outs[..2 * count]) };
    // SwiGLU of each MLP, then its hidden row quantized for the down projection.
    for i in 0..count {
        let (g0, u0, u1) = (
            gate_up_at[2 * i],
            gate_up_at[2 * i + 1],
            gate_up_at[2 * i + 2],
        );
        let (gate, up) = hidden[g0..u1].split_at_mut(u0 - g0);
        swiglu(be, gate, up);
        acts[i].quantize(gate, 1, u0 - g0);
    }
    let mut down_at = [0usize; MAX_MLPS + 1];
    for i in 0..count {
        down_at[i + 1] = down_at[i] + d;
    }
    let mut outs = take::<f32>(count * d);
    let base = SyncPtr(outs.as_mut_ptr());
    let down_outs: [SyncPtr; MAX_MLPS] =
        // SAFETY: down_at[i] ≤ outs.len() (its entry at `count` is the length).
        std::array::from_fn(|i| SyncPtr(unsafe { base.get().add(down_at[i.min(count)]) }));
    // SAFETY: MLP i writes outs[down_at[i]..down_at[i + 1]] (d values), its own rows.
    unsafe { run_tiles(down, |i| &acts[i], &down_outs[..count]) };
    MLP_ACTS.with(|a| *a.borrow_mut() = acts);

    // Each MLP's output as `mlp_rows` rounds it; routed outputs weighted in id order.
    for o in outs.chunks_mut(d) {
        be.round(o);
    }
    let mut routed = take::<f32>(d);
    for (i, o) in outs.chunks(d).take(chosen).enumerate() {
        let j = ids
            .iter()
            .position(|&id| id == order[i])
            .expect("a chosen id");
        let w = weights[j];
        for (acc, v) in routed.iter_mut().zip(o) {
            *acc += w * v;
        }
    }
    be.round(&mut routed);
    if count > chosen {
        let shared = &outs[chosen * d..(chosen + 1) * d];
        for ((o, s), r) in out[..d].iter_mut().zip(shared).zip(routed.iter()) {
            *o = s + r;
        }
        be.round(&mut out[..d]);
    } else {
        out[..d].copy_from_slice(&routed);
    }
    true
}

/// `out_a = a · x` and `out_b = b · x` for one row `x` of quantized matrices sharing their
/// input (the query and latent projections), in one parallel loop instead of two, with
/// `x` quantized once; bit-identical to two [`crate::qmatmul::qmatmul`] calls.
pub(crate) fn one_row_pair(
    x: &[f32],
    a: QMatrix<'_>,
    out_a: &mut [f32],
    b: QMatrix<'_>,
    out_b: &mut [f32],
) {
    let mut acts = MLP_ACTS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    acts.resize_with(MAX_MLPS + 1, QActivations::default);
    acts[MAX_MLPS].quantize(x, 1, a.cols);
    assert!(
        out_a.len() >= a.rows && out_b.len() >= b.rows,
        "linear_pair outputs"
    );
    let outs = [SyncPtr(out_a.as_mut_ptr()), SyncPtr(out_b.as_mut_ptr())];
    // SAFETY: out_a and out_b hold a.rows and b.rows values (checked) and are distinct
    // mutable borrows.
    unsafe { run_tiles(&[Some(a), Some(b)], |_| &acts[MAX_MLPS], &outs) };
    MLP_ACTS.with(|c| *c.borrow_mut() = acts);
}

/// One parallel loop over the 16-row tiles of several quantized matrices, each with
/// its own one-row activations: matrix `j`'s `rows` outputs go to `outs[j]`.
///
/// # Safety
/// Each `outs[j]` points to `matrices[j].rows` writable values, disjoint from every other
/// matrix's and not otherwise accessed during the call.
unsafe fn run_tiles<'a>(
    matrices: &[Option<QMatrix<'_>>],
    acts: impl Fn(usize) -> &'a QActivations + Sync,
    outs: &[SyncPtr],
) {
    assert!(matrices.len() == outs.len() && matrices.len() <= 2 * MAX_MLPS);
    const TILE: usize = 16;
    // Each matrix split as a lone decode product would be; no task crosses a matrix.
    let threads = team::threads();
    let mut first_task = [0usize; 2 * MAX_MLPS + 1];
    let mut per_task = [0usize; 2 * MAX_MLPS];
    for (j, w) in matrices.iter().enumerate() {
        let w = w.as_ref().expect("quantized");
        let tiles = w.rows.div_ceil(TILE);
        per_task[j] = decode_tiles_per_task(tiles, w.tile_bytes(), threads);
        first_task[j + 1] = first_task[j] + tiles.div_ceil(per_task[j]);
    }
    let tasks = first_task[matrices.len()];
    team::for_each(tasks, |task| {
        let j = first_task[1..=matrices.len()].partition_point(|&f| f <= task);
        let w = matrices[j].expect("quantized");
        let t0 = (task - first_task[j]) * per_task[j];
        let rows = t0 * TILE..((t0 + per_task[j]) * TILE).min(w.rows);
        // SAFETY: outs[j] holds w.rows values (the caller's contract); tasks of matrix j
        // write disjoint row ranges.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(outs[j].get().add(rows.start), rows.len()) };
        let width = rows.len();
        qmatmul_rows(acts(j), 1, w, rows, dst, width);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values;
    use dsv2_backend::{Backend, ComputeDtype, Routing};
    use dsv2_core::quant::{quantize_tensor, QuantFormat};
    use dsv2_core::{DType, TensorView};

    fn dense(name: &str, rows: usize, cols: usize, seed: u64) -> TensorView {
        let bytes = test_values(rows * cols, seed)
            .into_iter()
            .flat_map(|v| (v * 0.2).to_le_bytes())
            .collect();
        TensorView::owned(name, DType::F32, vec![rows, cols], bytes)
    }

    fn mlp(be: &CpuBackend, format: QuantFormat, d: usize, i: usize, seed: u64) -> Mlp<CpuWeight> {
        let q = |name: &str, rows, cols, s| {
            let view = dense(name, rows, cols, s);
            be.load_quantized(&quantize_tensor(&view, format)).unwrap()
        };
        Mlp {
            gate_proj: q("gate", i, d, seed),
            up_proj: q("up", i, d, seed + 1),
            down_proj: q("down", d, i, seed + 2),
        }
    }

    /// The fused one-row `linear_pair` gives the bits of two `linear`s.
    #[test]
    fn one_row_linear_pair_matches_two_linears() {
        let d = 96;
        for dtype in [ComputeDtype::F32, ComputeDtype::Bf16] {
            for format in [QuantFormat::Q8, QuantFormat::Q4] {
                let be = CpuBackend::new(dtype);
                let q = |rows, seed| {
                    be.load_quantized(&quantize_tensor(&dense("w", rows, d, seed), format))
                        .unwrap()
                };
                let (a, b) = (q(80, 3), q(40, 4));
                let x = test_values(d, 9);
                let (mut a1, mut b1) = (vec![f32::NAN; 80], vec![f32::NAN; 40]);
                let (mut a2, mut b2) = (vec![f32::NAN; 80], vec![f32::NAN; 40]);
                be.linear_pair(&x, 1, &a, &mut a1, &b, &mut b1).unwrap();
                be.linear(&x, 1, &a, &mut a2).unwrap();
                be.linear(&x, 1, &b, &mut b2).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a1), bits(&a2), "{dtype:?} {format:?}");
                assert_eq!(bits(&b1), bits(&b2), "{dtype:?} {format:?}");
            }
        }
    }

    /// The one-token path gives the bits of the general path (a batch of the same
    /// token twice), for q8 and q4 experts, f32 and bf16 compute, with and without
    /// shared experts and renormalized or scaled weights.
    #[test]
    fn one_token_path_matches_the_general_path_bit_for_bit() {
        let (d, inter, experts) = (64, 96, 8);
        for dtype in [ComputeDtype::F32, ComputeDtype::Bf16] {
            for format in [QuantFormat::Q8, QuantFormat::Q4] {
                for (shared, norm) in [(true, false), (false, true)] {
                    let be = CpuBackend::new(dtype);
                    let weights = MoeWeights {
                        gate: be.load_weight(&dense("router", experts, d, 1)).unwrap(),
                        experts: (0..experts)
                            .map(|e| mlp(&be, format, d, inter, 10 + 3 * e as u64))
                            .collect(),
                        shared_experts: shared.then(|| mlp(&be, format, d, 2 * inter, 99)),
                        routing: Routing {
                            top_k: 3,
                            groups: None,
                            norm_topk_prob: norm,
                            routed_scaling_factor: if norm { 1.0 } else { 2.5 },
                        },
                    };
                    let mut x = test_values(d, 7);
                    be.round(&mut x);
                    let twice: Vec<f32> = x.iter().chain(&x).copied().collect();
                    let mut one = vec![f32::NAN; d];
                    let mut two = vec![f32::NAN; 2 * d];
                    moe(&be, &x, 1, &weights, &mut one);
                    moe(&be, &twice, 2, &weights, &mut two);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&one), bits(&two[..d]), "{dtype:?} {format:?} {shared}");
                    assert!(one.iter().all(|v| v.is_finite() && *v != 0.0));
                }
            }
        }
    }
}
