// DeepSeekMoE on the device: routing, grouping the (token, expert) pairs by expert into
// fixed-size row tiles, and the weighted combination. The experts themselves run as
// batched cuBLAS GEMMs over the tiles (see moe.rs); nothing returns to the host.

#define MAX_TOP_K 16

// Warp-wide choice of the best (value, index): larger value, then lower index.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) {
            v = ov;
            i = oi;
        }
    }
}

// One warp per token (4 per block). logits [rows, e] f32 in, softmax probabilities out;
// ids/weights [rows, k]: the rule of dsv2_backend::routing::route_token (greedy or
// group-limited greedy, renormalised or scaled).
// The routing of token t by one warp, from its router logits p [e] (overwritten by the
// softmax probabilities).
__device__ void route_row(float* p, int t, u32* ids, float* weights, int e, int k, int n_group, int topk_group,
                          int norm_topk_prob, float scaling) {
    int lane = threadIdx.x & 31;
    float mx = NEG_INF;
    for (int i = lane; i < e; i += 32) mx = fmaxf(mx, p[i]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int i = lane; i < e; i += 32) {
        float x = expf(p[i] - mx);
        p[i] = x;
        sum += x;
    }
    float inv = 1.0f / warp_sum(sum);
    for (int i = lane; i < e; i += 32) p[i] *= inv;
    __syncwarp();
    // Group-limited: the topk_group groups with the best maximum probability compete.
    u64 allowed = ~0ull;
    int group_size = e;
    if (n_group > 0) {
        group_size = e / n_group;
        allowed = 0;
        for (int r = 0; r < topk_group; r++) {
            float bv = NEG_INF;
            int bi = -1;
            for (int g = lane; g < n_group; g += 32) {
                if (allowed & (1ull << g)) continue;
                float s = NEG_INF;
                for (int i = g * group_size; i < (g + 1) * group_size; i++) s = fmaxf(s, p[i]);
                if (bi < 0 || s > bv) {
                    bv = s;
                    bi = g;
                }
            }
            warp_best(bv, bi);
            allowed |= 1ull << bi;
        }
    }
    int chosen[MAX_TOP_K];
    float chosen_w[MAX_TOP_K];
    for (int slot = 0; slot < k; slot++) {
        float bv = NEG_INF;
        int bi = -1;
        for (int i = lane; i < e; i += 32) {
            bool taken = false;
            for (int j = 0; j < slot; j++) taken |= chosen[j] == i;
            if (taken) continue;
            float v = (allowed & (1ull << (i / group_size))) ? p[i] : 0.0f;
            if (bi < 0 || v > bv) {
                bv = v;
                bi = i;
            }
        }
        warp_best(bv, bi);
        chosen[slot] = bi;
        chosen_w[slot] = bv;
    }
    if (lane == 0) {
        if (norm_topk_prob && k > 1) {
            float s = 0.0f;
            for (int j = 0; j < k; j++) s += chosen_w[j];
            s += 1e-20f;
            for (int j = 0; j < k; j++) chosen_w[j] /= s;
        } else {
            for (int j = 0; j < k; j++) chosen_w[j] *= scaling;
        }
        for (int j = 0; j < k; j++) {
            ids[(u64)t * k + j] = (u32)chosen[j];
            weights[(u64)t * k + j] = chosen_w[j];
        }
    }
}

extern "C" __global__ void moe_route(float* logits, u32* ids, float* weights, int rows, int e, int k,
                                     int n_group, int topk_group, int norm_topk_prob, float scaling) {
    pdl_prologue();
    int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= rows) return;
    route_row(logits + (u64)t * e, t, ids, weights, e, k, n_group, topk_group, norm_topk_prob, scaling);
}

// Router and routing of one token in one block (bf16 builds, small batches): the f32
// logits x[t] . gate[i] (exact products, f32 sums, as the f32 router GEMM) into shared
// memory, one warp per expert in turn, then route_row. grid (rows), block 1024; d % 8 == 0.
extern "C" __global__ void moe_route_small(const T* x, const T* gate, u32* ids, float* weights, int e, int k,
                                           int n_group, int topk_group, int norm_topk_prob, float scaling,
                                           int d) {
    pdl_prologue();
#ifdef DSV2_BF16
    __shared__ float logits[1024];
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint4* xv = (const uint4*)(x + (u64)t * d);
    for (int i = warp; i < e; i += blockDim.x >> 5) {
        const uint4* gv = (const uint4*)(gate + (u64)i * d);
        float acc = 0.0f;
#pragma unroll 4
        for (int c = lane; c < d / 8; c += 32) acc += dot8(gv[c], xv[c]);
        acc = warp_sum(acc);
        if (lane == 0) logits[i] = acc;
    }
    __syncthreads();
    if (warp == 0) route_row(logits, t, ids, weights, e, k, n_group, topk_group, norm_topk_prob, scaling);
#endif
}

// Pointer arrays of the batched expert GEMMs, each [max_tiles]. See moe.rs.
struct TilePtrs {
    u64* gate_w;
    u64* up_w;
    u64* down_w;
    u64* x_in;    // gathered activations of the tile   [m_tile, d]
    u64* gate_out;  // gate projection, then SwiGLU product [m_tile, inter]
    u64* up_out;    // up projection                        [m_tile, inter]
    u64* down_out;  // expert output                        [m_tile, d]
};

// Plans the grouped expert computation. One block of >= e + 1 threads (e <= 1023).
// ids [pairs] (pairs = rows * k). Expert x's pairs fill consecutive rows of
// ceil(count / m_tile) tiles (in an order set by shared-memory atomics: each row is
// computed on its own, so the order changes nothing in the results); row_token
// [max_tiles * m_tile] gets the token of each row (NO_TOKEN for padding), slot_of [pairs]
// the row of each pair. Tiles past the last used one repeat an expert already read and
// compute on padding rows only. expert_w [3 * e]: gate, up and down weight pointers.
extern "C" __global__ void moe_plan(const u32* ids, int pairs, int k, int e, int m_tile, int max_tiles,
                                    const u64* expert_w, u64 x_in, u64 gate_out, u64 up_out, u64 down_out,
                                    int d, int inter, int elem_bytes, u32* row_token, u32* slot_of, u64* ptrs) {
    pdl_prologue();
    __shared__ u32 count[1024];
    __shared__ u32 start[1025];
    __shared__ u32 fill[1024];
    int x = threadIdx.x;
    for (int i = x; i < e; i += blockDim.x) {
        count[i] = 0;
        fill[i] = 0;
    }
    __syncthreads();
    for (int r = x; r < pairs; r += blockDim.x) atomicAdd(&count[ids[r]], 1u);
    __syncthreads();
    if (x == 0) {
        u32 run = 0;
        for (int i = 0; i < e; i++) {
            start[i] = run;
            run += (count[i] + m_tile - 1) / m_tile;
        }
        start[e] = run;
    }
    __syncthreads();
    for (int r = x; r < pairs; r += blockDim.x) {
        u32 ex = ids[r];
        u32 n = atomicAdd(&fill[ex], 1u);
        u64 row = (u64)start[ex] * m_tile + n;
        row_token[row] = (u32)(r / k);
        slot_of[r] = (u32)row;
    }
    // Padding rows of each used expert's last tile.
    for (int ex = x; ex < e; ex += blockDim.x) {
        u32 tiles = start[ex + 1] - start[ex];
        u64 row0 = (u64)start[ex] * m_tile;
        for (u64 i = count[ex]; i < (u64)tiles * m_tile; i++) row_token[row0 + i] = NO_TOKEN;
    }
    TilePtrs p = {ptrs, ptrs + max_tiles, ptrs + 2 * max_tiles, ptrs + 3 * max_tiles,
                  ptrs + 4 * max_tiles, ptrs + 5 * max_tiles, ptrs + 6 * max_tiles};
    u32 used = start[e];
    // Every tile, used or not, gets its pointers; unused tiles reuse the first pair's
    // expert (already read this step) on their own padding rows.
    for (int tile = x; tile < max_tiles; tile += blockDim.x) {
        int ex = -1;
        if ((u32)tile < used) {
            int lo = 0, hi = e - 1;  // last expert whose first tile is <= tile
            while (lo < hi) {
                int mid = (lo + hi + 1) / 2;
                if (start[mid] <= (u32)tile) lo = mid; else hi = mid - 1;
            }
            ex = lo;
        } else {
            ex = (int)ids[0];
            for (int i = 0; i < m_tile; i++) row_token[(u64)tile * m_tile + i] = NO_TOKEN;
        }
        u64 row0 = (u64)tile * m_tile;
        p.gate_w[tile] = expert_w[ex];
        p.up_w[tile] = expert_w[e + ex];
        p.down_w[tile] = expert_w[2 * e + ex];
        p.x_in[tile] = x_in + row0 * d * elem_bytes;
        p.gate_out[tile] = gate_out + row0 * inter * elem_bytes;
        p.up_out[tile] = up_out + row0 * inter * elem_bytes;
        p.down_out[tile] = down_out + row0 * d * elem_bytes;
    }
}

