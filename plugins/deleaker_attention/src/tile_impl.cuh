// Head-summed probability tiles: sum_h exp(L_h[i, j] - lse_h[i]) over a gathered 64-row x
// 64-column tile, on the tensor cores. Used for
//   - p_e[i] (image rows x entity-token columns, plain LSE), and
//   - rule X: G on the cross regions M_e1 x M_e2 and M_e2 x M_e1 with the current LSE; pass 1
//     accumulates count / sum / sum of squares of the non-zero G, pass 2 recomputes the same G
//     (bit-identical code path) and sets the cut bits above mean + beta2 * std.
#pragma once

#include "common.cuh"

namespace dl {

namespace {

constexpr int kNT = 128;  // 4 warps x 16 rows

static_assert(kGTileFloats == 32 * kNT, "kept G tile layout: 32 accumulators per thread");

constexpr int kStages = 3;   // cp.async pipeline depth over heads (loads of h+1, h+2 in flight)
constexpr int kXStages = 2;  // rule X pass 1 split (v6): 64 KB of smem, 3 blocks per SM

template <int D, int STAGES = kStages> constexpr int headsum_smem() { return STAGES * 2 /*q,k*/ * kTile * D * 2; }

// acc[nb][0..1]: row r0 = warp*16 + lane/4, columns nb*8 + 2*(lane%4) + {0,1}; acc[nb][2..3]: row r0+8.
// Sums heads h0 <= h < h1. lse2(h, r) is the log2-domain LSE of tile row r for head h (read one
// head ahead, so its latency hides behind the tensor-core work). Columns with s_colj < 0 add 0.
// STAGES (2 or 3) only changes how far the loads run ahead, never the arithmetic.
template <typename Tp, int D, typename LseF, int STAGES = kStages>
__device__ __forceinline__ void headsum_tile(const Args& a, int b, const int* s_rowj, const int* s_colj,
                                             uint8_t* smem, LseF lse2, int h0, int h1, float (&acc)[8][4]) {
  static_assert(STAGES == 2 || STAGES == 3, "headsum_tile: 2 or 3 stages");
  using Op = MmaOp<Tp>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
  const Tp* qb = reinterpret_cast<const Tp*>(a.q) + b * a.qs[0];
  const Tp* kb = reinterpret_cast<const Tp*>(a.k) + b * a.ks[0];
  const uint32_t base = smem_u32(smem);
  constexpr uint32_t kTileBytes = kTile * D * 2;
  auto load = [&](int h, int st) {
    const uint32_t qs = base + st * 2 * kTileBytes, ks = qs + kTileBytes;
    if (a.fixed_gather) {
      gather_tile64<D, kNT>(qs, qb + h * a.qs[1], a.q_rb, [&](int r) { return s_rowj[r]; }, a.q);
      gather_tile64<D, kNT>(ks, kb + h * a.ks[1], a.k_rb, [&](int r) { return s_colj[r]; }, a.k);
      return;
    }
    load_tile<D, kNT>(qs, kTile, [&](int r) -> const void* {
      const int j = s_rowj[r];
      return j >= 0 ? (const void*)(qb + h * a.qs[1] + (int64_t)j * a.qs[2]) : nullptr;
    }, a.q);
    load_tile<D, kNT>(ks, kTile, [&](int r) -> const void* {
      const int j = s_colj[r];
      return j >= 0 ? (const void*)(kb + h * a.ks[1] + (int64_t)j * a.ks[2]) : nullptr;
    }, a.k);
  };
  uint32_t valid = 0;  // bit nb*2+e: column nb*8 + 2*(lane%4) + e is a real column
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (s_colj[nb * 8 + 2 * (lane & 3) + e] >= 0) valid |= 1u << (nb * 2 + e);
#pragma unroll
  for (int nb = 0; nb < 8; ++nb)
#pragma unroll
    for (int x = 0; x < 4; ++x) acc[nb][x] = 0.f;
  const int nh = h1 - h0;
  if (nh <= 0) return;
  // one commit group per head (empty past the end), so wait_group<kStages-1> always means
  // "this head's tiles have landed"
  load(h0, 0);
  cp_async_commit();
  if (STAGES == 3) {
    if (nh > 1) load(h0 + 1, 1);
    cp_async_commit();
  }
  float l0n = lse2(h0, r0), l1n = lse2(h0, r1);
  for (int hh = 0; hh < nh; ++hh) {
    const int h = h0 + hh, st = hh % STAGES;
    if (hh + STAGES - 1 < nh) load(h + STAGES - 1, (hh + STAGES - 1) % STAGES);
    cp_async_commit();
    const float l0 = l0n, l1 = l1n;
    if (hh + 1 < nh) {
      l0n = lse2(h + 1, r0);
      l1n = lse2(h + 1, r1);
    }
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const uint32_t qs = base + st * 2 * kTileBytes, ks = qs + kTileBytes;
    float s[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int x = 0; x < 4; ++x) s[nb][x] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t af[4];
      ldsm_x4(af, qs + tile_off<D>(warp * 16 + (lane & 15), kc * 2 + (lane >> 4)));
#pragma unroll
      for (int nb2 = 0; nb2 < 4; ++nb2) {
        uint32_t bf[4];
        ldsm_x4(bf, ks + tile_off<D>(nb2 * 16 + (lane & 7) + ((lane >> 4) << 3), kc * 2 + ((lane >> 3) & 1)));
        Op::run(s[2 * nb2], af, bf[0], bf[1]);
        Op::run(s[2 * nb2 + 1], af, bf[2], bf[3]);
      }
    }
    const float sl2 = a.scale_log2;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (valid >> (nb * 2 + e) & 1u) {
          acc[nb][e] += exp2f(__fmaf_rn(s[nb][e], sl2, -l0));
          acc[nb][2 + e] += exp2f(__fmaf_rn(s[nb][2 + e], sl2, -l1));
        }
      }
    __syncthreads();  // stage st is refilled STAGES - 1 heads later
  }
}

