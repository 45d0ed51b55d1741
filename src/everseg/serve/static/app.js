// The everseg page: predict, paint corrections, send them, watch them become versions.
// Plain browser JavaScript, no build step: the service serves this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const UNLABELLED = 255;
const FINAL = new Set(["accepted", "rejected", "held_out", "failed"]);

const state = {
  file: null,          // the image as chosen (sent back unchanged with a correction)
  width: 0, height: 0,
  labels: null,        // Uint8Array of class ids, H x W (255 = unlabelled)
  classes: [],         // [{name, color: [r, g, b], isNew}]
  picked: 0,           // class id the brush paints
  painting: false,
};

// ------------------------------------------------------------------ plumbing
function token() { return $("token").value.trim(); }
$("token").value = localStorage.getItem("everseg-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("everseg-token", token()));

function say(text, isError = true) {
  $("message").textContent = text;
  $("message").style.color = isError ? "#a22" : "#264";
}

async function api(path, options = {}) {
  const headers = options.headers || {};
  if (options.auth) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function fmt(x) { return x === null || x === undefined ? "–" : Number(x).toFixed(1); }

// ------------------------------------------------------------------ versions
async function refreshVersions() {
  try {
    const health = await (await api("/healthz")).json();
    $("active-version").textContent = health.version;
    const versions = await (await api("/v1/models")).json();
    const rows = versions.slice().reverse().map((v) => {
      const tr = document.createElement("tr");
      tr.className = v.active ? "active" : v.status === "rejected" ? "rejected" : "";
      tr.dataset.version = v.version;
      const cells = [v.version, v.parent ?? "–", fmt(v.holdout_miou), fmt(v.feedback_miou),
                     v.status === "rejected" ? "rejected" : v.produced_by];
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = c;
        if (v.status === "rejected" && v.reason) td.title = v.reason;
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      if (!v.active) {
        const b = document.createElement("button");
        b.textContent = "activate";
        b.onclick = () => activate(v.version);
        td.appendChild(b);
      }
      tr.appendChild(td);
      return tr;
    });
    $("version-rows").replaceChildren(...rows);
  } catch (e) {
    say("cannot read the versions: " + e.message);
  }
}

async function activate(version) {
  try {
    await api(`/v1/models/${version}/activate`, { method: "POST", auth: true });
    say(`version ${version} is active`, false);
  } catch (e) { say(e.message); }
  refreshVersions();
}

$("rollback").onclick = async () => {
  try {
    const r = await (await api("/v1/models/rollback", { method: "POST", auth: true })).json();
    say(`rolled back to version ${r.rolled_back_to}`, false);
  } catch (e) { say(e.message); }
  refreshVersions();
};

// ------------------------------------------------------------------ predict
async function choose(file) {
  if (!file) return;
  say("");
  state.file = file;
  const form = new FormData();
  form.append("image", file);
  let result;
  try {
    result = await (await api("/v1/predict?format=json&include=mask", { method: "POST", body: form })).json();
  } catch (e) { say("prediction failed: " + e.message); return; }
  const picture = await loadImage(URL.createObjectURL(file));
  const maskImage = await loadImage("data:image/png;base64," + result.mask_png);
  state.width = result.width; state.height = result.height;
  for (const canvas of [$("picture"), $("labels")]) { canvas.width = state.width; canvas.height = state.height; }
  $("picture").getContext("2d").drawImage(picture, 0, 0);
  const scratch = document.createElement("canvas");
  scratch.width = state.width; scratch.height = state.height;
  const ctx = scratch.getContext("2d");
  ctx.drawImage(maskImage, 0, 0);
  const pixels = ctx.getImageData(0, 0, state.width, state.height).data;
  state.labels = new Uint8Array(state.width * state.height);
  for (let i = 0; i < state.labels.length; i++) state.labels[i] = pixels[i * 4];
  state.classes = result.classes.map((name, i) => ({ name, color: result.colors[i], isNew: false }));
  state.version = result.version;
  state.picked = 0;
  $("stage").hidden = false;
  $("prediction").hidden = false;
  $("paint").hidden = false;
  $("pred-info").textContent = `version ${result.version}, confidence ${(100 * result.confidence).toFixed(0)}%, ` +
                               `${(1000 * result.seconds).toFixed(0)} ms`;
  const legend = Object.entries(result.areas).sort((a, b) => b[1] - a[1]).map(([name, share]) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch"></span><span class="name"></span><span class="area"></span>`;
    li.querySelector(".swatch").style.background = rgb(state.classes.find((c) => c.name === name).color);
    li.querySelector(".name").textContent = name;
    li.querySelector(".area").textContent = (100 * share).toFixed(1) + "%";
    return li;
  });
  $("legend").replaceChildren(...legend);
  renderClasses();
  draw();
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode " + src.slice(0, 40)));
    img.src = src;
  });
}

function rgb(c) { return `rgb(${c[0]}, ${c[1]}, ${c[2]})`; }