// xg[r] = x[row_token[r]] (zeros for padding rows): grid (rows of all tiles).
extern "C" __global__ void moe_gather(const T* x, const u32* row_token, T* xg, int d) {
    pdl_prologue();
    u32 tok = row_token[blockIdx.x];
    T* dst = xg + (u64)blockIdx.x * d;
    if (tok == NO_TOKEN) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = from_f<T>(0.0f);
        return;
    }
    const T* src = x + (u64)tok * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// moe_gather for bf16 rows of d % 8 == 0, 16 bytes a thread; padding rows are left as
// they are (their GEMM output rows are never read: every output row of a GEMM depends on
// its own input row only). grid (rows of all tiles).
extern "C" __global__ void moe_gather_v(const T* x, const u32* row_token, T* xg, int d) {
    pdl_prologue();
    u32 tok = row_token[blockIdx.x];
    if (tok == NO_TOKEN) return;
    const uint4* src = (const uint4*)(x + (u64)tok * d);
    uint4* dst = (uint4*)(xg + (u64)blockIdx.x * d);
    for (int i = threadIdx.x; i < d / 8; i += blockDim.x) dst[i] = src[i];
}

// The SwiGLU product of the expert tiles, in place (silu_mul's rounding), on the rows
// that hold a token only, 8 values a thread: g, u [rows of all tiles, inter], inter % 8
// == 0. Grid-stride over the 8-value chunks.
extern "C" __global__ void moe_silu_rows(T* g, const T* u, const u32* row_token, int inter, u64 chunks) {
    pdl_prologue();
#ifdef DSV2_BF16
    u32 per_row = (u32)(inter / 8);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < chunks; i += (u64)gridDim.x * blockDim.x) {
        if (row_token[i / per_row] == NO_TOKEN) continue;
        uint4 gv = ((const uint4*)g)[i], uv = ((const uint4*)u)[i];
        u32 ga[4] = {gv.x, gv.y, gv.z, gv.w}, ua[4] = {uv.x, uv.y, uv.z, uv.w}, o[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float lo = rnd(silu(__uint_as_float(ga[j] << 16))) * __uint_as_float(ua[j] << 16);
            float hi = rnd(silu(__uint_as_float(ga[j] & 0xffff0000u))) * __uint_as_float(ua[j] & 0xffff0000u);
            o[j] = (u32)f32_to_bf16_bits(lo) | ((u32)f32_to_bf16_bits(hi) << 16);
        }
        ((uint4*)g)[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
#endif
}

// moe_combine for bf16 rows of d % 8 == 0, 8 values a thread (the same sums and
// roundings). grid (rows).
extern "C" __global__ void moe_combine_v(const T* y, const u32* slot_of, const float* weights, T* out, int d,
                                         int k, int has_shared) {
    pdl_prologue();
#ifdef DSV2_BF16
    u64 t = blockIdx.x;
    uint4* o = (uint4*)(out + t * d);
    for (int c = threadIdx.x; c < d / 8; c += blockDim.x) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = 0.0f;
        for (int j = 0; j < k; j++) {
            float wj = weights[t * k + j];
            uint4 yv = ((const uint4*)(y + (u64)slot_of[t * k + j] * d))[c];
            u32 ya[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                acc[2 * e] += wj * __uint_as_float(ya[e] << 16);
                acc[2 * e + 1] += wj * __uint_as_float(ya[e] & 0xffff0000u);
            }
        }
        uint4 ov = has_shared ? o[c] : make_uint4(0, 0, 0, 0);
        u32 oa[4] = {ov.x, ov.y, ov.z, ov.w}, r[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float lo = rnd(acc[2 * e]), hi = rnd(acc[2 * e + 1]);
            if (has_shared) {
                lo += __uint_as_float(oa[e] << 16);
                hi += __uint_as_float(oa[e] & 0xffff0000u);
            }
            r[e] = (u32)f32_to_bf16_bits(lo) | ((u32)f32_to_bf16_bits(hi) << 16);
        }
        o[c] = make_uint4(r[0], r[1], r[2], r[3]);
    }
#endif
}

// out[t] = rnd(shared[t] + rnd(sum_j w[t, j] * y[slot_of[t, j]])) (without shared experts:
// the rounded routed sum). `out` holds the shared experts' output on entry. grid (rows).
extern "C" __global__ void moe_combine(const T* y, const u32* slot_of, const float* weights, T* out, int d,
                                       int k, int has_shared) {
    pdl_prologue();
    u64 t = blockIdx.x;
    T* o = out + t * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++) acc += weights[t * k + j] * to_f(y[(u64)slot_of[t * k + j] * d + i]);
        float routed = rnd(acc);
        o[i] = from_f<T>(has_shared ? to_f(o[i]) + routed : routed);
    }
}

// ---------------------------------------------------------------------------------------
// Small-batch MoE (bf16 builds): two GEMV-style launches instead of the tiled GEMMs, so
// that a decode step of a few tokens reads each chosen expert's rows once, with 16-byte
// loads, and the shared experts run in the same launches.
//   moe_small_up:   hid[p] = rnd(rnd(silu(rnd(x Wg^T))) * rnd(x Wu^T)) for every (token,
//                   expert) pair p and, after them, the shared experts of every token.
//   moe_small_down: out[t] = rnd(rnd(hid_sh[t] Wd_sh^T) + rnd(sum_j w[t, j] rnd(hid[p] Wd[p]^T)))
// The roundings are those of the GEMM path (bf16 GEMM outputs, f32 weighted sum).
// A warp computes rpw (1, 2 or 4) rows of a product, a block of 4 warps 4 rpw rows (moe.rs
// sets rpw).


