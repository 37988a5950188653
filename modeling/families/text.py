"""A pipeline's text side as DeLeaker reads it, for FLUX.1's drop-in and the families' alike: its
tokenizer as the runtime's TextTokenizer, and the prompts of each encode_prompt call."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from deleaker.runtime import tokens as tok


def text_tokenizer(hf_tokenizer, what: str, error) -> tok.TextTokenizer:
    """A pipeline's (fast) tokenizer as the runtime's TextTokenizer, without padding/truncation."""
    from tokenizers import Tokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise error(f"DeLeaker locates entities with a fast tokenizer; {what} is {type(hf_tokenizer).__name__} "
                    f"(load the pipeline with its tokenizer.json, use_fast=True)")
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return tok.TextTokenizer(None, copy, int(hf_tokenizer.pad_token_id), str(hf_tokenizer.pad_token),
                             hf_tokenizer.model_max_length)


@dataclass
class Encoded:
    """One encode_prompt call: the prompt texts its encoders saw (None: prompt_embeds were given),
    images per prompt, and its first output (the prompt embeddings)."""

    texts: object
    per_prompt: int
    embeds: torch.Tensor


def record_encode_prompt(pipe, texts_of: Callable[[dict], object], pending: list) -> None:
    """Make pipe.encode_prompt an instance attribute wrapping the pipeline's own method: each call
    appends its Encoded to `pending` (texts_of: the call's bound arguments -> its texts). Undo
    with vars(pipe).pop("encode_prompt")."""
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)

    @functools.wraps(encode)
    def encode_prompt(*args, **kwargs):
        out = encode(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        texts = None if a.get("prompt_embeds") is not None else texts_of(a)
        pending.append(Encoded(texts, int(a.get("num_images_per_prompt") or 1), out[0]))
        return out

    pipe.encode_prompt = encode_prompt
