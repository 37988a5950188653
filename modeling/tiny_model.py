"""A tiny random-weight FLUX checkpoint, built offline in diffusers' folder layout.

Same architecture classes and folder layout as FLUX.1-dev (FluxTransformer2DModel with
guidance embeds, CLIPTextModel, T5EncoderModel, 16-channel AutoencoderKL with 8x
downsampling and FLUX's scaling/shift factors, FLUX.1-dev's scheduler config), only tiny, so
the loading, export and runtime code that serves real checkpoints is tested on it. Tokenizers
are trained with `tokenizers` on a built-in corpus of generated sentences about animals,
objects, colours and scenes, and are built the way transformers' CLIPTokenizer/T5Tokenizer
rebuild them, so `tokenizers.Tokenizer.from_file` and transformers load the same tokenizer.

    python -m deleaker.modeling.tiny_model --out DIR [--preset tiny] [--seed 0] [--force]
    python -m deleaker.modeling.tiny_model            # build (once) into the cache, print path
    python -m deleaker.modeling.tiny_model --family sd3   # another family's tiny model (cached), print path
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG
from deleaker.runtime.tokens import T5_MAX_SEQUENCE_LENGTH, CLIP_MAX_LENGTH, clip_bpe_tokenizer

# Bump when the builder's output changes, so cached models are rebuilt.
BUILDER_VERSION = 1
STAMP_FILE = "deleaker_tiny.json"

# FLUX.1-dev's VAE latent normalisation (vae/config.json).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of one tiny checkpoint. Head dim = sum(axes_dims_rope), as FLUX requires."""

    num_layers: int = 2  # double (joint) blocks
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = True  # like FLUX.1-dev (schnell has none)
    clip_hidden: int = 32  # = the transformer's pooled_projection_dim
    clip_layers: int = 2
    clip_heads: int = 2
    t5_d_model: int = 32  # = the transformer's joint_attention_dim
    t5_layers: int = 2
    t5_heads: int = 2
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)  # 4 levels: 3 downsamples = 8x
    vae_groups: int = 8
    clip_vocab_size: int = 1000  # 512 byte symbols + merges + 2 specials
    t5_vocab_size: int = 600
    corpus_sentences: int = 400

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim"
                             f" {self.attention_head_dim}")
        if len(self.vae_channels) != 4:
            raise ValueError("FLUX's VAE has 4 levels (8x downsampling); vae_channels needs 4 entries")
        if any(c % self.vae_groups for c in self.vae_channels):
            raise ValueError(f"vae_channels {self.vae_channels} must be multiples of vae_groups {self.vae_groups}")
        if self.t5_d_model % self.t5_heads or self.clip_hidden % self.clip_heads:
            raise ValueError("encoder widths must be multiples of their head counts")


PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(),
    # A little wider and deeper: still CPU-fast, more blocks per step for window tests.
    "small": TinyPreset(num_layers=4, num_single_layers=8, num_attention_heads=4, attention_head_dim=32,
                        axes_dims_rope=(8, 12, 12), clip_hidden=64, t5_d_model=64),
    # Head size 64, the smallest the fused CUDA kernels take: end-to-end GPU checks of --attention cuda.
    "tiny-h64": TinyPreset(num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(16, 24, 24)),
}

# ---------------------------------------------------------------------------------------------
# Corpus and tokenizers

ANIMALS = ("cat cheetah dog bear lion tiger leopard zebra horse cow sheep goat rabbit fox wolf deer "
           "elephant giraffe monkey panda koala raccoon owl eagle parrot duck swan penguin frog turtle "
           "snake mouse squirrel hamster kitten puppy").split()
OBJECTS = ("car bicycle chair table lamp umbrella ball guitar book cup hat boat kite clock vase teapot "
           "backpack bench sofa pillow basket bowl").split()
COLOURS = "red blue green yellow black white orange purple pink brown grey golden".split()
SCENES = ["field", "forest", "beach", "city street", "kitchen", "garden", "mountain", "desert", "river bank",
          "park", "snowy meadow", "living room", "library", "harbor"]
