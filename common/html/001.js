// 001 layers and logits: prompt x layer grids per lens, per-prompt curves, the prompts' table.

function render(D, app) {
  const groups = [...new Set(D.prompts.map((p) => p.group))];
  const lensTitle = (name) => name.toUpperCase() + " lens";
  const controls = section(app, "Prompts", "Pick a set of prompts. Grids: one row per prompt, one column per " +
    "layer (0 = embeddings). Colour: p(target); text: the top-1 token (␣ = space, ↵ = newline). Hover a cell " +
    "for its top tokens. Lenses side by side: " + D.lens_names.map(lensTitle).join(", ") + ".");
  const gridBox = section(app, "p(target) and top-1 token by layer");
  const row = el("div", {class: "row"});
  gridBox.append(row);
  const grids = D.lens_names.map((name) => {
    const div = el("div", {id: "grid-" + name, class: "grid"});
    row.append(div);
    return div;
  });
  const curveBox = section(app, "One prompt, layer by layer");
  const curveControls = el("div");
  const curves = el("div", {class: "row"});
  ["curve-p", "curve-entropy", "curve-kl"].forEach((id) => curves.append(el("div", {id: id})));
  curveBox.append(curveControls, curves);
  const tableBox = section(app, "The prompts of this set (final layer)");

  let chosen = [];
  let promptSelect = null;
  const draw = (group) => {
    chosen = D.prompts.filter((p) => group === "all" || p.group === group);
    D.lens_names.forEach((name, i) => drawGrid(grids[i], name, chosen.filter((p) => p.lenses[name])));
    curveControls.replaceChildren();
    promptSelect = selector(curveControls, "prompt-select", "Prompt:",
      chosen.map((p, i) => [i, shorten(p.prompt, 90) + "  →  " + p.target]), (i) => drawCurves(chosen[i]));
    drawCurves(chosen[0]);
    tableBox.querySelector("table")?.remove();
    table(tableBox, "prompt-table", ["prompt", "target"].concat(D.lens_names.flatMap((n) =>
      [n + " top-1", n + " p(target)", n + " rank"])), chosen.map((p) => [p.prompt, p.target].concat(
      D.lens_names.flatMap((n) => {
        const v = p.lenses[n];
        if (!v) return ["", "", ""];
        const last = v.p.length - 1;
        return [v.top[last][0][0], fmt(v.p[last]), v.rank[last]];
      }))));
  };

  const drawGrid = (div, name, prompts) => {
    if (!prompts.length) { div.replaceChildren(el("p", {class: "note", text: "no " + name + " lens here"})); return; }
    const n = D.n_layers;
    const longest = Math.max(...prompts.flatMap((p) => p.lenses[name].top.map((t) => t[0][0].length)));
    heatmap(div, {
      z: prompts.map((p) => p.lenses[name].p),
      text: prompts.map((p) => p.lenses[name].top.map((t) => esc(t[0][0]))),
      hover: prompts.map((p) => p.lenses[name].top.map((top, layer) => {
        const v = p.lenses[name];
        return esc(shorten(p.prompt, 80)) + "<br>" + lensTitle(name) + ", layer " + layer + " (" +
          Math.round(100 * layer / n) + "% depth)<br>target " + esc(p.target) + ": p " + fmt(v.p[layer]) +
          ", rank " + v.rank[layer] + "<br>top tokens:<br>" +
          top.map(([tok, prob], k) => (k + 1) + ". " + esc(tok) + "  " + fmt(prob)).join("<br>");
      })),
      xlabels: range(n + 1).map(String), ylabels: prompts.map((p) => shorten(p.prompt, 60) + " → " + p.target),
      zmin: 0, zmax: 1, colorbar: "p(target)", title: lensTitle(name) + ": p(target), text = top-1 token",
      xtitle: "layer", cellW: Math.min(Math.max(40, 10 + 7 * longest), 130), cellH: 24});
  };

  const drawCurves = (p) => {
    const layers = range(D.n_layers + 1);
    const names = D.lens_names.filter((n) => p.lenses[n]);
    const plot = (id, key, title, yrange) => chart(document.getElementById(id), names.map((n) => ({
      name: lensTitle(n), x: layers, y: p.lenses[n][key],
      hover: layers.map((l) => lensTitle(n) + ", layer " + l + "<br>" + key + " " + fmt(p.lenses[n][key][l]) +
        "<br>top-1 " + esc(p.lenses[n].top[l][0][0]))})), {title: title, xtitle: "layer", yrange: yrange});
    plot("curve-p", "p", "p(target " + esc(p.target) + ")", [0, 1]);
    plot("curve-entropy", "entropy", "entropy (nats)");
    plot("curve-kl", "kl", "KL(final ‖ layer) (nats)");
  };

  selector(controls, "group-select", "Prompt set:", groups.map((g) => [g, g]).concat([["all", "all prompts"]]),
           draw);
  draw(groups[0]);
}
