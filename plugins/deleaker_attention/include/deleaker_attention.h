/* DeLeaker attention: fused CUDA kernels behind a small C ABI.
 *
 * Computes the DeLeakerAttention op, contract v2 (docs/semantics.md; names, settings columns and
 * attribute order: runtime/op_schema.py, checked by tests/test_op_schema_c.py) on fp16 or bf16
 * q, k, v with fp32 statistics: out [B, H, T+I, D] (q's dtype), history_out [B, E, I] float32.
 *
 * Usage: fill a dl_params_t, ask dl_workspace_size() once per shape, give dl_launch() a
 * device workspace of at least that many bytes (no zeroing needed) and a stream. dl_launch
 * enqueues a fixed sequence of kernels: no host synchronisation, no allocation, so it can be
 * captured in a CUDA graph. The per-sample settings (windows, knobs, rules) live on the device
 * (read there); step and grid may live there too or be passed by value.
 *
 * No (T+I) x (T+I) tensor is ever formed. Workspace: O(B*(H*(T+I) + E*I + I*I/8)) bytes plus, per
 * sample, a fixed 4.3 MB (column-split partials of the exact-recompute rows) and the rule-X tile
 * buffers (kept G: min(2 ceil(I/64)^2, 512) x 16 KB; split partials: min(4x that, 1024) x 16 KB,
 * i.e. 8 + 16 MB from I = 1024 on); the I*I/8 term is a bit-set of the image-image cuts over the
 * masked rows.
 */
#ifndef DELEAKER_ATTENTION_H
#define DELEAKER_ATTENTION_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

/* settings columns DL_WINDOWS_* / DL_KNOBS_* / DL_RULES_*, their DL_*_WIDTH, the op's input and
 * attribute lists: generated from runtime/op_schema.py */
#include "deleaker_settings.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DL_ABI_VERSION 5 /* 5: the layout attribute; 4: settings tensors only (no batch-wide scalar fields);
                            3: per-sample settings tensors (op contract v2); 2: implementation switches */
#define DL_MAX_ENTITIES 8 /* entity slots per sample (E <= 8) */

typedef enum { DL_DTYPE_FP16 = 0, DL_DTYPE_BF16 = 1 } dl_dtype_t;

typedef enum {
  DL_EDIT_DELTA = 0, /* edited rows: plain output corrected by the changed columns only,
                        exact full recompute for rows whose kept mass falls under fallback_threshold */
  DL_EDIT_FULL = 1   /* edited rows: full exact recompute over all T+I columns */
} dl_edit_mode_t;

typedef enum {
  DL_OK = 0,
  DL_ERR_INVALID_ARGUMENT = 1,
  DL_ERR_UNSUPPORTED = 2,
  DL_ERR_WORKSPACE_TOO_SMALL = 3,
  DL_ERR_CUDA = 4
} dl_status_t;