// Block (row tile, head group g, sample): partial p_e sums over the group's heads, written to
// p_part[g]; the masks kernel adds the groups in a fixed order and divides.
template <typename Tp, int D>
__global__ void __launch_bounds__(kNT) entity_probs_kernel(Args a) {
  const int b = blockIdx.z, g = blockIdx.y, tile = blockIdx.x, tid = threadIdx.x, warp = tid >> 5,
            lane = tid & 31;
  const int h0 = g * a.H / a.n_hg, h1 = (g + 1) * a.H / a.n_hg;
  const SampleInfo& in = a.info[b];
  if (!in.pub.need_p) return;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_rowj[kTile], s_colj[kTile];
  __shared__ uint32_t s_bits[kTile];
  const int I = a.I, T = a.T, E = a.E;
  for (int r = tid; r < kTile; r += kNT) {
    const int i = tile * kTile + r;
    s_rowj[r] = i < I ? T + i : -1;
  }
  float pe[2][kMaxE];
#pragma unroll
  for (int e = 0; e < kMaxE; ++e) pe[0][e] = pe[1][e] = 0.f;
  const int* tok_list = a.tok_list + (size_t)b * a.tpad;
  const uint32_t* tok_bits = a.tok_bits + (size_t)b * T;
  auto lse2 = [&](int h, int r) -> float {
    const int i = tile * kTile + r;
    return i < I ? a.lse[b * a.ls[0] + h * a.ls[1] + (int64_t)(T + i) * a.ls[2]] * kLog2e : 0.f;
  };
  for (int ct = 0; ct < in.ntok_pad / kTile; ++ct) {
    for (int c = tid; c < kTile; c += kNT) {
      const int t = tok_list[ct * kTile + c];
      s_colj[c] = t;
      s_bits[c] = t >= 0 ? tok_bits[t] : 0u;
    }
    __syncthreads();
    float acc[8][4];
    headsum_tile<Tp, D>(a, b, s_rowj, s_colj, smem, lse2, h0, h1, acc);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const uint32_t bits = s_bits[nb * 8 + 2 * (lane & 3) + x];
#pragma unroll
        for (int e = 0; e < kMaxE; ++e)
          if (bits >> e & 1u) {
            pe[0][e] += acc[nb][x];
            pe[1][e] += acc[nb][2 + x];
          }
      }
    __syncthreads();  // s_colj / s_bits rewritten next round
  }
