/* Generated from runtime/op_schema.py: do not edit. Regenerate with `python -m deleaker.runtime.op_schema_c`. */
#ifndef DELEAKER_TRT_FIELDS_H
#define DELEAKER_TRT_FIELDS_H

#define DL_TRT_PLUGIN_NAME "DeLeakerAttention"
#define DL_TRT_PLUGIN_NAMESPACE "deleaker"
#define DL_TRT_PLUGIN_VERSION "2"
#define DL_TRT_OP_VERSION 2

/* dtype class of each input/output: q's type (fp16 or bf16), float32, int64 */
enum { DL_KIND_ATTN = 0, DL_KIND_F32 = 1, DL_KIND_I64 = 2 };

/* inputs, in op order (the settings inputs' widths: deleaker_settings.h) */
enum {
  DL_IN_Q = 0,
  DL_IN_K = 1,
  DL_IN_V = 2,
  DL_IN_ENTITY_TOKENS = 3,
  DL_IN_HISTORY = 4,
  DL_IN_STEP = 5,
  DL_IN_GRID = 6,
  DL_IN_WINDOWS = 7,
  DL_IN_KNOBS = 8,
  DL_IN_RULES = 9,
  DL_NUM_INPUTS = 10
};
static const char* const kDlInputNames[] = {"q", "k", "v", "entity_tokens", "history", "step", "grid", "windows", "knobs", "rules"};
static const int kDlInputKinds[DL_NUM_INPUTS] = {DL_KIND_ATTN, DL_KIND_ATTN, DL_KIND_ATTN, DL_KIND_F32, DL_KIND_F32, DL_KIND_I64, DL_KIND_I64, DL_KIND_I64, DL_KIND_F32, DL_KIND_I64};
static const int kDlInputRanks[DL_NUM_INPUTS] = {4, 4, 4, 3, 3, 0, 1, 2, 2, 2};

/* outputs, in op order */
enum {
  DL_OUT_OUT = 0,
  DL_OUT_HISTORY_OUT = 1,
  DL_NUM_OUTPUTS = 2
};
static const char* const kDlOutputNames[] = {"out", "history_out"};
static const int kDlOutputKinds[DL_NUM_OUTPUTS] = {DL_KIND_ATTN, DL_KIND_F32};
static const int kDlOutputRanks[DL_NUM_OUTPUTS] = {4, 3};

/* attributes = PluginFields (int64, one value each), in op order */
enum {
  DL_ATTR_BLOCK_OFFSET = 0,
  DL_ATTR_BLOCKS_PER_STEP = 1,
  DL_ATTR_LAYOUT = 2,
  DL_NUM_ATTRS = 3
};
static const char* const kDlAttrNames[] = {"block_offset", "blocks_per_step", "layout"};

#endif /* DELEAKER_TRT_FIELDS_H */
