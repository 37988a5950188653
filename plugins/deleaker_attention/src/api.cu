// C ABI: parameter defaults, workspace layout, argument checks and the fixed launch sequence.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "internal.h"

namespace dl {

// dtype / head-size dispatch to the explicit instantiations
cudaError_t launch_plain_attention(const Args& a, int dtype, int num_sms, cudaStream_t s) {
  (void)num_sms;
  if (dtype == DL_DTYPE_BF16)
    return a.D == 128 ? plain_attention_t<__nv_bfloat16, 128>(a, s) : plain_attention_t<__nv_bfloat16, 64>(a, s);
  return a.D == 128 ? plain_attention_t<__half, 128>(a, s) : plain_attention_t<__half, 64>(a, s);
}

cudaError_t launch_edit_attention(const Args& a, int dtype, int mode, int pass, int num_sms, cudaStream_t s) {
  if (dtype == DL_DTYPE_BF16)
    return a.D == 128 ? edit_attention_t<__nv_bfloat16, 128>(a, mode, pass, num_sms, s)
                      : edit_attention_t<__nv_bfloat16, 64>(a, mode, pass, num_sms, s);
  return a.D == 128 ? edit_attention_t<__half, 128>(a, mode, pass, num_sms, s)
                    : edit_attention_t<__half, 64>(a, mode, pass, num_sms, s);
}

cudaError_t launch_entity_probs(const Args& a, int dtype, cudaStream_t s) {
  if (dtype == DL_DTYPE_BF16)
    return a.D == 128 ? entity_probs_t<__nv_bfloat16, 128>(a, s) : entity_probs_t<__nv_bfloat16, 64>(a, s);
  return a.D == 128 ? entity_probs_t<__half, 128>(a, s) : entity_probs_t<__half, 64>(a, s);
}

cudaError_t launch_pair_pass(const Args& a, int dtype, int pair, int pass, int num_sms, cudaStream_t s) {
  if (dtype == DL_DTYPE_BF16)
    return a.D == 128 ? pair_pass_t<__nv_bfloat16, 128>(a, pair, pass, num_sms, s)
                      : pair_pass_t<__nv_bfloat16, 64>(a, pair, pass, num_sms, s);
  return a.D == 128 ? pair_pass_t<__half, 128>(a, pair, pass, num_sms, s)
                    : pair_pass_t<__half, 64>(a, pair, pass, num_sms, s);
}

namespace {
constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
}  // namespace

Layout make_layout(int B, int H, int T, int I, int E, bool lse_in_ws) {
  Layout L;
  const size_t b = (size_t)B, n = (size_t)T + (size_t)I;
  L.tpad = (T + kTile - 1) / kTile * kTile;
  L.cut_words = 2 * ((I + 63) / 64);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t o = off;
    off = align_up(off + bytes);
    return o;
  };
  L.info = take(b * sizeof(SampleInfo));
  L.tok_list = take(b * L.tpad * 4);
  L.tok_bits = take(b * T * 4);
  L.tok_firstbits = take(b * T * 4);
  L.p = take(b * E * I * 4);
  L.mask = take(b * E * I);
  L.rlist = take(b * I * 4);
  L.ridx = take(b * I * 4);
  L.ent_list = take(b * E * I * 4);
  L.rowents = take(b * I);
  L.state = take(b * I * kMaxE);
  L.cut = take(b * I * (size_t)L.cut_words * 4);
  L.lse_cur = take(b * H * I * 4);
  L.lse = lse_in_ws ? take(b * H * n * 4) : 0;
  L.flag_list = take(b * (I + kMaxE) * 4);
  L.rowflag = take(b * (I + kMaxE) * 4);
  L.p_part = take((size_t)kMaxHG * b * E * I * 4);
  L.split = take(b * (size_t)kSplitRows * kSplitStride * 4);
  {  // rule X tiles of one pair: 2 * ceil(n1/64) * ceil(n2/64) <= 2 * ceil(I/64)^2, capped
    const size_t it = (size_t)(I + kTile - 1) / kTile;
    const size_t need = 2 * it * it;
    L.g_tiles = (int)(need < (size_t)kMaxGTiles ? need : (size_t)kMaxGTiles);
  }
  L.gbuf = take(b * (size_t)L.g_tiles * kGTileFloats * 4);
  {  // rule X pass 1 partials (v6): room for the split of every pair whose G is kept
    const size_t cap = 4 * (size_t)L.g_tiles;
    L.xpart_tiles = (int)(cap < (size_t)kMaxXPart ? cap : (size_t)kMaxXPart);
  }
  L.xpart = take(b * (size_t)L.xpart_tiles * kGTileFloats * 4);
  L.total = off;
  return L;
}

}  // namespace dl

