"""Server vs in-process Pipeline on the same batches, over fresh processes.

    python -m deleaker.benchmarks.serve_compare --out DIR --rounds 8
    python -m deleaker.benchmarks.serve_compare --table DIR1 DIR2    # one table over earlier runs

Each round starts a fresh `deleaker serve` (--model, --max-batch; with --ray, one Ray Serve
replica), warms it up, and for each
concurrency level runs a fresh `deleaker-bench --mode serve --compare --rounds K` (serve_load.py):
K closed-loop loads, each followed by the same batches (sizes and counts read from the server's
/metrics) through Pipeline.generate in the load generator's own process. The server is then
stopped (SIGTERM, drained).

Why fresh processes: one process's speed can differ from the next one's (before the host allocator
tuning, the same in-process batch loop took 0.08-0.12 s per batch depending on the process), so a
ratio from one server and one client carries that offset in every round; over several process
pairs the offsets average out and the spread of the ratios shows them.

Writes DIR/rounds.jsonl (one line per round and concurrency: the bench summary), DIR/samples.jsonl
(one line per request of every load, tagged with its round, concurrency, HTTP parser, load
generator and load), DIR/server.log (every round's server, each under a `== round R ... ==` line),
DIR/load.txt (load averages) and DIR/table.md (the table, also printed; --table recomputes it from
rounds.jsonl after checking each row's request counts against samples.jsonl). Per concurrency: server and in-process images/s (median and range over the
process pairs), the ratio server / in-process (median of the pairs' pooled ratios, its range, and
pooled over everything), the same ratio against the in-process passes that also encode every
image to PNG as the server does (what is left is the cost of HTTP serving), the batch sizes the
server ran, and how many in-process images DeLeaker edited (nonzero history: proof that the timed
work ran the op). --device runs the server and the in-process passes there (cpu, cuda).
--client aiohttp,hey runs every load once per load generator against the same server (the order
alternates from round to round), tagging rows and files with the client.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deleaker.runtime.pipeline import check_device
from deleaker.runtime.serve.options import HTTP_PARSERS, RAY_HTTP_ERROR

from .presets import EDITING_SETTINGS
from .serve_load import CLIENTS
from .serve_process import ServeProcess



@dataclass(frozen=True)
class CompareSpec:
    rounds: int = 8  # fresh server + fresh clients per round
    levels: tuple[tuple[int, int], ...] = ((1, 16), (4, 64), (16, 128))  # (concurrency, requests per load)
    loads: int = 2  # paired loads (load, then in-process pass) per client process
    model: str | None = None  # default: the tiny offline model
    size: str = "64x64"
    steps: int = 2
    max_batch: int = 4
    prompt: str = "a cat and a cheetah in a field"
    entities: tuple[str, ...] = ("cat", "cheetah")
    ray: bool = False  # the server as one Ray Serve replica (deleaker serve --ray --replicas 1)
    http: tuple[str, ...] = ("auto",)  # server HTTP parsers (deleaker serve --http); several: one server each per round
    device: str = "cpu"  # the server's and the in-process passes' device
    clients: tuple[str, ...] = ("aiohttp",)  # load generators (serve_load --client); several: each load per client
    ready_timeout_s: float = 300.0

    def validate(self) -> "CompareSpec":
        if self.rounds < 1 or self.loads < 1:
            raise ValueError(f"--rounds and --loads must be >= 1, got {self.rounds} and {self.loads}")
        if not self.levels or any(c < 1 or n < 1 for c, n in self.levels):
            raise ValueError(f"--levels must be CONCURRENCY:REQUESTS pairs of positive integers, got {self.levels}")
        if self.max_batch < 1 or self.steps < 1:
            raise ValueError("--max-batch and --steps must be >= 1")
        if not self.http or any(h not in HTTP_PARSERS for h in self.http):
            raise ValueError(f"--http must list parsers among {', '.join(HTTP_PARSERS)}, got {','.join(self.http)}")
        if self.ray and self.http != ("auto",):
            raise ValueError(RAY_HTTP_ERROR)
        if not self.clients or any(c not in CLIENTS for c in self.clients) or len(set(self.clients)) < len(self.clients):
            raise ValueError(f"--client must list load generators among {', '.join(CLIENTS)}, got "
                             f"{','.join(self.clients)}")
        check_device(self.device)
        return self


def parse_levels(s: str) -> tuple[tuple[int, int], ...]:
    """'1:16,4:64' -> ((1, 16), (4, 64))."""
    try:
        return tuple((int(c), int(n)) for c, n in (item.split(":") for item in s.split(",")))
    except ValueError:
        raise ValueError(f"--levels must look like 1:16,4:64,16:128 (concurrency:requests), got {s!r}") from None


SAMPLES = "samples.jsonl"
SERVER_LOG = "server.log"
_SAMPLE_KEY = ("round", "concurrency", "http", "client")  # a samples.jsonl line's rounds.jsonl row


def _bench(url: str, spec: CompareSpec, model: str, concurrency: int, requests: int, loads: int,
           out: Path | None, client: str = "aiohttp") -> dict:
    """One fresh `deleaker-bench --mode serve` process (per-request lines to `out`); returns its summary."""
    cmd = [sys.executable, "-m", "deleaker.benchmarks.serve_load", "--url", url, "--client", client,
           "--requests", str(requests),
           "--concurrency", str(concurrency), "--size", spec.size, "--steps", str(spec.steps),
           "--prompt", spec.prompt, "--entities", ",".join(spec.entities),
           "--deleaker-settings", json.dumps(EDITING_SETTINGS), "--rounds", str(loads)]
    if out is not None:
        cmd += ["--compare", "--model", model, "--device", spec.device, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"deleaker-bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["summary"]


def run_round(spec: CompareSpec, model: str, r: int, out: Path, samples, http: str = "auto", say=print) -> list[dict]:
    """One fresh server and its loads; appends their per-request lines to `samples` (an open file)
    and the server's output to out/server.log."""
    env = dict(os.environ)
    args = ["--model", model, "--device", spec.device, "--max-batch", str(spec.max_batch), "--http", http]
    if spec.ray:
        args += ["--ray", "--replicas", "1"]
        env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local Ray on 127.0.0.1, as the Ray tests start it
    with open(out / SERVER_LOG, "a") as log:
        log.write(f"== round {r}, --http {http} ==\n")
    server = ServeProcess(args, out / SERVER_LOG, env=env, append=True)
    part = out / ".bench-samples.jsonl"  # one bench process's lines, before they are tagged
    try:
        server.wait_ready(spec.ready_timeout_s)
        # first batches of every size the loads use, uncounted
        _bench(server.url, spec, model, max(c for c, _ in spec.levels), 2 * spec.max_batch * 4, 1, None)
        rows = []
        clients = spec.clients if r % 2 else spec.clients[::-1]  # neither client always goes first
        for concurrency, requests in spec.levels:
            for client in clients:
                s = _bench(server.url, spec, model, concurrency, requests, spec.loads, part, client)
                tags = {"round": r, "concurrency": concurrency, "http": http, "client": client}
                for line in part.read_text().splitlines():
                    sample = json.loads(line)
                    samples.write(json.dumps({**tags, "load": sample.pop("round"), **sample}) + "\n")
                samples.flush()
                part.unlink()
                rows.append({"round": r, "concurrency": concurrency, "http": http, "client": client, **s})
                say(f"round {r}/{spec.rounds} {http} {client} concurrency {concurrency}: server "
                    f"{s['images_per_s']:.1f} images/s, in-process {s['inprocess_images_per_s']:.1f}, ratio "
                    f"{s['server_vs_inprocess_pooled']:.3f}; in-process with PNG "
                    f"{s['inprocess_png_images_per_s']:.1f}, ratio {s['server_vs_inprocess_png_pooled']:.3f}")
        return rows
    finally:
        server.close()


