"""Backends' command-line options as data.

`FLAGS` defines each backend flag once, for every command that offers it (`deleaker generate`,
`deleaker serve`); a backend class declares in `Backend.options` which of them its load() takes
and under what keyword (tests/runtime/test_backend_contract.py checks the two agree). The commands add
the flags with `add_backend_flags` and turn parsed arguments into a backend's load() keywords
with `load_options`, so no command names a backend. Lean: no backend is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..dtypes import WEIGHT_DTYPES

DEVICE_KINDS = ("cpu", "cuda")  # what `--device` may name (pipeline.check_device: cpu, cuda, cuda:N)


@dataclass(frozen=True)
class Flag:
    """A command-line flag that some backends take."""

    name: str  # "--attention"
    default: str | bool
    choices: tuple[str, ...]  # () : a switch (store_true, default False)
    help: str
    backends: tuple[str, ...]  # the registered backends that take it (for help and errors; the contract test checks it)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def add_to(self, parser) -> None:
        said = f"{' and '.join(self.backends)} backend{'s' if len(self.backends) > 1 else ''}: {self.help}"
        if self.choices:
            parser.add_argument(self.name, default=self.default, choices=self.choices, help=said)
        else:
            parser.add_argument(self.name, action="store_true", help=said)


ATTENTION = Flag("--attention", "reference", ("reference", "cuda"),
                 "DeLeaker op implementation (cuda: the fused kernels, `make plugin`)", ("torch", "aoti"))
DTYPE = Flag("--dtype", "fp32", tuple(WEIGHT_DTYPES), "weights dtype", ("torch",))
CUDA_GRAPHS = Flag("--cuda-graphs", "auto", ("auto", "on", "off"),
                   "replay each step from a CUDA graph (auto: on for CUDA with the fused op)", ("torch",))
COMPILE = Flag("--compile", False, (), "torch.compile the DeLeaker step", ("torch",))
FLAGS = (ATTENTION, DTYPE, CUDA_GRAPHS, COMPILE)


@dataclass(frozen=True)
class BackendOption:
    """One load() keyword a backend takes from a command-line flag."""

    flag: Flag
    keyword: str  # the load() keyword it sets
    values: Mapping[str, object] | None = None  # flag value -> keyword value, where they differ (None: the same)

    def value(self, given):
        return self.values[given] if self.values is not None else given


def add_backend_flags(parser) -> None:
    for flag in FLAGS:
        flag.add_to(parser)


def load_options(backend_cls, args, **base) -> dict:
    """The load() keywords of `backend_cls` from parsed `args` (its declared options, on top of
    `base`); a one-line ValueError for a --device kind it does not run on, or for a flag set away
    from its default that it does not take."""
    device = getattr(args, "device", None)
    if device is not None and str(device).split(":")[0] not in backend_cls.devices:
        raise ValueError(f"the {backend_cls.name} backend runs on {' or '.join(backend_cls.devices)}; got --device "
                         f"{device}")
    taken = {o.flag.name: o for o in backend_cls.options}
    out = dict(base)
    for flag in FLAGS:
        given = getattr(args, flag.dest, flag.default)
        if flag.name in taken:
            out[taken[flag.name].keyword] = taken[flag.name].value(given)
        elif given != flag.default:
            own = ", ".join(o.flag.name for o in backend_cls.options) or "none"
            raise ValueError(f"{flag.name} applies to the {' and '.join(flag.backends)} "
                             f"backend{'s' if len(flag.backends) > 1 else ''}; the {backend_cls.name} backend does not "
                             f"take it (its options: {own})")
    return out
