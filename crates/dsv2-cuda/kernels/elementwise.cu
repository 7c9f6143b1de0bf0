// Row-wise and elementwise kernels: embedding, RMSNorm, residual add, RoPE, the latent
// cache write, SwiGLU, row gathers and the greedy argmax.

// out[t] = table[ids[t]]: grid (T), table [V, d], out [T, d].
extern "C" __global__ void embed(const T* table, const u32* ids, T* out, int d) {
    pdl_prologue();
    const T* src = table + (u64)ids[blockIdx.x] * d;
    T* dst = out + (u64)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// grid (rows): x, out [rows, d]; w [d].
extern "C" __global__ void rms_norm(const T* x, const float* w, T* out, int d, float eps) {
    pdl_prologue();
    u64 r = blockIdx.x;
    rms_norm_row(x + r * d, w, out + r * d, d, eps);
}

// The residual add then RMSNorm of one row a block: acc = rnd(acc + x), then out =
// rms_norm(acc) as rms_norm does. grid (rows): acc, x, out [rows, d]; w [d].
// Rows of up to 8 values a thread stay in registers (one pass over the memory).
#define ARN_MAX 8
extern "C" __global__ void add_rms_norm(T* acc, const T* x, const float* w, T* out, int d, float eps) {
    pdl_prologue();
    u64 r = blockIdx.x;
    T* a = acc + r * d;
    const T* b = x + r * d;
    if (d > ARN_MAX * (int)blockDim.x) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) a[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
        __syncthreads();
        rms_norm_row(a, w, out + r * d, d, eps);
        return;
    }
    float v[ARN_MAX];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < ARN_MAX; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < d) {
            v[j] = rnd(to_f(a[i]) + to_f(b[i]));
            a[i] = from_f<T>(v[j]);
            ss += v[j] * v[j];
        }
    }
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    T* o = out + r * d;
#pragma unroll
    for (int j = 0; j < ARN_MAX; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < d) o[i] = from_f<T>(w[i] * rnd(v[j] * inv));
    }
}

// add_rms_norm for bf16 rows of d % 8 == 0 values, d <= 8 * ARNV_CHUNKS * blockDim.x: 16
// bytes a load, the row in registers (the same roundings; the sum of squares in another
// order). grid (rows).
#define ARNV_CHUNKS 2
extern "C" __global__ void add_rms_norm_v(T* acc, const T* x, const float* w, T* out, int d, float eps) {
    pdl_prologue();
#ifdef DSV2_BF16
    u64 r = blockIdx.x;
    uint4* a = (uint4*)(acc + r * d);
    const uint4* b = (const uint4*)(x + r * d);
    int chunks = d / 8;
    float v[ARNV_CHUNKS][8];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < ARNV_CHUNKS; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < chunks) {
            uint4 av = a[c], bv = b[c];
            u32 aa[4] = {av.x, av.y, av.z, av.w}, ba[4] = {bv.x, bv.y, bv.z, bv.w}, o[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                v[j][2 * e] = rnd(__uint_as_float(aa[e] << 16) + __uint_as_float(ba[e] << 16));
                v[j][2 * e + 1] = rnd(__uint_as_float(aa[e] & 0xffff0000u) + __uint_as_float(ba[e] & 0xffff0000u));
                ss += v[j][2 * e] * v[j][2 * e];
                ss += v[j][2 * e + 1] * v[j][2 * e + 1];
                o[e] = (__float_as_uint(v[j][2 * e]) >> 16) | (__float_as_uint(v[j][2 * e + 1]) & 0xffff0000u);
            }
            a[c] = make_uint4(o[0], o[1], o[2], o[3]);
        }
    }
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    uint4* out_v = (uint4*)(out + r * d);
#pragma unroll
    for (int j = 0; j < ARNV_CHUNKS; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < chunks) {
            float4 w0 = ((const float4*)w)[2 * c], w1 = ((const float4*)w)[2 * c + 1];
            float ww[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            u32 o[4];
#pragma unroll
            for (int e = 0; e < 4; e++)
                o[e] = (u32)f32_to_bf16_bits(ww[2 * e] * rnd(v[j][2 * e] * inv)) |
                       ((u32)f32_to_bf16_bits(ww[2 * e + 1] * rnd(v[j][2 * e + 1] * inv)) << 16);
            out_v[c] = make_uint4(o[0], o[1], o[2], o[3]);
        }
    }
