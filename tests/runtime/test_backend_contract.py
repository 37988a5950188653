"""Every registered backend declares what it is as data (runtime/backends/base.py: devices,
options, fused attention, torch tensors, switchable attention), and the commands take their
backend flags from those declarations (runtime/backends/options.py), never from a backend's name."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping

import pytest

from deleaker.runtime.backends import Backend, available_backends, backend_class
from deleaker.runtime.backends.options import DEVICE_KINDS, FLAGS, BackendOption, Flag
from deleaker.runtime.cli import _backend_options, _commands, _parser
from deleaker.runtime.serve.cli import parser as serve_parser

NAMES = available_backends()
DECLARED = ("devices", "options", "fused_attention", "torch_tensors", "attention_impls")


def _own(cls, field: str) -> bool:
    """Declared by the backend class itself (or a backend it extends), not inherited from Backend."""
    return any(field in vars(k) for k in cls.__mro__ if k is not Backend and issubclass(k, Backend))


def _other_value(flag: Flag):
    return True if not flag.choices else next(c for c in flag.choices if c != flag.default)


@pytest.mark.parametrize("name", NAMES)
def test_each_backend_declares_what_it_is(name):
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    missing = [f for f in DECLARED if not _own(cls, f)]
    assert not missing, f"{cls.__name__} does not declare {missing}"
    assert isinstance(cls.devices, tuple) and cls.devices and set(cls.devices) <= set(DEVICE_KINDS), cls.devices
    assert type(cls.fused_attention) is bool and type(cls.torch_tensors) is bool
    assert isinstance(cls.attention_impls, tuple) and all(isinstance(i, str) for i in cls.attention_impls)
    assert isinstance(cls.options, tuple)
    load = set(inspect.signature(cls.load).parameters)
    if "kw" in load:  # load(**kw) hands the rest to the constructor
        load |= set(inspect.signature(cls.__init__).parameters)
    for opt in cls.options:
        assert isinstance(opt, BackendOption) and opt.flag in FLAGS, opt
        assert opt.keyword in load, f"{name}.load() takes no {opt.keyword!r} ({opt.flag.name})"
        if opt.values is not None:  # a translation covers every value the flag may take
            assert isinstance(opt.values, Mapping)
            assert set(opt.values) == set(opt.flag.choices or (False, True)), (opt.flag.name, opt.values)
    assert len({o.flag for o in cls.options}) == len(cls.options), "a flag declared twice"


def test_each_flag_names_the_backends_that_declare_it():
    """Flag.backends (its help and errors) is what the registered classes declare; no flag unused."""
    for flag in FLAGS:
        declared = {n for n in NAMES if any(o.flag == flag for o in backend_class(n).options)}
        assert declared and set(flag.backends) == declared, (flag.name, flag.backends, declared)


def _cli_actions(p: argparse.ArgumentParser) -> dict:
    return {a.option_strings[0]: a for a in p._actions if a.option_strings}


@pytest.mark.parametrize("which", ["generate", "serve"])
def test_the_commands_offer_the_declared_flags(which):
    if which == "generate":
        sub = next(a for a in _parser(_commands())._actions if isinstance(a, argparse._SubParsersAction))
        actions = _cli_actions(sub.choices["generate"])
    else:
        actions = _cli_actions(serve_parser())
    for flag in FLAGS:
        a = actions[flag.name]
        assert a.default == flag.default and tuple(a.choices or ()) == flag.choices, flag.name
        assert all(b in a.help for b in flag.backends), a.help


@pytest.mark.parametrize("name", NAMES)
def test_generate_maps_flags_through_the_declarations(name):
    """Each flag, set away from its default: the declared keyword gets the declared value, or a
    one-line error names the backends that take it."""
    cls = backend_class(name)
    sub = next(a for a in _parser(_commands())._actions if isinstance(a, argparse._SubParsersAction))
    gen = sub.choices["generate"]
    device = cls.devices[0]
    base = gen.parse_args(["--out", "x.png", "--device", device])
    opts = _backend_options(base, name)
    assert opts["device"] == device
    for opt in cls.options:  # the defaults, translated
        assert opts[opt.keyword] == opt.value(opt.flag.default)
    for flag in FLAGS:
        value = _other_value(flag)
        args = gen.parse_args(["--out", "x.png", "--device", device]
                              + ([flag.name] if value is True else [flag.name, value]))
        opt = next((o for o in cls.options if o.flag == flag), None)
        if opt is None:
            with pytest.raises(ValueError, match=f"^{flag.name} applies to the {' and '.join(flag.backends)} "):
                _backend_options(args, name)
        else:
            assert _backend_options(args, name)[opt.keyword] == opt.value(value)
    others = [d for d in DEVICE_KINDS if d not in cls.devices]
    for d in others:
        with pytest.raises(ValueError, match=f"the {name} backend runs on .*; got --device {d}"):
            _backend_options(gen.parse_args(["--out", "x.png", "--device", d]), name)


def test_the_declarations_say_what_the_runtime_used_to_infer():
    """The values the runtime once read from names and attributes, now declared."""
    torch_be, aoti, ort, ov, trt = (backend_class(n) for n in ("torch", "aoti", "onnxruntime", "openvino", "tensorrt"))
    assert trt.fused_attention and trt.devices == ("cuda",)
    assert ov.devices == ("cpu",)
    assert torch_be.torch_tensors and aoti.torch_tensors and not ort.torch_tensors
    assert torch_be.attention_impls and not aoti.attention_impls
    assert {o.keyword: o.value("cuda") for o in aoti.options} == {"op": "cuda"}
    assert {o.keyword: o.value("reference") for o in aoti.options} == {"op": "auto"}
