"""Train the toy-world FLUX model on this CPU and write it in diffusers' folder layout.

    python -m deleaker.toyworld.train --out DIR [--seed 0] [--threads 2] [--steps 15000]
    python -m deleaker.toyworld.train --resume DIR   # continue a stopped run

Stages (each logged, the transformer checkpointed as it trains, so a stopped run leaves a usable
folder): tokenizers trained on the world's captions; random frozen CLIP/T5-like encoders; a
2-level AutoencoderKL (factor 2, 16 latent channels: 32x32 px -> 16x16 latents -> 8x8 tokens)
trained on renders, with its latent shift/scale measured; then a FluxTransformer2DModel trained
with rectified flow (velocity target noise - x0, sigmas logit-normal then shifted exactly as the
runtime's scheduler shifts them for this image size), its pooled-text path zeroed and frozen
(TrainConfig.pooled_text), an EMA of its weights saved. TrainConfig's defaults are the shipped
model's recipe. Loss curves, the config and the wall time go to DIR-training/ beside DIR.

Every transformer checkpoint also writes DIR-training/state.pt: the raw and EMA weights, the
optimiser, the data RNG's and torch's RNG states, the step and a digest of the training latents.
`--resume DIR` rebuilds the run from DIR-training/run.json (the options it was started with) and
continues from that state, so a stopped run ends with the same weights and the same loss sequence
as one that never stopped (on the same machine and thread count; tests/toyworld/test_toyworld.py checks it
bit for bit). A run stopped before its first transformer checkpoint is redone from the start
(every stage before it is seeded).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deleaker.runtime import latents as lat
from deleaker.runtime import tokens as tok
from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG, FlowMatchEuler

from deleaker.modeling import tiny_model as tm
from . import world
from .preset import DEMO_ENTITIES, DEMO_PROMPT, PRESET_NAME

log = logging.getLogger("deleaker.toyworld")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # encoders (frozen, random)
    text_tokens: int = 24  # T5 sequence length (tokenizer_2 model_max_length); 3-object captions take 16
    t5_d_model: int = 64
    clip_hidden: int = 32
    # VAE
    # one level: no downsampling (32x32 px -> 16x16 tokens); two levels: factor 2 (-> 8x8 tokens,
    # a quarter of the transformer's work per step)
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_crop: int = 16  # the VAE is convolutional: train on crops, 4x cheaper
    vae_kl: float = 1e-6
    decoder_steps: int = 1500  # decoder-only refinement, encoder frozen
    decoder_lr: float = 1e-3
    # transformer
    num_layers: int = 2
    num_single_layers: int = 3
    heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    # The pooled-CLIP path of the time/text embedding is zeroed and frozen: the prompt then reaches
    # the image only through joint attention to the text tokens, where FLUX binds words to regions
    # (a pooled vector naming every kind lets a small model draw them without attending to words).
    pooled_text: bool = False
    dataset: int = 20000  # distinct training scenes (latents cached once)
    # probability that a training scene's objects share one attribute value (world.sample)
    shared: float = 0.5
    # share of one-object training scenes, textures anchored to the canvas (world.Mix)
    single: float = world.MIX.single
    anchored: bool = world.MIX.anchored
    snap: int = world.MIX.snap
    steps: int = 15000
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 50
    checkpoint_every: int = 100
    # exponential moving average of the transformer's weights (0 = off); the EMA weights are the
    # ones saved, the usual way a diffusion model is sampled
    ema: float = 0.999

    @property
    def mix(self) -> world.Mix:
        return world.Mix(single=self.single, anchored=self.anchored, snap=self.snap)

    @property
    def grid(self) -> tuple[int, int]:
        """Image tokens (height, width) of a scene: the VAE's factor (one per extra level), then
        FLUX's 2x2 packing."""
        return lat.geometry(world.IMAGE_SIZE, world.IMAGE_SIZE, 2 ** (len(self.vae_channels) - 1)).grid


def caption_words(corpus: list[str]) -> list[str]:
    """The words of the world's captions, sorted (what the T5 tokenizer keeps whole and the card lists)."""
    return sorted({w for c in corpus for w in c.replace(",", " ").split()})


