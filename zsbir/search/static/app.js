// zsbir sketch search page: draw with mouse, pen or finger (pointer events); the strokes
// are sent as QuickDraw-style JSON ({"drawing": [[xs], [ys]] per stroke}) to /api/search,
// debounced, and the results grid is replaced by the newest answer.
"use strict";

const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const penInput = document.getElementById("pen");
const topInput = document.getElementById("top");
const classSelect = document.getElementById("class");
const statusEl = document.getElementById("status");
const resultsEl = document.getElementById("results");

const strokes = [];      // each: {xs: [], ys: [], width}
let current = null;      // the stroke being drawn
let timer = null;        // debounce timer
let sequence = 0;        // newest request number; older answers are dropped
const DEBOUNCE_MS = 300;

function setStatus(text, isError) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", Boolean(isError));
}

function point(event) {
  const r = canvas.getBoundingClientRect();
  return [Math.round((event.clientX - r.left) * canvas.width / r.width),
          Math.round((event.clientY - r.top) * canvas.height / r.height)];
}

function redraw() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const s of strokes.concat(current ? [current] : [])) {
    ctx.lineWidth = s.width;
    if (s.xs.length === 1) {
      ctx.beginPath();
      ctx.arc(s.xs[0], s.ys[0], s.width / 2, 0, 2 * Math.PI);
      ctx.fill();
      continue;
    }
    ctx.beginPath();
    ctx.moveTo(s.xs[0], s.ys[0]);
    for (let i = 1; i < s.xs.length; i++) ctx.lineTo(s.xs[i], s.ys[i]);
    ctx.stroke();
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(search, DEBOUNCE_MS);
}

canvas.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  canvas.setPointerCapture(e.pointerId);
  const [x, y] = point(e);
  current = {xs: [x], ys: [y], width: Number(penInput.value)};
  redraw();
});

canvas.addEventListener("pointermove", (e) => {
  if (!current) return;
  e.preventDefault();
  const [x, y] = point(e);
  const n = current.xs.length;
  if (current.xs[n - 1] === x && current.ys[n - 1] === y) return;
  current.xs.push(x);
  current.ys.push(y);
  redraw();
  if (strokes.length > 0) schedule();  // live updates while drawing
});

function endStroke(e) {
  if (!current) return;
  strokes.push(current);
  current = null;
  redraw();
  schedule();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

document.getElementById("undo").addEventListener("click", () => {
  strokes.pop();
  redraw();
  if (strokes.length) schedule(); else showResults([]);
});
document.getElementById("clear").addEventListener("click", () => {
  strokes.length = 0;
  redraw();
  showResults([]);
  setStatus("Cleared. Draw an object.");
});
topInput.addEventListener("change", () => { if (strokes.length) schedule(); });
classSelect.addEventListener("change", () => { if (strokes.length) schedule(); });

async function search() {
  const all = strokes.concat(current && current.xs.length > 1 ? [current] : []);
  if (!all.length) return;
  const body = {
    drawing: all.map((s) => [s.xs, s.ys]),
    top: Math.max(1, Math.min(100, Number(topInput.value) || 12)),
    pen_width: Number(penInput.value),
  };
  if (classSelect.value) body.class = classSelect.value;
  const mine = ++sequence;
  setStatus("searching\u2026");
  try {
    const res = await fetch("/api/search", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    const data = await res.json();
    if (mine !== sequence) return;  // a newer request is on its way
    if (!res.ok) { setStatus(data.error || res.statusText, true); return; }
    showResults(data.results);
    resultsEl.dataset.request = String(mine);  // which answer the grid shows
    setStatus(`${data.results.length} results in ${data.ms} ms`);
  } catch (err) {
    if (mine === sequence) setStatus(`search failed: ${err}`, true);
  }
}

function showResults(results) {
  resultsEl.replaceChildren();
  resultsEl.dataset.count = String(results.length);
  for (const r of results) {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.label = r.label || "";
    li.dataset.id = String(r.id);
    const a = document.createElement("a");
    a.href = r.url;
    a.target = "_blank";
    const img = document.createElement("img");
    img.src = r.thumb;
    img.alt = r.name;
    img.loading = "lazy";
    a.appendChild(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = r.label || r.name;
    label.title = r.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = Number.isInteger(r.score) ? String(r.score) : r.score.toFixed(3);
    meta.append(label, score);
    li.append(a, meta);
    resultsEl.appendChild(li);
  }
}

async function loadInfo() {
  try {
    const res = await fetch("/api/info");
    const info = await res.json();
    document.getElementById("index-info").textContent =
      `${info.name}: ${info.size} photos, model ${info.model}, ${info.hasher} codes`;
    document.getElementById("score-name").textContent = `(${info.score})`;
    for (const label of info.labels) {
      const opt = document.createElement("option");
      opt.value = label;
      opt.textContent = label;
      classSelect.appendChild(opt);
    }
  } catch (err) {
    setStatus(`cannot load the index description: ${err}`, true);
  }
}

redraw();
loadInfo();
