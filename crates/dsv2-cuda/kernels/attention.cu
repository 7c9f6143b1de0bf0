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
    pdl_prologue();
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
    pdl_prologue();
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
    pdl_prologue();
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

// ---------------------------------------------------------------------------------------
// Split-KV absorbed decode (FlashMLA-style), bf16 builds: one block per (decode token,
// context split, group of 16 heads). The 16 heads share every cached latent row, so the
// block streams its split of the paged cache once through shared memory (32-row tiles,
// double-buffered with cp.async) and runs both products on the tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulation): scores S[16, 32] = Q[16, 576] K^T,
// then O[16, 512] += P[16, 32] V with V the first 512 values of the same rows. The
// online-softmax state (max, sum) and the unnormalised O of each split go to
// part_ml / part_o; mla_decode_combine merges the splits into o_lat.
// Requires c == 512, dr == 64 and h % 16 == 0 (checked on the host).

#define DEC_HEADS 16
#define DEC_C 512
#define DEC_W 576
#define DEC_TILE 32
#define DEC_STRIDE 584  // padded row (bf16 values): conflict-free fragment loads
#define DEC_PSTRIDE 40
#define DEC_THREADS 128

typedef unsigned short u16;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
    unsigned s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void mma_bf16_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 ld_u32(const u16* p) { return *(const u32*)p; }

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned s;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(p));
    return s;
}

