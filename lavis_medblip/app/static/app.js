// The MedBLIP page: posts the form to api/predict, shows the answer, and the scan (+ relevance overlay) in NiiVue.
// No build step; NiiVue is the vendored UMD bundle (static/vendor/niivue), global `niivue`.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], answers: {}, result: null, nv: null, viewerReady: null };

function setState(name) { document.body.dataset.state = name; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.classList.add("shown");
}

function clearError() {
  $("error").textContent = "";
  $("error").classList.remove("shown");
}

// FastAPI errors: {"detail": "message"} (ours) or {"detail": [{loc, msg}, ...]} (request validation).
async function errorMessage(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("\n");
  return `${response.status} ${response.statusText}`;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function text(id, value, muted) {
  const node = $(id);
  node.textContent = value;
  node.classList.toggle("muted", Boolean(muted));
}

// ---- the viewer ---------------------------------------------------------------------------------------

function startViewer() {
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1], crosshairColor: [1, 0.2, 0.2, 1], show3Dcrosshair: true, isColorbar: true,
    dragAndDropEnabled: false, logLevel: "error", loadingText: "the scan shows here",
  });
  nv.onLocationChange = (data) => { $("location").textContent = data && data.string ? data.string : ""; };
  state.nv = nv;
  state.viewerReady = nv.attachToCanvas($("gl")).then(() => {
    nv.setSliceType(nv.sliceTypeMultiplanar);
    return nv;
  });
}

async function showScan(result) {
  const nv = await state.viewerReady;
  const volumes = [{ url: result.scan_url, name: result.scan_name, colormap: "gray" }];
  if (result.relevance_url) {
    volumes.push({ url: result.relevance_url, name: "relevance.nii.gz", colormap: $("colormap").value,
                   opacity: Number($("opacity").value) });
  }
  await nv.loadVolumes(volumes);
  if (result.relevance_url && nv.volumes.length > 1) {
    const overlay = nv.volumes[1];
    overlay.cal_min = overlay.robust_max ? 0.25 * overlay.robust_max : overlay.cal_min;  // hide the faint tail
    if (result.relevance_peak_mm) nv.scene.crosshairPos = nv.mm2frac(result.relevance_peak_mm);  // at the maximum
    nv.updateGLVolume();
  }
  nv.setSliceType(Number($("layout").value));
  text("scanname", result.filename, true);
  text("overlaystate", result.relevance_url ? `(${result.relevance_method || "relevance"} map)` : "(no relevance map)", true);
  document.body.dataset.volumes = String(nv.volumes.length);
}

// ---- the answer ---------------------------------------------------------------------------------------

function showProbabilities(result) {
  const box = $("probabilities");
  box.replaceChildren();
  for (const [code, p] of Object.entries(result.probabilities)) {
    const row = document.createElement("div");
    row.className = "bar prob" + (code === result.prediction ? " best" : "");
    row.dataset.class = code;
    row.dataset.p = String(p);
    row.title = state.answers[code] || code;
    const name = document.createElement("span");
    name.textContent = code;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(name, track, value);
    box.append(row);
  }
}

function showResult(result) {
  state.result = result;
  const p = result.probabilities[result.prediction];
  text("diagnosis", `${result.prediction}: ${result.answer} (p = ${p.toFixed(2)})`);
  showProbabilities(result);
  text("warning", result.warning ? `warning: ${result.warning}` : "");
  text("ehrtext", result.text || "(no EHR text)", !result.text);
  text("explanation", result.explanation || "(not asked for: tick “generate an explanation”)", !result.explanation);
  const regions = $("regions");
  regions.replaceChildren();
  for (const [name, share] of result.top_regions || []) {
    const item = document.createElement("li");
    item.textContent = `${name}: ${(100 * share).toFixed(1)}%`;
    regions.append(item);
  }
  text("regionsnote", (result.top_regions || []).length ? "" :
       (result.relevance_url ? "(no atlas regions)" : "(no relevance map asked for, or none from this app)"), true);
  const timings = $("timings");
  timings.replaceChildren();
  const names = { read: "read and preprocess", model: "model", relevance: "relevance map",
                  queue: "waiting for other scans", total: "total (server)" };
  for (const [key, label] of Object.entries(names)) {
    if (!(key in result.timings) || (key === "queue" && result.timings.queue < 0.01)) continue;
    const row = document.createElement("tr");
    row.innerHTML = `<td>${label}</td><td>${result.timings[key].toFixed(2)} s</td>`;
    timings.append(row);
  }
  if (result.roundtrip !== undefined) {
    const row = document.createElement("tr");
    row.innerHTML = `<td>upload to answer (browser)</td><td>${result.roundtrip.toFixed(2)} s</td>`;
    timings.append(row);
  }
  const downloads = $("downloads");
  downloads.replaceChildren();
  downloads.classList.remove("muted");
  const links = [["PNG report", result.report_url, "report"]];
  if (result.relevance_url) links.push(["relevance map (NIfTI)", result.relevance_url, "relevance"]);
  for (const [label, url, id] of links) {
    const link = document.createElement("a");
    link.href = url;
    link.id = `download-${id}`;
    link.textContent = label;
    link.setAttribute("download", "");
    downloads.append(link);
  }
}

