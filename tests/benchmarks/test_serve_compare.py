"""The server-vs-in-process protocol (benchmarks/serve_compare.py): one small real round on
127.0.0.1, and the table's arithmetic on known rows."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("aiohttp", reason="the bench extra (aiohttp) is not installed")

from deleaker.benchmarks import serve_compare as sc  # noqa: E402


def _row(c, ok, wall, inproc_images, inproc_s, batches, edited, http="auto", png_s=None):
    png_s = inproc_s * 1.25 if png_s is None else png_s  # the in-process pass that also encodes PNG
    return {"concurrency": c, "http": http, "ok": ok, "wall_s": wall, "images_per_s": ok / wall,
            "inprocess_images_per_s": inproc_images / inproc_s, "server_vs_inprocess_pooled":
            (ok / wall) / (inproc_images / inproc_s), "server_vs_inprocess_png_pooled":
            (ok / wall) / (inproc_images / png_s), "batches": batches, "inprocess_edited": edited,
            "rounds": [{"inprocess_images": inproc_images, "inprocess_s": inproc_s,
                        "inprocess_png_images": inproc_images, "inprocess_png_s": png_s}]}


def test_table_medians_pooled_ratio_and_batches():
    rows = [_row(16, 40, 2.0, 40, 1.0, {"4": 10}, 40, png_s=2.0),  # 20 vs 40 images/s: 0.5; with PNG 1.0
            _row(16, 40, 1.0, 40, 1.0, {"4": 9, "2": 2}, 40, png_s=1.6),  # 40 vs 40: 1.0; with PNG 40 vs 25: 1.6
            _row(16, 40, 1.0, 40, 2.0, {"4": 10}, 39, png_s=4.0)]  # 40 vs 20: 2.0; with PNG 40 vs 10: 4.0
    line = sc.table(rows).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "16" and cells[1] == "3"
    assert cells[2] == "40.0 (20.0-40.0)"  # server images/s median (range)
    assert cells[4] == "1.000 [0.500, 2.000]"  # median of the pairs' ratios
    assert cells[5] == "1.000"  # pooled: 120 images / 4 s against 120 / 4 s
    assert cells[6] == "1.600 [1.000, 4.000] (1.900)"  # with PNG: 120 images / 7.6 s in-process
    assert cells[7] == "29 of 31 (size 4)"
    assert cells[8] == "119 of 120"


def test_table_has_a_row_per_parser_when_several_ran():
    rows = [_row(16, 40, 2.0, 40, 1.0, {"4": 10}, 40, "h11"), _row(16, 40, 1.0, 40, 1.0, {"4": 10}, 40, "httptools")]
    lines = sc.table(rows).splitlines()
    assert "| HTTP parser |" in lines[0] and lines[1].count("---") == 10
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(c[0], c[1], c[5]) for c in cells] == [("16", "h11", "0.500 [0.500, 0.500]"),
                                                   ("16", "httptools", "1.000 [1.000, 1.000]")]


def test_table_has_a_row_per_load_generator_when_several_ran():
    rows = [{**_row(16, 40, 2.0, 40, 1.0, {"4": 10}, 40), "client": "aiohttp"},
            {**_row(16, 40, 1.0, 40, 1.0, {"4": 10}, 40), "client": "hey"}]
    lines = sc.table(rows).splitlines()
    assert "| concurrency | load generator |" in lines[0] and "HTTP parser" not in lines[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(c[1], c[5]) for c in cells] == [("aiohttp", "0.500 [0.500, 0.500]"), ("hey", "1.000 [1.000, 1.000]")]


def test_table_without_the_png_pass_shows_a_dash():
    row = _row(16, 40, 2.0, 40, 1.0, {"4": 10}, 40)
    del row["server_vs_inprocess_png_pooled"]  # a run made before the in-process PNG pass existed
    cells = [c.strip() for c in sc.table([row]).splitlines()[2].strip("|").split("|")]
    assert cells[5:8] == ["0.500", "-", "10 of 10 (size 4)"]


def _write_run(folder, rows, drop_sample=False):
    """rounds.jsonl and a samples.jsonl whose request lines match each row's counts."""
    folder.mkdir()
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [{"round": r["round"], "concurrency": r["concurrency"], "http": r["http"], "client": "aiohttp",
                "load": 0, "index": i, "status": 200 if i < r["ok"] else 503}
               for r in rows for i in range(r["requests"])]
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples[drop_sample:]))


