// kubeseg's review page: the queue, one case in NiiVue (scan + label overlay, saliency), and the
// review actions (approve / reject / correct by painting). Built by `make viewer` (esbuild) into
// services/review_ui/ and served by the service under /review/ui/ (services/review_page.py).
import { Niivue, NVImage } from "@niivue/niivue";
import * as api from "./api.js";

// Per-label colours (label 1 first); label 0 is transparent. Distinct on a grey scan.
export const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
];
export const labelColour = (value) => PALETTE[(value - 1) % PALETTE.length];

const $ = (id) => document.getElementById(id);
const state = { caseId: null, item: null, dirty: false, busy: false };

const nv = new Niivue({
  backColor: [0, 0, 0, 1],
  show3Dcrosshair: false,
  dragAndDropEnabled: false,
  isColorbar: false,
  crosshairColor: [0.25, 0.8, 1, 1],
  crosshairWidth: 0.2, // in voxels: a thin line on a zoomed-in small volume
});

function setState(s) {
  document.body.dataset.state = s;
}

function say(text, kind = "") {
  const m = $("message");
  m.textContent = text;
  m.className = kind;
}

function fmt(x, digits = 3) {
  return typeof x === "number" ? Number(x.toFixed(digits)).toString() : x == null ? "–" : String(x);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function flagChips(flags) {
  const span = el("span");
  for (const f of flags || []) span.append(el("span", { class: "flag", title: f.message || f }, f.flag || f));
  return span;
}

function modelText(model) {
  if (!model) return "–";
  return `${model.name || ""} v${model.version ?? "?"}${model.semver ? ` (${model.semver})` : ""}`;
}

// -- credential ---------------------------------------------------------------------------------------
function useKey(key) {
  api.saveKey(key.trim());
  $("key").value = "";
  $("who").textContent = api.savedKey() ? "credential set (this tab only)" : "";
  return loadQueue();
}

function onApiError(e) {
  if (e.status === 401 || e.status === 403) {
    say(`${e.message} — enter a valid API key or token above.`, "error");
    setState("needs-key");
  } else {
    say(e.message, "error");
  }
}

// -- queue ----------------------------------------------------------------------------------------------
async function loadQueue() {
  if (!api.savedKey()) {
    setState("needs-key");
    say("Enter an API key or token (sent as 'Authorization: Bearer …').");
    return;
  }
  try {
    const { items } = await api.queue();
    const body = $("queue").querySelector("tbody");
    body.replaceChildren();
    for (const it of items) {
      const row = el("tr", { "data-id": it.id, class: it.id === state.caseId ? "open" : "" },
        el("td", { title: it.id }, it.id.slice(0, 10)), el("td", {}, fmt(it.confidence)),
        el("td", {}, flagChips(it.qa_flags)),
        el("td", { title: modelText(it.model) }, it.model ? `v${it.model.version ?? "?"}` : "–"),
        el("td", { class: `status-${it.status}` }, it.status));
      row.addEventListener("click", () => openCase(it.id));
      body.append(row);
    }
    if (!items.length) body.append(el("tr", {}, el("td", { colspan: 5 }, "The queue is empty.")));
    if (!state.caseId) setState("queue");
    return items;
  } catch (e) {
    onApiError(e);
  }
}

// -- one case ---------------------------------------------------------------------------------------------
function labelsOf(item) {
  return Object.entries(item.labels || {}).map(([v, name]) => [Number(v), name])
    .filter(([v]) => v > 0).sort((a, b) => a[0] - b[0]);
}

function drawColormap(labels) {
  const max = Math.max(1, ...labels.map(([v]) => v));
  const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
  for (let v = 1; v <= max; v++) {
    const [r, g, b] = labelColour(v);
    cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.A.push(255); cm.I.push(v);
    cm.labels.push((labels.find(([k]) => k === v) || [v, String(v)])[1]);
  }
  return cm;
}

function showFacts(item) {
  const facts = $("facts");
  facts.replaceChildren();
  const add = (k, v) => facts.append(el("dt", {}, k), el("dd", {}, v));
  add("case", item.id);
  add("status", item.status);
  add("queued", item.queued_at ? new Date(item.queued_at * 1000).toISOString().replace(".000", "") : "–");
  add("model", modelText(item.model));
  if (item.reasons && item.reasons.length) add("queued because", item.reasons.join(", "));
  add("confidence", fmt(item.confidence));
  add("QA flags", item.qa_flags && item.qa_flags.length ? flagChips((item.qa && item.qa.flags) || item.qa_flags)
    : "none");
  const perLabel = (item.qa && item.qa.per_label_confidence) || {};
  const drift = item.drift || {};
  for (const [check, score] of Object.entries(drift.scores || {})) {
    const thr = (drift.thresholds || {})[check];
    add(`drift: ${check}`, `${fmt(score)}${thr != null ? ` (threshold ${fmt(thr)})` : ""}`);
  }
  if (drift.degenerate) add("drift", `not scored: ${drift.degenerate}`);
  add("saliency", item.saliency ? "computed (toggle above the view)" : "not computed");
  const legend = $("legend");
  legend.replaceChildren();
  for (const [v, name] of labelsOf(item)) {
    const [r, g, b] = labelColour(v);
    const vol = (item.volumes_ml || {})[name];
    legend.append(el("li", { "data-label": v }, el("span", { class: "swatch", style: `background: rgb(${r},${g},${b})` }),
      `${v} ${name}: ${vol != null ? `${fmt(vol, 2)} ml` : "–"}`,
      perLabel[name] != null ? ` · conf. ${fmt(perLabel[name])}` : ""));
  }
  const pen = $("pen");
  pen.replaceChildren();
  for (const [v, name] of labelsOf(item)) pen.append(el("option", { value: v }, `paint ${v} ${name}`));
  pen.append(el("option", { value: 0 }, "erase"));
}

async function openCase(id) {
  if (state.busy) return;
  if (state.dirty && !confirm("Discard the unsent correction?")) return;
  state.busy = true;
  setState("loading");
  say(`Loading ${id} …`);
  try {
    const item = await api.reviewCase(id);
    state.caseId = id;
    state.item = item;
    state.dirty = false;
    $("case-title").textContent = `Case ${id.slice(0, 12)}`;
    showFacts(item);
    const headers = api.authHeaders();
    const volumes = [{ url: api.imageUrl(id, 0), name: "image.nii.gz", headers, colormap: "gray" }];
    if (item.saliency) {
      volumes.push({ url: api.saliencyUrl(id), name: "saliency.nii.gz", headers, colormap: "warm", opacity: 0 });
    }
    await nv.loadVolumes(volumes);
    const seg = await NVImage.loadFromUrl({ url: api.segmentationUrl(id), name: "segmentation.nii.gz", headers });
    nv.setDrawColormap(drawColormap(labelsOf(item)));
    if (!nv.loadDrawing(seg)) throw new Error("the segmentation's grid differs from the image's");
    nv.setDrawOpacity(Number($("opacity").value));
    $("saliency-toggle").hidden = !item.saliency;
    $("saliency").checked = false;
    for (const b of ["approve", "reject", "edit", "pen"]) $(b).disabled = false;
    $("edit").checked = false;
    nv.setDrawingEnabled(false);
    $("submit-correction").disabled = true;
    $("undo").disabled = true;
    for (const row of $("queue").querySelectorAll("tbody tr")) row.classList.toggle("open", row.dataset.id === id);
    say("");
    setState("case");
  } catch (e) {
    setState("error");
    onApiError(e);
  } finally {
    state.busy = false;
  }
}

// -- actions ----------------------------------------------------------------------------------------------
async function decide(decision, extra = {}) {
  if (!state.caseId) return;
  try {
    setState("sending");
    const r = await api.sendFeedback(state.caseId, decision, extra);
    state.dirty = false;
    $("submit-correction").disabled = true;
    say(`${r.decision} recorded for ${r.case_id.slice(0, 12)} by ${r.by} (model ${r.model_version})` +
      (r.stored_as ? `; stored as ${r.stored_as}` : ""), "ok");
    await loadQueue();
    setState("sent");
    return r;
  } catch (e) {
    setState("case");
    onApiError(e);
  }
}

function wire() {
  nv.onLocationChange = (d) => { $("location").textContent = d && d.string ? d.string : ""; };
  nv.onDrawingChanged = (action) => {
    if (action === "load") return;
    state.dirty = true;
    $("submit-correction").disabled = false;
    $("undo").disabled = false;
  };
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); useKey($("key").value); });
  $("forget").addEventListener("click", () => useKey(""));
  $("refresh").addEventListener("click", () => loadQueue());
  for (const b of document.querySelectorAll("[data-view]")) {
    b.addEventListener("click", () => {
      const types = { axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal, sagittal: nv.sliceTypeSagittal,
        multiplanar: nv.sliceTypeMultiplanar };
      nv.setSliceType(types[b.dataset.view]);
      for (const o of document.querySelectorAll("[data-view]")) o.classList.toggle("active", o === b);
    });
  }
  $("opacity").addEventListener("input", (e) => nv.setDrawOpacity(Number(e.target.value)));
  $("saliency").addEventListener("change", (e) => {
    if (nv.volumes.length > 1) nv.setOpacity(1, e.target.checked ? 0.5 : 0);
  });
  $("approve").addEventListener("click", () => decide("approve"));
  $("reject").addEventListener("click", () => {
    const reason = $("reason").value.trim();
    if (!reason) { say("A rejection needs a reason.", "error"); $("reason").focus(); return; }
    decide("reject", { reason });
  });
  const setPen = () => nv.setPenValue(Number($("pen").value), false);
  $("edit").addEventListener("change", (e) => { nv.setDrawingEnabled(e.target.checked); setPen(); });
  $("pen").addEventListener("change", setPen);
  $("undo").addEventListener("click", () => nv.drawUndo());
  $("submit-correction").addEventListener("click", async () => {
    // the drawing layer, written by NiiVue with the image's header (its grid and orientation)
    const bytes = await nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    await decide("correct", { segmentation: bytes });
  });
  window.addEventListener("beforeunload", (e) => { if (state.dirty) e.preventDefault(); });
}

wire();
await nv.attachTo("gl");
nv.setSliceType(nv.sliceTypeAxial);
// for tests and debugging from the browser console: the viewer and the page's own steps
window.kubesegReview = { nv, state, openCase, loadQueue, labelColour };
loadQueue();
