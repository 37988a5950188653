"""A tiny random-weight SD3 checkpoint in diffusers' folder layout (StableDiffusion3Pipeline).

Same classes and layout as SD3.5: SD3Transformer2DModel, two CLIPTextModelWithProjection
encoders (CLIP-L, CLIP-G) with CLIP tokenizers, a T5EncoderModel with a T5 tokenizer, a
16-channel AutoencoderKL with SD3's latent scaling/shift, FlowMatchEulerDiscreteScheduler with
shift 3. The tokenizers are trained here on the tiny corpus exactly as modeling/tiny_model.py
trains FLUX.1's. Widths: each CLIP 16 (concatenated: 32 = the T5 width, so SD3's padding of
the CLIP part is a no-op, as with the real 768 + 1280 = 2048 < 4096 it is a real pad).
"""

from __future__ import annotations

from pathlib import Path

from .. import tiny_model as tm

SD3_VAE_SCALING_FACTOR = 1.5305  # SD3.5's vae/config.json
SD3_VAE_SHIFT_FACTOR = 0.0609
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
CLIP_WIDTH, T5_WIDTH = 16, 32
NUM_LAYERS = 2  # joint blocks: blocks per step


def build(out: Path, seed: int = 0) -> None:
    """Write the checkpoint into the (empty) folder `out`."""
    import diffusers
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    p = tm.PRESETS["tiny"]
    corpus = tm.tiny_corpus(p.corpus_sentences, seed)
    clip_tok, clip_vocab, clip_merges = tm.train_clip_tokenizer(corpus, p.clip_vocab_size)
    t5_tok = tm.train_t5_tokenizer(corpus, p.t5_vocab_size)
    tm.save_clip_tokenizer(clip_tok, clip_vocab, clip_merges, out / "tokenizer")
    tm.save_clip_tokenizer(clip_tok, clip_vocab, clip_merges, out / "tokenizer_2")
    tm.save_t5_tokenizer(t5_tok, out / "tokenizer_3")

    torch.manual_seed(seed)
    SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=NUM_LAYERS, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, out_channels=16, pos_embed_max_size=32, qk_norm="rms_norm",
    ).save_pretrained(out / "transformer")
    for i, folder in enumerate(("text_encoder", "text_encoder_2")):
        torch.manual_seed(seed + 1 + i)
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_vocab), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
            projection_dim=CLIP_WIDTH, num_hidden_layers=p.clip_layers, num_attention_heads=p.clip_heads,
            max_position_embeddings=tm.CLIP_MAX_LENGTH, hidden_act="quick_gelu", bos_token_id=clip_vocab[tm.CLIP_BOS],
            eos_token_id=clip_vocab[tm.CLIP_EOS], pad_token_id=clip_vocab[tm.CLIP_EOS],
        )).save_pretrained(out / folder)
    torch.manual_seed(seed + 3)
    T5EncoderModel(T5Config(
        vocab_size=t5_tok.get_vocab_size(), d_model=T5_WIDTH, d_kv=T5_WIDTH // 2, d_ff=2 * T5_WIDTH,
        num_layers=p.t5_layers, num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=True, use_cache=False,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).save_pretrained(out / "text_encoder_3")
    torch.manual_seed(seed + 4)
    tm.tiny_autoencoder_kl(p, SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR).save_pretrained(out / "vae")
    tm.write_pipeline_files(out, SCHEDULER, {  # SD3.5's model_index.json, no IP-adapter image encoder
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