TEMPLATES = [
    "a {c} {a} and a {a2} in a {s}",
    "a photo of a {a} sitting on a {o}",
    "a {a} next to a {c} {o} in the {s}",
    "a painting of a {a} and a {c} {a2}",
    "{A} and {a2} playing with a {c} {o}",
    "a {c} {o} on a table in the {s}",
    "two {a}s and one {a2} near a {o}",
    "a close-up of a {c} {a}, {s} in the background",
    "a {a}, a {a2} and a {a3} in a {s}",
    "A {c} {a} chasing a {a2} across the {s}.",
]


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` sentences from the word lists (deterministic); every animal appears."""
    rng = random.Random(seed)
    out = [f"a {a} in a {s}" for a, s in zip(ANIMALS, SCENES * 3)]
    while len(out) < n:
        a, a2, a3 = rng.sample(ANIMALS, 3)
        t = rng.choice(TEMPLATES)
        out.append(t.format(a=a, a2=a2, a3=a3, A=a.capitalize(), c=rng.choice(COLOURS), o=rng.choice(OBJECTS),
                            s=rng.choice(SCENES)))
    return out[:n]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable symbol table, in CLIP's vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def train_clip_tokenizer(corpus: list[str], vocab_size: int) -> tuple[Tokenizer, dict[str, int], list[tuple[str, str]]]:
    """CLIP-style BPE: the trained merges over CLIP's vocabulary layout (256 byte symbols, the
    same with '</w>', one token per merge, then <|startoftext|>, <|endoftext|>)."""
    byte_syms = _bytes_to_unicode()
    base = clip_bpe_tokenizer({CLIP_BOS: 0, CLIP_EOS: 1}, [])  # CLIP's normalizer/pre-tokenizer
    trainer_tok = Tokenizer(models.BPE(unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tok.normalizer = base.normalizer
    trainer_tok.pre_tokenizer = base.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=byte_syms,
                                  end_of_word_suffix="</w>", special_tokens=[])
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokens = byte_syms + [s + "</w>" for s in byte_syms]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return clip_bpe_tokenizer(vocab, merges, CLIP_BOS, CLIP_EOS, CLIP_EOS), vocab, merges


def t5_pipeline(tok: Tokenizer, eos_id: int) -> Tokenizer:
    """T5's pre-tokenizer, decoder and '$A </s>' post-processor, as transformers' T5Tokenizer
    sets them (no normalizer: the tiny tokenizer has no SentencePiece charsmap)."""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS],
                                                       special_tokens=[(T5_EOS, eos_id)])
    return tok


def train_t5_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    """T5-style Unigram: <pad>=0, </s>=1, <unk>=2 (T5's ids), every ASCII printable symbol.

    The Unigram trainer is not bit-deterministic (hash-map order, float sums), so its vocabulary
    is canonicalised: scores rounded to 6 decimals, pieces sorted by (score desc, piece), and
    symbols missing from the corpus appended with fixed scores."""
    trainer_tok = t5_pipeline(Tokenizer(models.Unigram()), eos_id=1)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False, unk_token=T5_UNK,
                                      special_tokens=[T5_PAD, T5_EOS, T5_UNK])
    trainer_tok.train_from_iterator(corpus, trainer)
    specials = (T5_PAD, T5_EOS, T5_UNK)
    trained = [(p, round(float(sc), 6)) for p, sc in json.loads(trainer_tok.to_str())["model"]["vocab"]
               if p not in specials]
    # The trainer scores characters it did not keep as min_score + 0.0001 * k, k counting in
    # hash-set order: re-score those in character order.
    lo = min(sc for _, sc in trained)
    hi = lo + 0.0001 * sum(len(p) == 1 for p, _ in trained) + 1e-7
    rare = sorted(p for p, sc in trained if len(p) == 1 and sc <= hi)
    trained = [(p, sc) for p, sc in trained if p not in rare]
    trained += [(ch, round(lo + 0.0001 * i, 6)) for i, ch in enumerate(rare)]
    trained.sort(key=lambda x: (-x[1], x[0]))
    have = {p for p, _ in trained}
    floor = trained[-1][1] - 1.0
    missing = sorted(set(string.ascii_letters + string.digits + string.punctuation) - have)
    pieces = [(t, 0.0) for t in specials] + trained + [(ch, round(floor - 0.01 * i, 6)) for i, ch in enumerate(missing)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return t5_pipeline(tok, eos_id=1)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_clip_tokenizer(tok: Tokenizer, vocab: dict[str, int], merges: list[tuple[str, str]], folder: Path) -> None:
    """tokenizer.json plus vocab.json/merges.txt (FLUX.1-dev ships only the latter two)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {**specials, "tokenizer_class": "CLIPTokenizer",
                                                   "model_max_length": CLIP_MAX_LENGTH, "do_lower_case": True,
                                                   "clean_up_tokenization_spaces": True, "add_prefix_space": False})


def save_t5_tokenizer(tok: Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD}
    _write_json(folder / "special_tokens_map.json", specials)
    # extra_ids 0: the tiny vocabulary has no <extra_id_*> sentinels (T5-xxl's 100 are unused by FLUX).
    _write_json(folder / "tokenizer_config.json", {**specials, "tokenizer_class": "T5Tokenizer",
                                                   "model_max_length": T5_MAX_SEQUENCE_LENGTH, "extra_ids": 0,
                                                   "additional_special_tokens": [],
                                                   "clean_up_tokenization_spaces": True, "legacy": True})


# ---------------------------------------------------------------------------------------------
# Models


def _build_models(p: TinyPreset, out: Path, seed: int, clip_vocab: dict[str, int], t5_vocab_size: int) -> None:
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # One seed per component, so changing one component's size leaves the others' weights alone.
    torch.manual_seed(seed)
    FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=p.num_layers,
        num_single_layers=p.num_single_layers, attention_head_dim=p.attention_head_dim,
        num_attention_heads=p.num_attention_heads, joint_attention_dim=p.t5_d_model,
        pooled_projection_dim=p.clip_hidden, guidance_embeds=p.guidance_embeds, axes_dims_rope=p.axes_dims_rope,
    ).save_pretrained(out / "transformer")

    torch.manual_seed(seed + 1)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=p.clip_hidden, intermediate_size=2 * p.clip_hidden,
        projection_dim=p.clip_hidden, num_hidden_layers=p.clip_layers, num_attention_heads=p.clip_heads,
        max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", bos_token_id=clip_vocab[CLIP_BOS],
        eos_token_id=clip_vocab[CLIP_EOS], pad_token_id=clip_vocab[CLIP_EOS],
    )).save_pretrained(out / "text_encoder")

    torch.manual_seed(seed + 2)
    T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=p.t5_d_model, d_kv=p.t5_d_model // p.t5_heads, d_ff=2 * p.t5_d_model,
        num_layers=p.t5_layers, num_heads=p.t5_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=True, use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )).save_pretrained(out / "text_encoder_2")

    torch.manual_seed(seed + 3)
    tiny_autoencoder_kl(p, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR).save_pretrained(out / "vae")


def tiny_autoencoder_kl(p, scaling_factor: float, shift_factor: float):
    """The tiny AutoencoderKL of FLUX.1 and SD3 (4 levels, 16 latent channels): `p` gives its
    block_out_channels (vae_channels) and norm groups (vae_groups); the factors are the family's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=p.vae_channels, layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=p.vae_groups, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True)


def write_pipeline_files(out: Path, scheduler: dict, model_index: dict) -> None:
    """scheduler/scheduler_config.json and model_index.json of a diffusers folder, stamped with the
    installed diffusers version as save_pretrained would."""
    import diffusers

    (out / "scheduler").mkdir()
    _write_json(out / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": diffusers.__version__})
    _write_json(out / "model_index.json", {**model_index, "_diffusers_version": diffusers.__version__})


def _model_index() -> dict:
    import diffusers

    return {  # FLUX.1-dev's model_index.json
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _stamp(preset: str, seed: int) -> dict:
    return {"builder_version": BUILDER_VERSION, "preset": preset, "seed": seed,
            "config": dataclasses.asdict(PRESETS[preset])}


def _build_into(out: Path, preset: str, seed: int) -> None:
    from transformers.utils import logging as hf_logging

    p = PRESETS[preset]
    corpus = tiny_corpus(p.corpus_sentences, seed)
    clip_tok, clip_vocab, clip_merges = train_clip_tokenizer(corpus, p.clip_vocab_size)
    t5_tok = train_t5_tokenizer(corpus, p.t5_vocab_size)
    save_clip_tokenizer(clip_tok, clip_vocab, clip_merges, out / "tokenizer")
    save_t5_tokenizer(t5_tok, out / "tokenizer_2")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar: noise here
    try:
        _build_models(p, out, seed, clip_vocab, t5_tok.get_vocab_size())
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    write_pipeline_files(out, FLUX_DEV_SCHEDULER_CONFIG, _model_index())
    _write_json(out / STAMP_FILE, _stamp(preset, seed))  # written last: marks a complete build


def build_tiny_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny checkpoint into `out_dir` atomically (temp folder beside it, then rename).

    An existing non-empty `out_dir` is an error unless `overwrite`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {', '.join(PRESETS)}")
    PRESETS[preset].validate()
    return _atomic_build(out_dir, lambda tmp: _build_into(tmp, preset, seed), overwrite)


def _atomic_build(out_dir: str | Path, fill, overwrite: bool) -> Path:
    """Run fill(temp folder) beside `out_dir`, then rename the folder into place."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the final folder normal permissions
        fill(tmp)
        if overwrite and out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # OSError if another builder's folder appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_cache_root() -> Path:
    """$DELEAKER_CACHE, else ~/.cache/deleaker."""
    env = os.environ.get("DELEAKER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deleaker"


def _is_current(folder: Path, preset: str, seed: int) -> bool:
    try:
        return json.loads((folder / STAMP_FILE).read_text()) == json.loads(json.dumps(_stamp(preset, seed)))
    except (OSError, ValueError):
        return False


def ensure_tiny_model(preset: str = "tiny", seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """Path of the cached tiny checkpoint (<cache>/tiny-flux, or tiny-flux-<preset>), built on
    first use or when the builder changed. Safe against concurrent builders: each builds in its
    own temp folder and the first rename wins."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {', '.join(PRESETS)}")
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    name = "tiny-flux" if (preset, seed) == ("tiny", 0) else f"tiny-flux-{preset}-s{seed}"
    target = (root / name).resolve()
    if _is_current(target, preset, seed):
        return target
    try:
        return build_tiny_model(target, preset, seed, overwrite=target.exists())
    except OSError:  # FileExistsError included
        # Another process renamed its build into place first; use it if it is complete.
        if _is_current(target, preset, seed):
            return target
        raise


# Model families with a tiny checkpoint here: flux1 is this module's; the others' builders are
# modeling/families/tiny_<family>.py (build(folder, seed)).
TINY_FAMILIES = ("flux1", "sd3", "qwenimage", "flux2")


def _family_builder(family: str):
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    import importlib

    return importlib.import_module(f"deleaker.modeling.families.tiny_{family}")


def _family_stamp(family: str, seed: int) -> dict:
    return {"builder_version": BUILDER_VERSION, "family": family, "seed": seed,
            "family_builder_version": getattr(_family_builder(family), "BUILDER_VERSION", 1)}


def build_tiny_family(out_dir: str | Path, family: str, seed: int = 0, overwrite: bool = False) -> Path:
    """Build the tiny checkpoint of `family` into `out_dir` (flux1: build_tiny_model)."""
    if family == "flux1":
        return build_tiny_model(out_dir, "tiny", seed, overwrite)
    builder = _family_builder(family)

    def fill(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            builder.build(tmp, seed)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        _write_json(tmp / STAMP_FILE, _family_stamp(family, seed))  # last: marks a complete build

    return _atomic_build(out_dir, fill, overwrite)


def ensure_tiny_family(family: str, seed: int = 0, cache_root: str | Path | None = None) -> Path:
    """Path of the cached tiny checkpoint of `family` (<cache>/tiny-<family>), built on first use."""
    if family == "flux1":
        return ensure_tiny_model("tiny", seed, cache_root)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    target = (root / (f"tiny-{family}" if seed == 0 else f"tiny-{family}-s{seed}")).resolve()

    def current() -> bool:
        try:
            return json.loads((target / STAMP_FILE).read_text()) == _family_stamp(family, seed)
        except (OSError, ValueError):
            return False

    if current():
        return target
    try:
        return build_tiny_family(target, family, seed, overwrite=target.exists())
    except OSError:
        if current():
            return target
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.modeling.tiny_model", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder to build into (default: the cache, built once)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--family", default="flux1", choices=TINY_FAMILIES,
                    help="model family (default flux1; --preset applies to flux1 only)")
    args = ap.parse_args(argv)
    if args.family != "flux1":
        if args.preset != "tiny":
            ap.error(f"--preset {args.preset} sizes the flux1 tiny model; --family {args.family} has one size")
        try:
            path = ensure_tiny_family(args.family, args.seed) if args.out is None else \
                build_tiny_family(args.out, args.family, args.seed, overwrite=args.force)
        except FileExistsError as e:
            ap.error(str(e))
        print(path)
        return 0
    if args.out is None:
        path = ensure_tiny_model(args.preset, args.seed)
    else:
        try:
            path = build_tiny_model(args.out, args.preset, args.seed, overwrite=args.force)
        except FileExistsError as e:
            ap.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
