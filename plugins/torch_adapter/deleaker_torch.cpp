// PyTorch op adapter over the DeLeaker C ABI (plugins/deleaker_attention/include).
//
// The CUDA kernel of the ONE DeLeaker op, torch.ops.deleaker.attention (op contract v2; schema
// defined in Python by modeling/reference_op.py, whose CPU kernel is the reference): a call with
// CUDA tensors runs the fused kernels (eager, CUDA graphs, torch.compile, AOTInductor alike).
// modeling/cuda_op.py load() imports the reference op before loading this library.
//
// Also registers, in namespace deleaker_cuda (tests and benchmarks):
//   attention_ex(<op inputs and attributes>, int plain_backend, int edit_mode, int impl=-1) -> (out, history_out)
//       plain_backend: 0 auto (cuDNN, else flash, else own), 1 own kernel, 2 flash SDPA,
//       3 cuDNN SDPA, 4 memory-efficient SDPA; edit_mode: 0 delta (+exact fallback), 1 full;
//       impl: implementation switches of dl_params_t as bits (-1: library defaults, all on):
//       1 row_order, 2 keep_g, 4 x_split, 8 fixed_gather.
//   attention_debug(<same>) -> (out, history_out, workspace); outputs are NaN-poisoned first (out
//       only with the own plain pass) so unwritten elements show
//   workspace_layout(B, H, T, I, D, E, lse_in_ws) -> int[] offsets of the inspectable buffers.
// No host synchronisation: step, grid and the settings tensors (windows, knobs, rules) on the
// device are read there; step and grid on the CPU are read here, CPU settings tensors are copied
// to the device (pass CUDA ones inside a CUDA graph). Workspace comes from the caching allocator,
// so CUDA graphs capture it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

#include "deleaker_attention.h"

// The op's inputs and attributes, DL_OP_TENSORS / DL_OP_ATTRS (deleaker_settings.h, generated from
// runtime/op_schema.py INPUTS / ATTRIBUTES): every parameter list and schema below expands them.

#define DL_DROP_FIRST_(first, ...) __VA_ARGS__
#define DL_DROP_FIRST(...) DL_DROP_FIRST_(__VA_ARGS__)
#define DL_TENSOR_PARAM_(n) , const at::Tensor& n
#define DL_ATTR_PARAM_(n) , int64_t n
#define DL_NAME_(n) , n
#define DL_TENSOR_SCHEMA_(n) "Tensor " #n ", "
#define DL_ATTR_SCHEMA_(n) "int " #n ", "
// C++ parameters "const at::Tensor& q, ..., int64_t blocks_per_step" and the matching arguments
#define DL_OP_PARAMS DL_DROP_FIRST(DL_OP_TENSORS(DL_TENSOR_PARAM_) DL_OP_ATTRS(DL_ATTR_PARAM_))
#define DL_OP_ARGS DL_DROP_FIRST(DL_OP_TENSORS(DL_NAME_) DL_OP_ATTRS(DL_NAME_))
// schema text "Tensor q, ..., int blocks_per_step, " (always followed by the extra arguments)
#define DL_OP_SCHEMA DL_OP_TENSORS(DL_TENSOR_SCHEMA_) DL_OP_ATTRS(DL_ATTR_SCHEMA_)

namespace {

enum Plain { kAuto = 0, kOwn = 1, kFlash = 2, kCudnn = 3, kEfficient = 4 };

// dl_params_t with library defaults and the problem's shape (both ops and the layout query).
dl_params_t shaped_params(int64_t B, int64_t H, int64_t T, int64_t I, int64_t D, int64_t E) {
  dl_params_t p;
  dl_params_init(&p);
  p.B = (int)B;
  p.H = (int)H;
  p.T = (int)T;
  p.I = (int)I;
  p.D = (int)D;
  p.E = (int)E;
  return p;
}

int env_plain_default() {
  const char* s = std::getenv("DELEAKER_PLAIN");
  if (!s) return kAuto;
  const std::string v(s);
  if (v == "own") return kOwn;
  if (v == "flash") return kFlash;
  if (v == "cudnn") return kCudnn;
  if (v == "efficient") return kEfficient;
  return kAuto;
}

// Plain attention + natural-log LSE from torch's SDPA kernels; false if the backend refused.
bool sdpa_plain(int backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                at::Tensor& out, at::Tensor& lse) {
  try {
    if (backend == kCudnn) {
      auto r = at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, true, 0.0, false, false, scale);
      out = std::get<0>(r);
      lse = std::get<1>(r);
    } else if (backend == kFlash) {
      auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, false, scale);
      out = std::get<0>(r);
      lse = std::get<1>(r);
    } else if (backend == kEfficient) {
      auto r = at::_scaled_dot_product_efficient_attention(q, k, v, std::nullopt, true, 0.0, false, scale);
      out = std::get<0>(r);
      lse = std::get<1>(r);
    } else {
      return false;
    }
  } catch (const c10::Error&) {
    return false;
  }
  return out.defined() && lse.defined() && lse.scalar_type() == at::kFloat && lse.dim() >= 3 &&
         out.stride(3) == 1;
}

