"""The docs hold in a fresh clone: relative links resolve, and the documented commands and
Python examples run as written on the tiny offline model.

Documents: README.md and docs/*.md.
- Links: every relative link (outside code blocks) names a file in the repository; `#anchors`
  into a markdown file name one of its headings. Nothing points at ../shared.
- ```bash blocks: every command line starting with `deleaker...` or `.venv/bin/deleaker...` is
  run in a scratch folder shared by one document's blocks (in document order, so an artifact
  exported by one command serves the next), with placeholders filled in:
    DIR (a --model / positional model folder) and ~/.cache/deleaker/tiny-flux -> the tiny model,
    ~/.cache/deleaker/tiny-sd3 (-qwenimage, -flux2) -> that family's tiny model (built if missing),
    --prompt "..."                -> a prompt made of the command's --entities,
    relative output paths (artifacts/..., x.png) land in the scratch folder; size flags are kept;
    unless DELEAKER_DOCS_AS_WRITTEN=1, --steps 2 (generate, verify) and --warmup 1 --runs 1
    (bench) are added where the command does not set them, to keep CI fast.
  A command that is the same as one already run (but for --out) is run once.
  Not run, with the reason given: a block preceded by `<!-- gpu-only -->`, a command with
  `--device cuda`, a command whose shell comment (same line or the comment lines just above)
  says `gpu-only`, a command on a checkpoint that is not the tiny model, and a command on an
  artifact that no earlier command of the document exported, `deleaker serve` (runs until
  stopped) and a command that talks to a running server (--url).
- ```python blocks of the documents in PYTHON_DOCS run in order in one fresh interpreter per
  document (a block preceded by `<!-- gpu-only -->` is skipped).
- Output: a block fenced as ```output right after a ```python block is what that block prints,
  and is compared with what it printed when run: line by line, exactly, except that a line ending
  in `...` matches any line that starts with what comes before the `...`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.docs import _FENCE, GPU_MARK, OUTPUT_LANG, ROOT, Block, code_blocks, rel  # noqa: F401

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_DOCS = [ROOT / "docs" / "api.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "models.md"]  # documents whose ```python examples are complete programs
COMMAND_TIMEOUT_S = 300
# CI keeps the documented commands to smoke-test cost: options a command does not set itself are
# added (fewer steps and timed runs; sizes are never changed). DELEAKER_DOCS_AS_WRITTEN=1 runs
# every command exactly as written.
AS_WRITTEN = os.environ.get("DELEAKER_DOCS_AS_WRITTEN", "") not in ("", "0")
CHEAP_DEFAULTS = {
    ("deleaker", "generate"): (("--steps", "2"),),
    ("deleaker-export", "verify"): (("--steps", "2"),),
    ("deleaker-bench", None): (("--warmup", "1"), ("--runs", "1")),
}
TINY_PLACEHOLDERS = ("DIR", "~/.cache/deleaker/tiny-flux")
# a model family's tiny folder as the docs name it (python -m deleaker.modeling.tiny_model --family F)
TINY_FAMILY = re.compile(r"~/\.cache/deleaker/tiny-(sd3|qwenimage|flux2)")


def _tiny_family(arg: str) -> str | None:
    """The built folder of a family tiny-model path the docs name, else None."""
    m = TINY_FAMILY.fullmatch(arg)
    if m is None:
        return None
    from deleaker.modeling.tiny_model import ensure_tiny_family

    return str(ensure_tiny_family(m.group(1)))


def output_matches(expected: str, got: str) -> bool:
    """Line by line; an expected line ending in `...` matches any line starting with the rest."""
    want, have = expected.rstrip("\n").splitlines(), got.rstrip("\n").splitlines()
    return len(want) == len(have) and all(
        h.rstrip().startswith(w[:-3].rstrip()) if w.rstrip().endswith("...") else h.rstrip() == w.rstrip()
        for w, h in zip(want, have))


def prose(doc: Path) -> str:
    """The document without its fenced code blocks and inline code spans."""
    out, fence = [], None
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append(re.sub(r"`[^`]*`", "", line))
        else:
            out.append("")
    return "\n".join(out)


def links(doc: Path) -> list[str]:
    text = prose(doc)
    found = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)  # [text](target "title")
    found += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)  # [ref]: target
    found += re.findall(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", text)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    out = set()
    for line in prose(doc).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(slug(m.group(1)))
    return out


# --- (a) links ------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve(doc):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:, chrome: ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if ROOT not in path.parents and path != ROOT:
            bad.append(f"{target} (outside the repository)")
        elif not path.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target} (no heading #{anchor} in {rel(path)})")
    assert not bad, f"{rel(doc)}: broken links: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_no_reference_to_the_shared_folder(doc):
    # a clone has no ../shared: the project's own copy of the semantics is docs/semantics.md
    hits = [i + 1 for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines())
            if re.search(r"(\.\./)+shared/|/work/shared", line)]
    assert not hits, f"{rel(doc)} refers to the shared folder on line(s) {hits}; link docs/semantics.md instead"


def test_semantics_doc_is_the_projects_own():
    doc = ROOT / "docs" / "semantics.md"
    text = doc.read_text(encoding="utf-8")
    for heading in ("Configuration", "The history: state between blocks", "One block at clock tau",
                    "Entity tokens", "Where this project differs", "Op contract v2"):
        assert slug(heading) in anchors(doc), heading
    assert "(op-contract.md)" in text and "runtime/op_schema.py" in text


# --- (b) bash commands ----------------------------------------------------------------------------

@dataclass
class DocRun:
    """State shared by one document's commands: scratch folder and what earlier commands made."""

    cwd: Path
    made: set[str] = field(default_factory=set)


