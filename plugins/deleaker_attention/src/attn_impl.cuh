// Flash-style attention on mma.sync (m16n8k16, fp32 accumulation), four modes:
//   PLAIN    all rows x all columns, no edits: out and the natural-log LSE.
//   DELTA    edited rows only, columns = the union of entity tokens + masked image columns
//            (the only columns an edit can touch). With the plain LSE as a fixed reference,
//            w = p_new - p_old per edited element; kept = 1 + sum(w); out = (O_plain + w V) / kept,
//            lse_cur = lse + log2(kept). Rows whose kept mass falls under a threshold are
//            listed for an exact recompute (FALLBACK). Warps skip tiles with nothing edited.
//   FULL     edited rows x all columns, edits applied, online softmax (exact recompute).
//   FALLBACK as FULL over the rows DELTA listed; with few rows, the columns of every (row tile,
//            head) are split over several blocks (partials merged by split_merge_kernel).
// LSE_ONLY variants (between pairs) only refresh lse_cur of the masked image rows.
#pragma once

#include "common.cuh"

namespace dl {

namespace {

enum { MODE_PLAIN = 0, MODE_DELTA = 1, MODE_FULL = 2, MODE_FALLBACK = 3 };
constexpr int kBatch = 8;  // independent global loads in flight per thread in the metadata loops

template <int BM, int D> struct Plan {
  static constexpr int kv_tile = kTile * D * 2;
  static constexpr int q_off = 0;
  static constexpr int k_off = q_off + BM * D * 2;
  static constexpr int v_off = k_off + 2 * kv_tile;
  static constexpr int rowj_off = v_off + 2 * kv_tile;
  static constexpr int rri_off = rowj_off + BM * 4;
  static constexpr int rtt_off = rri_off + BM * 4;
  static constexpr int rmult_off = rtt_off + BM * 4;
  static constexpr int colj_off = rmult_off + BM * kMaxE * 4;
  static constexpr int cinfo_off = colj_off + 2 * kTile * 4;
  static constexpr int cfirst_off = cinfo_off + 2 * kTile * 4;
  static constexpr int misc_off = cfirst_off + 2 * kTile * 4;
  static constexpr int flags_off = misc_off + 16 * 4;
  // flags, tile list, then (DELTA) the joint column of every listed tile's columns
  static int bytes(int max_tiles, int jall_tiles) { return flags_off + 2 * max_tiles * 4 + jall_tiles * kTile * 4; }
};

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

template <typename Tp, int D, int BM, int MODE, bool LSE_ONLY>
__global__ void __launch_bounds__(BM * 2) attn_kernel(Args a, int pass, int max_tiles) {
  using Op = MmaOp<Tp>;
  using P = Plan<BM, D>;
  constexpr int NT = BM * 2;
  constexpr bool kEdit = MODE != MODE_PLAIN;
  constexpr bool kOnline = MODE != MODE_DELTA;  // online softmax (else fixed-reference delta)
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int b = MODE == MODE_PLAIN ? blockIdx.z : blockIdx.y;
  const int T = a.T, I = a.I, N = a.N, H = a.H;
  int* s_rowj = reinterpret_cast<int*>(smem + P::rowj_off);
  int* s_rri = reinterpret_cast<int*>(smem + P::rri_off);
  uint32_t* s_rtt = reinterpret_cast<uint32_t*>(smem + P::rtt_off);
  float* s_rmult = reinterpret_cast<float*>(smem + P::rmult_off);
  int* s_colj = reinterpret_cast<int*>(smem + P::colj_off);
  uint32_t* s_cinfo = reinterpret_cast<uint32_t*>(smem + P::cinfo_off);
  uint32_t* s_cfirst = reinterpret_cast<uint32_t*>(smem + P::cfirst_off);
  int* s_misc = reinterpret_cast<int*>(smem + P::misc_off);
  int* s_flags = reinterpret_cast<int*>(smem + P::flags_off);
  int* s_list = s_flags + max_tiles;
  int* s_jall = s_list + max_tiles;  // DELTA: [listed tile][column] joint column (-1: none)
  const uint32_t sbase = smem_u32(smem);
  const Tp* qb = reinterpret_cast<const Tp*>(a.q) + b * a.qs[0];
  const Tp* kb = reinterpret_cast<const Tp*>(a.k) + b * a.ks[0];
  const Tp* vb = reinterpret_cast<const Tp*>(a.v) + b * a.vs[0];
  Tp* ob = reinterpret_cast<Tp*>(a.out) + b * a.os[0];
  const float sl2 = a.scale_log2;

  SampleInfo* in = a.info + b;
  int nrows = 0, nR = 0, ntok_tiles = 0;
  uint32_t need_mask = 0xffu;  // LSE_ONLY: slots of the next pair (rows outside are skipped)
  if constexpr (kEdit) {
    if (!in->pub.intervene) return;
    if (pass < kMaxPairs && pass >= in->pub.npairs - 1) return;  // no later pair reads this LSE
    nR = in->pub.n_rows;
    ntok_tiles = in->ntok_pad / kTile;
    if (LSE_ONLY && pass + 1 < kMaxPairs) need_mask = (1u << in->pair_e1[pass + 1]) | (1u << in->pair_e2[pass + 1]);
    if constexpr (MODE == MODE_FALLBACK) {
      nrows = in->n_flag[pass];
      if (pass == kMaxPairs && blockIdx.x == 0 && tid == 0) in->pub.n_fallback = nrows;
    } else {
      nrows = LSE_ONLY ? nR : nR + in->pub.n_tt;
    }
  }
  const int* tok_list = a.tok_list + (size_t)b * a.tpad;
  const uint32_t* tok_bits = a.tok_bits + (size_t)b * T;
  const uint32_t* tok_first = a.tok_first + (size_t)b * T;
  const int* rlist = a.rlist + (size_t)b * I;
  const int* ridx = a.ridx + (size_t)b * I;
  const uint32_t* cut = a.cut + (size_t)b * I * a.cut_words;
  const int n_img_tiles = (nR + kTile - 1) / kTile;
  const int ncol_all = (N + kTile - 1) / kTile;
  int nsplit = 1;
  if constexpr (MODE == MODE_FALLBACK) nsplit = fallback_nsplit(nrows, H, gridDim.x, ncol_all, BM);

  int w_begin, w_end, w_step = 1;
  if constexpr (kEdit) {
    const int ntile = (nrows + BM - 1) / BM, nwork = ntile * H * nsplit;
    if (MODE == MODE_DELTA && a.row_order != 0) {
      // v5: items dealt round-robin (block x takes x, x + grid, ...). With rows grouped by
      // entity the row tiles differ in cost (a tile straddling two groups lists both groups'
      // column tiles); contiguous chunks put two such items on one block. Each item then
      // rebuilds its row metadata (cheap next to its column tiles).
      w_begin = blockIdx.x;
      w_end = nwork;
      w_step = gridDim.x;
    } else {
      const int chunk = (nwork + gridDim.x - 1) / gridDim.x;
      w_begin = blockIdx.x * chunk;
      w_end = min(w_begin + chunk, nwork);
    }
  } else {
    w_begin = blockIdx.x * H + blockIdx.y;  // (row tile, head) from the grid
    w_end = w_begin + 1;
  }
  int cached_tile = -1;
  const int r0 = warp * 16 + (lane >> 2);  // this thread's rows r0 and r0 + 8

  for (int w = w_begin; w < w_end; w += w_step) {
    const int split = w % nsplit, tile = (w / nsplit) / H, h = (w / nsplit) % H;
    // column tiles [cbeg, cbeg + ntiles) of this work item (non-DELTA modes)
    const int cbeg = split * ncol_all / nsplit;
    // ---------------- row metadata and (DELTA) the list of column tiles -------------------
    if (kEdit && tile != cached_tile) {
      __syncthreads();  // previous work item's readers are done
      int nontrivial = 0;
      const float alpha = load_settings(a, b).alpha;  // this sample's rule-S multiplier
      for (int r = tid; r < BM; r += NT) {
        const int k = tile * BM + r;
        int joint = -1, ri = -1;
        uint32_t tt = 0;
        float m[kMaxE];
#pragma unroll
        for (int e = 0; e < kMaxE; ++e) m[e] = 1.f;
        if (k < nrows) {
          const int erow = MODE == MODE_FALLBACK ? a.flag_list[(size_t)b * (I + kMaxE) + k] : k;
          // LSE_ONLY (between pairs, v5): only the rows of the next pair's two masks are read
          // (its G rows); the others keep a stale lse_cur that no later pass reads, since
          // every refresh starts again from the plain LSE and the full edit state.
          const bool skip = LSE_ONLY && a.row_order != 0 && erow < nR &&
                            (a.rowents[(size_t)b * I + erow] & need_mask) == 0;
          if (skip) {
            // joint -1: no Q, no columns, no flag, no write
          } else if (erow < nR) {
            ri = erow;
            joint = T + rlist[ri];
            const int8_t* st = a.state + ((size_t)b * I + ri) * kMaxE;
#pragma unroll
            for (int e = 0; e < kMaxE; ++e) {
              const int c = st[e];
              if (c < 0) {
                m[e] = -1.f;
              } else {
                float x = 1.f;
                for (int j = 0; j < c; ++j) x *= alpha;
                m[e] = x;
              }
              if (m[e] != 1.f) nontrivial = 1;
            }
          } else {
            joint = in->tt_rows[erow - nR];
            tt = (uint32_t)in->tt_mask[erow - nR];
            if (tt) nontrivial = 1;
          }
        }
        s_rowj[r] = joint;
        s_rri[r] = ri;
        s_rtt[r] = tt;
#pragma unroll
        for (int e = 0; e < kMaxE; ++e) s_rmult[r * kMaxE + e] = m[e];
      }
      const int any_tok = __syncthreads_or(nontrivial);
      if constexpr (MODE == MODE_DELTA) {
        for (int ci = tid; ci < n_img_tiles; ci += NT) s_flags[ci] = 0;
        __syncthreads();
        // which masked-column tiles hold a cut bit of these rows (loads batched kBatch deep)
        for (int base = tid; base < BM * n_img_tiles; base += kBatch * NT) {
          uint32_t any[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int idx = base + u * NT;
            any[u] = 0u;
            if (idx < BM * n_img_tiles) {
              const int ri = s_rri[idx % BM];
              if (ri >= 0) {
                const uint2 cw = *reinterpret_cast<const uint2*>(cut + (size_t)ri * a.cut_words + 2 * (idx / BM));
                any[u] = cw.x | cw.y;
              }
            }
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u)
            if (any[u]) s_flags[(base + u * NT) / BM] = 1;
        }
        __syncthreads();
        if (warp == 0) {
          int pos = 0;
          if (any_tok) {
            for (int ct = lane; ct < ntok_tiles; ct += 32) s_list[ct] = ct;
            pos = ntok_tiles;
          }
          for (int base = 0; base < n_img_tiles; base += 32) {
            const int ci = base + lane;
            const bool f = ci < n_img_tiles && s_flags[ci] != 0;
            const uint32_t bal = __ballot_sync(0xffffffffu, f);
            if (f) s_list[pos + __popc(bal & ((1u << lane) - 1u))] = ntok_tiles + ci;
            pos += __popc(bal);
          }
          if (lane == 0) s_misc[0] = pos;
        }
        __syncthreads();
        // joint column of every column of the listed tiles, staged once per row tile so the
        // K/V prefetch of each tile needs no global load (loads batched kBatch deep)
        const int nall = s_misc[0] * kTile;
        for (int base = tid; base < nall; base += kBatch * NT) {
          int jv[kBatch];
#pragma unroll
          for (int u = 0; u < kBatch; ++u) {
            const int idx = base + u * NT;
            jv[u] = -1;
            if (idx < nall) {
              const int e = s_list[idx / kTile], c = idx % kTile;
              if (e < ntok_tiles) {
                jv[u] = tok_list[e * kTile + c];
              } else {
                const int rj = (e - ntok_tiles) * kTile + c;
                jv[u] = rj < nR ? T + rlist[rj] : -1;
              }
            }
          }
#pragma unroll
          for (int u = 0; u < kBatch; ++u)
            if (base + u * NT < nall) s_jall[base + u * NT] = jv[u];
        }
        __syncthreads();
      }
      cached_tile = tile;
    }
    const int ntiles = MODE == MODE_DELTA ? s_misc[0] : (split + 1) * ncol_all / nsplit - cbeg;

    // column tile `it` -> (kind, index): DELTA token tile, DELTA image tile, or plain range
    auto col_joint = [&](int it, int c) -> int {
      if constexpr (MODE == MODE_DELTA) {
        return s_jall[it * kTile + c];
      } else {
        const int j = (cbeg + it) * kTile + c;
        return j < N ? j : -1;
      }
    };
    // column metadata travels with the tile: token bits / masked-column index are cp.async'd
    // into the stage (same commit group as K/V), so no global load is waited on here
    auto prefetch = [&](int it, int st) {
      if constexpr (kEdit) {
        for (int c = tid; c < kTile; c += NT) {
          const int j = col_joint(it, c);
          uint32_t* ci = s_cinfo + st * kTile + c;
          uint32_t* cf = s_cfirst + st * kTile + c;
          if constexpr (MODE == MODE_DELTA) {
            const int e = s_list[it];
            if (e < ntok_tiles) {
              if (j >= 0) {
                cp_async4(smem_u32(ci), tok_bits + j);
                cp_async4(smem_u32(cf), tok_first + j);
              } else {
                *ci = 0u;
                *cf = 0u;
              }
            } else {
              *ci = (uint32_t)((e - ntok_tiles) * kTile + c);  // masked column index
              *cf = 0u;
            }
          } else {
            if (j >= 0 && j < T) {
              cp_async4(smem_u32(ci), tok_bits + j);
              cp_async4(smem_u32(cf), tok_first + j);
            } else if (j >= T) {
              cp_async4(smem_u32(ci), ridx + (j - T));  // -1 (all ones) when not masked
              *cf = 0u;
            } else {
              *ci = 0u;
              *cf = 0u;
            }
          }
          s_colj[st * kTile + c] = j;
        }
      }
      const uint32_t ks = sbase + P::k_off + st * P::kv_tile, vs = sbase + P::v_off + st * P::kv_tile;
      if (a.fixed_gather) {  // v6: fixed chunk column per thread, same bytes to the same places
        gather_tile64<D, NT>(ks, kb + h * a.ks[1], a.k_rb, [&](int c) { return col_joint(it, c); }, a.k);
        if constexpr (!LSE_ONLY)
          gather_tile64<D, NT>(vs, vb + h * a.vs[1], a.v_rb, [&](int c) { return col_joint(it, c); }, a.v);
      } else {
        load_tile<D, NT>(ks, kTile, [&](int c) -> const void* {
          const int j = col_joint(it, c);
          return j >= 0 ? (const void*)(kb + h * a.ks[1] + (int64_t)j * a.ks[2]) : nullptr;
        }, a.k);
        if constexpr (!LSE_ONLY) {
          load_tile<D, NT>(vs, kTile, [&](int c) -> const void* {
            const int j = col_joint(it, c);
            return j >= 0 ? (const void*)(vb + h * a.vs[1] + (int64_t)j * a.vs[2]) : nullptr;
          }, a.v);
        }
      }
      cp_async_commit();
    };
    auto row_joint = [&](int r) -> int {
      if constexpr (kEdit) {
        return s_rowj[r];
      } else {
        const int j = tile * BM + r;
        return j < N ? j : -1;
      }
    };

    if (ntiles == 0) continue;  // uniform: DELTA rows with nothing to correct keep the plain output
    // ---------------- prologue ----------------
    load_tile<D, NT>(sbase + P::q_off, BM, [&](int r) -> const void* {
      const int j = row_joint(r);
      return j >= 0 ? (const void*)(qb + h * a.qs[1] + (int64_t)j * a.qs[2]) : nullptr;
    }, a.q);
    cp_async_commit();
    prefetch(0, 0);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int x = 0; x < 4; ++x) o[i][x] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
    float l2[2] = {0.f, 0.f};  // DELTA: plain log2 LSE of the two rows
    int rj_[2], rri_[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      rj_[rr] = row_joint(r0 + rr * 8);
      rri_[rr] = kEdit ? s_rri[r0 + rr * 8] : -1;
      if (MODE == MODE_DELTA && rj_[rr] >= 0)
        l2[rr] = a.lse[b * a.ls[0] + h * a.ls[1] + (int64_t)rj_[rr] * a.ls[2]] * kLog2e;
    }
    uint32_t qf[D / 16][4];
    // DELTA: cut bits of this thread's two rows for a listed image tile, read one tile ahead
    auto load_cw = [&](int it, uint32_t (&cwx)[2][2]) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) cwx[rr][0] = cwx[rr][1] = 0u;
      if constexpr (MODE == MODE_DELTA) {
        const int e = s_list[it];
        if (e >= ntok_tiles) {
#pragma unroll
          for (int rr = 0; rr < 2; ++rr)
            if (rri_[rr] >= 0) {
              const uint2 v2 =
                  *reinterpret_cast<const uint2*>(cut + (size_t)rri_[rr] * a.cut_words + 2 * (e - ntok_tiles));
              cwx[rr][0] = v2.x;
              cwx[rr][1] = v2.y;
            }
        }
      }
    };
    uint32_t cw_next[2][2];
    load_cw(0, cw_next);

