"use strict";
// The page talks to the same JSON API as any client: /models_available, /complete, /explain, /cite, and the
// OpenAI-compatible /v1/chat/completions for a chat.

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
    // this server's {error, code}, or OpenAI's {error: {message, ...}} from /v1
    const detail = (data.error && data.error.message) || data.error
      || (Array.isArray(data.detail) ? data.detail.map((d) => d.msg).join("; ") : response.statusText);
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
    span.title = `score ${s.score.toFixed(4)} nats`;
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
      li.textContent = `[${cited.sources[i].name}] ${score.toFixed(3)} ${cited.sources[i].text.slice(0, 60)}`;
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
    el.title = `score ${score.toFixed(4)} nats`;
  }
  for (const el of $("cite-spans").children) el.classList.toggle("active", Number(el.dataset.span) === k);
}

// --- a chat transcript: /v1/chat/completions with the atman.cite extension ------------------
const chat = { messages: [], answer: "", citations: [] };

// a message's text as the server reads it (atman/transcripts.py): text parts joined by a blank line, trimmed,
// an assistant's leading <think>...</think> taken out as its reasoning
function readMessage(message) {
  let text = message.content;
  if (Array.isArray(text)) {
    text = text.map((part) => (typeof part === "string" ? part : part.text || "").trim()).filter(Boolean).join("\n\n");
  }
  text = (text || "").trim();
  let reasoning = message.reasoning_content || message.reasoning || null;
  const think = message.role === "assistant" ? /^\s*<think>([\s\S]*?)<\/think>\s*/.exec(text) : null;
  if (think) { reasoning = think[1]; text = text.slice(think[0].length); }
  return { role: message.role, text, reasoning: reasoning ? reasoning.trim() : null,
           toolCallId: message.tool_call_id || null, calls: message.tool_calls || [] };
}

function chatMessages() {
  let messages;
  try {
    messages = JSON.parse($("chat-messages").value);
  } catch (err) {
    throw new Error("the messages are not valid JSON: " + err.message);
  }
  if (messages && !Array.isArray(messages) && Array.isArray(messages.messages)) messages = messages.messages;
  if (!Array.isArray(messages) || !messages.length) throw new Error("give a JSON list of messages");
  return messages;
}

function marked(text, marks) {
  // text with each source (start, end, key) wrapped, in order
  const parts = [];
  let at = 0;
  for (const [start, end, key] of [...marks].sort((a, b) => a[0] - b[0])) {
    if (start < at) continue;
    if (start > at) parts.push(document.createTextNode(text.slice(at, start)));
    const el = document.createElement("span");
    el.className = "chat-source";
    el.dataset.key = key;
    el.textContent = text.slice(start, end);
    parts.push(el);
    at = end;
  }
  if (at < text.length) parts.push(document.createTextNode(text.slice(at)));
  return parts;
}

function sourceKey(source) {
  return `${source.message}:${source.role === "reasoning" ? "r" : "c"}:${source.start}:${source.end}`;
}