// The residual add and RMSNorm before a MoE block, its router, its routing and the gate
// and up projections of its shared experts in one launch (bf16 builds, rows <= 4). Every
// block normalizes all rows into shared memory as norm_gemv_pair does (block 0 writes
// `normed`). The first `router_blocks` blocks compute the f32 router logits of 8 experts
// (one warp each: exact products, f32 sums, as moe_route_small) into `logits` [rows, e],
// and the last of them to finish routes every token (route_row on a shared copy of the
// logits). The other blocks (none without shared experts, or with sh_gate null) compute
// 16 rows of the shared experts' SwiGLU product hid_sh [rows, inter_sh] each, as
// moe_small_up does, while the routing runs. The last block of all writes the new
// residual. Dynamic shared memory: 2 * rows * d bf16, then rows * e f32.
// grid (router_blocks + rows * ceil(inter_sh / 16)), block 256. counters: two zeroed words.
#define SH_ROWS_PER_WARP 2
// Weight chunks per lane loaded ahead (PRELOAD_EARLY): NR_PRE of a router row, SH_PRE of
// each shared gate and up row (NR_PRE = 2 * SH_ROWS_PER_WARP * SH_PRE registers of 16 B).
#define NR_PRE 8
#define SH_PRE 2
#ifdef DSV2_BF16
__device__ __forceinline__ void norm_route_first(bool router, bool ex_ok, const uint4* gv, bool sh_ok,
                                                 const uint4* const* gr, const uint4* const* ur, int chunks,
                                                 uint4* pre) {
    int lane = threadIdx.x & 31;
    uint4 z = make_uint4(0, 0, 0, 0);
    if (router) {
#pragma unroll
        for (int u = 0; u < NR_PRE; u++) {
            int c = lane + 32 * u;
            pre[u] = ex_ok && c < chunks ? gv[c] : z;
        }
    } else {
#pragma unroll
        for (int u = 0; u < SH_PRE; u++) {
            int c = lane + 32 * u;
#pragma unroll
            for (int r = 0; r < SH_ROWS_PER_WARP; r++) {
                pre[(u * SH_ROWS_PER_WARP + r) * 2] = sh_ok && c < chunks ? ldw(gr[r] + c) : z;
                pre[(u * SH_ROWS_PER_WARP + r) * 2 + 1] = sh_ok && c < chunks ? ldw(ur[r] + c) : z;
            }
        }
    }
}
#endif
// MR: most rows (NORM_MAX_ROWS; 1 for moe_norm_route_r1, the batch-1 instance).
template <int MR>
__device__ __forceinline__ void moe_norm_route_body(T* acc, const T* xres, const float* nw, float eps, T* normed,
                                                    int rows, int d, const T* gate, float* logits, u32* ids,
                                                    float* weights, int e, int k, int n_group, int topk_group,
                                                    int norm_topk_prob, float scaling, u32* counters,
                                                    int router_blocks, const T* sh_gate, const T* sh_up,
                                                    int inter_sh, T* hid_sh) {
#ifdef DSV2_BF16
    if (MR == 1) rows = 1;
    extern __shared__ uint4 smem_u4[];
    T* res_s = (T*)smem_u4;
    T* norm_s = res_s + rows * d;
    float* logit_s = (float*)(norm_s + rows * d);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunks = d / 8;
    bool router = (int)blockIdx.x < router_blocks;
    int ex = blockIdx.x * (blockDim.x >> 5) + warp;
    const uint4* gv = (const uint4*)(gate + (u64)min(ex, e - 1) * d);
    int token = 0, i0 = 0;
    const uint4 *gr[SH_ROWS_PER_WARP], *ur[SH_ROWS_PER_WARP];
    if (!router) {
        int per_token = (inter_sh + 8 * SH_ROWS_PER_WARP - 1) / (8 * SH_ROWS_PER_WARP);
        int b = blockIdx.x - router_blocks;
        token = b / per_token;
        i0 = (b % per_token) * 8 * SH_ROWS_PER_WARP + warp * SH_ROWS_PER_WARP;
#pragma unroll
        for (int r = 0; r < SH_ROWS_PER_WARP; r++) {
            int i = min(i0 + r, inter_sh - 1);
            gr[r] = (const uint4*)(sh_gate + (u64)i * d);
            ur[r] = (const uint4*)(sh_up + (u64)i * d);
        }
    }
    // The warp's first weight chunks (router row, or shared gate and up rows).
    uint4 pre[NR_PRE];
    if (PRELOAD_EARLY) norm_route_first(router, ex < e, gv, i0 < inter_sh, gr, ur, chunks, pre);
    pdl_prologue();
    if (!PRELOAD_EARLY) norm_route_first(router, ex < e, gv, i0 < inter_sh, gr, ur, chunks, pre);
    norm_rows_to_smem_t<MR>(acc, xres, nw, eps, rows, d, res_s, norm_s);
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < rows * d / 8; i += blockDim.x) ((uint4*)normed)[i] = ((const uint4*)norm_s)[i];
    }
    if (router) {
        if (ex < e) {
            for (int t = 0; t < rows; t++) {
                const uint4* xv = (const uint4*)(norm_s + t * d);
                float a = 0.0f;
#pragma unroll
                for (int u = 0; u < NR_PRE; u++) {
                    int c = lane + 32 * u;
                    if (c < chunks) a += dot8(pre[u], xv[c]);
                }
#pragma unroll 4
                for (int c = lane + 32 * NR_PRE; c < chunks; c += 32) a += dot8(gv[c], xv[c]);
                a = warp_sum(a);
                if (lane == 0) logits[(u64)t * e + ex] = a;
            }
        }
        if (last_of(counters, (u32)router_blocks)) {
            for (int i = threadIdx.x; i < rows * e; i += blockDim.x) logit_s[i] = __ldcg(logits + i);
            __syncthreads();
            if (warp < rows)
                route_row(logit_s + warp * e, warp, ids, weights, e, k, n_group, topk_group, norm_topk_prob,
                          scaling);
        }
    } else {
        if (i0 < inter_sh) {
            const uint4* xv = (const uint4*)(norm_s + token * d);
            float ag[SH_ROWS_PER_WARP], au[SH_ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < SH_ROWS_PER_WARP; r++) ag[r] = au[r] = 0.0f;
#pragma unroll
            for (int u = 0; u < SH_PRE; u++) {
                int c = lane + 32 * u;
                if (c < chunks) {
                    uint4 xx = xv[c];
#pragma unroll
                    for (int r = 0; r < SH_ROWS_PER_WARP; r++) {
                        ag[r] += dot8(pre[(u * SH_ROWS_PER_WARP + r) * 2], xx);
                        au[r] += dot8(pre[(u * SH_ROWS_PER_WARP + r) * 2 + 1], xx);
                    }
                }
            }
#pragma unroll 4
            for (int c = lane + 32 * SH_PRE; c < chunks; c += 32) {
                uint4 xx = xv[c];
#pragma unroll
                for (int r = 0; r < SH_ROWS_PER_WARP; r++) {
                    ag[r] += dot8(ldw(gr[r] + c), xx);
                    au[r] += dot8(ldw(ur[r] + c), xx);
                }
            }
            T* out = hid_sh + (u64)token * inter_sh;
#pragma unroll
            for (int r = 0; r < SH_ROWS_PER_WARP; r++) {
                float g = warp_sum(ag[r]), u = warp_sum(au[r]);
                if (lane == 0 && i0 + r < inter_sh) out[i0 + r] = from_f<T>(rnd(silu(rnd(g))) * rnd(u));
            }
        }
    }
    if (last_of(counters + 1, gridDim.x)) {
        for (int i = threadIdx.x; i < rows * d / 8; i += blockDim.x) ((uint4*)acc)[i] = ((const uint4*)res_s)[i];
    }
#else
    pdl_prologue();
#endif
}

#define NORM_ROUTE_ARGS                                                                                           \
    T *acc, const T *xres, const float *nw, float eps, T *normed, int rows, int d, const T *gate, float *logits,  \
        u32 *ids, float *weights, int e, int k, int n_group, int topk_group, int norm_topk_prob, float scaling,    \
        u32 *counters, int router_blocks, const T *sh_gate, const T *sh_up, int inter_sh, T *hid_sh
#define NORM_ROUTE_PASS                                                                                          \
    acc, xres, nw, eps, normed, rows, d, gate, logits, ids, weights, e, k, n_group, topk_group, norm_topk_prob,   \
        scaling, counters, router_blocks, sh_gate, sh_up, inter_sh, hid_sh
extern "C" __global__ void moe_norm_route(NORM_ROUTE_ARGS) { moe_norm_route_body<NORM_MAX_ROWS>(NORM_ROUTE_PASS); }
extern "C" __global__ void moe_norm_route_r1(NORM_ROUTE_ARGS) { moe_norm_route_body<1>(NORM_ROUTE_PASS); }


