// The playground: one prompt, sent twice at once (deleaker false / true) so the server's batcher
// runs both images in one batch; shows them side by side with the round-trip times.
// Every field can be preset from the URL (query or #fragment; put a token in the fragment, which
// the browser never sends): /?prompt=...&entities=cat,dog&seed=1&autorun=1#token=...
"use strict";

const GENERATE = "v1/images/generations"; // relative: works behind a path prefix too
const HEALTH = "health";
const MAX_RANDOM_SEED = 2 ** 31;

const $ = (id) => document.getElementById(id);
const form = $("form");
const field = (name) => form.elements.namedItem(name);

// One field per DeLeaker setting a request may set: the server's list ({name: "float" | "int" | "bool"},
// from /health), so the page has no copy of its own; the preset's values (deleaker_defaults) are the
// placeholders, so a blank field shows what the server will use.
let SETTINGS = [];

const shown = (v) => (v === null || v === undefined ? "from the steps" : String(v));

function buildSettings(kinds, defaults) {
  SETTINGS = Object.entries(kinds || {});
  defaults = defaults || {};
  const box = $("settings");
  box.replaceChildren(box.querySelector("legend")); // the fields are rebuilt, the legend stays
  for (const [name, kind] of SETTINGS) {
    const label = document.createElement("label");
    label.textContent = name + " ";
    let input;
    if (kind === "bool") {
      input = document.createElement("select");
      const preset = name in defaults ? (defaults[name] ? " (on)" : " (off)") : "";
      for (const [value, text] of [["", `preset${preset}`], ["true", "on"], ["false", "off"]]) {
        input.add(new Option(text, value));
      }
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.step = kind === "int" ? "1" : "any";
      input.placeholder = name in defaults ? shown(defaults[name]) : "preset";
    }
    input.name = name;
    input.dataset.kind = kind;
    label.append(input);
    box.append(label);
  }
}

// Number fields: "" is "not given"; text a number input cannot hold is an error, not a silent blank.
function numberOf(name) {
  const input = field(name);
  if (input.validity.badInput) throw new Error(`${name}: not a number`);
  return input.value === "" ? undefined : Number(input.value);
}

// The request body shared by both images, or an Error naming the bad field.
function requestBody() {
  const body = { prompt: field("prompt").value };
  body.entities = field("entities").value.split(",").map((s) => s.trim()).filter((s) => s);
  let seed = numberOf("seed");
  if (seed === undefined) seed = Math.floor(Math.random() * MAX_RANDOM_SEED); // one seed for both images
  body.seed = seed;
  const steps = numberOf("steps");
  if (steps !== undefined) body.steps = steps;
  const size = field("size").value.trim();
  if (size) body.size = size;
  const guidance = numberOf("guidance");
  if (guidance !== undefined) body.guidance = guidance;
  const settings = {};
  for (const [name, kind] of SETTINGS) {
    if (kind === "bool") {
      const v = field(name).value;
      if (v) settings[name] = v === "true";
    } else {
      const v = numberOf(name);
      if (v !== undefined) settings[name] = v;
    }
  }
  if (Object.keys(settings).length) body.deleaker_settings = settings;
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = field("token").value.trim();
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

// The API's answer, worded for this page: the request errors (400) are the API's own one-line
// message with the field it names; the others say what to do here.
function pageError(status, json, resp) {
  const err = (json && json.error) || {};
  const message = err.message || `HTTP ${status} ${resp.statusText}`.trim();
  if (status === 401) return "this server needs its API token: paste it into the API token field";
  if (status === 429) return `the server is busy: try again in ${resp.headers.get("Retry-After") || "a few"} s`;
  if (status === 503) return `the server is not taking requests now (${message}): try again shortly`;
  if (status === 504) return `the server took too long (${message})`;
  if (status === 400 && err.param) return `${err.param}: ${message}`;
  return message;
}

// One POST -> {image} or {error: a one-line message for this page}.
async function generate(body) {
  let resp;
  try {
    resp = await fetch(GENERATE, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) {
    return { error: `cannot reach the server: ${e.message}` };
  }
  let json = null;
  try {
    json = await resp.json();
  } catch (_) { /* not JSON: reported by status below */ }
  if (!resp.ok) {
    return { error: pageError(resp.status, json, resp) };
  }
  if (!json || !Array.isArray(json.data) || !json.data.length || !json.data[0].b64_json) {
    return { error: "the server's answer holds no image" };
  }
  return { image: json.data[0] };
}

function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
  document.body.dataset.state = state;
}

function showError(message) {
  const e = $("error");
  e.textContent = message;
  e.hidden = !message;
}

function clearImage(img) {
  img.removeAttribute("src");
  delete img.dataset.natural;
  delete img.dataset.seed;
}

async function showImage(img, image) {
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("not a PNG"));
    img.src = `data:image/png;base64,${image.b64_json}`;
  });
  img.dataset.natural = `${img.naturalWidth}x${img.naturalHeight}`;
  img.dataset.seed = String(image.seed);
}

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;