#pragma unroll
  for (int e = 0; e < kMaxE; ++e)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      pe[r][e] += __shfl_xor_sync(0xffffffffu, pe[r][e], 1);
      pe[r][e] += __shfl_xor_sync(0xffffffffu, pe[r][e], 2);
    }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = tile * kTile + warp * 16 + (lane >> 2) + r * 8;
      if (i >= I) continue;
#pragma unroll
      for (int e = 0; e < kMaxE; ++e)
        if (e < E && in.ntok_e[e] > 0)
          a.p_part[(((size_t)g * a.B + b) * E + e) * I + i] = pe[r][e];
    }
  }
}

// Rule X for pair `pair` of each sample. PASS 1: statistics (and the W/S text-state update of
// this pair); PASS 2: cut bits. v6 (x_split, a.xpart_tiles > 0): PASS 1 is split into
// (tile, head group) units that store partial head sums, and PASS 3 adds each tile's partials in
// group order (deterministic), keeps the sum as the tile's G for pass 2 and takes the
// statistics. Whether a pair is split is decided on the device (x_head_groups) from the same
// inputs by PASS 1 and PASS 3. STAGES: head pipeline depth (2 for the split PASS 1, 64 KB).
template <typename Tp, int D, int PASS, int STAGES>
__global__ void __launch_bounds__(kNT, STAGES == kXStages ? 3 : 1) pair_kernel(Args a, int pair) {
  const int b = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  SampleInfo& in = a.info[b];
  if (!in.pub.intervene || pair >= in.pub.npairs) return;
  const int I = a.I, T = a.T, E = a.E, H = a.H;
  const int e1 = in.pair_e1[pair], e2 = in.pair_e2[pair];
  const int nR = in.pub.n_rows;
  const Settings st = load_settings(a, b);
  if (PASS == 1) {  // (PASS 3 only merges: the state was updated by PASS 1)
    // W then S for this pair, per masked row (order-free closed form: a cut text block stays cut).
    for (int r = blockIdx.x * kNT + tid; r < nR; r += gridDim.x * kNT) {
      const uint32_t bits = a.rowents[(size_t)b * I + r];
      const bool in1 = bits >> e1 & 1u, in2 = bits >> e2 & 1u;
      if (!in1 && !in2) continue;
      int8_t* rs = a.state + ((size_t)b * I + r) * kMaxE;
      int s1 = rs[e1], s2 = rs[e2];
      if (st.do_w) {
        if (in1) s2 = -1;
        if (in2) s1 = -1;
      }
      if (st.do_s) {
        if (in1 && s1 >= 0) ++s1;
        if (in2 && s2 >= 0) ++s2;
      }
      rs[e1] = (int8_t)s1;
      rs[e2] = (int8_t)s2;
    }
  }
  if (!st.do_x) return;  // per sample (the host launches the X passes for any batch that may use them)
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_rowj[kTile], s_colj[kTile], s_rri[kTile], s_cri[kTile];
  __shared__ double s_red[32];
  const int n1 = in.cnt_e[e1], n2 = in.cnt_e[e2];
  const int t1 = (n1 + kTile - 1) / kTile, t2 = (n2 + kTile - 1) / kTile;
  const int per = t1 * t2, total = 2 * per;
  double thr[2] = {0.0, 0.0};
  bool docut[2] = {false, false};
  if (PASS == 2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const double n = in.stats[pair][r][0], s = in.stats[pair][r][1], s2 = in.stats[pair][r][2];
      if (n >= 2.0) {  // none: skip; one: its std is NaN and nothing compares greater
        const double mean = s / n;
        double var = (s2 - s * mean) / (n - 1.0);
        var = var > 0.0 ? var : 0.0;
        thr[r] = mean + (double)st.beta2 * sqrt(var);
        docut[r] = true;
      }
    }
    if (!docut[0] && !docut[1]) return;
  }
  // v6: head groups of the split PASS 1 (1: not split; then PASS 3 has nothing to do)
  const int hg = (PASS != 2 && a.xpart_tiles > 0) ? x_head_groups(total, H, a.x_grid, a.xpart_tiles, a.g_tiles) : 1;
  if (PASS == 3 && hg <= 1) return;
  const bool split1 = PASS == 1 && hg > 1;  // uniform per launch
  const int nwork = split1 ? total * hg : total;
  const int* rlist = a.rlist + (size_t)b * I;
  const uint32_t* cut = a.cut + (size_t)b * I * a.cut_words;
  uint32_t* cutw = a.cut + (size_t)b * I * a.cut_words;
  const float* lse_cur = a.lse_cur + (size_t)b * H * I;
  const float invH = 1.f / (float)H;
  auto lsef = [&](int h, int r) -> float {
    const int ri = s_rri[r];
    return ri >= 0 ? lse_cur[(size_t)h * I + ri] : 0.f;
  };
  for (int w = blockIdx.x; w < nwork; w += gridDim.x) {
    const int t = split1 ? w / hg : w;
    const int region = t / per, loc = t % per;
    const double thr_r = region == 0 ? thr[0] : thr[1];
    if (PASS == 2 && !(region == 0 ? docut[0] : docut[1])) continue;  // uniform per block
    const int er = region == 0 ? e1 : e2, ec = region == 0 ? e2 : e1;
    const int nr = region == 0 ? n1 : n2, nc = region == 0 ? n2 : n1;
    const int tcols = region == 0 ? t2 : t1;
    const int ta = loc / tcols, tb = loc % tcols;
    for (int x = tid; x < kTile; x += kNT) {
      const int kr = ta * kTile + x, kc = tb * kTile + x;
      const int rri = kr < nr ? a.ent_list[((size_t)b * E + er) * I + kr] : -1;
      const int cri = kc < nc ? a.ent_list[((size_t)b * E + ec) * I + kc] : -1;
      s_rri[x] = rri;
      s_cri[x] = cri;
      s_rowj[x] = rri >= 0 ? T + rlist[rri] : -1;
      s_colj[x] = cri >= 0 ? T + rlist[cri] : -1;
    }
    __syncthreads();
    float acc[8][4];
    // G kept between the passes (v5): pass 1 stores the head sums of tiles t < g_tiles, pass 2
    // reads them back instead of recomputing (same values; past the cap both passes compute).
    const bool keep = t < a.g_tiles;
    if constexpr (PASS == 3) {
      // v6 merge: partials of groups 0..hg-1 added in that order (the split implies every tile
      // of the pair is kept: total <= g_tiles)
      const float* pt = a.xpart + ((size_t)b * a.xpart_tiles + (size_t)t * hg) * kGTileFloats + tid;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[nb][x] = 0.f;
      for (int g = 0; g < hg; ++g)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int x = 0; x < 4; ++x) acc[nb][x] += pt[(size_t)g * kGTileFloats + (nb * 4 + x) * kNT];
      float* gt = a.gbuf + ((size_t)b * a.g_tiles + t) * kGTileFloats + tid;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int x = 0; x < 4; ++x) gt[(nb * 4 + x) * kNT] = acc[nb][x];
    } else {
      if (split1) {  // one head group of tile t: partial sums only, the statistics are PASS 3's
        const int g = w % hg;
        headsum_tile<Tp, D, decltype(lsef), STAGES>(a, b, s_rowj, s_colj, smem, lsef, g * H / hg,
                                                    (g + 1) * H / hg, acc);
        float* pt = a.xpart + ((size_t)b * a.xpart_tiles + w) * kGTileFloats + tid;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int x = 0; x < 4; ++x) pt[(nb * 4 + x) * kNT] = acc[nb][x];
        __syncthreads();  // s_rri / s_colj rewritten by the next unit
        continue;
      }
      if (PASS == 2 && keep) {
        const float* gt = a.gbuf + ((size_t)b * a.g_tiles + t) * kGTileFloats + tid;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int x = 0; x < 4; ++x) acc[nb][x] = gt[(nb * 4 + x) * kNT];
      } else {
        headsum_tile<Tp, D, decltype(lsef), STAGES>(a, b, s_rowj, s_colj, smem, lsef, 0, H, acc);
        if (PASS == 1 && keep) {
          float* gt = a.gbuf + ((size_t)b * a.g_tiles + t) * kGTileFloats + tid;
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int x = 0; x < 4; ++x) gt[(nb * 4 + x) * kNT] = acc[nb][x];
        }
      }
    }
    float cnt = 0.f, sum = 0.f, sq = 0.f;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 + (lane >> 2) + rr * 8;
      const int ri = s_rri[r];
      if (ri < 0) continue;
      const uint32_t* crow = cut + (size_t)ri * a.cut_words;
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int cj = s_cri[nb * 8 + 2 * (lane & 3) + x];
          if (cj < 0) continue;
          const uint32_t bit = 1u << (cj & 31);
          const bool already = (crow[cj >> 5] & bit) != 0u;
          const float g = already ? 0.f : acc[nb][rr * 2 + x] * invH;
          if (PASS != 2) {
            if (g > 0.f) {
              cnt += 1.f;
              sum += g;
              sq += g * g;
            }
          } else {
            if ((double)g > thr_r) atomicOr(cutw + (size_t)ri * a.cut_words + (cj >> 5), bit);
          }
        }
    }
    if (PASS != 2) {
      const double c_ = block_sum((double)cnt, s_red);
      const double s_ = block_sum((double)sum, s_red);
      const double q_ = block_sum((double)sq, s_red);
      if (tid == 0 && c_ > 0.0) {
        atomicAdd(&in.stats[pair][region][0], c_);
        atomicAdd(&in.stats[pair][region][1], s_);
        atomicAdd(&in.stats[pair][region][2], q_);
      }
    }
    __syncthreads();
  }
}

}  // namespace

