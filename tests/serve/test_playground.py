"""The playground page at `/` of a real `deleaker serve` (tiny model, 127.0.0.1, bearer token), driven in
headless Chromium over the DevTools protocol: each run is started by the page's URL parameters
(autorun=1), with real clocks (no virtual time, so the page's timings are real), and read back from the DOM.

Also an entry point for the screenshot in docs/serving.md:
    python tests/serve/test_playground.py --out docs/serving-playground.png --field seed=0 -- --max-wait-ms 500
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs websockets (the test extra)")

from support.serve import EARLY, SIZE, STEPS, ServerProcess, metric, png_pixels  # noqa: E402

from deleaker.runtime.serve.app import STATIC_DIR  # noqa: E402
from deleaker.runtime.serve.client import GENERATE_PATH as GEN  # noqa: E402
from deleaker.runtime.serve.engine import SETTING_KINDS  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium at "
                                    "/usr/bin/chromium (apt-get install -y chromium)")
TOKEN = "playground-token-0123456789"
PROMPT, ENTITIES = "a cat and a dog in a field", "cat,dog"
# strong enough on the random-weight model that DeLeaker moves pixels by several levels in 2 steps
KNOBS = {**EARLY, "std_mul_text": 0.0, "std_mul_image_image": 0.0, "k_strength": 5.0}
# what the page reports once it settles (data-state "done" or "error")
READ_PAGE = """JSON.stringify({
  state: document.body.dataset.state || "",
  status: document.getElementById("status").textContent,
  error: document.getElementById("error").hidden ? "" : document.getElementById("error").textContent,
  timing: document.getElementById("timing").textContent,
  health: document.getElementById("health").textContent,
  images: ["vanilla", "deleaker"].map((k) => {
    const img = document.getElementById("img-" + k);
    return {src: img.getAttribute("src") || "", natural: [img.naturalWidth, img.naturalHeight],
            seed: img.dataset.seed || null};
  }),
})"""


class Browser:
    """Headless Chromium with a DevTools websocket on one page: navigate, evaluate, screenshot."""

    def __init__(self, profile: Path, width: int = 1200, height: int = 900):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-port=0"]
        self.proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(websockets_sync.connect(pages[0]["webSocketDebuggerUrl"],
                                                                   max_size=None, open_timeout=30))
        self.next_id = 0
        # the window's outer size is not the page's: fix the viewport itself
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip events until our answer
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def run_page(self, url: str, timeout_s: float = 120) -> dict:
        """Open the URL and wait until the page's run settles; returns READ_PAGE's fields."""
        self.evaluate("window.previousPage = true")  # so the page left behind is never read as this one
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            page = json.loads(self.evaluate(READ_PAGE) or "null") if self._loaded() else None
            if page and page["state"] in ("done", "error"):
                return page
            time.sleep(0.2)
        raise AssertionError(f"the page did not finish within {timeout_s}s")

    def _loaded(self) -> bool:
        return self.evaluate("!window.previousPage && document.readyState === 'complete' && "
                             "!!document.getElementById('status')") is True

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        if getattr(self, "stack", None) is not None:
            self.stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def page_url(server_url: str, token: str | None = None, **fields) -> str:
    """The playground URL that fills the given fields and runs at once; the token rides in the
    fragment, which the browser never sends to the server."""
    query = urllib.parse.urlencode({**fields, "autorun": "1"})
    return f"{server_url}/?{query}" + (f"#{urllib.parse.urlencode({'token': token})}" if token else "")


def image_of(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return png_pixels(base64.b64decode(src[len(prefix):])).astype(int)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # a long batch-fill wait: the page's two requests meet in one batch even on a loaded CPU
    s = ServerProcess(["--model", str(tiny_model_dir), "--max-batch", "4", "--max-wait-ms", "500", "--steps",
                       str(STEPS), "--default-size", SIZE], tmp_path_factory.mktemp("playground") / "server.log",
                      env={"DELEAKER_API_TOKEN": TOKEN})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_page_knobs_are_the_servers_deleaker_settings(server):
    """The page builds one field per setting from /health (the server's list); it keeps no copy."""
    kinds = httpx.get(server.url + "/health", timeout=10).json()["deleaker_settings"]
    assert kinds == {name: kind.__name__ for name, kind in SETTING_KINDS.items()}
    js = (STATIC_DIR / "playground.js").read_text()
    assert not [name for name in SETTING_KINDS if name in js], "playground.js names a setting itself"


@needs_chromium
def test_page_shows_vanilla_and_deleaker_from_one_batch(server, browser):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(server.url + "/", timeout=10).status_code == 200  # the page needs no token
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401  # the API does
    before = httpx.get(server.url + "/metrics", headers=auth, timeout=10).text
    fields = {"prompt": PROMPT, "entities": ENTITIES, "seed": "7", "size": SIZE, "steps": str(STEPS),
              **{k: str(v).lower() for k, v in KNOBS.items()}}
    page = browser.run_page(page_url(server.url, TOKEN, **fields))
    assert page["state"] == "done" and page["error"] == "", page
    assert page["status"] == "seed 7"
    w, h = (int(v) for v in SIZE.split("x"))
    assert [im["natural"] for im in page["images"]] == [[w, h], [w, h]]
    assert [im["seed"] for im in page["images"]] == ["7", "7"]
    assert re.fullmatch(r"vanilla \d+\.\d\d s · DeLeaker \d+\.\d\d s · both \d+\.\d\d s \(round trips, sent "
                        r"together\)", page["timing"]), page["timing"]
    assert "ready" in page["health"]
    after = httpx.get(server.url + "/metrics", headers=auth, timeout=10).text
    # both images ran (the batcher does not hold a lone request, so the pair may run as two batches)
    assert metric(after, "deleaker_batch_size_count") - metric(before, "deleaker_batch_size_count") in (1, 2)
    assert metric(after, "deleaker_batch_size_sum") - metric(before, "deleaker_batch_size_sum") == 2
    # each image is what the API returns for its request (another batch size rounds at most 1 level), and
    # the two differ by more than that: neither a swapped pair nor one picture twice
    vanilla, deleaker = (image_of(im["src"]) for im in page["images"])
    body = {"prompt": PROMPT, "entities": ENTITIES.split(","), "seed": 7, "size": SIZE, "steps": STEPS,
            "deleaker_settings": KNOBS}
    for shown, flag in ((vanilla, False), (deleaker, True)):
        r = httpx.post(server.url + GEN, json={**body, "deleaker": flag}, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        assert np.abs(shown - png_pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))).max() <= 1
    assert np.abs(vanilla - deleaker).max() >= 3


