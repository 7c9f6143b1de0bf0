// Shared by every dsv2 kernel module; prepended to each .cu file before NVRTC compiles it.
//
// Each module is compiled twice: with -DDSV2_BF16 (activations, weights and cache in
// bf16) and without (f32). `T` is the element type of activations, matrices and the latent
// cache; vectors (norm weights, RoPE angles, router values) are always f32. Arithmetic is
// f32. bf16 is handled as raw bits so that no CUDA header is needed at run time.

typedef unsigned int u32;
typedef unsigned long long u64;

struct bf16 {
    unsigned short bits;
};

#ifdef DSV2_BF16
typedef bf16 T;
#else
typedef float T;
#endif

#define NEG_INF (__int_as_float(0xff800000))
#define NO_TOKEN 0xffffffffu

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }

// Round to nearest even, as `half::bf16::from_f32` and PyTorch do; NaN stays NaN (one
// instruction on sm_80 and newer).
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

template <typename E> __device__ __forceinline__ E from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) {
    bf16 r;
    r.bits = f32_to_bf16_bits(x);
    return r;
}

// `x` rounded to the precision of T (identity in f32 builds): where the bf16 reference
// rounds an intermediate value inside an op.
__device__ __forceinline__ float rnd(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        float s = lane < nw ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Dot of 8 bf16 weights with 8 bf16 activations, in f32.
__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    float s = 0.0f;
    u32 wa[4] = {w.x, w.y, w.z, w.w}, xa[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        s += __uint_as_float(wa[i] << 16) * __uint_as_float(xa[i] << 16);
        s += __uint_as_float(wa[i] & 0xffff0000u) * __uint_as_float(xa[i] & 0xffff0000u);
    }
    return s;
}

// RMSNorm of one row in place of the reference: y = w * rnd(x / rms(x)), rounded.
__device__ void rms_norm_row(const T* x, const float* w, T* out, int d, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f(x[i]);
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[i] = from_f<T>(w[i] * rnd(to_f(x[i]) * inv));
}

// Rotates the adjacent pair (2p, 2p+1) of `x` by the angle whose cos/sin are given.
__device__ __forceinline__ void rotate_pair(const T* src, T* dst, float c, float s) {
    float a = to_f(src[0]), b = to_f(src[1]);
    dst[0] = from_f<T>(a * c - b * s);
    dst[1] = from_f<T>(a * s + b * c);
}

// rope_queries and mla_write_cache of token t by the whole block (rope_and_write_cache).
__device__ void rope_and_write_token(int t, T* q, const T* kv_a, const float* w, const u32* slots, const float* cos,
                                     const float* sin, T* cache, int h, int qd, int dn, int c, int dr, float eps) {
    int width = c + dr, half = dr / 2;
    const T* src = kv_a + (u64)t * width;
    if (slots[t] != NO_TOKEN) {  // else a padding token (PAD_SLOT): nothing cached
        T* dst = cache + (u64)slots[t] * width;
        rms_norm_row(src, w, dst, c, eps);
        for (int p = threadIdx.x; p < half; p += blockDim.x)
            rotate_pair(src + c + 2 * p, dst + c + 2 * p, cos[t * half + p], sin[t * half + p]);
    }
    for (int i = threadIdx.x; i < h * half; i += blockDim.x) {
        int head = i / half, p = i - head * half;
        T* x = q + (u64)t * h * qd + (u64)head * qd + dn + 2 * p;
        rotate_pair(x, x, cos[t * half + p], sin[t * half + p]);
    }
}

// Programmatic dependent launch (sm_90): the backend launches every kernel allowing it to
// start while the previous one finishes; each kernel first waits for its predecessor's
// completion (and memory), then lets its own successor launch. Before sm_90: nothing.
// Before `pdl_wait` a kernel touches no memory that a kernel of the step writes: only
// addresses of weights (the optional L2 prefetch below).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// Weights are never written by a step, so a kernel may read them before pdl_wait:
// moe_norm_route (router and shared-expert rows) and moe_small_down_all (shared-expert
// rows) load their first weight chunks into registers there, overlapping their
// predecessor's tail and their own start-up. -DDSV2_NO_PRELOAD: after the wait (for
// comparisons). The same in gemv_small, norm_gemv_pair and rope_absorb_q measured slower
// (their code grew by half: docs/BENCHMARKS.md, issue #7 fourth round).
#ifdef DSV2_NO_PRELOAD
#define PRELOAD_EARLY 0
#else
#define PRELOAD_EARLY 1
#endif

// The batch-1 kernels (rows == 1: gemv_small_r1, norm_gemv_pair_r1, rope_absorb_q_r1)
// load their weight rows before pdl_wait: GEMV1_UNROLL 16-byte chunks a lane of each of
// their two rows (all of a 2,048-wide row), eight of rope_absorb_q's. Their code is a
// fraction of the 8-row kernels', so the loads' registers and the peeled first step cost
// little. -DDSV2_ROW1_NO_PRELOAD: after the wait (for comparisons).
#ifdef DSV2_ROW1_NO_PRELOAD
#define ROW1_PRELOAD 0
#else
#define ROW1_PRELOAD 1
#endif