using namespace dl;

static_assert(sizeof(SampleInfo) % 8 == 0, "SampleInfo must keep its doubles aligned");

extern "C" {

void dl_params_init(dl_params_t* p) {
  memset(p, 0, sizeof(*p));
  p->abi_version = DL_ABI_VERSION;
  p->dtype = DL_DTYPE_BF16;
  p->block_offset = 0;
  p->blocks_per_step = 57;
  p->edit_mode = DL_EDIT_DELTA;
  p->fallback_threshold = 0.25f;
  p->row_order = 1;
  p->keep_g = 1;
  p->x_split = 1;
  p->fixed_gather = 1;
}

size_t dl_workspace_size(const dl_params_t* p) {
  if (!p || p->B < 1 || p->H < 1 || p->T < 1 || p->I < 1 || p->E < 1) return 0;
  return make_layout(p->B, p->H, p->T, p->I, p->E, p->lse == nullptr).total;
}

void dl_workspace_layout(const dl_params_t* p, dl_workspace_layout_t* out) {
  memset(out, 0, sizeof(*out));
  if (!p || p->B < 1 || p->H < 1 || p->T < 1 || p->I < 1 || p->E < 1) return;
  const Layout L = make_layout(p->B, p->H, p->T, p->I, p->E, p->lse == nullptr);
  out->info = L.info;
  out->masks = L.mask;
  out->rows = L.rlist;
  out->cut = L.cut;
  out->entity_p = L.p;
  out->total = L.total;
  out->cut_words = L.cut_words;
}

size_t dl_sample_info_stride(void) { return sizeof(SampleInfo); }

const char* dl_status_string(int s) {
  switch (s) {
    case DL_OK: return "ok";
    case DL_ERR_INVALID_ARGUMENT: return "invalid argument";
    case DL_ERR_UNSUPPORTED: return "unsupported configuration";
    case DL_ERR_WORKSPACE_TOO_SMALL: return "workspace too small";
    case DL_ERR_CUDA: return "CUDA error";
    default: return "unknown status";
  }
}

static thread_local char g_last_error[256] = "";

const char* dl_last_error(void) { return g_last_error; }

static int fail(int code, const char* what) {
  snprintf(g_last_error, sizeof(g_last_error), "%s", what);
  return code;
}

static bool aligned16(const void* ptr) { return ((uintptr_t)ptr & 15u) == 0; }
static bool aligned8(const void* ptr) { return ((uintptr_t)ptr & 7u) == 0; }
static bool strides_ok(const int64_t s[3]) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

int dl_launch(const dl_params_t* p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  g_last_error[0] = '\0';
  if (!p || p->abi_version != DL_ABI_VERSION) return fail(DL_ERR_INVALID_ARGUMENT, "!p || p->abi_version != DL_ABI_VERSION");
  if (p->dtype != DL_DTYPE_FP16 && p->dtype != DL_DTYPE_BF16) return fail(DL_ERR_UNSUPPORTED, "p->dtype != DL_DTYPE_FP16 && p->dtype != DL_DTYPE_BF16");
  if (p->D != 64 && p->D != 128) return fail(DL_ERR_UNSUPPORTED, "p->D != 64 && p->D != 128");
  if (p->E < 1 || p->E > DL_MAX_ENTITIES) return fail(DL_ERR_UNSUPPORTED, "p->E < 1 || p->E > DL_MAX_ENTITIES");
  if (p->B < 1 || p->H < 1 || p->T < 1 || p->I < 2) return fail(DL_ERR_INVALID_ARGUMENT, "p->B < 1 || p->H < 1 || p->T < 1 || p->I < 2");
  if (!p->q || !p->k || !p->v || !p->out || !p->entity_tokens || !p->history || !p->history_out)
    return fail(DL_ERR_INVALID_ARGUMENT, "a tensor pointer is NULL");
  if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out)) return fail(DL_ERR_INVALID_ARGUMENT, "!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out)");
  if (!strides_ok(p->q_stride) || !strides_ok(p->k_stride) || !strides_ok(p->v_stride) || !strides_ok(p->o_stride))
    return fail(DL_ERR_INVALID_ARGUMENT, "q/k/v/out batch, head and row strides must be multiples of 8 elements");
  if (p->plain_done && !p->lse) return fail(DL_ERR_INVALID_ARGUMENT, "p->plain_done && !p->lse");
  if (p->blocks_per_step < 1) return fail(DL_ERR_INVALID_ARGUMENT, "p->blocks_per_step < 1");
  if (p->layout != 0)  // the kernels index the joint sequence as [text ; image]
    return fail(DL_ERR_INVALID_ARGUMENT, "p->layout != 0: the fused kernels take layout 0 (text_image) only; "
                "run other layouts on the reference op or the ONNX function body");
  if (!p->windows || !p->knobs || !p->rules)
    return fail(DL_ERR_INVALID_ARGUMENT, "windows/knobs/rules must be device arrays [B, DL_*_WIDTH]");
  if (!aligned8(p->windows) || !aligned8(p->rules) || ((uintptr_t)p->knobs & 3u) != 0)
    return fail(DL_ERR_INVALID_ARGUMENT, "windows/knobs/rules must be aligned to their element size");
  const Layout L = make_layout(p->B, p->H, p->T, p->I, p->E, p->lse == nullptr);
  if (!workspace || workspace_bytes < L.total) return fail(DL_ERR_WORKSPACE_TOO_SMALL, "workspace too small");

  int num_sms = p->num_sms;
  if (num_sms <= 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return fail(DL_ERR_CUDA, "cannot query the current device");
    }
  }

  Args a;
  memset(&a, 0, sizeof(a));
  a.B = p->B;
  a.H = p->H;
  a.T = p->T;
  a.I = p->I;
  a.N = p->T + p->I;
  a.D = p->D;
  a.E = p->E;
  a.q = p->q;
  a.k = p->k;
  a.v = p->v;
  a.out = p->out;
  for (int i = 0; i < 3; ++i) {
    a.qs[i] = p->q_stride[i];
    a.ks[i] = p->k_stride[i];
    a.vs[i] = p->v_stride[i];
    a.os[i] = p->o_stride[i];
  }
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  if (p->lse) {
    a.lse = p->lse;
    for (int i = 0; i < 3; ++i) a.ls[i] = p->lse_stride[i];
  } else {
    a.lse = reinterpret_cast<float*>(ws + L.lse);
    a.ls[0] = (int64_t)p->H * a.N;
    a.ls[1] = a.N;
    a.ls[2] = 1;
  }
  const float scale = p->scale > 0.f ? p->scale : 1.f / sqrtf((float)p->D);
  a.scale_log2 = scale * kLog2e;
  a.ent = p->entity_tokens;
  a.hist = p->history;
  a.hist_out = p->history_out;
  a.step = p->step;
  a.step_value = p->step_value;
  a.grid = p->grid;
  a.grid_h = p->grid_h;
  a.grid_w = p->grid_w;
  a.block_offset = p->block_offset;
  a.blocks_per_step = p->blocks_per_step;
  a.windows = p->windows;
  a.knobs = p->knobs;
  a.rules = p->rules;
  a.fallback_threshold = p->fallback_threshold > 0.f ? p->fallback_threshold : 0.25f;
  a.info = reinterpret_cast<SampleInfo*>(ws + L.info);
  a.tok_list = reinterpret_cast<int*>(ws + L.tok_list);
  a.tok_bits = reinterpret_cast<uint32_t*>(ws + L.tok_bits);
  a.tok_first = reinterpret_cast<uint32_t*>(ws + L.tok_firstbits);
  a.p = reinterpret_cast<float*>(ws + L.p);
  a.mask = ws + L.mask;
  a.rlist = reinterpret_cast<int*>(ws + L.rlist);
  a.ridx = reinterpret_cast<int*>(ws + L.ridx);
  a.ent_list = reinterpret_cast<int*>(ws + L.ent_list);
  a.rowents = ws + L.rowents;
  a.state = reinterpret_cast<int8_t*>(ws + L.state);
  a.cut = reinterpret_cast<uint32_t*>(ws + L.cut);
  a.lse_cur = reinterpret_cast<float*>(ws + L.lse_cur);
  a.flag_list = reinterpret_cast<int*>(ws + L.flag_list);
  a.rowflag = reinterpret_cast<int*>(ws + L.rowflag);
  a.p_part = reinterpret_cast<float*>(ws + L.p_part);
  a.split_part = reinterpret_cast<float*>(ws + L.split);
  {  // entity_probs: (row tile, head group) blocks filling one wave at two per SM (96 KB smem each)
    const int tiles = (p->I + kTile - 1) / kTile;
    int hg = 2 * num_sms / (tiles * p->B);
    const int hmax = p->H < kMaxHG ? p->H : kMaxHG;
    a.n_hg = hg < 1 ? 1 : (hg > hmax ? hmax : hg);
  }
  a.cut_words = L.cut_words;
  a.tpad = L.tpad;
  // implementation switches (dl_params_t, default on); all 0: the v4 paths
  a.gbuf = reinterpret_cast<float*>(ws + L.gbuf);
  a.g_tiles = p->keep_g ? L.g_tiles : 0;
  a.row_order = p->row_order != 0;
  // x_split needs the kept G (pass 2 reads the merged tiles): without keep_g it is off
  a.xpart = reinterpret_cast<float*>(ws + L.xpart);
  a.xpart_tiles = (p->x_split && p->keep_g) ? L.xpart_tiles : 0;
  a.x_grid = 0;  // set per launch configuration below
  {
    const int64_t rb[3] = {p->q_stride[2] * 2, p->k_stride[2] * 2, p->v_stride[2] * 2};
    bool fits = true;
    for (int i = 0; i < 3; ++i) fits = fits && rb[i] > -2147483647LL && rb[i] < 2147483647LL;
    a.fixed_gather = p->fixed_gather && fits;
    a.q_rb = fits ? (int)rb[0] : 0;
    a.k_rb = fits ? (int)rb[1] : 0;
    a.v_rb = fits ? (int)rb[2] : 0;
  }
  {  // rule X pass 1 grid per sample: 3 blocks per SM when split (64 KB of smem), else 2
    const int tiles = (p->I + kTile - 1) / kTile;
    int n = (a.xpart_tiles > 0 ? 3 : 2) * num_sms / p->B;
    n = n < 1 ? 1 : n;
    const long cap = (long)2 * tiles * tiles * (a.xpart_tiles > 0 ? kMaxXG : 1);
    a.x_grid = (long)n > cap ? (int)cap : n;
  }

  const int dt = p->dtype;
  const int mode = p->edit_mode == DL_EDIT_FULL ? 1 : 0;
