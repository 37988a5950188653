"""Open a diffusers-format FLUX checkpoint folder and load its components (local files only).

Works the same for the tiny model (tiny_model.py) and real FLUX.1-dev / FLUX.1-schnell
snapshots on disk. `open_checkpoint` only validates and reads configs (no torch import);
`FluxCheckpoint.load_*` and `load_checkpoint` build the torch modules. Every problem is a
`CheckpointError` with a one-line message naming the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deleaker.runtime.scheduler import FlowMatchEuler, SchedulerError
from deleaker.runtime.tokens import CLIP_MAX_LENGTH, T5_MAX_SEQUENCE_LENGTH

TRANSFORMER_CLASS = "FluxTransformer2DModel"
# model_index.json entry -> the folder must hold this file (weights are checked separately).
_REQUIRED = {
    "transformer": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": None,
    "tokenizer_2": None,
}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CheckpointError(ValueError):
    """The folder is not a usable FLUX checkpoint; the message says which file or entry."""


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} is not a JSON object")
    return data


def resolve_dtype(dtype: Any = None):
    """None -> None (keep the saved dtype); a torch.dtype or a name (float32/fp16/bf16/...)."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return getattr(torch, name)


@dataclass(frozen=True)
class FluxCheckpoint:
    """A validated FLUX checkpoint folder: component paths and the configs read from it."""

    root: Path
    model_index: dict = field(repr=False)
    transformer: Path
    text_encoder: Path
    text_encoder_2: Path
    vae: Path
    tokenizer: Path
    tokenizer_2: Path
    scheduler_config: dict = field(repr=False)
    transformer_config: dict = field(repr=False)
    vae_config: dict = field(repr=False)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens FluxPipeline encodes by default: tokenizer_2's model_max_length, at most 512."""
        return _max_length(self.tokenizer_2, T5_MAX_SEQUENCE_LENGTH)

    @property
    def clip_max_length(self) -> int:
        """CLIP tokens (77 for FLUX): tokenizer's model_max_length."""
        return _max_length(self.tokenizer, CLIP_MAX_LENGTH)

    @property
    def blocks_per_step(self) -> int:
        """Double + single blocks: the DeLeaker clock ticks once per block."""
        c = self.transformer_config
        return int(c.get("num_layers", 19)) + int(c.get("num_single_layers", 38))

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", (0,) * 4)) - 1)

    def scheduler(self) -> FlowMatchEuler:
        return FlowMatchEuler.from_config(self.scheduler_config)

    def _load(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # one line, with the cause chained for debugging
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"cannot load {what} from {getattr(self, what)}: {type(e).__name__}: {msg}") from e

    def load_transformer(self, dtype: Any = None):
        from diffusers import FluxTransformer2DModel

        return self._load("transformer", lambda: FluxTransformer2DModel.from_pretrained(
            self.transformer, local_files_only=True, dtype=resolve_dtype(dtype)).eval())

    def load_text_encoder(self, dtype: Any = None):
        from transformers import CLIPTextModel

        return self._load("text_encoder", lambda: CLIPTextModel.from_pretrained(
            self.text_encoder, local_files_only=True, dtype=resolve_dtype(dtype)).eval())

    def load_text_encoder_2(self, dtype: Any = None):
        from transformers import T5EncoderModel

        return self._load("text_encoder_2", lambda: T5EncoderModel.from_pretrained(
            self.text_encoder_2, local_files_only=True, dtype=resolve_dtype(dtype)).eval())

    def load_vae(self, dtype: Any = None):
        from diffusers import AutoencoderKL

        return self._load("vae", lambda: AutoencoderKL.from_pretrained(
            self.vae, local_files_only=True, dtype=resolve_dtype(dtype)).eval())

    def load_tokenizers(self):
        """(CLIP, T5) as transformers tokenizers, the objects FluxPipeline uses."""
        from transformers import AutoTokenizer

        clip = self._load("tokenizer", lambda: AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True))
        t5 = self._load("tokenizer_2", lambda: AutoTokenizer.from_pretrained(self.tokenizer_2, local_files_only=True))
        return clip, t5

    def load_pipeline(self, dtype: Any = None):
        """diffusers FluxPipeline (the comparison baseline)."""
        from diffusers import FluxPipeline

        return self._load("root", lambda: FluxPipeline.from_pretrained(
            self.root, local_files_only=True, dtype=resolve_dtype(dtype)))


@dataclass
class FluxModels:
    """The loaded torch components of a checkpoint (plus the checkpoint's paths and configs)."""

    checkpoint: FluxCheckpoint
    dtype: Any  # the transformer's torch dtype
    transformer: Any
    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    tokenizer: Any  # transformers tokenizers (what FluxPipeline uses)
    tokenizer_2: Any

    @property
    def path(self) -> Path:
        return self.checkpoint.root

    @property
    def tokenizer_dir(self) -> Path:
        return self.checkpoint.tokenizer

    @property
    def tokenizer_2_dir(self) -> Path:
        return self.checkpoint.tokenizer_2

    @property
    def scheduler_config(self) -> dict:
        return self.checkpoint.scheduler_config

    @property
    def max_sequence_length(self) -> int:
        return self.checkpoint.max_sequence_length

    @property
    def clip_max_length(self) -> int:
        return self.checkpoint.clip_max_length


