"""The hardware instructions of templates/intrinsics.cu, for the CPU emulator
(tests/cuda_emulator.py), as the hardware does them:

- `cp.async`: a copy recorded when issued and made when the thread waits for
  its commit group, so a kernel that reads shared memory before waiting reads
  what was there before (the emulator's NaN, say), not the new slice.
- `mma.sync`: a warp-wide instruction. Each lane leaves its fragments in the
  warp's slots, the 32 lanes meet (the emulator's scheduler holds each lane
  until the whole warp is there), then each lane computes its own part of D
  from every lane's fragments, placed by the PTX ISA's tables ("Matrix
  Fragments for mma.m16n8k8" for TF32, "...m16n8k16" for BF16 and FP16), and
  the warp meets again before the slots are reused. Inputs are read as the
  tensor cores read them: a TF32 register's low 13 bits are ignored, BF16 and
  FP16 are widened exactly; products are exact and summed in double.
- `cvt.rna.tf32.f32`: to nearest, ties away from zero, as
  rnnc.precision.Precision.round_inputs.
- `__shfl_down_sync`: a warp-wide exchange through the same slots.
- `__float_as_uint` (`rnnc_bits`): the float's bytes as an unsigned.
- and a count of the bytes `cp.async` copies from one array (`emu_watch`),
  for tests of what kernels read from global memory.
- atomics: a fiber switches only where it waits, so a plain read-modify-write
  is atomic; `rnnc_pause` (the grid barrier's spin) lets the other fibers run.

Per-thread state is indexed by fiber (`emu::current`), not threadIdx, as the
blocks of a persistent kernel run at once.
"""
from __future__ import annotations