#define DL_TRY(x)                                                                     \
  do {                                                                                \
    const cudaError_t dl_err_ = (x);                                                  \
    if (dl_err_ != cudaSuccess) {                                                     \
      snprintf(g_last_error, sizeof(g_last_error), "%s: %s", #x, cudaGetErrorString(dl_err_)); \
      (void)cudaGetLastError(); /* leave no stale error for the caller's next check */ \
      return DL_ERR_CUDA;                                                             \
    }                                                                                 \
  } while (0)
  if (!p->plain_done) DL_TRY(launch_plain_attention(a, dt, num_sms, stream));
  DL_TRY(launch_prep(a, stream));
  DL_TRY(launch_entity_probs(a, dt, stream));
  DL_TRY(launch_masks(a, stream));
  if (p->E >= 2) {
    DL_TRY(launch_compact(a, stream));
    const int npmax = p->E * (p->E - 1) / 2;
    // rule X passes: always launched (the rules are per sample); they skip on the device per sample
    for (int pr = 0; pr < npmax; ++pr) {
      DL_TRY(launch_pair_pass(a, dt, pr, 1, num_sms, stream));
      if (a.xpart_tiles > 0) DL_TRY(launch_pair_pass(a, dt, pr, 3, num_sms, stream));
      DL_TRY(launch_pair_pass(a, dt, pr, 2, num_sms, stream));
      if (pr < npmax - 1) {  // the next pair's G needs the LSE under this pair's edits
        if (mode == 0) {
          DL_TRY(launch_edit_attention(a, dt, 0, pr, num_sms, stream));
          DL_TRY(launch_edit_attention(a, dt, 2, pr, num_sms, stream));
        } else {
          DL_TRY(launch_edit_attention(a, dt, 1, pr, num_sms, stream));
        }
      }
    }
    if (mode == 0) {
      DL_TRY(launch_edit_attention(a, dt, 0, kMaxPairs, num_sms, stream));
      DL_TRY(launch_edit_attention(a, dt, 2, kMaxPairs, num_sms, stream));
    } else {
      DL_TRY(launch_edit_attention(a, dt, 1, kMaxPairs, num_sms, stream));
    }
  }
#undef DL_TRY
  return DL_OK;
}

}  // extern "C"