def word_t5_tokenizer(corpus: list[str]):
    """A T5-style Unigram tokenizer with one piece per word of the world (plus single characters
    for anything else), so every attribute word is one token: a trained Unigram vocabulary this
    small keeps only some whole words and spells the rest letter by letter."""
    import string

    from tokenizers import AddedToken, Tokenizer, models

    words = caption_words(corpus)
    specials = (tm.T5_PAD, tm.T5_EOS, tm.T5_UNK)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = ([(t, 0.0) for t in specials] + [("\u2581" + w, -1.0) for w in words] + [("\u2581", -5.0)]
              + [(c, -10.0) for c in chars])
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tm.t5_pipeline(tok, eos_id=1)


def build_tokenizers(out: Path, cfg: TrainConfig) -> None:
    corpus = world.corpus(seed=cfg.seed)
    clip_tok, clip_vocab, clip_merges = tm.train_clip_tokenizer(corpus, 600)
    t5_tok = word_t5_tokenizer(corpus)
    tm.save_clip_tokenizer(clip_tok, clip_vocab, clip_merges, out / "tokenizer")
    tm.save_t5_tokenizer(t5_tok, out / "tokenizer_2")
    # short sequences: the world's captions are at most 16 tokens
    for sub in ("tokenizer", "tokenizer_2"):
        p = out / sub / "tokenizer_config.json"
        c = json.loads(p.read_text())
        c["model_max_length"] = cfg.text_tokens
        p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def build_encoders(out: Path, cfg: TrainConfig) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    t5_vocab = tok.load_tokenizer(out / "tokenizer_2")
    torch.manual_seed(cfg.seed + 1)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=cfg.clip_hidden, intermediate_size=2 * cfg.clip_hidden,
        projection_dim=cfg.clip_hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=cfg.text_tokens, hidden_act="quick_gelu", bos_token_id=clip_vocab[tm.CLIP_BOS],
        eos_token_id=clip_vocab[tm.CLIP_EOS], pad_token_id=clip_vocab[tm.CLIP_EOS],
    )).save_pretrained(out / "text_encoder")
    torch.manual_seed(cfg.seed + 2)
    T5EncoderModel(T5Config(
        vocab_size=json.loads((out / "tokenizer_2" / "tokenizer.json").read_text())["model"]["vocab"].__len__(),
        d_model=cfg.t5_d_model, d_kv=cfg.t5_d_model // 2, d_ff=2 * cfg.t5_d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=True, use_cache=False, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).save_pretrained(out / "text_encoder_2")
    del t5_vocab


def render_batch(seeds, mix: world.Mix = world.MIX) -> np.ndarray:
    """[B, 3, 32, 32] float32 in [-1, 1] (the VAE's pixel range)."""
    ims = np.stack([world.sample(int(s), mix=mix).image for s in seeds])  # [B, 32, 32, 3]
    return (ims.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def make_vae(cfg: TrainConfig, scaling: float = 1.0, shift: float = 0.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels), block_out_channels=cfg.vae_channels, layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=8, sample_size=world.IMAGE_SIZE,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, force_upcast=True)


def train_vae(out: Path, cfg: TrainConfig, curves: Path):
    import torch

    torch.manual_seed(cfg.seed + 3)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 100)
    t0 = time.time()
    with open(curves / "vae_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "recon_mse", "kl", "seconds"])
        for it in range(cfg.vae_steps):
            lr = cfg.vae_lr * min(1.0, (it + 1) / 50) * (0.5 * (1 + math.cos(math.pi * it / cfg.vae_steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            x = render_batch(rng.integers(10**9, 2 * 10**9, cfg.vae_batch), cfg.mix)  # [B, 3, 32, 32]
            cy, cx = rng.integers(0, world.IMAGE_SIZE - cfg.vae_crop + 1, 2)
            x = torch.from_numpy(np.ascontiguousarray(x[:, :, cy:cy + cfg.vae_crop, cx:cx + cfg.vae_crop]))
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            mse = torch.mean((rec - x) ** 2)
            kl = post.kl().mean() / (16 * cfg.vae_crop ** 2)
            loss = mse + cfg.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w.writerow([it, f"{mse.item():.6f}", f"{kl.item():.4f}", f"{time.time() - t0:.1f}"])
            if it % 50 == 0 or it == cfg.vae_steps - 1:
                f.flush()
                log.info("vae step %d/%d mse %.5f kl %.3f %s", it, cfg.vae_steps, mse.item(), kl.item(),
                         progress(it + 1, cfg.vae_steps, time.time() - t0))
    vae.eval()
    return vae


def refine_decoder(vae, cfg: TrainConfig, curves: Path):
    """Train the decoder alone on full scenes with the encoder frozen: sharper colours and
    textures, and the latent space the transformer learns is unchanged."""
    import torch

    torch.manual_seed(cfg.seed + 5)
    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 300)
    t0 = time.time()
    vae.encoder.requires_grad_(False)
    with open(curves / "decoder_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "recon_l1", "seconds"])
        for it in range(cfg.decoder_steps):
            lr = cfg.decoder_lr * 0.5 * (1 + math.cos(math.pi * it / cfg.decoder_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.from_numpy(render_batch(rng.integers(2 * 10**9, 3 * 10**9, cfg.vae_batch), cfg.mix))
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
            loss = torch.mean(torch.abs(rec - x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w.writerow([it, f"{loss.item():.6f}", f"{time.time() - t0:.1f}"])
            if it % 50 == 0 or it == cfg.decoder_steps - 1:
                f.flush()
                log.info("decoder step %d/%d l1 %.5f %s", it, cfg.decoder_steps, loss.item(),
                         progress(it + 1, cfg.decoder_steps, time.time() - t0))
    vae.encoder.requires_grad_(True)
    vae.eval()
    return vae


@dataclass
class Dataset:
    latents: np.ndarray  # [N, I, 64] packed, normalised like the runtime's latents
    caption_index: np.ndarray  # [N] int -> captions
    captions: list[str]
    shift: float
    scaling: float


def encode_dataset(vae, cfg: TrainConfig) -> tuple[Dataset, float, float]:
    import torch

    cidx: dict[str, int] = {}
    means, caps = [], []
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, cfg.dataset, 256):
            seeds = range(start, min(start + 256, cfg.dataset))
            samples = [world.sample(s, cfg.shared, cfg.mix) for s in seeds]
            x = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
            z = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.mode()  # [b, 16, 32/f, 32/f]
            means.append(z.numpy())
            caps += [cidx.setdefault(s.caption, len(cidx)) for s in samples]
    z = np.concatenate(means)  # [N, 16, 32/f, 32/f]
    shift = float(z.mean())
    scaling = float(1.0 / z.std())
    log.info("encoded %d scenes (%d distinct captions) in %.0fs; latent shift %.4f scaling %.4f", len(z), len(cidx),
             time.time() - t0, shift, scaling)
    packed = lat.pack_latents((z - shift) * scaling).astype(np.float32)  # [N, (16/f)^2, 64]
    return Dataset(packed, np.asarray(caps), list(cidx), shift, scaling), shift, scaling


def encode_captions(out: Path, captions: list[str], cfg: TrainConfig):
    """(t5 embeds [C, T, D], pooled [C, Dp]) computed exactly as the runtime computes them."""
    import torch

    from deleaker.modeling.checkpoint import load_checkpoint

    del load_checkpoint  # encoders are loaded directly: the folder is not complete yet
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok = tok.load_tokenizer(out / "tokenizer")
    t5_tok = tok.load_tokenizer(out / "tokenizer_2")
    clip = CLIPTextModel.from_pretrained(out / "text_encoder", local_files_only=True).eval()
    t5 = T5EncoderModel.from_pretrained(out / "text_encoder_2", local_files_only=True).eval()
    embeds, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(captions), 512):
            chunk = captions[i:i + 512]
            clip_ids = torch.from_numpy(tok.clip_input_ids(clip_tok, chunk, cfg.text_tokens)).long()
            t5_ids = torch.from_numpy(tok.t5_input_ids(t5_tok, chunk, cfg.text_tokens)).long()
            pooled.append(clip(clip_ids, output_hidden_states=False).pooler_output)
            embeds.append(t5(t5_ids, output_hidden_states=False)[0])  # [c, T, D]
    return torch.cat(embeds).float(), torch.cat(pooled).float()


def make_transformer(cfg: TrainConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.t5_d_model, pooled_projection_dim=cfg.clip_hidden, guidance_embeds=False,
        axes_dims_rope=cfg.axes_dims_rope)


def sample_sigmas(rng: np.random.Generator, n: int, mu: float) -> np.ndarray:
    """Logit-normal u, then the runtime's exponential time shift with this image size's mu."""
    u = 1.0 / (1.0 + np.exp(-rng.standard_normal(n)))
    u = np.clip(u, 1e-4, 1 - 1e-4)
    return (math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))).astype(np.float32)


def progress(done: int, total: int, seconds: float) -> str:
    """'0.112 s/step, 1m52s elapsed, ETA 26m10s' from `done` of `total` steps in `seconds`."""
    def hms(t: float) -> str:
        t = int(round(t))
        return f"{t // 3600}h{t // 60 % 60:02d}m" if t >= 3600 else f"{t // 60}m{t % 60:02d}s"

    per = seconds / max(done, 1)
    return f"{per:.3f} s/step, {hms(seconds)} elapsed, ETA {hms(per * (total - done))}"


def data_digest(data: Dataset) -> str:
    """sha256 of the training latents and captions: a resumed run must train on the same data."""
    h = hashlib.sha256(np.ascontiguousarray(data.latents).tobytes())
    h.update("\n".join(data.captions).encode())
    h.update(np.ascontiguousarray(data.caption_index).tobytes())
    return h.hexdigest()


STATE_FILE = "state.pt"  # in DIR-training/: what --resume continues from


def save_state(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run stopped while writing keeps the previous state


def train_transformer(out: Path, cfg: TrainConfig, data: Dataset, embeds, pooled, curves: Path,
                      stop_after: int | None = None, resume: bool = False):
    import copy

    import torch

    torch.manual_seed(cfg.seed + 4)
    model = make_transformer(cfg)
    if not cfg.pooled_text:
        proj = model.time_text_embed.text_embedder
        torch.nn.init.zeros_(proj.linear_2.weight)
        torch.nn.init.zeros_(proj.linear_2.bias)
        proj.requires_grad_(False)  # stays zero: pooled_projections has no effect
    n_params = sum(p.numel() for p in model.parameters())
    saved = model  # what the checkpoints write: the EMA copy when cfg.ema is set
    ema = None
    if cfg.ema:
        ema = saved = copy.deepcopy(model).eval().requires_grad_(False)
    log.info("transformer: %d double + %d single blocks, width %d, %.2fM parameters", cfg.num_layers,
             cfg.num_single_layers, cfg.heads * cfg.head_dim, n_params / 1e6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0,
                            betas=(0.9, 0.99))
    grid = cfg.grid
    mu = FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER_CONFIG).mu(grid[0] * grid[1])
    img_ids = torch.from_numpy(lat.image_ids(grid))
    txt_ids = torch.from_numpy(lat.text_ids(cfg.text_tokens))
    rng = np.random.default_rng(cfg.seed + 200)
    digest = data_digest(data)
    start, run, before = 0, None, 0.0  # first step, running loss, seconds spent before a resume
    state_path = curves / STATE_FILE
    if resume:
        st = torch.load(state_path, weights_only=False)
        if st["data_digest"] != digest:
            raise ValueError(f"--resume: the training latents differ from the stopped run's ({state_path}); "
                             "was the VAE or the world changed?")
        model.load_state_dict(st["model"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        rng.bit_generator.state = st["numpy_rng"]
        torch.set_rng_state(st["torch_rng"])
        start, run, before = st["step"], st["running_loss"], st["seconds"]
        log.info("resuming the transformer at step %d/%d from %s", start, cfg.steps, state_path)
    csv_path = curves / "transformer_loss.csv"
    kept = []
    if resume and csv_path.exists():  # rows past the checkpoint are redone
        kept = [r for r in csv.reader(open(csv_path)) if r and r[0] != "step" and int(r[0]) < start]
    t0 = time.time()
    end = min(cfg.steps, stop_after or cfg.steps)
    model.train()
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "seconds"])
        w.writerows(kept)
        for it in range(start, end):
            lr = cfg.lr * min(1.0, (it + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * it / cfg.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = rng.integers(0, len(data.latents), cfg.batch)
            x0 = torch.from_numpy(data.latents[idx])  # [B, I, 64]
            noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
            sig = torch.from_numpy(sample_sigmas(rng, cfg.batch, mu))  # [B]
            xt = (1 - sig[:, None, None]) * x0 + sig[:, None, None] * noise
            ci = torch.from_numpy(data.caption_index[idx])
            pred = model(hidden_states=xt, encoder_hidden_states=embeds[ci], pooled_projections=pooled[ci],
                         timestep=sig, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
            loss = torch.mean((pred - (noise - x0)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - cfg.ema)
            run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
            w.writerow([it, f"{loss.item():.5f}", f"{lr:.6f}", f"{before + time.time() - t0:.1f}"])
            if it % 25 == 0 or it + 1 == end:
                f.flush()
                log.info("transformer step %d/%d loss %.4f (avg %.4f) %s", it + 1, cfg.steps, loss.item(), run,
                         progress(it + 1 - start, cfg.steps - start, time.time() - t0))
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == end:
                f.flush()
                model.eval()
                saved.save_pretrained(out / "transformer")
                model.train()
                save_state(state_path, {
                    "step": it + 1, "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": opt.state_dict(), "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "running_loss": run, "data_digest": digest,
                    "seconds": before + time.time() - t0})
                log.info("checkpoint at step %d written to %s", it + 1, out / "transformer")
    return saved, before + time.time() - t0


def plot_loss(curves: Path, png: Path) -> None:
    """The transformer's loss per step and its running mean, from transformer_loss.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(curves / "transformer_loss.csv")))
    step = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    k = min(25, len(loss))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(step, loss, lw=0.5, color="#bbbbbb", label="batch loss")
    ax.plot(step[k - 1:], smooth, color="#2a6fdb", label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_layout(out: Path, cfg: TrainConfig) -> None:
    import diffusers

    sched = {**FLUX_DEV_SCHEDULER_CONFIG, "_diffusers_version": diffusers.__version__}
    tm._write_json(out / "scheduler" / "scheduler_config.json", sched)
    tm._write_json(out / "model_index.json", tm._model_index())
    write_card(out, cfg)


def write_card(out: Path, cfg: TrainConfig) -> None:
    """deleaker.json (runtime/model_card.py): the preset, the size, the world's words and the demo
    prompt, so the runtime serves this model with its own defaults and refuses foreign words."""
    from deleaker.runtime.model_card import CARD_FILE

    tm._write_json(out / CARD_FILE, {
        "preset": PRESET_NAME, "height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE,
        "vocabulary": caption_words(world.corpus(seed=cfg.seed)),
        "example": {"prompt": DEMO_PROMPT, "entities": list(DEMO_ENTITIES)},
        "about": "the toy world (docs/toyworld.md): coloured, textured shapes on a grey ground"})


RECIPE_OPTIONS = ("seed", "steps", "vae_steps", "decoder_steps", "dataset", "shared", "single", "anchored", "snap",
                  "pooled_text", "vae_channels", "ema", "batch", "lr", "heads", "checkpoint_every", "reuse")


def check_options(args) -> None:
    """Every option checked before any work or any folder is made (one-line ValueErrors)."""
    if args.resume is not None:
        given = [o for o in RECIPE_OPTIONS + ("out",) if getattr(args, o) not in (None, False)]
        if given:
            raise ValueError(f"--resume takes the recipe from the stopped run; drop --{given[0].replace('_', '-')}")
        run = _curves(args.resume) / RUN_FILE
        if not run.is_file():
            raise ValueError(f"--resume {args.resume} is not an --out of this script (no {run})")
    elif args.out is None:
        raise ValueError("--out is required (or --resume DIR to continue a stopped run)")
    for name in ("threads", "steps", "vae_steps", "decoder_steps", "dataset", "heads", "stop_after", "batch",
                 "checkpoint_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.ema is not None and not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema is a decay in [0, 1), got {args.ema}")
    if args.lr is not None and not 0.0 < args.lr < 1.0:
        raise ValueError(f"--lr must be in (0, 1), got {args.lr}")
    if args.vae_channels is not None and (len(args.vae_channels) not in (1, 2) or min(args.vae_channels) < 8
                                          or any(c % 8 for c in args.vae_channels)):
        raise ValueError(f"--vae-channels takes 1 or 2 levels of multiples of 8 channels, got {args.vae_channels}")
    if args.shared is not None and not 0.0 <= args.shared <= 1.0:
        raise ValueError(f"--shared is a probability in [0, 1], got {args.shared}")
    if args.snap is not None and args.snap not in (2, 4):
        raise ValueError(f"--snap takes 2 or 4 (px), got {args.snap}")
    if args.single is not None and not 0.0 <= args.single < 1.0:
        raise ValueError(f"--single is a share in [0, 1), got {args.single}")
    if args.resume is not None:
        return
    out = args.out.expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if args.reuse is not None:
        missing = [s for s in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")
                   if not (args.reuse / s).is_dir()]
        if missing:
            raise ValueError(f"--reuse {args.reuse} is not an earlier --out of this script (no {', '.join(missing)})")
        if args.reuse.expanduser().resolve() == out.resolve():
            raise ValueError("--reuse and --out must be different folders")


RUN_FILE = "run.json"  # in DIR-training/: the options the run was started with (what --resume reads)


def _curves(out: Path) -> Path:
    out = out.expanduser().resolve()
    return out.parent / f"{out.name}-training"


def _channels(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts such as 16,32, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.toyworld.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder to write the model into")
    ap.add_argument("--resume", type=Path, default=None, metavar="DIR",
                    help="continue the stopped run whose --out was DIR from its last checkpoint, with its recipe"
                         " (only --threads and --stop-after may be given with it)")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --resume: the run's)")
    ap.add_argument("--steps", type=int, default=None, help="transformer steps (default: TrainConfig.steps)")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--decoder-steps", type=int, default=None, help="decoder-only refinement steps")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end the transformer stage after this many steps (same schedule as --steps)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="transformer steps between checkpoints (default: TrainConfig.checkpoint_every)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="take tokenizers, encoders and VAE from an earlier --out of this script with the same"
                         " seed (they are deterministic) and run only the transformer stage")
    ap.add_argument("--dataset", type=int, default=None, help="distinct training scenes")
    ap.add_argument("--shared", type=float, default=None,
                    help="probability that a training scene's objects share one attribute value"
                         " (default: TrainConfig.shared)")
    ap.add_argument("--single", type=float, default=None,
                    help="share of one-object training scenes (default: TrainConfig.single)")
    ap.add_argument("--anchored", action="store_true",
                    help="textures anchored to the canvas instead of a random phase per object (world.Mix)")
    ap.add_argument("--snap", type=int, default=None, metavar="PX",
                    help="objects of world.SNAPPED_SIZE px at positions on a PX grid (4: whole 4 px tokens; "
                         "default: anywhere, world.Mix)")
    ap.add_argument("--pooled-text", action="store_true",
                    help="train the pooled-CLIP conditioning path too (default: zeroed and frozen)")
    ap.add_argument("--vae-channels", type=_channels, default=None, metavar="C[,C]",
                    help="the VAE's channels per level: 16 = one level, no downsampling (16x16 tokens); 16,32 = two"
                         " levels, factor 2 (8x8 tokens) (default: TrainConfig.vae_channels)")
    ap.add_argument("--ema", type=float, default=None,
                    help="EMA decay of the saved transformer weights, 0 = off (default: TrainConfig.ema)")
    ap.add_argument("--batch", type=int, default=None, help="transformer batch (default: TrainConfig.batch)")
    ap.add_argument("--lr", type=float, default=None, help="transformer peak learning rate (default: TrainConfig.lr)")
    ap.add_argument("--heads", type=int, default=None,
                    help="transformer attention heads of 32 channels, i.e. width / 32 (default: TrainConfig.heads)")
    args = ap.parse_args(argv)
    from deleaker.runtime.errors import run_reporting_errors

    return run_reporting_errors(ap.prog, lambda: _train(args))


def _config(args) -> TrainConfig:
    given = {"steps": args.steps, "vae_steps": args.vae_steps, "decoder_steps": args.decoder_steps,
             "dataset": args.dataset, "heads": args.heads, "shared": args.shared, "single": args.single,
             "anchored": args.anchored or None, "snap": args.snap, "pooled_text": args.pooled_text or None, "ema": args.ema,
             "batch": args.batch, "lr": args.lr, "checkpoint_every": args.checkpoint_every,
             "vae_channels": tuple(args.vae_channels) if args.vae_channels else None}
    return TrainConfig(seed=args.seed or 0, **{k: v for k, v in given.items() if v is not None})


def _train(args) -> int:
    check_options(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from deleaker.modeling.libs import quiet_libraries

    quiet_libraries()
    if args.resume is not None:
        out = args.resume.expanduser().resolve()
        curves = _curves(out)
        run = json.loads((curves / RUN_FILE).read_text())
        c = run["config"]
        cfg = TrainConfig(**{**c, "vae_channels": tuple(c["vae_channels"]), "axes_dims_rope": tuple(c["axes_dims_rope"])})
        reuse = Path(run["reuse"]) if run["reuse"] else None
        threads = args.threads or run["threads"]
        resume = (curves / STATE_FILE).is_file()
        if not resume:
            log.info("no transformer checkpoint in %s: the run starts again from the beginning", curves)
    else:
        cfg, out, reuse, threads, resume = _config(args), args.out.expanduser().resolve(), args.reuse, args.threads or 2, False
        curves = _curves(out)
        run = {"config": asdict(cfg), "reuse": str(reuse.expanduser().resolve()) if reuse else None,
               "threads": threads, "setup_seconds": None}
    torch.set_num_threads(threads)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    curves.mkdir(parents=True, exist_ok=True)
    if not resume:
        (curves / STATE_FILE).unlink(missing_ok=True)
        run["setup_seconds"] = None
        (curves / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    t0 = time.time()
    write_layout(out, cfg)
    if reuse is not None:
        import shutil

        from diffusers import AutoencoderKL

        if not resume:
            for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae"):
                shutil.copytree(reuse / sub, out / sub, dirs_exist_ok=True)
            log.info("reusing tokenizers, encoders and VAE from %s", reuse)
        vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).eval()
        if tuple(vae.config.block_out_channels) != tuple(cfg.vae_channels):
            raise ValueError(f"--reuse {reuse}: its VAE has channels {list(vae.config.block_out_channels)},"
                             f" this run's are {list(cfg.vae_channels)} (--vae-channels)")
        data, _, _ = encode_dataset(vae, cfg)  # latents normalised with the saved shift/scale below
        data.latents = lat.pack_latents(
            (lat.unpack_latents(data.latents, cfg.grid) / data.scaling + data.shift
             - vae.config.shift_factor) * vae.config.scaling_factor).astype(np.float32)
    elif resume:
        from diffusers import AutoencoderKL

        # the encoder is the one the latents were first made with (the decoder refinement froze it)
        vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).eval()
        data, _, _ = encode_dataset(vae, cfg)
    else:
        build_tokenizers(out, cfg)
        build_encoders(out, cfg)
        vae = train_vae(out, cfg, curves)
        data, shift, scaling = encode_dataset(vae, cfg)
        vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
        vae.save_pretrained(out / "vae")
        vae = refine_decoder(vae, cfg, curves)  # does not change the latents the transformer learns
        vae.save_pretrained(out / "vae")
    embeds, pooled = encode_captions(out, data.captions, cfg)
    if not resume:
        run["setup_seconds"] = round(time.time() - t0, 1)
        (curves / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    _, seconds = train_transformer(out, cfg, data, embeds, pooled, curves, args.stop_after, resume)
    # the stages before the transformer plus the transformer's time over every session of the run
    # (a resumed session's re-encoding of the latents is not counted)
    wall = run["setup_seconds"] + seconds
    (curves / "train_config.json").write_text(json.dumps({**asdict(cfg), "threads": threads,
                                                         "wall_seconds": round(wall, 1)}, indent=2))
    plot_loss(curves, curves / "transformer_loss.png")
    log.info("done in %.0fs of this command (%.0fs over the run): %s", time.time() - t0, wall, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
