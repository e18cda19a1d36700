// Philox4x32-10 (Salmon et al., SC 2011), the first word of its output: the bits of
// one element of a random op's mask (rnnc/ops/random.py draws the same in NumPy).
// Plain integer C, the same on the GPU and in the tests' emulation.
__device__ __forceinline__ unsigned rnnc_philox(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                                unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {  // the key is bumped before every round but the first
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c0, p1 = 0xCD9E8D57ull * c2;
        const unsigned n0 = (unsigned)(p1 >> 32) ^ c1 ^ k0, n2 = (unsigned)(p0 >> 32) ^ c3 ^ k1;
        c1 = (unsigned)p1;
        c3 = (unsigned)p0;
        c0 = n0;
        c2 = n2;
    }
    return c0;
}

// The few hardware instructions the kernels use, as PTX in small device functions.
// Built by anything but nvcc (the tests' CPU emulation of CUDA), kernels.cu gets
// them from elsewhere: the emulator defines the same functions its own way.
#ifdef __CUDACC__
// the bits of a float (a random op's key words are stored as floats' bits)
__device__ __forceinline__ unsigned rnnc_bits(float x) {
    return __float_as_uint(x);
}

// cp.async: copy BYTES from global to shared memory without holding a register,
// zero-filling when !full; 4, 8 and 16 bytes only, so a lone 16-bit element is
// copied at once. Copies complete in commit groups (rnnc_cp_async_wait).
template <int BYTES>
__device__ __forceinline__ void rnnc_cp_async(void* dst, const void* src, bool full) {
#if __CUDA_ARCH__ >= 800
    if constexpr (BYTES == 16) {  // .cg: not kept in L1, the tile lives in shared memory
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "r"(full ? 16 : 0));
        return;
    } else if constexpr (BYTES == 4 || BYTES == 8) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                     :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src), "n"(BYTES),
                        "r"(full ? BYTES : 0));
        return;
    }
#endif
    unsigned char* d = static_cast<unsigned char*>(dst);
    const unsigned char* s = static_cast<const unsigned char*>(src);
    for (int i = 0; i < BYTES; ++i) {
        d[i] = full ? s[i] : 0;
    }
}

__device__ __forceinline__ void rnnc_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n");
#endif
}

// wait until at most PENDING of this thread's newest commit groups are still copying
template <int PENDING>
__device__ __forceinline__ void rnnc_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING));
#endif
}

// a float rounded to TF32 (10 mantissa bits) to nearest, ties away from zero
__device__ __forceinline__ unsigned rnnc_to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// the same as a float, for products that multiply on CUDA cores
__device__ __forceinline__ float rnnc_round_tf32(float x) {
    return __uint_as_float(rnnc_to_tf32(x));
}

// a float as bfloat16 and float16 bits, to nearest even (float16: past its range, inf), and back
__device__ __forceinline__ unsigned short rnnc_bf16_of(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float rnnc_bf16_value(unsigned short h) {
    return __uint_as_float((unsigned)h << 16);
}

__device__ __forceinline__ unsigned short rnnc_f16_of(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float rnnc_f16_value(unsigned short h) {
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
    return r;
}

// d[0..3] += A * B for one warp: A 16x8 (a[0..3]), B 8x8 (b[0..1]), TF32 inputs, float32 sums
__device__ __forceinline__ void rnnc_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d[0..3] += A * B for one warp: A 16x16 (a[0..3], two bf16 each), B 16x8 (b[0..1]), float32 sums
__device__ __forceinline__ void rnnc_mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// the same with fp16 inputs
__device__ __forceinline__ void rnnc_mma_f16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// a short wait in a spin loop (the grid barrier's), leaving the issue slots to the other warps
__device__ __forceinline__ void rnnc_pause() {
    __nanosleep(64);
}
#endif

// bfloat16 and float16 elements of a buffer: 16 bits that a kernel reads as a
// float and writes from one (to nearest even); all arithmetic is on floats.
#define RNNC_SIXTEEN_BIT(NAME, OF, VALUE)                                                     \
    struct NAME {                                                                             \
        unsigned short bits;                                                                  \
        NAME() = default; /* trivial, as __shared__ arrays need */                            \
        __device__ __forceinline__ NAME(float x) : bits(OF(x)) {}                             \
        __device__ __forceinline__ operator float() const { return VALUE(bits); }             \
        __device__ __forceinline__ NAME& operator+=(float x) { return *this = NAME(float(*this) + x); } \
    };                                                                                        \
    /* a float rounded to the type, for products that multiply on CUDA cores */              \
    __device__ __forceinline__ float rnnc_round_##NAME(float x) { return float(NAME(x)); }
RNNC_SIXTEEN_BIT(rnnc_bf16, rnnc_bf16_of, rnnc_bf16_value)
RNNC_SIXTEEN_BIT(rnnc_f16, rnnc_f16_of, rnnc_f16_value)

// two 16-bit values (raw bits) as one 32-bit fragment register, the first in the low half
__device__ __forceinline__ unsigned rnnc_pack(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// A barrier for the whole grid, between the phases of a persistent kernel (persistent.cu.j2).
// barrier[0] counts the blocks arrived; barrier[1] is the generation, a sense that changes at
// every barrier: the last block to arrive sets the count back to 0, then starts the next
// generation, which the other blocks wait to see. One pair of counters serves every barrier of
// the launch: a block can arrive at the next barrier only after the generation changed, so
// after the count was reset. Fences: a block's writes are visible to the whole GPU before it
// arrives, and it fences again after the wait, before it reads what the others wrote.
// Every block must be resident at once, else blocks wait for ones that never start: the runtime
// launches no more blocks than the GPU holds at once (occupancy.py), and its launches run one at
// a time on one stream, so no kernel of its own can hold a multiprocessor the grid needs
// (another program's kernels finish on their own and free theirs).
__device__ __forceinline__ void rnnc_grid_barrier(unsigned* barrier) {
    __syncthreads();  // the whole block is done with the phase
    if (threadIdx.x == 0) {
        volatile unsigned* generation = barrier + 1;
        const unsigned mine = *generation;
        __threadfence();  // the block's writes, and the read of its generation, before it arrives
        if (atomicAdd(barrier, 1u) == gridDim.x * gridDim.y * gridDim.z - 1) {
            atomicExch(barrier, 0u);
            __threadfence();  // the count reset before any block can see the new generation
            atomicAdd(barrier + 1, 1u);
        } else {
            while (*generation == mine) {
                rnnc_pause();
            }
        }
        __threadfence();  // what the others wrote before they arrived, before this block reads it
    }
    __syncthreads();
}
