//! Dense SwiGLU MLPs and the DeepSeekMoE block.

use dsv2_backend::routing::{route_token, softmax_in_place};
use dsv2_backend::{Mlp, MoeWeights};

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::kernels::SyncPtr;
use crate::q8_bf16::PROMPT_MIN_ROWS;
use crate::qmatmul::{
    decode_tiles_per_task, qmatmul_pair, qmatmul_rows_ptr, PromptRows, QActivations, QMatrix,
};
use crate::scratch::{take, take_empty, take_overwritten};
use crate::team;
use crate::{CpuBackend, CpuWeight};

/// The SwiGLU product `silu(g) * u` in place in `gate`, with the bf16 reference's rounding
/// points in bf16 mode.
fn swiglu(be: &CpuBackend, gate: &mut [f32], up: &[f32]) {
    let bf16 = be.bf16();
    if gate.len() < PARALLEL_MIN_VALUES {
        return crate::exp::silu_mul(gate, up, bf16);
    }
    // A prompt's rows, in parallel (elementwise: the same values).
    team::for_each_chunk_mut(gate, PARALLEL_MIN_VALUES, |i, g| {
        let from = i * PARALLEL_MIN_VALUES;
        crate::exp::silu_mul(g, &up[from..from + g.len()], bf16)
    });
}

/// Fewest values an elementwise pass or row copy of a prompt step spreads over the team
/// (below, the dispatch costs about what the second thread saves).
const PARALLEL_MIN_VALUES: usize = 1 << 14;

/// Rows per task for `rows` rows of `width` values: tasks of at least
/// [`PARALLEL_MIN_VALUES`] values, all rows in one task when there are fewer.
fn rows_per_task(rows: usize, width: usize) -> usize {
    PARALLEL_MIN_VALUES
        .div_ceil(width.max(1))
        .clamp(1, rows.max(1))
}

/// `out[rows, D] = down(silu(gate(x)) * up(x))` with the reference's bf16 rounding
/// points (each projection, the SiLU, the product).
/// `prompt` says which rows are prompt rows ([`PromptRows`]).
pub(crate) fn mlp_rows(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    prompt: PromptRows<'_>,
    mlp: &Mlp<CpuWeight>,
    out: &mut [f32],
) {
    let inter = mlp.gate_proj.rows();
    let mut gate = take_overwritten::<f32>(rows * inter);
    let mut up = take_overwritten::<f32>(rows * inter);
    match (mlp.gate_proj.qmatrix(be), mlp.up_proj.qmatrix(be)) {
        // Quantized: `x` quantized once for both (bit-identical to two products).
        (Some(g), Some(u)) => qmatmul_pair(x, rows, g, &mut gate, u, &mut up, prompt),
        _ => {
            mlp.gate_proj.matmul(be, x, rows, prompt, &mut gate);
            mlp.up_proj.matmul(be, x, rows, prompt, &mut up);
        }
    }
    swiglu(be, &mut gate, &up);
    let d = mlp.down_proj.rows();
    mlp.down_proj
        .matmul(be, &gate, rows, prompt, &mut out[..rows * d]);
    be.round(&mut out[..rows * d]);
}

thread_local! {
    /// Whether [`moe`] takes the fused few-token path (tests turn it off to compare it
    /// with the general path).
    static FUSE_FEW_TOKENS: Cell<bool> = const { Cell::new(true) };
}

