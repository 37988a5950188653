// Internal shared definitions: per-sample device state, workspace layout, kernel arguments.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "deleaker_attention.h"

namespace dl {

constexpr int kMaxE = DL_MAX_ENTITIES;
constexpr int kMaxPairs = kMaxE * (kMaxE - 1) / 2;
constexpr int kTile = 64;  // rows/columns per tile in every tiled kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxHG = 8;          // entity_probs: head groups summed in a fixed order by the masks kernel
constexpr int kSplitRows = 8192;   // FALLBACK split over columns: partial (row, head, split) slots per sample
constexpr int kMaxSplit = 16;
constexpr int kSplitStride = 128 + 2;  // floats per slot: o[D] unnormalised, running max (log2), sum
// Rule X: G of up to this many 64x64 tiles per sample (16 KB each) is kept from pass 1 for
// pass 2; tiles past it are recomputed (bit-identical path). 2 x 10 x 10 tiles at 4608 / 28%.
constexpr int kMaxGTiles = 512;
constexpr int kGTileFloats = 32 * 128;  // per tile: 32 accumulators x 128 threads
// Rule X pass 1 split over head groups (v6, x_split): partial G tiles of (tile, group) units,
// summed in group order by the merge pass. At most kMaxXG groups; the partial buffer holds
// kMaxXPart tiles per sample (16 MB), so groups * tiles <= that (else no split).
constexpr int kMaxXG = 16;
constexpr int kMaxXPart = 1024;

// Head groups of rule X pass 1 for a pair with `total` 64x64 tiles, `grid` blocks per sample
// (pass 1's grid; the merge pass uses the same value), `part_cap` partial tiles and `g_tiles`
// kept G tiles (the merged G is kept for pass 2, so every tile must fit: total <= g_tiles).
// Cost model: rounds of units per block x (heads per unit + 1 for the prologue and the stats).
// 1: no split (pass 1 sums all heads per tile and takes the statistics itself).
__host__ __device__ inline int x_head_groups(int total, int H, int grid, int part_cap, int g_tiles) {
  if (total <= 0 || total > g_tiles || grid < 1) return 1;
  int best = 1;
  long best_cost = (long)((total + grid - 1) / grid) * (H + 1);
  const int gmax = H < kMaxXG ? H : kMaxXG;
  for (int hg = 2; hg <= gmax; ++hg) {
    if ((long)total * hg > part_cap) break;
    const long units = (long)total * hg;
    const long cost = (units + grid - 1) / grid * ((H + hg - 1) / hg + 1);
    if (cost < best_cost) {
      best_cost = cost;
      best = hg;
    }
  }
  return best;
}

// FALLBACK (few rows, each a full row of column tiles): split the columns of every (row tile,
// head) into nsplit ranges so all SMs take part; partials merged by split_merge_kernel. The
// attention kernel and the merge compute it from the same inputs. 1: no split.
__host__ __device__ inline int fallback_nsplit(int nrows, int H, int gridx, int ncol_tiles, int bm) {
  if (nrows <= 0) return 1;
  const int items = (nrows + bm - 1) / bm * H;
  int s = gridx / items;
  const int cap = kSplitRows / (nrows * H);
  s = s < cap ? s : cap;
  s = s < kMaxSplit ? s : kMaxSplit;
  s = s < ncol_tiles / 2 ? s : ncol_tiles / 2;  // at least two column tiles per split
  return s < 2 ? 1 : s;
}

// Per-sample state written on the device by the prep/compaction kernels and read by all later
// kernels. The public part (dl_sample_info_t) comes first so tests can read it.
struct SampleInfo {
  dl_sample_info_t pub;
  int32_t ntok;      // tokens in the union of active entities
  int32_t ntok_pad;  // ntok rounded up to a multiple of kTile
  int32_t active_mask;
  int32_t ntok_e[kMaxE];
  int32_t first_tok[kMaxE];
  int32_t cnt_e[kMaxE];  // rows in mask e
  int32_t pair_e1[kMaxPairs];
  int32_t pair_e2[kMaxPairs];
  int32_t tt_rows[kMaxE];
  int32_t tt_mask[kMaxE];          // per TT row: slots e' whose first token is cut in that row
  int32_t n_flag[kMaxPairs + 1];   // fallback rows appended by DELTA pass (pair p, or kMaxPairs: final)
  double stats[kMaxPairs][2][3];   // X rule: count, sum, sum of squares of the non-zero G, per region
};

// Byte offsets of every workspace buffer (all 256-byte aligned).
struct Layout {
  size_t info, tok_list, tok_bits, tok_firstbits, p, mask, rlist, ridx, ent_list, rowents, state,
      cut, lse_cur, lse, flag_list, rowflag, p_part, split, gbuf, xpart, total;
  int g_tiles;    // rule X tiles whose G is kept between pass 1 and pass 2, per sample
  int xpart_tiles;  // rule X pass 1 partial (tile, head group) tiles, per sample
  int cut_words;  // uint32 words per cut row (even: 64-bit pairs)
  int tpad;       // T rounded up to kTile
};

Layout make_layout(int B, int H, int T, int I, int E, bool lse_in_ws);

// One sample's DeLeaker settings, as the kernels use them: one field per DL_SETTINGS entry
// (deleaker_settings.h, generated from runtime/op_schema.py SETTINGS): windows a0, a1 (history
// from a0 to a1, exclusive), i0, i1 (edits, inclusive); knobs beta1, beta2, alpha; rules 0/1.
#define DL_CTYPE_I64 int64_t
#define DL_CTYPE_F32 float
#define DL_CTYPE_FLAG int
#define DL_SETTINGS_FIELD_(tensor, column, width, field, kind) DL_CTYPE_##kind field;
struct Settings {
  DL_SETTINGS(DL_SETTINGS_FIELD_)
};
#undef DL_SETTINGS_FIELD_

// Everything a kernel may need; passed by value.
struct Args {
  // problem
  int B, H, T, I, N, D, E;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t qs[3], ks[3], vs[3], os[3];
  float* lse;  // natural log
  int64_t ls[3];
  float scale_log2;  // softmax scale * log2(e)
  const float* ent;
  const float* hist;
  float* hist_out;
  const int64_t* step;
  int64_t step_value;
  const int64_t* grid;
  int64_t grid_h, grid_w;
  // attributes (structural)
  int64_t block_offset, blocks_per_step;
  // per-sample settings: device [B, DL_*_WIDTH] arrays; kernels read them through load_settings
  // (common.cuh)
  const int64_t* windows;
  const float* knobs;
  const int64_t* rules;
  float fallback_threshold;
  // workspace
  SampleInfo* info;
  int* tok_list;        // [B, tpad]
  uint32_t* tok_bits;   // [B, T] slots containing token t
  uint32_t* tok_first;  // [B, T] slots whose first token is t
  float* p;             // [B, E, I]
  uint8_t* mask;        // [B, E, I]
  int* rlist;           // [B, I] image row of masked-row index
  int* ridx;            // [B, I] masked-row index of image row (or -1)
  int* ent_list;        // [B, E, I] masked-row indices of mask e
  uint8_t* rowents;     // [B, I] slots whose mask holds masked row r
  int8_t* state;        // [B, I, kMaxE] per masked row and slot: -1 text cut, else alpha exponent
  uint32_t* cut;        // [B, I, cut_words]
  float* lse_cur;       // [B, H, I] log2-domain LSE of masked rows under the current edits
  int* flag_list;       // [B, I + kMaxE]
  int* rowflag;         // [B, I + kMaxE] last pass+1 that flagged the row
  float* p_part;        // [kMaxHG, B, E, I] entity_probs partial sums per head group
  float* split_part;    // [B, kSplitRows, kSplitStride] FALLBACK split-column partials
  float* gbuf;          // [B, g_tiles, 32, 128] rule X: G tiles of pass 1 kept for pass 2
  int g_tiles;          // G tiles kept per sample (0: pass 2 recomputes every tile, the v4 path)
  int row_order;        // compaction order of the masked rows: 0 image order (v4), 1 grouped by entity
  float* xpart;         // [B, xpart_tiles, 32, 128] rule X pass 1 partial G per (tile, head group)
  int xpart_tiles;      // partial tiles per sample (0: pass 1 is not split)
  int x_grid;           // blocks per sample of rule X pass 1 (the merge pass derives the split from it)
  int fixed_gather;     // 1: gathered tiles loaded with fixed per-thread chunk columns (v6)
  int q_rb, k_rb, v_rb; // row strides of q, k, v in bytes (int: checked on the host for fixed_gather)
  int n_hg;             // head groups of entity_probs (<= kMaxHG)
  int cut_words, tpad;
};

// Per-dtype/head-size launchers, explicitly instantiated in attn_*.cu and tile_*.cu.
template <typename Tp, int D> cudaError_t plain_attention_t(const Args& a, cudaStream_t s);
template <typename Tp, int D> cudaError_t edit_attention_t(const Args& a, int mode, int pass, int num_sms, cudaStream_t s);
template <typename Tp, int D> cudaError_t entity_probs_t(const Args& a, cudaStream_t s);
// pass: 1 statistics (split over head groups when a.xpart_tiles > 0), 3 merge of the split
// partials + statistics, 2 cut bits.
template <typename Tp, int D> cudaError_t pair_pass_t(const Args& a, int pair, int pass, int num_sms, cudaStream_t s);

// Kernel launchers (each returns cudaGetLastError()).
cudaError_t launch_plain_attention(const Args& a, int dtype, int num_sms, cudaStream_t s);
// mode: 0 delta, 1 full over all edited rows, 2 full over the rows flagged by DELTA pass `pass`.
// pass: pair index (lse-only) or kMaxPairs (final output).
cudaError_t launch_edit_attention(const Args& a, int dtype, int mode, int pass, int num_sms, cudaStream_t s);
cudaError_t launch_entity_probs(const Args& a, int dtype, cudaStream_t s);
cudaError_t launch_pair_pass(const Args& a, int dtype, int pair, int pass, int num_sms, cudaStream_t s);
cudaError_t launch_prep(const Args& a, cudaStream_t s);
cudaError_t launch_masks(const Args& a, cudaStream_t s);
cudaError_t launch_compact(const Args& a, cudaStream_t s);  // compaction, then the wide state reset

}  // namespace dl