    for (int it = 0; it < ntiles; ++it) {
      const int st = it & 1;
      uint32_t cw[2][2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        cw[rr][0] = cw_next[rr][0];
        cw[rr][1] = cw_next[rr][1];
      }
      if (it + 1 < ntiles) {
        load_cw(it + 1, cw_next);
        prefetch(it + 1, st ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (it == 0) {
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
          ldsm_x4(qf[kc], sbase + P::q_off + tile_off<D>(warp * 16 + (lane & 15), kc * 2 + (lane >> 4)));
      }
      // DELTA: image tiles carry the cut bits of this thread's rows for the 64 columns
      bool img_tile = false;
      bool compute = true;
      if constexpr (MODE == MODE_DELTA) {
        img_tile = s_list[it] >= ntok_tiles;
        if (img_tile) compute = __any_sync(0xffffffffu, (cw[0][0] | cw[0][1] | cw[1][0] | cw[1][1]) != 0u);
      }
      if (compute) {
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int x = 0; x < 4; ++x) s[nb][x] = 0.f;
        const uint32_t ks = sbase + P::k_off + st * P::kv_tile;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
          for (int nb2 = 0; nb2 < 4; ++nb2) {
            uint32_t bf[4];
            ldsm_x4(bf, ks + tile_off<D>(nb2 * 16 + (lane & 7) + ((lane >> 4) << 3), kc * 2 + ((lane >> 3) & 1)));
            Op::run(s[2 * nb2], qf[kc], bf[0], bf[1]);
            Op::run(s[2 * nb2 + 1], qf[kc], bf[2], bf[3]);
          }
        // ---- per element: logits (log2 domain) with the edits ----
        float dz[2] = {0.f, 0.f};
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            const int c = nb * 8 + 2 * (lane & 3) + x;
            const int j = kEdit ? s_colj[st * kTile + c] : ((cbeg + it) * kTile + c < N ? (cbeg + it) * kTile + c : -1);
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
              const int r = r0 + rr * 8;
              const float s2 = s[nb][rr * 2 + x] * sl2;
              bool killed = false;
              float mult = 1.f;
              if constexpr (kEdit) {
                if (j >= 0 && rj_[rr] >= 0) {
                  if (MODE == MODE_DELTA && img_tile) {
                    killed = (cw[rr][nb >> 2] >> (c & 31)) & 1u;
                  } else if (j < T) {
                    if (rri_[rr] >= 0) {
                      const uint32_t bits = s_cinfo[st * kTile + c];
                      if (bits) {
#pragma unroll
                        for (int e = 0; e < kMaxE; ++e)
                          if (bits >> e & 1u) {
                            const float me = s_rmult[r * kMaxE + e];
                            killed |= me < 0.f;
                            mult *= me;
                          }
                      }
                    } else {
                      killed = (s_rtt[r] & s_cfirst[st * kTile + c]) != 0u;
                    }
                  } else if (MODE != MODE_DELTA) {
                    const int rj = (int)s_cinfo[st * kTile + c];
                    if (rri_[rr] >= 0 && rj >= 0)
                      killed = (cut[(size_t)rri_[rr] * a.cut_words + (rj >> 5)] >> (rj & 31)) & 1u;
                  }
                }
              }
              float val;
              if constexpr (kOnline) {
                val = (j < 0 || killed) ? -INFINITY : s2 * mult;
              } else {
                // DELTA: w = p_new - p_old against the plain LSE
                val = 0.f;
                if (j >= 0 && (killed || mult != 1.f)) {
                  const float p_old = exp2f(s2 - l2[rr]);
                  const float p_new = killed ? 0.f : exp2f(s2 * mult - l2[rr]);
                  val = p_new - p_old;
                }
                dz[rr] += val;
              }
              s[nb][rr * 2 + x] = val;
            }
          }
        if constexpr (kOnline) {
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float mx = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][rr * 2], s[nb][rr * 2 + 1]));
            mx = quad_max(mx);
            const float mnew = fmaxf(mrow[rr], mx);
            const float muse = mnew == -INFINITY ? 0.f : mnew;
            const float corr = exp2f(mrow[rr] - muse);
            mrow[rr] = mnew;
            float ls = 0.f;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
              for (int x = 0; x < 2; ++x) {
                const float pv = exp2f(s[nb][rr * 2 + x] - muse);
                s[nb][rr * 2 + x] = pv;
                ls += pv;
              }
            lrow[rr] = lrow[rr] * corr + ls;
            if constexpr (!LSE_ONLY) {
#pragma unroll
              for (int i = 0; i < D / 8; ++i) {
                o[i][rr * 2] *= corr;
                o[i][rr * 2 + 1] *= corr;
              }
            }
          }
        } else {
          lrow[0] += dz[0];
          lrow[1] += dz[1];
        }
        if constexpr (!LSE_ONLY) {
          const uint32_t vs = sbase + P::v_off + st * P::kv_tile;
#pragma unroll
          for (int kc = 0; kc < 4; ++kc) {
            uint32_t pa[4];
            pa[0] = Op::pack(s[2 * kc][0], s[2 * kc][1]);
            pa[1] = Op::pack(s[2 * kc][2], s[2 * kc][3]);
            pa[2] = Op::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[3] = Op::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int db = 0; db < D / 16; ++db) {
              uint32_t bf[4];
              ldsm_x4_t(bf, vs + tile_off<D>(kc * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), db * 2 + (lane >> 4)));
              Op::run(o[2 * db], pa, bf[0], bf[1]);
              Op::run(o[2 * db + 1], pa, bf[2], bf[3]);
            }
          }
        }
      }
      __syncthreads();  // stage st is refilled by the next iteration's prefetch
    }

    // ---------------- epilogue ----------------
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = r0 + rr * 8;
      const int j = rj_[rr];
      const float lsum = quad_sum(lrow[rr]);
      if (j < 0) continue;
      if constexpr (MODE == MODE_FALLBACK) {
        if (nsplit > 1) {  // partial of columns [cbeg, cbeg + ntiles): unnormalised o, max, sum
          const int k = tile * BM + r;
          float* slot = a.split_part +
                        ((size_t)b * kSplitRows + ((size_t)k * H + h) * nsplit + split) * kSplitStride;
          if constexpr (!LSE_ONLY) {
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
              const int d = i * 8 + 2 * (lane & 3);
              *reinterpret_cast<float2*>(slot + d) = make_float2(o[i][rr * 2], o[i][rr * 2 + 1]);
            }
          }
          if ((lane & 3) == 0) {
            slot[D] = mrow[rr];
            slot[D + 1] = lsum;
          }
          continue;
        }
      }
      if constexpr (kOnline) {
        const float lse2 = mrow[rr] + log2f(lsum);
        if constexpr (LSE_ONLY) {
          if ((lane & 3) == 0 && rri_[rr] >= 0) a.lse_cur[((size_t)b * H + h) * I + rri_[rr]] = lse2;
        } else {
          if (MODE == MODE_PLAIN && (lane & 3) == 0)
            a.lse[b * a.ls[0] + h * a.ls[1] + (int64_t)j * a.ls[2]] = lse2 * 0.6931471805599453f;
          const float inv = 1.f / lsum;
          Tp* orow = ob + h * a.os[1] + (int64_t)j * a.os[2];
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            const int d = i * 8 + 2 * (lane & 3);
            *reinterpret_cast<uint32_t*>(orow + d) = Op::pack(o[i][rr * 2] * inv, o[i][rr * 2 + 1] * inv);
          }
        }
      } else {
        const float kept = 1.f + lsum;  // kept probability mass relative to the plain row
        const bool ok = kept >= a.fallback_threshold;
        if (!ok && (lane & 3) == 0) {
          const int erow = tile * BM + r;
          int* rowflag = a.rowflag + (size_t)b * (I + kMaxE);
          if (atomicMax(rowflag + erow, pass + 1) < pass + 1) {
            const int idx = atomicAdd(&in->n_flag[pass], 1);
            a.flag_list[(size_t)b * (I + kMaxE) + idx] = erow;
          }
        }
        if constexpr (LSE_ONLY) {
          if (ok && (lane & 3) == 0 && rri_[rr] >= 0)
            a.lse_cur[((size_t)b * H + h) * I + rri_[rr]] = l2[rr] + log2f(kept);
        } else {
          if (ok) {  // rows with nothing edited rewrite their plain value exactly
            const float inv = 1.f / kept;
            Tp* orow = ob + h * a.os[1] + (int64_t)j * a.os[2];
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
              const int d = i * 8 + 2 * (lane & 3);
              uint32_t* p = reinterpret_cast<uint32_t*>(orow + d);
              const float2 old = Op::unpack(*p);
              *p = Op::pack((old.x + o[i][rr * 2]) * inv, (old.y + o[i][rr * 2 + 1]) * inv);
            }
          }
        }
      }
    }
  }
}

