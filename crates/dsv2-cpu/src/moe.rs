//! Dense SwiGLU MLPs and the DeepSeekMoE block.

use dsv2_backend::routing::{route_token, softmax_in_place};
use dsv2_backend::{Mlp, MoeWeights};

use crate::kernels::{round_bf16, silu};
use crate::scratch::{take, take_empty};
use crate::{CpuBackend, CpuWeight};

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
    if be.bf16() {
        for (g, u) in gate.iter_mut().zip(&up) {
            *g = round_bf16(round_bf16(silu(round_bf16(*g))) * round_bf16(*u));
        }
    } else {
        for (g, u) in gate.iter_mut().zip(&up) {
            *g = silu(*g) * u;
        }
    }
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
