// lorakit /ui: relative times, the job page's polling, loss curve and playground.
"use strict";

document.querySelectorAll(".time").forEach((el) => {
  el.textContent = new Date(Number(el.dataset.t) * 1000).toLocaleString();
});

function svgEl(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function drawLoss(svg, series) {
  // series: [{points: [[step, value]...], color, label}]
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    const t = svgEl("text", { x: 20, y: 120, fill: "#889" });
    t.textContent = "waiting for the first step...";
    svg.appendChild(t);
    return;
  }
  const W = 640, H = 240, L = 50, R = 10, T = 10, B = 30;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#99a" }));
  svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#99a" }));
  for (const [v, y] of [[y1, T + 10], [y0, H - B]]) {
    const t = svgEl("text", { x: 4, y: y, fill: "#556", "font-size": 11 });
    t.textContent = v.toFixed(3);
    svg.appendChild(t);
  }
  const xl = svgEl("text", { x: W - 120, y: H - 8, fill: "#556", "font-size": 11 });
  xl.textContent = "step " + x0 + " … " + Math.max(...xs);
  svg.appendChild(xl);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    svg.appendChild(svgEl("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 2, class: "series" }));
    s.points.forEach((p) => svg.appendChild(svgEl("circle", {
      cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: s.color, class: "point" })));
    const lab = svgEl("text", { x: W - 120, y: T + 12 + 14 * i, fill: s.color, "font-size": 12 });
    lab.textContent = s.label;
    svg.appendChild(lab);
  });
}

function rows(table, header, items) {
  table.innerHTML = "";
  const tr = table.insertRow();
  header.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); });
  items.forEach((cells) => {
    const r = table.insertRow();
    cells.forEach((c) => { r.insertCell().textContent = c; });
  });
}

function lorakitJob(jobId, baseName) {
  const $ = (id) => document.getElementById(id);
  let fineTuned = null;

  async function poll() {
    let state;
    try {
      const res = await fetch("/ui/api/jobs/" + jobId, { credentials: "same-origin" });
      if (!res.ok) throw new Error("HTTP " + res.status);
      state = await res.json();
    } catch (err) {
      $("progress").textContent = "could not reach the server (" + err.message + "); retrying";
      setTimeout(poll, 3000);
      return;
    }
    const job = state.job;
    $("status").textContent = job.status;
    $("status").className = "status " + job.status;
    if (job.fine_tuned_model) {
      fineTuned = job.fine_tuned_model;
      $("model").textContent = fineTuned;
      $("ft-name").textContent = fineTuned;
      $("compare").disabled = false;
    }
    $("error-line").textContent = job.error ? job.error.message : "";
    $("cancel").disabled = state.terminal;
    $("downloads").hidden = !state.adapter;
    $("report-link").hidden = !state.report;
    drawLoss($("loss"), [
      { points: state.loss, color: "#1f77b4", label: "train loss" },
      { points: state.valid_loss, color: "#d62728", label: "validation loss" },
    ]);
    const last = state.loss.length ? state.loss[state.loss.length - 1] : null;
    $("progress").textContent = last ? "step " + last[0] + ": loss " + last[1].toFixed(4) : "";
    rows($("events"), ["time", "level", "message"], state.events.map((e) =>
      [new Date(e.created_at * 1000).toLocaleTimeString(), e.level, e.message]));
    rows($("checkpoints"), ["step", "checkpoint", "train loss"], state.checkpoints.map((c) =>
      [c.step_number, c.fine_tuned_model_checkpoint,
       c.metrics.train_loss === undefined ? "" : c.metrics.train_loss.toFixed(4)]));
    if (!state.terminal) setTimeout(poll, 1000);
  }

  $("compare").addEventListener("click", async () => {
    const prompt = $("prompt").value.trim();
    if (!prompt || !fineTuned) return;
    $("compare").disabled = true;
    $("out-base").textContent = $("out-ft").textContent = "…";
    try {
      const res = await fetch("/ui/api/playground", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json",
                   "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content },
        body: JSON.stringify({ prompt: prompt, models: [baseName, fineTuned], max_tokens: 48 }),
      });
      const body = await res.json();
      const show = (o) => (o ? (o.error ? "error: " + o.error : o.text) : "");
      $("out-base").textContent = show(body.outputs[baseName]);
      $("out-ft").textContent = show(body.outputs[fineTuned]);
      $("out-ft").dataset.done = "1";
    } finally {
      $("compare").disabled = false;
    }
  });
  poll();
}
