"use strict";
// The page talks to the same JSON API as any client: /models_available, /complete, /explain.

const $ = (id) => document.getElementById(id);
const controls = [];  // {start, length, factor, token_overlap, text}
let current = null;   // {prompt, explanations}

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function call(method, path, body) {
  const response = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = data.error || (Array.isArray(data.detail) ? data.detail.map((d) => d.msg).join("; ") : response.statusText);
    throw new Error(`${response.status}: ${detail}`);
  }
  return data;
}

async function loadModels() {
  try {
    const health = await call("GET", "/health");
    $("token-label").hidden = !health.auth;
    if (health.auth && !$("token").value) {
      status("This server needs a token: enter it above.");
      return;
    }
    const models = await call("GET", "/models_available");
    $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name)));
    status("");
  } catch (err) {
    status("Cannot list the models: " + err.message, true);
  }
}

function granularity() {
  const value = $("granularity").value;
  if (value === "auto") return undefined;
  if (value === "custom") return { type: "custom", delimiter: $("delimiter").value };
  return { type: value };
}

async function explain() {
  const prompt = $("prompt").value;
  let target = $("target").value;
  const button = $("explain");
  button.disabled = true;
  try {
    if (!target) {
      status("Completing the prompt ...");
      const done = await call("POST", "/complete", { model: $("model").value, prompt: [{ type: "text", data: prompt, controls: [] }], maximum_tokens: Number($("max-tokens").value) || 12 });
      target = done.completions[0].completion;
      if (!target) throw new Error("the model completed nothing; give a target");
      $("target").value = target;
    }
    status("Explaining ...");
    const body = {
      model: $("model").value,
      prompt: [{ type: "text", data: prompt, controls: [] }],
      target,
      control_factor: Number($("control-factor").value),
      target_granularity: $("target-granularity").value,
    };
    const g = granularity();
    if (g) body.prompt_granularity = g;
    const started = performance.now();
    const result = await call("POST", "/explain", body);
    current = { prompt, explanations: result.explanations };
    showTargets();
    status(`Explained in ${((performance.now() - started) / 1000).toFixed(1)} s by ${result.model_version}.`);
  } catch (err) {
    status(err.message, true);
  } finally {
    button.disabled = false;
  }
}

function showTargets() {
  const tabs = current.explanations.map((exp, index) => {
    const b = document.createElement("button");
    b.type = "button";
    b.setAttribute("role", "tab");
    b.textContent = exp.target.replace(/\n/g, "\u23ce") || "\u2205";
    b.addEventListener("click", () => select(index));
    return b;
  });
  $("targets").replaceChildren(...tabs);
  $("result").hidden = false;
  select(0);
}

// the palette of every view, from style.css (atman/render/palette.py)
function palette(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function colour(score, scale) {
  const strength = scale > 0 ? Math.min(Math.abs(score) / scale, 1) : 0;
  const rgb = palette(score >= 0 ? "--atman-for" : "--atman-against");
  return `rgba(${rgb}, ${(strength * Number(palette("--atman-max-alpha"))).toFixed(3)})`;
}

function select(index) {
  [...$("targets").children].forEach((b, i) => b.setAttribute("aria-selected", String(i === index)));
  const text = current.prompt;
  const scores = current.explanations[index].items.find((item) => item.type === "text").scores;
  const scale = Math.max(0, ...scores.map((s) => Math.abs(s.score)));
  const parts = [];
  let at = 0;
  for (const s of [...scores].sort((a, b) => a.start - b.start)) {
    if (s.start > at) parts.push(document.createTextNode(text.slice(at, s.start)));
    const span = document.createElement("span");
    span.className = "unit";
    span.textContent = text.slice(s.start, s.start + s.length);
    span.dataset.score = String(s.score);
    span.title = `relevance ${s.score.toFixed(4)}`;
    span.style.background = colour(s.score, scale);
    parts.push(span);
    at = Math.max(at, s.start + s.length);
  }
  if (at < text.length) parts.push(document.createTextNode(text.slice(at)));
  $("highlighted").replaceChildren(...parts);
}

function addControl() {
  const area = $("prompt");
  const start = area.selectionStart, end = area.selectionEnd;
  if (end <= start) {
    status("Select part of the prompt first.", true);
    return;
  }
  const factor = Number($("steer-factor").value);
  if (!(factor >= 0)) {
    status("The factor must be a number >= 0.", true);
    return;
  }
  controls.push({ start, length: end - start, factor, token_overlap: $("steer-overlap").value, text: area.value.slice(start, end) });
  showControls();
  status("");
}

function showControls() {
  $("controls").replaceChildren(...controls.map((c, i) => {
    const li = document.createElement("li");
    li.textContent = `×${c.factor} on ${JSON.stringify(c.text)} (${c.token_overlap})`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "remove";
    remove.addEventListener("click", () => { controls.splice(i, 1); showControls(); });
    li.append(remove);
    return li;
  }));
}

async function complete() {
  const button = $("complete");
  button.disabled = true;
  const prompt = $("prompt").value;
  const request = (withControls) => ({
    model: $("model").value,
    prompt: [{ type: "text", data: prompt, controls: withControls ? controls.map(({ text, ...c }) => c) : [] }],
    maximum_tokens: Number($("max-tokens").value) || 12,
  });
  try {
    status("Completing ...");
    const plain = await call("POST", "/complete", request(false));
    const steered = await call("POST", "/complete", request(true));
    $("plain-completion").textContent = plain.completions[0].completion;
    $("steered-completion").textContent = steered.completions[0].completion;
    $("completions").hidden = false;
    status(controls.length ? `Steered by ${controls.length} control(s).` : "No controls: both are the same.");
  } catch (err) {
    status(err.message, true);
  } finally {
    button.disabled = false;
  }
}

$("granularity").addEventListener("change", () => { $("delimiter-label").hidden = $("granularity").value !== "custom"; });
$("explain").addEventListener("click", explain);
$("add-control").addEventListener("click", addControl);
$("complete").addEventListener("click", complete);
$("token").addEventListener("change", loadModels);
loadModels();