template <typename Tp, int D>
cudaError_t entity_probs_t(const Args& a, cudaStream_t s) {
  constexpr int smem = headsum_smem<D>();
  cudaError_t err = ensure_smem<entity_probs_kernel<Tp, D>>(smem);
  if (err != cudaSuccess) return err;
  entity_probs_kernel<Tp, D><<<dim3((a.I + kTile - 1) / kTile, a.n_hg, a.B), kNT, smem, s>>>(a);
  return cudaGetLastError();
}

template <typename Tp, int D>
cudaError_t pair_pass_t(const Args& a, int pair, int pass, int num_sms, cudaStream_t s) {
  const int tiles = (a.I + kTile - 1) / kTile;
  int nctas = 2 * num_sms / (a.B > 0 ? a.B : 1);
  nctas = nctas < 1 ? 1 : nctas;
  nctas = nctas > 2 * tiles * tiles ? 2 * tiles * tiles : nctas;
  if (pass == 1) {
    // grid a.x_grid: the merge pass derives the head split from it (api.cu)
    if (a.xpart_tiles > 0) {
      constexpr int smem = headsum_smem<D, kXStages>();
      cudaError_t err = ensure_smem<pair_kernel<Tp, D, 1, kXStages>>(smem);
      if (err != cudaSuccess) return err;
      pair_kernel<Tp, D, 1, kXStages><<<dim3(a.x_grid, a.B), kNT, smem, s>>>(a, pair);
    } else {
      constexpr int smem = headsum_smem<D>();
      cudaError_t err = ensure_smem<pair_kernel<Tp, D, 1, kStages>>(smem);
      if (err != cudaSuccess) return err;
      pair_kernel<Tp, D, 1, kStages><<<dim3(a.x_grid, a.B), kNT, smem, s>>>(a, pair);
    }
  } else if (pass == 3) {  // merge of the split partials: no tiles loaded, no dynamic smem
    pair_kernel<Tp, D, 3, kStages><<<dim3(nctas, a.B), kNT, 0, s>>>(a, pair);
  } else {
    constexpr int smem = headsum_smem<D>();
    cudaError_t err = ensure_smem<pair_kernel<Tp, D, 2, kStages>>(smem);
    if (err != cudaSuccess) return err;
    pair_kernel<Tp, D, 2, kStages><<<dim3(nctas, a.B), kNT, smem, s>>>(a, pair);
  }
  return cudaGetLastError();
}

}  // namespace dl