HEADER = r"""
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };

namespace emu {
static inline void warp_meet() { wait(AT_WARP); }
static inline unsigned lane() { return threadIdx.x % 32; }
static inline unsigned warp() { return threadIdx.x / 32; }

// cp.async: per thread, the copies issued and the commit group of each
struct PendingCopy { void* dst; const void* src; int bytes; bool full; int group; };
static std::vector<std::vector<PendingCopy>> pending;
static std::vector<int> committed;

// mma.sync and shuffles: each lane's operands, per warp of the block
struct Slot { unsigned a[4], b[2]; float c[4]; float value; };
static std::vector<Slot> slots;  // [thread]

static void start_group(unsigned fibers) {  // indexed by fiber: `current`, the running one
    pending.assign(fibers, {});
    committed.assign(fibers, 0);
    slots.assign(fibers, Slot{});
}
static const bool registered = (group_start = start_group, true);
}  // namespace emu

namespace emu {  // the bytes copied from one watched array, for tests of what kernels read
static const char *watch_begin = nullptr, *watch_end = nullptr;
static unsigned long long watched = 0;
}  // namespace emu
extern "C" void emu_watch(const char* begin, const char* end) {
    emu::watch_begin = begin;
    emu::watch_end = end;
    emu::watched = 0;
}
extern "C" unsigned long long emu_watched() { return emu::watched; }

template <int BYTES>
inline void rnnc_cp_async(void* dst, const void* src, bool full) {
    emu::pending[emu::current].push_back({dst, src, BYTES, full, emu::committed[emu::current]});
    if (full && (const char*)src >= emu::watch_begin && (const char*)src < emu::watch_end) emu::watched += BYTES;
}
inline void rnnc_cp_async_commit() { ++emu::committed[emu::current]; }
template <int PENDING>
inline void rnnc_cp_async_wait() {  // every copy of a group older than the newest PENDING lands
    std::vector<emu::PendingCopy>& mine = emu::pending[emu::current];
    const int oldest_left = emu::committed[emu::current] - PENDING;
    std::vector<emu::PendingCopy> left;
    for (const emu::PendingCopy& c : mine) {
        if (c.group < oldest_left) {
            if (c.full) memcpy(c.dst, c.src, c.bytes); else memset(c.dst, 0, c.bytes);
        } else {
            left.push_back(c);
        }
    }
    mine.swap(left);
}

static inline unsigned emu_bits(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
static inline float emu_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
inline unsigned rnnc_bits(float x) { return emu_bits(x); }

inline unsigned rnnc_to_tf32(float x) {
    unsigned u = emu_bits(x);
    if ((u & 0x7F800000u) == 0x7F800000u) return u;  // inf and NaN as they are
    return (u + 0x1000u) & 0xFFFFE000u;  // half of the 13 dropped bits added to the magnitude
}
inline float rnnc_round_tf32(float x) { return emu_float(rnnc_to_tf32(x)); }
// to nearest even, NaN kept a (quiet) NaN; float16 by the compiler's own conversion, which rounds so
inline unsigned short rnnc_bf16_of(float x) {
    const unsigned u = emu_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float rnnc_bf16_value(unsigned short h) { return emu_float((unsigned)h << 16); }
inline unsigned short rnnc_f16_of(float x) { _Float16 h = (_Float16)x; unsigned short u; memcpy(&u, &h, 2); return u; }
inline float rnnc_f16_value(unsigned short u) { _Float16 h; memcpy(&h, &u, 2); return (float)h; }

namespace emu {
static inline float tf32_value(unsigned u) { return emu_float(u & 0xFFFFE000u); }
static inline float bf16_value(unsigned short h) { return emu_float((unsigned)h << 16); }
static inline float f16_value(unsigned short h) {
    const unsigned sign = (h >> 15) & 1, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    float v;
    if (exponent == 0) v = std::ldexp((float)mantissa, -24);
    else if (exponent == 31) v = mantissa ? NAN : INFINITY;
    else v = std::ldexp((float)(mantissa | 0x400), (int)exponent - 25);
    return sign ? -v : v;
}
static inline unsigned short half_of(unsigned reg, int h) { return (unsigned short)(h ? reg >> 16 : reg & 0xFFFF); }

// D = A B + C for the warp, each lane's fragments in slots; k 8 (tf32) or 16 (16-bit types)
template <int K, typename AT, typename BT>
static void mma(float* d, const unsigned* a, const unsigned* b, AT a_at, BT b_at) {
    Slot& own = slots[current];
    memcpy(own.a, a, sizeof own.a);
    memcpy(own.b, b, sizeof own.b);
    memcpy(own.c, d, sizeof own.c);
    warp_meet();
    const Slot* warp_slots = &slots[current - lane()];
    const unsigned group = lane() / 4, quad = lane() % 4;
    float out[4];
    for (int r = 0; r < 4; ++r) {  // c0, c1 in row group, c2, c3 in row group + 8; columns 2 * quad (+1)
        const unsigned row = group + 8 * (r / 2), col = 2 * quad + r % 2;
        double sum = own.c[r];
        for (int k = 0; k < K; ++k) sum += (double)a_at(warp_slots, row, k) * (double)b_at(warp_slots, k, col);
        out[r] = (float)sum;
    }
    warp_meet();  // every lane has read the slots before any lane writes them again
    memcpy(d, out, sizeof out);
}
}  // namespace emu

inline void rnnc_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
    // A 16x8: a0 (group, quad), a1 (group + 8, quad), a2 (group, quad + 4), a3 (group + 8, quad + 4)
    // B 8x8: b0 (quad, group), b1 (quad + 4, group)
    emu::mma<8>(d, a, b,
        [](const emu::Slot* s, unsigned row, unsigned k) {
            return emu::tf32_value(s[(row % 8) * 4 + k % 4].a[row / 8 + 2 * (k / 4)]); },
        [](const emu::Slot* s, unsigned k, unsigned col) {
            return emu::tf32_value(s[col * 4 + k % 4].b[k / 4]); });
}

// A 16x16: register j of a lane holds (row group + 8 * (j % 2), columns 2 * quad + 8 * (j / 2) and the next)
// B 16x8: register j holds (rows 2 * quad + 8 * j and the next, column group); the first in the low half
#define RNNC_EMU_MMA16(NAME, VALUE)                                                              \
    inline void NAME(float* d, const unsigned* a, const unsigned* b) {                           \
        emu::mma<16>(d, a, b,                                                                    \
            [](const emu::Slot* s, unsigned row, unsigned k) {                                   \
                return VALUE(emu::half_of(s[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2)); }, \
            [](const emu::Slot* s, unsigned k, unsigned col) {                                   \
                return VALUE(emu::half_of(s[col * 4 + (k % 8) / 2].b[k / 8], k % 2)); });        \
    }
RNNC_EMU_MMA16(rnnc_mma_bf16, emu::bf16_value)
RNNC_EMU_MMA16(rnnc_mma_f16, emu::f16_value)

// warp shuffles: every lane of the warp takes part (the kernels pass the full mask)
inline float __shfl_down_sync(unsigned mask, float value, unsigned delta) {
    if (mask != 0xFFFFFFFFu) emu::fail("a shuffle without the full warp");
    emu::slots[emu::current].value = value;
    emu::warp_meet();
    const unsigned from = emu::lane() + delta;
    const float got = from < 32 ? emu::slots[emu::current - emu::lane() + from].value : value;
    emu::warp_meet();
    return got;
}

inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }  // a 16-bit element's bits
// fibers switch only at barriers, warp-wide instructions and spins: a read-modify-write is atomic
inline int atomicAdd(int* p, int v) { const int old = *p; *p = v + old; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = v + old; return old; }
inline unsigned atomicExch(unsigned* p, unsigned v) { const unsigned old = *p; *p = v; return old; }
inline void rnnc_pause() { emu::spin(); }  // the others run before this thread reads again
"""
