//! Dense SwiGLU MLPs and the DeepSeekMoE block.

use dsv2_backend::routing::{route_token, softmax_in_place};
use dsv2_backend::{Mlp, MoeWeights};

use crate::kernels::{round_bf16, silu};
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
    let mut gate = vec![0.0f32; rows * inter];
    let mut up = vec![0.0f32; rows * inter];
    mlp.gate_proj.matmul(x, rows, &mut gate);
    mlp.up_proj.matmul(x, rows, &mut up);
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
    mlp.down_proj.matmul(&gate, rows, &mut out[..rows * d]);
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
    let mut probs = vec![0.0f32; rows * num_experts];
    moe.gate.matmul(x, rows, &mut probs);
    let mut ids = vec![0u32; rows * k];
    let mut weights = vec![0.0f32; rows * k];
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
    let mut routed = vec![0.0f32; rows * d];
    let mut gathered = Vec::new();
    let mut members: Vec<(usize, f32)> = Vec::new();
    let mut expert_out = Vec::new();
    for (e, expert) in moe.experts.iter().enumerate() {
        members.clear();
        for t in 0..rows {
            for j in 0..k {
                if ids[t * k + j] as usize == e {
                    members.push((t, weights[t * k + j]));
                }
            }
        }
        if members.is_empty() {
            continue;
        }
        gathered.clear();
        for &(t, _) in &members {
            gathered.extend_from_slice(&x[t * d..(t + 1) * d]);
        }
        expert_out.resize(members.len() * d, 0.0);
        mlp_rows(be, &gathered, members.len(), expert, &mut expert_out);
        for (m, &(t, w)) in members.iter().enumerate() {
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
