// Builder Telemetry dashboard: charts (uPlot, vendored), sortable tables, alert actions and the
// live list of running builds (server-sent events of /api/v1/stream). Plain script, no build step.
"use strict";

// Okabe-Ito: distinct for the common colour-vision deficiencies.
const C = { blue: "#0072B2", orange: "#E69F00", verm: "#D55E00", green: "#009E73", sky: "#56B4E9",
            grey: "#999999", black: "#000000", purple: "#CC79A7" };

function data(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function width(el) { return Math.max(280, el.clientWidth || el.parentElement.clientWidth || 600); }

function fmtDur(s) {
  if (s == null) return "—";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} m ${String(Math.round(s % 60)).padStart(2, "0")} s` : `${Math.floor(m / 60)} h ${m % 60} m`;
}

function chartOpts(el, series, axes) {
  return { width: width(el), height: 200, series: [{}].concat(series), axes: axes,
           scales: { x: { time: true } }, legend: { live: true } };
}

const bars = () => uPlot.paths.bars({ size: [0.7, 60] });

const CHARTS = {
  outcomes(el, d) {
    // Stacked: each series is drawn as the running total, the largest first, so all show.
    const s = d.ys.succeeded, f = d.ys.failed, o = d.ys.other;
    const top = s.map((v, i) => v + f[i] + o[i]), mid = s.map((v, i) => v + f[i]);
    return new uPlot(chartOpts(el, [
      { label: "abandoned, cancelled, unknown", stroke: C.grey, fill: C.grey, paths: bars(), points: { show: false },
        value: (u, v, si, i) => i == null ? "—" : o[i] },
      { label: "failed", stroke: C.verm, fill: C.verm, paths: bars(), points: { show: false },
        value: (u, v, si, i) => i == null ? "—" : f[i] },
      { label: "succeeded", stroke: C.blue, fill: C.blue, paths: bars(), points: { show: false },
        value: (u, v, si, i) => i == null ? "—" : s[i] },
    ]), [d.x, top, mid, s], el);
  },
  rate(el, d) {
    return new uPlot(chartOpts(el, [{ label: "success %", stroke: C.blue, width: 2, spanGaps: false }]),
                     [d.x, d.ys.success_rate], el);
  },
  durations(el, d) {
    const dur = { values: (u, vals) => vals.map(fmtDur), size: 72 };
    return new uPlot(chartOpts(el, [
      { label: "p50", stroke: C.blue, width: 2, value: (u, v) => fmtDur(v) },
      { label: "p95", stroke: C.orange, width: 2, dash: [6, 4], value: (u, v) => fmtDur(v) },
    ], [{}, dur]), [d.x, d.ys.p50, d.ys.p95], el);
  },
  cache(el, d) {
    return new uPlot(chartOpts(el, [{ label: "hit %", stroke: C.green, width: 2 }]),
                     [d.x, d.ys.cache_hit_rate], el);
  },
  health(el, d) {
    const opts = chartOpts(el, [
      { label: "busy workers", stroke: C.blue, width: 2 },
      { label: "slots", stroke: C.grey, width: 1, dash: [4, 4] },
      { label: "memory MiB", stroke: C.purple, width: 2, scale: "mib" },
    ], [{}, {}, { scale: "mib", side: 1, grid: { show: false } }]);
    return new uPlot(opts, [d.t, d.active, d.workers, d.memory_mib], el);
  },
  "target-duration"(el, d) {
    const marks = data(el.dataset.marks) || [];
    const drawMarks = (u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.strokeStyle = C.verm; ctx.lineWidth = 2; ctx.setLineDash([4, 3]);
      for (const a of marks) {
        const x = u.valToPos(a.first_session_start, "x", true);
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
      }
      ctx.restore();
    };
    const opts = chartOpts(el, [{ label: "duration", stroke: C.blue, width: 0, points: { show: true, size: 5 },
                                  paths: () => null, value: (u, v) => fmtDur(v) }],
                           [{}, { values: (u, vals) => vals.map(fmtDur), size: 72 }]);
    opts.hooks = { draw: [drawMarks] };
    return new uPlot(opts, [d.t, d.duration], el);
  },
  "target-cache"(el, d) {
    return new uPlot(chartOpts(el, [{ label: "hit", stroke: C.green, width: 0, points: { show: true, size: 5 },
                                      paths: () => null }]), [d.t, d.hit], el);
  },
};

function drawCharts() {
  if (typeof uPlot === "undefined") return;
  for (const el of document.querySelectorAll("[data-chart]")) {
    const d = data(el.dataset.source);
    const draw = CHARTS[el.dataset.chart];
    if (!d || !draw) continue;
    if (!d.x && !d.t) continue;
    if ((d.x || d.t).length === 0) { el.textContent = "No data in this window."; continue; }
    el.textContent = "";
    draw(el, d);
  }
}

// Tables: a button in each header sorts by that column (keyboard and screen readers included).
function sortable(table) {
  const heads = table.tHead ? Array.from(table.tHead.rows[0].cells) : [];
  heads.forEach((th, col) => {
    const b = document.createElement("button");
    b.type = "button"; b.className = "sort"; b.textContent = th.textContent;
    th.textContent = ""; th.appendChild(b);
    b.addEventListener("click", () => {
      const asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      const body = table.tBodies[0];
      const key = (tr) => {
        const td = tr.cells[col];
        const v = td && td.dataset.v;
        return v !== undefined && v !== "" && !isNaN(+v) ? +v : (td ? td.textContent.trim().toLowerCase() : "");
      };
      const rows = Array.from(body.rows).sort((a, z) => {
        const x = key(a), y = key(z);
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

// Alerts: acknowledge / mute through the API, with the header a page of another site cannot send.
function alertActions() {
  const header = document.getElementById("main").dataset.csrfHeader;
  for (const b of document.querySelectorAll("[data-alert] button[data-act]")) {
    b.addEventListener("click", async () => {
      const li = b.closest("[data-alert]");
      const out = li.querySelector(".result");
      const headers = { "Content-Type": "application/json" };
      headers[header] = "1";
      const resp = await fetch(`/api/v1/alerts/${li.dataset.alert}/${b.dataset.path}`,
                               { method: b.dataset.act, headers, body: b.dataset.body || (b.dataset.act === "POST" ? "{}" : undefined),
                                 credentials: "same-origin" });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) { out.textContent = body.detail || `failed (${resp.status})`; out.className = "result error"; return; }
      li.querySelector("[data-state]").textContent = body.state.status;
      li.className = `alert ${body.direction} ${body.state.status}`;
      out.textContent = `now ${body.state.status}`; out.className = "result";
      // The buttons that now apply, in place: the message stays until the reader moves on (a
      // reload 400 ms later once took it away before anyone, or a loaded test, could read it).
      const on = { acknowledge: !!body.state.acknowledged, mute: !!body.state.muted };
      for (const x of li.querySelectorAll("button[data-act]")) {
        x.hidden = (x.dataset.act === "DELETE") !== on[x.dataset.path];
      }
    });
  }
}

// Running builds, live: started and finished events of the tenant's stream.
function live() {
  const list = document.getElementById("live");
  if (!list || typeof EventSource === "undefined") return;
  const count = document.getElementById("running-count");
  const running = new Map();
  const show = () => {
    list.textContent = "";
    if (running.size === 0) {
      const li = document.createElement("li"); li.className = "muted"; li.textContent = "No build running.";
      list.appendChild(li);
    }
    for (const [id, s] of running) {
      const li = document.createElement("li"); li.dataset.session = id;
      const a = document.createElement("a"); a.href = `/sessions/${id}`; a.textContent = `${id.slice(0, 12)} ${s.name || ""}`;
      li.appendChild(a);
      li.appendChild(document.createTextNode(` on ${s.agent || s.host || "?"}${s.branch ? " · " + s.branch : ""}`));
      list.appendChild(li);
    }
    if (count) count.textContent = String(running.size);
  };
  const es = new EventSource(list.dataset.stream);
  es.addEventListener("open", show);
  es.addEventListener("session.started", (e) => { const s = JSON.parse(e.data); running.set(s.id, s); show(); });
  es.addEventListener("session.finished", (e) => { const s = JSON.parse(e.data); running.delete(s.id); show(); });
  es.addEventListener("error", () => {
    if (es.readyState === EventSource.CLOSED) { list.textContent = "Live stream unavailable."; }
  });
}

// Flame graphs cost the analyzer a drawing: load one only when its box is opened.
function flameBoxes() {
  for (const box of document.querySelectorAll("details.flame-box")) {
    box.addEventListener("toggle", () => {
      const f = box.querySelector("iframe[data-src]");
      if (box.open && f && !f.src) f.src = f.dataset.src;
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  flameBoxes();
  document.querySelectorAll("table.sortable").forEach(sortable);
  drawCharts();
  alertActions();
  live();
});