// One per-sample settings tensor [B, width] as the library reads it: contiguous, on q's device,
// in the library's dtype (a CUDA tensor of that dtype is used as is, read on the device).
at::Tensor settings_tensor(const at::Tensor& t, const char* name, int64_t B, int64_t width, at::ScalarType dtype,
                           const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == width, "deleaker.attention: ", name, " must be [B, ",
              width, "] = [", B, ", ", width, "], got ", t.sizes());
  TORCH_CHECK(!t.is_cuda() || t.device() == device, "deleaker.attention: ", name, " is on ", t.device(),
              ", q on ", device);
  const bool integral = at::isIntegralType(t.scalar_type(), /*includeBool=*/true);
  TORCH_CHECK(dtype == at::kFloat ? (integral || at::isFloatingType(t.scalar_type())) : integral,
              "deleaker.attention: ", name, " must be ", dtype == at::kFloat ? "float32" : "int64", ", got ",
              t.scalar_type());
  return t.to(device, dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run(DL_OP_PARAMS, int64_t plain_backend, int64_t edit_mode,
                                                   int64_t impl, bool poison = false) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "deleaker.attention (CUDA): q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "deleaker.attention: q, k, v must share one [B, H, T+I, D] shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "deleaker.attention: q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "deleaker.attention: the fused CUDA kernels take float16 or bfloat16 q, k, v (got ", q.scalar_type(),
              "); for other dtypes run the reference op on CPU tensors");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "deleaker.attention: the fused CUDA kernels take head size 64 or 128, got ", D);
  TORCH_CHECK(entity_tokens.dim() == 3 && entity_tokens.size(0) == B,
              "deleaker.attention: entity_tokens must be [B, E, T]");
  const int64_t E = entity_tokens.size(1), T = entity_tokens.size(2), I = N - T;
  TORCH_CHECK(E >= 1 && E <= DL_MAX_ENTITIES, "deleaker.attention: 1 <= E <= ", DL_MAX_ENTITIES, ", got ", E);
  TORCH_CHECK(I >= 2, "deleaker.attention: text length T=", T, " leaves too few image tokens in ", N);
  TORCH_CHECK(history.dim() == 3 && history.size(0) == B && history.size(1) == E && history.size(2) == I,
              "deleaker.attention: history must be [B, E, I] = [", B, ", ", E, ", ", I, "]");
  TORCH_CHECK(blocks_per_step >= 1, "deleaker.attention: blocks_per_step must be >= 1, got ", blocks_per_step);
  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream(q.device().index());

  auto contig_rows = [](const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); };
  const at::Tensor qq = contig_rows(q), kk = contig_rows(k), vv = contig_rows(v);
  const at::Tensor ent = entity_tokens.to(q.device(), at::kFloat).contiguous();
  const at::Tensor hist = history.to(q.device(), at::kFloat).contiguous();
  at::Tensor hist_out = at::empty_like(hist);
  const at::Tensor win = settings_tensor(windows, "windows", B, DL_WINDOWS_WIDTH, at::kLong, q.device());
  const at::Tensor kno = settings_tensor(knobs, "knobs", B, DL_KNOBS_WIDTH, at::kFloat, q.device());
  const at::Tensor rul = settings_tensor(rules, "rules", B, DL_RULES_WIDTH, at::kLong, q.device());

  dl_params_t p = shaped_params(B, H, T, I, D, E);
  p.dtype = q.scalar_type() == at::kBFloat16 ? DL_DTYPE_BF16 : DL_DTYPE_FP16;
  p.scale = (float)(1.0 / std::sqrt((double)D));

  at::Tensor step_dev, grid_dev;
  TORCH_CHECK(step.numel() == 1, "deleaker.attention: step must be a scalar");
  if (step.is_cuda()) {
    step_dev = step.to(at::kLong).contiguous();
    p.step = step_dev.data_ptr<int64_t>();
  } else {
    p.step_value = step.item<int64_t>();
  }
  TORCH_CHECK(grid.numel() == 2, "deleaker.attention: grid must hold (h, w)");
  if (grid.is_cuda()) {
    grid_dev = grid.to(at::kLong).contiguous();
    p.grid = grid_dev.data_ptr<int64_t>();
  } else {
    const at::Tensor g = grid.to(at::kLong).contiguous();
    p.grid_h = g.data_ptr<int64_t>()[0];
    p.grid_w = g.data_ptr<int64_t>()[1];
    TORCH_CHECK(p.grid_h * p.grid_w == I, "deleaker.attention: grid ", p.grid_h, "x", p.grid_w,
                " does not match the ", I, " image tokens");
  }

  // ---- plain pass ----
  int backend = plain_backend == kAuto ? env_plain_default() : (int)plain_backend;
  at::Tensor out, lse;
  bool done = false;
  if (backend == kAuto) {
    done = sdpa_plain(kCudnn, qq, kk, vv, p.scale, out, lse) || sdpa_plain(kFlash, qq, kk, vv, p.scale, out, lse);
  } else if (backend != kOwn) {
    done = sdpa_plain(backend, qq, kk, vv, p.scale, out, lse);
    TORCH_CHECK(done, "deleaker.attention: SDPA backend ", backend, " refused these inputs");
  }
  if (done) {
    TORCH_CHECK(lse.size(0) == B && lse.size(1) == H && lse.size(2) >= N,
                "deleaker.attention: unexpected LSE shape from SDPA: ", lse.sizes());
    p.plain_done = 1;
    p.lse = lse.data_ptr<float>();
    p.lse_stride[0] = lse.stride(0);
    p.lse_stride[1] = lse.stride(1);
    p.lse_stride[2] = lse.stride(2);
  } else {
    out = at::empty_like(qq);  // keeps q's memory layout (e.g. [B, N, H, D] under a transpose)
    if (out.stride(3) != 1) out = at::empty(qq.sizes(), qq.options());
    if (poison) out.fill_(std::nanf(""));  // debug: every element must be written by the kernels
  }
  if (poison) hist_out.fill_(std::nanf(""));
  p.q = qq.data_ptr();
  p.k = kk.data_ptr();
  p.v = vv.data_ptr();
  p.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = qq.stride(i);
    p.k_stride[i] = kk.stride(i);
    p.v_stride[i] = vv.stride(i);
    p.o_stride[i] = out.stride(i);
  }
  p.entity_tokens = ent.data_ptr<float>();
  p.history = hist.data_ptr<float>();
  p.history_out = hist_out.data_ptr<float>();

  p.block_offset = block_offset;
  p.blocks_per_step = blocks_per_step;
  p.layout = layout;
  p.windows = win.data_ptr<int64_t>();
  p.knobs = kno.data_ptr<float>();
  p.rules = rul.data_ptr<int64_t>();
  p.edit_mode = edit_mode == 1 ? DL_EDIT_FULL : DL_EDIT_DELTA;
  if (impl >= 0) {  // explicit switches; -1 keeps dl_params_init's defaults
    p.row_order = (int)(impl & 1);
    p.keep_g = (int)((impl >> 1) & 1);
    p.x_split = (int)((impl >> 2) & 1);
    p.fixed_gather = (int)((impl >> 3) & 1);
  }

  const size_t ws_bytes = dl_workspace_size(&p);
  at::Tensor ws = at::empty({(int64_t)ws_bytes}, q.options().dtype(at::kByte));
  const int st = dl_launch(&p, ws.data_ptr(), ws_bytes, stream.stream());
  TORCH_CHECK(st == DL_OK, "deleaker.attention: dl_launch failed: ", dl_status_string(st), " ", dl_last_error());
  return {out, hist_out, ws};
}