/// The MoE block: f32 router and softmax, top-k routing, each chosen expert run once on
/// all of its tokens, the weighted sum in f32 (rounded once), plus the shared experts.
/// `prompt_lens` gives each row's prompt length (empty: no prompt rows), from which the
/// shared experts' prompt rows ([`PromptRows`]) are those of prompts of
/// [`PROMPT_MIN_ROWS`] tokens and a routed expert's those of prompts long enough to send
/// it that many rows on average; the few-token path runs no prompt rows.
pub(crate) fn moe(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    prompt_lens: &[u32],
    moe: &MoeWeights<CpuWeight>,
    out: &mut [f32],
) {
    let d = moe.gate.cols();
    let num_experts = moe.gate.rows();
    let k = moe.routing.top_k;
    // Router: f32 logits of the (bf16-representable, in bf16 mode) activations.
    let mut probs = take_overwritten::<f32>(rows * num_experts);
    moe.gate.matmul(be, x, rows, PromptRows::None, &mut probs);
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
    be.count_routed_experts(distinct_experts(&ids, num_experts));
    let prompt = PromptRows::of(prompt_lens, rows, PROMPT_MIN_ROWS);
    let expert_min = (PROMPT_MIN_ROWS as usize * num_experts).div_ceil(k.max(1)) as u32;
    let routed_prompt = PromptRows::of(prompt_lens, rows, expert_min);
    if FUSE_FEW_TOKENS.with(Cell::get)
        && rows <= FUSED_MAX_ROWS
        && !prompt.any(rows)
        && few_tokens_quantized(be, x, rows, moe, &ids, &weights, out)
    {
        return;
    }
    let mut routed = take::<f32>(rows * d);
    routed_experts(
        be,
        x,
        rows,
        prompt_lens,
        routed_prompt,
        moe,
        &ids,
        &weights,
        &mut routed,
    );
    be.round(&mut routed);
    match &moe.shared_experts {
        Some(shared) => {
            mlp_rows(be, x, rows, prompt, shared, out);
            for (o, r) in out[..rows * d].iter_mut().zip(&routed) {
                *o += r;
            }
            be.round(&mut out[..rows * d]);
        }
        None => out[..rows * d].copy_from_slice(&routed),
    }
}

thread_local! {
    /// Each routed expert's output rows of a step, expert after expert (reused across
    /// steps; every row is written before it is read, so it is never cleared).
    static EXPERT_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `routed[t] = Σ_j w[t, j] · expert_{ids[t, j]}(x[t])` over the tokens' chosen experts,
/// added in ascending expert order (`routed` zeroed).
///
/// Parallel over experts, largest first, each expert's whole MLP on one thread (its
/// products' loops nested, so serial; with fewer than [`EXPERT_TASKS_PER_THREAD`]
/// experts a thread, one expert after another over the team instead). The thread that
/// gathers an expert's rows also widens, multiplies and stores them, so a prompt's
/// intermediate rows stay in that core's cache instead of crossing to the other core
/// between the gather, gate and up, SwiGLU and down loops of each expert (on a VM whose
/// two vCPUs sit on separate CCDs such a crossing goes through memory), and a MoE layer
/// runs one loop over experts instead of ~5 per expert: 2-4% faster on a 512-token
/// prefill of V2-Lite at q8 on 2 threads. Then one loop over tokens adds each token's
/// outputs. Per output the arithmetic is that of one expert after another: every
/// product's per-output arithmetic is independent of its threads, and each token's sum
/// runs in ascending expert order.
#[allow(clippy::too_many_arguments)]
fn routed_experts(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    prompt_lens: &[u32],
    routed_prompt: PromptRows<'_>,
    moe: &MoeWeights<CpuWeight>,
    ids: &[u32],
    weights: &[f32],
    routed: &mut [f32],
) {
    let d = moe.gate.cols();
    let num_experts = moe.experts.len();
    let k = moe.routing.top_k;
    // Members of each expert in ascending token order (a counting sort): expert e's are
    // slots start[e]..start[e + 1]; `slot[t·k + j]` is where token t's j-th choice went.
    let mut start = take::<u32>(num_experts + 1);
    for &e in &ids[..rows * k] {
        start[e as usize + 1] += 1;
    }
    for e in 0..num_experts {
        start[e + 1] += start[e];
    }
    let mut cursor = take::<u32>(num_experts);
    cursor.copy_from_slice(&start[..num_experts]);
    let mut member_rows = take::<u32>(rows * k);
    let mut member_lens = take::<u32>(if prompt_lens.is_empty() { 0 } else { rows * k });
    let mut slot = take::<u32>(rows * k);
    for t in 0..rows {
        for j in 0..k {
            let e = ids[t * k + j] as usize;
            let s = cursor[e] as usize;
            cursor[e] += 1;
            member_rows[s] = t as u32;
            if !prompt_lens.is_empty() {
                member_lens[s] = prompt_lens[t];
            }
            slot[t * k + j] = s as u32;
        }
    }
    // Experts with members, most members first, so the last tasks are the shortest.
    let mut order = take_empty::<u32>();
    order
        .vec()
        .extend((0..num_experts as u32).filter(|&e| start[e as usize + 1] > start[e as usize]));
    order.sort_by_key(|&e| std::cmp::Reverse(start[e as usize + 1] - start[e as usize]));
    crate::scratch::with_local(&EXPERT_OUT, |expert_out| {
        if expert_out.len() < rows * k * d {
            expert_out.resize(rows * k * d, 0.0);
        }
        let out_ptr = SyncPtr(expert_out.as_mut_ptr());
        let (start, member_rows, member_lens) = (&start[..], &member_rows[..], &member_lens[..]);
        let run_expert = |i: usize| {
            let e = order[i] as usize;
            let members = start[e] as usize..start[e + 1] as usize;
            let n = members.len();
            let mut gathered = take::<f32>(n * d);
            for (row, &t) in gathered
                .chunks_exact_mut(d)
                .zip(&member_rows[members.clone()])
            {
                let t = t as usize;
                row.copy_from_slice(&x[t * d..(t + 1) * d]);
            }
            let member_prompt = match routed_prompt {
                PromptRows::Lens { min, .. } => {
                    PromptRows::of(&member_lens[members.clone()], n, min)
                }
                all_or_none => all_or_none,
            };
            // SAFETY: rows `members` of `expert_out` ([rows·k, d]), this task's alone.
            let out = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(members.start * d), n * d)
            };
            mlp_rows(be, &gathered, n, member_prompt, &moe.experts[e], out);
        };
        if order.len() >= EXPERT_TASKS_PER_THREAD * team::threads() {
            team::for_each(order.len(), run_expert);
        } else {
            // Too few experts to keep the threads busy: one after another, each
            // product's loops over the team.
            (0..order.len()).for_each(run_expert);
        }
        // routed[t] += w · out over t's experts in ascending order, in parallel over tokens.
        let outs = &expert_out[..rows * k * d];
        let per_task = rows_per_task(rows, d);
        team::for_each_chunk_mut(&mut routed[..rows * d], per_task * d, |i, acc_rows| {
            for (r, acc) in acc_rows.chunks_exact_mut(d).enumerate() {
                let t = i * per_task + r;
                // The token's choices (distinct experts) in ascending expert order.
                let choices = t * k..(t + 1) * k;
                let mut after = None;
                for _ in 0..k {
                    let j = choices
                        .clone()
                        .filter(|&j| after.is_none_or(|a| ids[j] > a))
                        .min_by_key(|&j| ids[j])
                        .expect("a token's experts are distinct");
                    after = Some(ids[j]);
                    let (s, w) = (slot[j] as usize, weights[j]);
                    for (acc, v) in acc.iter_mut().zip(&outs[s * d..(s + 1) * d]) {
                        *acc += w * v;
                    }
                }
            }
        });
    });
}