template <typename Tp, int D, int BM, int MODE, bool LSE_ONLY>
cudaError_t run_attn(const Args& a, dim3 grid, int pass, int max_tiles, cudaStream_t s) {
  const int smem = Plan<BM, D>::bytes(max_tiles, MODE == MODE_DELTA ? max_tiles : 0);
  auto kern = attn_kernel<Tp, D, BM, MODE, LSE_ONLY>;
  cudaError_t err = ensure_smem<attn_kernel<Tp, D, BM, MODE, LSE_ONLY>>(smem);
  if (err != cudaSuccess) return err;
  kern<<<grid, BM * 2, smem, s>>>(a, pass, max_tiles);
  return cudaGetLastError();
}

int max_col_tiles(const Args& a) { return a.tpad / kTile + (a.I + kTile - 1) / kTile + 1; }

// Merges the FALLBACK split-column partials of pass `pass`: one warp per (flagged row, head);
// out row (or, LSE_ONLY, the current LSE) from max / sum / unnormalised o of every split.
constexpr int kMergeNT = 256;
template <typename Tp, int D, bool LSE_ONLY>
__global__ void __launch_bounds__(kMergeNT) split_merge_kernel(Args a, int pass, int attn_gridx) {
  using Op = MmaOp<Tp>;
  const int b = blockIdx.y, lane = threadIdx.x & 31;
  const SampleInfo* in = a.info + b;
  if (!in->pub.intervene) return;
  if (pass < kMaxPairs && pass >= in->pub.npairs - 1) return;
  const int nrows = in->n_flag[pass], H = a.H, I = a.I;
  const int nsplit = fallback_nsplit(nrows, H, attn_gridx, (a.N + kTile - 1) / kTile, 64);
  if (nsplit <= 1) return;
  const int nR = in->pub.n_rows;
  const int nwarps = gridDim.x * (kMergeNT / 32);
  for (int wk = blockIdx.x * (kMergeNT / 32) + (threadIdx.x >> 5); wk < nrows * H; wk += nwarps) {
    const int k = wk / H, h = wk % H;
    const float* base = a.split_part + ((size_t)b * kSplitRows + (size_t)wk * nsplit) * kSplitStride;
    float m = -INFINITY;
    for (int sp = 0; sp < nsplit; ++sp) m = fmaxf(m, base[sp * kSplitStride + D]);
    const float mu = m == -INFINITY ? 0.f : m;
    float l = 0.f;
    float acc[D / 32];
#pragma unroll
    for (int q = 0; q < D / 32; ++q) acc[q] = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) {
      const float* part = base + sp * kSplitStride;
      const float f = exp2f(part[D] - mu);
      l += f * part[D + 1];
      if constexpr (!LSE_ONLY) {
#pragma unroll
        for (int q = 0; q < D / 32; ++q) acc[q] += f * part[q * 32 + lane];
      }
    }
    const int erow = a.flag_list[(size_t)b * (I + kMaxE) + k];
    const int ri = erow < nR ? erow : -1;
    const int joint = erow < nR ? a.T + a.rlist[(size_t)b * I + erow] : in->tt_rows[erow - nR];
    if constexpr (LSE_ONLY) {
      if (lane == 0 && ri >= 0) a.lse_cur[((size_t)b * H + h) * I + ri] = m + log2f(l);
    } else {
      const float inv = 1.f / l;
      Tp* orow = reinterpret_cast<Tp*>(a.out) + b * a.os[0] + h * a.os[1] + (int64_t)joint * a.os[2];
      uint16_t* orow16 = reinterpret_cast<uint16_t*>(orow);
#pragma unroll
      for (int q = 0; q < D / 32; ++q)  // round to nearest like the unsplit epilogue (low half of the pair)
        orow16[q * 32 + lane] = (uint16_t)(Op::pack(acc[q] * inv, 0.f) & 0xffffu);
    }
  }
}

