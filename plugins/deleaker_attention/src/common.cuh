// Device helpers: mma.sync m16n8k16 (fp16/bf16 -> fp32), ldmatrix, cp.async, swizzled tiles,
// block scans. Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane/4, c = 2*(lane%4):
//   A 16x16: a0 (g, c..c+1), a1 (g+8, c..), a2 (g, c+8..), a3 (g+8, c+8..)
//   B 16x8:  b0 (k=c..c+1, n=g), b1 (k=c+8.., n=g)
//   C 16x8:  c0,c1 (g, c..c+1), c2,c3 (g+8, c..c+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "internal.h"

namespace dl {

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&x);
    return __bfloat1622float2(v);
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    __half2 v = *reinterpret_cast<__half2*>(&x);
    return __half22float2(v);
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte async copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 4-byte async copy (small metadata that travels with a tile's K/V, so no load is left exposed)
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Byte offset of 16-byte chunk `ch` of row `r` in a [rows][D] tile of 2-byte elements,
// XOR-swizzled so that ldmatrix over 8 consecutive rows hits 8 different bank groups.
template <int D> __device__ __forceinline__ uint32_t tile_off(int r, int ch) {
  return (uint32_t)(r * (D * 2) + ((ch ^ (r & 7)) << 4));
}

// Load `rows` rows of D elements into a swizzled smem tile. row_ptr(r) gives the global row
// pointer or nullptr (zero-filled).
template <int D, int NT, typename F>
__device__ __forceinline__ void load_tile(uint32_t smem_base, int rows, F row_ptr, const void* dummy) {
  constexpr int CH = D / 8;
  for (int idx = threadIdx.x; idx < rows * CH; idx += NT) {
    int r = idx / CH, ch = idx % CH;
    const char* src = reinterpret_cast<const char*>(row_ptr(r));
    bool ok = src != nullptr;
    cp_async16(smem_base + tile_off<D>(r, ch), ok ? (const void*)(src + ch * 16) : dummy, ok);
  }
}

// Gathered 64-row tile, v6 (fixed_gather): each thread owns one 16-byte chunk column
// (tid % CH) and the rows tid / CH + k * (NT / CH), so the loop is unrolled with a constant
// swizzle and no division; the global address is one 32x32->64-bit multiply of the row's index
// by the row stride in bytes. `base` points at row 0 of the (batch, head); joint(r) gives the
// row index or -1 (zero-filled). Same bytes to the same smem places as load_tile.
template <int D, int NT, typename JF>
__device__ __forceinline__ void gather_tile64(uint32_t smem_base, const void* base, int row_bytes, JF joint,
                                              const void* dummy) {
  constexpr int CH = D / 8, RPP = NT / CH, KP = kTile / RPP;
  static_assert(NT % CH == 0 && kTile % RPP == 0, "gather_tile64: thread count must tile the 64 rows");
  const int ch = threadIdx.x % CH, rb = threadIdx.x / CH;
  const char* bch = reinterpret_cast<const char*>(base) + ch * 16;
#pragma unroll
  for (int k = 0; k < KP; ++k) {
    const int r = rb + k * RPP;
    const int j = joint(r);
    const bool ok = j >= 0;
    cp_async16(smem_base + tile_off<D>(r, ch), ok ? (const void*)(bch + (int64_t)j * row_bytes) : dummy, ok);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide exclusive scan of one int per thread (blockDim.x a multiple of 32, <= 1024).
// scratch: >= 33 ints of shared memory. Returns the exclusive prefix; *total gets the sum.
// Contains __syncthreads: every thread of the block must call it.
__device__ __forceinline__ int block_scan_excl(int v, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int w = lane < nw ? scratch[lane] : 0;
    int s = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nw) scratch[lane] = s - w;  // exclusive warp offsets
    if (lane == 31) scratch[32] = s;
  }
  __syncthreads();
  int res = scratch[wid] + x - v;
  *total = scratch[32];
  __syncthreads();  // scratch reusable afterwards
  return res;
}

// Block-wide sum of a double (any blockDim multiple of 32). scratch: >= 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[wid] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < nw; ++w) r += scratch[w];  // fixed order: deterministic
  __syncthreads();
  return r;
}

// Make sure `Kernel` may use `needed` bytes of dynamic shared memory. The first time it raises
// the limit to the most the device allows for this kernel (opt-in maximum minus the kernel's
// static shared memory), so later launches, e.g. inside a CUDA-graph capture, make no attribute
// calls; if that is refused it asks for exactly `needed`. Per kernel and device.
// Requests up to 32 KB need no opt-in: the 48 KB default also covers the kernel's static shared
// memory (all < 16 KB here). A request of exactly 48 KB plus static smem is over the default
// (device run 5: the 3-stage D=64 head-sum tiles, 48 KB, failed to launch), so it opts in.
template <auto Kernel> inline cudaError_t ensure_smem(int needed) {
  static int granted[64] = {0};  // bytes granted per device index
  if (needed <= 32 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  dev &= 63;
  if (needed <= granted[dev]) return cudaSuccess;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncAttributes fa;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&fa, Kernel);
  if (err != cudaSuccess) return err;
  const int limit = optin - (int)fa.sharedSizeBytes;
  if (needed > limit) return cudaErrorInvalidValue;  // problem too large for one block's smem
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (err == cudaSuccess) {
    granted[dev] = limit;
    return cudaSuccess;
  }
  (void)cudaGetLastError();  // clear, then ask for what this launch needs
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, needed);
  if (err == cudaSuccess) granted[dev] = needed;
  return err;
}

// Sample b's settings from the [B, DL_*_WIDTH] device arrays (no host sync), one load per
// DL_SETTINGS entry; fields a kernel does not use are never loaded (dead loads are removed).
#define DL_LOAD_I64(x) (x)
#define DL_LOAD_F32(x) (x)
#define DL_LOAD_FLAG(x) ((x) != 0)
#define DL_LOAD_SETTING_(tensor, column, width, field, kind) \
  s.field = DL_LOAD_##kind(a.tensor[(size_t)b * (width) + (column)]);
__device__ __forceinline__ Settings load_settings(const Args& a, int b) {
  Settings s;
  DL_SETTINGS(DL_LOAD_SETTING_)
  return s;
}
#undef DL_LOAD_SETTING_

__device__ __forceinline__ int64_t read_tau(const Args& a) {
  int64_t s = a.step ? *a.step : a.step_value;
  return s * a.blocks_per_step + a.block_offset;
}

}  // namespace dl