/// Fewest experts with members per thread for [`routed_experts`] to run whole experts as
/// tasks (below, the last expert would leave the other threads idle too long).
const EXPERT_TASKS_PER_THREAD: usize = 2;

/// How many distinct experts `ids` names (each below `num_experts`).
fn distinct_experts(ids: &[u32], num_experts: usize) -> usize {
    let mut seen = take::<u32>(num_experts.div_ceil(32));
    let mut distinct = 0;
    for &e in ids {
        let (word, bit) = (e as usize / 32, 1u32 << (e % 32));
        if seen[word] & bit == 0 {
            seen[word] |= bit;
            distinct += 1;
        }
    }
    distinct
}

/// Most token rows of the fused few-token path ([`few_tokens_quantized`]): decode
/// batches. Larger batches (prefill chunks) give each expert enough rows that its own
/// parallel loops stream well.
const FUSED_MAX_ROWS: usize = 32;

thread_local! {
    /// Quantized activations of each MLP of the few-token path, and the input rows of the
    /// shared experts last (reused across steps).
    static MLP_ACTS: RefCell<Vec<QActivations>> = const { RefCell::new(Vec::new()) };
}

/// The MoE block for a few tokens with quantized experts, as [`moe`]'s general path
/// computes it (the same products, roundings and summation order, so bit-identical) in
/// two parallel loops instead of three per expert: the gate and up projections of every
/// chosen expert (each on the rows routed to it) and of the shared experts together,
/// then all their down projections. A decode step runs a few MLPs of ~2-3 MB per token
/// and layer; each loop has a fixed cost (starting the other threads, waiting for the
/// slowest task), so fewer, larger loops spend more of the step streaming weights.
/// Returns false (having done nothing) when a weight is not quantized.
fn few_tokens_quantized<'a>(
    be: &CpuBackend,
    x: &[f32],
    rows: usize,
    moe: &'a MoeWeights<CpuWeight>,
    ids: &[u32],
    weights: &[f32],
    out: &mut [f32],
) -> bool {
    let d = moe.gate.cols();
    let k = moe.routing.top_k;
    let num_experts = moe.experts.len();
    // The chosen experts in id order (the general path's summation order), then the
    // shared MLP; each with its member token rows and routing weights, in token order.
    let mut chosen = take_empty::<u32>();
    chosen.vec().extend_from_slice(&ids[..rows * k]);
    chosen.vec().sort_unstable();
    chosen.vec().dedup();
    let routed_mlps = chosen.len();
    let shared = moe.shared_experts.as_ref();
    let count = routed_mlps + usize::from(shared.is_some());
    let mlp = |i: usize| -> &Mlp<CpuWeight> {
        match i < routed_mlps {
            true => &moe.experts[chosen[i] as usize],
            false => shared.expect("a shared MLP"),
        }
    };
    if (0..count).any(|i| {
        let m = mlp(i);
        m.gate_proj.qmatrix(be).is_none()
            || m.up_proj.qmatrix(be).is_none()
            || m.down_proj.qmatrix(be).is_none()
    }) {
        return false;
    }
    // Members: for routed MLP i, member_at[i]..member_at[i + 1] of (member_rows,
    // member_weights); the shared MLP takes every row.
    let mut slot_of = take::<u32>(num_experts);
    for (i, &e) in chosen.iter().enumerate() {
        slot_of[e as usize] = i as u32;
    }
    let mut member_at = take::<u32>(count + 1);
    for &e in &ids[..rows * k] {
        member_at[slot_of[e as usize] as usize + 1] += 1;
    }
    for i in 0..routed_mlps {
        member_at[i + 1] += member_at[i];
    }
    if shared.is_some() {
        member_at[count] = member_at[routed_mlps] + rows as u32;
    }
    let mut fill = take::<u32>(count);
    fill.copy_from_slice(&member_at[..count]);
    let mut member_rows = take::<u32>(member_at[count] as usize);
    let mut member_weights = take::<f32>(member_at[routed_mlps] as usize);
    for t in 0..rows {
        for j in 0..k {
            let i = slot_of[ids[t * k + j] as usize] as usize;
            let at = fill[i] as usize;
            member_rows[at] = t as u32;
            member_weights[at] = weights[t * k + j];
            fill[i] += 1;
        }
    }
    for (t, r) in member_rows[member_at[routed_mlps] as usize..]
        .iter_mut()
        .enumerate()
    {
        *r = t as u32;
    }
    let members = |i: usize| member_at[i] as usize..member_at[i + 1] as usize;
    let n_rows = |i: usize| members(i).len();

    // Each MLP's input rows quantized once for its gate and up projections: the shared
    // MLP's (every row) at [count], which a lone token's routed MLPs share too; with
    // several tokens routed MLP i's member rows at [i]. MLP i's hidden rows go to [i]
    // once every gate and up product is done.
    let mut acts = MLP_ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if acts.len() < count + 1 {
        acts.resize_with(count + 1, QActivations::default);
    }
    // Every row quantized once; a routed MLP's member rows are copies of theirs.
    let one_token = rows == 1;
    acts[count].quantize(x, rows, d);
    if !one_token {
        let (routed_acts, every_row) = acts.split_at_mut(count);
        for (i, member_acts) in routed_acts[..routed_mlps].iter_mut().enumerate() {
            member_acts.gather_rows(&every_row[0], &member_rows[members(i)]);
        }
    }
    let input_acts = |i: usize| {
        if one_token || i >= routed_mlps {
            count
        } else {
            i
        }
    };

    // Gate then up outputs of MLP i: [rows_i, inter_i] each, from hidden_at[2i].
    let mut hidden_at = take::<u32>(2 * count + 1);
    for i in 0..count {
        let len = (n_rows(i) * mlp(i).gate_proj.rows()) as u32;
        hidden_at[2 * i + 1] = hidden_at[2 * i] + len;
        hidden_at[2 * i + 2] = hidden_at[2 * i + 1] + len;
    }
    let mut hidden = take_overwritten::<f32>(hidden_at[2 * count] as usize);
    let base = SyncPtr(hidden.as_mut_ptr());
    let quantized =
        |w: &'a CpuWeight| -> QMatrix<'a> { w.qmatrix(be).expect("quantized (checked)") };
    // SwiGLU of each MLP, then its hidden rows quantized for its down projection into
    // acts[i], by the thread that finishes the MLP's last gate/up task (while the other
    // threads stream the next MLPs' weights).
    let acts_ptr = SyncPtr(acts.as_mut_ptr());
    let finish_mlp = |i: usize| {
        let (g0, u0, u1) = (
            hidden_at[2 * i] as usize,
            hidden_at[2 * i + 1] as usize,
            hidden_at[2 * i + 2] as usize,
        );
        // SAFETY: MLP i's gate and up outputs, complete (every task that wrote them has
        // finished) and touched by no other task; acts[i] is read by none of the loop's
        // products (a lone token's inputs are at [count], the shared MLP's too, and
        // routed MLP i's own input, at [i], only by its finished tasks).
        let (gate, up, hidden_acts) = unsafe {
            (
                std::slice::from_raw_parts_mut(base.get().add(g0), u0 - g0),
                std::slice::from_raw_parts(base.get().add(u0), u1 - u0),
                &mut *acts_ptr.get().add(i),
            )
        };
        swiglu(be, gate, up);
        hidden_acts.quantize(gate, n_rows(i), mlp(i).gate_proj.rows());
    };
    // SAFETY: matrix j writes hidden[hidden_at[j]..hidden_at[j + 1]] ([rows, w.rows]),
    // its own range; acts as above.
    unsafe {
        run_tiles_then(
            2 * count,
            |j| match j % 2 {
                0 => quantized(&mlp(j / 2).gate_proj),
                _ => quantized(&mlp(j / 2).up_proj),
            },
            |j| (&*acts_ptr.get().add(input_acts(j / 2)), n_rows(j / 2)),
            |j| SyncPtr(base.get().add(hidden_at[j] as usize)),
            Some(Then {
                group_of: &|j: usize| j / 2,
                groups: count,
                done: &finish_mlp,
            }),
        )
    };
    let mut outs = take_overwritten::<f32>(member_at[count] as usize * d);
    let base = SyncPtr(outs.as_mut_ptr());
    // SAFETY: MLP i writes outs[members(i).start · d ..][..rows_i · d], its own rows.
    unsafe {
        run_tiles(
            count,
            |i| quantized(&mlp(i).down_proj),
            |i| (&acts[i], n_rows(i)),
            |i| SyncPtr(base.get().add(member_at[i] as usize * d)),
        )
    };
    MLP_ACTS.with(|a| *a.borrow_mut() = acts);

    // Each MLP's output rounded as `mlp_rows` rounds it; each token's routed outputs
    // weighted and summed in expert id order, as the general path does.
    // Over column spans, in parallel for a batch (every step below is per column).
    let mut routed = take_overwritten::<f32>(rows * d);
    let (outs_ptr, routed_ptr, out_ptr) = (
        SyncPtr(outs.as_mut_ptr()),
        SyncPtr(routed.as_mut_ptr()),
        SyncPtr(out.as_mut_ptr()),
    );
    let tail = |cols: std::ops::Range<usize>| {
        // SAFETY: row `r` of `outs`, `routed` or `out` ([.., d]) at columns `cols`:
        // in bounds (outs holds member_at[count] rows, routed and out `rows`), and each
        // call touches only its own columns.
        let at = |p: &SyncPtr, r: usize| unsafe {
            std::slice::from_raw_parts_mut(p.get().add(r * d + cols.start), cols.len())
        };
        for m in 0..member_at[count] as usize {
            be.round(at(&outs_ptr, m));
        }
        for t in 0..rows {
            at(&routed_ptr, t).fill(0.0);
        }
        for i in 0..routed_mlps {
            for m in members(i) {
                let (t, w) = (member_rows[m] as usize, member_weights[m]);
                for (acc, v) in at(&routed_ptr, t).iter_mut().zip(at(&outs_ptr, m)) {
                    *acc += w * *v;
                }
            }
        }
        for t in 0..rows {
            let (r, o) = (at(&routed_ptr, t), at(&out_ptr, t));
            be.round(r);
            if shared.is_some() {
                let s = at(&outs_ptr, member_at[routed_mlps] as usize + t);
                for ((o, s), r) in o.iter_mut().zip(s.iter()).zip(r.iter()) {
                    *o = s + r;
                }
                be.round(o);
            } else {
                o.copy_from_slice(r);
            }
        }
    };
    assert!(out.len() >= rows * d);
    if rows == 1 {
        tail(0..d);
    } else {
        let spans = d.div_ceil(TAIL_COLUMNS);
        team::for_each(spans, |i| {
            tail(i * TAIL_COLUMNS..d.min((i + 1) * TAIL_COLUMNS))
        });
    }
    true
}

