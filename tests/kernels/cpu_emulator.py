"""Run the kernels' own source on the CPU: a test-only emulator of the GPU execution model.

Each kernel body (the same text MLX compiles for CUDA) is compiled with g++ against a CPU
prelude that defines the K* macro layer, the CUDA built-ins our CUDA-only kernels use, and
the tensor-core `mma.sync` fragment semantics. One threadgroup runs at a time; its threads
are fibers (ucontext) switched cooperatively at barriers and warp shuffles, so barriers,
shared memory (function-static storage: one block at a time) and warp exchanges behave as
on the GPU, deterministically. A barrier that can never complete (a warp operation inside a
divergent branch, say) is reported as a deadlock instead of hanging.

What this checks: every index, guard, reduction and synchronisation of the kernel text,
with float32 arithmetic. What it cannot: the GPU compilers, memory-model races between
threadgroups, speed, and whether the hardware's mma fragments are the ones assumed here
(the PTX ISA's layouts for m16n8k16).

`launch(spec, inputs, outputs, grid, threadgroup, template)` has the signature of
mhc_mlx.kernels.build.launch, so tests monkeypatch it into the kernel modules and call their
forward and backward helpers on concrete arrays (not under mx.grad: the emulator evaluates).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

from mhc_mlx.kernels import coefficients_mma, prelude

CACHE = os.path.join(tempfile.gettempdir(), f"mhc_mlx_emulator_{os.getuid()}")

RUNTIME = r"""
#include <ucontext.h>
#include <setjmp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
// C headers only, and fixed arrays instead of std::vector: each kernel instance is its own
// translation unit, and the C++ standard headers were half of every compile.

// ---- fibers: one threadgroup at a time, threads switched at barriers --------------------
// A fiber starts once through makecontext/swapcontext; after that every switch is a
// _setjmp/_longjmp pair (no signal-mask system call per switch).
namespace emu {
enum Wait { NONE, BLOCK, WARP };
struct Fiber { ucontext_t ctx; jmp_buf jb; bool started = false, done = false; Wait wait = NONE; };
struct Group {
  Fiber fibers[1024];
  char* stacks = nullptr;  // not zeroed: a fiber touches only the pages its frames use
  size_t stack_bytes = 0;
  bool partial_warp_exchange = false;
  ucontext_t main;
  jmp_buf main_jb;
  int cur = 0, nthreads = 0, bid = 0, nblocks = 0;
  int block_arrived = 0, block_alive = 0;
  int warp_arrived[32], warp_alive[32];
  uint32_t scratch[32 * 32 * 8];  // per warp: 32 lanes x 8 words for exchanges
  bool deadlock = false;
};
static Group G;
static void (*body)() = nullptr;
// The launch's buffers [start, end), so a prefetch hint outside all of them is reported (on a
// GPU it would be a hint for memory the kernel does not own).
static const char* buf_start[64];
static const char* buf_end[64];
static int nbufs = 0, bad_prefetches = 0;
static void prefetch(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < nbufs; ++i)
    if (c >= buf_start[i] && c < buf_end[i]) return;
  ++bad_prefetches;
}
static float bits_float(int b) {  // KBITS_FLOAT: a float template argument passed as its bits
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}
static const size_t STACK = 128 * 1024;