template <typename Tp, int D, bool LSE_ONLY>
cudaError_t run_split_merge(const Args& a, int pass, int attn_gridx, cudaStream_t s) {
  split_merge_kernel<Tp, D, LSE_ONLY><<<dim3(32, a.B), kMergeNT, 0, s>>>(a, pass, attn_gridx);
  return cudaGetLastError();
}

}  // namespace


template <typename Tp, int D>
cudaError_t plain_attention_t(const Args& a, cudaStream_t s) {
  constexpr int BM = 128;
  dim3 grid((a.N + BM - 1) / BM, a.H, a.B);
  return run_attn<Tp, D, BM, MODE_PLAIN, false>(a, grid, 0, 1, s);
}

template <typename Tp, int D>
cudaError_t edit_attention_t(const Args& a, int mode, int pass, int num_sms, cudaStream_t s) {
  constexpr int BM = 64;
  int per_b = 2 * num_sms / (a.B > 0 ? a.B : 1);
  per_b = per_b < 1 ? 1 : per_b;
  const dim3 grid(per_b, a.B);
  const int mt = max_col_tiles(a);
  const bool lse_only = pass < kMaxPairs;
  if (mode == 0)
    return lse_only ? run_attn<Tp, D, BM, MODE_DELTA, true>(a, grid, pass, mt, s)
                    : run_attn<Tp, D, BM, MODE_DELTA, false>(a, grid, pass, mt, s);
  if (mode == 1)
    return lse_only ? run_attn<Tp, D, BM, MODE_FULL, true>(a, grid, pass, mt, s)
                    : run_attn<Tp, D, BM, MODE_FULL, false>(a, grid, pass, mt, s);
  cudaError_t err = lse_only ? run_attn<Tp, D, BM, MODE_FALLBACK, true>(a, grid, pass, mt, s)
                             : run_attn<Tp, D, BM, MODE_FALLBACK, false>(a, grid, pass, mt, s);
  if (err != cudaSuccess) return err;
  return lse_only ? run_split_merge<Tp, D, true>(a, pass, per_b, s) : run_split_merge<Tp, D, false>(a, pass, per_b, s);
}

}  // namespace dl