// grid (ceil(max(inter, inter_sh) / (4 rpw)), (has_shared ? rows : 0) + rows * k), block
// 128, rpw (1, 2 or 4) rows a warp: the shared experts' blocks first (their weights are
// known before the routing, so they start pulling them into L2 while the previous kernel
// finishes), then one row of blocks per (token, expert) pair. x [rows, d]; ids [rows, k];
// expert_w [3, e] (gate, up, down addresses); hid [rows * k, inter]; hid_sh [rows, inter_sh].
template <int R>
__device__ __forceinline__ void small_up_body(const T* x, const u32* ids, const u64* expert_w, int e, int k,
                                              int rows, const T* sh_gate, const T* sh_up, int inter,
                                              int inter_sh, int d, T* hid, T* hid_sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int shared_rows = sh_gate ? rows : 0;
    int y = blockIdx.y;
    int i0 = blockIdx.x * 4 * R + warp * R;
    if (y < shared_rows && i0 < inter_sh && lane == 0) {
        u32 n = (u32)min(R, inter_sh - i0) * (u32)d * 2u;
        prefetch_l2(sh_gate + (u64)i0 * d, n);
        prefetch_l2(sh_up + (u64)i0 * d, n);
    }
    pdl_prologue();
    const T *wg, *wu;
    T* out;
    int width, token;
    if (y >= shared_rows) {
        int p = y - shared_rows;
        token = p / k;
        u32 ex = ids[p];
        wg = (const T*)expert_w[ex];
        wu = (const T*)expert_w[e + ex];
        width = inter;
        out = hid + (u64)p * inter;
    } else {
        token = y;
        wg = sh_gate;
        wu = sh_up;
        width = inter_sh;
        out = hid_sh + (u64)token * inter_sh;
    }
    if (i0 >= width) return;
    const uint4* xv = (const uint4*)(x + (u64)token * d);
    float ag[R], au[R];
    const uint4 *gr[R], *ur[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        int i = min(i0 + r, width - 1);
        gr[r] = (const uint4*)(wg + (u64)i * d);
        ur[r] = (const uint4*)(wu + (u64)i * d);
        ag[r] = au[r] = 0.0f;
    }
#pragma unroll 4
    for (int c = lane; c < d / 8; c += 32) {
        uint4 xx = xv[c];
#pragma unroll
        for (int r = 0; r < R; r++) {
            ag[r] += dot8(ldw(gr[r] + c), xx);
            au[r] += dot8(ldw(ur[r] + c), xx);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float g = warp_sum(ag[r]), u = warp_sum(au[r]);
        if (lane == 0 && i0 + r < width) out[i0 + r] = from_f<T>(rnd(silu(rnd(g))) * rnd(u));
    }
}

extern "C" __global__ void moe_small_up(const T* x, const u32* ids, const u64* expert_w, int e, int k, int rows,
                                        const T* sh_gate, const T* sh_up, int inter, int inter_sh, int d, T* hid,
                                        T* hid_sh, int rpw) {
#ifdef DSV2_BF16
    if (rpw == 1)
        small_up_body<1>(x, ids, expert_w, e, k, rows, sh_gate, sh_up, inter, inter_sh, d, hid, hid_sh);
    else if (rpw == 2)
        small_up_body<2>(x, ids, expert_w, e, k, rows, sh_gate, sh_up, inter, inter_sh, d, hid, hid_sh);
    else
        small_up_body<4>(x, ids, expert_w, e, k, rows, sh_gate, sh_up, inter, inter_sh, d, hid, hid_sh);
#else
    pdl_prologue();
#endif
}

// Weight chunks per lane of each row that moe_small_down's shared-expert blocks load ahead
// (PRELOAD_EARLY; the routed experts' rows are known only after the wait).
#define DOWN_PRE 2

// The first DOWN_PRE chunks of each lane of R weight rows (width n) from row0 (clamped to
// rows_total), as rows_dot reads them: pre[u * R + r].
template <int R>
__device__ __forceinline__ void rows_first(const T* w, int row0, int rows_total, int n, uint4* pre) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < DOWN_PRE; u++) {
        int c = lane + 32 * u;
#pragma unroll
        for (int r = 0; r < R; r++)
            pre[u * R + r] = c < n / 8 ? ldw((const uint4*)(w + (u64)min(row0 + r, rows_total - 1) * n) + c)
                                       : make_uint4(0, 0, 0, 0);
    }
}

// Dot products of R weight rows (width n) with one activation row, summed over the warp
// (every lane gets them). The sums of a row do not depend on R. With use_pre (rows_first),
// the first DOWN_PRE chunks of each lane come from it.
template <int R>
__device__ __forceinline__ void rows_dot(const T* w, int row0, int rows_total, const T* h, int n, float* acc,
                                         const uint4* pre, bool use_pre) {
    int lane = threadIdx.x & 31;
    const uint4* hv = (const uint4*)h;
    const uint4* wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        wr[r] = (const uint4*)(w + (u64)min(row0 + r, rows_total - 1) * n);
        acc[r] = 0.0f;
    }
    int c = lane;
    if (use_pre) {
#pragma unroll
        for (int u = 0; u < DOWN_PRE; u++, c += 32) {
            if (c < n / 8) {
                uint4 hh = hv[c];
#pragma unroll
                for (int r = 0; r < R; r++) acc[r] += dot8(pre[u * R + r], hh);
            }
        }
    }
#pragma unroll 4
    for (; c < n / 8; c += 32) {
        uint4 hh = hv[c];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] += dot8(ldw(wr[r] + c), hh);
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
}

// grid (ceil(d / (4 rpw)), rows * (k + 1)), block 128, rpw (1, 2 or 4) rows a warp: block
// (x, t * (k + 1) + jj) computes rows x*4rpw.. of the down projection j of token t, j = k for jj == 0 (the shared
// experts, when has_shared: first, like moe_small_up) and j = jj - 1 otherwise (expert
// j), rounded like a bf16 GEMM output, into part [rows, k + 1, d] (f32, j-th slice).
template <int R>
__device__ __forceinline__ void small_down_body(const T* hid, const T* hid_sh, const u32* ids,
                                                const u64* expert_w, int e, int k, const T* sh_down, int inter,
                                                int inter_sh, int d, int has_shared, float* part) {
    int t = blockIdx.y / (k + 1), jj = blockIdx.y % (k + 1), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int j = jj == 0 ? k : jj - 1;
    int j0 = blockIdx.x * 4 * R + warp * R;
    if (j0 >= d || (j == k && !has_shared)) return;
    u64 p = (u64)t * k + j;
    const T* w = j < k ? (const T*)expert_w[2 * e + ids[p]] : sh_down;
    int width = j < k ? inter : inter_sh;
    float acc[R];
    rows_dot<R>(w, j0, d, j < k ? hid + p * inter : hid_sh + (u64)t * inter_sh, width, acc, nullptr, false);
    if (lane == 0) {
        float* out = part + ((u64)t * (k + 1) + j) * d;
#pragma unroll
        for (int r = 0; r < R; r++)
            if (j0 + r < d) out[j0 + r] = rnd(acc[r]);
    }
}

extern "C" __global__ void moe_small_down(const T* hid, const T* hid_sh, const u32* ids, const u64* expert_w,
                                          int e, int k, const T* sh_down, int inter, int inter_sh, int d,
                                          int has_shared, float* part, int rpw) {
    pdl_prologue();
#ifdef DSV2_BF16
    if (rpw == 1)
        small_down_body<1>(hid, hid_sh, ids, expert_w, e, k, sh_down, inter, inter_sh, d, has_shared, part);
    else if (rpw == 2)
        small_down_body<2>(hid, hid_sh, ids, expert_w, e, k, sh_down, inter, inter_sh, d, has_shared, part);
    else
        small_down_body<4>(hid, hid_sh, ids, expert_w, e, k, sh_down, inter, inter_sh, d, has_shared, part);
#endif
}