static void yield_to_scheduler() {
  if (!_setjmp(G.fibers[G.cur].jb)) _longjmp(G.main_jb, 1);
}
static void release(Wait kind, int warp) {
  for (int i = 0; i < G.nthreads; ++i)
    if (G.fibers[i].wait == kind && (kind == BLOCK || i / 32 == warp)) G.fibers[i].wait = NONE;
}
static void block_barrier() {
  if (++G.block_arrived == G.block_alive) { G.block_arrived = 0; release(BLOCK, 0); return; }
  G.fibers[G.cur].wait = BLOCK;
  yield_to_scheduler();
}
static void warp_barrier() {
  const int w = G.cur / 32;
  if (++G.warp_arrived[w] == G.warp_alive[w]) { G.warp_arrived[w] = 0; release(WARP, w); return; }
  G.fibers[G.cur].wait = WARP;
  yield_to_scheduler();
}
static void fiber_main() {
  body();
  const int me = G.cur, w = me / 32;
  G.fibers[me].done = true;
  // an exited thread no longer counts at barriers (as on the GPU)
  if (--G.block_alive > 0 && G.block_arrived > 0 && G.block_arrived == G.block_alive) {
    G.block_arrived = 0; release(BLOCK, 0);
  }
  if (--G.warp_alive[w] > 0 && G.warp_arrived[w] > 0 && G.warp_arrived[w] == G.warp_alive[w]) {
    G.warp_arrived[w] = 0; release(WARP, w);
  }
  _longjmp(G.main_jb, 1);  // never returns through uc_link
}
static int run_grid(int nblocks, int nthreads) {
  G.nthreads = nthreads;
  G.nblocks = nblocks;
  if (nthreads > 1024) return 1;  // reported as a failure: no GPU runs more
  if (G.stack_bytes < (size_t)nthreads * STACK) {
    delete[] G.stacks;
    G.stack_bytes = (size_t)nthreads * STACK;
    G.stacks = new char[G.stack_bytes];
  }
  G.partial_warp_exchange = false;
  const int nwarps = (nthreads + 31) / 32;
  memset(G.scratch, 0, sizeof(G.scratch));
  for (int b = 0; b < nblocks; ++b) {
    G.bid = b;
    G.block_arrived = 0;
    G.block_alive = nthreads;
    for (int w = 0; w < nwarps; ++w) G.warp_arrived[w] = G.warp_alive[w] = 0;
    for (int i = 0; i < nthreads; ++i) G.warp_alive[i / 32]++;
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = G.fibers[i];
      f.started = false;
      f.done = false;
      f.wait = NONE;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = G.stacks + (size_t)i * STACK;
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    int remaining = nthreads;
    while (remaining > 0) {
      bool progressed = false;
      for (int i = 0; i < nthreads; ++i) {
        Fiber& f = G.fibers[i];
        if (f.done || f.wait != NONE) continue;
        G.cur = i;
        if (!_setjmp(G.main_jb)) {
          if (!f.started) {
            f.started = true;
            swapcontext(&G.main, &f.ctx);
          } else {
            _longjmp(f.jb, 1);
          }
        }
        progressed = true;
        if (f.done) --remaining;
      }
      if (!progressed) { G.deadlock = true; return b + 1; }
    }
    if (G.partial_warp_exchange) return -(b + 1);
  }
  return 0;
}
}  // namespace emu

// ---- the CUDA vocabulary our kernels use ---------------------------------------------------
struct mhc_dim3 { unsigned int x, y, z; };
#define threadIdx (mhc_dim3{(unsigned)emu::G.cur, 0u, 0u})
#define blockIdx (mhc_dim3{(unsigned)emu::G.bid, 0u, 0u})
#define blockDim (mhc_dim3{(unsigned)emu::G.nthreads, 1u, 1u})
#define gridDim (mhc_dim3{(unsigned)emu::G.nblocks, 1u, 1u})
#define __device__
#define __forceinline__ inline
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float2 { float x, y; };
static inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t mhc_float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
template <typename A> static inline A min(A a, A b) { return b < a ? b : a; }
template <typename A> static inline A max(A a, A b) { return a < b ? b : a; }

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // round to nearest even, as CUDA's conversion
    uint32_t u = mhc_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = (uint16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = (uint16_t)(u >> 16);
  }
  operator float() const { return __uint_as_float((uint32_t)bits << 16); }
};
struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline float2 __half22float2(__half2 h) { return float2{(float)h.x, (float)h.y}; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)};
}
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{(float)v.x, (float)v.y}; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 v) { return (float)v; }

