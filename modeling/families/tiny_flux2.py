"""A tiny random-weight FLUX.2 checkpoint in diffusers' folder layout (Flux2Pipeline).

Same model classes as FLUX.2 [dev]: Flux2Transformer2DModel (double and single blocks, 4-axis
RoPE, guidance embeds), a Mistral3ForConditionalGeneration text encoder (tiny, 30 layers: the
pipeline stacks hidden states 10, 20 and 30), AutoencoderKLFlux2 (32 latent channels, batch-norm
statistics), FlowMatchEulerDiscreteScheduler with dynamic shifting. The tokenizer is a byte-level
BPE trained here with Mistral's control tokens and a chat template of the same token structure as
Mistral Small 3.1's ([SYSTEM_PROMPT] ... [/SYSTEM_PROMPT][INST] prompt [/INST], left padding).
One difference from the real folder: FLUX.2 [dev] ships a PixtralProcessor as `tokenizer`, which
needs torchvision; the pipeline only calls its apply_chat_template, which this tokenizer has.
"""

from __future__ import annotations

from pathlib import Path

from .. import tiny_model as tm

SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
            "[IMG_BREAK]", "[IMG_END]", "<pad>")
# Mistral's (Tekken) pre-tokenizer split, before the byte-level mapping
SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
         r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
         r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
                 "[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
                 "{%- elif message['role'] == 'user' %}[INST]{{ message['content'][0]['text'] }}[/INST]"
                 "{%- endif %}{%- endfor %}")
TEXT_WIDTH = 16  # the transformer's joint_attention_dim is 3x this (three stacked layers)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}


def train_tokenizer(corpus: list[str], system: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus + [system] * 20, trainers.BpeTrainer(
        vocab_size=1500, show_progress=False, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def build(out: Path, seed: int = 0) -> None:
    import diffusers
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

    tok = train_tokenizer(tm.tiny_corpus(tm.PRESETS["tiny"].corpus_sentences, seed), SYSTEM_MESSAGE)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", padding_side="left", model_max_length=131072)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out / "tokenizer")
    ids = {t: tok.token_to_id(t) for t in SPECIALS}

    torch.manual_seed(seed)
    Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=16,
                            axes_dims_rope=(4, 4, 4, 4)).save_pretrained(out / "transformer")
    torch.manual_seed(seed + 1)
    Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=tok.get_vocab_size(), hidden_size=TEXT_WIDTH,
                         intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=30, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=16, image_size=64),
        image_token_index=ids["[IMG]"], spatial_merge_size=2, projector_hidden_act="gelu",
    )).save_pretrained(out / "text_encoder")
    torch.manual_seed(seed + 2)
    AutoencoderKLFlux2(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=32,
                       norm_num_groups=8, sample_size=64).save_pretrained(out / "vae")
    tm.write_pipeline_files(out, SCHEDULER, {
        "_class_name": "Flux2Pipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    })