async function run(request) {
  clearError();
  setState("busy");
  $("submit").disabled = true;
  const started = performance.now();
  try {
    const result = await request();
    result.roundtrip = (performance.now() - started) / 1000;
    showResult(result);
    await showScan(result);
    setState("done");
  } catch (error) {
    showError(error.message || String(error));
    setState("error");
  } finally {
    $("submit").disabled = false;
  }
}

async function submitForm(event) {
  event.preventDefault();
  const form = new FormData($("form"));
  if (!$("explain").checked) form.set("explain", "false");
  form.set("relevance", $("method").value ? "true" : "false");
  await run(() => getJSON("api/predict", { method: "POST", body: form }));
}

function fillEHR(ehr, sentence) {
  for (const key of ["age", "sex", "education", "mmse", "cdr"]) {
    const value = ehr[key];
    $(key).value = value === null || value === undefined ? "" : String(value);
  }
  if ($("cdr").value === "" && ehr.cdr !== null && ehr.cdr !== undefined) $("cdr").value = String(Number(ehr.cdr));
  $("text").value = sentence || "";
}

async function loadExamples() {
  const examples = await getJSON("api/examples");
  const box = $("examples");
  if (!examples.length) return;
  box.replaceChildren();
  for (const example of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.example = example.id;
    button.innerHTML = `${example.id} <small>(${example.label}) ${example.text}</small>`;
    button.addEventListener("click", () => {
      fillEHR(example.ehr, example.text);
      const query = new URLSearchParams({ explain: $("explain").checked ? "true" : "false",
                                          relevance: $("method").value ? "true" : "false", method: $("method").value });
      run(() => getJSON(`api/examples/${encodeURIComponent(example.id)}/predict?${query}`, { method: "POST" }));
    });
    box.append(button);
  }
}

async function loadStatus() {
  const status = await getJSON("api/status");
  state.classes = status.classes;
  state.answers = Object.fromEntries(status.classes.map((code, i) => [code, status.answers[i]]));
  if (status.ready) {
    const checkpoint = status.checkpoint ? status.checkpoint.split("/").slice(-3).join("/") : "no checkpoint (untrained)";
    text("model", `model ${status.model_type}, ${checkpoint}${status.calibrated ? ", calibrated" : ""}` +
                  (status.relevance ? "" : "; no relevance maps"));
  } else {
    text("model", "no model loaded");
    $("banner").textContent = status.problem;
    $("banner").classList.add("shown");
  }
  if (status.explain_question) $("explainq").textContent = `The model is asked: “${status.explain_question}”`;
  $("limit").textContent = `Uploads up to ${Math.round(status.max_upload_mb)} MB. One scan is diagnosed at a time.`;
  const methods = $("method");
  for (const name of status.relevance_methods) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    methods.append(option);
  }
  methods.value = status.relevance_method || "";
  if (!status.relevance) {
    $("overlaycontrols").classList.add("muted");
    methods.title = status.no_relevance || "";
  }
}

function wireControls() {
  $("form").addEventListener("submit", submitForm);
  $("opacity").addEventListener("input", () => {
    const nv = state.nv;
    if (nv && nv.volumes.length > 1) nv.setOpacity(1, Number($("opacity").value));
  });
  $("colormap").addEventListener("change", () => {
    const nv = state.nv;
    if (nv && nv.volumes.length > 1) nv.setColormap(nv.volumes[1].id, $("colormap").value);
  });
  $("layout").addEventListener("change", () => { if (state.nv) state.nv.setSliceType(Number($("layout").value)); });
}

async function start() {
  wireControls();
  try {
    startViewer();
  } catch (error) {
    showError(`the viewer could not start (WebGL2 needed): ${error.message || error}`);
  }
  try {
    await loadStatus();
    await loadExamples();
    setState("ready");
  } catch (error) {
    showError(error.message || String(error));
    setState("error");
  }
}

start();