__device__ __forceinline__ void pdl_prologue() {
    pdl_wait();
    pdl_launch();
}

// Starts pulling [p, p + bytes) into L2 (sm_90 bulk prefetch; p 16-byte aligned, bytes a
// multiple of 16), for weights before `pdl_wait`. Only with -DDSV2_L2_PREFETCH: measured
// slower at batch 1 on the H200 (3.17 against 3.01 ms a step), so off by default.
__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
#if __CUDA_ARCH__ >= 900 && defined(DSV2_L2_PREFETCH)
    if (bytes) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// A 16-byte weight load. Plain by default; -DDSV2_LDW_NO_L1 makes it skip L1
// (`ld.global.nc.L1::no_allocate`, measured slower with the GEMV kernels).
__device__ __forceinline__ uint4 ldw(const uint4* p) {
#ifdef DSV2_LDW_NO_L1
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
#else
    return *p;
#endif
}

// Counts this block's arrival at `counter` (every thread of the block calls it, after its
// global writes; `total` blocks arrive); true in the last block to arrive, which then sees
// the other blocks' writes and has reset the counter to zero for the next launch.
__device__ bool last_of(u32* counter, u32 total) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        u32 prev = atomicAdd(counter, 1u);
        is_last = prev == total - 1;
        if (is_last) atomicExch(counter, 0u);
        __threadfence();
    }
    __syncthreads();
    return is_last != 0;
}

// last_of over every block of the grid.
__device__ bool last_block(u32* counter) { return last_of(counter, gridDim.x * gridDim.y * gridDim.z); }

// The residual add and RMSNorm of `rows` rows of width d (d % 8 == 0), as add_rms_norm
// computes them, into shared memory: res_s = rnd(acc + x), norm_s = w * rnd(res_s / rms).
// Every thread of the block calls it (at most MR rows: 8, or 1 for the batch-1 kernels,
// whose code is then a fraction of the size); ends with the block synchronized.
#define NORM_MAX_ROWS 8
#ifdef DSV2_BF16
template <int MR>
__device__ void norm_rows_to_smem_t(const T* acc, const T* x, const float* w, float eps, int rows, int d, T* res_s,
                                    T* norm_s) {
    __shared__ float partial[32][MR];
    __shared__ float inv_s[MR];
    if (MR == 1) rows = 1;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int chunks = d / 8;
    float ss[MR];
#pragma unroll
    for (int t = 0; t < MR; t++) ss[t] = 0.0f;
#pragma unroll
    for (int t = 0; t < MR; t++) {
        if (t >= rows) break;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            uint4 a = __ldcg((const uint4*)(acc + (u64)t * d) + c);
            uint4 b = __ldcg((const uint4*)(x + (u64)t * d) + c);
            u32 aa[4] = {a.x, a.y, a.z, a.w}, bb[4] = {b.x, b.y, b.z, b.w}, rr[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float lo = rnd(__uint_as_float(aa[j] << 16) + __uint_as_float(bb[j] << 16));
                float hi = rnd(__uint_as_float(aa[j] & 0xffff0000u) + __uint_as_float(bb[j] & 0xffff0000u));
                ss[t] += lo * lo;
                ss[t] += hi * hi;
                rr[j] = (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);
            }
            ((uint4*)(res_s + t * d))[c] = make_uint4(rr[0], rr[1], rr[2], rr[3]);
        }
    }
#pragma unroll
    for (int t = 0; t < MR; t++) {
        if (t >= rows) break;
        float v = warp_sum(ss[t]);
        if (lane == 0) partial[warp][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
        float s = 0.0f;
        for (int i = 0; i < nw; i++) s += partial[i][threadIdx.x];
        inv_s[threadIdx.x] = 1.0f / sqrtf(s / (float)d + eps);
    }
    __syncthreads();
    for (int t = 0; t < rows; t++) {
        float inv = inv_s[t];
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            uint4 r = ((const uint4*)(res_s + t * d))[c];
            u32 rr[4] = {r.x, r.y, r.z, r.w}, oo[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int i = c * 8 + 2 * j;
                float lo = w[i] * rnd(__uint_as_float(rr[j] << 16) * inv);
                float hi = w[i + 1] * rnd(__uint_as_float(rr[j] & 0xffff0000u) * inv);
                oo[j] = (u32)f32_to_bf16_bits(lo) | ((u32)f32_to_bf16_bits(hi) << 16);
            }
            ((uint4*)(norm_s + t * d))[c] = make_uint4(oo[0], oo[1], oo[2], oo[3]);
        }
    }
    __syncthreads();
}

__device__ void norm_rows_to_smem(const T* acc, const T* x, const float* w, float eps, int rows, int d, T* res_s,
                                  T* norm_s) {
    norm_rows_to_smem_t<NORM_MAX_ROWS>(acc, x, w, eps, rows, d, res_s, norm_s);
}
#endif