// A warp exchange needs all 32 lanes (full masks): one after some lanes exited is undefined on
// the GPU, so it is reported.
static inline void mhc_full_warp() {
  if (emu::G.warp_alive[emu::G.cur / 32] < 32) emu::G.partial_warp_exchange = true;
}
static inline uint32_t mhc_exchange(uint32_t v, int src, int slot = 0) {
  mhc_full_warp();
  const int w = emu::G.cur / 32, lane = emu::G.cur % 32;
  emu::G.scratch[((size_t)w * 32 + lane) * 8 + slot] = v;
  emu::warp_barrier();
  const uint32_t r = emu::G.scratch[((size_t)w * 32 + src) * 8 + slot];
  emu::warp_barrier();
  return r;
}
static inline float __shfl_xor_sync(unsigned, float v, int m) {
  return __uint_as_float(mhc_exchange(mhc_float_bits(v), (emu::G.cur % 32) ^ m));
}
static inline float __shfl_sync(unsigned, float v, int src) {
  return __uint_as_float(mhc_exchange(mhc_float_bits(v), src));
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the PTX ISA's fragment layouts:
// lane = 4 g + c; A: a0a1 (g, 2c..), a2a3 (g+8, 2c..), a4a5 (g, 2c+8..), a6a7 (g+8, 2c+8..);
// B: b0b1 (k 2c.., n g), b2b3 (k 2c+8.., n g); D: d0d1 (g, 2c..), d2d3 (g+8, 2c..).
static inline float mhc_bf16_half(uint32_t w, int h) { return __uint_as_float(h ? (w & 0xffff0000u) : (w << 16)); }
static inline void mhc_mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  mhc_full_warp();
  const int w = emu::G.cur / 32, lane = emu::G.cur % 32;
  uint32_t* mine = &emu::G.scratch[((size_t)w * 32 + lane) * 8];
  mine[0] = a[0]; mine[1] = a[1]; mine[2] = a[2]; mine[3] = a[3]; mine[4] = b0; mine[5] = b1;
  emu::warp_barrier();
  auto A = [&](int r, int k) {
    const int src = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return mhc_bf16_half(emu::G.scratch[((size_t)w * 32 + src) * 8 + reg], k % 2);
  };
  auto B = [&](int k, int n) {
    const int src = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8 ? 1 : 0);
    return mhc_bf16_half(emu::G.scratch[((size_t)w * 32 + src) * 8 + reg], k % 2);
  };
  const int g = lane / 4, c = lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0), n = 2 * c + (e % 2);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[e] = d[e] + s;
  }
  emu::warp_barrier();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

"""

# The K* layer for the "cuda" flavour: CUDA's macro semantics, CPU definitions.
CUDA_LAYER = r"""
// ---- the K* macro layer on the CPU --------------------------------------------------------
#define MHC_BACKEND_CPU_EMULATION 1
#define KDEV static inline
#define KSHARED static
#define KSHPTR(type) type*
#define KFLOAT4(a, b, c, d) float4{(a), (b), (c), (d)}
#define KWARP_SYNC() emu::warp_barrier()
#define KTHREAD
#define KBARRIER() emu::block_barrier()
#define KTID (emu::G.cur)
#define KBID (emu::G.bid)
#define KNT (emu::G.nthreads)
#define KNB (emu::G.nblocks)
#define KLANE (emu::G.cur % 32)
#define KWARP (emu::G.cur / 32)
#define KUNROLL
#define KEXP(v) expf(v)
#define KLOG(v) logf(v)
#define KSQRT(v) sqrtf(v)
#define KMAX(a, b) fmaxf((a), (b))
#define KRCP(v) (1.0f / (v))
#define KALIGNED16(p) ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull)
#define KPREFETCH_L2(p) emu::prefetch(p)
#define KBITS_FLOAT(b) emu::bits_float(b)
struct float4 { float x, y, z, w; };

