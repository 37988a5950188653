"""`deleaker eval` end to end: run (interrupted, resumed) -> judge against a real OpenAI-protocol
HTTP server on 127.0.0.1 with scripted answers (malformed answer, 500s, a timeout) -> report,
whose numbers are checked against the script by hand; the HTML gallery in headless Chromium."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deleaker.eval import cli
from deleaker.eval.judges.paper import VERDICTS
from deleaker.eval.run import RunSettings, run_generation
from deleaker.eval.store import RunDir

pytest.importorskip("openai")

# Six items, two per split. Verdict script per prompt (None: a malformed answer).
RECORDS = [
    ("two_entities", "a cat and a dog on a sofa", ["cat", "dog"], 1, "image_2_much_better"),
    ("two_entities", "a lion and a zebra in grass", ["lion", "zebra"], 2, "image_2_slightly_better"),
    ("animal_triplets", "an owl, a crow and a duck on a fence", ["owl", "crow", "duck"], 3, None),
    ("animal_triplets", "a horse, a cow and a sheep in a field", ["horse", "cow", "sheep"], 4, "same"),
    ("fruit_n_veg_triplets", "an apple, a pear and a lemon on a table", ["apple", "pear", "lemon"], 5,
     "image_1_much_better"),
    ("fruit_n_veg_triplets", "a banana, a carrot and a corn in a basket", ["banana", "carrot", "corn"], 6,
     "image_2_much_better"),
]
LONG = "a cat and a dog " + "very " * 600 + "far away"  # too many tokens for the model: a per-item error
FAIL_500 = RECORDS[3][1]  # first verdict call answers 500, the retry succeeds
SLOW = RECORDS[4][1]  # first verdict call outlasts the client timeout, the retry succeeds
BROKEN = RECORDS[5][1]  # every typicality call answers 500 until the server is "repaired"
NO_LOGPROBS = RECORDS[2][1]  # VQAScore answers without logprobs: unparseable
KEY = "test-secret"
TIMEOUT = 3.0
STEPS = 5  # the tiny preset's intervention starts at block-step 18 (step 4 of 4-block steps)


class ScriptedVLM:
    """An OpenAI chat-completions server with scripted answers; records every request."""

    def __init__(self, yes_prob: dict[str, float]):
        self.yes_prob = yes_prob  # image data URL -> P(yes)
        self.requests: list[dict] = []
        self.broken = True
        self.seen: dict[tuple, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        vlm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": {"message": "bad path or key"}})
                status, payload, delay = vlm.answer(body)
                # concurrency is counted over answered calls (a timed-out one is abandoned by the client);
                # a call leaves the count before its answer is written, since once the answer is out the
                # client's next call may arrive before this thread runs again
                counted = delay == 0
                with vlm.lock:
                    vlm.in_flight += counted
                    vlm.max_in_flight = max(vlm.max_in_flight, vlm.in_flight)
                try:
                    time.sleep(delay or 0.02)  # a little latency, so concurrent calls overlap
                finally:
                    with vlm.lock:
                        vlm.in_flight -= counted
                try:
                    self._send(status, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _count(self, key) -> int:
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            return self.seen[key]

    def answer(self, body: dict):
        with self.lock:
            self.requests.append(body)
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        prompt = next(r[1] for r in RECORDS if f'"{r[1]}"' in text)
        rec = next(r for r in RECORDS if r[1] == prompt)
        if body.get("logprobs"):
            if prompt == NO_LOGPROBS:
                return 200, _completion("Yes"), 0
            p = self.yes_prob[images[0]]
            top = [{"token": "Yes", "logprob": math.log(0.7 * p)}, {"token": " yes", "logprob": math.log(0.3 * p)},
                   {"token": "No", "logprob": math.log(1 - p)}]
            return 200, _completion("Yes", {"content": [{"token": "Yes", "logprob": top[0]["logprob"], "bytes": None,
                                                          "top_logprobs": top}]}), 0
        name = body["response_format"]["json_schema"]["name"]
        if name == "differences":
            ents = rec[2]
            return 200, _completion(json.dumps({"differences": [
                {"entity": e, "feature": f"{e} {'shape' if images else 'colour'}"} for e in ents]})), 0
        if name == "typicality":
            if prompt == BROKEN and self.broken:
                return 500, {"error": {"message": "scripted failure"}}, 0
            return 200, _completion(json.dumps({"present": True, "typical": False, "borrowed_features": ["stripes"],
                                                "reason": "scripted"})), 0
        assert name == "verdict"
        n = self._count(("verdict", prompt))
        if prompt == FAIL_500 and n == 1:
            return 500, {"error": {"message": "scripted failure"}}, 0
        if prompt == SLOW and n == 1:
            return 200, _completion(json.dumps({"verdict": "same", "reason": "too late"})), TIMEOUT + 1.5
        if rec[4] is None:
            return 200, _completion("Image 2 looks better to me."), 0
        return 200, _completion(json.dumps({"verdict": rec[4], "reason": f"scripted {rec[4]}"})), 0

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _completion(content: str, logprobs=None) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted-vlm",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "slim.jsonl"
    rows = [{"prompt": p, "entities": e, "seed": s, "dataset": split, "model": "FLUX.1-dev", "leakage": True}
            for split, p, e, s, _ in RECORDS]
    rows.insert(2, {"prompt": LONG, "entities": ["cat", "dog"], "seed": 9, "dataset": "two_entities"})
    rows.append({"prompt": "a cat and a dog", "entities": ["cat", "cow"], "seed": 1, "dataset": "two_entities"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """Interrupted after two items (KeyboardInterrupt, then a manifest line cut mid-write), resumed by the CLI."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    settings = RunSettings(dataset=str(dataset), source=str(tiny_model_dir), preset="tiny", steps=STEPS, height=64,
                           width=64)
    seen = []

    def interrupt(entry):
        seen.append(entry)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_generation(settings, str(out), batch=2, progress=False, on_item=interrupt)
    run = RunDir(out)
    first = run.items()
    assert len(first) == 2 and all(e["status"] == "ok" for e in first.values())
    stamps = {p: p.stat().st_mtime_ns for p in run.images.iterdir()}
    assert len(stamps) == 4
    with open(run.manifest, "a") as f:
        f.write('{"id": "two_entities-cut", "status": "o')  # a kill in the middle of a write
    args = ["--quiet", "run", "--dataset", str(dataset), "--model", str(tiny_model_dir), "--preset", "tiny",
            "--steps", str(STEPS), "--height", "64", "--width", "64", "--batch", "2", "--out", str(out)]
    assert cli.main(args) == 1  # the too-long prompt fails (recorded), everything else is generated
    # the two finished items were not redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    items = run.items()
    assert sorted(e["prompt"] for e in items.values() if e["status"] == "ok") == sorted(r[1] for r in RECORDS)
    errors = [e for e in items.values() if e["status"] == "error"]
    assert len(errors) == 1 and errors[0]["prompt"] == LONG and "tokens" in errors[0]["error"]
    # a second resume only retries the failed item
    n_lines = len(run.manifest.read_text().splitlines())
    assert cli.main(args) == 1
    assert len(run.manifest.read_text().splitlines()) == n_lines + 1
    return out


