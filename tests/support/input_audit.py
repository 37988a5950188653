"""Bad-input audit: feed a list of bad inputs to every entry point and classify each answer.

    python tests/support/input_audit.py [--model DIR] [--out audit.json] [--only AREA,...]

Areas: generate, export, eval, bench (the command lines, run in this process with a time
limit per case), serve (`deleaker serve` start-up, real subprocesses), api (the Python API on
one loaded pipeline) and http (a real `deleaker serve` on 127.0.0.1 with the embedded model).

A command-line case is clean when it exits with the expected code (2 for bad input), prints
exactly one `error:` line and no traceback, and leaves no new file in its scratch folder (the
output path included). An API case is clean when it raises a ValueError with a one-line
message (or, where the documented behaviour is to accept the input, runs). An HTTP case is
clean when the answer is a 4xx with a JSON error body of at most MAX_ECHO characters. Anything
else is reported as what it is: traceback, accepted (exit 0 or still running at the time limit),
partial files, wrong code, long echo, server error. The exit code is 0 when every case tried is clean, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deleaker.benchmarks.serve_process import ServeProcess, deleaker_bin, free_port

PROMPT = "a cat and a cheetah in a field"
CASE_TIMEOUT_S = 20.0  # a bad input is refused in seconds (imports excluded); past this it was accepted
SERVE_START_TIMEOUT_S = 240.0
SERVE_CASE_TIMEOUT_S = 60.0  # a refused start-up ends well within this, model load included
MAX_ECHO = 1000  # characters of an HTTP error message: past this it echoes the input
AREAS = ("generate", "export", "eval", "bench", "serve", "api", "http")


@dataclass
class Outcome:
    area: str
    name: str
    verdict: str  # clean | traceback | accepted | partial files | wrong code | server error | ...
    detail: str  # the message (first line), or what went wrong

    @property
    def clean(self) -> bool:
        return self.verdict == "clean"


@dataclass
class Scratch:
    """The shared inputs: a read-only model and per-case folders under one temp root."""

    root: Path
    model: Path  # the checkpoint cases load (never written to)
    busy_port: int | None = None  # a port this process listens on (the busy-port serve case)
    n: int = 0

    def case_dir(self) -> Path:
        self.n += 1
        d = self.root / f"case{self.n:03d}"
        d.mkdir()
        return d

    def model_copy(self, where: Path) -> Path:
        dst = where / "model"
        shutil.copytree(self.model, dst)
        return dst


# -- command-line cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    area: str
    name: str
    argv: Callable[[Path, Scratch], list[str]]  # (case folder, scratch) -> argv of deleaker / deleaker-export / ...
    tool: str = "deleaker"
    code: int = 2
    prepare: Callable[[Path, Scratch], None] | None = None  # inputs written before the snapshot


class _CaseTimeout(BaseException):
    """Raised by the per-case timer: not an Exception, so no CLI wrapper swallows it."""


def _tool_main(tool: str):
    if tool == "deleaker":
        from deleaker.runtime.cli import main
    elif tool == "deleaker-export":
        from deleaker.export.cli import main
    elif tool == "deleaker-bench":
        from deleaker.benchmarks.cli import main
    else:
        raise ValueError(f"unknown tool {tool}")
    return main


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _reset_logging() -> None:
    # every CLI calls logging.basicConfig: drop the handlers so the next one writes to its own stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def run_cli_case(case: CliCase, scratch: Scratch, timeout: float = CASE_TIMEOUT_S) -> Outcome:
    d = scratch.case_dir()
    if case.prepare is not None:
        case.prepare(d, scratch)
    argv = case.argv(d, scratch)
    main = _tool_main(case.tool)  # imported before the clock starts: the limit is for the case, not the imports
    before = _files(d)
    err, out = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise _CaseTimeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    rc, crash, timed_out = None, None, False
    _reset_logging()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
            except _CaseTimeout:
                timed_out = True
            except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
                crash = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                traceback.print_exc(file=err)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _reset_logging()
    stderr = err.getvalue()
    new = sorted(_files(d) - before)
    errors = [ln for ln in stderr.splitlines() if ": error:" in ln or ln.endswith(": interrupted")]
    detail = errors[0] if errors else (stderr.strip().splitlines() or [""])[-1][:200]
    if timed_out:
        verdict, detail = "accepted", f"still running after {timeout:g}s"
    elif crash is not None or "Traceback (most recent call last)" in stderr:
        verdict, detail = "traceback", crash or detail
    elif rc == 0:
        verdict, detail = "accepted", f"exit 0 {detail}".strip()
    elif rc != case.code:
        verdict, detail = "wrong code", f"exit {rc} (expected {case.code}): {detail}"
    elif len(errors) != 1:
        verdict = "not one line"
        detail = f"{len(errors)} error lines: {stderr.strip()[:200]!r}"
    else:
        verdict = "clean"
    if new and verdict in ("clean", "not one line", "wrong code"):
        verdict, detail = "partial files", f"left {', '.join(new[:5])}: {detail}"
    shutil.rmtree(d, ignore_errors=True)
    return Outcome(case.area, case.name, verdict, detail)


def _gen(*extra: str, model: bool = True):
    def argv(d: Path, s: Scratch) -> list[str]:
        base = ["generate", "--prompt", PROMPT, "--entities", "cat,cheetah", "--steps", "2", "--height", "32",
                "--width", "32", "--out", str(d / "x.png"), "--quiet"]
        if model:
            base += ["--model", str(s.model)]
        extra_args = [a.format(d=d) for a in extra]
        for flag, value in zip(extra_args[::2], extra_args[1::2]):  # a given flag replaces the base one
            if flag in base:
                base[base.index(flag) + 1] = value
            else:
                base += [flag, value]
        return base
    return argv


def _write_manifest(edit: Callable[[dict], None]):
    """An artifact folder whose manifest.json is complete but for `edit` (no model files: the
    manifest is read first)."""
    def prepare(d: Path, s: Scratch) -> None:
        from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG

        m = {"format": "deleaker-artifact", "format_version": 2,
             "model": {"in_channels": 64, "latent_channels": 16, "vae_scale_factor": 8, "vae_scaling_factor": 0.36,
                       "vae_shift_factor": 0.11, "max_text_tokens": 64, "clip_max_length": 77, "entity_slots": 3,
                       "guidance_embeds": True, "blocks_per_step": 4, "scheduler_config": dict(FLUX_DEV_SCHEDULER_CONFIG)},
             "models": {}, "backends": {"onnxruntime": {}}, "files": {}, "tokenizers": {},
             "profiles": {"image_side": [32, 128]}, "deleaker": {"config": {}, "op_version": 2}}
        edit(m)
        (d / "art").mkdir()
        (d / "art" / "manifest.json").write_text(json.dumps(m))
    return prepare


def write_io_artifact(folder: Path, model: Path, graph: dict | None = None,
                      edit: Callable[[dict], None] | None = None) -> Path:
    """An onnxruntime artifact whose four graphs have the step contract's I/O (identity bodies:
    made to be opened, not run) and a manifest that matches them, then `edit`ed. graph:
    {E, T, L} of the graphs (default 4, 64, 77); tokenizers are copied from `model`."""
    import onnx
    from onnx import TensorProto, helper

    from deleaker.runtime import step_io
    from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG

    g = {"E": 4, "T": 64, "L": 77, **(graph or {})}
    dims = {**g, "C": 64, "Cl": 16, "Dt": 32, "Dp": 32, "h": "h", "w": "w", "H": "H", "W": "W"}
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}

    def info(t):
        return helper.make_tensor_value_info(t.name, types[t.dtype], [dims.get(d, d) if isinstance(d, str) else d
                                                                      for d in t.shape])
    folder.mkdir(parents=True)
    models, files = {}, {}
    for m in step_io.MODELS:
        ins = step_io.inputs_for(True) if m.name == "transformer" else m.inputs
        nodes = []
        for o in m.outputs:  # each output shaped from the model's first input (a body made to be opened)
            src = ins[0]
            if len(src.shape) == len(o.shape) and m.name == "transformer":
                nodes.append(helper.make_node("Identity", [next(t.name for t in ins if t.name in (o.name, "history")
                                                                and t.shape == o.shape) if o.name == "history_out"
                                                           else src.name], [o.name]))
                continue
            # Cast -> ReduceSum(axis 1) or Unsqueeze(axis 2) -> Expand to the output's fixed sizes
            x = f"{o.name}_f"
            nodes.append(helper.make_node("Cast", [src.name], [x], to=TensorProto.FLOAT))
            axes = helper.make_tensor(f"{o.name}_axes", TensorProto.INT64, [1], [1 if len(o.shape) <= len(src.shape)
                                                                              else 2])
            target = [dims.get(d, d) if isinstance(d, str) else d for d in o.shape]
            shape = helper.make_tensor(f"{o.name}_shape", TensorProto.INT64, [len(o.shape)],
                                       [1] + [d if isinstance(d, int) and i == 1 else 1
                                              for i, d in enumerate(target[1:], 1)] if len(o.shape) <= len(src.shape)
                                       else [1, 1, target[2]])
            nodes.append(helper.make_node("Constant", [], [f"{o.name}_a"], value=axes))
            nodes.append(helper.make_node("Constant", [], [f"{o.name}_s"], value=shape))
            op = "ReduceSum" if len(o.shape) <= len(src.shape) else "Unsqueeze"
            kw = {"keepdims": 1} if op == "ReduceSum" else {}
            nodes.append(helper.make_node(op, [x, f"{o.name}_a"], [f"{o.name}_r"], **kw))
            nodes.append(helper.make_node("Expand", [f"{o.name}_r", f"{o.name}_s"], [o.name]))
        graph_proto = helper.make_graph(nodes, m.name, [info(t) for t in ins], [info(t) for t in m.outputs])
        proto = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        onnx.save(proto, str(folder / f"{m.name}.onnx"))
        models[m.name] = {"file": f"{m.name}.onnx", "external_data": None,
                          "inputs": {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in ins},
                          "outputs": {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in m.outputs}}
        files[f"{m.name}.onnx"] = (folder / f"{m.name}.onnx").stat().st_size
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(model / tok, folder / tok)
    m = {"format": "deleaker-artifact", "format_version": 2,
         "model": {"in_channels": 64, "latent_channels": 16, "vae_scale_factor": 8, "vae_scaling_factor": 0.36,
                   "vae_shift_factor": 0.11, "max_text_tokens": g["T"], "clip_max_length": g["L"],
                   "entity_slots": g["E"], "guidance_embeds": True, "blocks_per_step": 4,
                   "scheduler_config": dict(FLUX_DEV_SCHEDULER_CONFIG)},
         "models": models, "backends": {"onnxruntime": {n: f"{n}.onnx" for n in step_io.MODEL_NAMES}},
         "files": files, "tokenizers": {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"},
         "profiles": {"image_side": [32, 128]}, "deleaker": {"config": {}, "op_version": 2}}
    if edit is not None:
        edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def _io_artifact(edit: Callable[[dict], None] | None = None, **graph):
    def prepare(d: Path, s: Scratch) -> None:
        write_io_artifact(d / "art", s.model, graph, edit)
    return prepare


def _swap_backend_files(a: str, b: str):
    def edit(m: dict) -> None:
        files = m["backends"]["onnxruntime"]
        files[a], files[b] = files[b], files[a]
    return edit


def _broken_model(how: str):
    """A copy of the model with one defect: swapped text-encoder weights, a transformer tensor
    removed, a transformer file cut short, or the two text-encoder folders swapped."""
    def prepare(d: Path, s: Scratch) -> None:
        m = s.model_copy(d)
        if how == "swapped encoder weights":
            a, b = m / "text_encoder" / "model.safetensors", m / "text_encoder_2" / "model.safetensors"
            tmp = d / "w"
            os.replace(a, tmp), os.replace(b, a), os.replace(tmp, b)
        elif how == "swapped encoder folders":
            os.replace(m / "text_encoder", d / "te"), os.replace(m / "text_encoder_2", m / "text_encoder")
            os.replace(d / "te", m / "text_encoder_2")
        elif how == "transformer tensor missing":
            from safetensors.numpy import load_file, save_file

            f = m / "transformer" / "diffusion_pytorch_model.safetensors"
            tensors = load_file(f)
            tensors.pop(sorted(tensors)[-1])
            save_file(tensors, f, metadata={"format": "pt"})
        elif how == "transformer file cut short":
            f = m / "transformer" / "diffusion_pytorch_model.safetensors"
            os.truncate(f, f.stat().st_size - 1000)
        else:
            raise ValueError(how)
    return prepare


def _model_scheduler_shift(d: Path, s: Scratch) -> None:
    m = s.model_copy(d)
    p = m / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg["shift"] = "three"
    p.write_text(json.dumps(cfg))


def _copy_model(d: Path, s: Scratch) -> None:
    s.model_copy(d)


def _nest_model(d: Path, s: Scratch) -> None:
    (d / "parent").mkdir()
    shutil.copytree(s.model, d / "parent" / "model")


def _empty_jsonl(d: Path, s: Scratch) -> None:
    (d / "empty.jsonl").write_text("")


def _out_dir_named_png(d: Path, s: Scratch) -> None:
    (d / "dir.png").mkdir()


def cli_cases() -> list[CliCase]:
    g = lambda name, *extra, **kw: CliCase("generate", name, _gen(*extra, **{k: v for k, v in kw.items()  # noqa: E731
                                                                          if k == "model"}),
                                            prepare=kw.get("prepare"))
    cases = [
        g("--steps 0", "--steps", "0"),
        g("--steps 1001", "--steps", "1001"),
        g("--steps -5", "--steps", "-5"),
        g("--height 17", "--height", "17"),
        g("--width 0", "--width", "0"),
        g("--height 100000", "--height", "100000"),
        g("--height/--width 4096 (memory)", "--height", "4096", "--width", "4096"),
        g("--guidance 1e38", "--guidance", "1e38"),
        g("--guidance nan", "--guidance", "nan"),
        g("--guidance inf", "--guidance", "inf"),
        g("--guidance -1", "--guidance", "-1"),
        g("--seed -1", "--seed", "-1"),
        g("--seed 2**64", "--seed", str(2 ** 64)),
        g("--device tpu", "--device", "tpu"),
        g("--preset nope", "--preset", "nope"),
        g("--backend nope", "--backend", "nope"),
        g("--entities cat,zebra", "--entities", "cat,zebra"),
        g("--entities with an empty item", "--entities", "cat,,cheetah"),
        g("--entities five entities", "--entities", "cat,cheetah,field,a,and"),
        g("--entities overlapping", "--entities", "cat,a cat"),
        g("--prompt empty", "--prompt", " "),
        g("--prompt lone surrogate", "--prompt", "\udcff a cat"),
        g("--prompt too long", "--prompt", PROMPT + " with a red ball" * 200),
        g("--compare --no-deleaker", "--compare", "--no-deleaker"),
        g("--out .jpg", "--out", "{d}/x.jpg"),
        g("--out in a missing folder", "--out", "{d}/missing/x.png"),
        g("--out is a folder", "--out", "{d}/dir.png", prepare=_out_dir_named_png),
        g("--model missing", "--model", "{d}/no-model"),
        g("--model not a checkpoint", "--model", "{d}"),
        g("--model scheduler shift not a number", "--model", "{d}/model", prepare=_model_scheduler_shift),
        g("--attention cuda on a CPU", "--attention", "cuda"),
        g("--dtype fp16 with --artifact", "--artifact", "{d}/art", "--dtype", "fp16", model=False,
          prepare=_write_manifest(lambda m: None)),
        g("--artifact missing", "--artifact", "{d}/no-art", model=False),
        g("--artifact manifest lacks in_channels", "--artifact", "{d}/art", model=False,
          prepare=_write_manifest(lambda m: m["model"].pop("in_channels"))),
        g("--artifact manifest image_side [64]", "--artifact", "{d}/art", model=False,
          prepare=_write_manifest(lambda m: m["profiles"].update(image_side=[64]))),
        g("--artifact scheduler shift not a number", "--artifact", "{d}/art", model=False,
          prepare=_write_manifest(lambda m: m["model"]["scheduler_config"].update(shift="abc"))),
        g("--artifact manifest not JSON", "--artifact", "{d}/art", model=False,
          prepare=lambda d, s: ((d / "art").mkdir(), (d / "art" / "manifest.json").write_text("{"))),
        # models that lie: each loads "with warnings" or runs on random weights unless refused
        *(g(f"--model {how}", "--model", "{d}/model", prepare=_broken_model(how))
          for how in ("swapped encoder weights", "swapped encoder folders", "transformer tensor missing",
                      "transformer file cut short")),
        # artifacts whose manifest disagrees with the graphs
        g("--artifact manifest names swapped encoder graphs", "--artifact", "{d}/art", model=False,
          prepare=_io_artifact(_swap_backend_files("text_encoder", "text_encoder_2"))),
        g("--artifact manifest entity_slots 3 (graph 4)", "--artifact", "{d}/art", model=False,
          prepare=_io_artifact(lambda m: m["model"].update(entity_slots=3))),
        g("--artifact manifest max_text_tokens 32 (graph 64)", "--artifact", "{d}/art", model=False,
          prepare=_io_artifact(lambda m: m["model"].update(max_text_tokens=32))),
        g("--artifact manifest path ../outside.onnx", "--artifact", "{d}/art", model=False,
          prepare=_io_artifact(lambda m: m["backends"]["onnxruntime"].update(transformer="../outside.onnx"))),
        # text the vocabulary check never saw (the embedded default model has a vocabulary)
        g("--prompt emoji (default model)", "--prompt", "a red striped circle \U0001F600", "--entities", "",
          model=False),
        g("--prompt U+202E (default model)", "--prompt", "a red \u202e striped circle", "--entities", "", model=False),
        g("--prompt punctuation (default model)", "--prompt", "a red striped circle!", "--entities", "", model=False),
        g("--prompt control character", "--prompt", PROMPT + "\x07", "--entities", "cat"),
        # output paths
        g("--out inside --model", "--model", "{d}/model", "--out", "{d}/model/x.png", prepare=_copy_model),
    ]
    x = lambda name, argv, prepare=None: CliCase("export", name, argv, tool="deleaker-export",  # noqa: E731
                                                 prepare=prepare)
    onnx = lambda d, *a: ["onnx", "--model", str(d / "model"), "--height", "32", "--width", "32", "--quiet", *a]  # noqa: E731
    cases += [
        x("onnx --out equal to --model", lambda d, s: onnx(d, "--out", str(d / "model")), _copy_model),
        x("onnx --out equal to --model (--force)", lambda d, s: onnx(d, "--out", str(d / "model"), "--force"),
          _copy_model),
        x("onnx --out inside --model", lambda d, s: onnx(d, "--out", str(d / "model" / "art")), _copy_model),
        x("onnx --out containing --model (--force)",
          lambda d, s: ["onnx", "--model", str(d / "parent" / "model"), "--out", str(d / "parent"), "--height", "32",
                        "--width", "32", "--force", "--quiet"], _nest_model),
        x("onnx --model missing", lambda d, s: onnx(d, "--out", str(d / "art"))),
        x("onnx --height 17", lambda d, s: onnx(d, "--out", str(d / "art"), "--height", "17"), _copy_model),
        x("onnx --min-size > --max-size", lambda d, s: onnx(d, "--out", str(d / "art"), "--min-size", "256",
                                                            "--max-size", "64"), _copy_model),
        x("onnx --entity-slots 0", lambda d, s: onnx(d, "--out", str(d / "art"), "--entity-slots", "0"), _copy_model),
        x("onnx --max-batch 0", lambda d, s: onnx(d, "--out", str(d / "art"), "--max-batch", "0"), _copy_model),
        x("onnx --preset nope", lambda d, s: onnx(d, "--out", str(d / "art"), "--preset", "nope"), _copy_model),
    ]
    e = lambda name, argv, prepare=None, code=2: CliCase("eval", name, argv, code=code, prepare=prepare)  # noqa: E731
    run = lambda d, s, *a: ["eval", "--quiet", "run", "--model", str(s.model), "--steps", "2", "--height", "32", "--width", "32",  # noqa: E731
                            "--out", str(d / "run"), *a]
    cases += [
        e("run --steps 0", lambda d, s: run(d, s, "--steps", "0")),
        e("run --steps 1001", lambda d, s: run(d, s, "--steps", "1001")),
        e("run --height 17", lambda d, s: run(d, s, "--height", "17")),
        e("run --preset nope", lambda d, s: run(d, s, "--preset", "nope")),
        e("run --model missing", lambda d, s: run(d, s, "--model", str(d / "no-model"))),
        e("run --batch 0", lambda d, s: run(d, s, "--batch", "0")),
        e("run --guidance 1e38", lambda d, s: run(d, s, "--guidance", "1e38")),
        e("run --dataset missing", lambda d, s: run(d, s, "--dataset", str(d / "none.jsonl"))),
        e("check empty .jsonl", lambda d, s: ["eval", "check", "--dataset", str(d / "empty.jsonl")], _empty_jsonl),
        e("check missing dataset", lambda d, s: ["eval", "check", "--dataset", str(d / "none.jsonl")]),
        e("judge missing run", lambda d, s: ["eval", "judge", str(d / "no-run")]),
        e("report missing run", lambda d, s: ["eval", "report", str(d / "no-run")]),
        e("run --out is the --model folder", lambda d, s: run(d, s, "--model", str(d / "model"), "--out",
                                                             str(d / "model")), _copy_model),
        e("run --out inside the --model folder", lambda d, s: run(d, s, "--model", str(d / "model"), "--out",
                                                                 str(d / "model" / "vae" / "run")), _copy_model),
    ]
    b = lambda name, *a: CliCase("bench", name, lambda d, s: [*(x.format(d=d, model=s.model) for x in a),  # noqa: E731
                                                              "--out", str(d / "bench"), "--quiet"],
                                 tool="deleaker-bench")
    cases += [
        b("--model missing", "--model", "{d}/no-model"),
        b("--impl nope", "--model", "{model}", "--impl", "nope"),
        b("--batch 0", "--model", "{model}", "--batch", "0"),
        b("--resolution 17", "--model", "{model}", "--resolution", "17"),
        b("--steps 0", "--model", "{model}", "--steps", "0"),
        b("--preset nope", "--preset", "nope"),
        b("--device tpu", "--model", "{model}", "--device", "tpu"),
    ]
    return cases


# -- serve start-up cases (subprocesses: a server that starts does not return) -------------------


def serve_cases(scratch: Scratch) -> list[tuple[str, list[str]]]:
    base = [*deleaker_bin(), "serve", "--model", str(scratch.model), "--log-level", "warning"]
    cases = [("--port 99999", base + ["--port", "99999"]),
             ("--max-batch 0", base + ["--port", str(free_port()), "--max-batch", "0"]),
             ("--preset nope", base + ["--port", str(free_port()), "--preset", "nope"]),
             ("--model missing", [*deleaker_bin(), "serve", "--model", str(scratch.root / "no-model"),
                                  "--port", str(free_port())])]
    if scratch.busy_port is not None:
        cases.append(("busy --port", base + ["--port", str(scratch.busy_port)]))
    return cases


def start_serve_cases(scratch: Scratch) -> list[tuple[str, subprocess.Popen, float]]:
    """Start every serve case (they run while the other cases do); finish_serve_cases collects them."""
    return [(name, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    errors="replace"), time.monotonic())
            for name, argv in serve_cases(scratch)]


def finish_serve_cases(procs, timeout: float = SERVE_CASE_TIMEOUT_S) -> list[Outcome]:
    out = []
    for name, p, started in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
            out.append(Outcome("serve", name, "accepted", f"still running after {timeout:g}s"))
            continue
        lines = [ln for ln in err.splitlines() if ": error:" in ln]
        detail = lines[0] if lines else (err.strip().splitlines() or [""])[-1][:200]
        if "Traceback (most recent call last)" in err:
            verdict = "traceback"
        elif p.returncode == 0:
            verdict = "accepted"
        elif p.returncode != 2:
            verdict, detail = "wrong code", f"exit {p.returncode} (expected 2): {detail}"
        elif len(lines) != 1:
            verdict, detail = "not one line", f"{len(lines)} error lines: {err.strip()[:200]!r}"
        else:
            verdict = "clean"
        out.append(Outcome("serve", name, verdict, detail))
    return out


# -- Python API cases --------------------------------------------------------------------------


def api_cases(model: Path) -> list[tuple[str, Callable[[], object], bool]]:
    """(name, call, documented_ok): documented_ok cases must run without an error."""
    from deleaker.runtime import DeLeakerConfig, GenerateRequest, load_pipeline

    pipe_box: dict = {}

    def pipe():
        if "p" not in pipe_box:
            pipe_box["p"] = load_pipeline(str(model), progress=False)
        return pipe_box["p"]

    def r(**kw):
        base = dict(prompt=PROMPT, entities=("cat", "cheetah"), steps=1, height=16, width=16)
        return GenerateRequest(**{**base, **kw})

    gen = lambda **kw: lambda: pipe().generate(r(**kw))  # noqa: E731
    return [
        ("GenerateRequest(deleaker='no')", gen(deleaker="no"), False),
        ("GenerateRequest(entities=None) (documented: no entities)", gen(entities=None), True),
        ("generate(a dict)", lambda: pipe().generate({"prompt": PROMPT}), False),
        ("generate(a str)", lambda: pipe().generate(PROMPT), False),
        ("generate(errors='bogus')", lambda: pipe().generate([r()], errors="bogus"), False),
        ("guidance_scale=1e38", gen(guidance_scale=1e38), False),
        ("guidance_scale=nan", gen(guidance_scale=float("nan")), False),
        ("steps=0", gen(steps=0), False),
        ("steps=1001", gen(steps=1001), False),
        ("steps=2.5", gen(steps=2.5), False),
        ("height=17", gen(height=17), False),
        ("height=width=4096 (memory)", gen(height=4096, width=4096), False),
        ("seed=2**63", gen(seed=2 ** 63), False),
        ("prompt lone surrogate", gen(prompt="\ud800 cat"), False),
        ("prompt=None", gen(prompt=None), False),
        ("entities='cat'", gen(entities="cat"), False),
        ("entities=('cat', 'zebra')", gen(entities=("cat", "zebra")), False),
        ("config='flux-dev' (a str)", gen(config="flux-dev"), False),
        ("config k_strength=1e39", gen(config=DeLeakerConfig(k_strength=1e39)), False),
        ("config use_history='no'", gen(config=DeLeakerConfig(use_history="no")), False),
        ("config start_intervention_from=2**70", gen(config=DeLeakerConfig(start_intervention_from=2 ** 70)), False),
        ("load_pipeline(device='tpu')", lambda: load_pipeline(str(model), device="tpu"), False),
        ("load_pipeline(config='x')", lambda: load_pipeline(str(model), config="x"), False),
        ("load_pipeline(max_batch=0)", lambda: load_pipeline(str(model), max_batch=0), False),
        ("load_pipeline(missing folder)", lambda: load_pipeline(str(model) + "-missing"), False),
        ("load_pipeline(backend='nope')", lambda: load_pipeline(str(model), backend="nope"), False),
        ("load_pipeline(123)", lambda: load_pipeline(123), False),
        ("generate(progress='yes')", lambda: pipe().generate(r(), progress="yes"), False),
    ]


def run_api_cases(model: Path) -> list[Outcome]:
    out = []
    for name, call, ok in api_cases(model):
        try:
            call()
        except ValueError as e:
            msg = str(e)
            verdict = "accepted-as-error" if ok else ("clean" if msg and "\n" not in msg else "not one line")
            out.append(Outcome("api", name, verdict, f"{type(e).__name__}: {msg[:200]}"))
        except Exception as e:  # noqa: BLE001
            out.append(Outcome("api", name, "traceback", f"{type(e).__name__}: {str(e)[:200]}"))
        else:
            out.append(Outcome("api", name, "clean" if ok else "accepted", "ran" if ok else "no error raised"))
    return out


# -- HTTP cases --------------------------------------------------------------------------------


def audit_server(model: Path, log_path: Path) -> ServeProcess:
    """A real `deleaker serve` on 127.0.0.1 (the given model, small limits). Started at once;
    wait_ready() blocks until /health answers 200, so other cases run while it warms up."""
    return ServeProcess(["--model", str(model), "--max-batch", "2", "--max-size", "128", "--min-size", "16",
                         "--default-size", "32x32", "--log-level", "warning"], log_path, name="the audit server")


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the escape \ud800


def http_cases() -> list[tuple[str, str, bytes, dict]]:
    """(name, method, body, headers) for POST /v1/images/generations (GET for the method case)."""
    j = {"Content-Type": "application/json"}
    ok = dict(prompt=PROMPT, entities=["cat", "cheetah"], steps=1, size="32x32")
    c = lambda name, **kw: (name, "POST", _json({**ok, **kw}), j)  # noqa: E731
    return [
        c("prompt lone surrogate", prompt="\ud800 a cat and a cheetah"),
        c("prompt empty", prompt="  "),
        c("prompt 3000 characters", prompt="a cat " * 500),
        c("prompt a number", prompt=5),
        c("guidance 1e38", guidance=1e38),
        ("guidance NaN", "POST", b'{"prompt": "a cat and a cheetah", "guidance": NaN, "steps": 1}', j),
        c("guidance a string", guidance="high"),
        c("steps 0", steps=0),
        c("steps 51 (over --max-steps)", steps=51),
        c("steps a string", steps="ten"),
        c("n 0", n=0),
        c("n 100", n=100),
        c("size abc", size="abc"),
        c("size 4096x4096", size="4096x4096"),
        c("size 100x100", size="100x100"),
        c("seed -1", seed=-1),
        c("seed 2**64", seed=2 ** 64),
        c("entities not in the prompt", entities=["zebra"]),
        c("entities five", entities=["cat", "cheetah", "field", "a", "and"]),
        c("entities a string", entities="cat"),
        c("deleaker 'no'", deleaker="no"),
        c("deleaker_settings k_strength 1e39", deleaker_settings={"k_strength": 1e39}),
        c("deleaker_settings num_steps", deleaker_settings={"num_steps": 3}),
        c("deleaker_settings unknown", deleaker_settings={"bogus": 1}),
        c("deleaker_settings do_smoothing 'no'", deleaker_settings={"do_smoothing": "no"}),
        c("unknown field", colour="red"),
        c("response_format url", response_format="url"),
        ("malformed JSON", "POST", b'{"prompt": ', j),
        ("body a list", "POST", b"[1, 2]", j),
        ("body not JSON content type", "POST", _json(ok), {"Content-Type": "text/plain"}),
        ("body over the size limit", "POST", _json({**ok, "prompt": "a" * 70_000}), j),
        ("GET the generate route", "GET", b"", {}),
        ("body nested 30000 deep", "POST", b'{"prompt": "a cat", "entities": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", j),
        ("body nested 200 deep", "POST", b'{"prompt": "a cat", "user": ' + b"[" * 200 + b"]" * 200 + b"}", j),
        c("entity of 50 KB (echo bounded)", entities=["cat", "z" * 50_000]),
        c("prompt U+202E", prompt="a cat \u202e and a cheetah in a field"),
        c("prompt control character", prompt="a cat and a cheetah\x1b[31m in a field"),
    ]


def run_http_cases(port: int) -> list[Outcome]:
    import httpx

    from deleaker.runtime.serve.client import GENERATE_PATH

    out = []
    url = f"http://127.0.0.1:{port}{GENERATE_PATH}"
    with httpx.Client(timeout=120) as client:
        for name, method, body, headers in http_cases():
            try:
                resp = client.request(method, url, content=body or None, headers=headers)
            except httpx.HTTPError as e:
                out.append(Outcome("http", name, "no answer", f"{type(e).__name__}: {e}"))
                continue
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = None
            if 400 <= resp.status_code < 500 and isinstance(message, str) and len(message) > MAX_ECHO:
                verdict = "long echo"
            elif 400 <= resp.status_code < 500 and isinstance(message, str) and message:
                verdict = "clean"
            elif resp.status_code >= 500:
                verdict = "server error"
            elif resp.status_code < 400:
                verdict = "accepted"
            else:
                verdict = "no JSON error"
            out.append(Outcome("http", name, verdict, f"{resp.status_code}: {(message or resp.text)[:200]}"))
    return out


# -- the audit ---------------------------------------------------------------------------------


IN_PROCESS_AREAS = ("generate", "export", "eval", "bench", "api")
_WARM_IMPORTS = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "deleaker.modeling.torch_backend",
                 "deleaker.export.onnx_export", "deleaker.export.cli", "deleaker.benchmarks.cli",
                 "deleaker.benchmarks.runner", "deleaker.eval.cli", "deleaker.eval.run",
                 "deleaker.runtime.pipeline")


def run_in_process(model: Path, areas: tuple[str, ...], case_timeout: float = CASE_TIMEOUT_S,
                   say: Callable[[str], None] = lambda msg: None) -> list[Outcome]:
    """The command-line and API cases in this process (one import of each tool). audit() runs
    this in a child process, so a case stopped at its time limit cannot leave state behind."""
    import importlib

    # The tools import these on first use: import them before any case's clock runs, so a time
    # limit never stops an import half-way (which would break every later case).
    for name in _WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="deleaker-audit-") as tmp:
        scratch = Scratch(root=Path(tmp), model=model)
        for case in cli_cases():
            if case.area in areas:
                outcomes.append(run_cli_case(case, scratch, case_timeout))
                say(f"{case.area}: {case.name}: {outcomes[-1].verdict}")
        if "api" in areas:
            outcomes += run_api_cases(model)
            say("api cases done")
    return outcomes


def _child(model: Path, areas: tuple[str, ...], case_timeout: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--in-process", "--model",
                             str(model), "--only", ",".join(areas), "--case-timeout", str(case_timeout), "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")


def audit(model: str | None = None, areas: tuple[str, ...] = AREAS, progress: Callable[[str], None] | None = None,
          case_timeout: float = CASE_TIMEOUT_S) -> list[Outcome]:
    """Run the cases of `areas` against `model` (None: the embedded tiny model) and classify them."""
    if model is None:
        from deleaker.modeling.tiny_model import ensure_tiny_model

        model = ensure_tiny_model()
    say = progress or (lambda msg: None)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="deleaker-audit-") as tmp, contextlib.ExitStack() as stack:
        scratch = Scratch(root=Path(tmp), model=Path(model))
        local = tuple(a for a in areas if a in IN_PROCESS_AREAS)
        child = None
        if local:  # runs while the servers below start
            child = _child(scratch.model, local, case_timeout, scratch.root / "in-process.json")
            stack.callback(lambda: child.poll() is None and child.kill())
        server = None
        if "http" in areas:
            say("starting deleaker serve for the http cases")
            server = audit_server(scratch.model, scratch.root / "serve.log")
            stack.callback(server.close)
        if "serve" in areas:
            busy = stack.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            scratch.busy_port = busy.getsockname()[1]
        serving = start_serve_cases(scratch) if "serve" in areas else []
        stack.callback(lambda: [p.kill() for _, p, _ in serving if p.poll() is None])
        if child is not None:
            _, err = child.communicate()
            result = scratch.root / "in-process.json"
            if not result.exists():
                raise RuntimeError(f"the in-process cases did not finish (exit {child.returncode}): {err[-2000:]}")
            outcomes += [Outcome(**o) for o in json.loads(result.read_text())["outcomes"]]
            say(f"{', '.join(local)} cases done")
        if server is not None:
            outcomes += run_http_cases(server.wait_ready(SERVE_START_TIMEOUT_S))
            say("http cases done")
        if serving:
            outcomes += finish_serve_cases(serving)
            say("serve cases done")
    return outcomes


def case_names(areas: tuple[str, ...] = AREAS) -> list[tuple[str, str]]:
    """(area, name) of every case, in the order audit() runs them (no model needed)."""
    names = [(c.area, c.name) for c in cli_cases() if c.area in areas]
    if "api" in areas:
        names += [("api", n) for n, _, _ in api_cases(Path("unused"))]
    if "http" in areas:
        names += [("http", n) for n, _, _, _ in http_cases()]
    if "serve" in areas:
        names += [("serve", n) for n, _ in serve_cases(Scratch(Path("unused"), Path("unused"), busy_port=0))]
    return names


def table(outcomes: list[Outcome]) -> str:
    rows = ["| area | case | verdict | answer |", "|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| {o.area} | {o.name} | {o.verdict} | {o.detail.replace('|', '/')} |")
    return "\n".join(rows)


def summary(outcomes: list[Outcome]) -> dict:
    by: dict[str, int] = {}
    for o in outcomes:
        by[o.verdict] = by.get(o.verdict, 0) + 1
    return {"tried": len(outcomes), "clean": sum(o.clean for o in outcomes), "by_verdict": by}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/support/input_audit.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="FLUX checkpoint folder the cases load (default: the embedded tiny model)")
    p.add_argument("--out", help="write the outcomes and counts as JSON here")
    p.add_argument("--only", help=f"comma-separated areas: {', '.join(AREAS)} (default: all)")
    p.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT_S,
                   help="seconds a command-line case may run before it counts as accepted")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # audit()'s child
    args = p.parse_args(argv)
    areas = tuple(a.strip() for a in args.only.split(",")) if args.only else AREAS
    unknown = set(areas) - set(AREAS)
    if unknown:
        p.error(f"unknown area(s) {', '.join(sorted(unknown))}; choose from {', '.join(AREAS)}")
    if args.out and not Path(args.out).parent.exists():
        p.error(f"output folder {Path(args.out).parent} does not exist")
    t0 = time.perf_counter()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.in_process:
            outcomes = run_in_process(Path(args.model), areas, args.case_timeout)
        else:
            outcomes = audit(args.model, areas, progress=say, case_timeout=args.case_timeout)
    except KeyboardInterrupt:
        print("input_audit: interrupted", file=sys.stderr)
        return 130
    counts = {**summary(outcomes), "seconds": round(time.perf_counter() - t0, 1)}
    if args.in_process:
        Path(args.out).write_text(json.dumps({"outcomes": [dataclasses.asdict(o) for o in outcomes]}))
        return 0
    print(table(outcomes))
    print(f"\n{counts['tried']} bad inputs tried, {counts['clean']} clean; "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts["by_verdict"].items())))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"counts": counts, "outcomes": [dataclasses.asdict(o) for o in outcomes]},
                                  indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)
    return 0 if counts["clean"] == counts["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
