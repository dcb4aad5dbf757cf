// genrec template editor. Everything shown is set with textContent (no HTML parsing): template
// text, rendered prompts, titles and error messages are data, not markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { name: null, etag: null, version: null, trainedHash: null, timer: null, seq: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function status(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
}

async function api(method, path, body, headers = {}) {
  const key = $("key").value.trim();
  const h = { ...headers };
  if (key) h["Authorization"] = "Bearer " + key;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  return { ok: resp.ok, status: resp.status, data, etag: resp.headers.get("ETag") };
}

function errorText(r) {
  const e = (r.data && r.data.error) || {};
  return `${r.status}: ${e.message || "request failed"}`;
}

// -- highlighting ---------------------------------------------------------------------------------
const TOKENS = /(\{#[\s\S]*?#\}|\{%[\s\S]*?%\}|\{\{[\s\S]*?\}\})/g;

function highlight(text, errLine) {
  const pre = $("highlight");
  pre.replaceChildren();
  const lines = text.split("\n");
  let inFront = lines[0] === "---";
  let frontEnd = inFront ? lines.indexOf("---", 1) : -1;
  lines.forEach((line, i) => {
    const ln = el("span", { class: "ln" + (errLine === i + 1 ? " err" : "") });
    if (inFront && i <= frontEnd) {
      ln.append(el("span", { class: "tok-front" }, line));
    } else {
      let last = 0;
      for (const m of line.matchAll(TOKENS)) {
        if (m.index > last) ln.append(line.slice(last, m.index));
        const t = m[0];
        const cls = t.startsWith("{#") ? "tok-comment" : t.startsWith("{%") ? "tok-stmt" : "tok-expr";
        ln.append(el("span", { class: cls }, t));
        last = m.index + t.length;
      }
      if (last < line.length) ln.append(line.slice(last));
    }
    ln.append("\n");
    pre.append(ln);
  });
}

function syncScroll() {
  $("highlight").scrollTop = $("source").scrollTop;
  $("highlight").scrollLeft = $("source").scrollLeft;
}

function showProblem(r) {
  const p = $("problem");
  if (!r) { p.hidden = true; p.textContent = ""; highlight($("source").value, null); return; }
  const e = (r.data && r.data.error) || {};
  const where = e.line ? `line ${e.line}${e.column ? ", column " + e.column : ""}: ` : "";
  p.textContent = where + (e.message || errorText(r));
  p.hidden = false;
  highlight($("source").value, e.line || null);
}

// -- list, load, history --------------------------------------------------------------------------
async function loadList() {
  const r = await api("GET", "/v1/templates");
  if (!r.ok) { status(errorText(r), "bad"); return; }
  state.trainedHash = r.data.trained && r.data.trained.hash;
  const ul = $("templates");
  ul.replaceChildren();
  for (const t of r.data.data) {
    const flag = t.matches_training ? "" : " · differs from training";
    const li = el("li", { "data-name": t.name, class: t.name === state.name ? "selected" : "" },
      t.name + (t.is_default ? " (default)" : ""),
      el("small", {}, `v${t.version} · ${t.hash}${flag}`));
    li.addEventListener("click", () => select(t.name));
    ul.append(li);
  }
  if (!state.name && r.data.data.length) {
    const def = r.data.data.find((t) => t.is_default) || r.data.data[0];
    await select(def.name);
  }
}

function setFlags(version, hash) {
  $("current-version").textContent = "v" + version;
  const f = $("training-flag");
  const same = hash === state.trainedHash;
  f.textContent = same ? "same as training" : "differs from the trained template";
  f.className = "badge " + (same ? "good" : "warn");
}

async function select(name, version) {
  const q = version ? `?version=${version}` : "";
  const r = await api("GET", `/v1/templates/${encodeURIComponent(name)}${q}`);
  if (!r.ok) { status(errorText(r), "bad"); return; }
  const active = await api("GET", `/v1/templates/${encodeURIComponent(name)}`);
  state.name = name;
  state.etag = active.etag;
  state.version = active.data.version;
  $("current-name").textContent = name;
  setFlags(r.data.version, r.data.hash);
  $("source").value = r.data.text;
  showProblem(null);
  for (const li of $("templates").children) li.classList.toggle("selected", li.dataset.name === name);
  await loadHistory();
  schedulePreview(0);
}

async function loadHistory() {
  const r = await api("GET", `/v1/templates/${encodeURIComponent(state.name)}/versions`);
  const body = $("history").querySelector("tbody");
  body.replaceChildren();
  $("diff").hidden = true;
  if (!r.ok) return;
  for (const v of [...r.data.versions].reverse()) {
    const actions = el("td", {},
      el("button", { type: "button", onclick: () => select(state.name, v.version) }, "open"), " ",
      el("button", { type: "button", onclick: () => showDiff(v.version) }, "diff"), " ",
      v.active ? "active" : el("button", { type: "button", onclick: () => activate(v.version) }, "activate"));
    body.append(el("tr", { class: v.active ? "active" : "" },
      el("td", {}, "v" + v.version, el("small", { class: "muted" }, ` ${v.hash}${v.matches_training ? " (trained)" : ""}`)),
      el("td", {}, v.author), el("td", {}, (v.created || "").slice(0, 16).replace("T", " ")),
      el("td", {}, v.message), actions));
  }
}

async function showDiff(version) {
  const r = await api("GET", `/v1/templates/${encodeURIComponent(state.name)}/diff?from=${version}`);
  const d = $("diff");
  d.textContent = r.ok ? (r.data.diff || "(no difference from the active version)") : errorText(r);
  d.hidden = false;
}

// -- preview --------------------------------------------------------------------------------------
function schedulePreview(delay = 300) {
  clearTimeout(state.timer);
  state.timer = setTimeout(preview, delay);
}

async function preview() {
  if (!state.name) return;
  const seq = ++state.seq;
  const body = { text: $("source").value, n_items: 10 };
  const user = $("user").value.trim();
  if (user) body.user = user;
  const r = await api("POST", `/v1/templates/${encodeURIComponent(state.name)}/preview`, body);
  if (seq !== state.seq) return; // a newer edit is already being previewed
  if (!r.ok) { showProblem(r); return; }
  showProblem(null);
  $("preview-meta").textContent =
    `user ${r.data.user} · ${r.data.prompt_tokens} prompt tokens · hash ${r.data.template.hash}` +
    (r.data.template.matches_training ? " (as trained)" : " (differs from training)");
  const box = $("messages");
  box.replaceChildren();
  for (const m of r.data.messages) {
    box.append(el("div", { class: "msg" }, el("div", { class: "role" }, m.role), el("pre", {}, m.content)));
  }
  const recs = $("recs");
  recs.replaceChildren();
  for (const it of r.data.recommendations) {
    recs.append(el("li", {}, `${it.title || it.item_id} `, el("span", { class: "muted" }, `${it.item_id} · ${it.score.toFixed(3)}`)));
  }
}

// -- writes ---------------------------------------------------------------------------------------
async function save(name, text, etag) {
  const headers = etag ? { "If-Match": etag } : {};
  const r = await api("PUT", `/v1/templates/${encodeURIComponent(name)}`,
    { text, message: $("message").value || "edited in /editor" }, headers);
  if (!r.ok) {
    if (r.status === 422) showProblem(r);
    status(errorText(r), "bad");
    return false;
  }
  status(`Saved ${name} v${r.data.version}`, "ok");
  $("message").value = "";
  state.name = null;
  await loadList();
  await select(name);
  return true;
}

async function activate(version) {
  const r = await api("POST", `/v1/templates/${encodeURIComponent(state.name)}/activate`, { version },
    state.etag ? { "If-Match": state.etag } : {});
  if (!r.ok) { status(errorText(r), "bad"); return; }
  status(`Activated ${state.name} v${r.data.version}`, "ok");
  await loadList();
  await select(state.name);
}

async function rollback() {
  const r = await api("POST", `/v1/templates/${encodeURIComponent(state.name)}/rollback`, undefined,
    state.etag ? { "If-Match": state.etag } : {});
  if (!r.ok) { status(errorText(r), "bad"); return; }
  status(`Rolled back ${state.name} to v${r.data.version}`, "ok");
  await loadList();
  await select(state.name);
}

function init() {
  $("key").value = sessionStorage.getItem("genrec-key") || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem("genrec-key", $("key").value); loadList(); });
  $("source").addEventListener("input", () => { highlight($("source").value, null); schedulePreview(); });
  $("source").addEventListener("scroll", syncScroll);
  $("user").addEventListener("change", () => schedulePreview(0));
  $("save").addEventListener("click", () => save(state.name, $("source").value, state.etag));
  $("rollback").addEventListener("click", rollback);
  $("new-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("new-name").value.trim();
    const text = $("source").value.replace(/^(---\n(?:[\s\S]*?\n)?)name:[^\n]*\n/, `$1name: ${name}\n`);
    if (await save(name, text, null)) $("new-name").value = "";
  });
  loadList();
}

document.addEventListener("DOMContentLoaded", init);