// ------------------------------------------------------------------ drawing and painting
function draw() {
  const ctx = $("labels").getContext("2d");
  const image = ctx.createImageData(state.width, state.height);
  const alpha = Math.round(2.55 * Number($("opacity").value));
  for (let i = 0; i < state.labels.length; i++) {
    const id = state.labels[i];
    if (id === UNLABELLED || !state.classes[id]) continue;
    const c = state.classes[id].color;
    image.data[i * 4] = c[0]; image.data[i * 4 + 1] = c[1]; image.data[i * 4 + 2] = c[2];
    image.data[i * 4 + 3] = alpha;
  }
  ctx.putImageData(image, 0, 0);
}

function renderClasses() {
  const items = state.classes.map((c, id) => {
    const li = document.createElement("li");
    li.dataset.id = id;
    li.className = id === state.picked ? "picked" : "";
    li.innerHTML = `<span class="swatch"></span><span class="name"></span>`;
    li.querySelector(".swatch").style.background = rgb(c.color);
    li.querySelector(".name").textContent = c.name + (c.isNew ? " (new)" : "");
    li.onclick = () => { state.picked = id; renderClasses(); };
    return li;
  });
  $("classes").replaceChildren(...items);
}

function paintAt(event) {
  const canvas = $("labels");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * (state.width / box.width);
  const y = (event.clientY - box.top) * (state.height / box.height);
  const r = Number($("size").value) * (state.width / box.width);
  const eraser = document.querySelector("input[name=tool]:checked").value === "eraser";
  const x0 = Math.max(0, Math.floor(x - r)), x1 = Math.min(state.width - 1, Math.ceil(x + r));
  const y0 = Math.max(0, Math.floor(y - r)), y1 = Math.min(state.height - 1, Math.ceil(y + r));
  for (let py = y0; py <= y1; py++) {
    for (let px = x0; px <= x1; px++) {
      if ((px - x) ** 2 + (py - y) ** 2 > r * r) continue;
      const i = py * state.width + px;
      if (eraser) { if (state.labels[i] === state.picked) state.labels[i] = UNLABELLED; }
      else state.labels[i] = state.picked;
    }
  }
  draw();
}

$("labels").addEventListener("pointerdown", (e) => { state.painting = true; $("labels").setPointerCapture(e.pointerId); paintAt(e); });
$("labels").addEventListener("pointermove", (e) => { if (state.painting) paintAt(e); });
$("labels").addEventListener("pointerup", () => { state.painting = false; });
$("opacity").addEventListener("input", draw);

$("new-class").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("new-class-name").value.trim();
  if (!name) return;
  if (state.classes.some((c) => c.name === name)) { say(`there is a class ${name} already`); return; }
  const hue = (state.classes.length * 137) % 360;
  state.classes.push({ name, color: hslToRgb(hue / 360, 0.75, 0.5), isNew: true });
  state.picked = state.classes.length - 1;
  $("new-class-name").value = "";
  renderClasses();
});

function hslToRgb(h, s, l) {
  const f = (n) => {
    const k = (n + h * 12) % 12;
    return Math.round(255 * (l - s * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

// ------------------------------------------------------------------ sending a correction
function maskBlob() {
  // Class ids as gray levels (R = G = B = id): the service reads an RGB mask with equal
  // channels as a single-channel one.
  const canvas = document.createElement("canvas");
  canvas.width = state.width; canvas.height = state.height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(state.width, state.height);
  for (let i = 0; i < state.labels.length; i++) {
    const v = state.labels[i];
    image.data[i * 4] = v; image.data[i * 4 + 1] = v; image.data[i * 4 + 2] = v; image.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

$("send").onclick = async () => {
  if (!token()) { say("enter the token `everseg serve` printed to send corrections"); return; }
  $("send").disabled = true;
  const form = new FormData();
  form.append("image", state.file);
  form.append("mask", await maskBlob(), "mask.png");
  const added = state.classes.filter((c) => c.isNew).map((c) => c.name);
  if (added.length) form.append("new_classes", added.join(","));
  form.append("served_version", String(state.version));
  try {
    const { id } = await (await api("/v1/feedback", { method: "POST", body: form, auth: true })).json();
    say(`correction ${id} stored`, false);
    watch(id);  // in the background: a correction that waits (new classes) must not block the next
  } catch (e) {
    say("the correction was not accepted: " + e.message);
  }
  $("send").disabled = false;
};

async function watch(id) {
  const box = $("feedback-status");
  state.watching = id;  // the status shown is the latest correction's
  for (;;) {
    if (state.watching !== id) return;
    let item;
    try { item = await (await api(`/v1/feedback/${id}`)).json(); } catch (e) { box.textContent = e.message; break; }
    const scores = item.holdout_miou_after !== null
      ? ` holdout mIoU ${fmt(item.holdout_miou_before)} → ${fmt(item.holdout_miou_after)}` : "";
    const made = item.version !== null ? ` version ${item.version}` : "";
    box.dataset.status = item.status;
    box.textContent = `correction ${id}: ${item.status}${made}${scores}${item.detail ? " (" + item.detail + ")" : ""}`;
    if (FINAL.has(item.status)) break;
    await new Promise((r) => setTimeout(r, 700));
  }
  refreshVersions();
}

// ------------------------------------------------------------------ choosing an image
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });

refreshVersions();
setInterval(refreshVersions, 3000);