typedef struct {
  int abi_version; /* DL_ABI_VERSION */
  int dtype;       /* dl_dtype_t: q, k, v and out */
  int B, H, T, I, D, E; /* N = T + I; D in {64, 128}; 1 <= E <= DL_MAX_ENTITIES */

  /* q, k, v, out: [B, H, N, D] with any batch/head/row strides (elements); D contiguous,
   * rows 16-byte aligned. out may be the same layout as q or not; it must not alias q/k/v. */
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3]; /* batch, head, row */

  const float* entity_tokens; /* [B, E, T] contiguous: > 0 marks token t of slot e */
  const float* history;       /* [B, E, I] contiguous */
  float* history_out;         /* [B, E, I] contiguous (may equal history: updated in place) */

  const int64_t* step; /* device int64 scalar, or NULL: use step_value */
  int64_t step_value;
  const int64_t* grid; /* device int64 [2] (h, w), or NULL: use grid_h, grid_w */
  int64_t grid_h, grid_w;

  /* Natural-log log-sum-exp of the scaled logits per (b, h, row), float32, strides in
   * elements. NULL: kept in the workspace. With plain_done = 1 the caller has already written
   * plain attention to out and its LSE here (e.g. from cuDNN/flash SDPA); otherwise the
   * library's own flash kernel computes both. */
  float* lse;
  int64_t lse_stride[3];
  int plain_done;

  float scale; /* softmax scale; <= 0 means 1/sqrt(D) */

  /* Attributes (structural), in runtime/op_schema.py ATTRIBUTES order. */
  int64_t block_offset;
  int64_t blocks_per_step;
  int64_t layout; /* order of the joint sequence; the kernels take 0 (text_image) only */

  /* Per-sample settings, contiguous device arrays [B, DL_<TENSOR>_WIDTH] (columns: the
   * DL_WINDOWS_* / DL_KNOBS_* / DL_RULES_* enums of deleaker_settings.h), read on the device.
   * Required. */
  const int64_t* windows;
  const float* knobs;
  const int64_t* rules; /* 0/1 */

  /* Implementation knobs (not part of the op's math). */
  int edit_mode;            /* dl_edit_mode_t */
  float fallback_threshold; /* DELTA: kept-mass fraction under which a row is recomputed; <= 0: 0.25 */
  int num_sms;              /* 0: queried from the current device */

  /* Implementation switches (dl_params_init: all 1). Each selects a faster path with the same
   * math; 0 gives back the earlier path (docs/fused-op.md: v5 for the first two, v6 for the rest).
   * Results may differ in the last bits (summation order), never in the formulas. */
  int row_order;    /* masked rows grouped by entity (0: image order, v4) */
  int keep_g;       /* rule X pass 2 reads the G tiles pass 1 kept (0: recompute) */
  int x_split;      /* rule X pass 1 split over head groups, fixed-order merge (0: one block per tile) */
  int fixed_gather; /* gathered tile loads with per-thread fixed chunk columns (0: generic loop) */
} dl_params_t;

/* Fill every field with defaults: pointers NULL (set them, the settings arrays included), 57
 * blocks per step, implementation switches on. */
void dl_params_init(dl_params_t* p);

/* Bytes of device workspace dl_launch needs for these shapes (no pointers are read). */
size_t dl_workspace_size(const dl_params_t* p);

/* Enqueue the op on `stream`. Returns DL_OK or an error code (no kernels are enqueued on an
 * argument error). Thread-safe; no host synchronisation. */
int dl_launch(const dl_params_t* p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

const char* dl_status_string(int status);

/* After DL_ERR_CUDA: which launch failed and the CUDA error string (this thread's last call). */
const char* dl_last_error(void);

/* Byte offsets of the inspectable intermediates inside the workspace (for tests/debugging):
 * info: per-sample dl_sample_info_t; masks: uint8 [B, E, I] (final, smoothed entity masks, valid
 * when intervening); rows: int32 [B, I] image row of each masked-row index (the first n_rows);
 * cut: uint32 [B, I, cut_words] cut bits (row index x column index, both masked-row indices);
 * entity_p: float [B, E, I] p_e of this block (valid when it was needed). */
typedef struct {
  size_t info, masks, rows, cut, entity_p, total;
  int cut_words;
} dl_workspace_layout_t;

typedef struct {
  int64_t tau;
  int32_t need_p, hist_update, intervene, n_active;
  int32_t n_rows; /* masked image rows (union of active masks) */
  int32_t n_tt;   /* text rows edited by rule TT */
  int32_t npairs;
  int32_t n_fallback; /* rows recomputed exactly in the final DELTA pass */
  int32_t error;      /* 1: grid h*w != I (smoothing skipped) */
  int32_t pad_[7];
} dl_sample_info_t;

void dl_workspace_layout(const dl_params_t* p, dl_workspace_layout_t* out);
size_t dl_sample_info_stride(void);

#ifdef __cplusplus
}
#endif
#endif /* DELEAKER_ATTENTION_H */
