"""modeling/tiny_model.py builds a FLUX-layout checkpoint that diffusers, transformers, tokenizers
and modeling/checkpoint.py all load; modeling/checkpoint.py rejects folders that are not FLUX."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from deleaker.modeling import tiny_model
from deleaker.modeling.checkpoint import (CheckpointError, export_tokenizer, load_checkpoint, open_checkpoint,
                                       resolve_dtype)
from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG, FlowMatchEuler

COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


def test_layout_and_size(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert all((tiny_model_dir / c).is_dir() for c in COMPONENTS)
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"tiny model is {size / 2**20:.1f} MiB"
    assert not list(tiny_model_dir.parent.glob(".model.tmp-*")), "temp build folder left behind"


def test_loads_with_diffusers_and_transformers(tiny_model_dir):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

    tr = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer", local_files_only=True)
    c = tr.config
    assert c.guidance_embeds and c.in_channels == 64 and c.num_layers == 2 and c.num_single_layers == 2
    assert sum(c.axes_dims_rope) == c.attention_head_dim
    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae", local_files_only=True)
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4  # 8x
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    clip = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder", local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder_2", local_files_only=True)
    assert clip.config.hidden_size == c.pooled_projection_dim and t5.config.d_model == c.joint_attention_dim
    for cls in (AutoTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(tiny_model_dir / "tokenizer", local_files_only=True)
        assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"
        assert tok.vocab_size <= clip.config.vocab_size
    for cls in (AutoTokenizer, T5TokenizerFast):
        tok = cls.from_pretrained(tiny_model_dir / "tokenizer_2", local_files_only=True)
        assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
        assert tok("a cat").input_ids[-1] == 1  # </s> appended
        assert len(tok) <= t5.config.vocab_size
    # the whole pipeline runs end to end (2 steps, 32x32)
    pipe = FluxPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    out = pipe("a cat and a dog", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_tokenizers_library_loads_the_same_tokenizers(tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    prompts = ["a cat and a cheetah in a field", "A Bear, a DOG & 3 owls!"]
    for sub in ("tokenizer", "tokenizer_2"):
        raw = Tokenizer.from_file(str(tiny_model_dir / sub / "tokenizer.json"))
        hf = AutoTokenizer.from_pretrained(tiny_model_dir / sub)
        for p in prompts:
            assert raw.encode(p).ids == hf(p).input_ids, (sub, p)
    t5 = Tokenizer.from_file(str(tiny_model_dir / "tokenizer_2" / "tokenizer.json"))
    for word in ("cat", "cheetah", "dog", "bear"):  # the corpus words are single pieces
        assert t5.encode(word, add_special_tokens=False).tokens == ["▁" + word]


def test_export_tokenizer_gives_the_runtime_transformers_tokenization(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from deleaker.runtime.tokens import load_tokenizer

    prompts = ["a cat and a cheetah in a field", "A Bear, a DOG & 3 owls!", "x " * 600]
    for sub, max_len in (("tokenizer", 77), ("tokenizer_2", 512)):
        rt = load_tokenizer(export_tokenizer(tiny_model_dir / sub, tmp_path / sub))
        assert rt.model_max_length == max_len
        hf = AutoTokenizer.from_pretrained(tiny_model_dir / sub)
        want = hf(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(rt.encode_padded(prompts, max_len), want)
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        export_tokenizer(tmp_path / "missing", tmp_path / "out")


def test_open_checkpoint(tiny_model_dir):
    ck = open_checkpoint(tiny_model_dir)
    assert ck.root == tiny_model_dir.resolve()
    assert ck.transformer == tiny_model_dir / "transformer" and ck.tokenizer_2 == tiny_model_dir / "tokenizer_2"
    assert ck.blocks_per_step == 4 and ck.guidance_embeds and ck.vae_scale_factor == 8
    assert (ck.max_sequence_length, ck.clip_max_length) == (512, 77)
    assert ck.scheduler().config == FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER_CONFIG).config
    assert type(ck.load_pipeline()).__name__ == "FluxPipeline"


@pytest.mark.parametrize("dtype, want", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                         (torch.float16, torch.float16)])
def test_load_checkpoint_dtypes(tiny_model_dir, dtype, want):
    m = load_checkpoint(tiny_model_dir, dtype=dtype)
    assert m.transformer.dtype == want and m.text_encoder_2.dtype == want and m.vae.dtype == want
    assert m.dtype == want and m.path == tiny_model_dir.resolve()
    assert m.tokenizer_2("a cat").input_ids[-1] == 1
    m32 = load_checkpoint(open_checkpoint(tiny_model_dir), dtype="fp16", vae_dtype="fp32")
    assert m32.vae.dtype == torch.float32 and m32.transformer.dtype == torch.float16


def test_resolve_dtype():
    assert resolve_dtype(None) is None
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16 and resolve_dtype("half") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_index(key, value):
    def edit(d):
        idx = json.loads((d / "model_index.json").read_text())
        if value is None:
            idx.pop(key)
        else:
            idx[key] = value
        (d / "model_index.json").write_text(json.dumps(idx))
    return edit


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "model_index.json").unlink(), "no model_index.json"),
    (lambda d: (d / "model_index.json").write_text("{oops"), "cannot read"),
    (_set_index("_class_name", "StableDiffusionPipeline"), "not a FLUX checkpoint"),
    (_set_index("transformer", ["diffusers", "SD3Transformer2DModel"]), "not a FLUX checkpoint"),
    (_set_index("text_encoder_2", None), "lacks FLUX component.*text_encoder_2"),
    (lambda d: shutil.rmtree(d / "vae"), "vae: subfolder missing"),
    (lambda d: (d / "transformer" / "config.json").unlink(), "transformer: config.json missing"),
    (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink(), "transformer: no weight files"),
    (lambda d: [p.unlink() for p in (d / "tokenizer_2").iterdir()], "tokenizer_2: no tokenizer.json"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler"})), "scheduler/scheduler_config.json: scheduler config is for DDIMScheduler"),
])
def test_not_flux_folders_are_checkpoint_errors(tiny_model_dir, tmp_path, edit, match):
    bad = broken_copy(tiny_model_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match) as ei:
        open_checkpoint(bad)
    assert "\n" not in str(ei.value)


def test_missing_and_plain_folders(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        open_checkpoint(tmp_path / "file")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        open_checkpoint(tmp_path)


def test_corrupt_weights_are_a_checkpoint_error(tiny_model_dir, tmp_path):
    bad = broken_copy(tiny_model_dir, tmp_path / "bad",
                      lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk"))
    # refused when the folder is opened: every weight file's header is read before any weight loads
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a readable safetensors") \
            as ei:
        open_checkpoint(bad).load_transformer()
    assert "\n" not in str(ei.value)


def test_build_is_deterministic_and_refuses_to_overwrite(tiny_model_dir, tmp_path):
    again = tiny_model.build_tiny_model(tmp_path / "again")
    for f in sorted(p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f
    with pytest.raises(FileExistsError, match="not empty"):
        tiny_model.build_tiny_model(again)
    assert tiny_model.build_tiny_model(again, overwrite=True) == again.resolve()
    with pytest.raises(ValueError, match="unknown tiny-model preset"):
        tiny_model.build_tiny_model(tmp_path / "x", preset="huge")


def test_ensure_tiny_model_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DELEAKER_CACHE", str(tmp_path / "cache"))
    calls = []
    real_build = tiny_model.build_tiny_model
    monkeypatch.setattr(tiny_model, "build_tiny_model", lambda *a, **k: calls.append(a) or real_build(*a, **k))
    path = tiny_model.ensure_tiny_model()
    assert path == (tmp_path / "cache" / "tiny-flux").resolve()
    assert tiny_model.ensure_tiny_model() == path and len(calls) == 1  # second call: cached
    # a half-written or outdated folder (no/old stamp) is rebuilt
    (path / tiny_model.STAMP_FILE).write_text("{}")
    assert tiny_model.ensure_tiny_model() == path and len(calls) == 2
    open_checkpoint(path)
    assert [p.name for p in path.parent.iterdir()] == ["tiny-flux"]  # no temp folders left


def test_presets_validate():
    for p in tiny_model.PRESETS.values():
        p.validate()
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_model.TinyPreset(axes_dims_rope=(4, 4, 4)).validate()


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "deleaker.modeling.tiny_model", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out.resolve())
    open_checkpoint(out)
    r = subprocess.run([sys.executable, "-m", "deleaker.modeling.tiny_model", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not empty" in r.stderr


def test_ensure_tiny_model_loses_a_race_gracefully(tmp_path, monkeypatch):
    # another process finishes its build while ours runs: ours is dropped, theirs is used
    target = (tmp_path / "tiny-flux").resolve()
    real = tiny_model._build_into

    def racing_build(out, preset, seed):
        real(out, preset, seed)
        if not target.exists():
            monkeypatch.setattr(tiny_model, "_build_into", real)
            tiny_model.build_tiny_model(target)  # the "other process"
            (target / "marker").write_text("theirs")

    monkeypatch.setattr(tiny_model, "_build_into", racing_build)
    assert tiny_model.ensure_tiny_model(cache_root=tmp_path) == target
    assert (target / "marker").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-flux"]