def test_run_for_a_judge_that_reads_no_references_makes_none(tiny_model_dir, dataset, tmp_path):
    """`eval run --judge toyworld` (a judge that never reads reference images) makes none; the same
    folder run again for the paper judge adds them to the items already done."""
    out = tmp_path / "run"
    args = ["--quiet", "run", "--dataset", str(dataset), "--split", "two_entities", "--model", str(tiny_model_dir),
            "--preset", "tiny", "--steps", "1", "--height", "32", "--width", "32", "--batch", "2", "--out", str(out)]
    assert cli.main([*args, "--judge", "toyworld,lpips"]) == 1  # the too-long prompt of the split fails (recorded)
    run = RunDir(out)
    items = [e for e in run.items().values() if e["status"] == "ok"]
    assert items and all(e["refs"] == {} for e in items)
    assert not any(run.refs.iterdir())
    assert cli.main([*args, "--judge", "paper"]) == 1
    items = [e for e in run.items().values() if e["status"] == "ok"]
    assert all(sorted(e["refs"]) == sorted(e["entities"]) for e in items)
    assert all(run.ref(x).exists() for e in items for x in e["entities"])


def test_run_images(run_dir):
    run = RunDir(run_dir)
    items = [e for e in run.items().values() if e["status"] == "ok"]
    differ = 0
    for e in items:
        v, d = (np.asarray(Image.open(run.root / e[k])) for k in ("vanilla", "deleaker"))
        assert v.shape == d.shape == (64, 64, 3)
        differ += int(np.abs(v.astype(int) - d.astype(int)).max() > 0)
        for ent in e["entities"]:
            assert (run.root / e["refs"][ent]).exists()
    assert differ > 0  # DeLeaker changed at least one image at this step count
    # a resumed run must keep its settings
    with pytest.raises(ValueError, match="steps"):
        run_generation(RunSettings(dataset=json.loads(run.settings.read_text())["dataset"],
                                   source=json.loads(run.settings.read_text())["source"], preset="tiny",
                                   steps=STEPS + 1, height=64, width=64), str(run_dir), progress=False)