// deleaker::attention, CUDA: plain pass chosen automatically, default edit mode and switches.
std::tuple<at::Tensor, at::Tensor> attention(DL_OP_PARAMS) {
  auto r = run(DL_OP_ARGS, kAuto, 0, -1);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> attention_ex(DL_OP_PARAMS, int64_t plain_backend, int64_t edit_mode,
                                                int64_t impl) {
  auto r = run(DL_OP_ARGS, plain_backend, edit_mode, impl);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_debug(DL_OP_PARAMS, int64_t plain_backend,
                                                               int64_t edit_mode, int64_t impl) {
  return run(DL_OP_ARGS, plain_backend, edit_mode, impl, /*poison=*/true);
}

std::vector<int64_t> workspace_layout(int64_t B, int64_t H, int64_t T, int64_t I, int64_t D, int64_t E,
                                      int64_t lse_in_ws) {
  dl_params_t p = shaped_params(B, H, T, I, D, E);
  static float dummy;
  p.lse = lse_in_ws ? nullptr : &dummy;
  dl_workspace_layout_t L;
  dl_workspace_layout(&p, &L);
  return {(int64_t)L.info,  (int64_t)L.masks, (int64_t)L.rows,      (int64_t)L.cut,
          (int64_t)L.entity_p, (int64_t)L.total, (int64_t)L.cut_words, (int64_t)dl_sample_info_stride()};
}

}  // namespace

// The schema of deleaker::attention is the Python custom op's (modeling/reference_op.py); this only
// adds the CUDA kernel (its int attributes match the schema's SymInt ones).
TORCH_LIBRARY_IMPL(deleaker, CUDA, m) { m.impl("attention", &attention); }

TORCH_LIBRARY(deleaker_cuda, m) {
  m.def("attention_ex(" DL_OP_SCHEMA "int plain_backend, int edit_mode, int impl=-1) -> (Tensor, Tensor)");
  m.def("attention_debug(" DL_OP_SCHEMA "int plain_backend, int edit_mode, int impl=-1) -> (Tensor, Tensor, Tensor)");
  m.def("workspace_layout(int B, int H, int T, int I, int D, int E, int lse_in_ws) -> int[]", &workspace_layout);
}

TORCH_LIBRARY_IMPL(deleaker_cuda, CUDA, m) {
  m.impl("attention_ex", &attention_ex);
  m.impl("attention_debug", &attention_debug);
}