function showChat() {
  const marks = new Map();  // message index + part -> [[start, end, key]]
  for (const citation of chat.citations) {
    for (const source of citation.sources) {
      const where = `${source.message}:${source.role === "reasoning" ? "r" : "c"}`;
      if (!marks.has(where)) marks.set(where, new Map());
      marks.get(where).set(sourceKey(source), [source.start, source.end, sourceKey(source)]);
    }
  }
  const bubbles = chat.messages.map((message, index) => {
    const read = readMessage(message);
    const div = document.createElement("div");
    div.className = "msg " + read.role;
    div.dataset.message = String(index);
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = `#${index} ${read.role}${read.toolCallId ? " " + read.toolCallId : ""}`;
    div.append(role);
    if (read.reasoning) {
      const thinking = document.createElement("details");
      thinking.open = true;
      thinking.innerHTML = "<summary>thinking</summary>";
      thinking.append(...marked(read.reasoning, (marks.get(`${index}:r`) || new Map()).values()));
      div.append(thinking);
    }
    const body = document.createElement("div");
    body.append(...marked(read.text, (marks.get(`${index}:c`) || new Map()).values()));
    div.append(body);
    for (const call of read.calls) {
      const line = document.createElement("div");
      line.className = "call";
      line.textContent = `calls ${call.function && call.function.name} (${call.id})`;
      div.append(line);
    }
    return div;
  });
  const answer = document.createElement("div");
  answer.className = "msg assistant answer";
  answer.id = "chat-answer";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = `#${chat.messages.length} assistant (answer)`;
  answer.append(role);
  let at = 0;
  chat.citations.forEach((citation, k) => {
    if (citation.start > at) answer.append(document.createTextNode(chat.answer.slice(at, citation.start)));
    const div = document.createElement("div");
    div.className = "chat-sentence";
    div.tabIndex = 0;
    div.dataset.sentence = String(k);
    div.append(document.createTextNode(citation.text));
    const top = document.createElement("ol");
    for (const source of citation.sources) {
      const li = document.createElement("li");
      li.textContent = `#${source.message} ${source.role}${source.tool_call_id ? " " + source.tool_call_id : ""} `
        + `${source.score.toFixed(3)} ${source.text.slice(0, 60)}`;
      top.append(li);
    }
    if (!citation.sources.length) top.innerHTML = "<li>no positive source</li>";
    div.append(top);
    div.addEventListener("mouseenter", () => highlightChat(k));
    div.addEventListener("focus", () => highlightChat(k));
    answer.append(div);
    at = citation.end;
  });
  if (at < chat.answer.length) answer.append(document.createTextNode(chat.answer.slice(at)));
  $("chat-view").replaceChildren(...bubbles, answer);
  $("chat-view").hidden = false;
}

function highlightChat(k) {
  const sources = chat.citations[k].sources;
  const scores = new Map(sources.map((s) => [sourceKey(s), s.score]));
  const scale = Math.max(0, ...sources.map((s) => Math.abs(s.score)));
  for (const el of $("chat-view").querySelectorAll(".chat-source")) {
    const score = scores.get(el.dataset.key);
    el.style.background = score > 0 ? colour(score, scale) : "";
    el.title = score === undefined ? "not among this sentence's top sources" : `score ${score.toFixed(4)} nats`;
  }
  for (const el of $("chat-view").querySelectorAll(".chat-sentence")) {
    el.classList.toggle("active", Number(el.dataset.sentence) === k);
  }
}

async function citeChat() {
  const button = $("chat-run");
  button.disabled = true;
  try {
    const messages = chatMessages();
    const last = messages[messages.length - 1];
    const given = last.role === "assistant" && !(last.tool_calls && last.tool_calls.length);
    chat.messages = given ? messages.slice(0, -1) : messages;
    chat.answer = "";
    chat.citations = [];
    const cite = { sources: $("chat-sources").value, top: 3 };
    const body = { model: $("model").value, messages: chat.messages, temperature: 0,
                   max_tokens: Number($("max-tokens").value) || 12, atman: { cite } };
    const started = performance.now();
    if (given) {
      body.atman.answer = readMessage(last).text;
      status("Citing the answer ...");
      const done = await call("POST", "/v1/chat/completions", body);
      chat.answer = done.choices[0].message.content;
      chat.citations = done.choices[0].message.citations || [];
      showChat();
    } else {
      status("Answering ...");
      await streamChat({ ...body, stream: true });
    }
    if (chat.citations.length) highlightChat(0);
    status(`Cited ${chat.citations.length} sentence(s) in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (err) {
    status(err.message, true);
  } finally {
    button.disabled = false;
  }
}

async function streamChat(body) {
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(`${response.status}: ${(data.error && data.error.message) || response.statusText}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : {};
      if (delta.content) chat.answer += delta.content;
      if (delta.citations) chat.citations.push(...delta.citations);
      showChat();
    }
  }
}

$("chat-run").addEventListener("click", citeChat);
$("chat-file").addEventListener("change", async () => {
  const file = $("chat-file").files[0];
  if (file) $("chat-messages").value = await file.text();
});

$("granularity").addEventListener("change", () => { $("delimiter-label").hidden = $("granularity").value !== "custom"; });
$("explain").addEventListener("click", explain);
$("add-control").addEventListener("click", addControl);
$("complete").addEventListener("click", complete);
$("cite-run").addEventListener("click", citeSources);
$("token").addEventListener("change", loadModels);
$("model").addEventListener("change", imageSupport);
loadModels();