def _max_length(tokenizer_dir: Path, cap: int) -> int:
    try:
        n = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError):
        n = None
    return int(n) if isinstance(n, (int, float)) and 0 < n <= cap else cap


def _is_entry(value) -> bool:
    """A model_index.json component entry: [library, class] (optional ones are [null, null])."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None and value[1] is not None


def _check_weights(folder: Path, name: str) -> None:
    if not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        raise CheckpointError(f"{name}: no weight files (*.safetensors / *.bin) in {folder}")


def _check_tokenizer(folder: Path, name: str) -> None:
    has = {p.name for p in folder.iterdir()}
    if "tokenizer.json" in has or {"vocab.json", "merges.txt"} <= has or "spiece.model" in has:
        return
    raise CheckpointError(f"{name}: no tokenizer.json (or vocab.json + merges.txt / spiece.model) in {folder}")


def export_tokenizer(folder: str | Path, out_dir: str | Path) -> Path:
    """Write the tokenizer in `folder` as transformers builds it (tokenizer.json + config) to
    `out_dir`, so deleaker.runtime.tokens, which reads tokenizer.json with `tokenizers` alone,
    tokenizes exactly as FluxPipeline does. (transformers 5 rebuilds CLIP/T5 pipelines in code
    instead of trusting a checkpoint's tokenizer.json, and FLUX.1-dev's CLIP tokenizer has no
    tokenizer.json at all.)"""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder, out = Path(folder), Path(out_dir)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot load tokenizer from {folder}: {type(e).__name__}: {msg}") from e
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": type(tok).__name__, "model_max_length": tok.model_max_length}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(tok, key, None) is not None:
            cfg[key] = str(getattr(tok, key))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


def open_checkpoint(path: str | Path) -> FluxCheckpoint:
    """Validate a diffusers-format FLUX folder and read its configs (no weights are loaded)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {root}")
    if not (root / "model_index.json").is_file():
        raise CheckpointError(f"not a diffusers checkpoint (no model_index.json): {root}")
    index = _read_json(root / "model_index.json", "model_index.json")
    cls_name = index.get("_class_name")
    entry = index.get("transformer")
    transformer_cls = entry[1] if _is_entry(entry) else None
    if not (isinstance(cls_name, str) and cls_name.startswith("Flux")) or transformer_cls != TRANSFORMER_CLASS:
        from .families import family_note

        raise CheckpointError(f"not a FLUX checkpoint ({cls_name or 'no _class_name'} with transformer"
                              f" {transformer_cls or 'missing'}; need a Flux pipeline with"
                              f" {TRANSFORMER_CLASS}; {family_note(transformer_cls)}): {root}")
    missing = [name for name in _REQUIRED if not _is_entry(index.get(name))]
    if missing:
        raise CheckpointError(f"model_index.json lacks FLUX component(s) {', '.join(missing)}: {root}")
    for name, required_file in _REQUIRED.items():
        folder = root / name
        if not folder.is_dir():
            raise CheckpointError(f"{name}: subfolder missing in {root}")
        if required_file is not None and not (folder / required_file).is_file():
            raise CheckpointError(f"{name}: {required_file} missing in {folder}")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        _check_weights(root / name, name)
    for name in ("tokenizer", "tokenizer_2"):
        _check_tokenizer(root / name, name)
    sched = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
    try:
        FlowMatchEuler.from_config(sched)
    except SchedulerError as e:
        raise CheckpointError(f"{root / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    return FluxCheckpoint(
        root=root.resolve(), model_index=index,
        transformer=(root / "transformer").resolve(), text_encoder=(root / "text_encoder").resolve(),
        text_encoder_2=(root / "text_encoder_2").resolve(), vae=(root / "vae").resolve(),
        tokenizer=(root / "tokenizer").resolve(), tokenizer_2=(root / "tokenizer_2").resolve(),
        scheduler_config=sched,
        transformer_config=_read_json(root / "transformer" / "config.json", "transformer"),
        vae_config=_read_json(root / "vae" / "config.json", "vae"),
    )


def load_checkpoint(path: str | Path | FluxCheckpoint, dtype: Any = "float32",
                    text_encoder_dtype: Any = None, vae_dtype: Any = None) -> FluxModels:
    """Load every component. `dtype` applies to all; the text encoders and the VAE can be given
    their own (default: the same as `dtype`)."""
    ckpt = path if isinstance(path, FluxCheckpoint) else open_checkpoint(path)
    te_dtype = text_encoder_dtype if text_encoder_dtype is not None else dtype
    clip_tok, t5_tok = ckpt.load_tokenizers()
    transformer = ckpt.load_transformer(dtype)
    return FluxModels(
        checkpoint=ckpt,
        dtype=transformer.dtype,
        transformer=transformer,
        text_encoder=ckpt.load_text_encoder(te_dtype),
        text_encoder_2=ckpt.load_text_encoder_2(te_dtype),
        vae=ckpt.load_vae(vae_dtype if vae_dtype is not None else dtype),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
    )