async function run() {
  const button = $("run");
  const imgs = { vanilla: $("img-vanilla"), deleaker: $("img-deleaker") };
  Object.values(imgs).forEach(clearImage);
  showError("");
  $("timing").textContent = "";
  let body;
  try {
    body = requestBody();
  } catch (e) {
    setStatus("error", "not sent");
    showError(e.message);
    return;
  }
  button.disabled = true;
  const t0 = performance.now();
  const tick = setInterval(() => setStatus("running", `generating… ${seconds(performance.now() - t0)}`), 200);
  setStatus("running", "generating…");
  // both at once, identical but for `deleaker`: the batcher puts them in one batch
  const timed = (deleaker) => generate({ ...body, deleaker }).then((r) => ({ ...r, ms: performance.now() - t0 }));
  const [vanilla, deleaker] = await Promise.all([timed(false), timed(true)]);
  clearInterval(tick);
  button.disabled = false;
  const wall = performance.now() - t0;
  const errors = [];
  for (const [name, r] of [["vanilla", vanilla], ["DeLeaker", deleaker]]) {
    if (r.error) errors.push([name, r.error]);
  }
  const shown = [];
  try {
    if (vanilla.image) shown.push(showImage(imgs.vanilla, vanilla.image));
    if (deleaker.image) shown.push(showImage(imgs.deleaker, deleaker.image));
    await Promise.all(shown);
  } catch (e) {
    errors.push(["image", `the returned image does not load: ${e.message}`]);
  }
  if (errors.length) {
    const distinct = new Set(errors.map(([, m]) => m));
    showError(distinct.size === 1 ? errors[0][1] : errors.map(([n, m]) => `${n}: ${m}`).join("; "));
    setStatus("error", "failed");
  } else {
    setStatus("done", `seed ${vanilla.image.seed}`);
  }
  const parts = [];
  if (vanilla.image) parts.push(`vanilla ${seconds(vanilla.ms)}`);
  if (deleaker.image) parts.push(`DeLeaker ${seconds(deleaker.ms)}`);
  if (parts.length) $("timing").textContent = `${parts.join(" · ")} · both ${seconds(wall)} (round trips, sent together)`;
}

// The model's own language from /health: its name, words and example (the prompt is prefilled with
// it, so Generate works at once), its default size and steps as placeholders.
function describeModel(info) {
  $("model").textContent = info.model ? `· ${info.model}` : "";
  const words = $("words");
  if (info.vocabulary) {
    words.textContent = `this model knows only these words: ${info.vocabulary.join(", ")}` +
      (info.about ? ` (${info.about})` : "");
    words.hidden = false;
  }
  if (info.example && !field("prompt").value) {
    field("prompt").value = info.example.prompt;
    field("entities").value = info.example.entities.join(", ");
  }
  if (info.default_size) field("size").placeholder = info.default_size;
  field("steps").placeholder = String(info.default_steps);
  if (info.default_guidance !== undefined) field("guidance").placeholder = String(info.default_guidance);
}

// Returns the health body (null when the server cannot be reached).
async function checkHealth() {
  const h = $("health");
  try {
    const resp = await fetch(HEALTH);
    const info = await resp.json();
    if (!SETTINGS.length) {
      buildSettings(info.deleaker_settings, info.deleaker_defaults);
      describeModel(info);
    }
    h.dataset.state = info.status;
    const [lo, hi] = info.size_range;
    h.textContent = `${info.status} · ${info.backend} · max batch ${info.max_batch} · sizes: multiples of ` +
      `${info.size_multiple} px from ${lo}` + (hi ? ` to ${hi} px (what fits now)` : " px") +
      ` · ${info.entity_slots} entity slots · ${info.default_steps} steps by default`;
    if (info.status === "warming_up") setTimeout(checkHealth, 2000);
    return info;
  } catch (e) {
    h.dataset.state = "unreachable";
    h.textContent = `cannot reach the server: ${e.message}`;
    return null;
  }
}

// URL parameters -> fields; returns an error message for a value a field cannot hold.
function applyParams() {
  const params = new URLSearchParams(location.search);
  for (const [k, v] of new URLSearchParams(location.hash.slice(1))) params.set(k, v);
  const bad = [];
  for (const [k, v] of params) {
    if (k === "autorun") continue;
    const input = field(k);
    if (!input || input.name !== k) { // namedItem also matches ids (the button)
      bad.push(`unknown parameter ${k}`);
      continue;
    }
    input.value = v;
    if (input.value !== v) bad.push(`${k}: cannot take ${JSON.stringify(v)}`);
  }
  return { autorun: params.get("autorun") === "1", bad };
}

async function main() {
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  await checkHealth(); // builds the settings fields, so URL parameters can fill them
  const { autorun, bad } = applyParams();
  if (bad.length) {
    setStatus("error", "not sent");
    showError(bad.join("; "));
  } else if (autorun) {
    await run();
  }
}

main();
