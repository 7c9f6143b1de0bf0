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

// Programmatic dependent launch (sm_90): the backend launches every kernel allowing it to
// start while the previous one finishes; each kernel first waits for its predecessor's
// completion (and memory), then lets its own successor launch. Before sm_90: nothing.
__device__ __forceinline__ void pdl_prologue() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}
