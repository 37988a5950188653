"""Open a diffusers-format FLUX checkpoint folder and load its components (local files only).

Works the same for the tiny model (tiny_model.py) and real FLUX.1-dev / FLUX.1-schnell
snapshots on disk. `open_checkpoint` only validates and reads configs (no torch import);
`FluxCheckpoint.load_*` and `load_checkpoint` build the torch modules. Every problem is a
`CheckpointError` with a one-line message naming the folder.

Loading is strict (a checkpoint that loads "with warnings" is a wrong image, not a model):
`open_checkpoint` checks each component's config names the class its folder must hold and reads
each safetensors header (a truncated or unreadable file is refused before any weight loads), and
every `load_*` compares the weights it read against the model's parameters: a missing,
unexpected, shape- or dtype-mismatched tensor is one line naming the folder, the file and up to
three tensor names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deleaker.runtime.dtypes import DTYPE_ALIASES, WEIGHT_DTYPES
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
# component folder -> (config key, the class its loader builds): a config naming another class is a
# folder in the wrong place (e.g. the two text encoders swapped).
_ARCHITECTURES = {
    "transformer": ("_class_name", TRANSFORMER_CLASS),
    "vae": ("_class_name", "AutoencoderKL"),
    "text_encoder": ("architectures", "CLIPTextModel"),
    "text_encoder_2": ("architectures", "T5EncoderModel"),
}
_MODEL_TYPES = {"text_encoder": ("clip_text_model", "clip"), "text_encoder_2": ("t5",)}
# safetensors dtype names -> their kind (a float weight stored as an integer is a broken file)
_ST_KINDS = {"F64": "float", "F32": "float", "F16": "float", "BF16": "float", "F8_E4M3": "float",
             "F8_E5M2": "float", "F8_E8M0": "float", "F4": "float", "F6_E2M3": "float", "F6_E3M2": "float",
             "I64": "int", "I32": "int", "I16": "int", "I8": "int", "U64": "int", "U32": "int", "U16": "int",
             "U8": "int", "BOOL": "bool", "C64": "complex"}
_NAMES_SHOWN = 3  # tensor names an error line lists


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
    given = str(dtype).lower().removeprefix("torch.")
    short = given if given in WEIGHT_DTYPES else DTYPE_ALIASES.get(given)
    if short is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, WEIGHT_DTYPES[short])


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
        except CheckpointError:
            raise
        except Exception as e:  # one line, with the cause chained for debugging
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"cannot load {what} from {getattr(self, what)}: {type(e).__name__}: "
                                  f"{_cut(msg, 300)}") from e

    def _load_strict(self, what: str, cls, dtype: Any):
        """cls.from_pretrained on the component folder, refused unless every weight it holds is a
        parameter of the model and every parameter came from a weight (names, shapes, dtype kinds)."""
        folder = getattr(self, what)

        def load():
            try:
                model, info = cls.from_pretrained(folder, local_files_only=True, dtype=resolve_dtype(dtype),
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
            except Exception as e:  # a library that fails on a weight it cannot copy: name the weight
                stored = [(k, f, t["dtype"]) for k, (f, t) in _headers(Path(folder)).items()
                          if _ST_KINDS[t["dtype"]] != "float"]
                if not stored:
                    raise
                names = ", ".join(f"{k} {d}" for k, _, d in sorted(stored)[:_NAMES_SHOWN])
                more = f" (+{len(stored) - _NAMES_SHOWN} more)" if len(stored) > _NAMES_SHOWN else ""
                raise CheckpointError(f"{folder}: weights do not match {cls.__name__}: {stored[0][1]} stores "
                                      f"{len(stored)} tensor(s) in a dtype the model cannot take: {names}{more} "
                                      f"({type(e).__name__} in the loader)") from e
            check_loaded_weights(folder, model, info)
            return model.eval()
        return self._load(what, load)

    def load_transformer(self, dtype: Any = None):
        from diffusers import FluxTransformer2DModel

        return self._load_strict("transformer", FluxTransformer2DModel, dtype)

    def load_text_encoder(self, dtype: Any = None):
        from transformers import CLIPTextModel

        return self._load_strict("text_encoder", CLIPTextModel, dtype)

    def load_text_encoder_2(self, dtype: Any = None):
        from transformers import T5EncoderModel

        return self._load_strict("text_encoder_2", T5EncoderModel, dtype)

    def load_vae(self, dtype: Any = None):
        from diffusers import AutoencoderKL

        return self._load_strict("vae", AutoencoderKL, dtype)

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


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _names(keys) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:_NAMES_SHOWN])
    return shown + (f" (+{len(keys) - _NAMES_SHOWN} more)" if len(keys) > _NAMES_SHOWN else "")


def safetensors_header(path: Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from a .safetensors file's header (no
    tensor data is read); a CheckpointError when the header is unreadable or the file is shorter
    than its header says (a truncated copy)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path.parent}: {path.name} is not a readable safetensors file ({_cut(str(e), 120)}); "
                              "copy it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.parent}: {path.name} has a safetensors header that is not a JSON object")
    header.pop("__metadata__", None)
    end, bad = 0, []
    for name, t in header.items():
        try:
            lo, hi = (int(v) for v in t["data_offsets"])
            if t["dtype"] not in _ST_KINDS or lo < 0 or hi < lo:
                raise ValueError
            end = max(end, hi)
        except (KeyError, TypeError, ValueError):
            bad.append(name)
    if bad:
        raise CheckpointError(f"{path.parent}: {path.name} has malformed tensor entries: {_names(bad)}")
    if 8 + n + end != size:
        cut = [k for k, t in header.items() if 8 + n + int(t["data_offsets"][1]) > size]
        what = f"is truncated ({size} bytes, its header needs {8 + n + end})" if size < 8 + n + end else \
            f"has {size - 8 - n - end} bytes after its last tensor"
        raise CheckpointError(f"{path.parent}: {path.name} {what}" + (f"; cut tensors: {_names(cut)}" if cut else "")
                              + "; copy it again")
    return header


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors"))


def _headers(folder: Path) -> dict[str, tuple[str, dict]]:
    """tensor name -> (file name, header entry) over every .safetensors file of a component folder."""
    out: dict[str, tuple[str, dict]] = {}
    for f in _weight_files(folder):
        for name, t in safetensors_header(f).items():
            out[name] = (f.name, t)
    return out


def _check_weights(folder: Path, name: str) -> None:
    if not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        raise CheckpointError(f"{name}: no weight files (*.safetensors / *.bin) in {folder}")
    index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
    if index is not None:
        data = _read_json(index, name)
        shards = set((data.get("weight_map") or {}).values()) if isinstance(data.get("weight_map"), dict) else set()
        missing = sorted(s for s in shards if not (folder / str(s)).is_file())
        if missing:
            raise CheckpointError(f"{folder}: {index.name} lists shard(s) that are missing: {_names(missing)}")
    _headers(folder)  # every safetensors header readable and the file complete (cheap: no tensor data)


def _check_architecture(folder: Path, name: str) -> None:
    """The component's config names the class its loader builds (a folder swapped with another
    component's is refused here, before any weight loads)."""
    key, want = _ARCHITECTURES[name]
    cfg = _read_json(folder / "config.json", name)
    got = cfg.get(key)
    if key == "architectures":
        model_type = cfg.get("model_type")
        ok_arch = got is None or (isinstance(got, list) and want in got)
        ok_type = model_type is None or model_type in _MODEL_TYPES[name]
        if ok_arch and ok_type and (got is not None or model_type is not None):
            return
        found = f"architectures {got!r}, model_type {model_type!r}"
    else:
        if got == want:
            return
        found = f"{key} {got!r}"
    raise CheckpointError(f"{name}: {folder / 'config.json'} describes {found}, but the {name} folder of a FLUX "
                          f"checkpoint holds a {want}: the folder is misplaced or its config is wrong")


