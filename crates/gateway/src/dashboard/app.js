// Palisade's dashboard: draws the samples /dashboard/events sends once a second.
"use strict";

const KEPT = 300;
const samples = [];
const events = [];
const cards = new Map();
const colors = { open: "--bad", forced_open: "--bad", half_open: "--warn", closed: "--ok", tier: "--blue", ejected: "--violet", returned: "--violet" };
let drawPending = false;

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const fixed = (v, digits) => (v == null ? "-" : Number(v).toFixed(digits));
const duration = (s) => (s < 120 ? `${s}s` : s < 7200 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`);

function connect() {
  const source = new EventSource("/dashboard/events");
  source.onopen = () => {
    // The stream starts with the samples kept: start again from them.
    samples.length = 0;
    events.length = 0;
    $("status").dataset.live = "true";
    $("status").textContent = "live";
  };
  source.onerror = () => {
    $("status").dataset.live = "false";
    $("status").textContent = "reconnecting";
  };
  source.onmessage = (m) => {
    const s = JSON.parse(m.data);
    samples.push(s);
    if (samples.length > KEPT) samples.shift();
    for (const e of s.events) events.push(e);
    if (events.length > 200) events.splice(0, events.length - 200);
    if (!drawPending) {
      drawPending = true;
      requestAnimationFrame(() => { drawPending = false; draw(); });
    }
  };
}

function draw() {
  const last = samples[samples.length - 1];
  if (!last) return;
  $("uptime").textContent = duration(last.uptime_s);
  drawRoutes(last);
  drawPanels(last);
  drawClusters(last);
  drawStores(last);
  drawEvents();
}

function routeCard(name) {
  let c = cards.get("route:" + name);
  if (c) return c;
  const figures = el("div", { class: "figures" });
  const canvases = ["requests/s (429/s dashed)", "5xx %", "p50 / p99 ms"].map((label) => {
    const canvas = el("canvas");
    return { label, canvas, figure: el("figure", {}, canvas, el("figcaption", { text: label })) };
  });
  const card = el("div", { class: "card", "data-route": name }, el("h3", { text: name }), figures,
    el("div", { class: "charts" }, ...canvases.map((x) => x.figure)));
  c = { card, figures, canvases: canvases.map((x) => x.canvas) };
  cards.set("route:" + name, c);
  return c;
}

function drawRoutes(last) {
  const box = $("routes");
  box.querySelector(".empty")?.remove();
  for (const r of last.routes) {
    const c = routeCard(r.name);
    if (!c.card.isConnected) box.append(c.card);
    c.figures.replaceChildren(
      el("span", {}, el("b", { text: fixed(r.rps, 0) }), " req/s"),
      el("span", {}, el("b", { text: fixed(r.error_rate * 100, 1) }), "% 5xx"),
      el("span", {}, "p50 ", el("b", { text: fixed(r.p50_ms, 1) }), " ms"),
      el("span", {}, "p99 ", el("b", { text: fixed(r.p99_ms, 1) }), " ms"),
      el("span", {}, el("b", { text: fixed(r.refused_per_s, 0) }), " refused/s"),
      r.cluster ? el("span", { text: "cluster " + r.cluster }) : "",
    );
    const series = (key, scale = 1) => samples.map((s) => {
      const x = s.routes.find((y) => y.name === r.name);
      return [s.t, x && x[key] != null ? x[key] * scale : null];
    });
    const marks = events.filter((e) => e.cluster && e.cluster === r.cluster);
    chart(c.canvases[0], [{ color: "--blue", points: series("rps") }, { color: "--warn", dash: true, points: series("refused_per_s") }], marks);
    chart(c.canvases[1], [{ color: "--bad", points: series("error_rate", 100) }], marks, 1);
    chart(c.canvases[2], [{ color: "--ok", points: series("p50_ms") }, { color: "--violet", points: series("p99_ms") }], marks);
  }
}

// A line chart of the last five minutes, with events as vertical marks.
function chart(canvas, lines, marks, minTop = 0) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w * dpr || canvas.height !== h * dpr) { canvas.width = w * dpr; canvas.height = h * dpr; }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const end = samples.length ? samples[samples.length - 1].t : Date.now();
  const start = end - KEPT * 1000;
  let top = minTop;
  for (const l of lines) for (const [, v] of l.points) if (v != null && v > top) top = v;
  top = top > 0 ? top * 1.15 : 1;
  const x = (t) => ((t - start) / (end - start)) * (w - 1);
  const y = (v) => h - 12 - (v / top) * (h - 16);
  g.strokeStyle = css("--line");
  g.lineWidth = 1;
  g.beginPath(); g.moveTo(0, y(0) + .5); g.lineTo(w, y(0) + .5); g.stroke();
  g.fillStyle = css("--dim");
  g.font = "10px system-ui, sans-serif";
  g.fillText(top >= 10 ? top.toFixed(0) : top.toPrecision(2), 2, 10);
  for (const m of marks) {
    g.strokeStyle = css(colors[m.kind === "breaker" ? m.to : m.kind] || "--dim");
    g.beginPath(); g.moveTo(x(m.t) + .5, 0); g.lineTo(x(m.t) + .5, h - 12); g.stroke();
  }
  for (const l of lines) {
    g.strokeStyle = css(l.color);
    g.lineWidth = 1.5;
    g.setLineDash(l.dash ? [4, 3] : []);
    g.beginPath();
    let pen = false;
    for (const [t, v] of l.points) {
      if (v == null) { pen = false; continue; }
      if (pen) g.lineTo(x(t), y(v)); else g.moveTo(x(t), y(v));
      pen = true;
    }
    g.stroke();
  }
  g.setLineDash([]);
}

// A service's own panel: its counters' rates and its gauges, each with a chart
// of a line per figure, and its table.
const palette = ["--blue", "--ok", "--warn", "--violet", "--bad", "--dim"];

function panelCard(name) {
  let c = cards.get("panel:" + name);
  if (c) return c;
  const charts = ["per second", "now"].map((label) => {
    const canvas = el("canvas"), legend = el("figcaption");
    return { label, canvas, legend, figure: el("figure", {}, canvas, legend) };
  });
  c = { card: el("div", { class: "card", "data-panel": name }), figures: el("div", { class: "figures" }),
    charts, body: el("tbody"), head: el("tr") };
  c.card.append(el("h3", { text: name }), c.figures, el("div", { class: "charts two" }, ...charts.map((x) => x.figure)),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, c.head), c.body)));
  cards.set("panel:" + name, c);
  return c;
}

function drawPanels(last) {
  const box = $("panels");
  const panels = last.panels || [];
  $("services").hidden = panels.length === 0;
  for (const p of panels) {
    const c = panelCard(p.name);
    if (!c.card.isConnected) box.append(c.card);
    const figures = [
      ...Object.entries(p.rates).map(([k, v]) => el("span", { "data-rate": k }, el("b", { text: fixed(v, 0) }), ` ${k}/s`)),
      ...Object.entries(p.gauges).map(([k, v]) => el("span", { "data-gauge": k }, `${k} `, el("b", { text: String(v) }))),
    ];
    if (p.urls > 1) figures.push(el("span", {}, "answering ", el("b", { text: `${p.answered}/${p.urls}` })));
    for (const e of p.errors) figures.push(el("span", {}, state("down"), " " + e));
    c.figures.replaceChildren(...figures);
    [["rates", Object.keys(p.rates)], ["gauges", Object.keys(p.gauges)]].forEach(([part, names], i) => {
      const lines = names.map((k, j) => ({
        color: palette[j % palette.length], dash: j >= palette.length,
        points: samples.map((s) => {
          const x = (s.panels || []).find((y) => y.name === p.name);
          return [s.t, x && x[part][k] != null ? x[part][k] : null];
        }),
      }));
      chart(c.charts[i].canvas, lines, []);
      c.charts[i].legend.replaceChildren(c.charts[i].label,
        ...names.map((k, j) => el("span", {}, el("i", { style: `background: var(${palette[j % palette.length]})` }), k)));
    });
    const columns = p.columns.length ? p.columns : [...new Set(p.rows.flatMap((r) => Object.keys(r)))];
    c.head.replaceChildren(...columns.map((k) => el("th", { text: k })));
    c.body.replaceChildren(...p.rows.map((r) => el("tr", {},
      ...columns.map((k) => el("td", { "data-column": k, text: r[k] == null ? "-" : String(r[k]) })))));
  }
}

const state = (text) => el("span", { class: "state", "data-state": text, text });

function drawClusters(last) {
  const box = $("clusters");
  for (const c of last.clusters) {
    let card = cards.get("cluster:" + c.name);
    if (!card) {
      card = { card: el("div", { class: "card", "data-cluster": c.name }), body: el("tbody") };
      const head = el("tr", {}, ...["endpoint", "tier", "breaker", "healthy", "ejected", "ejections", "in flight", "EWMA ms", "requests", "failures"].map((t) => el("th", { text: t })));
      card.figures = el("div", { class: "figures" });
      card.card.append(el("h3", { text: c.name }), card.figures,
        el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), card.body)));
      cards.set("cluster:" + c.name, card);
      box.append(card.card);
    }
    card.figures.replaceChildren(
      el("span", {}, "serving tier ", el("b", { class: "tier", text: String(c.active_tier) })),
      el("span", {}, "in flight ", el("b", { text: c.in_flight == null ? "-" : `${c.in_flight}/${c.max_concurrent}` })),
      c.adaptive_limit == null ? "" : el("span", {}, "adaptive limit ", el("b", { text: String(c.adaptive_limit) })),
      c.panic ? el("span", {}, state("panic")) : "",
    );
    card.body.replaceChildren(...c.endpoints.map((e) => el("tr", { "data-endpoint": e.address },
      el("td", { text: e.address }),
      el("td", { text: String(e.tier) }),
      el("td", { class: "breaker", "data-state": e.breaker }, state(e.breaker)),
      el("td", {}, state(e.healthy ? "yes" : "no")),
      el("td", {}, e.ejected ? state("ejected") : "-"),
      el("td", { text: String(e.ejections) }),
      el("td", { text: String(e.in_flight) }),
      el("td", { text: fixed(e.ewma_ms, 1) }),
      el("td", { text: String(e.requests) }),
      el("td", { text: String(e.failures) }),
    )));
  }
}

function drawStores(last) {
  const box = $("store-cards");
  const parts = [];
  if (last.cache) {
    const c = last.cache;
    parts.push(el("div", { class: "card", "data-store": "cache" }, el("h3", { text: "response cache" }),
      el("div", { class: "figures" },
        el("span", {}, "L1 ", el("b", { text: fixed(c.l1_ratio * 100, 1) }), "%"),
        el("span", {}, "L2 ", el("b", { text: fixed(c.l2_ratio * 100, 1) }), "%"),
        el("span", {}, "misses ", el("b", { text: String(c.misses) })),
        el("span", {}, "stale ", el("b", { text: String(c.stale) })),
        el("span", {}, "lookups ", el("b", { text: String(c.lookups) })))));
  }
  if (last.queue) {
    const rows = Array.isArray(last.queue)
      ? last.queue.map((q) => el("tr", {}, el("td", { text: q.queue }), el("td", { text: String(q.jobs.available) }),
        el("td", { text: String(q.jobs.running) }), el("td", { text: String(q.jobs.retryable) }),
        el("td", { text: String(q.jobs.discarded) }), el("td", { text: String(q.oldest_wait_ms) })))
      : [el("tr", {}, el("td", { colspan: "6", text: last.queue.error }))];
    const head = el("tr", {}, ...["queue", "available", "running", "retryable", "discarded", "oldest wait ms"].map((t) => el("th", { text: t })));
    parts.push(el("div", { class: "card", "data-store": "queue" }, el("h3", { text: "queue" }),
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
  }
  if (last.replicas) {
    const head = el("tr", {}, ...["set", "replica", "lag s"].map((t) => el("th", { text: t })));
    const rows = last.replicas.map((r) => el("tr", { "data-replica": r.replica },
      el("td", { text: r.set }), el("td", { text: r.replica }), el("td", { class: "lag", text: fixed(r.lag_s, 2) })));
    parts.push(el("div", { class: "card", "data-store": "replicas" }, el("h3", { text: "read replicas" }),
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
  }
  $("stores").hidden = parts.length === 0;
  box.replaceChildren(...parts);
}

function drawEvents() {
  const list = $("events");
  if (!events.length) return;
  list.replaceChildren(...events.slice(-30).reverse().map((e) => {
    const when = new Date(e.t).toLocaleTimeString();
    const what = e.kind === "breaker" ? `breaker ${e.from} → ${e.to}`
      : e.kind === "tier" ? `serving tier ${e.from} → ${e.to}` : e.kind;
    return el("li", { "data-kind": e.kind }, `${when} `, el("b", { text: `${e.cluster} ${e.endpoint || ""}` }), ` ${what}`);
  }));
}

fetch("/health/ready").then((r) => r.json()).then((h) => { $("version").textContent = "v" + h.version; }).catch(() => {});
connect();