// moe_small_down and moe_small_combine in one launch, every product of an output row pair
// in one block: grid (ceil(d / 2), rows), block 32 * (k + 2) (k + 2 <= 32): warp j < k
// computes rows j0, j0 + 1 of expert j's down projection, warps k and k + 1 row j0 and
// j0 + 1 of the shared experts' (idle without them); the block then combines them as
// moe_small_combine does (same order and roundings: bit-identical). The shared warps load
// their first weight chunks before pdl_wait (PRELOAD_EARLY).
extern "C" __global__ void moe_small_down_all(const T* hid, const T* hid_sh, const u32* ids, const u64* expert_w,
                                              int e, int k, const T* sh_down, int inter, int inter_sh, int d,
                                              int has_shared, const float* weights, T* out) {
#ifdef DSV2_BF16
    __shared__ float ps[34][2];
    int t = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int j0 = blockIdx.x * 2;
    int sh_row = j0 + warp - k;
    bool shared = warp >= k && has_shared && sh_row < d;
#ifdef DSV2_DOWN_IDS_EARLY
    // The routed experts' rows too: `ids` comes from the routing two launches back
    // (moe_norm_route or moe_route_small), which completed before moe_small_up passed its
    // pdl_wait, and this launch starts only after every moe_small_up block has passed
    // its; read through L2 (__ldcg), never a stale L1 line of an earlier layer. Off by
    // default: no gain measured at batch 1 on the H200 (2.24 against 2.23 ms a step).
    uint4 pre[2 * DOWN_PRE];
    const T* wx = nullptr;
    if (warp < k) {
        wx = (const T*)expert_w[2 * e + __ldcg(ids + (u64)t * k + warp)];
        rows_first<2>(wx, j0, d, inter, pre);
    }
    const bool routed_pre = true;
#else
    uint4 pre[DOWN_PRE];
    const bool routed_pre = false;
#endif
    if (PRELOAD_EARLY && shared) rows_first<1>(sh_down, sh_row, d, inter_sh, pre);
    pdl_prologue();
    if (!PRELOAD_EARLY && shared) rows_first<1>(sh_down, sh_row, d, inter_sh, pre);
    if (warp < k) {
        u64 p = (u64)t * k + warp;
        float acc[2];
#ifndef DSV2_DOWN_IDS_EARLY
        const T* wx = (const T*)expert_w[2 * e + ids[p]];
#endif
        rows_dot<2>(wx, j0, d, hid + p * inter, inter, acc, pre, routed_pre);
        if (lane == 0) {
            ps[warp][0] = rnd(acc[0]);
            ps[warp][1] = rnd(acc[1]);
        }
    } else if (shared) {
        float acc[1];
        rows_dot<1>(sh_down, sh_row, d, hid_sh + (u64)t * inter_sh, inter_sh, acc, pre, true);
        if (lane == 0) ps[k][warp - k] = rnd(acc[0]);
    }
    __syncthreads();
    int r = threadIdx.x;
    if (r < 2 && j0 + r < d) {
        float a = 0.0f;
        for (int j = 0; j < k; j++) a += weights[(u64)t * k + j] * ps[j][r];
        float routed = rnd(a);
        out[(u64)t * d + j0 + r] = from_f<T>(has_shared ? ps[k][r] + routed : routed);
    }
#else
    pdl_prologue();
#endif
}

// out[t] = rnd(shared + rnd(sum_j w[t, j] part[t, j])) (without shared experts: the rounded
// routed sum), the combination of moe_combine. grid (rows, ceil(d / 256)), block 256.
extern "C" __global__ void moe_small_combine(const float* part, const float* weights, int k, int d,
                                             int has_shared, T* out) {
    pdl_prologue();
    u64 t = blockIdx.x;
    const float* pt = part + t * (k + 1) * d;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i < d) {
        float acc = 0.0f;
        for (int j = 0; j < k; j++) acc += weights[t * k + j] * pt[(u64)j * d + i];
        float routed = rnd(acc);
        out[t * d + i] = from_f<T>(has_shared ? pt[(u64)k * d + i] + routed : routed);
    }
}

// Small-batch linear layer (bf16 builds): out[t, n] = x[t, :] . w[n, :] for t < rows <= 8,
// reading each weight row once with 16-byte loads (cuBLAS runs such shapes far below the
// memory's speed). w [N, K] with K % 8 == 0 (rows K apart); x rows ldx apart, out rows
// ldo apart; blockIdx.y selects a batch member (offsets bx, bw, bo elements apart: the
// heads of the absorbed W_UV product). out f32 when out_f32, else rounded to T, as a
// bf16 GEMM output. grid (ceil(N / (4 rpw)) + ceil(N2 / (4 rpw)), batch), block 128:
// rpw (1 or 2) rows a warp.
// Blocks from blocks_a on compute a second product of the same x (the pair of a layer's
// query and latent projections): w2 [N2, K] into out2 (rows N2 apart), batch 1 only.
// With `best` (batch 1, no second product) nothing is written: the outputs, rounded to
// T, are folded into best[t] = max over n of argmax_key(out[t, n], n) (greedy sampling;
// argmax_finish turns the keys into token ids).
#define GEMV_MAX_ROWS 8
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif

// Two weight rows w0, w1 (16-byte chunks; w1 unused unless TWO) dotted with `rows`
// activation rows x (ldx apart; global or shared memory): the whole warp, sums in every
// lane. A lane's loads of GEMV_UNROLL chunks are issued before their first use.
template <bool TWO>
__device__ __forceinline__ void gemv_rows(const uint4* w0, const uint4* w1, const T* x, int ldx, int rows,
                                          int chunks, float* a0, float* a1) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) a0[t] = a1[t] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
        uint4 wa[GEMV_UNROLL], wb[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int c = c0 + 32 * u;
            wa[u] = wb[u] = make_uint4(0, 0, 0, 0);
            if (c < chunks) {
                wa[u] = ldw(w0 + c);
                if (TWO) wb[u] = ldw(w1 + c);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int c = c0 + 32 * u;
            if (c < chunks) {
#pragma unroll
                for (int t = 0; t < GEMV_MAX_ROWS; t++) {
                    if (t < rows) {
                        uint4 xx = ((const uint4*)(x + (u64)t * ldx))[c];
                        a0[t] += dot8(wa[u], xx);
                        if (TWO) a1[t] += dot8(wb[u], xx);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        if (t < rows) {
            a0[t] = warp_sum(a0[t]);
            if (TWO) a1[t] = warp_sum(a1[t]);
        }
    }
}

__device__ __forceinline__ void gemv_two_rows(bool two_per_warp, const uint4* w0, const uint4* w1, const T* x,
                                              int ldx, int rows, int chunks, float* a0, float* a1) {
    if (two_per_warp)
        gemv_rows<true>(w0, w1, x, ldx, rows, chunks, a0, a1);
    else
        gemv_rows<false>(w0, w1, x, ldx, rows, chunks, a0, a1);
}

// Orders (value, index) pairs as greedy sampling does: larger value first, then the lower
// index; 0 is below every key.
__device__ __forceinline__ u64 argmax_key(float v, u32 i) {
    u32 u = __float_as_uint(v);
    u32 ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((u64)ord << 32) | (u64)(0xffffffffu - i);
}

// Writes the two outputs (n0, n0 + 1 when `two`) of every row, or folds them into `best`.
__device__ __forceinline__ void gemv_store(const float* s0, const float* s1, int rows, void* out, u64 out0, int ldo,
                                           int n0, bool two, int out_f32) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++) {
        if (t < rows && lane == 0) {
            u64 o = out0 + (u64)t * ldo + n0;
            if (out_f32) {
                ((float*)out)[o] = s0[t];
                if (two) ((float*)out)[o + 1] = s1[t];
            } else {
                ((T*)out)[o] = from_f<T>(s0[t]);
                if (two) ((T*)out)[o + 1] = from_f<T>(s1[t]);
            }
        }
    }
}

extern "C" __global__ void gemv_small(const T* x, const T* w, void* out, int rows, int n, int k, int out_f32,
                                      int ldx, int ldo, u64 bx, u64 bw, u64 bo, const T* w2, void* out2, int n2,
                                      int blocks_a, u64* best, int rpw) {
#ifdef DSV2_BF16
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int bid = blockIdx.x;
    if (bid >= blocks_a) {
        bid -= blocks_a;
        w = w2;
        out = out2;
        n = n2;
        ldo = n2;
    }
    int n0 = (bid * (blockDim.x >> 5) + warp) * rpw;
    bool active = n0 < n, two = rpw == 2 && n0 + 1 < n;
    w += blockIdx.y * bw;
    const uint4* w0 = (const uint4*)(w + (u64)min(n0, n - 1) * k);
    const uint4* w1 = two ? w0 + k / 8 : w0;
    if (active && lane == 0) prefetch_l2(w0, (two ? 2u : 1u) * (u32)k * 2u);
    pdl_prologue();
    x += blockIdx.y * bx;
    float a0[GEMV_MAX_ROWS], a1[GEMV_MAX_ROWS];
    if (active) gemv_two_rows(rpw == 2, w0, w1, x, ldx, rows, k / 8, a0, a1);
    if (best == nullptr) {
        if (active) gemv_store(a0, a1, rows, out, blockIdx.y * bo, ldo, n0, two, out_f32);
        return;
    }
    // Greedy: the block's best key per row, then one atomic per row and block.
    __shared__ u64 keys[4][GEMV_MAX_ROWS];
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_ROWS; t++) {
            u64 key = 0;
            if (active && t < rows) {
                key = argmax_key(rnd(a0[t]), (u32)n0);
                if (two) {
                    u64 k1 = argmax_key(rnd(a1[t]), (u32)n0 + 1);
                    key = k1 > key ? k1 : key;
                }
            }
            keys[warp][t] = key;
        }
    }
    __syncthreads();
    if (threadIdx.x < (unsigned)rows) {
        u64 key = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) key = keys[i][threadIdx.x] > key ? keys[i][threadIdx.x] : key;
        if (key) atomicMax(best + threadIdx.x, key);
    }
