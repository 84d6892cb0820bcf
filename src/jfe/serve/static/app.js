// JFE search page: builds a multipart /search request from the text box, the dropped image, the chosen
// instruction and k, and renders the ranked candidates. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, apiKey: localStorage.getItem("jfe-api-key") || "" };

function headers() {
  return state.apiKey ? { "X-API-Key": state.apiKey } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("key-field").hidden = false;
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function loadService() {
  try {
    const health = await (await fetch("/health")).json();
    const el = $("service");
    el.textContent = `${health.model} · ${health.index_size.toLocaleString()} candidates · ${health.dim}-d`;
    el.classList.add("ok");
    if (health.auth && !state.apiKey) $("key-field").hidden = false;
    for (const name of health.rerankers || []) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      $("rerank").appendChild(option);
    }
    $("rerank-field").hidden = !(health.rerankers || []).length;
  } catch (err) {
    $("service").textContent = "service unreachable";
  }
  await loadInstructions();
}

async function loadInstructions() {
  const select = $("instruction");
  select.querySelectorAll("optgroup").forEach((g) => g.remove());
  try {
    const { instructions } = await (await api("/instructions")).json();
    for (const choice of instructions) {
      const group = document.createElement("optgroup");
      const name = choice.dataset || `dataset ${choice.dataset_id}`;
      group.label = `${name}: ${choice.query_modality} → ${choice.cand_modality}`;
      for (const prompt of choice.prompts) {
        const option = document.createElement("option");
        option.value = prompt;
        option.textContent = prompt;
        group.appendChild(option);
      }
      select.appendChild(group);
    }
  } catch (err) {
    setStatus(`Instructions unavailable: ${err.message}`, true);
  }
}

function setImage(file) {
  if (file && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  state.file = file || null;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  if (state.file) {
    preview.src = URL.createObjectURL(state.file);
    preview.hidden = false;
    $("drop-hint").hidden = true;
    $("clear-image").hidden = false;
  } else {
    preview.removeAttribute("src");
    preview.hidden = true;
    $("drop-hint").hidden = false;
    $("clear-image").hidden = true;
    $("file").value = "";
  }
}

function setupDropZone() {
  const drop = $("drop");
  drop.addEventListener("click", (e) => { if (e.target.id !== "clear-image") $("file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  $("file").addEventListener("change", (e) => setImage(e.target.files[0]));
  $("clear-image").addEventListener("click", (e) => { e.stopPropagation(); setImage(null); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]); });
  // Pasting an image anywhere on the page also works.
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData || {}).files || []].find((f) => f.type.startsWith("image/"));
    if (file) setImage(file);
  });
}

async function thumbnail(url) {
  // With an API key the image must be fetched with the header; otherwise the browser can load it directly.
  if (!state.apiKey) return url;
  const blob = await (await api(url)).blob();
  return URL.createObjectURL(blob);
}

function card(hit, best) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.did = hit.did;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  if (hit.image_url) {
    const img = document.createElement("img");
    img.alt = hit.text || hit.did;
    img.loading = "lazy";
    thumbnail(hit.image_url).then((src) => { img.src = src; }).catch(() => { img.alt = "image unavailable"; });
    thumb.appendChild(img);
  } else {
    // Text candidates show their text where a picture would be, so every card reads the same way.
    thumb.classList.add("text-only");
    const quote = document.createElement("blockquote");
    quote.textContent = hit.text || "(empty)";
    thumb.appendChild(quote);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const top = document.createElement("div");
  top.className = "top";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const did = document.createElement("span");
  did.className = "did";
  did.textContent = hit.did;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = hit.modality || "?";
  top.append(rank, badge, did);
  if (hit.first_stage_rank != null) {
    // where the retriever had put this hit before the reranker read query and candidate together
    const was = document.createElement("span");
    was.className = "was";
    was.title = "rank before reranking";
    was.textContent = hit.first_stage_rank === hit.rank ? "=" : `was #${hit.first_stage_rank}`;
    top.appendChild(was);
  }
  meta.appendChild(top);
  if (hit.text && hit.image_url) {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = hit.text;
    meta.appendChild(text);
  }
  const score = document.createElement("div");
  score.className = "score";
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  // Bars are relative to the best hit, since cosine scores of one model cluster in a narrow band.
  fill.style.width = `${Math.max(4, Math.min(100, (hit.score / (best || 1)) * 100))}%`;
  bar.appendChild(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = hit.score.toFixed(3);
  score.append(bar, value);
  meta.appendChild(score);
  el.append(thumb, meta);
  return el;
}

async function search(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text && !state.file) {
    setStatus("Type some text or add an image first.", true);
    return;
  }
  state.apiKey = $("api-key").value.trim() || state.apiKey;
  if (state.apiKey) localStorage.setItem("jfe-api-key", state.apiKey);
  const form = new FormData();
  if (text) form.append("text", text);
  if (state.file) form.append("image", state.file, state.file.name || "image.png");
  if ($("instruction").value) form.append("instruction", $("instruction").value);
  form.append("k", $("k").value || "12");
  if ($("rerank").value) {
    form.append("rerank", $("rerank").value);
    form.append("rerank_k", "50");
  }
  $("submit").disabled = true;
  setStatus("Searching…");
  try {
    const result = await (await api("/search", { method: "POST", body: form })).json();
    const grid = $("results");
    grid.replaceChildren();
    const best = result.results.length ? result.results[0].score : 1;
    for (const hit of result.results) grid.appendChild(card(hit, best));
    const article = /^[aeiou]/i.test(result.query_modality) ? "an" : "a";
    const reranked = result.reranked_by ? ` · top ${result.rerank_k} reranked by ${result.reranked_by}` : "";
    setStatus(`${result.results.length} results for ${article} ${result.query_modality} query · ` +
              `${result.took_ms.toFixed(1)} ms${reranked}`);
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.apiKey;
  setupDropZone();
  $("search-form").addEventListener("submit", search);
  $("api-key").addEventListener("change", () => {
    state.apiKey = $("api-key").value.trim();
    localStorage.setItem("jfe-api-key", state.apiKey);
    loadInstructions();
  });
  loadService();
});
