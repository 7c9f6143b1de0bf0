// MLA attention over the paged latent cache, in its two formulations (see attention.rs).
//
// Both kernels run one block per (query token, head); the block's warps take the visible
// context positions in turn, each keeping an online softmax (running max, sum and
// weighted accumulator), merged at the end. Scores are rounded like the reference
// (bf16(bf16(q.k) * scale) in bf16 builds); probabilities stay f32.

#define MAX_WARPS 8
// Accumulator values per lane: C <= 32 * MAX_LANE_C (latent), Dv <= 32 * MAX_LANE_C.
#define MAX_LANE_C 16


// Merges the warps' partial softmax states and writes acc / l for `n` values to out.
__device__ void merge_warps(float m, float l, const float* acc, int n, float* smem, T* out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float* ms = smem;
    float* ls = smem + MAX_WARPS;
    float* accs = smem + 2 * MAX_WARPS;  // [nw][n]
    if (lane == 0) {
        ms[warp] = m;
        ls[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < MAX_LANE_C; j++) {
        int k = lane + 32 * j;
        if (k < n) accs[warp * n + k] = acc[j];
    }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < nw; w++) big = fmaxf(big, ms[w]);
    float total = 0.0f;
    for (int w = 0; w < nw; w++)
        if (ms[w] != NEG_INF) total += ls[w] * expf(ms[w] - big);
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < nw; w++)
            if (ms[w] != NEG_INF) o += accs[w * n + k] * expf(ms[w] - big);
        out[k] = from_f<T>(o / total);
    }
}

// One online-softmax step for score `sc`: returns the factor by which the old
// accumulator is rescaled, and sets *p to the new position's weight.
__device__ __forceinline__ float online_step(float& m, float& l, float sc, float* p) {
    float mn = fmaxf(m, sc);
    float alpha = m == NEG_INF ? 0.0f : expf(m - mn);
    *p = expf(sc - mn);
    l = l * alpha + *p;
    m = mn;
    return alpha;
}

// Absorbed (decode) path: MQA over the W = c + dr wide cached rows shared by all heads.
// grid (tokens, H). q [T, H, qd] (RoPE'd tail used), q_lat [T, H, c] = W_UK^T q_nope,
// cache: this layer [slots, W]; o_lat [T, H, c] = softmax-weighted sum of latents.
// tok_list selects the tokens (null: token = blockIdx.x).
// dynamic smem: (W + 2 * MAX_WARPS + MAX_WARPS * c) floats.
extern "C" __global__ void mla_absorbed(const T* q, const T* q_lat, const T* cache, const u32* tok_list,
                                        const u32* tok_seq, const u32* tok_visible, const u32* seq_bt_off,
                                        const u32* block_tables, T* o_lat, int h, int qd, int dn, int c,
                                        int dr, int bs, float scale) {
    extern __shared__ float smem[];
    int t = tok_list ? (int)tok_list[blockIdx.x] : (int)blockIdx.x;
    int head = blockIdx.y, width = c + dr;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float* qs = smem;
    const T* ql = q_lat + ((u64)t * h + head) * c;
    const T* qp = q + (u64)t * h * qd + (u64)head * qd + dn;
    for (int k = threadIdx.x; k < c; k += blockDim.x) qs[k] = to_f(ql[k]);
    for (int k = threadIdx.x; k < dr; k += blockDim.x) qs[c + k] = to_f(qp[k]);
    __syncthreads();
    u32 seq = tok_seq[t];
    int visible = (int)tok_visible[t];
    const u32* table = block_tables + seq_bt_off[seq];
    float m = NEG_INF, l = 0.0f;
    float acc[MAX_LANE_C];
#pragma unroll
    for (int j = 0; j < MAX_LANE_C; j++) acc[j] = 0.0f;
    for (int s = warp; s < visible; s += nw) {
        const T* row = cache + ((u64)table[s / bs] * bs + (u64)(s % bs)) * width;
        float part = 0.0f;
        for (int k = lane; k < width; k += 32) part += qs[k] * to_f(row[k]);
        float sc = rnd(rnd(warp_sum(part)) * scale);
        float p;
        float alpha = online_step(m, l, sc, &p);
#pragma unroll
        for (int j = 0; j < MAX_LANE_C; j++) {
            int k = lane + 32 * j;
            if (k < c) acc[j] = acc[j] * alpha + p * to_f(row[k]);
        }
    }
    merge_warps(m, l, acc, c, smem + width, o_lat + ((u64)t * h + head) * c);
}

