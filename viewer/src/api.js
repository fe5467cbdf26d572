// The review API (services/review_api.py, contract in README "Review page"), called with the
// reviewer's credential as `Authorization: Bearer <API key or token>`. URLs are relative to the
// page (/review/ui/), so the page works behind any path prefix an ingress adds.

const KEY_STORE = "kubeseg-review-key"; // sessionStorage: gone when the tab closes

export function savedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

export function authHeaders() {
  const key = savedKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function apiUrl(path) {
  // "queue" -> /review/queue ; "/feedback" -> /feedback at the service's root (one level above /review)
  return path.startsWith("/") ? new URL(`../..${path}`, location.href).href : new URL(`../${path}`, location.href).href;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let text = await response.text();
  try {
    let body = JSON.parse(text);
    body = Array.isArray(body) ? body[0] : body; // BentoML wraps some errors in a list
    text = body.error || body.detail || text;
  } catch (_) { /* not JSON: keep the text */ }
  return new ApiError(response.status, `${response.status}: ${String(text).slice(0, 300)}`);
}

export async function getJson(path) {
  const r = await fetch(apiUrl(path), { headers: authHeaders() });
  if (!r.ok) throw await errorOf(r);
  return r.json();
}

export const queue = (limit = 200) => getJson(`queue?limit=${limit}`);
export const reviewCase = (id) => getJson(`cases/${encodeURIComponent(id)}`);
export const imageUrl = (id, channel) => apiUrl(`cases/${encodeURIComponent(id)}/image/${channel}`);
export const segmentationUrl = (id) => apiUrl(`cases/${encodeURIComponent(id)}/segmentation`);
export const saliencyUrl = (id) => apiUrl(`cases/${encodeURIComponent(id)}/saliency`);

// POST /feedback: approve | reject (reason) | correct (the drawn mask as a NIfTI file)
export async function sendFeedback(caseId, decision, { reason = "", segmentation = null } = {}) {
  const form = new FormData();
  form.append("case_id", caseId);
  form.append("decision", decision);
  if (reason) form.append("reason", reason);
  if (segmentation) form.append("segmentation", new Blob([segmentation], { type: "application/octet-stream" }),
    "correction.nii");
  const r = await fetch(apiUrl("/feedback"), { method: "POST", headers: authHeaders(), body: form });
  if (!r.ok) throw await errorOf(r);
  return r.json();
}