/// Columns per task of a decode batch's expert sums ([`few_tokens_quantized`]'s tail).
const TAIL_COLUMNS: usize = 256;

/// `out_a = x · aᵀ` and `out_b = x · bᵀ` for up to [`FUSED_MAX_ROWS`] rows `x` of
/// quantized matrices sharing their input (the query and latent projections of a decode
/// batch), in one parallel loop instead of two, with `x` quantized once; bit-identical to
/// two [`crate::qmatmul::qmatmul`] calls. Returns false (having done nothing) for more
/// rows, whose products stream well as two loops ([`qmatmul_pair`]).
pub(crate) fn few_rows_pair(
    x: &[f32],
    rows: usize,
    a: QMatrix<'_>,
    out_a: &mut [f32],
    b: QMatrix<'_>,
    out_b: &mut [f32],
) -> bool {
    if rows > FUSED_MAX_ROWS {
        return false;
    }
    assert!(
        a.cols == b.cols && out_a.len() >= rows * a.rows && out_b.len() >= rows * b.rows,
        "linear_pair shapes"
    );
    let mut acts = MLP_ACTS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if acts.is_empty() {
        acts.push(QActivations::default());
    }
    acts[0].quantize(x, rows, a.cols);
    let outs = [SyncPtr(out_a.as_mut_ptr()), SyncPtr(out_b.as_mut_ptr())];
    // SAFETY: out_a and out_b hold rows · a.rows and rows · b.rows values (checked) and
    // are distinct mutable borrows.
    unsafe { run_tiles(2, |j| [a, b][j], |_| (&acts[0], rows), |j| outs[j]) };
    MLP_ACTS.with(|c| *c.borrow_mut() = acts);
    true
}