// Copies the context rows of the listed sequences out of the paged cache: latents to
// lat [G, c], RoPE keys to kpe [G, dr], sequence `seq` at rows goff[seq] ...
// grid (ceil(max_ctx / 8), sequences); seq_list null: sequence = blockIdx.y.
extern "C" __global__ void gather_context(const T* cache, const u32* seq_list, const u32* seq_ctx,
                                          const u32* seq_bt_off, const u32* block_tables, const u32* seq_goff,
                                          T* lat, T* kpe, int c, int dr, int bs) {
    u32 seq = seq_list ? seq_list[blockIdx.y] : blockIdx.y;
    int ctx = (int)seq_ctx[seq], width = c + dr;
    const u32* table = block_tables + seq_bt_off[seq];
    u64 goff = seq_goff[seq];
    for (int s = blockIdx.x * 8; s < min(ctx, (int)(blockIdx.x + 1) * 8); s++) {
        const T* row = cache + ((u64)table[s / bs] * bs + (u64)(s % bs)) * width;
        for (int k = threadIdx.x; k < width; k += blockDim.x) {
            if (k < c)
                lat[(goff + s) * c + k] = row[k];
            else
                kpe[(goff + s) * dr + (k - c)] = row[k];
        }
    }
}

// Expanded (prefill) path: causal MHA with keys [k_nope | k_pe] and values re-derived
// from the latents. grid (tokens, H). q [T, H, dn + dr]; kv [G, H * (dn + dv)] per head
// [k_nope | v]; kpe [G, dr]; out [T, H * dv]. dynamic smem: (dn + dr + 2 * MAX_WARPS +
// MAX_WARPS * dv) floats.
extern "C" __global__ void mla_expanded(const T* q, const T* kv, const T* kpe, const u32* tok_list,
                                        const u32* tok_seq, const u32* tok_visible, const u32* seq_goff, T* out,
                                        int h, int dn, int dr, int dv, float scale) {
    extern __shared__ float smem[];
    int t = tok_list ? (int)tok_list[blockIdx.x] : (int)blockIdx.x;
    int head = blockIdx.y, qd = dn + dr, kvw = h * (dn + dv);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float* qs = smem;
    const T* qh = q + (u64)t * h * qd + (u64)head * qd;
    for (int k = threadIdx.x; k < qd; k += blockDim.x) qs[k] = to_f(qh[k]);
    __syncthreads();
    u32 seq = tok_seq[t];
    int visible = (int)tok_visible[t];
    u64 goff = seq_goff[seq];
    float m = NEG_INF, l = 0.0f;
    float acc[MAX_LANE_C];
#pragma unroll
    for (int j = 0; j < MAX_LANE_C; j++) acc[j] = 0.0f;
    for (int s = warp; s < visible; s += nw) {
        const T* krow = kv + (goff + s) * kvw + (u64)head * (dn + dv);
        const T* prow = kpe + (goff + s) * dr;
        float part = 0.0f;
        for (int k = lane; k < dn; k += 32) part += qs[k] * to_f(krow[k]);
        for (int k = lane; k < dr; k += 32) part += qs[dn + k] * to_f(prow[k]);
        float sc = rnd(rnd(warp_sum(part)) * scale);
        float p;
        float alpha = online_step(m, l, sc, &p);
#pragma unroll
        for (int j = 0; j < MAX_LANE_C; j++) {
            int k = lane + 32 * j;
            if (k < dv) acc[j] = acc[j] * alpha + p * to_f(krow[dn + k]);
        }
    }
    merge_warps(m, l, acc, dv, smem + qd, out + (u64)t * h * dv + (u64)head * dv);
}