_RUNS: dict[Path, DocRun] = {}
_RAN: dict[tuple, str] = {}  # command (its --out left out) -> where it already ran successfully


def _same_command_key(cmd: list[str]) -> tuple:
    out = _opt(cmd, "--out")
    return tuple(a for a in cmd if a not in ("--out", out)) if out is not None else tuple(cmd)


def _split_comment(cmd: str) -> tuple[str, str]:
    """(command, trailing shell comment): the first ` #` outside quotes starts the comment."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i], cmd[i + 1:].strip()
    return cmd, ""


def commands(block: Block) -> list[tuple[int, str, str]]:
    """(line, command, comment) for each command line of a bash block: continuations joined, the
    shell comment of the line and of the comment lines just above it kept for skip markers."""
    out, pending, comment, start = [], "", [], 0
    for n, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if not pending and line.lstrip().startswith("#"):
            comment.append(line.lstrip("# "))
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        cmd = pending + line
        pending = ""
        if not cmd.strip():
            comment = []
            continue
        body, trailing = _split_comment(cmd)
        out.append((block.line + 1 + start, body.strip(), " ".join(comment + [trailing])))
        comment = []
    return out


def _is_ours(argv: list[str]) -> bool:
    return bool(argv) and re.fullmatch(r"(\.venv/bin/)?deleaker(-[a-z]+)?", argv[0]) is not None


def _opt(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def plan(argv: list[str], comment: str, run: DocRun, tiny: Path) -> tuple[list[str] | None, str]:
    """The argv to run (placeholders filled in), or None and why it is not run here."""
    text = " ".join(argv)
    if re.search(r"--device[ =]cuda", text):
        return None, "needs a GPU (--device cuda)"
    if "gpu-only" in comment.lower():
        return None, "marked gpu-only"
    if len(argv) > 1 and argv[1] == "serve":
        return None, "starts a server that runs until stopped (tests/serve/test_serve.py runs the server)"
    if _opt(argv, "--url") is not None:
        return None, f"needs a running server at {_opt(argv, '--url')}"
    model = _opt(argv, "--model")
    if model is not None and model not in TINY_PLACEHOLDERS and not TINY_FAMILY.fullmatch(model):
        return None, f"needs the checkpoint {model} (not the tiny model)"
    # the artifact a command reads: --artifact X, or `deleaker-export verify X`
    artifact = _opt(argv, "--artifact")
    if artifact is None and len(argv) > 2 and argv[1] == "verify":
        artifact = argv[2]
    if artifact is not None and artifact not in run.made:
        return None, f"needs the artifact {artifact}, which no command of this document that runs here exported"
    exe = Path(sys.executable).parent / Path(argv[0]).name
    out = [str(exe)]
    for a in argv[1:]:
        out.append(str(tiny) if a in TINY_PLACEHOLDERS else _tiny_family(a) or a)
    if not AS_WRITTEN:
        prog = Path(argv[0]).name
        sub = argv[1] if prog != "deleaker-bench" and len(argv) > 1 else None
        for opt, value in CHEAP_DEFAULTS.get((prog, sub), ()):
            if _opt(argv, opt) is None:
                out += [opt, value]
    prompt = _opt(out, "--prompt")
    if prompt is not None and prompt.strip(" .") == "":  # --prompt "...": a prompt naming the entities
        ents = [e for e in (_opt(out, "--entities") or "").split(",") if e]
        filled = " and ".join(f"a {e}" for e in ents) or "a cat"
        out[out.index("--prompt") + 1] = filled + " in a field"
    return out, ""


def bash_cases():
    cases = []
    for doc in DOCS:
        for block in code_blocks(doc):
            if block.lang not in ("bash", "sh", "shell"):
                continue
            for line, cmd, comment in commands(block):
                try:
                    argv = shlex.split(cmd)
                except ValueError:
                    argv = []
                if _is_ours(argv):
                    cases.append(pytest.param(block, line, argv, comment, id=f"{rel(doc)}:{line}"))
    return cases


@pytest.mark.parametrize("block, line, argv, comment", bash_cases())
def test_documented_command_runs(block, line, argv, comment, tiny_model_dir, tmp_path_factory):
    where = f"{rel(block.doc)}:{line}"
    if block.gpu_only:
        pytest.skip(f"{where}: block marked {GPU_MARK}")
    run = _RUNS.setdefault(block.doc, DocRun(tmp_path_factory.mktemp("doc-" + block.doc.stem)))
    cmd, why = plan(argv, comment, run, tiny_model_dir)
    if cmd is None:
        pytest.skip(f"{where}: {why}")
    key = _same_command_key(cmd)
    if key in _RAN and _opt(argv, "--artifact") is None:
        pytest.skip(f"{where}: the same command already ran at {_RAN[key]}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=run.cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, (f"{where}: `{shlex.join(argv)}` exited {proc.returncode}\n"
                                  f"{(proc.stdout + proc.stderr)[-3000:]}")
    out = _opt(argv, "--out")
    if out is not None:
        assert (run.cwd / out).exists(), f"{where}: exited 0 but wrote no {out}"
        run.made.add(out)
    _RAN[key] = where


# --- (c) Python examples --------------------------------------------------------------------------

# each block's stdout is captured and reported on its "ok:" line (JSON), for the output blocks
_RUNNER = r'''
import contextlib, io, json, sys, traceback
blocks = {blocks!r}
ns = {{"__name__": "__main__"}}
for i, (where, code) in enumerate(blocks):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, where, "exec"), ns)
    except BaseException:
        sys.stdout.write(out.getvalue())
        traceback.print_exc()
        print(f"FAILED: python block at {{where}}", file=sys.stderr)
        sys.exit(1)
    print("ok: " + json.dumps([where, out.getvalue()]), flush=True)
'''


@pytest.mark.parametrize("doc", PYTHON_DOCS, ids=rel)
def test_python_examples_run(doc, tmp_path):
    if not doc.exists():
        pytest.skip(f"{rel(doc)} does not exist yet")
    blocks = [b for b in code_blocks(doc) if b.lang in ("python", "py") and not b.gpu_only]
    if not blocks:
        pytest.skip(f"{rel(doc)} has no runnable ```python block")
    script = tmp_path / "examples.py"
    script.write_text(_RUNNER.format(blocks=[(b.where, b.text) for b in blocks]), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    printed = dict(json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ok: "))
    assert len(printed) == len(blocks)
    wrong = [f"{b.where}: the doc shows\n{b.output.text}\nbut it printed\n{printed[b.where]}"
             for b in blocks if b.output is not None and not output_matches(b.output.text, printed[b.where])]
    assert not wrong, "\n".join(wrong)


def test_output_blocks_follow_code_blocks():
    """An ```output block belongs to the code block just before it; one anywhere else is a mistake."""
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "```" + OUTPUT_LANG:
                prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                assert prev.startswith("```"), f"{rel(doc)}:{i + 1}: an output block must follow a code block"


def test_output_matching():
    assert output_matches("[3, 3, 3]\n", "[3, 3, 3]\n")
    assert not output_matches("[3, 3, 3]", "[2, 2, 1]")
    assert output_matches("entity 'x' not found in prompt ...", "entity 'x' not found in prompt 'a b' (also ...)")
    assert not output_matches("a\nb", "a")
