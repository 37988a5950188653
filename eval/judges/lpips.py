"""LPIPS (Zhang et al. 2018, AlexNet variant, lpips v0.1) of the DeLeaker image against the vanilla one.

Only from local weights (nothing is downloaded): --lpips-weights DIR with
  DIR/alexnet-owt-7be5be79.pth (or alexnet.pth)  torchvision's AlexNet state dict (features.* used)
  DIR/alex.pth (or lpips_alex.pth)               the lpips package's linear layers (lin0..lin4)
Lower is closer (0 = identical). Runs on CPU with torch; no endpoint calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..store import RunDir
from .base import Judge, JudgeUnavailable

BACKBONE_FILES = ("alexnet-owt-7be5be79.pth", "alexnet.pth")
LINEAR_FILES = ("alex.pth", "lpips_alex.pth")
CHANNELS = (64, 192, 384, 256, 256)
# AlexNet `features` indices of the convolutions, and the ReLU outputs LPIPS taps (after each conv)
CONV_INDEX = (0, 3, 6, 8, 10)
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
SCALE = (0.458, 0.448, 0.450)


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    raise JudgeUnavailable(f"LPIPS weights folder {folder} has none of {', '.join(names)}")


class Lpips:
    def __init__(self, folder: str | Path):
        try:
            import torch
        except ImportError:
            raise JudgeUnavailable("LPIPS needs torch: pip install 'deleaker[torch]'") from None
        self.torch = torch
        folder = Path(folder)
        if not folder.is_dir():
            raise JudgeUnavailable(f"--lpips-weights {folder} is not a folder")
        try:
            backbone = torch.load(_find(folder, BACKBONE_FILES), map_location="cpu", weights_only=True)
            linear = torch.load(_find(folder, LINEAR_FILES), map_location="cpu", weights_only=True)
            self.convs = [(backbone[f"features.{i}.weight"].float(), backbone[f"features.{i}.bias"].float())
                          for i in CONV_INDEX]
            self.lins = [linear[f"lin{k}.model.1.weight"].float() for k in range(5)]  # [1, C, 1, 1] each
        except (KeyError, RuntimeError, OSError) as e:
            raise JudgeUnavailable(f"cannot read LPIPS weights in {folder}: {e}") from e
        for k, (c, lin) in enumerate(zip(CHANNELS, self.lins)):
            if self.convs[k][0].shape[0] != c or tuple(lin.shape) != (1, c, 1, 1):
                raise JudgeUnavailable(f"LPIPS weights in {folder} do not have AlexNet's shapes (layer {k})")

    def _features(self, x):
        F = self.torch.nn.functional
        feats = []
        for k, (w, b) in enumerate(self.convs):
            if k in (1, 2):  # max-pool before conv2 and conv3, as in AlexNet.features
                x = F.max_pool2d(x, 3, 2)
            stride, pad = (4, 2) if k == 0 else (1, w.shape[-1] // 2)
            x = F.relu(F.conv2d(x, w, b, stride=stride, padding=pad))
            feats.append(x)
        return feats

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """a, b: [H, W, 3] uint8 -> LPIPS distance."""
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1  # [2, 3, H, W] in [-1, 1]
            x = (x - torch.tensor(SHIFT).view(1, 3, 1, 1)) / torch.tensor(SCALE).view(1, 3, 1, 1)
            total = 0.0
            for f, lin in zip(self._features(x), self.lins):
                f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                d = (f[0:1] - f[1:2]).pow(2)  # [1, C, h, w]
                total += float((d * lin).sum(1).mean())
            return total


class LpipsJudge(Judge):
    name = "lpips"

    def __init__(self, options):
        super().__init__(options)
        if not options.lpips_weights:
            raise JudgeUnavailable("LPIPS skipped: give its weights as a local folder with --lpips-weights "
                                   "(nothing is downloaded)")
        self.metric = Lpips(options.lpips_weights)

    def judge_item(self, item: dict, run: RunDir) -> dict:
        a, b = (np.asarray(Image.open(run.root / item[v]).convert("RGB")) for v in ("vanilla", "deleaker"))
        return {"status": "ok", "lpips": self.metric.distance(a, b)}