def check_loaded_weights(folder: Path, model, info: dict) -> None:
    """Refuse a model whose weight files did not fill it exactly: info is from_pretrained's
    loading info (the library's own rules for tied and ignored keys); dtype kinds are compared
    against the safetensors headers."""
    folder = Path(folder)
    headers = _headers(folder)
    files = sorted({f for f, _ in headers.values()}) or [p.name for p in sorted(folder.glob("*.bin"))]

    def where(keys) -> str:
        found = sorted({headers[k][0] for k in keys if k in headers})
        return ", ".join(found or files[:1] or ["its weights"])
    problems = []
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        problems.append(f"{where([])} lacks {len(missing)} of the model's tensors: {_names(missing)}")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        problems.append(f"{where(unexpected)} holds {len(unexpected)} tensor(s) the model does not have: "
                        f"{_names(unexpected)}")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} (model {tuple(b)})" for k, a, b, *_ in mismatched[:_NAMES_SHOWN])
        more = f" (+{len(mismatched) - _NAMES_SHOWN} more)" if len(mismatched) > _NAMES_SHOWN else ""
        problems.append(f"{where(m[0] for m in mismatched)} has {len(mismatched)} tensor(s) of the wrong shape: "
                        f"{shown}{more}")
    if info.get("error_msgs"):
        problems.append(f"{where([])}: {_cut(str(info['error_msgs'][0]).splitlines()[0], 120)}")
    if not problems:
        prefix = getattr(model, "base_model_prefix", "") or ""
        wrong = []
        for key, value in model.state_dict().items():
            entry = headers.get(key) or headers.get(f"{prefix}.{key}") or \
                (headers.get(key.removeprefix(prefix + ".")) if prefix else None)
            if entry is None:
                continue
            stored = _ST_KINDS[entry[1]["dtype"]]
            kind = "float" if value.is_floating_point() else "bool" if str(value.dtype) == "torch.bool" else \
                "complex" if value.is_complex() else "int"
            if stored != kind:
                wrong.append((key, entry))
        if wrong:
            names = ", ".join(f"{k} {e[1]['dtype']}" for k, e in wrong[:_NAMES_SHOWN])
            more = f" (+{len(wrong) - _NAMES_SHOWN} more)" if len(wrong) > _NAMES_SHOWN else ""
            problems.append(f"{where(k for k, _ in wrong)} stores {len(wrong)} tensor(s) in a dtype the model cannot "
                            f"take: {names}{more}")
    if problems:
        raise CheckpointError(f"{folder}: weights do not match {type(model).__name__}: {'; '.join(problems)}; "
                              "the folder is broken or holds another model's weights")


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
        _check_architecture(root / name, name)
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
