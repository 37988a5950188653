// Small per-sample kernels: prep (clock, entity slots, token lists, pairs), history + entity
// masks (threshold, 3x3 morphology), compaction of the masked rows. One block per sample (or
// per sample and slot); everything stays on the device.
#include <climits>

#include "common.cuh"

namespace dl {

namespace {

constexpr int kNT = 1024;

__global__ void __launch_bounds__(kNT) prep_kernel(Args a) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const int E = a.E, T = a.T;
  __shared__ int s_cnt[kMaxE], s_first[kMaxE];
  __shared__ int scratch[33];
  if (tid < kMaxE) {
    s_cnt[tid] = 0;
    s_first[tid] = INT_MAX;
  }
  __syncthreads();
  const float* ent = a.ent + (size_t)b * E * T;
  uint32_t* tok_bits = a.tok_bits + (size_t)b * T;
  for (int t = tid; t < T; t += kNT) {
    uint32_t bits = 0;
    for (int e = 0; e < E; ++e) {
      if (ent[(size_t)e * T + t] > 0.f) {
        bits |= 1u << e;
        atomicAdd(&s_cnt[e], 1);
        atomicMin(&s_first[e], t);
      }
    }
    tok_bits[t] = bits;
  }
  __syncthreads();
  // Union of the slots' tokens, ascending: the text columns the edits can touch.
  int* tok_list = a.tok_list + (size_t)b * a.tpad;
  int running = 0;
  for (int base = 0; base < T; base += kNT) {
    const int t = base + tid;
    const int flag = (t < T && tok_bits[t] != 0u) ? 1 : 0;
    int tot;
    const int pos = block_scan_excl(flag, scratch, &tot);
    if (flag) tok_list[running + pos] = t;
    running += tot;
  }
  const int ntok = running, ntok_pad = (ntok + kTile - 1) / kTile * kTile;
  for (int k = ntok + tid; k < ntok_pad; k += kNT) tok_list[k] = -1;
  uint32_t* tok_first = a.tok_first + (size_t)b * T;
  for (int t = tid; t < T; t += kNT) {
    uint32_t fb = 0;
    for (int e = 0; e < E; ++e)
      if (s_cnt[e] > 0 && s_first[e] == t) fb |= 1u << e;
    tok_first[t] = fb;
  }
  if (tid == 0) {
    SampleInfo& in = a.info[b];
    const int64_t tau = read_tau(a);
    const Settings st = load_settings(a, b);
    int n_active = 0, amask = 0;
    for (int e = 0; e < kMaxE; ++e) {
      const int c = e < E ? s_cnt[e] : 0;
      in.ntok_e[e] = c;
      in.first_tok[e] = c > 0 ? s_first[e] : -1;
      in.cnt_e[e] = 0;
      if (c > 0) {
        ++n_active;
        amask |= 1 << e;
      }
    }
    int np = 0;
    for (int e1 = 0; e1 < E; ++e1)
      for (int e2 = e1 + 1; e2 < E; ++e2)
        if ((amask >> e1 & 1) && (amask >> e2 & 1)) {
          in.pair_e1[np] = e1;
          in.pair_e2[np] = e2;
          ++np;
        }
    const int hist_update = st.use_history && tau >= st.a0 && tau < st.a1 && n_active > 0;
    const int intervene = tau >= st.a0 && tau >= st.i0 && tau <= st.i1 && n_active >= 2;
    in.pub.tau = tau;
    in.pub.hist_update = hist_update;
    in.pub.intervene = intervene;
    in.pub.need_p = hist_update || (intervene && !(st.use_history && tau > st.a0));
    in.pub.n_active = n_active;
    in.pub.n_rows = 0;
    in.pub.n_tt = 0;
    in.pub.npairs = np;
    in.pub.n_fallback = 0;
    in.pub.error = 0;
    in.active_mask = amask;
    in.ntok = ntok;
    in.ntok_pad = ntok_pad;
    for (int k = 0; k <= kMaxPairs; ++k) in.n_flag[k] = 0;
    for (int k = 0; k < kMaxPairs; ++k)
      for (int r = 0; r < 2; ++r)
        for (int s = 0; s < 3; ++s) in.stats[k][r][s] = 0.0;
  }
}

// One block per (slot, sample): history update, then (when intervening) threshold + smoothing.
__global__ void __launch_bounds__(kNT) masks_kernel(Args a) {
  const int e = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int I = a.I, E = a.E;
  extern __shared__ uint8_t s_buf[];  // 2 * I bytes
  __shared__ double s_red[32];
  const SampleInfo& in = a.info[b];
  const Settings st = load_settings(a, b);
  const int active = in.ntok_e[e] > 0;
  const int64_t tau = in.pub.tau;
  const size_t off = ((size_t)b * E + e) * I;
  const float* hist = a.hist + off;
  float* hout = a.hist_out + off;
  float* p = a.p + off;
  const int upd = in.pub.hist_update && active;
  const int need_p = in.pub.need_p && active;
  const int64_t n = tau - st.a0;
  const float fn = (float)((double)n / (double)(n + 1)), fd = (float)(n + 1);
  const size_t gstride = (size_t)a.B * E * I;  // between head groups of p_part
  const float denom = (float)a.H * (float)in.ntok_e[e];
  for (int i = tid; i < I; i += kNT) {
    float pv = 0.f;
    if (need_p) {  // p_e = head-group partial sums (fixed order) / (H * tokens)
      float sacc = 0.f;
      for (int g = 0; g < a.n_hg; ++g) sacc += a.p_part[g * gstride + off + i];
      pv = sacc / denom;
      p[i] = pv;
    }
    float h = hist[i];
    if (upd) h = (n == 0) ? pv : __fadd_rn(__fmul_rn(h, fn), __fdiv_rn(pv, fd));
    hout[i] = h;
  }
  if (!(in.pub.intervene && active)) return;
  __syncthreads();  // hout visible block-wide
  const bool from_hist = st.use_history && tau > st.a0;
  const float* src = from_hist ? hout : p;
  double s = 0.0;
  for (int i = tid; i < I; i += kNT) s += (double)src[i];
  const double mean = block_sum(s, s_red) / (double)I;
  double s2 = 0.0;
  for (int i = tid; i < I; i += kNT) {
    const double d = (double)src[i] - mean;
    s2 += d * d;
  }
  const double var = block_sum(s2, s_red) / (double)(I - 1);
  const double theta = mean + (double)st.beta1 * sqrt(var);
  uint8_t* m0 = s_buf;
  uint8_t* m1 = s_buf + I;
  for (int i = tid; i < I; i += kNT) m0[i] = (double)src[i] > theta ? 1 : 0;
  __syncthreads();
  if (st.do_smoothing) {
    const int64_t gh = a.grid ? a.grid[0] : a.grid_h, gw = a.grid ? a.grid[1] : a.grid_w;
    if (gh <= 0 || gw <= 0 || gh * gw != (int64_t)I) {
      if (tid == 0) a.info[b].pub.error = 1;
    } else {
      const int h = (int)gh, w = (int)gw;
      // open (erode, dilate) then close x2 (dilate, dilate, erode, erode); outside the grid
      // counts as 1 for an erosion and 0 for a dilation, i.e. only in-grid neighbours matter.
      const bool grow[6] = {false, true, true, true, false, false};
      for (int pass = 0; pass < 6; ++pass) {
        const uint8_t* src_m = (pass & 1) ? m1 : m0;
        uint8_t* dst_m = (pass & 1) ? m0 : m1;
        const bool g = grow[pass];
        for (int i = tid; i < I; i += kNT) {
          const int y = i / w, x = i % w;
          int acc = g ? 0 : 1;
          for (int dy = -1; dy <= 1; ++dy) {
            const int yy = y + dy;
            if (yy < 0 || yy >= h) continue;
            for (int dx = -1; dx <= 1; ++dx) {
              const int xx = x + dx;
              if (xx < 0 || xx >= w) continue;
              const int v = src_m[yy * w + xx];
              acc = g ? (acc | v) : (acc & v);
            }
          }
          dst_m[i] = (uint8_t)acc;
        }
        __syncthreads();
      }
      // 6 passes: the result is back in m0
    }
  }
  uint8_t* mask = a.mask + off;
  for (int i = tid; i < I; i += kNT) mask[i] = m0[i];
}

// One block per sample: list the masked rows (union of active masks), each mask's rows as
// masked-row indices, TT rows (the per-row reset is init_kernel's, launched right after).
__global__ void __launch_bounds__(kNT) compact_kernel(Args a) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const int I = a.I, E = a.E;
  __shared__ int scratch[33];
  __shared__ int s_nrows;
  SampleInfo& in = a.info[b];
  if (!in.pub.intervene) return;
  const int amask = in.active_mask;
  int* rlist = a.rlist + (size_t)b * I;
  int* ridx = a.ridx + (size_t)b * I;
  uint8_t* rowents = a.rowents + (size_t)b * I;
  int running = 0;
  int run_e[kMaxE];
#pragma unroll
  for (int e = 0; e < kMaxE; ++e) run_e[e] = 0;
  if (a.row_order == 0) {
    // image order (v4): masked-row index ascending with the image row
    for (int base = 0; base < I; base += kNT) {
      const int i = base + tid;
      uint32_t bits = 0;
      if (i < I) {
        for (int e = 0; e < E; ++e)
          if ((amask >> e & 1) && a.mask[((size_t)b * E + e) * I + i]) bits |= 1u << e;
      }
      const int flag = bits != 0u;
      int tot;
      const int pos = block_scan_excl(flag, scratch, &tot);
      const int ri = running + pos;
      if (i < I) ridx[i] = flag ? ri : -1;
      if (flag) {
        rlist[ri] = i;
        rowents[ri] = (uint8_t)bits;
      }
#pragma unroll
      for (int e = 0; e < kMaxE; ++e) {
        if (e < E && (amask >> e & 1)) {  // uniform across the block
          const int fe = (bits >> e) & 1u;
          int tot_e;
          const int pe = block_scan_excl(fe, scratch, &tot_e);
          if (fe) a.ent_list[((size_t)b * E + e) * I + run_e[e] + pe] = ri;
          run_e[e] += tot_e;
        }
      }
      running += tot;
    }
  } else {
    // grouped order (v5): rows grouped by the lowest slot whose mask holds them (image order
    // within a group), so the 64-row tiles of the edit kernels hold one entity's rows and the
    // masked columns a row can have cut bits in (the other entities' rows) form few tiles.
    // Every consumer maps masked-row index -> image row through rlist / ridx, so only the
    // numbering changes (and with it the order of the DELTA/X tiles, not their values).
    for (int g = 0; g < E; ++g) {
      if (!(amask >> g & 1)) continue;  // uniform
      for (int base = 0; base < I; base += kNT) {
        const int i = base + tid;
        uint32_t bits = 0;
        if (i < I) {
          for (int e = 0; e < E; ++e)
            if ((amask >> e & 1) && a.mask[((size_t)b * E + e) * I + i]) bits |= 1u << e;
        }
        const int flag = bits != 0u && (__ffs((int)bits) - 1) == g;
        int tot;
        const int pos = block_scan_excl(flag, scratch, &tot);
        const int ri = running + pos;
        if (i < I && bits == 0u) ridx[i] = -1;
        if (flag) {
          ridx[i] = ri;
          rlist[ri] = i;
          rowents[ri] = (uint8_t)bits;
        }
        running += tot;
      }
    }
    __syncthreads();  // rowents of every masked row written (global, same block)
    // per-entity lists, ascending in the masked-row index
    for (int base = 0; base < running; base += kNT) {
      const int ri = base + tid;
      const uint32_t bits = ri < running ? (uint32_t)rowents[ri] : 0u;
#pragma unroll
      for (int e = 0; e < kMaxE; ++e) {
        if (e < E && (amask >> e & 1)) {  // uniform across the block
          const int fe = (bits >> e) & 1u;
          int tot_e;
          const int pe = block_scan_excl(fe, scratch, &tot_e);
          if (fe) a.ent_list[((size_t)b * E + e) * I + run_e[e] + pe] = ri;
          run_e[e] += tot_e;
        }
      }
    }
  }
  if (tid == 0) s_nrows = running;
  __syncthreads();
  const int nR = s_nrows;
  // the per-row state, cut bits, current LSE and flags are reset by init_kernel (many blocks)
  if (tid == 0) {
    in.pub.n_rows = nR;
    for (int e = 0; e < kMaxE; ++e) in.cnt_e[e] = run_e[e];
    int ntt = 0;
    if (load_settings(a, b).do_tt) {
      for (int e = 0; e < E; ++e) {
        if (!(amask >> e & 1)) continue;
        const int r = in.first_tok[e];
        int k = 0;
        while (k < ntt && in.tt_rows[k] != r) ++k;
        if (k == ntt) {
          in.tt_rows[ntt] = r;
          in.tt_mask[ntt] = 0;
          ++ntt;
        }
        in.tt_mask[k] |= amask & ~(1 << e);  // L[first(e), first(e')] = -inf for e' != e
      }
    }
    in.pub.n_tt = ntt;
  }
}

