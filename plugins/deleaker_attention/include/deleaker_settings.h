/* Generated from runtime/op_schema.py: do not edit. Regenerate with `python -m deleaker.runtime.op_schema_c`. */
#ifndef DELEAKER_SETTINGS_H
#define DELEAKER_SETTINGS_H

/* Columns of the per-sample settings inputs (DL_<TENSOR>_<SETTING>); DL_<TENSOR>_WIDTH: columns per sample. */
enum {
  DL_WINDOWS_START_AGGREGATING_FROM = 0, /* a0: first tau of the mask history */
  DL_WINDOWS_STOP_AGGREGATING_AT = 1, /* a1: history frozen from here on */
  DL_WINDOWS_START_INTERVENTION_FROM = 2, /* i0: first tau that is edited */
  DL_WINDOWS_STOP_INTERVENTION_AT = 3, /* i1: last tau that is edited (inclusive) */
  DL_WINDOWS_WIDTH = 4
};
enum {
  DL_KNOBS_STD_MUL_TEXT = 0, /* beta1: entity-mask threshold mean + beta1 * std */
  DL_KNOBS_STD_MUL_IMAGE_IMAGE = 1, /* beta2: image-image cut threshold */
  DL_KNOBS_K_STRENGTH = 2, /* alpha: multiplier on own-entity image->text logits */
  DL_KNOBS_WIDTH = 3
};
enum {
  DL_RULES_USE_HISTORY = 0, /* masks from the running mean */
  DL_RULES_DO_SMOOTHING = 1, /* 3x3 open + close of the masks */
  DL_RULES_DO_IMAGE_TEXT_WEAKENING = 2, /* rule W */
  DL_RULES_DO_IMAGE_TEXT_STRENGTHENING = 3, /* rule S */
  DL_RULES_DO_IMAGE_IMAGE = 4, /* rule X */
  DL_RULES_DO_TEXT_TEXT_WEAKENING = 5, /* rule TT */
  DL_RULES_WIDTH = 6
};

/* The op's inputs and attributes, in order (the torch adapter's parameter lists). */
#define DL_OP_TENSORS(X) \
  X(q) \
  X(k) \
  X(v) \
  X(entity_tokens) \
  X(history) \
  X(step) \
  X(grid) \
  X(windows) \
  X(knobs) \
  X(rules)
#define DL_OP_ATTRS(X) \
  X(block_offset) \
  X(blocks_per_step) \
  X(layout)

/* Every setting as X(tensor, column, width, kernel field, kind): kind I64 (int64 window), F32
 * (float knob) or FLAG (0/1 rule); the kernels' Settings struct and loader expand it. */
#define DL_SETTINGS(X) \
  X(windows, DL_WINDOWS_START_AGGREGATING_FROM, DL_WINDOWS_WIDTH, a0, I64) \
  X(windows, DL_WINDOWS_STOP_AGGREGATING_AT, DL_WINDOWS_WIDTH, a1, I64) \
  X(windows, DL_WINDOWS_START_INTERVENTION_FROM, DL_WINDOWS_WIDTH, i0, I64) \
  X(windows, DL_WINDOWS_STOP_INTERVENTION_AT, DL_WINDOWS_WIDTH, i1, I64) \
  X(knobs, DL_KNOBS_STD_MUL_TEXT, DL_KNOBS_WIDTH, beta1, F32) \
  X(knobs, DL_KNOBS_STD_MUL_IMAGE_IMAGE, DL_KNOBS_WIDTH, beta2, F32) \
  X(knobs, DL_KNOBS_K_STRENGTH, DL_KNOBS_WIDTH, alpha, F32) \
  X(rules, DL_RULES_USE_HISTORY, DL_RULES_WIDTH, use_history, FLAG) \
  X(rules, DL_RULES_DO_SMOOTHING, DL_RULES_WIDTH, do_smoothing, FLAG) \
  X(rules, DL_RULES_DO_IMAGE_TEXT_WEAKENING, DL_RULES_WIDTH, do_w, FLAG) \
  X(rules, DL_RULES_DO_IMAGE_TEXT_STRENGTHENING, DL_RULES_WIDTH, do_s, FLAG) \
  X(rules, DL_RULES_DO_IMAGE_IMAGE, DL_RULES_WIDTH, do_x, FLAG) \
  X(rules, DL_RULES_DO_TEXT_TEXT_WEAKENING, DL_RULES_WIDTH, do_tt, FLAG)

#endif /* DELEAKER_SETTINGS_H */
