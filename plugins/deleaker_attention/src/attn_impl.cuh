// Flash-style attention on mma.sync (m16n8k16, fp32 accumulation), four modes:
//   PLAIN    all rows x all columns, no edits: out and the natural-log LSE.
//   DELTA    edited rows only, columns = the union of entity tokens + masked image columns
//            (the only columns an edit can touch). With the plain LSE as a fixed reference,
//            w = p_new - p_old per edited element; kept = 1 + sum(w); out = (O_plain + w V) / kept,
//            lse_cur = lse + log2(kept). Rows whose kept mass falls under a threshold are
//            listed for an exact recompute (FALLBACK). Warps skip tiles with nothing edited.
//   FULL     edited rows x all columns, edits applied, online softmax (exact recompute).
//   FALLBACK as FULL over the rows DELTA listed.
// LSE_ONLY variants (between pairs) only refresh lse_cur of the masked image rows.
#pragma once

#include "common.cuh"

namespace dl {

namespace {

enum { MODE_PLAIN = 0, MODE_DELTA = 1, MODE_FULL = 2, MODE_FALLBACK = 3 };

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
  static int bytes(int max_tiles) { return flags_off + 2 * max_tiles * 4; }
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
  const uint32_t sbase = smem_u32(smem);
  const Tp* qb = reinterpret_cast<const Tp*>(a.q) + b * a.qs[0];
  const Tp* kb = reinterpret_cast<const Tp*>(a.k) + b * a.ks[0];
  const Tp* vb = reinterpret_cast<const Tp*>(a.v) + b * a.vs[0];
  Tp* ob = reinterpret_cast<Tp*>(a.out) + b * a.os[0];
  const float sl2 = a.scale_log2;

  SampleInfo* in = a.info + b;
  int nrows = 0, nR = 0, ntok_tiles = 0;
  if constexpr (kEdit) {
    if (!in->pub.intervene) return;
    if (pass < kMaxPairs && pass >= in->pub.npairs - 1) return;  // no later pair reads this LSE
    nR = in->pub.n_rows;
    ntok_tiles = in->ntok_pad / kTile;
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

  int w_begin, w_end;
  if constexpr (kEdit) {
    const int ntile = (nrows + BM - 1) / BM, nwork = ntile * H;
    const int chunk = (nwork + gridDim.x - 1) / gridDim.x;
    w_begin = blockIdx.x * chunk;
    w_end = min(w_begin + chunk, nwork);
  } else {
    w_begin = blockIdx.x * H + blockIdx.y;  // (row tile, head) from the grid
    w_end = w_begin + 1;
  }
  int cached_tile = -1;
  const int r0 = warp * 16 + (lane >> 2);  // this thread's rows r0 and r0 + 8

  for (int w = w_begin; w < w_end; ++w) {
    const int tile = w / H, h = w % H;
    // ---------------- row metadata and (DELTA) the list of column tiles -------------------
    if (kEdit && tile != cached_tile) {
      __syncthreads();  // previous work item's readers are done
      int nontrivial = 0;
      for (int r = tid; r < BM; r += NT) {
        const int k = tile * BM + r;
        int joint = -1, ri = -1;
        uint32_t tt = 0;
        float m[kMaxE];
#pragma unroll
        for (int e = 0; e < kMaxE; ++e) m[e] = 1.f;
        if (k < nrows) {
          const int erow = MODE == MODE_FALLBACK ? a.flag_list[(size_t)b * (I + kMaxE) + k] : k;
          if (erow < nR) {
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
                for (int j = 0; j < c; ++j) x *= a.alpha;
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
        for (int idx = tid; idx < BM * n_img_tiles; idx += NT) {
          const int r = idx % BM, ci = idx / BM;
          const int ri = s_rri[r];
          if (ri < 0) continue;
          const uint2 cw = *reinterpret_cast<const uint2*>(cut + (size_t)ri * a.cut_words + 2 * ci);
          if (cw.x | cw.y) s_flags[ci] = 1;
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
      }
      cached_tile = tile;
    }
    const int ntiles = MODE == MODE_DELTA ? s_misc[0] : (N + kTile - 1) / kTile;

    // column tile `it` -> (kind, index): DELTA token tile, DELTA image tile, or plain range
    auto col_joint = [&](int it, int c) -> int {
      if constexpr (MODE == MODE_DELTA) {
        const int e = s_list[it];
        if (e < ntok_tiles) return tok_list[e * kTile + c];
        const int rj = (e - ntok_tiles) * kTile + c;
        return rj < nR ? T + rlist[rj] : -1;
      } else {
        const int j = it * kTile + c;
        return j < N ? j : -1;
      }
    };
    auto prefetch = [&](int it, int st) {
      if constexpr (kEdit) {
        for (int c = tid; c < kTile; c += NT) {
          const int j = col_joint(it, c);
          uint32_t info = 0, first = 0;
          if constexpr (MODE == MODE_DELTA) {
            const int e = s_list[it];
            if (e < ntok_tiles) {
              if (j >= 0) {
                info = tok_bits[j];
                first = tok_first[j];
              }
            } else {
              info = (uint32_t)((e - ntok_tiles) * kTile + c);  // masked column index
            }
          } else {
            if (j >= 0 && j < T) {
              info = tok_bits[j];
              first = tok_first[j];
            } else if (j >= T) {
              info = (uint32_t)ridx[j - T];  // -1 (all ones) when not masked
            }
          }
          s_colj[st * kTile + c] = j;
          s_cinfo[st * kTile + c] = info;
          s_cfirst[st * kTile + c] = first;
        }
      }
      const uint32_t ks = sbase + P::k_off + st * P::kv_tile, vs = sbase + P::v_off + st * P::kv_tile;
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

    for (int it = 0; it < ntiles; ++it) {
      const int st = it & 1;
      if (it + 1 < ntiles) {
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
      uint32_t cw[2][2] = {{0u, 0u}, {0u, 0u}};
      bool compute = true;
      if constexpr (MODE == MODE_DELTA) {
        const int e = s_list[it];
        img_tile = e >= ntok_tiles;
        if (img_tile) {
          const int ci = e - ntok_tiles;
#pragma unroll
          for (int rr = 0; rr < 2; ++rr)
            if (rri_[rr] >= 0) {
              const uint2 v2 = *reinterpret_cast<const uint2*>(cut + (size_t)rri_[rr] * a.cut_words + 2 * ci);
              cw[rr][0] = v2.x;
              cw[rr][1] = v2.y;
            }
          compute = __any_sync(0xffffffffu, (cw[0][0] | cw[0][1] | cw[1][0] | cw[1][1]) != 0u);
        }
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
            const int j = kEdit ? s_colj[st * kTile + c] : (it * kTile + c < N ? it * kTile + c : -1);
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
  const int smem = Plan<BM, D>::bytes(max_tiles);
  auto kern = attn_kernel<Tp, D, BM, MODE, LSE_ONLY>;
  cudaError_t err = ensure_smem<attn_kernel<Tp, D, BM, MODE, LSE_ONLY>>(smem);
  if (err != cudaSuccess) return err;
  kern<<<grid, BM * 2, smem, s>>>(a, pass, max_tiles);
  return cudaGetLastError();
}

int max_col_tiles(const Args& a) { return a.tpad / kTile + (a.I + kTile - 1) / kTile + 1; }

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
  return lse_only ? run_attn<Tp, D, BM, MODE_FALLBACK, true>(a, grid, pass, mt, s)
                  : run_attn<Tp, D, BM, MODE_FALLBACK, false>(a, grid, pass, mt, s);
}

}  // namespace dl
