"""A pipeline's tokenizer as the runtime's TextTokenizer (the families' entity location uses it)."""

from __future__ import annotations

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
