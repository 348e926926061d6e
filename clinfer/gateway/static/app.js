// Sends the chosen files to the gateway and renders the result; no build step.
"use strict";

const form = document.getElementById("query-form");
const statusLine = document.getElementById("status");
const toggle = document.getElementById("heatmap-toggle");
let imageUrls = { image: null, heatmap: null };

function authHeaders() {
  return { Authorization: "Bearer " + document.getElementById("token").value.trim() };
}

function describeError(status, body) {
  const detail = body && body.detail;
  if (detail && typeof detail === "object" && !Array.isArray(detail)) {
    const where = detail.file ? " in file " + detail.file : detail.field ? " in EMR field " + detail.field : "";
    return "Error " + status + where + ": " + (detail.message || JSON.stringify(detail));
  }
  return "Error " + status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail));
}

async function loadImage(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) return null;
  return URL.createObjectURL(await response.blob());
}

function showImage() {
  const source = toggle.checked && imageUrls.heatmap ? imageUrls.heatmap : imageUrls.image;
  const img = document.getElementById("image");
  if (source) { img.src = source; img.hidden = false; } else { img.hidden = true; }
}

function setText(id, text) { document.getElementById(id).textContent = text; }

async function render(result) {
  setText("label-text", result.label_text);
  const table = document.getElementById("scores");
  table.replaceChildren();
  const head = table.insertRow();
  for (const name of ["file", "frames", "label", "score"]) {
    const cell = document.createElement("th"); cell.textContent = name; head.appendChild(cell);
  }
  for (const instance of result.instances) {
    const row = table.insertRow();
    for (const value of [instance.path, instance.num_frames, instance.label, instance.score.toFixed(3)]) {
      row.insertCell().textContent = value;
    }
  }
  setText("emr-used", result.emr_values ? JSON.stringify(result.emr_values) : result.emr_note);
  setText("model", result.model_name + " version " + result.model_version + " (sha256 " + result.model_sha256.slice(0, 12) + "…)");
  setText("training", result.model_training ? "Training: " + result.model_training : "");
  if (result.validation) {
    const v = result.validation;
    const fixed = (x) => (x == null ? "n/a" : x.toFixed(3));
    const ci = v.test_auroc_ci && v.test_auroc_ci[0] != null ? " (95% CI " + fixed(v.test_auroc_ci[0]) + "–" + fixed(v.test_auroc_ci[1]) + ")" : "";
    setText("validation", "Validation: " + v.decision + ", test AUROC " + fixed(v.test_auroc) + ci + " on " + v.test_n + " cases, operating threshold " + fixed(v.threshold) + (v.synthetic_data ? " (synthetic data)" : ""));
  } else {
    setText("validation", "Validation: " + result.validation_note);
  }
  const t = result.timing;
  setText("timing", "Total " + t.total_ms.toFixed(0) + " ms (preprocessing " + t.preprocess_ms.toFixed(0) + " ms, Triton round trip " + t.round_trip_ms.toFixed(0) + " ms)");
  imageUrls.image = await loadImage(result.image_url);
  imageUrls.heatmap = result.heatmap_url ? await loadImage(result.heatmap_url) : null;
  toggle.disabled = !imageUrls.heatmap;
  toggle.checked = Boolean(imageUrls.heatmap);
  setText("heatmap-note", imageUrls.heatmap ? "" : "This model has no heatmap.");
  showImage();
  document.getElementById("result").hidden = false;
}

toggle.addEventListener("change", showImage);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData();
  for (const file of document.getElementById("files").files) data.append("files", file, file.name);
  const emr = document.getElementById("emr").value.trim();
  if (emr) data.append("emr", emr);
  statusLine.className = "";
  statusLine.textContent = "Scoring…";
  document.getElementById("result").hidden = true;
  try {
    const response = await fetch("/v1/studies/query", { method: "POST", headers: authHeaders(), body: data });
    const body = await response.json();
    if (!response.ok) {
      statusLine.className = "error";
      statusLine.textContent = describeError(response.status, body);
      return;
    }
    statusLine.textContent = "Scored.";
    await render(body);
  } catch (error) {
    statusLine.className = "error";
    statusLine.textContent = "The gateway could not be reached: " + error;
  }
});
