"""The dashboard page: one self-contained HTML document (inline CSS and JS, charts drawn as
SVG), so it works on a server with no outside network. It is kept in a Python module rather
than a data file so that every kind of install ships it.

The script polls ``<page path>/data`` every 2 s (``?poll_ms=`` changes it), fills the
per-decoder table and redraws the charts. Each chart series is an SVG ``path`` carrying
``data-decoder``, ``data-points`` and ``data-last`` so tests can read what is drawn.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>powerserve dashboard</title>
<style>
  :root { --fg: #1f2937; --muted: #6b7280; --bg: #f8fafc; --card: #ffffff; --line: #e5e7eb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 20px; padding: 14px 20px;
           background: var(--card); border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  header .meta { color: var(--muted); }
  #status { margin-left: auto; }
  #status.ok::before { content: "\25CF "; color: #16a34a; }
  #status.error::before { content: "\25CF "; color: #dc2626; }
  main { padding: 16px 20px; max-width: 1500px; margin: 0 auto; }
  h2 { font-size: 15px; margin: 8px 0 10px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { padding: 6px 8px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { color: var(--muted); font-weight: 600; font-size: 12px; }
  th:first-child, td:first-child { text-align: left; }
  td.decoder { font-weight: 600; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
  .charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; margin-top: 16px; }
  figure { margin: 0; }
  figcaption { font-weight: 600; margin-bottom: 4px; }
  figcaption .sub { color: var(--muted); font-weight: 400; font-size: 12px; }
  svg.chart { width: 100%; height: auto; display: block; }
  svg.chart .grid { stroke: var(--line); stroke-width: 1; }
  svg.chart .axis { fill: var(--muted); font-size: 11px; }
  svg.chart .empty { fill: var(--muted); font-size: 13px; }
  svg.chart path.series { fill: none; stroke-width: 2; stroke-linejoin: round; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; color: var(--muted); min-height: 18px; }
  .note { color: var(--muted); font-size: 12px; margin-top: 8px; }
</style>
</head>
<body>
<header>
  <h1>powerserve</h1>
  <span class="meta" id="meta">connecting…</span>
  <span id="status">waiting</span>
</header>
<main>
  <section class="card">
    <h2>Per decoder, since start</h2>
    <table id="totals">
      <thead><tr>
        <th>decoder</th><th>ok</th><th>failed</th><th>cancelled</th><th>running</th>
        <th>latency p50</th><th>p95</th><th>p99</th><th>TTFT p50</th><th>streamed</th><th>tokens/s</th>
        <th>cost ×</th><th>self-reward p50</th><th>acceptance</th>
      </tr></thead>
      <tbody></tbody>
    </table>
    <div class="note">cost × = engine tokens (generated + scored) per returned token;
      self-reward = median over choices of the mean log p per returned token under the base model;
      acceptance = Metropolis-Hastings acceptance rate (MCMC decoders);
      streamed = mean share of an answer's tokens sent before its decoder's work ended
      (0: all at the end; near 1: token by token).</div>
    <div class="note" id="quantile-note"></div>
  </section>
  <section class="charts" id="charts"></section>
</main>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const CHARTS = [
  {key: "latency_p95", title: "Latency p95", unit: "s"},
  {key: "latency_p50", title: "Latency p50", unit: "s"},
  {key: "cost_multiplier", title: "Cost multiplier", unit: "x"},
  {key: "tokens_per_s", title: "Output tokens/s", unit: ""},
  {key: "ttft_p50", title: "Time to first token p50", unit: "s"},
  {key: "streamed_fraction", title: "Streamed before the end", unit: "%"},
  {key: "requests_per_s", title: "Completed requests/s", unit: ""},
];
const COLUMNS = [
  ["ok", r => r.requests.success || 0, "n"],
  ["failed", r => (r.requests.error || 0) + (r.requests.rejected || 0), "n"],
  ["cancelled", r => r.requests.cancelled || 0, "n"],
  ["running", r => r.running, "n"],
  ["latency_p50", r => r.latency_p50, "s"],
  ["latency_p95", r => r.latency_p95, "s"],
  ["latency_p99", r => r.latency_p99, "s"],
  ["ttft_p50", r => r.ttft_p50, "s"],
  ["streamed_fraction", r => r.streamed_fraction, "%"],
  ["tokens_per_s", r => r.tokens_per_s, ""],
  ["cost_multiplier", r => r.cost_multiplier, "x"],
  ["self_reward", r => r.self_reward, ""],
  ["acceptance_rate", r => r.acceptance_rate, "%"],
];
const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(250, Number(params.get("poll_ms")) || 2000);
const DATA_URL = location.pathname.replace(/\/+$/, "") + "/data";
const colors = new Map();

function colorOf(name) {
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function fmt(v, unit) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  if (unit === "n") return String(Math.round(v));
  if (unit === "s") return v < 1 ? (v * 1000).toPrecision(3) + " ms" : v.toPrecision(3) + " s";
  if (unit === "x") return v.toPrecision(3) + "×";
  if (unit === "%") return (v * 100).toPrecision(3) + "%";
  return Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(3);
}

function el(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

function buildCharts() {
  const root = document.getElementById("charts");
  for (const c of CHARTS) {
    const fig = document.createElement("figure");
    fig.className = "card";
    fig.id = "chart-" + c.key;
    const cap = document.createElement("figcaption");
    cap.textContent = c.title + " ";
    const sub = document.createElement("span");
    sub.className = "sub";
    cap.appendChild(sub);
    const svg = el("svg", {class: "chart", viewBox: "0 0 560 220", role: "img", "aria-label": c.title});
    const legend = document.createElement("div");
    legend.className = "legend";
    fig.append(cap, svg, legend);
    root.appendChild(fig);
  }
}

function drawChart(chart, times, decoders, windowS) {
  const fig = document.getElementById("chart-" + chart.key);
  const svg = fig.querySelector("svg");
  const legend = fig.querySelector(".legend");
  fig.querySelector(".sub").textContent = "per decoder, sliding " + windowS + " s window";
  const W = 560, H = 220, L = 58, R = 14, T = 10, B = 26;
  svg.replaceChildren();
  legend.replaceChildren();
  let ymax = 0;
  const names = Object.keys(decoders);
  for (const name of names) for (const v of decoders[name][chart.key]) if (v !== null && v > ymax) ymax = v;
  if (times.length === 0 || ymax === 0) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, "no requests yet"));
    return;
  }
  ymax = niceMax(ymax * 1.05);
  const t1 = times[times.length - 1];
  const t0 = Math.min(times[0], t1 - 10);
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = v => T + (H - T - B) * (1 - v / ymax);
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4;
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
    svg.appendChild(el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis"}, fmt(v, chart.unit)));
  }
  svg.appendChild(el("text", {x: L, y: H - 6, class: "axis"}, clock(t0)));
  svg.appendChild(el("text", {x: W - R, y: H - 6, "text-anchor": "end", class: "axis"}, clock(t1)));
  for (const name of names) {
    const values = decoders[name][chart.key];
    const color = colorOf(name);
    let d = "", pen = false, points = 0, last = null;
    const dots = el("g", {fill: color});
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      d += (pen ? "L" : "M") + x(times[i]).toFixed(1) + "," + y(v).toFixed(1);
      dots.appendChild(el("circle", {cx: x(times[i]).toFixed(1), cy: y(v).toFixed(1), r: 2.5}));
      pen = true; points += 1; last = v;
    });
    if (points === 0) continue;
    svg.appendChild(el("path", {d: d, stroke: color, class: "series",
      "data-decoder": name, "data-points": points, "data-last": last}));
    svg.appendChild(dots);
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = color;
    item.append(sw, name + " " + fmt(last, chart.unit));
    legend.appendChild(item);
  }
}

function drawTable(decoders) {
  const body = document.querySelector("#totals tbody");
  body.replaceChildren();
  for (const [name, row] of Object.entries(decoders)) {
    const tr = document.createElement("tr");
    tr.dataset.decoder = name;
    const first = document.createElement("td");
    first.className = "decoder";
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = colorOf(name);
    first.append(sw, name);
    tr.appendChild(first);
    for (const [field, get, unit] of COLUMNS) {
      const td = document.createElement("td");
      const v = get(row);
      td.dataset.field = field;
      td.dataset.value = v === null || v === undefined ? "" : String(v);
      td.textContent = fmt(v, unit);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  if (!body.children.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = COLUMNS.length + 1;
    td.textContent = "No requests yet.";
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

function setStatus(ok, text) {
  const s = document.getElementById("status");
  s.className = ok ? "ok" : "error";
  s.textContent = text;
}

async function poll() {
  try {
    const response = await fetch(DATA_URL, {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    Object.keys(data.decoders).sort().forEach(colorOf);
    document.getElementById("meta").textContent =
      "model " + (data.model || "?") + " · engine " + (data.engine || "?") +
      " · up " + Math.round(data.uptime_s) + " s";
    drawTable(data.decoders);
    document.getElementById("quantile-note").textContent = data.quantiles === "exact"
      ? "Quantiles (latency, TTFT, self-reward) and streamed: exact, last " + data.exact_last +
        " observations per decoder (charts: exact over each window; Grafana shows Prometheus bucket estimates)."
      : "Quantiles: estimated from Prometheus histogram buckets.";
    for (const c of CHARTS) drawChart(c, data.series.t, data.series.decoders, data.window_s);
    setStatus(true, "live · " + clock(data.time));
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (err) {
    setStatus(false, "no data: " + err.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

buildCharts();
poll();
</script>
</body>
</html>
"""