def test_table_pools_earlier_runs(tmp_path, capsys):
    def row(r, *args):
        return {**_row(*args), "round": r, "requests": args[1] + 1}  # one request of each row answered 503

    _write_run(tmp_path / "a", [row(1, 16, 40, 2.0, 40, 1.0, {"4": 10}, 40)])
    _write_run(tmp_path / "b", [row(1, 16, 40, 1.0, 40, 1.0, {"4": 10}, 40), row(1, 4, 8, 1.0, 8, 1.0, {"4": 2}, 8)])
    assert sc.main(["--table", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1:3] for line in lines[2:]] == [[" 4 ", " 1 "], [" 16 ", " 2 "]]  # pairs of both runs
    # the per-request lines must account for every summary row
    _write_run(tmp_path / "short", [row(1, 16, 40, 2.0, 40, 1.0, {"4": 10}, 40)], drop_sample=True)
    assert sc.main(["--table", str(tmp_path / "short")]) == 2
    assert ("round 1, concurrency 16: samples.jsonl has 40 requests (39 answered), rounds.jsonl counted 41 (40)"
            in capsys.readouterr().err)
    (tmp_path / "a" / "samples.jsonl").unlink()
    assert sc.main(["--table", str(tmp_path / "a")]) == 2
    assert "no samples.jsonl there" in capsys.readouterr().err
    assert sc.main(["--table", str(tmp_path / "missing")]) == 2
    assert "no rounds.jsonl there" in capsys.readouterr().err
    assert sc.main(["--rounds", "2"]) == 2
    assert "give --out" in capsys.readouterr().err


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert sc.main(["--out", str(tmp_path / "o"), "--levels", "4"]) == 2
    assert "--levels must look like" in capsys.readouterr().err
    assert sc.main(["--out", str(tmp_path / "o"), "--rounds", "0"]) == 2
    assert sc.main(["--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing")]) == 2
    assert sc.main(["--out", str(tmp_path / "o"), "--http", "h11,h2"]) == 2
    assert "--http must list parsers among auto, httptools, h11, got h11,h2" in capsys.readouterr().err
    assert sc.main(["--out", str(tmp_path / "o"), "--ray", "--http", "h11"]) == 2
    assert sc.main(["--out", str(tmp_path / "o"), "--client", "aiohttp,curl"]) == 2
    assert "--client must list load generators among aiohttp, hey, got aiohttp,curl" in capsys.readouterr().err
    assert sc.main(["--out", str(tmp_path / "o"), "--device", "tpu"]) == 2
    assert "device must be cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the options are checked


def test_one_round_per_load_generator(tiny_model_dir, tmp_path):
    if shutil.which("hey") is None:
        pytest.skip("hey is not installed (Debian package hey; make test installs it as root)")
    out = tmp_path / "cmp"
    assert sc.main(["--out", str(out), "--rounds", "1", "--levels", "4:8", "--loads", "1", "--client", "aiohttp,hey",
                    "--model", str(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["client"] for r in rows] == ["aiohttp", "hey"]  # round 1 takes the given order; round 2 the reverse
    for r in rows:
        assert r["ok"] == r["requests"] == 8 and r["inprocess_png_encoded"] == 8
        assert sum(int(k) * v for k, v in r["batches"].items()) == 8  # the server ran every request of this load
        assert r["rounds"][0]["client_cpu_s"] > 0  # hey's CPU time is counted (a child process's)
    assert "| 4 | hey | 1 |" in (out / "table.md").read_text()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({(s["round"], s["concurrency"], s["client"], s["load"]) for s in samples}) == [
        (1, 4, "aiohttp", 0), (1, 4, "hey", 0)]
    assert len(samples) == 16 and all(s["status"] == 200 for s in samples)  # every request, in the run's one file
    assert sorted(p.name for p in out.iterdir()) == ["load.txt", "rounds.jsonl", "samples.jsonl", "server.log",
                                                     "table.md"]


def test_one_round_on_a_real_server_per_parser(tiny_model_dir, tmp_path):
    pytest.importorskip("httptools", reason="httptools is not installed (the serve extra installs it)")
    out = tmp_path / "cmp"
    assert sc.main(["--out", str(out), "--rounds", "1", "--levels", "1:3,4:8", "--loads", "1", "--http", "h11,httptools",
                    "--model", str(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["concurrency"], r["http"]) for r in rows] == [(1, "h11"), (4, "h11"), (1, "httptools"),
                                                             (4, "httptools")]
    for r in rows:
        assert r["ok"] == r["requests"] and r["server_errors"] == 0
        inproc = r["rounds"][0]["inprocess_images"]
        assert inproc == r["ok"]  # the same images, in the same batch sizes
        assert sum(int(k) * v for k, v in r["batches"].items()) == r["ok"]
        assert r["inprocess_edited"] == inproc  # DeLeaker edited every timed in-process image
        assert r["rounds"][0]["inprocess_png_images"] == inproc
        assert r["inprocess_png_encoded"] == inproc  # the second pass made a PNG of every image
        assert r["server_vs_inprocess_pooled"] > 0 and r["server_vs_inprocess_png_pooled"] > 0
    logs = (out / "server.log").read_text().split("== round 1, --http ")  # one log, a section per server
    assert logs[0] == "" and [log.split(" ==")[0] for log in logs[1:]] == ["h11", "httptools"]
    for http, log in zip(("h11", "httptools"), logs[1:]):
        assert log.count("generated") >= 2 and f"queue 64, {http})" in log
        assert f"| 4 | {http} | 1 |" in (out / "table.md").read_text()
    assert sc.main(["--table", str(out)]) == 0  # the run's own files give its table again