// Many blocks per sample, after compact_kernel: per-row text-edit state, cut bits over the used
// columns, the current LSE of the masked rows (= plain LSE, log2 domain), DELTA row flags.
constexpr int kInitNT = 256, kInitBlocks = 64;
__global__ void __launch_bounds__(kInitNT) init_kernel(Args a) {
  const int b = blockIdx.y;
  const SampleInfo& in = a.info[b];
  if (!in.pub.intervene) return;
  const int I = a.I, H = a.H, T = a.T, nR = in.pub.n_rows;
  const int t0 = blockIdx.x * kInitNT + threadIdx.x, stride = gridDim.x * kInitNT;
  const int* rlist = a.rlist + (size_t)b * I;
  uint64_t* st = reinterpret_cast<uint64_t*>(a.state) + (size_t)b * I;
  for (int r = t0; r < nR; r += stride) st[r] = 0ull;
  const int used = 2 * ((nR + 63) / 64);
  uint32_t* cut = a.cut + (size_t)b * I * a.cut_words;
  for (int idx = t0; idx < nR * used; idx += stride) {
    const int r = idx / used, w = idx % used;
    cut[(size_t)r * a.cut_words + w] = 0u;
  }
  for (int idx = t0; idx < H * nR; idx += stride) {
    const int h = idx / nR, r = idx % nR;
    const float l = a.lse[b * a.ls[0] + h * a.ls[1] + (int64_t)(T + rlist[r]) * a.ls[2]];
    a.lse_cur[((size_t)b * H + h) * I + r] = l * kLog2e;
  }
  int* rowflag = a.rowflag + (size_t)b * (I + kMaxE);
  for (int k = t0; k < nR + kMaxE; k += stride) rowflag[k] = 0;
}

}  // namespace

cudaError_t launch_prep(const Args& a, cudaStream_t s) {
  prep_kernel<<<a.B, kNT, 0, s>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_masks(const Args& a, cudaStream_t s) {
  const size_t smem = 2 * (size_t)a.I;
  cudaError_t err = ensure_smem<masks_kernel>((int)smem);
  if (err != cudaSuccess) return err;
  masks_kernel<<<dim3(a.E, a.B), kNT, smem, s>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_compact(const Args& a, cudaStream_t s) {
  compact_kernel<<<a.B, kNT, 0, s>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  init_kernel<<<dim3(kInitBlocks, a.B), kInitNT, 0, s>>>(a);
  return cudaGetLastError();
}

}  // namespace dl