@pytest.fixture(scope="module")
def judged(run_dir, tmp_path_factory):
    run = RunDir(run_dir)
    items = {e["prompt"]: e for e in run.items().values() if e["status"] == "ok"}
    yes_prob = {}
    for k, r in enumerate(RECORDS):
        for j, variant in enumerate(("vanilla", "deleaker")):
            yes_prob[_data_url(run.root / items[r[1]][variant])] = 0.2 + 0.1 * k + 0.05 * j
    vlm = ScriptedVLM(yes_prob)
    os.environ["DELEAKER_TEST_KEY"] = KEY
    base = ["--quiet", "judge", str(run_dir), "--endpoint", vlm.url, "--model", "scripted-vlm", "--api-key-env",
            "DELEAKER_TEST_KEY", "--timeout", str(TIMEOUT), "--retries", "2", "--concurrency", "3"]
    try:
        first_rc = cli.main(base + ["--judge", "paper,vqascore,lpips"])
        first = run.judged("paper")
        vlm.broken = False
        second_rc = cli.main(base + ["--judge", "paper,vqascore"])
        yield run, vlm, first_rc, first, second_rc, yes_prob, items
    finally:
        vlm.close()
        os.environ.pop("DELEAKER_TEST_KEY", None)


def test_judge_statuses_and_resume(judged):
    run, vlm, first_rc, first, second_rc, _, items = judged
    by_prompt = {items[r[1]]["id"]: r for r in RECORDS}
    status = {by_prompt[i][1]: v["status"] for i, v in first.items()}
    assert first_rc == 1 and second_rc == 0
    assert status[BROKEN] == "error" and "InternalServerError" in first[items[BROKEN]["id"]]["error"]
    assert status[RECORDS[2][1]] == "unparseable"
    bad = first[items[RECORDS[2][1]]["id"]]
    assert bad["raw"] == "Image 2 looks better to me." and bad["failed_step"] == "verdict"
    assert status[FAIL_500] == status[SLOW] == "ok"  # retried after a 500 and after a timeout
    final = run.judged("paper")
    assert {by_prompt[i][1]: v.get("outcome") for i, v in final.items()} == {
        r[1]: VERDICTS[r[4]] if r[4] else None for r in RECORDS}
    # the resume re-asked only the failed item: 7 or 9 calls per item, 3 attempts for a 500 forever
    assert final[items[RECORDS[0][1]]["id"]]["calls"] == 7 and final[items[SLOW]["id"]]["calls"] == 9
    assert len(run.judgment_file("paper").read_text().splitlines()) == len(RECORDS) + 1
    verdict_calls = [b for b in vlm.requests if b.get("response_format", {}).get("json_schema", {}).get("name")
                     == "verdict"]
    assert len(verdict_calls) == len(RECORDS) + 2  # + the 500 and the timed-out attempt
    assert all(b["response_format"]["json_schema"]["strict"] for b in verdict_calls)
    assert 1 < vlm.max_in_flight <= 3  # a bounded pool, used concurrently
    vqa = run.judged("vqascore")
    assert vqa[items[NO_LOGPROBS]["id"]]["status"] == "unparseable"
    assert not run.judgment_file("lpips").exists()  # skipped: no local weights


