// 004 activation patching: per pair and site, the exact and attribution grids side by side, tokens on the axes.

const TRACE_COLOURS = {trace_resid: "Blues", trace_mlp: "Greens", trace_attn: "Reds"};  // as ROME's figures

function render(D, app) {
  const controls = section(app, "Choose", "Patching copies one clean activation into the corrupt run. Value: " +
    D.metric + ". Hover a cell for its value and token.");
  const row = el("div", {class: "row"});
  const grids = ["exact", "attribution"].map((m) => el("div", {id: "grid-" + m}));
  grids.forEach((g) => row.append(g));
  controls.after(row);
  const pairSelect = selector(controls, "pair-select", "Pair:", D.pairs.map((p, i) =>
    [i, p.clean + " → " + p.clean_answer + "   vs   " + p.corrupt + " → " + p.corrupt_answer]), () => draw());
  const sites = D.grids.map((g) => [g, g + " patching"]);
  if (D.pairs.some((p) => p.trace.resid)) {
    ["resid", "mlp", "attn"].forEach((k) => sites.push(["trace_" + k, "causal trace: restore " + k]));
  }
  const siteSelect = selector(controls, "site-select", "Site:", sites, () => draw());
  const draw = () => {
    const p = D.pairs[Number(pairSelect.value)], site = siteSelect.value;
    const tokens = p.clean_tokens.map((t, i) => i + ": " + t + (t !== p.corrupt_tokens[i] ? " / " +
                                        p.corrupt_tokens[i] : ""));
    const isHead = site.startsWith("head"), isTrace = site.startsWith("trace_");
    const panels = isTrace ? [["causal trace", p.trace[site.slice(6)]]] :
      ["exact", "attribution"].filter((m) => p[m][site]).map((m) => [m, p[m][site]]);
    // Position grids are stored [layers][positions]: drawn with the tokens down the side.
    const orient = (m) => isHead ? m : m[0].map((_, c) => m.map((r) => r[c]));
    const limit = Math.max(1, ...panels.flatMap(([, m]) => m.flat().map((x) => Math.abs(x ?? 0))));
    grids.forEach((div, i) => {
      if (!panels[i]) { Plotly.purge(div); div.replaceChildren(); return; }
      const [method, matrix] = panels[i], z = orient(matrix);
      const ylabels = isHead ? range(z.length).map((b) => "block " + b) : tokens;
      const xlabels = range(z[0].length).map(String);
      heatmap(div, {z: z, xlabels: xlabels, ylabels: ylabels,
        hover: z.map((r, y) => r.map((v, x) => esc(ylabels[y]) + "<br>" + (isHead ? "head " : isTrace &&
               site !== "trace_resid" ? "centre block " : "layer ") + x + "<br>" + (isTrace ? "p(clean answer) " :
               "value ") + (v === null ? "not run (EXACT='top' ran the cells attribution ranked highest)" : fmt(v)))),
        zmin: isTrace ? 0 : -limit, zmax: isTrace ? Math.max(p.trace.p_clean, ...z.flat()) : limit,
        zmid: isTrace ? undefined : 0,
        colorscale: isTrace ? TRACE_COLOURS[site] : "RdBu", reversescale: isTrace, colorbar: isTrace ? "p(clean answer)" : "normalized logit diff",
        title: isTrace ? "causal trace: restoring " + {trace_resid: "single residual states", trace_mlp:
               "MLP outputs, window " + p.trace.window, trace_attn: "attention outputs, window " + p.trace.window}[site] +
               " (clean p " + fmt(p.trace.p_clean, 3) + ", noised p " + fmt(p.trace.p_noised, 3) + ")" :
               method + ": " + site + " patching, clean into corrupt",
        xtitle: isHead ? "head" : (site === "resid" || site === "trace_resid" ? "layer" : "block"),
        cellW: 30, cellH: 22});
    });
  };
  draw();
}
