// 003 circuit analysis: direct logit attribution per head and per layer, and the ablations that confirm it.

function render(D, app) {
  const controls = section(app, "Choose", "Direct logit attribution (DLA) of the " + D.metric + ": what each " +
    "head and MLP writes straight into the answer's " + D.metric + ". Ablation (" + D.ablation + ") measures " +
    "the total effect. Hover a cell for its value.");
  const headsBox = section(app, "Layer × head DLA");
  const heads = el("div", {id: "dla-heads"});
  headsBox.append(heads);
  const layerBox = section(app, "Attention vs MLP per layer");
  const layers = el("div", {id: "dla-layers"});
  layerBox.append(layers);
  const ablationBox = section(app, "Ablation: does removing a component change the answer as DLA says?");
  const note = el("p", {class: "note"});
  const scatter = el("div", {id: "ablation-scatter"});
  ablationBox.append(note, scatter);
  const draw = (v) => {
    const p = v === "mean" ? null : D.prompts[Number(v)];
    const src = p || D.mean;
    const limit = Math.max(1e-9, ...src.heads.flat().map(Math.abs));
    heatmap(heads, {z: src.heads, xlabels: range(D.n_heads).map((h) => "H" + h),
      ylabels: range(D.n_layers).map((l) => "L" + l),
      hover: src.heads.map((r, l) => r.map((x, h) => "L" + l + " H" + h + "<br>DLA " + fmt(x))),
      zmin: -limit, zmax: limit, zmid: 0, colorscale: "RdBu", colorbar: D.metric + " attribution",
      title: p ? esc(shorten(p.prompt, 70)) + " → " + esc(p.target) : "mean over " + D.prompts.length + " prompts",
      xtitle: "head", cellW: 40, cellH: 18});
    const L = range(D.n_layers);
    chart(layers, [{name: "attention (sum of heads)", type: "bar", x: L, y: src.attn},
                   {name: "MLP", type: "bar", x: L, y: src.mlps}],
          {title: "what each layer writes to the " + D.metric, xtitle: "layer", ytitle: D.metric + " attribution",
           width: Math.max(600, 120 + 22 * D.n_layers)});
    scatter.replaceChildren();
    ablationBox.querySelector("table")?.remove();
    if (!p) { note.textContent = "Pick one prompt above to see its ablations."; return; }
    const sets = p.ablations.filter((a) => a.kind === "top heads" || a.kind === "top MLPs");
    note.textContent = "Clean " + D.metric + " " + fmt(p.metric, 4) + ", p(target) " + fmt(p.target_prob) +
      ". Direct effect: the DLA of what the ablation removes; total effect: clean minus ablated " + D.metric + ".";
    const singles = p.ablations.filter((a) => a.kind === "head" || a.kind === "mlp")
      .sort((a, b) => Math.abs(b.direct_effect) - Math.abs(a.direct_effect)).slice(0, 10);
    table(ablationBox, "ablations", ["ablated", "components", "direct effect", "total effect", "p(target) after",
                                     "p change"],
          sets.concat(singles).map((a) => [a.kind, a.components.join(" "), fmt(a.direct_effect, 4),
                                           fmt(a.total_effect, 4), fmt(a.target_prob), fmt(a.prob_change)]));
    const series = [["head", "heads"], ["mlp", "MLPs"]].map(([kind, name]) => {
      const a = p.ablations.filter((x) => x.kind === kind);
      return {name: name, type: "scatter", x: a.map((x) => x.direct_effect), y: a.map((x) => x.total_effect),
              hover: a.map((x) => x.components.join(" ") + "<br>direct " + fmt(x.direct_effect, 4) + "<br>total " +
                     fmt(x.total_effect, 4))};
    });
    const all = series.flatMap((s) => s.x.concat(s.y)), low = Math.min(...all), high = Math.max(...all);
    series.push({name: "total = direct", type: "scatter", x: [low, high], y: [low, high], color: "#999"});
    chart(scatter, series.map((s, i) => Object.assign(s, {type: undefined, mode: i < 2 ? "markers" : "lines"})),
          {title: "single ablations: direct vs total effect", xtitle: "direct effect", ytitle: "total effect",
           width: 560, height: 460});
  };
  selector(controls, "prompt-select", "Prompt:", [["mean", "mean over prompts"]].concat(
    D.prompts.map((p, i) => [i, p.prompt + "  →  " + p.target])), draw);
  draw("mean");
}
