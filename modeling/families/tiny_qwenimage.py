"""A tiny random-weight Qwen-Image checkpoint in diffusers' folder layout (QwenImagePipeline).

Same classes and layout as Qwen-Image: QwenImageTransformer2DModel, a Qwen2_5_VLForConditionalGeneration
text encoder (tiny language and vision towers; the pipeline reads the language model's last
hidden states) with a byte-level BPE tokenizer trained here in Qwen2's pre-tokenization, the
3D AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler with Qwen-Image's dynamic shifting.
The tokenizer is trained on the tiny corpus plus the pipeline's prompt template, so the template's
system prefix is 34 tokens, as with the real tokenizer: the pipeline's drop of its first 34
tokens then removes exactly the system prefix, as it does on Qwen-Image.
"""

from __future__ import annotations

from pathlib import Path

from .. import tiny_model as tm

TEMPLATE_START_IDX = 34  # QwenImagePipeline.prompt_template_encode_start_idx
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-VL), before the byte-level mapping.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT_WIDTH = 32  # = the transformer's joint_attention_dim
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
             "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}


def train_tokenizer(corpus: list[str], template: str, vocab_size: int = 1500):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    prefix = template.split("{}")[0]
    tok.train_from_iterator(corpus + [template.format(s) for s in corpus[:50]] + [prefix] * 200, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def build(out: Path, seed: int = 0) -> None:
    import diffusers
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    template = _template()
    p = tm.PRESETS["tiny"]
    tok = train_tokenizer(tm.tiny_corpus(p.corpus_sentences, seed), template)
    prefix_len = len(tok.encode(template.split("{}")[0]).ids)
    if prefix_len != TEMPLATE_START_IDX:
        raise RuntimeError(f"the tiny Qwen tokenizer splits the template's system prefix into {prefix_len} tokens, "
                           f"not {TEMPLATE_START_IDX}")
    (out / "tokenizer").mkdir(parents=True)
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    tm._write_json(out / "tokenizer" / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False})
    ids = {t: tok.token_to_id(t) for t in SPECIALS}

    torch.manual_seed(seed)
    QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                                axes_dims_rope=(4, 6, 6)).save_pretrained(out / "transformer")
    torch.manual_seed(seed + 1)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=2048,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=TEXT_WIDTH, num_heads=2, intermediate_size=32,
                           fullatt_block_indexes=[0]),
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )).save_pretrained(out / "text_encoder")
    torch.manual_seed(seed + 2)
    AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).save_pretrained(out / "vae")
    tm.write_pipeline_files(out, SCHEDULER, {
        "_class_name": "QwenImagePipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
    })


def _template() -> str:
    """QwenImagePipeline's prompt template (its __init__ sets it; a pipeline with no components is enough)."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                             transformer=None).prompt_template_encode
