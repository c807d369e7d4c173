// 002 attention patterns: one prompt, layer and head of the band: where the final position looks.

const TYPE_COLOURS = {sink: "#7f7f7f", special: "#bcbd22", entity: "#d62728", relation: "#1f77b4",
                      function: "#2ca02c", punctuation: "#9467bd"};

function render(D, app) {
  const controls = section(app, "Choose", "The final position (the one that predicts the answer) attends over " +
    "the prompt's tokens; bars coloured by token type (the sink is position 0). Click a cell of the map below to " +
    "pick its layer and head.");
  const bars = el("div", {id: "attention"});
  const mapBox = section(app, "This prompt: attention on the subject, every layer and head of the band");
  const map = el("div", {id: "subject-map"});
  mapBox.append(map);
  controls.after(bars);
  const state = {p: 0, b: 0, h: 0};
  const selects = {};
  const draw = () => {
    const p = D.prompts[state.p], layer = D.layers[state.b], row = p.rows[state.b][state.h];
    const positions = range(p.tokens.length);
    const series = D.buckets.filter((t) => p.types.includes(t)).map((type) => {
      const at = positions.filter((i) => p.types[i] === type);
      return {name: type, type: "bar", color: TYPE_COLOURS[type], width: 0.8, x: at, y: at.map((i) => row[i]),
              hover: at.map((i) => "position " + i + ": " + esc(p.tokens[i]) + "<br>type " + type +
                     (p.subject_positions.includes(i) ? " (subject)" : "") + "<br>attention " + fmt(row[i]))};
    });
    chart(bars, series, {
      title: "L" + layer + " H" + state.h + " (kv " + D.kv_head_of_head[state.h] + "), final position of " +
             esc(shorten(p.prompt, 70)) + " → " + esc(p.target),
      xtitle: "key position (token)", ytitle: "attention weight", yrange: [0, 1], barmode: "overlay",
      width: Math.max(700, 160 + 46 * p.tokens.length), height: 420,
      xaxis: {tickvals: positions, ticktext: p.tokens.map(esc), tickangle: 0}});
    heatmap(map, {z: p.subject, xlabels: range(D.n_heads).map((h) => "H" + h),
      ylabels: D.layers.map((l) => "L" + l + " (" + Math.round(100 * (l + 1) / D.n_layers) + "%)"),
      hover: p.subject.map((r, b) => r.map((v, h) => "L" + D.layers[b] + " H" + h + "<br>attention on the " +
             "subject " + fmt(v))), zmin: 0, zmax: 1, colorbar: "attention mass", xtitle: "head",
      title: p.subject_positions.length ? "mass on the subject's tokens" : "no subject in this prompt",
      cellW: 34, cellH: 18}).then(() => {
        map.removeAllListeners?.("plotly_click");
        map.on("plotly_click", (ev) => { state.b = ev.points[0].y; state.h = ev.points[0].x; sync(); draw(); });
      });
  };
  const sync = () => { selects.b.value = String(state.b); selects.h.value = String(state.h); };
  selector(controls, "prompt-select", "Prompt:", D.prompts.map((p, i) => [i, p.prompt + "  →  " + p.target]),
           (v) => { state.p = Number(v); draw(); });
  selects.b = selector(controls, "layer-select", "Layer:", D.layers.map((l, b) => [b, "L" + l + " (" +
           Math.round(100 * (l + 1) / D.n_layers) + "% depth)"]), (v) => { state.b = Number(v); draw(); });
  selects.h = selector(controls, "head-select", "Head:", range(D.n_heads).map((h) => [h, "H" + h + " (kv " +
           D.kv_head_of_head[h] + ")"]), (v) => { state.h = Number(v); draw(); });
  if (D.ranking.length) {  // start on the best-ranked head
    state.b = D.layers.indexOf(D.ranking[0].layer); state.h = D.ranking[0].head; sync();
  }
  draw();
  const rankBox = section(app, "Heads ranked by attention on the subject entity (best 20)",
    "Mean, std and min over the prompts that have a subject; top rate: share of them on which the head is " +
    "among that prompt's best.");
  table(rankBox, "ranking", ["rank", "layer", "head", "kv head", "mean", "std", "min", "top rate"],
        D.ranking.slice(0, 20).map((h, i) => [i + 1, h.layer, h.head, h.kv_head, fmt(h.mean), fmt(h.std), fmt(h.min),
                                 fmt(h.top_rate, 2)]));
}