@needs_chromium
def test_page_shows_the_apis_one_line_errors(server, browser):
    bad = {"prompt": PROMPT, "entities": "cat,zebra", "seed": "1", "size": SIZE}
    r = httpx.post(server.url + GEN, json={**bad, "entities": ["cat", "zebra"], "seed": 1},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "zebra" in message
    page = browser.run_page(page_url(server.url, TOKEN, **bad))
    # once, although both requests failed, with the field the API names
    assert page["state"] == "error" and page["error"] == f"entities: {message}"
    assert [im["src"] for im in page["images"]] == ["", ""] and page["timing"] == ""
    page = browser.run_page(page_url(server.url, None, prompt=PROMPT, entities=ENTITIES, size=SIZE))  # no token
    assert page["state"] == "error"
    assert page["error"] == "this server needs its API token: paste it into the API token field"
    page = browser.run_page(page_url(server.url, TOKEN, prompt=PROMPT, seed="many"))  # caught before sending
    assert page["state"] == "error" and page["error"] == 'seed: cannot take "many"'


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`deleaker serve` as a new user starts it: no --model (the embedded default), no token."""
    s = ServerProcess(["--max-wait-ms", "500"], tmp_path_factory.mktemp("playground-default") / "server.log")
    yield s
    s.stop()


READ_FIELDS = """JSON.stringify({
  prompt: document.forms.form.elements.prompt.value,
  entities: document.forms.form.elements.entities.value,
  model: document.getElementById("model").textContent,
  words: document.getElementById("words").hidden ? "" : document.getElementById("words").textContent,
  what: document.getElementById("what").textContent,
  placeholders: Object.fromEntries([...document.querySelectorAll("#settings input, #form .row input")]
    .map((i) => [i.name, i.placeholder])),
  selects: Object.fromEntries([...document.querySelectorAll("#settings select")]
    .map((s) => [s.name, s.options[0].text])),
})"""


@needs_chromium
def test_default_server_page_generates_its_prefilled_example_with_no_edit(default_server, browser):
    """A first contact: the page of a server with no --model opens prefilled with the model card's
    example, names the model, its words and the preset's values, and Generate (no edit) returns a
    vanilla/DeLeaker pair that differ."""
    health = httpx.get(default_server.url + "/health", timeout=10).json()
    example = health["example"]
    assert example and health["vocabulary"] and health["model"] == "toyworld-onnx"  # the embedded default artifact's folder
    models = httpx.get(default_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert models["deleaker"]["example"] == example and models["deleaker"]["vocabulary"] == health["vocabulary"]
    page = browser.run_page(default_server.url + "/?autorun=1")  # the prefilled page, run as it is
    assert page["state"] == "done" and page["error"] == "", page
    fields = json.loads(browser.evaluate(READ_FIELDS))
    assert fields["prompt"] == example["prompt"] and fields["entities"] == ", ".join(example["entities"])
    assert "toyworld" in fields["model"]
    assert all(w in fields["words"] for w in health["vocabulary"])
    assert "DeLeaker" in fields["what"] and "leaks" in fields["what"]
    defaults = health["deleaker_defaults"]
    assert fields["placeholders"]["k_strength"] == str(defaults["k_strength"])  # the preset's values, not "preset"
    assert fields["placeholders"]["size"] == health["default_size"] == "32x32"
    assert fields["placeholders"]["steps"] == str(health["default_steps"])
    assert fields["selects"]["do_smoothing"] == ("preset (on)" if defaults["do_smoothing"] else "preset (off)")
    assert "1024" not in page["health"] and "multiples of 4 px" in page["health"], page["health"]
    assert [im["natural"] for im in page["images"]] == [[32, 32], [32, 32]]
    vanilla, deleaker = (image_of(im["src"]) for im in page["images"])
    assert np.abs(vanilla - deleaker).max() >= 3  # DeLeaker changed the picture


def main(argv: list[str] | None = None) -> int:
    """Screenshot of one real run: starts `deleaker serve` with the given options, runs the page, saves a PNG."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--prompt", help="default: the page's own (the served model's example)")
    p.add_argument("--entities", help="default: the page's own")
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE", help="another page field")
    p.add_argument("serve_args", nargs="*", help="options of `deleaker serve` (after --)")
    args = p.parse_args(argv)
    fields = {k: v for k, v in (("prompt", args.prompt), ("entities", args.entities)) if v is not None}
    fields.update(dict(f.split("=", 1) for f in args.field))
    with tempfile.TemporaryDirectory() as tmp:
        s = ServerProcess(args.serve_args, Path(tmp) / "server.log", env={"DELEAKER_API_TOKEN": TOKEN})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        b = None
        try:
            b = Browser(Path(tmp) / "profile")
            before = httpx.get(s.url + "/metrics", headers=auth, timeout=10).text
            page = b.run_page(page_url(s.url, TOKEN, **fields), timeout_s=600)
            after = httpx.get(s.url + "/metrics", headers=auth, timeout=10).text
            batches = {k: metric(after, f"deleaker_batch_size_{k}") - metric(before, f"deleaker_batch_size_{k}")
                       for k in ("count", "sum")}
            print(json.dumps({"fields": fields, "serve_args": args.serve_args,
                              **{k: v for k, v in page.items() if k != "images"},
                              "natural_sizes": [im["natural"] for im in page["images"]],
                              "batches": batches["count"], "batched_images": batches["sum"]}, ensure_ascii=False))
            if page["state"] != "done":
                return 1
            b.evaluate("document.activeElement && document.activeElement.blur()")
            Path(args.out).write_bytes(b.screenshot())
        finally:
            if b is not None:
                b.close()
            s.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