def _range(values: list[float]) -> str:
    return f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


# row fields that tell runs of one protocol apart: (value in rows that lack it, table heading)
_TAGS = {"http": ("auto", "HTTP parser"), "client": ("aiohttp", "load generator")}


def read_run(folder: Path) -> list[dict]:
    """A run's rounds.jsonl rows, each checked against the run's samples.jsonl: as many request
    lines, and as many answered ones, as the row's summary counted."""
    rows_path, samples_path = folder / "rounds.jsonl", folder / SAMPLES
    for path in (rows_path, samples_path):
        if not path.is_file():
            raise ValueError(f"--table {folder}: no {path.name} there")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    counts: dict[tuple, list[int]] = {}
    for line in samples_path.read_text().splitlines():
        if line.strip():
            sample = json.loads(line)
            n = counts.setdefault(_sample_key(sample), [0, 0])
            n[0] += 1
            n[1] += sample["status"] == 200
    for row in rows:
        got = counts.pop(_sample_key(row), [0, 0])
        if got != [row["requests"], row["ok"]]:
            raise ValueError(f"--table {folder}: round {row['round']}, concurrency {row['concurrency']}: "
                             f"{SAMPLES} has {got[0]} requests ({got[1]} answered), rounds.jsonl counted "
                             f"{row['requests']} ({row['ok']})")
    if counts:
        raise ValueError(f"--table {folder}: {SAMPLES} has requests of no rounds.jsonl row: {sorted(counts)[0]}")
    return rows


