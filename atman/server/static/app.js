"use strict";
// The page talks to the same JSON API as any client: /models_available, /complete, /explain.

const $ = (id) => document.getElementById(id);
const controls = [];  // {start, length, factor, token_overlap, text}
let current = null;   // {prompt, explanations, image}
let models = [];      // /models_available entries

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
    models = await call("GET", "/models_available");
    $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name)));
    imageSupport();
    status("");
  } catch (err) {
    status("Cannot list the models: " + err.message, true);
  }
}

function imageSupport() {
  const model = models.find((m) => m.name === $("model").value);
  $("image-label").hidden = !(model && model.image_support);
}

// the chosen image as {data: base64, url} when the model reads images, else null
function chosenImage() {
  const file = $("image").files[0];
  if ($("image-label").hidden || !file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ data: String(reader.result).split(",", 2)[1], url: String(reader.result) });
    reader.onerror = () => reject(new Error("cannot read the image file"));
    reader.readAsDataURL(file);
  });
}

function promptItems(prompt, image, textControls = []) {
  const text = { type: "text", data: prompt, controls: textControls };
  return image ? [{ type: "image", data: image.data, controls: [] }, text] : [text];
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
    const image = await chosenImage();
    if (!target) {
      status("Completing the prompt ...");
      const done = await call("POST", "/complete", { model: $("model").value, prompt: promptItems(prompt, image), maximum_tokens: Number($("max-tokens").value) || 12 });
      target = done.completions[0].completion;
      if (!target) throw new Error("the model completed nothing; give a target");
      $("target").value = target;
    }
    status("Explaining ...");
    const body = {
      model: $("model").value,
      prompt: promptItems(prompt, image),
      target,
      control_factor: Number($("control-factor").value),
      target_granularity: $("target-granularity").value,
    };
    const g = granularity();
    if (g) body.prompt_granularity = g;
    const started = performance.now();
    const result = await call("POST", "/explain", body);
    current = { prompt, explanations: result.explanations, image };
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
  showImage(current.explanations[index].items.find((item) => item.type === "image"));
}

// the image with each tile's relevance laid over it, on the same scale as the image's tiles
function showImage(item) {
  $("image-view").hidden = !(item && current.image);
  if ($("image-view").hidden) return;
  const picture = new Image();
  picture.onload = () => {
    const canvas = $("image-canvas");
    const side = 320 / Math.max(picture.width, picture.height);
    canvas.width = Math.round(picture.width * side);
    canvas.height = Math.round(picture.height * side);
    const context = canvas.getContext("2d");
    context.drawImage(picture, 0, 0, canvas.width, canvas.height);
    const scale = Math.max(0, ...item.scores.map((s) => Math.abs(s.score)));
    for (const s of item.scores) {
      context.fillStyle = colour(s.score, scale);
      context.fillRect(s.rect.left * canvas.width, s.rect.top * canvas.height,
                       s.rect.width * canvas.width, s.rect.height * canvas.height);
    }
    canvas.dataset.tiles = String(item.scores.length);
  };
  picture.src = current.image.url;
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
  let image = null;
  const request = (withControls) => ({
    model: $("model").value,
    prompt: promptItems(prompt, image, withControls ? controls.map(({ text, ...c }) => c) : []),
    maximum_tokens: Number($("max-tokens").value) || 12,
  });
  try {
    image = await chosenImage();
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

// --- citations: /cite -------------------------------------------------------------------
let cited = null;

async function citeSources() {
  const button = $("cite-run");
  button.disabled = true;
  try {
    status("Citing ...");
    const response = $("cite-response").value.trim();
    const body = { model: $("model").value, context: $("cite-context").value, question: $("cite-question").value,
                   sources: $("cite-sources").value, maximum_tokens: Number($("max-tokens").value) || 12 };
    if (response) body.response = response;
    const started = performance.now();
    cited = await call("POST", "/cite", body);
    if (!response) $("cite-response").value = cited.response;
    showCitations();
    status(`Cited in ${((performance.now() - started) / 1000).toFixed(1)} s by ${cited.model_version}.`);
  } catch (err) {
    status(err.message, true);
  } finally {
    button.disabled = false;
  }
}

function showCitations() {
  const spans = cited.spans.map((span, k) => {
    const div = document.createElement("div");
    div.className = "cite-span";
    div.tabIndex = 0;
    div.dataset.span = String(k);
    div.append(document.createTextNode(span.text));
    const top = document.createElement("ol");
    const ranked = span.scores.map((score, i) => [i, score]).filter(([, score]) => score > 0)
      .sort((a, b) => b[1] - a[1]).slice(0, 3);
    for (const [i, score] of ranked) {
      const li = document.createElement("li");
      li.textContent = `[${i + 1}] ${score.toFixed(3)} ${cited.sources[i].text.slice(0, 60)}`;
      top.append(li);
    }
    div.append(top);
    div.addEventListener("mouseenter", () => highlightCitation(k));
    div.addEventListener("focus", () => highlightCitation(k));
    return div;
  });
  $("cite-spans").replaceChildren(...spans);
  const parts = [];
  let at = 0;
  cited.sources.forEach((source, i) => {
    if (source.start > at) parts.push(document.createTextNode(cited.context.slice(at, source.start)));
    const el = document.createElement("span");
    el.className = "cite-source";
    el.dataset.source = String(i);
    el.textContent = cited.context.slice(source.start, source.end);
    parts.push(el);
    at = source.end;
  });
  if (at < cited.context.length) parts.push(document.createTextNode(cited.context.slice(at)));
  $("cite-view").replaceChildren(...parts);
  $("cite-result").hidden = false;
  if (cited.spans.length) highlightCitation(0);
}

function highlightCitation(k) {
  const scores = cited.spans[k].scores;
  const scale = Math.max(0, ...scores.map(Math.abs));
  for (const el of $("cite-view").querySelectorAll(".cite-source")) {
    const score = scores[Number(el.dataset.source)];
    el.style.background = score > 0 ? colour(score, scale) : "";
    el.title = `score ${score.toFixed(4)}`;
  }
  for (const el of $("cite-spans").children) el.classList.toggle("active", Number(el.dataset.span) === k);
}

$("granularity").addEventListener("change", () => { $("delimiter-label").hidden = $("granularity").value !== "custom"; });
$("explain").addEventListener("click", explain);
$("add-control").addEventListener("click", addControl);
$("complete").addEventListener("click", complete);
$("cite-run").addEventListener("click", citeSources);
$("token").addEventListener("change", loadModels);
$("model").addEventListener("change", imageSupport);
loadModels();