// Four 8x8 bf16 matrices from shared memory (lane l gives the address of a 16-byte row:
// lanes 8i..8i+7 the rows of matrix i), in the mma fragment layout; `_t` transposed.
__device__ __forceinline__ void ldsm_x4(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// Loads the cache rows of positions [pos0, pos0 + 32) (those >= end zero-filled) into a tile.
__device__ __forceinline__ void dec_load_tile(u16* tile, const T* cache, const u32* table, int bs, int pos0,
                                              int end) {
    for (int idx = threadIdx.x; idx < DEC_TILE * (DEC_W / 8); idx += DEC_THREADS) {
        int j = idx / (DEC_W / 8), chunk = idx - j * (DEC_W / 8);
        int pos = pos0 + j;
        bool valid = pos < end;
        int p = valid ? pos : pos0;  // a readable address even when nothing is read
        const T* row = cache + ((u64)table[p / bs] * bs + (u64)(p % bs)) * DEC_W;
        cp_async16(tile + j * DEC_STRIDE + chunk * 8, row + chunk * 8, valid ? 16 : 0);
    }
}

#ifdef DSV2_DEC_PRELOAD
// dec_load_tile's rows pos0 + j with lo <= pos0 + j < hi only.
__device__ __forceinline__ void dec_load_rows(u16* tile, const T* cache, const u32* table, int bs, int pos0, int lo,
                                              int hi, int end) {
    for (int idx = threadIdx.x; idx < DEC_TILE * (DEC_W / 8); idx += DEC_THREADS) {
        int j = idx / (DEC_W / 8), chunk = idx - j * (DEC_W / 8);
        int pos = pos0 + j;
        if (pos < lo || pos >= hi) continue;
        bool valid = pos < end;
        int p = valid ? pos : pos0;
        const T* row = cache + ((u64)table[p / bs] * bs + (u64)(p % bs)) * DEC_W;
        cp_async16(tile + j * DEC_STRIDE + chunk * 8, row + chunk * 8, valid ? 16 : 0);
    }
}
#endif

#ifndef DEC_MIN_CHUNK
#define DEC_MIN_CHUNK 1
#endif
// grid (tokens, splits * h / 16), block 128, dynamic smem MLA_DECODE_SMEM (device.rs).
// part_o [tokens * gridDim.y, 16, 512] f32, part_ml [tokens * gridDim.y, 16, 2] f32.
extern "C" __global__ void __launch_bounds__(DEC_THREADS) mla_decode(
    const T* q, const T* q_lat, const T* cache, const u32* tok_list, const u32* tok_seq, const u32* tok_visible,
    const u32* seq_bt_off, const u32* block_tables, float* part_o, float* part_ml, int h, int qd, int dn, int bs,
    int splits, float scale, const u32* seq_ctx, const u32* seq_qlen) {
#if !defined(DSV2_DEC_PRELOAD) || !defined(DSV2_BF16) || __CUDA_ARCH__ < 800
    pdl_prologue();
#endif
#if defined(DSV2_BF16) && __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) unsigned char dec_smem[];
    u16* qs = (u16*)dec_smem;                            // [16][DEC_STRIDE]
    u16* ks = qs + DEC_HEADS * DEC_STRIDE;               // [2][32][DEC_STRIDE]
    u16* ps = ks + 2 * DEC_TILE * DEC_STRIDE;            // [16][DEC_PSTRIDE]
    float* red = (float*)(ps + DEC_HEADS * DEC_PSTRIDE);  // [4][16]
    int t = tok_list ? (int)tok_list[blockIdx.x] : (int)blockIdx.x;
    int split = blockIdx.y % splits, hg = blockIdx.y / splits;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
    int visible = (int)tok_visible[t];
    // Splits of at least DEC_MIN_CHUNK positions (decided on the device, from the context:
    // one launch shape serves every length); the rest have nothing to do. 1 by default:
    // 64 measured the same at context 1K on the H200, 128 slower.
    int chunk_len = max((visible + splits - 1) / splits, DEC_MIN_CHUNK);
    int begin = split * chunk_len, end = min(visible, begin + chunk_len);
    u64 slot = (u64)blockIdx.x * gridDim.y + blockIdx.y;
    float* ml = part_ml + slot * DEC_HEADS * 2;
#ifdef DSV2_DEC_PRELOAD
    // -DDSV2_DEC_PRELOAD: the step's metadata (copied in before its first kernel) and the
    // cache rows of earlier steps (positions below the sequence's past: no kernel of this
    // step writes them) are read before pdl_wait: the first tile's past rows go out while
    // the previous kernel (the cache write of this step's rows) finishes. Off by default:
    // no gain measured at batch 1 on the H200 (2.23 against 2.23 ms a V2-Lite step).
    const u32* table = block_tables + seq_bt_off[tok_seq[t]];
    int past = (int)(seq_ctx[tok_seq[t]] - seq_qlen[tok_seq[t]]);
    int pre_hi = min(min(end, past), begin + DEC_TILE);
    if (begin < pre_hi) dec_load_rows(ks, cache, table, bs, begin, begin, pre_hi, end);
    pdl_prologue();
#endif
    if (begin >= end) {
        if (threadIdx.x < DEC_HEADS) {
            ml[2 * threadIdx.x] = NEG_INF;
            ml[2 * threadIdx.x + 1] = 0.0f;
        }
        return;
    }
#ifndef DSV2_DEC_PRELOAD
    const u32* table = block_tables + seq_bt_off[tok_seq[t]];
#endif
    // The 16 query rows: [q_lat (512) | q_pe (64)].
    for (int idx = threadIdx.x; idx < DEC_HEADS * (DEC_W / 8); idx += DEC_THREADS) {
        int r = idx / (DEC_W / 8), c8 = (idx - r * (DEC_W / 8)) * 8;
        int head = hg * DEC_HEADS + r;
        const T* src = c8 < DEC_C ? q_lat + ((u64)t * h + head) * DEC_C + c8
                                  : q + (u64)t * h * qd + (u64)head * qd + dn + (c8 - DEC_C);
        cp_async16(qs + r * DEC_STRIDE + c8, src, 16);
    }
    int tiles = (end - begin + DEC_TILE - 1) / DEC_TILE;
#ifdef DSV2_DEC_PRELOAD
    dec_load_rows(ks, cache, table, bs, begin, max(begin, pre_hi), begin + DEC_TILE, end);
#else
    dec_load_tile(ks, cache, table, bs, begin, end);
#endif
    cp_async_commit();
    float o[16][4];
#pragma unroll
    for (int nb = 0; nb < 16; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    for (int it = 0; it < tiles; it++) {
        int pos0 = begin + it * DEC_TILE;
        if (it + 1 < tiles) {
            dec_load_tile(ks + ((it + 1) & 1) * DEC_TILE * DEC_STRIDE, cache, table, bs, pos0 + DEC_TILE, end);
            cp_async_commit();
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const u16* kb = ks + (it & 1) * DEC_TILE * DEC_STRIDE;
        // Scores of this warp's 8 positions for the 16 heads.
        float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        // ldmatrix rows: Q rows (lane % 16), columns +8 for lanes 16..31 (A fragments);
        // this warp's key rows (lane % 8), columns +8 per group of 8 lanes (B fragments of
        // two k-steps).
        const u16* qa = qs + (lane & 15) * DEC_STRIDE + ((lane >> 4) << 3);
        const u16* kr = kb + (warp * 8 + (lane & 7)) * DEC_STRIDE + ((lane >> 3) << 3);
#pragma unroll 3
        for (int k0 = 0; k0 < DEC_W; k0 += 32) {
            u32 a[4], a2[4], b[4];
            ldsm_x4(a, qa + k0);
            ldsm_x4(a2, qa + k0 + 16);
            ldsm_x4(b, kr + k0);
            mma_bf16_16816(sc, a[0], a[1], a[2], a[3], b[0], b[1]);
            mma_bf16_16816(sc, a2[0], a2[1], a2[2], a2[3], b[2], b[3]);
        }
        int pa = pos0 + warp * 8 + 2 * tig;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int pos = pa + (i & 1);
            sc[i] = pos < end ? rnd(rnd(sc[i]) * scale) : NEG_INF;
        }
        float mx0 = fmaxf(sc[0], sc[1]), mx1 = fmaxf(sc[2], sc[3]);
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        if (tig == 0) {
            red[warp * DEC_HEADS + g] = mx0;
            red[warp * DEC_HEADS + g + 8] = mx1;
        }
        __syncthreads();
        float t0 = NEG_INF, t1 = NEG_INF;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            t0 = fmaxf(t0, red[w * DEC_HEADS + g]);
            t1 = fmaxf(t1, red[w * DEC_HEADS + g + 8]);
        }
        float n0 = fmaxf(m0, t0), n1 = fmaxf(m1, t1);
        float a0 = m0 == NEG_INF ? 0.0f : expf(m0 - n0);
        float a1 = m1 == NEG_INF ? 0.0f : expf(m1 - n1);
        m0 = n0;
        m1 = n1;
        float p0 = sc[0] == NEG_INF ? 0.0f : expf(sc[0] - n0);
        float p1 = sc[1] == NEG_INF ? 0.0f : expf(sc[1] - n0);
        float p2 = sc[2] == NEG_INF ? 0.0f : expf(sc[2] - n1);
        float p3 = sc[3] == NEG_INF ? 0.0f : expf(sc[3] - n1);
        l0 = l0 * a0 + p0 + p1;
        l1 = l1 * a1 + p2 + p3;
        *(u32*)(ps + g * DEC_PSTRIDE + warp * 8 + 2 * tig) = pack2(f32_to_bf16_bits(p0), f32_to_bf16_bits(p1));
        *(u32*)(ps + (g + 8) * DEC_PSTRIDE + warp * 8 + 2 * tig) =
            pack2(f32_to_bf16_bits(p2), f32_to_bf16_bits(p3));
        __syncthreads();
#pragma unroll
        for (int nb = 0; nb < 16; nb++) {
            o[nb][0] *= a0;
            o[nb][1] *= a0;
            o[nb][2] *= a1;
            o[nb][3] *= a1;
        }
        // O[:, this warp's 128 columns] += P V.
#pragma unroll
        for (int ks16 = 0; ks16 < DEC_TILE; ks16 += 16) {
            const u16* pr0 = ps + g * DEC_PSTRIDE + ks16 + 2 * tig;
            const u16* pr1 = pr0 + 8 * DEC_PSTRIDE;
            u32 pa0 = ld_u32(pr0), pa1 = ld_u32(pr1), pa2 = ld_u32(pr0 + 8), pa3 = ld_u32(pr1 + 8);
            // Transposed ldmatrix: key rows ks16 + (lane % 16), columns +8 for lanes 16..31:
            // the B fragments of two column blocks.
            const u16* v0 = kb + (ks16 + (lane & 15)) * DEC_STRIDE + warp * 128 + ((lane >> 4) << 3);
#pragma unroll
            for (int nb = 0; nb < 16; nb += 2) {
                u32 b[4];
                ldsm_x4_t(b, v0 + nb * 8);
                mma_bf16_16816(o[nb], pa0, pa1, pa2, pa3, b[0], b[1]);
                mma_bf16_16816(o[nb + 1], pa0, pa1, pa2, pa3, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    // Sums over the lanes of a row, then over the warps.
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
    }
    if (tig == 0) {
        red[warp * DEC_HEADS + g] = l0;
        red[warp * DEC_HEADS + g + 8] = l1;
    }
    __syncthreads();
    if (threadIdx.x < DEC_HEADS) {
        int r = threadIdx.x;
        float l = red[r] + red[DEC_HEADS + r] + red[2 * DEC_HEADS + r] + red[3 * DEC_HEADS + r];
        // Every warp holds the same running max of a row; lanes with g == r % 8 hold it.
        ml[2 * r + 1] = l;
    }
    if (tig == 0) {
        ml[2 * g] = m0;
        ml[2 * (g + 8)] = m1;
    }
    float* out = part_o + slot * DEC_HEADS * DEC_C;
#pragma unroll
    for (int nb = 0; nb < 16; nb++) {
        int col = warp * 128 + nb * 8 + 2 * tig;
        *(float2*)(out + g * DEC_C + col) = make_float2(o[nb][0], o[nb][1]);
        *(float2*)(out + (g + 8) * DEC_C + col) = make_float2(o[nb][2], o[nb][3]);
    }
#endif
}

// Merges the splits of mla_decode: o_lat[t, head] = sum_s e^(m_s - M) O_s / sum_s e^(m_s - M) l_s.
// grid (tokens, h * c / 128), block 128 (one latent column a thread); splits <= 64 per
// head group (gridDim.y of mla_decode was splits * h / 16). The first warp turns the
// splits' maxima and sums into weights (lane s: splits s and s + 32; with 32 splits or
// fewer the second adds exact zeros).
extern "C" __global__ void mla_decode_combine(const float* part_o, const float* part_ml, const u32* tok_list,
                                              T* o_lat, int h, int c, int splits) {
    pdl_prologue();
    __shared__ float wts[64];
    int t = tok_list ? (int)tok_list[blockIdx.x] : (int)blockIdx.x;
    int chunks = c / 128;
    int head = blockIdx.y / chunks, k = (blockIdx.y % chunks) * 128 + threadIdx.x;
    int hg = head / DEC_HEADS, r = head % DEC_HEADS;
    u64 base = (u64)blockIdx.x * (splits * (h / DEC_HEADS)) + (u64)hg * splits;
    if (threadIdx.x < 32) {
        int s = threadIdx.x, s2 = s + 32;
        float m = s < splits ? part_ml[((base + s) * DEC_HEADS + r) * 2] : NEG_INF;
        float l = s < splits ? part_ml[((base + s) * DEC_HEADS + r) * 2 + 1] : 0.0f;
        float m2 = s2 < splits ? part_ml[((base + s2) * DEC_HEADS + r) * 2] : NEG_INF;
        float l2 = s2 < splits ? part_ml[((base + s2) * DEC_HEADS + r) * 2 + 1] : 0.0f;
        float big = warp_max(fmaxf(m, m2));
        float wgt = m == NEG_INF ? 0.0f : expf(m - big);
        float wgt2 = m2 == NEG_INF ? 0.0f : expf(m2 - big);
        float total = warp_sum(wgt * l + wgt2 * l2);
        wts[s] = wgt / total;
        wts[s2] = wgt2 / total;
    }
    __syncthreads();
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) acc += part_o[((base + s) * DEC_HEADS + r) * (u64)c + k] * wts[s];
    o_lat[((u64)t * h + head) * c + k] = from_f<T>(acc);
}

// ---------------------------------------------------------------------------------------
// Expanded (prefill) path on the tensor cores, bf16 builds (FlashAttention-2 style): one
// block per (64 new tokens of a sequence, head); each of its 4 warps owns 16 query rows
// and keeps their online softmax and output [16, 128] in registers. Key blocks of 64
// gathered positions ([k_nope | k_pe], and v) go through shared memory; S = Q K^T and
// O += P V run as mma.sync m16n8k16 (bf16 in, f32 accumulation), P taken straight from
// the score registers. Requires dn == 128, dr == 64, dv == 128 (checked on the host).
// grid (ceil(max query_len / 64), seqs * h), block 128.
// seq_list null: sequence = blockIdx.y / h. q [T, h, 192]; kv [G, h * 256] per head
// [k_nope | v]; kpe [G, 64]; out [T, h * 128].

#define PF_DN 128
#define PF_DR 64
#define PF_DQ 192
#define PF_DV 128
#define PF_BLOCK 64
#define PF_KSTRIDE 200
#define PF_VSTRIDE 136

extern "C" __global__ void __launch_bounds__(128) mla_prefill(
    const T* q, const T* kv, const T* kpe, const u32* seq_list, const u32* seq_qstart, const u32* seq_qlen,
    const u32* seq_ctx, const u32* seq_goff, T* out, int h, float scale) {
    pdl_prologue();
#if defined(DSV2_BF16) && __CUDA_ARCH__ >= 800
    __shared__ __align__(16) u16 ks[PF_BLOCK * PF_KSTRIDE];  // Q first, then key blocks
    __shared__ __align__(16) u16 vs[PF_BLOCK * PF_VSTRIDE];
    int si = blockIdx.y / h, head = blockIdx.y % h;
    u32 seq = seq_list ? seq_list[si] : (u32)si;
    int qlen = (int)seq_qlen[seq];
    int q0 = blockIdx.x * PF_BLOCK;
    if (q0 >= qlen) return;
    int ctx = (int)seq_ctx[seq], past = ctx - qlen;
    u64 goff = seq_goff[seq];
    u64 tok0 = seq_qstart[seq];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
    // Queries of the block into shared memory, then into registers (A fragments).
    for (int idx = threadIdx.x; idx < PF_BLOCK * (PF_DQ / 8); idx += 128) {
        int r = idx / (PF_DQ / 8), c8 = (idx - r * (PF_DQ / 8)) * 8;
        bool valid = q0 + r < qlen;
        const T* src = q + ((tok0 + (valid ? q0 + r : q0)) * h + head) * PF_DQ + c8;
        cp_async16(ks + r * PF_KSTRIDE + c8, src, valid ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    u32 qf[PF_DQ / 16][4];
    {
        const u16* r0 = ks + (warp * 16 + g) * PF_KSTRIDE + 2 * tig;
        const u16* r1 = r0 + 8 * PF_KSTRIDE;
#pragma unroll
        for (int kk = 0; kk < PF_DQ / 16; kk++) {
            qf[kk][0] = ld_u32(r0 + 16 * kk);
            qf[kk][1] = ld_u32(r1 + 16 * kk);
            qf[kk][2] = ld_u32(r0 + 16 * kk + 8);
            qf[kk][3] = ld_u32(r1 + 16 * kk + 8);
        }
    }
    __syncthreads();
    int row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // query rows of this lane
    int vis0 = past + row0 + 1, vis1 = past + row1 + 1;
    int kend = past + min(qlen, q0 + PF_BLOCK);
    float o[PF_DV / 8][4];
#pragma unroll
    for (int nb = 0; nb < PF_DV / 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    u64 kvw = (u64)h * (PF_DN + PF_DV);
    for (int kb = 0; kb < kend; kb += PF_BLOCK) {
        for (int idx = threadIdx.x; idx < PF_BLOCK * 40; idx += 128) {
            int j = idx / 40, c = idx - j * 40;
            int pos = kb + j;
            bool valid = pos < kend;
            u64 row = goff + (valid ? pos : kb);
            const T* src;
            u16* dst;
            if (c < 16) {
                src = kv + row * kvw + (u64)head * (PF_DN + PF_DV) + c * 8;
                dst = ks + j * PF_KSTRIDE + c * 8;
            } else if (c < 24) {
                src = kpe + row * PF_DR + (c - 16) * 8;
                dst = ks + j * PF_KSTRIDE + PF_DN + (c - 16) * 8;
            } else {
                src = kv + row * kvw + (u64)head * (PF_DN + PF_DV) + PF_DN + (c - 24) * 8;
                dst = vs + j * PF_VSTRIDE + (c - 24) * 8;
            }
            cp_async16(dst, src, valid ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        float sc[PF_BLOCK / 8][4];
#pragma unroll
        for (int nb = 0; nb < PF_BLOCK / 8; nb++) {
            sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
            // (Plain 32-bit fragment loads: ldmatrix measured slower in this kernel.)
            const u16* kr = ks + (nb * 8 + g) * PF_KSTRIDE + 2 * tig;
#pragma unroll
            for (int kk = 0; kk < PF_DQ / 16; kk++)
                mma_bf16_16816(sc[nb], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], ld_u32(kr + 16 * kk),
                               ld_u32(kr + 16 * kk + 8));
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nb = 0; nb < PF_BLOCK / 8; nb++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int pos = kb + nb * 8 + 2 * tig + (i & 1);
                int vis = i < 2 ? vis0 : vis1;
                sc[nb][i] = pos < vis ? rnd(rnd(sc[nb][i]) * scale) : NEG_INF;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[nb][0], sc[nb][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nb][2], sc[nb][3]));
        }
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        float a0 = n0 == NEG_INF ? 1.0f : (m0 == NEG_INF ? 0.0f : expf(m0 - n0));
        float a1 = n1 == NEG_INF ? 1.0f : (m1 == NEG_INF ? 0.0f : expf(m1 - n1));
        m0 = n0;
        m1 = n1;
        u32 pf[PF_BLOCK / 8][2];
#pragma unroll
        for (int nb = 0; nb < PF_BLOCK / 8; nb++) {
            float p0 = sc[nb][0] == NEG_INF ? 0.0f : expf(sc[nb][0] - n0);
            float p1 = sc[nb][1] == NEG_INF ? 0.0f : expf(sc[nb][1] - n0);
            float p2 = sc[nb][2] == NEG_INF ? 0.0f : expf(sc[nb][2] - n1);
            float p3 = sc[nb][3] == NEG_INF ? 0.0f : expf(sc[nb][3] - n1);
            l0 = l0 * (nb == 0 ? a0 : 1.0f) + p0 + p1;
            l1 = l1 * (nb == 0 ? a1 : 1.0f) + p2 + p3;
            pf[nb][0] = pack2(f32_to_bf16_bits(p0), f32_to_bf16_bits(p1));
            pf[nb][1] = pack2(f32_to_bf16_bits(p2), f32_to_bf16_bits(p3));
        }
#pragma unroll
        for (int nb = 0; nb < PF_DV / 8; nb++) {
            o[nb][0] *= a0;
            o[nb][1] *= a0;
            o[nb][2] *= a1;
            o[nb][3] *= a1;
        }
#pragma unroll
        for (int kk = 0; kk < PF_BLOCK / 16; kk++) {
            u32 pa0 = pf[2 * kk][0], pa1 = pf[2 * kk][1], pa2 = pf[2 * kk + 1][0], pa3 = pf[2 * kk + 1][1];
            const u16* v0 = vs + (16 * kk + 2 * tig) * PF_VSTRIDE + g;
#pragma unroll
            for (int nb = 0; nb < PF_DV / 8; nb++) {
                const u16* v = v0 + nb * 8;
                u32 b0 = pack2(v[0], v[PF_VSTRIDE]);
                u32 b1 = pack2(v[8 * PF_VSTRIDE], v[9 * PF_VSTRIDE]);
                mma_bf16_16816(o[nb], pa0, pa1, pa2, pa3, b0, b1);
            }
        }
        __syncthreads();
    }
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
    }
    float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
#pragma unroll
    for (int nb = 0; nb < PF_DV / 8; nb++) {
        int col = head * PF_DV + nb * 8 + 2 * tig;
        if (row0 < qlen)
            *(u32*)(out + (tok0 + row0) * h * PF_DV + col) =
                pack2(f32_to_bf16_bits(o[nb][0] * inv0), f32_to_bf16_bits(o[nb][1] * inv0));
        if (row1 < qlen)
            *(u32*)(out + (tok0 + row1) * h * PF_DV + col) =
                pack2(f32_to_bf16_bits(o[nb][2] * inv1), f32_to_bf16_bits(o[nb][3] * inv1));
    }
#endif
}