KDEV float kwarp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
KDEV float kwarp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
KDEV float kshfl(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
KDEV float kshfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
template <typename T, int V, typename P>
KDEV void kload(float* dst, P p, int64_t off, bool vec) {
  for (int e = 0; e < V; ++e) dst[e] = static_cast<float>(p[off + e]);
}
template <typename T, int V, typename P>
KDEV void kstore(P p, int64_t off, const float* src, bool vec) {
  for (int e = 0; e < V; ++e) p[off + e] = static_cast<T>(src[e]);
}
"""

# The "metal" flavour compiles prelude.METAL_MACROS itself (the attribute names, simd
# functions, barriers and kload/kstore the Metal build uses) against CPU stand-ins for the
# Metal built-ins. Only the address-space words are rewritten (g++ has none): threadgroup
# storage becomes function-static (one threadgroup at a time), `thread` disappears.
METAL_SHIMS = r"""
#define MHC_BACKEND_CPU_EMULATION 1
struct mhc_uint3 { unsigned int x, y, z; };
#define thread_position_in_threadgroup (mhc_uint3{(unsigned)emu::G.cur, 0u, 0u})
#define threadgroup_position_in_grid (mhc_uint3{(unsigned)emu::G.bid, 0u, 0u})
#define threads_per_threadgroup (mhc_uint3{(unsigned)emu::G.nthreads, 1u, 1u})
#define threadgroups_per_grid (mhc_uint3{(unsigned)emu::G.nblocks, 1u, 1u})
#define thread_index_in_simdgroup ((unsigned)(emu::G.cur % 32))
#define simdgroup_index_in_threadgroup ((unsigned)(emu::G.cur / 32))
#define thread
typedef unsigned short ushort;
typedef unsigned int uint;
enum class mem_flags { mem_threadgroup };
static inline void threadgroup_barrier(mem_flags) { emu::block_barrier(); }
struct float4 {
  float x, y, z, w;
  float4() = default;
  float4(float a, float b, float c, float d) : x(a), y(b), z(c), w(d) {}
};
template <typename F> static inline F as_type(int b) { return emu::bits_float(b); }
namespace metal {
static inline void simdgroup_barrier(mem_flags) { emu::warp_barrier(); }
namespace precise {
static inline float exp(float v) { return expf(v); }
static inline float log(float v) { return logf(v); }
static inline float sqrt(float v) { return sqrtf(v); }
}  // namespace precise
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float simd_shuffle_xor(float v, ushort m) { return __shfl_xor_sync(0xffffffffu, v, m); }
static inline float simd_shuffle(float v, ushort src) { return __shfl_sync(0xffffffffu, v, src); }
static inline float simd_sum(float v) {  // Metal does not say its order: lane order here
  float s = 0.0f;
  for (int l = 0; l < 32; ++l) s += simd_shuffle(v, (ushort)l);
  return s;
}
static inline float simd_max(float v) {
  float m = -INFINITY;
  for (int l = 0; l < 32; ++l) m = fmaxf(m, simd_shuffle(v, (ushort)l));
  return m;
}
}  // namespace metal
using namespace metal;
"""


def _metal_layer() -> str:
    text = prelude.METAL_MACROS
    text = text.replace("#define KSHARED threadgroup", "#define KSHARED static")
    text = text.replace("#define KSHPTR(type) threadgroup type*", "#define KSHPTR(type) type*")
    for line in ("#define KSHARED static", "#define KSHPTR(type) type*"):
        assert line in text, f"METAL_MACROS changed: cannot rewrite {line!r}"
    return METAL_SHIMS + text


FLAVOURS = ("cuda", "metal")
flavour = ["cuda"]  # which macro layer launch() compiles against


def use_flavour(name: str) -> None:
    if name not in FLAVOURS:
        raise ValueError(f"unknown emulator flavour {name!r}")
    flavour[0] = name


_CTYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half",
           mx.int32: "int32_t", mx.uint32: "uint32_t"}
_NUMPY = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.float16: np.float16,
          mx.int32: np.int32, mx.uint32: np.uint32}
_POISON = {mx.float32: np.float32(np.nan), mx.bfloat16: np.uint16(0x7FC0), mx.float16: np.float16(np.nan),
           mx.int32: np.int32(-(2 ** 31)), mx.uint32: np.uint32(0xFFFFFFFF)}

# Substitutes for the PTX pieces of CUDA-only kernels (the rest of their helpers compiles as is):
# mhc_mma_bf16 is defined by RUNTIME above.
# wgmma (MMA_WG): a descriptor is a slot of a table holding the shared-memory pointer and the two
# core-matrix offsets (read as the GPU kernel's descriptor is assumed to be read: LBO along k,
# SBO along the columns); the warpgroup's A registers are exchanged at a block barrier (the
# block is one warpgroup); the fences, commit and wait have nothing to do when the product is
# computed at once.
WGMMA_CPU = r"""
namespace emu {
static const void* wg_ptr[4096];
static int wg_lbo[4096], wg_sbo[4096];
static unsigned wg_next = 0;
}
static inline uint64_t mhc_wg_desc(const void* smem, int lbo, int sbo) {
  const unsigned i = emu::wg_next++ % 4096u;
  emu::wg_ptr[i] = smem; emu::wg_lbo[i] = lbo; emu::wg_sbo[i] = sbo;
  return i;
}
static inline void mhc_wg_fence() {}
static inline void mhc_wg_commit() {}
static inline void mhc_wg_wait() {}
static inline void mhc_smem_to_async() {}
static inline void mhc_wgmma_n24(float (&d)[12], const uint32_t (&a)[4], uint64_t desc) {
  const int tid = emu::G.cur, w = tid / 32, lane = tid % 32;
  uint32_t* mine = &emu::G.scratch[(size_t)tid * 8];
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  emu::block_barrier();
  const unsigned char* base = static_cast<const unsigned char*>(emu::wg_ptr[desc]);
  const int lbo = emu::wg_lbo[desc], sbo = emu::wg_sbo[desc];
  auto A = [&](int r, int l) {
    const int ww = r / 16, rr = r % 16, src = (rr % 8) * 4 + (l % 8) / 2, reg = (rr >= 8 ? 1 : 0) + (l >= 8 ? 2 : 0);
    return mhc_bf16_half(emu::G.scratch[((size_t)ww * 32 + src) * 8 + reg], l % 2);
  };
  auto B = [&](int l, int n) {
    uint16_t v;
    memcpy(&v, base + (l / 8) * lbo + (n / 8) * sbo + (n % 8) * 16 + (l % 8) * 2, 2);
    return __uint_as_float((uint32_t)v << 16);
  };
  const int g = lane / 4, c = lane % 4;
  float out[12];
  for (int i = 0; i < 12; ++i) {
    const int j = i / 4, e = i % 4, r = 16 * w + g + 8 * (e / 2), n = 8 * j + 2 * c + e % 2;
    float s = 0.0f;
    for (int l = 0; l < 16; ++l) s += A(r, l) * B(l, n);
    out[i] = d[i] + s;
  }
  emu::block_barrier();
  for (int i = 0; i < 12; ++i) d[i] = out[i];
}
"""
CPU_HELPERS = {coefficients_mma.PTX_MMA: "", coefficients_mma.PTX_WGMMA: WGMMA_CPU}


def _helpers(spec) -> str:
    text = spec.helpers
    for ptx, cpu in CPU_HELPERS.items():
        text = text.replace(ptx, cpu)
    return text


def source(spec, input_dtypes, output_dtypes, template) -> str:
    params = [f"const {_CTYPES[d]}* {n}" for n, d in zip(spec.inputs, input_dtypes)]
    params += [f"{_CTYPES[d]}* {n}" for n, d in zip(spec.outputs, output_dtypes)]
    consts = []
    for name, value in template:
        if isinstance(value, bool):
            consts.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"constexpr int {name} = {value};")
        else:
            consts.append(f"using {name} = {_CTYPES[value]};")
    n_args = len(params)
    unpack = ", ".join(
        f"({p.rsplit(' ', 1)[0]})mhc_args[{i}]" for i, p in enumerate(params)
    )
    layer_text = CUDA_LAYER if flavour[0] == "cuda" else _metal_layer()
    return "\n".join([
        RUNTIME,
        layer_text,
        # the shared parts the GPU build gets, compacted as there (the helpers stay as written:
        # CPU_HELPERS swaps their PTX by exact text)
        prelude.compact(prelude.common_for(spec.helpers + spec.source())),
        _helpers(spec),
        f"static void mhc_kernel({', '.join(params)}) {{",
        *consts,
        spec.source(),
        "}",
        f"static void* mhc_args[{n_args}];",
        f"static void mhc_body() {{ mhc_kernel({unpack}); }}",
        'extern "C" int mhc_bad_prefetches() { return emu::bad_prefetches; }',
        'extern "C" int mhc_run(void** args, long long* nbytes, int nblocks, int nthreads) {',
        f"  for (int i = 0; i < {n_args}; ++i) mhc_args[i] = args[i];",
        f"  emu::nbufs = {n_args};",
        "  emu::bad_prefetches = 0;",
        f"  for (int i = 0; i < {n_args}; ++i) {{ emu::buf_start[i] = (const char*)args[i]; "
        "emu::buf_end[i] = (const char*)args[i] + nbytes[i]; }",
        "  emu::body = mhc_body;",
        "  emu::G.deadlock = false;",
        "  return emu::run_grid(nblocks, nthreads);",
        "}",
    ])


_LIBS: dict = {}


def _library(code: str):
    key = hashlib.sha256(code.encode()).hexdigest()[:20]
    if key in _LIBS:
        return _LIBS[key]
    os.makedirs(CACHE, exist_ok=True)
    so = os.path.join(CACHE, f"k_{key}.so")
    if not os.path.exists(so):
        # the source and the library under this process's own names until the library is
        # complete: two test processes share the cache (a local run beside a CI run), and one
        # could otherwise compile the other's half-written source
        src = os.path.join(CACHE, f"k_{key}.{os.getpid()}.cpp")
        with open(src, "w") as f:
            f.write(code)
        tmp = f"{so}.{os.getpid()}.tmp"
        res = subprocess.run(["g++", "-O1", "-std=c++20", "-shared", "-fPIC", "-w", "-o", tmp, src],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"the emulator could not compile {src}:\n{res.stderr[-4000:]}")
        os.replace(tmp, so)
        os.remove(src)
    lib = ctypes.CDLL(so)
    lib.mhc_run.restype = ctypes.c_int
    lib.mhc_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong), ctypes.c_int,
                            ctypes.c_int]
    lib.mhc_bad_prefetches.restype = ctypes.c_int
    _LIBS[key] = lib
    return lib


def _to_numpy(a: mx.array) -> np.ndarray:
    a = mx.contiguous(a)
    if a.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a))


def _to_mlx(a: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)


launched: list = []

# Every buffer a kernel sees sits between two guard regions filled with the poison value (NaN
# for floats): a read past either end gets poison, which reaches the outputs and fails the
# tests' finiteness checks; a write past either end, or into an input, is reported after the
# launch (on a GPU it would silently corrupt a neighbouring allocation or an MLX array).
GUARD_BYTES = 256  # a multiple of 16 and of every element size: alignment is kept
# True: every buffer starts one element past a 64-byte boundary (aligned to its element, not to
# 16 bytes), so the kernels' fallbacks for buffers that 16-byte loads cannot read are run.
MISALIGN = False


def _guarded(data: np.ndarray, poison) -> tuple[np.ndarray, np.ndarray]:
    """(whole buffer, view of its middle) with `data` copied into the middle, 64-byte aligned
    (or one element past, under MISALIGN)."""
    item = data.dtype.itemsize
    pad = GUARD_BYTES // item
    raw = np.empty(data.size * item + 2 * GUARD_BYTES + 64 + item, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + (item if MISALIGN else 0)
    whole = raw[start : start + data.size * item + 2 * GUARD_BYTES].view(data.dtype)
    whole[:] = poison
    middle = whole[pad : pad + data.size]
    middle[:] = data.reshape(-1)
    return whole, middle


def _check_guards(name: str, what: str, whole: np.ndarray, pad: int, poison) -> None:
    for side, region in (("before", whole[:pad]), ("after", whole[len(whole) - pad :])):
        same = region.view(np.uint8) == np.full_like(region, poison).view(np.uint8)
        if not same.all():
            raise RuntimeError(f"{name}: wrote out of bounds {side} {what}")


def launch(spec, inputs, outputs, grid: int, threadgroup: int, template, backend=None):
    """mhc_mlx.kernels.build.launch, run by the emulator; outputs start as NaN (poisoned)."""
    if grid % threadgroup:
        raise ValueError(f"grid {grid} is not a multiple of the threadgroup {threadgroup}")
    if grid == 0:
        return [mx.zeros(tuple(s), d) for s, d in outputs]
    if threadgroup > 1024:
        raise ValueError(f"{spec.name}: threadgroup of {threadgroup} threads; GPUs allow at most 1024")
    ins = [_to_numpy(a) for a in inputs]
    guarded_ins = [_guarded(a, _POISON[x.dtype]) for a, x in zip(ins, inputs)]
    guarded_outs = [_guarded(np.full(tuple(s), _POISON[d], dtype=_NUMPY[d]), _POISON[d]) for s, d in outputs]
    code = source(spec, [a.dtype for a in inputs], [d for _, d in outputs], template)
    lib = _library(code)
    middles = [m for _, m in guarded_ins + guarded_outs]
    ptrs = (ctypes.c_void_p * len(middles))(*[m.ctypes.data for m in middles])
    sizes = (ctypes.c_longlong * len(middles))(*[m.nbytes for m in middles])
    launched.append((spec.name, dict(template), grid, threadgroup))
    failed_block = lib.mhc_run(ptrs, sizes, grid // threadgroup, threadgroup)
    if failed_block > 0:
        raise RuntimeError(f"{spec.name}: deadlock in threadgroup {failed_block - 1} "
                           "(a barrier or warp exchange that not every live thread reaches)")
    if failed_block < 0:
        raise RuntimeError(f"{spec.name}: a warp exchange ran after some lanes of the warp had exited "
                           f"(threadgroup {-failed_block - 1}): undefined with a full mask on the GPU")
    if lib.mhc_bad_prefetches():
        raise RuntimeError(f"{spec.name}: {lib.mhc_bad_prefetches()} prefetch hints outside every buffer")
    for k, ((whole, middle), a, x) in enumerate(zip(guarded_ins, ins, inputs)):
        what = f"input {k} ({spec.inputs[k]})"
        _check_guards(spec.name, what, whole, GUARD_BYTES // a.dtype.itemsize, _POISON[x.dtype])
        if spec.inputs[k] in getattr(spec, "scratch", ()):
            continue  # written by design (KernelSpec.scratch): within its bounds, checked above
        if not np.array_equal(middle.view(np.uint8), a.reshape(-1).view(np.uint8)):
            raise RuntimeError(f"{spec.name}: wrote into {what}")
    outs = []
    for k, ((whole, middle), (shape, d)) in enumerate(zip(guarded_outs, outputs)):
        _check_guards(spec.name, f"output {k} ({spec.outputs[k]})", whole, GUARD_BYTES // middle.dtype.itemsize,
                      _POISON[d])
        outs.append(middle.reshape(tuple(shape)).copy())
    return [_to_mlx(o, d) for o, (_, d) in zip(outs, outputs)]


def script_module(name: str, monkeypatch):
    """scripts/<name>.py imported with its kernel launches on this emulator (its module-level
    `launch` replaced), the CUDA flavour, and the launch record cleared: the experiment scripts'
    kernels checked on the CPU."""
    import importlib
    import os
    import sys

    scripts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts")
    sys.path.insert(0, scripts)
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(scripts)
    monkeypatch.setattr(module, "launch", launch)
    use_flavour("cuda")
    launched.clear()
    return module
