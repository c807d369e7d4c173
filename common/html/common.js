"use strict";
// Glue shared by every report.html (common/html_report.py): unpack the inlined plotly.js and data, then
// call the experiment's render(data, app). Helpers below only build DOM controls and plotly traces.

async function gunzipText(id) {
  const b64 = document.getElementById(id).textContent.trim();
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).text();
}

async function boot() {
  const status = document.getElementById("status");
  try {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot unpack the page: open it in Safari 16.4+, Chrome or Firefox.");
    }
    const library = document.createElement("script");
    library.textContent = await gunzipText("plotly-gz");
    document.head.appendChild(library);  // runs at once: defines window.Plotly
    const data = JSON.parse(await gunzipText("data-gz"));
    render(data, document.getElementById("app"));
    status.remove();
    document.body.dataset.ready = "1";
  } catch (error) {
    status.textContent = "The page could not be drawn: " + error.message;
    status.className = "error";
    throw error;
  }
}

const CONFIG = {displaylogo: false, responsive: false, showLink: false,
                modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"]};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function section(app, title, note) {
  const box = el("section", {}, el("h2", {text: title}));
  if (note) box.append(el("p", {class: "note", text: note}));
  app.append(box);
  return box;
}

// A labelled <select>; options: [[value, text], ...]; onChange(value) is called on every change.
function selector(parent, id, label, options, onChange) {
  const select = el("select", {id: id});
  options.forEach(([value, text]) => select.append(el("option", {value: String(value), text: text})));
  select.addEventListener("change", () => onChange(select.value));
  parent.append(el("label", {class: "control"}, label + " ", select));
  return select;
}

// Text shown by plotly (it reads a few HTML tags in labels): escape the characters it would interpret.
function esc(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

// A long label keeps both ends (never cut from the left only): "start … end".
function shorten(s, n) {
  return s.length <= n ? s : s.slice(0, Math.floor(n / 3)) + " … " + s.slice(s.length - Math.ceil(2 * n / 3));
}

function fmt(x, digits) {
  return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits === undefined ? 6 : digits);
}

function range(n) {
  return Array.from({length: n}, (_, i) => i);
}

// A heatmap on numeric axes with tick labels (so equal labels never merge), first row on top.
// o: {z, xlabels, ylabels, text?, hover (2-D strings), zmin, zmax, colorscale, colorbar, title, xtitle,
//     ytitle, cellW, cellH}
function heatmap(div, o) {
  const rows = o.z.length, cols = rows ? o.z[0].length : 0;
  const longest = Math.max(4, ...o.ylabels.map((s) => s.length));
  const left = Math.min(30 + 6.5 * longest, 460);
  const cellW = o.cellW || 28, cellH = o.cellH || 22;
  const trace = {type: "heatmap", z: o.z, x: range(cols), y: range(rows), zmin: o.zmin, zmax: o.zmax,
                 colorscale: o.colorscale || "Viridis", customdata: o.hover,
                 hovertemplate: "%{customdata}<extra></extra>", xgap: 1, ygap: 1,
                 colorbar: {title: {text: o.colorbar || "", side: "right"}, thickness: 14}};
  if (o.zmid !== undefined) trace.zmid = o.zmid;
  if (o.reversescale) trace.reversescale = true;
  if (o.text) Object.assign(trace, {text: o.text, texttemplate: "%{text}", textfont: {size: 11}});
  const layout = {
    title: {text: o.title || "", x: 0, xanchor: "left", font: {size: 14}},
    width: Math.max(420, left + 120 + cols * cellW), height: Math.max(300, 120 + rows * cellH),
    margin: {l: left, r: 20, t: 50, b: 60},
    xaxis: {title: {text: o.xtitle || ""}, tickvals: range(cols), ticktext: o.xlabels.map(esc),
            tickangle: 0, side: "bottom", showgrid: false, zeroline: false, automargin: true},
    yaxis: {title: {text: o.ytitle || ""}, tickvals: range(rows), ticktext: o.ylabels.map(esc),
            autorange: "reversed", showgrid: false, zeroline: false, automargin: true},
    hoverlabel: {align: "left", font: {family: "Menlo, Consolas, monospace", size: 12}},
  };
  return Plotly.react(div, [trace], layout, CONFIG);
}

// Line or bar charts: series [{name, x, y, type?, mode?, color?, width?, hover?}], o: {title, xtitle, ytitle, yrange, width, height}.
function chart(div, series, o) {
  const traces = series.map((s) => {
    const trace = {type: s.type || "scatter", name: s.name, x: s.x, y: s.y};
    if (!s.type) trace.mode = s.mode || "lines+markers";
    if (s.color) trace.marker = {color: s.color};
    if (s.width) trace.width = s.width;  // bars: the same width in every trace
    if (s.hover) Object.assign(trace, {customdata: s.hover, hovertemplate: "%{customdata}<extra></extra>"});
    return trace;
  });
  const layout = {
    title: {text: o.title || "", x: 0, xanchor: "left", font: {size: 14}},
    width: o.width || 520, height: o.height || 340, margin: {l: 60, r: 20, t: 70, b: 60},
    xaxis: Object.assign({title: {text: o.xtitle || ""}, automargin: true}, o.xaxis || {}),
    yaxis: {title: {text: o.ytitle || ""}, range: o.yrange, zeroline: true},
    barmode: o.barmode || "group", legend: {orientation: "h", y: -0.25}, hovermode: "closest",
    hoverlabel: {align: "left", font: {family: "Menlo, Consolas, monospace", size: 12}},
  };
  return Plotly.react(div, traces, layout, CONFIG);
}

// A plain HTML table: headers [str], rows [[cell, ...]] (cells are text, never HTML).
function table(parent, id, headers, rows) {
  const t = el("table", {id: id});
  t.append(el("tr", {}, ...headers.map((h) => el("th", {text: h}))));
  rows.forEach((row) => t.append(el("tr", {}, ...row.map((c) => el("td", {text: String(c)})))));
  parent.append(t);
  return t;
}

boot();