def test_report_matches_script(judged, capsys):
    run, _, _, _, _, yes_prob, items = judged
    assert cli.main(["--quiet", "report", str(run.root)]) == 0
    summary = json.loads((run.report / "summary.json").read_text())
    groups = {g["name"]: g for g in summary["groups"]}
    # by hand: judged outcomes (the malformed one is excluded)
    expect = {"two_entities": ([100 / 2, 100 / 2, 0, 0, 0], 2),
              "animal_triplets": ([0, 0, 100, 0, 0], 1),
              "fruit_n_veg_triplets": ([100 / 2, 0, 0, 0, 100 / 2], 2),
              "overall": ([40, 20, 20, 0, 20], 5)}
    keys = ["mitigation_major", "mitigation_minor", "no_change", "degradation_minor", "degradation_major"]
    for name, (pcts, n) in expect.items():
        g = groups[name]
        assert g["judged"] == n
        for k, want in zip(keys, pcts):
            s = g["outcomes_percent"][k]
            assert s["value"] == pytest.approx(want, abs=1e-9), (name, k)
            assert s["ci95"][0] <= s["value"] <= s["ci95"][1]
    assert groups["animal_triplets"]["unparseable"] == 1 and groups["overall"]["failed"] == 0
    assert groups["animal_triplets"]["outcomes_percent"]["no_change"]["ci95"] == [100.0, 100.0]
    # VQAScore by hand: P(yes) = 0.7p + 0.3p of the scripted p, DeLeaker images, no-logprobs item excluded
    want = [0.2 + 0.1 * k + 0.05 for k, r in enumerate(RECORDS) if r[1] != NO_LOGPROBS]
    got_images = [yes_prob[_data_url(run.root / items[r[1]]["deleaker"])] for r in RECORDS if r[1] != NO_LOGPROBS]
    assert groups["overall"]["vqascore"]["value"] == pytest.approx(np.mean(got_images), abs=1e-9)
    if len(set(yes_prob)) == 2 * len(RECORDS):  # every image distinct: the script's own values
        assert groups["overall"]["vqascore"]["value"] == pytest.approx(np.mean(want), abs=1e-9)
    assert groups["overall"]["lpips"]["value"] is None
    table = (run.report / "table.md").read_text()
    assert "46.07" in table and "| overall | 6 | 5 | 40.0 [" in table
    assert (run.report / "outcomes.png").stat().st_size > 5000


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_gallery_in_headless_chromium(judged, tmp_path):
    run, *_ = judged
    if not (run.report / "gallery.html").exists():
        cli.main(["--quiet", "report", str(run.root)])
    page = (run.report / "gallery.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
             "--window-size=1200,900"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    dom = subprocess.run(flags + ["--dump-dom", page], check=True, capture_output=True, text=True, timeout=120).stdout
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 10  # not a blank page
    ok = [e for e in run.items().values() if e["status"] == "ok"]
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 2 * len(ok)
    assert all('data-loaded="1"' in tag for tag in imgs), "an image did not load"
    assert f'data-images-loaded="{2 * len(ok)}"' in dom
    assert "generation failed" in dom  # the failed item is listed, with its error