#endif
}

// acc[i] = rnd(acc[i] + x[i]) for i < n.
extern "C" __global__ void add_assign(T* acc, const T* x, u64 n) {
    pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        acc[i] = from_f<T>(to_f(acc[i]) + to_f(x[i]));
}

// RoPE on the last `dr` values of each head of q [T, h, qd]: grid (T).
// cos/sin [T, dr/2].
extern "C" __global__ void rope_queries(T* q, const float* cos, const float* sin, int h, int qd, int dn, int dr) {
    pdl_prologue();
    int t = blockIdx.x, half = dr / 2;
    for (int i = threadIdx.x; i < h * half; i += blockDim.x) {
        int head = i / half, p = i - head * half;
        T* x = q + (u64)t * h * qd + (u64)head * qd + dn + 2 * p;
        rotate_pair(x, x, cos[t * half + p], sin[t * half + p]);
    }
}

// From kv_a [T, c + dr]: RMSNorm of the latent, RoPE of the key tail, both written to
// `cache` [slots, c + dr] (one layer) at slots[t]. grid (T).
extern "C" __global__ void mla_write_cache(const T* kv_a, const float* w, const u32* slots, const float* cos,
                                           const float* sin, T* cache, int c, int dr, float eps) {
    pdl_prologue();
    int t = blockIdx.x, width = c + dr, half = dr / 2;
    if (slots[t] == NO_TOKEN) return;  // a padding token (PAD_SLOT): nothing cached
    const T* src = kv_a + (u64)t * width;
    T* dst = cache + (u64)slots[t] * width;
    rms_norm_row(src, w, dst, c, eps);
    for (int p = threadIdx.x; p < half; p += blockDim.x)
        rotate_pair(src + c + 2 * p, dst + c + 2 * p, cos[t * half + p], sin[t * half + p]);
}

// rope_queries and mla_write_cache of token blockIdx.x in one launch (their arguments).
extern "C" __global__ void rope_and_write_cache(T* q, const T* kv_a, const float* w, const u32* slots,
                                                const float* cos, const float* sin, T* cache, int h, int qd,
                                                int dn, int c, int dr, float eps) {
    pdl_prologue();
    rope_and_write_token(blockIdx.x, q, kv_a, w, slots, cos, sin, cache, h, qd, dn, c, dr, eps);
}

// g[i] = rnd(rnd(silu(g[i])) * u[i]) for i < n: the SwiGLU product, in place.
extern "C" __global__ void silu_mul(T* g, const T* u, u64 n) {
    pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        g[i] = from_f<T>(rnd(silu(to_f(g[i]))) * to_f(u[i]));
}

// out[r] = x[rows[r]]: grid (R), rows of width d.
extern "C" __global__ void gather_rows(const T* x, const u32* rows, T* out, int d) {
    pdl_prologue();
    const T* src = x + (u64)rows[blockIdx.x] * d;
    T* dst = out + (u64)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// x[i] = rnd(x[i]) for f32 values (the bf16 logits of the reference, upcast).
extern "C" __global__ void round_f32(float* x, u64 n) {
    pdl_prologue();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = rnd(x[i]);
}

// ids[r] = argmax of logits row r [v], ties to the lowest id. grid (R), block 1024.
extern "C" __global__ void argmax_rows(const float* logits, u32* ids, int v) {
    pdl_prologue();
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const float* row = logits + (u64)blockIdx.x * v;
    float bv = NEG_INF;
    int bi = -1;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = row[i];
        if (bi < 0 || x > bv) {
            bv = x;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            int oi = best_i[w];
            float ov = best_v[w];
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        ids[blockIdx.x] = (u32)(bi < 0 ? 0 : bi);
    }
}
