// anomap web page: upload images, show heat-map overlays, re-label with a threshold slider.
// The slider never calls the server: it compares the scores already returned with the chosen threshold.
// "mark as OK" / "mark as defect" send the operator's verdict to v1/feedback (when the server stores it).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,       // GET v1/model
  calibrated: null,  // the model's calibrated threshold (or null)
  threshold: null,   // the threshold the page labels with now (exact, not snapped to the slider step)
  results: [],       // [{label, score, heatmap, original (object URL), card}]
  key: sessionStorage.getItem("anomap-api-key") || "",
};

function fmt(x) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "n/a";
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(3) : x.toPrecision(4);
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function headers() {
  return state.key ? { "X-API-Key": state.key } : {};
}

async function readError(resp) {
  let detail = "";
  try {
    const body = await resp.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  } catch (e) {
    detail = resp.statusText || "no details";
  }
  if (resp.status === 401) $("key-row").hidden = false;
  return `Error ${resp.status}: ${detail}`;
}

async function loadModel() {
  let resp;
  try {
    resp = await fetch("v1/model", { headers: headers() });
  } catch (e) {
    $("model").textContent = "cannot reach the server";
    showError(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (!resp.ok) {
    $("model").textContent = "model description unavailable";
    showError(await readError(resp));
    return;
  }
  const m = await resp.json();
  state.model = m;
  const cal = m.calibration || {};
  state.calibrated = Number.isFinite(cal.threshold) ? cal.threshold : null;
  const thr = state.calibrated === null ? "no calibrated threshold"
    : `threshold ${fmt(state.calibrated)} (${Math.round((cal.target_fpr || 0) * 1000) / 10}% false positives `
      + `on ${cal.n_heldout || 0} held-out normal images)`;
  $("model").textContent = `${m.method} · ${m.image_size} px · ${m.channels === 1 ? "grey" : "colour"} · `
    + `${m.backend} backend · ${thr} · anomap ${m.version || "?"}`;
}

function sliderRange() {
  const values = [];
  const cal = (state.model && state.model.calibration) || {};
  for (const s of cal.heldout_scores || []) if (Number.isFinite(s)) values.push(s);
  for (const r of state.results) if (Number.isFinite(r.score)) values.push(r.score);
  for (const t of [state.calibrated, state.threshold]) if (Number.isFinite(t)) values.push(t);
  if (!values.length) return [0, 1];
  let lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1e-3;
  return [lo - pad, hi + pad];
}

function setupSlider() {
  const slider = $("threshold");
  const [lo, hi] = sliderRange();
  slider.min = String(lo);
  slider.max = String(hi);
  slider.step = String((hi - lo) / 1000);
  if (state.threshold === null) state.threshold = state.calibrated;
  if (state.threshold !== null) slider.value = String(state.threshold);
  $("reset").disabled = state.calibrated === null;
  $("controls").hidden = state.results.length === 0;
}

function relabel() {
  const t = state.threshold;
  $("threshold-value").textContent = t === null ? "none" : fmt(t);
  for (const r of state.results) {
    const v = r.card.querySelector(".verdict");
    if (t === null || !Number.isFinite(r.score)) {
      v.textContent = "no threshold";
      v.className = "verdict";
    } else {
      const bad = r.score > t;
      v.textContent = bad ? "ANOMALOUS" : "normal";
      v.className = "verdict " + (bad ? "bad" : "ok");
    }
  }
}

function showViews() {
  const heat = $("show-heat").checked;
  for (const r of state.results) {
    const img = r.card.querySelector("img.view");
    img.src = heat && r.heatmap ? r.heatmap : r.original;
    img.alt = `${r.label}${heat ? " with heat-map overlay" : ""}`;
  }
}

function render(results, files) {
  for (const r of state.results) URL.revokeObjectURL(r.original);
  const box = $("results");
  box.replaceChildren();
  state.results = results.map((r, i) => {
    const card = $("card").content.firstElementChild.cloneNode(true);
    card.querySelector(".label").textContent = `${r.label} · ${r.width}×${r.height}`;
    card.querySelector(".score").textContent = fmt(r.score);
    box.appendChild(card);
    const item = { label: r.label, score: r.score, heatmap: r.heatmap, id: r.id,
                   original: URL.createObjectURL(files[i]), file: files[i], card };
    wireFeedback(item);
    return item;
  });
  if (results.length && Number.isFinite(results[0].threshold)) state.threshold = results[0].threshold;
  setupSlider();
  showViews();
  relabel();
}

async function sendFeedback(item, verdict) {
  const status = item.card.querySelector(".feedback-status");
  const buttons = item.card.querySelectorAll(".feedback button");
  const form = new FormData();
  form.append("verdict", verdict);
  if (item.id) form.append("id", item.id);
  else form.append("file", item.file, item.file.name);
  for (const b of buttons) b.disabled = true;
  status.textContent = "saving…";
  let resp;
  try {
    resp = await fetch("v1/feedback", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    resp = null;
    status.textContent = `not saved: ${e.message}`;
  }
  if (resp && resp.status === 404 && item.id) {  // the server no longer holds the upload: send the image
    item.id = null;
    return sendFeedback(item, verdict);
  }
  if (resp && resp.ok) {
    status.textContent = verdict === "normal" ? "saved as OK" : "saved as defect";
  } else if (resp) {
    status.textContent = `not saved: ${await readError(resp)}`;
  }
  for (const b of buttons) b.disabled = false;
}

function wireFeedback(item) {
  const box = item.card.querySelector(".feedback");
  box.hidden = !(state.model && state.model.feedback);
  item.card.querySelector(".mark-ok").addEventListener("click", () => sendFeedback(item, "normal"));
  item.card.querySelector(".mark-defect").addEventListener("click", () => sendFeedback(item, "anomalous"));
}

async function upload(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  showError("");
  const limits = (state.model && state.model.limits) || {};
  const total = files.reduce((n, f) => n + f.size, 0);
  if (limits.max_bytes && total > limits.max_bytes) {
    showError(`These files add up to ${total.toLocaleString()} bytes; this server accepts at most `
      + `${limits.max_bytes.toLocaleString()} bytes per request. Send fewer or smaller images.`);
    return;
  }
  if (limits.max_files && files.length > limits.max_files) {
    showError(`This server scores at most ${limits.max_files} images per request; you chose ${files.length}.`);
    return;
  }
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  $("status").textContent = `scoring ${files.length} image${files.length > 1 ? "s" : ""}…`;
  let resp;
  try {
    resp = await fetch("v1/predict?heatmap=true", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    $("status").textContent = "";
    showError(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (!resp.ok) {
    $("status").textContent = "";
    showError(await readError(resp));
    return;
  }
  const body = await resp.json();
  $("status").textContent = `scored ${body.results.length} image${body.results.length > 1 ? "s" : ""} `
    + `in ${Math.round(body.elapsed_ms)} ms`;
  render(body.results, files);
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  $("threshold").addEventListener("input", (e) => { state.threshold = Number(e.target.value); relabel(); });
  $("reset").addEventListener("click", () => {
    state.threshold = state.calibrated;
    setupSlider();
    relabel();
  });
  $("show-heat").addEventListener("change", showViews);
  $("key-row").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value;
    sessionStorage.setItem("anomap-api-key", state.key);
    $("key-row").hidden = true;
    showError("");
    loadModel();
  });
}

wire();
loadModel();