/// One parallel loop over the 16-row tiles of `count` quantized matrices: matrix `j`
/// (`matrix(j)`) times the `m` rows of `acts(j) = (activations, m)`, its outputs written
/// at `out(j)` as `[m, matrix(j).rows]`. Each matrix is split into tasks as a lone decode
/// product would be; no task crosses a matrix.
///
/// # Safety
/// Each `out(j)` points to `m · matrix(j).rows` writable values, disjoint from every
/// other matrix's and not otherwise accessed during the call.
#[track_caller]
unsafe fn run_tiles<'w, 'a>(
    count: usize,
    matrix: impl Fn(usize) -> QMatrix<'w> + Sync,
    acts: impl Fn(usize) -> (&'a QActivations, usize) + Sync,
    out: impl Fn(usize) -> SyncPtr + Sync,
) {
    // SAFETY: the caller's contract.
    unsafe { run_tiles_then(count, matrix, acts, out, None) }
}

/// Work to run once a group of [`run_tiles_then`]'s matrices is complete.
struct Then<'f> {
    /// The group of matrix `j` (groups are numbered `0..groups`).
    group_of: &'f (dyn Fn(usize) -> usize + Sync),
    groups: usize,
    /// Runs once per group, on the thread that finished the group's last task, after
    /// every task of the group's matrices has finished (their outputs visible to it).
    done: &'f (dyn Fn(usize) + Sync),
}