#else
    pdl_prologue();
#endif
}

// ---------------------------------------------------------------------------------------
// Batch-1 instances (rows == 1, two weight rows a warp) of gemv_small and norm_gemv_pair:
// the same sums in the same order (bit-identical outputs), without the 8-row unrolling, so
// a fraction of the code; a lane's first GEMV1_UNROLL chunks of both rows are loaded
// before pdl_wait (ROW1_PRELOAD), so with 2,048-wide rows the whole weight slice is in
// flight while the previous kernel finishes.
#ifndef GEMV1_UNROLL
#define GEMV1_UNROLL 8
#endif

// Chunks c0, c0 + 32, ... (GEMV1_UNROLL of them, zeros past `chunks`) of rows w0 and w1.
__device__ __forceinline__ void gemv1_load(const uint4* w0, const uint4* w1, int c0, int chunks, uint4* wa,
                                           uint4* wb) {
#pragma unroll
    for (int u = 0; u < GEMV1_UNROLL; u++) {
        int c = c0 + 32 * u;
        wa[u] = wb[u] = make_uint4(0, 0, 0, 0);
        if (c < chunks) {
            wa[u] = ldw(w0 + c);
            wb[u] = ldw(w1 + c);
        }
    }
}

// The warp's dot products of rows w0 and w1 with one activation row xv (global or shared
// memory), the lane's first chunks already in wa / wb (gemv1_load at c0 = lane); sums in
// every lane, in gemv_rows' order.
__device__ __forceinline__ void gemv1_dot(const uint4* w0, const uint4* w1, const uint4* xv, int chunks, uint4* wa,
                                          uint4* wb, float& s0, float& s1) {
    int lane = threadIdx.x & 31;
    float a0 = 0.0f, a1 = 0.0f;
    for (int c0 = lane;;) {
#pragma unroll
        for (int u = 0; u < GEMV1_UNROLL; u++) {
            int c = c0 + 32 * u;
            if (c < chunks) {
                uint4 xx = xv[c];
                a0 += dot8(wa[u], xx);
                a1 += dot8(wb[u], xx);
            }
        }
        c0 += 32 * GEMV1_UNROLL;
        if (c0 >= chunks) break;
        gemv1_load(w0, w1, c0, chunks, wa, wb);
    }
    s0 = warp_sum(a0);
    s1 = warp_sum(a1);
}

// gemv_small for rows == 1 and rpw == 2 (same arguments; rows, ldx, ldo and rpw unused).
extern "C" __global__ void gemv_small_r1(const T* x, const T* w, void* out, int rows, int n, int k, int out_f32,
                                         int ldx, int ldo, u64 bx, u64 bw, u64 bo, const T* w2, void* out2, int n2,
                                         int blocks_a, u64* best, int rpw) {
#ifdef DSV2_BF16
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int bid = blockIdx.x;
    if (bid >= blocks_a) {
        bid -= blocks_a;
        w = w2;
        out = out2;
        n = n2;
    }
    int n0 = (bid * (blockDim.x >> 5) + warp) * 2, chunks = k / 8;
    bool active = n0 < n, two = n0 + 1 < n;
    w += blockIdx.y * bw;
    const uint4* w0 = (const uint4*)(w + (u64)min(n0, n - 1) * k);
    const uint4* w1 = two ? w0 + chunks : w0;
    uint4 wa[GEMV1_UNROLL], wb[GEMV1_UNROLL];
    if (ROW1_PRELOAD && active) gemv1_load(w0, w1, lane, chunks, wa, wb);
    pdl_prologue();
    if (!ROW1_PRELOAD && active) gemv1_load(w0, w1, lane, chunks, wa, wb);
    float s0 = 0.0f, s1 = 0.0f;
    if (active) gemv1_dot(w0, w1, (const uint4*)(x + blockIdx.y * bx), chunks, wa, wb, s0, s1);
    if (best == nullptr) {
        if (active && lane == 0) {
            u64 o = blockIdx.y * bo + n0;
            if (out_f32) {
                ((float*)out)[o] = s0;
                if (two) ((float*)out)[o + 1] = s1;
            } else {
                ((T*)out)[o] = from_f<T>(s0);
                if (two) ((T*)out)[o + 1] = from_f<T>(s1);
            }
        }
        return;
    }
    __shared__ u64 keys[4];
    if (lane == 0) {
        u64 key = 0;
        if (active) {
            key = argmax_key(rnd(s0), (u32)n0);
            if (two) {
                u64 k1 = argmax_key(rnd(s1), (u32)n0 + 1);
                key = k1 > key ? k1 : key;
            }
        }
        keys[warp] = key;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 key = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) key = keys[i] > key ? keys[i] : key;
        if (key) atomicMax(best, key);
    }
#else
    pdl_prologue();
#endif
}

// ids[t] = the index of best[t] (a key of argmax_key); resets best[t] to 0 for the next
// step. grid (1), block >= rows.
extern "C" __global__ void argmax_finish(u64* best, u32* ids, int rows) {
    pdl_prologue();
    int t = threadIdx.x;
    if (t < rows) {
        u64 key = best[t];
        ids[t] = 0xffffffffu - (u32)(key & 0xffffffffu);
        best[t] = 0;
    }
}