def _sample_key(row: dict) -> tuple:
    return tuple(row.get(k, _TAGS[k][0]) if k in _TAGS else row[k] for k in _SAMPLE_KEY)


def table(rows: list[dict]) -> str:
    """The per-concurrency table of docs/serving.md from rounds.jsonl rows (rows of runs made before
    the in-process PNG pass existed show "-" in its column)."""
    # a column names each row's HTTP parser / load generator where several ran
    tags = [t for t in _TAGS if len({row.get(t, _TAGS[t][0]) for row in rows}) > 1]

    def key_of(row: dict) -> tuple:
        return (row["concurrency"], *(row.get(t, _TAGS[t][0]) for t in tags))

    lines = ["| concurrency |" + "".join(f" {_TAGS[t][1]} |" for t in tags) + " process pairs | server images/s, median "
             "(range) | in-process images/s, median (range) | server / in-process, median [min, max] | pooled "
             "| server / in-process with PNG, median [min, max] (pooled) | batches of max size "
             "| in-process images edited |",
             "|---" * (9 + len(tags)) + "|"]
    for key in sorted({key_of(row) for row in rows}):
        c = key[0]
        mine = [row for row in rows if key_of(row) == key]
        ratios = [row["server_vs_inprocess_pooled"] for row in mine]
        png = all("server_vs_inprocess_png_pooled" in row for row in mine)
        server_images = sum(row["ok"] for row in mine)  # n = 1: one image per request
        server_s = sum(row["wall_s"] for row in mine)
        inproc_images = sum(round_["inprocess_images"] for row in mine for round_ in row["rounds"])
        inproc_s = sum(round_["inprocess_s"] for row in mine for round_ in row["rounds"])
        if png:
            png_ratios = [row["server_vs_inprocess_png_pooled"] for row in mine]
            png_images = sum(round_["inprocess_png_images"] for row in mine for round_ in row["rounds"])
            png_s = sum(round_["inprocess_png_s"] for row in mine for round_ in row["rounds"])
            png_cell = (f"{np.median(png_ratios):.3f} [{min(png_ratios):.3f}, {max(png_ratios):.3f}] "
                        f"({(server_images / server_s) / (png_images / png_s):.3f})")
        else:
            png_cell = "-"
        batches: dict[int, int] = {}
        for row in mine:
            for k, v in row["batches"].items():
                batches[int(k)] = batches.get(int(k), 0) + v
        top = max(batches)
        edited = sum(row["inprocess_edited"] for row in mine)
        lines.append(f"| {c} |" + "".join(f" {v} |" for v in key[1:]) + f" {len(mine)} "
                     f"| {_range([row['images_per_s'] for row in mine])} "
                     f"| {_range([row['inprocess_images_per_s'] for row in mine])} "
                     f"| {np.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] "
                     f"| {(server_images / server_s) / (inproc_images / inproc_s):.3f} "
                     f"| {png_cell} "
                     f"| {batches[top]} of {sum(batches.values())} (size {top}) | {edited} of {inproc_images} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from deleaker.runtime.errors import run_reporting_errors

    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.serve_compare", description=__doc__.split("\n")[0])
    d = CompareSpec()
    p.add_argument("--out", help="folder for the raw outputs and table.md (created)")
    p.add_argument("--table", nargs="+", metavar="DIR", help="print one table over the rounds.jsonl of earlier "
                                                             "runs' folders (their process pairs pooled) and exit")
    p.add_argument("--rounds", type=int, default=d.rounds, help="fresh server + fresh clients per round")
    p.add_argument("--levels", default=",".join(f"{c}:{n}" for c, n in d.levels),
                   help="CONCURRENCY:REQUESTS per load, comma-separated")
    p.add_argument("--loads", type=int, default=d.loads, help="paired loads per client process")
    p.add_argument("--model", help="model folder (default: the tiny offline model)")
    p.add_argument("--size", default=d.size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--device", default=d.device, help="the server's and the in-process passes' device: cpu, cuda "
                                                      "or cuda:N")
    p.add_argument("--ray", action="store_true", help="serve as one Ray Serve replica (needs the ray extra)")
    p.add_argument("--http", default="auto", help="server HTTP parser(s), comma-separated, e.g. h11,httptools: "
                   "each round then starts one server per parser, in turn")
    p.add_argument("--client", default="aiohttp", help="load generator(s), comma-separated, e.g. aiohttp,hey: each "
                   "load then runs once per load generator, against the same server")
    args = p.parse_args(argv)

    def go() -> int:
        if args.table:
            rows = [row for folder in args.table for row in read_run(Path(folder))]
            print(table(rows), end="")
            return 0
        if args.out is None:
            raise ValueError("give --out (a folder for the raw outputs), or --table DIR... to print earlier runs")
        spec = CompareSpec(rounds=args.rounds, levels=parse_levels(args.levels), loads=args.loads, model=args.model,
                           size=args.size, steps=args.steps, max_batch=args.max_batch, ray=args.ray,
                           http=tuple(args.http.split(",")), device=args.device,
                           clients=tuple(args.client.split(","))).validate()
        if args.model is not None and not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model} is not a folder")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if args.model is None:
            from deleaker.modeling.tiny_model import ensure_tiny_model
            model = str(ensure_tiny_model())
        else:
            model = args.model
        out.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        (out / SERVER_LOG).write_text("")
        with (open(out / "rounds.jsonl", "w") as fh, open(out / SAMPLES, "w") as samples,
              open(out / "load.txt", "w") as load):
            for r in range(1, spec.rounds + 1):
                load.write(f"before round {r}: load average {' '.join('%.2f' % x for x in os.getloadavg())}\n")
                for http in spec.http:
                    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
                    for row in run_round(spec, model, r, out, samples, http, say=say):
                        fh.write(json.dumps(row) + "\n")
                        fh.flush()
                        rows.append(row)
            load.write(f"after: load average {' '.join('%.2f' % x for x in os.getloadavg())}\n")
        text = table(rows)
        (out / "table.md").write_text(text)
        print(text, end="")
        return 0

    def guarded() -> int:
        try:
            return go()
        except RuntimeError as e:  # a server or a bench process failed: its log says why
            print(f"serve_compare: error: {e}", file=sys.stderr)
            return 1

    return run_reporting_errors("serve_compare", guarded)


if __name__ == "__main__":
    sys.exit(main())