/// [`run_tiles`], then `then.done(g)` inside the same loop as soon as group `g`'s
/// matrices are complete.
///
/// # Safety
/// As [`run_tiles`]; `then.done` may touch only what no task still running reads or
/// writes.
#[track_caller]
unsafe fn run_tiles_then<'w, 'a>(
    count: usize,
    matrix: impl Fn(usize) -> QMatrix<'w> + Sync,
    acts: impl Fn(usize) -> (&'a QActivations, usize) + Sync,
    out: impl Fn(usize) -> SyncPtr + Sync,
    then: Option<Then<'_>>,
) {
    const TILE: usize = 16;
    let threads = team::threads();
    let mut per_task = take::<u32>(count);
    let mut task_bytes = take::<u32>(count);
    for j in 0..count {
        let w = matrix(j);
        let per = decode_tiles_per_task(w.rows.div_ceil(TILE), w.tile_bytes(), threads);
        per_task[j] = per as u32;
        task_bytes[j] = (per * w.tile_bytes()).min(u32::MAX as usize) as u32;
    }
    // The matrices with the largest tasks first (the shared experts': twice a routed
    // expert's), so the loop does not end waiting on one of them.
    let mut order = take_empty::<u32>();
    order.vec().extend(0..count as u32);
    // (In place: a stable sort would allocate for a batch's ~70 matrices.)
    order
        .vec()
        .sort_unstable_by_key(|&j| (std::cmp::Reverse(task_bytes[j as usize]), j));
    // Matrix order[p]'s tasks are first_task[p]..first_task[p + 1].
    let mut first_task = take::<u32>(count + 1);
    for (p, &j) in order.iter().enumerate() {
        let w = matrix(j as usize);
        let tiles = w.rows.div_ceil(TILE);
        first_task[p + 1] = first_task[p] + tiles.div_ceil(per_task[j as usize] as usize) as u32;
    }
    let tasks = first_task[count] as usize;
    // Tasks left per group, counted down as they finish.
    let mut left = take::<u32>(then.as_ref().map_or(0, |t| t.groups));
    if let Some(then) = &then {
        for (p, &j) in order.iter().enumerate() {
            left[(then.group_of)(j as usize)] += first_task[p + 1] - first_task[p];
        }
    }
    // SAFETY: AtomicU32 has u32's size and alignment; the buffer is only accessed
    // through these atomics until it is dropped after the loop.
    let left: &[AtomicU32] =
        unsafe { std::slice::from_raw_parts(left.as_mut_ptr() as *const AtomicU32, left.len()) };
    team::for_each(tasks, |task| {
        let p = first_task[1..=count].partition_point(|&f| f as usize <= task);
        let j = order[p] as usize;
        let w = matrix(j);
        let per = per_task[j] as usize;
        let t0 = (task - first_task[p] as usize) * per;
        let rows = t0 * TILE..((t0 + per) * TILE).min(w.rows);
        let (a, m) = acts(j);
        // SAFETY: out(j) holds m · w.rows values (the caller's contract); tasks of matrix
        // j write disjoint column ranges of its rows.
        unsafe {
            let y = out(j).get().add(rows.start);
            qmatmul_rows_ptr(a, m, w, rows, y, w.rows)
        };
        if let Some(then) = &then {
            let g = (then.group_of)(j);
            // AcqRel: the last task sees every other task's outputs of the group.
            if left[g].fetch_sub(1, Ordering::AcqRel) == 1 {
                (then.done)(g);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bits, test_values};
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

    /// `linear_pair` (up to 32 rows: one parallel loop; more: the input quantized once)
    /// gives the bits of two `linear`s.
    #[test]
    fn linear_pair_matches_two_linears() {
        let d = 96;
        for dtype in [ComputeDtype::F32, ComputeDtype::Bf16] {
            for format in [QuantFormat::Q8, QuantFormat::Q4] {
                for rows in [1, 5, 40] {
                    let be = CpuBackend::new(dtype);
                    let q = |n, seed| {
                        be.load_quantized(&quantize_tensor(&dense("w", n, d, seed), format))
                            .unwrap()
                    };
                    let (a, b) = (q(80, 3), q(40, 4));
                    let x = test_values(rows * d, 9);
                    let nan = |n: usize| vec![f32::NAN; rows * n];
                    let (mut a1, mut b1, mut a2, mut b2) = (nan(80), nan(40), nan(80), nan(40));
                    be.linear_pair(&x, rows, &a, &mut a1, &b, &mut b1).unwrap();
                    be.linear(&x, rows, &a, &mut a2).unwrap();
                    be.linear(&x, rows, &b, &mut b2).unwrap();
                    assert_eq!(bits(&a1), bits(&a2), "{dtype:?} {format:?} {rows}");
                    assert_eq!(bits(&b1), bits(&b2), "{dtype:?} {format:?} {rows}");
                }
            }
        }
    }

    /// A prompt's MoE, whose gathers, SwiGLU and weighted sums run in parallel (experts
    /// of ~60 rows of 512 values), gives each token the bits it gets alone (q8 experts,
    /// two int8 terms: row-independent products), in f32 and bf16 compute.
    #[test]
    fn a_prompt_moe_equals_each_token_alone() {
        // 4 experts run as tasks of the team (on 2 threads), 2 one after another.
        for (dtype, experts) in [
            (ComputeDtype::F32, 4),
            (ComputeDtype::Bf16, 4),
            (ComputeDtype::F32, 2),
        ] {
            let (d, inter, rows) = (512, 512, 120);
            let be = CpuBackend::new(dtype);
            let weights = MoeWeights {
                gate: be.load_weight(&dense("router", experts, d, 1)).unwrap(),
                experts: (0..experts)
                    .map(|e| mlp(&be, QuantFormat::Q8, d, inter, 10 + 3 * e as u64))
                    .collect(),
                shared_experts: Some(mlp(&be, QuantFormat::Q8, d, 2 * inter, 99)),
                routing: Routing {
                    top_k: 2,
                    groups: None,
                    norm_topk_prob: false,
                    routed_scaling_factor: 2.5,
                },
            };
            // An expert's expected rows (60 or 120): more than one task of each parallel pass.
            let per_expert = rows * 2 / experts;
            assert!(per_expert * d.min(inter) > PARALLEL_MIN_VALUES);
            let mut x = test_values(rows * d, 5);
            be.round(&mut x);
            let mut all = vec![f32::NAN; rows * d];
            moe(&be, &x, rows, &[], &weights, &mut all);
            FUSE_FEW_TOKENS.with(|f| f.set(false));
            for t in 0..rows {
                let mut alone = vec![f32::NAN; d];
                moe(&be, &x[t * d..(t + 1) * d], 1, &[], &weights, &mut alone);
                assert_eq!(
                    bits(&all[t * d..(t + 1) * d]),
                    bits(&alone),
                    "{dtype:?} row {t}"
                );
            }
            FUSE_FEW_TOKENS.with(|f| f.set(true));
            assert!(all.iter().all(|v| v.is_finite()));
        }
    }

    /// The fused few-token path gives the bits of the general path (each expert's
    /// products on their own), for 1, 3, 8 and 32 different tokens, q8 and q4 experts, f32
    /// and bf16 compute, with and without shared experts and renormalized or scaled
    /// weights.
    #[test]
    fn few_token_path_matches_the_general_path_bit_for_bit() {
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
                    for rows in [1, 3, 8, FUSED_MAX_ROWS] {
                        let mut x = test_values(rows * d, 7 + rows as u64);
                        be.round(&mut x);
                        let mut fused = vec![f32::NAN; rows * d];
                        let mut general = vec![f32::NAN; rows * d];
                        moe(&be, &x, rows, &[], &weights, &mut fused);
                        FUSE_FEW_TOKENS.with(|f| f.set(false));
                        moe(&be, &x, rows, &[], &weights, &mut general);
                        FUSE_FEW_TOKENS.with(|f| f.set(true));
                        let case = format!("{dtype:?} {format:?} shared {shared} rows {rows}");
                        assert_eq!(bits(&fused), bits(&general), "{case}");
                        assert!(fused.iter().all(|v| v.is_finite()), "{case}");
                        assert!(fused.iter().filter(|v| **v == 0.0).count() < 4, "{case}");
                        // The fused path runs for quantized experts (not a silent fallback).
                        let ids: Vec<u32> = (0..rows * 3).map(|i| (i % experts) as u32).collect();
                        let w = vec![0.5f32; rows * 3];
                        let mut out = vec![0.0f32; rows * d];
                        assert!(
                            few_tokens_quantized(&be, &x, rows, &weights, &ids, &w, &mut out),
                            "{case}"
                        );
                    }
                }
            }
        }
    }
}