// The layer input of a decode step in one launch (bf16 builds, rows <= 8): the residual
// add and RMSNorm of add_rms_norm (h = rnd(acc + xres), normed = nw * rnd(h / rms(h))),
// then the pair of products of gemv_small (out_a = normed . wa^T, out_b = normed . wb^T).
// Every block normalizes all rows into shared memory (2 * rows * d bf16, dynamic); block 0
// writes `normed`, and the last block to finish (after every block has read `acc`)
// writes the new residual into `acc`. grid (ceil(na / (4 rpw)) + ceil(nb / (4 rpw))),
// block 128.
extern "C" __global__ void norm_gemv_pair(T* acc, const T* xres, const float* nw, float eps, T* normed, int rows,
                                          int d, const T* wa, T* outa, int na, const T* wb, T* outb, int nb,
                                          int blocks_a, u32* counter, int rpw) {
#ifdef DSV2_BF16
    extern __shared__ uint4 smem_u4[];
    T* res_s = (T*)smem_u4;
    T* norm_s = res_s + rows * d;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int bid = blockIdx.x;
    const T* w = wa;
    T* out = outa;
    int n = na;
    if (bid >= blocks_a) {
        bid -= blocks_a;
        w = wb;
        out = outb;
        n = nb;
    }
    int n0 = (bid * (blockDim.x >> 5) + warp) * rpw;
    bool active = n0 < n, two = rpw == 2 && n0 + 1 < n;
    const uint4* w0 = (const uint4*)(w + (u64)min(n0, n - 1) * d);
    const uint4* w1 = two ? w0 + d / 8 : w0;
    if (active && lane == 0) prefetch_l2(w0, (two ? 2u : 1u) * (u32)d * 2u);
    pdl_prologue();
    norm_rows_to_smem(acc, xres, nw, eps, rows, d, res_s, norm_s);
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < rows * d / 8; i += blockDim.x) ((uint4*)normed)[i] = ((const uint4*)norm_s)[i];
    }
    float a0[GEMV_MAX_ROWS], a1[GEMV_MAX_ROWS];
    if (active) {
        gemv_two_rows(rpw == 2, w0, w1, norm_s, d, rows, d / 8, a0, a1);
        gemv_store(a0, a1, rows, out, 0, n, n0, two, 0);
    }
    if (last_block(counter)) {
        for (int i = threadIdx.x; i < rows * d / 8; i += blockDim.x) ((uint4*)acc)[i] = ((const uint4*)res_s)[i];
    }
#else
    pdl_prologue();
#endif
}

// norm_gemv_pair for rows == 1 and rpw == 2 (same arguments; rows and rpw unused): the
// weights of both rows in flight (ROW1_PRELOAD) while the block waits and normalizes.
extern "C" __global__ void norm_gemv_pair_r1(T* acc, const T* xres, const float* nw, float eps, T* normed,
                                             int rows, int d, const T* wa, T* outa, int na, const T* wb, T* outb,
                                             int nb, int blocks_a, u32* counter, int rpw) {
#ifdef DSV2_BF16
    extern __shared__ uint4 smem_u4[];
    T* res_s = (T*)smem_u4;
    T* norm_s = res_s + d;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int bid = blockIdx.x;
    const T* w = wa;
    T* out = outa;
    int n = na;
    if (bid >= blocks_a) {
        bid -= blocks_a;
        w = wb;
        out = outb;
        n = nb;
    }
    int n0 = (bid * (blockDim.x >> 5) + warp) * 2, chunks = d / 8;
    bool active = n0 < n, two = n0 + 1 < n;
    const uint4* w0 = (const uint4*)(w + (u64)min(n0, n - 1) * d);
    const uint4* w1 = two ? w0 + chunks : w0;
    uint4 ra[GEMV1_UNROLL], rb[GEMV1_UNROLL];
    if (ROW1_PRELOAD && active) gemv1_load(w0, w1, lane, chunks, ra, rb);
    pdl_prologue();
    if (!ROW1_PRELOAD && active) gemv1_load(w0, w1, lane, chunks, ra, rb);
    norm_rows_to_smem_t<1>(acc, xres, nw, eps, 1, d, res_s, norm_s);
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < chunks; i += blockDim.x) ((uint4*)normed)[i] = ((const uint4*)norm_s)[i];
    }
    if (active) {
        float s0, s1;
        gemv1_dot(w0, w1, (const uint4*)norm_s, chunks, ra, rb, s0, s1);
        if (lane == 0) {
            out[n0] = from_f<T>(s0);
            if (two) out[n0 + 1] = from_f<T>(s1);
        }
    }
    if (last_block(counter)) {
        for (int i = threadIdx.x; i < chunks; i += blockDim.x) ((uint4*)acc)[i] = ((const uint4*)res_s)[i];
    }
#else
    pdl_prologue();
#endif
}

// Small-batch absorbed query (bf16 builds): q_lat[t, h, :] = W_UK[h]^T q_nope[t, h] for
// t < rows <= 8, with W_UK[h] the dn rows of kv_b [h * (dn + dv) + i, c]. A block covers
// 128 latent columns of one head over all dn rows: its 16 half-warps take rows i = g,
// g + 16, ... (each lane 8 columns, one 16-byte load a row, all issued at once), and the
// half-warps' sums meet in shared memory. q [T, h, qd]. grid (c / 128, h), block 256;
// dn % 16 == 0.
#define ABSORB_ROWS_PER_LANE 8
#ifdef DSV2_BF16
// Columns bx * 128.. of head `head` (the block of absorb_q_small at (bx, head)).
__device__ void absorb_q_block(int bx, int head, const T* q, const T* kv_b, T* q_lat, int rows, int h, int qd,
                               int dn, int dv, int c) {
    __shared__ float part[16][128];
    int g = threadIdx.x >> 4, l16 = threadIdx.x & 15;
    int col = bx * 128 + l16 * 8;
    const T* wk = kv_b + (u64)head * (dn + dv) * c + col;
    float acc[GEMV_MAX_ROWS][8];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; t++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[t][j] = 0.0f;
    for (int i0 = g; i0 < dn; i0 += 16 * ABSORB_ROWS_PER_LANE) {
        uint4 wv[ABSORB_ROWS_PER_LANE];
#pragma unroll
        for (int u = 0; u < ABSORB_ROWS_PER_LANE; u++) {
            int i = i0 + 16 * u;
            wv[u] = i < dn ? ldw((const uint4*)(wk + (u64)i * c)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < ABSORB_ROWS_PER_LANE; u++) {
            int i = i0 + 16 * u;
            if (i >= dn) break;
            u32 ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
            for (int t = 0; t < GEMV_MAX_ROWS; t++) {
                if (t < rows) {
                    float qv = to_f(q[((u64)t * h + head) * qd + i]);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        acc[t][2 * j] += qv * __uint_as_float(ww[j] << 16);
                        acc[t][2 * j + 1] += qv * __uint_as_float(ww[j] & 0xffff0000u);
                    }
                }
            }
        }
    }
    for (int t = 0; t < rows; t++) {
#pragma unroll
        for (int j = 0; j < 8; j++) part[g][l16 * 8 + j] = acc[t][j];
        __syncthreads();
        int jj = threadIdx.x;
        if (jj < 128) {
            float v = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; i++) v += part[i][jj];
            q_lat[((u64)t * h + head) * c + bx * 128 + jj] = from_f<T>(v);
        }
        __syncthreads();
    }
}
#endif

extern "C" __global__ void absorb_q_small(const T* q, const T* kv_b, T* q_lat, int rows, int h, int qd, int dn,
                                          int dv, int c) {
    pdl_prologue();
#ifdef DSV2_BF16
    absorb_q_block(blockIdx.x, blockIdx.y, q, kv_b, q_lat, rows, h, qd, dn, dv, c);
#endif
}

// The queries' RoPE and the latent cache write of a decode step (rope_and_write_cache)
// and the absorbed query (absorb_q_small) in one launch (bf16 builds): blocks below
// (c / 128) * h are absorb_q_small's (column block, head), the `rows` blocks after them
// rope_and_write_cache's tokens. The absorbed query reads only q_nope, the RoPE rewrites
// only q_pe. grid ((c / 128) * h + rows), block 256.
extern "C" __global__ void rope_absorb_q(T* q, const T* kv_b, T* q_lat, int rows, int h, int qd, int dn, int dv,
                                         int c, const T* kv_a, const float* kv_w, const u32* slots,
                                         const float* cos, const float* sin, T* cache, int dr, float eps) {
    pdl_prologue();
#ifdef DSV2_BF16
    int chunks = c / 128, absorb_blocks = chunks * h;
    if ((int)blockIdx.x < absorb_blocks) {
        absorb_q_block(blockIdx.x % chunks, blockIdx.x / chunks, q, kv_b, q_lat, rows, h, qd, dn, dv, c);
    } else {
        rope_and_write_token(blockIdx.x - absorb_blocks, q, kv_a, kv_w, slots, cos, sin, cache, h, qd, dn, c, dr,
                             eps);
    }
#endif
}

