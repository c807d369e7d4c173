// 001 models compared by depth %: mean curves over the main prompts, and one fact at a time.

function render(D, app) {
  const meanBox = section(app, "Mean over the main prompts (" + D.lens.toUpperCase() + " lens)",
    "Depth = layer / n_layers, so models of different depth line up.");
  const row = el("div", {class: "row"});
  ["by-depth-p", "by-depth-entropy"].forEach((id) => row.append(el("div", {id: id})));
  meanBox.append(row);
  const mean = (m, key) => m.prompts[0].depth.map((_, l) => m.prompts.reduce((s, p) => s + p[key][l], 0) /
                                                      m.prompts.length);
  const plot = (id, key, title, yrange, pick) => chart(document.getElementById(id), D.models.map((m) => {
    const p = pick ? m.prompts.find((q) => q.fact === pick) : null;
    if (pick && !p) return {name: m.model + " (no such fact)", x: [], y: []};
    return {name: m.model, x: m.prompts[0].depth, y: p ? p[key] : mean(m, key),
            hover: m.prompts[0].depth.map((d, l) => m.model + ", layer " + l + " (" + Math.round(100 * d) +
                   "%)<br>" + key + " " + fmt((p ? p[key] : mean(m, key))[l]))};
  }), {title: title, xtitle: "depth (layer / n_layers)", yrange: yrange});
  plot("by-depth-p", "p", "mean p(target)", [0, 1]);
  plot("by-depth-entropy", "entropy", "mean entropy (nats)");
  const factBox = section(app, "One fact");
  const facts = [...new Set(D.models.flatMap((m) => m.prompts.map((p) => p.fact)))];
  const factRow = el("div", {class: "row"});
  ["fact-p", "fact-entropy"].forEach((id) => factRow.append(el("div", {id: id})));
  const draw = (fact) => {
    plot("fact-p", "p", "p(target): " + esc(fact), [0, 1], fact);
    plot("fact-entropy", "entropy", "entropy (nats): " + esc(fact), undefined, fact);
  };
  selector(factBox, "fact-select", "Fact:", facts.map((f) => {
    const p = D.models[0].prompts.find((q) => q.fact === f);
    return [f, f + (p ? ": " + p.prompt + " → " + p.target : "")];
  }), draw);
  factBox.append(factRow);
  draw(facts[0]);
}