// rope_absorb_q for rows == 1 (same arguments and grid): the absorbed query of one token,
// a lane's ABSORB_ROWS_PER_LANE weight chunks loaded before pdl_wait (ROW1_PRELOAD; all of
// them with dn = 128), the same sums in the same order as absorb_q_block.
#ifdef DSV2_BF16
__device__ __forceinline__ void absorb1_load(const T* wk, int i0, int dn, int c, uint4* wv) {
#pragma unroll
    for (int u = 0; u < ABSORB_ROWS_PER_LANE; u++) {
        int i = i0 + 16 * u;
        wv[u] = i < dn ? ldw((const uint4*)(wk + (u64)i * c)) : make_uint4(0, 0, 0, 0);
    }
}
#endif

extern "C" __global__ void rope_absorb_q_r1(T* q, const T* kv_b, T* q_lat, int rows, int h, int qd, int dn,
                                            int dv, int c, const T* kv_a, const float* kv_w, const u32* slots,
                                            const float* cos, const float* sin, T* cache, int dr, float eps) {
#ifdef DSV2_BF16
    __shared__ float part[16][128];
    int chunks = c / 128, absorb_blocks = chunks * h;
    bool absorb = (int)blockIdx.x < absorb_blocks;
    int bx = blockIdx.x % chunks, head = blockIdx.x / chunks;
    int g = threadIdx.x >> 4, l16 = threadIdx.x & 15;
    const T* wk = kv_b + (u64)head * (dn + dv) * c + bx * 128 + l16 * 8;
    uint4 wv[ABSORB_ROWS_PER_LANE];
    if (ROW1_PRELOAD && absorb) absorb1_load(wk, g, dn, c, wv);
    pdl_prologue();
    if (!absorb) {
        rope_and_write_token(0, q, kv_a, kv_w, slots, cos, sin, cache, h, qd, dn, c, dr, eps);
        return;
    }
    if (!ROW1_PRELOAD) absorb1_load(wk, g, dn, c, wv);
    const T* qh = q + (u64)head * qd;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    for (int i0 = g;;) {
#pragma unroll
        for (int u = 0; u < ABSORB_ROWS_PER_LANE; u++) {
            int i = i0 + 16 * u;
            if (i >= dn) break;
            u32 ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
            float qv = to_f(qh[i]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                acc[2 * j] += qv * __uint_as_float(ww[j] << 16);
                acc[2 * j + 1] += qv * __uint_as_float(ww[j] & 0xffff0000u);
            }
        }
        i0 += 16 * ABSORB_ROWS_PER_LANE;
        if (i0 >= dn) break;
        absorb1_load(wk, i0, dn, c, wv);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) part[g][l16 * 8 + j] = acc[j];
    __syncthreads();
    int jj = threadIdx.x;
    if (jj < 128) {
        float v = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; i++) v += part[i][jj];
        q_lat[(u64)head * c + bx * 128 + jj] = from_f<T>(v);
    }
#else
    pdl_prologue();
#endif
}

// Expert tiles of at most 8 tokens as GEMVs (bf16 builds; batches of a few dozen tokens):
// moe_plan's tiles with m_tile 8, each block reading its tile's expert rows once for all
// the tile's tokens (16-byte loads), in place of the gather, the three batched GEMMs and
// silu_mul of the tiled path; moe_combine sums as before. A tile whose first row is
// padding is unused (rows fill from the first). Two output rows a warp, 4 warps a block.
#define TILE_M 8

// h[tile * 8 + r, i] = rnd(rnd(silu(rnd(x_r . gate[i]))) * rnd(x_r . up[i])) for the
// tile's tokens r. grid (ceil(inter / 8), max_tiles), block 128. gate_w / up_w: the
// tiles' weight addresses (moe_plan's arrays).
extern "C" __global__ void moe_tile_up(const T* x, const u32* row_token, const u64* gate_w, const u64* up_w,
                                       int inter, int d, T* h) {
    pdl_prologue();
#ifdef DSV2_BF16
    int tile = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32* rt = row_token + (u64)tile * TILE_M;
    if (rt[0] == NO_TOKEN) return;
    int i0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 2;
    if (i0 >= inter) return;
    bool two = i0 + 1 < inter;
    u32 tok[TILE_M];
#pragma unroll
    for (int r = 0; r < TILE_M; r++) tok[r] = rt[r];
    const uint4* g0 = (const uint4*)((const T*)gate_w[tile] + (u64)i0 * d);
    const uint4* u0 = (const uint4*)((const T*)up_w[tile] + (u64)i0 * d);
    const uint4* g1 = two ? g0 + d / 8 : g0;
    const uint4* u1 = two ? u0 + d / 8 : u0;
    float ag[2][TILE_M], au[2][TILE_M];
#pragma unroll
    for (int r = 0; r < TILE_M; r++) ag[0][r] = ag[1][r] = au[0][r] = au[1][r] = 0.0f;
#pragma unroll 2
    for (int c = lane; c < d / 8; c += 32) {
        uint4 wg0 = g0[c], wg1 = g1[c], wu0 = u0[c], wu1 = u1[c];
#pragma unroll
        for (int r = 0; r < TILE_M; r++) {
            if (tok[r] != NO_TOKEN) {
                uint4 xx = ((const uint4*)(x + (u64)tok[r] * d))[c];
                ag[0][r] += dot8(wg0, xx);
                ag[1][r] += dot8(wg1, xx);
                au[0][r] += dot8(wu0, xx);
                au[1][r] += dot8(wu1, xx);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < TILE_M; r++) {
        if (tok[r] == NO_TOKEN) continue;
        float gA = warp_sum(ag[0][r]), gB = warp_sum(ag[1][r]);
        float uA = warp_sum(au[0][r]), uB = warp_sum(au[1][r]);
        if (lane == 0) {
            T* o = h + ((u64)tile * TILE_M + r) * inter + i0;
            o[0] = from_f<T>(rnd(silu(rnd(gA))) * rnd(uA));
            if (two) o[1] = from_f<T>(rnd(silu(rnd(gB))) * rnd(uB));
        }
    }
#endif
}

// y[tile * 8 + r, j] = rnd(h[tile * 8 + r] . down[j]) for the tile's tokens r.
// grid (ceil(d / 8), max_tiles), block 128.
extern "C" __global__ void moe_tile_down(const T* h, const u32* row_token, const u64* down_w, int inter, int d,
                                         T* y) {
    pdl_prologue();
#ifdef DSV2_BF16
    int tile = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32* rt = row_token + (u64)tile * TILE_M;
    if (rt[0] == NO_TOKEN) return;
    int j0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 2;
    if (j0 >= d) return;
    bool two = j0 + 1 < d;
    bool valid[TILE_M];
#pragma unroll
    for (int r = 0; r < TILE_M; r++) valid[r] = rt[r] != NO_TOKEN;
    const uint4* w0 = (const uint4*)((const T*)down_w[tile] + (u64)j0 * inter);
    const uint4* w1 = two ? w0 + inter / 8 : w0;
    const T* hb = h + (u64)tile * TILE_M * inter;
    float a0[TILE_M], a1[TILE_M];
#pragma unroll
    for (int r = 0; r < TILE_M; r++) a0[r] = a1[r] = 0.0f;
#pragma unroll 2
    for (int c = lane; c < inter / 8; c += 32) {
        uint4 wa = w0[c], wb = w1[c];
#pragma unroll
        for (int r = 0; r < TILE_M; r++) {
            if (valid[r]) {
                uint4 hh = ((const uint4*)(hb + (u64)r * inter))[c];
                a0[r] += dot8(wa, hh);
                a1[r] += dot8(wb, hh);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < TILE_M; r++) {
        if (!valid[r]) continue;
        float s0 = warp_sum(a0[r]), s1 = warp_sum(a1[r]);
        if (lane == 0) {
            T* o = y + ((u64)tile * TILE_M + r) * d + j0;
            o[0] = from_f<T>(s0);
            if (two) o[1] = from_f<T>(s1);
        }
    }
#endif
}
