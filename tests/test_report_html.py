"""report.html in a real browser: headless Chromium opens each experiment's page from a tiny-model run.

Checked: no script errors, no request other than the file itself, the prompts' target tokens on the page,
the grids' sizes (layers, heads, positions) against results.json, and a real mouse hover over a cell that
shows its tokens and values. Chromium is the Debian package `chromium` (.ci/run installs it); where no
Chromium or Chrome is found (e.g. on a Mac without Chrome), these tests are skipped, saying why. The last
tests need no browser: the page's packed library and data round-trip, and no URL is in the page.
"""
import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import run_in_process

from common import html_report
from common.report import RunFolder, visible_token


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    mac = Path("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
    return str(mac) if mac.exists() else None


CHROMIUM = find_chromium()


PROMPTS = [{"prompt": "The capital of France is", "target": "Paris"},
           {"prompt": "Romeo and Juliet was written by William", "target": "Shakespeare"}]
PAIRS = [{"clean": "The capital of France is", "corrupt": "The capital of Italy is", "clean_answer": "Paris",
          "corrupt_answer": "Rome"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_folders):
    """{page name: run folder} of one small run per experiment (001 on two models: their comparison too)."""
    out = tmp_path_factory.mktemp("html")
    prompts, pairs = out / "prompts.json", out / "pairs.json"
    prompts.write_text(json.dumps(PROMPTS))
    pairs.write_text(json.dumps(PAIRS))
    llama, gemma2 = str(tiny_folders["llama"]), str(tiny_folders["gemma2"])
    comparison = run_in_process("001_layers_and_logits/run.py", f"--OUT_DIR={out / '001'}",
                                f"--MODELS={json.dumps([llama, gemma2])}", f"--PROMPTS_FILE={prompts}",
                                "--TEMPERATURES=[1.0]", "--TOP_K=3")
    [model_001] = [p for p in (out / "001" / "llama").iterdir() if not p.is_symlink()]
    return {"001": model_001, "001_comparison": comparison,
            "002": run_in_process("002_attention_patterns/run.py", f"--OUT_DIR={out / '002'}", f"--MODEL={llama}",
                                  f"--PROMPTS_FILE={prompts}", "--TOP_HEADS=2", "--DEPTH_RANGE=[0.0, 1.0]"),
            "003": run_in_process("003_circuit_analysis/run.py", f"--OUT_DIR={out / '003'}", f"--MODEL={llama}",
                                  f"--PROMPTS_FILE={prompts}", "--TOP_K=3", "--ABLATE_EVERY=False"),
            "004": run_in_process("004_activation_patching/run.py", f"--OUT_DIR={out / '004'}", f"--MODEL={llama}",
                                  f"--PAIRS_FILE={pairs}", "--NOISE_SAMPLES=2")}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium or Chrome found: install the Debian package `chromium` (.ci/run does) to run "
                    "the browser tests")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, folder: Path):
    """Open folder/report.html; wait until it is drawn (or says why not). Returns (page, errors, requests)."""
    page = browser.new_page(viewport={"width": 1800, "height": 1200})
    errors, requests = [], []
    page.on("pageerror", lambda error: errors.append(f"script error: {error}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("request", lambda request: requests.append(request.url))
    page.goto((folder / "report.html").as_uri())
    # (a selector, not wait_for_function: the page's Content-Security-Policy forbids the eval that one uses)
    page.wait_for_selector("body[data-ready='1'], #status.error", state="attached", timeout=30_000)
    return page, errors, requests


def app_text(page) -> str:
    """Everything the page shows (controls, tables, chart labels), without the packed scripts."""
    return page.evaluate("document.getElementById('app').textContent")


def hover_cell(page, div_id: str, row: int, col: int) -> str:
    """Move the mouse over heatmap cell (row, col) of a plotly chart; return the hover label's text."""
    page.evaluate("id => document.getElementById(id).scrollIntoView()", div_id)
    x, y = page.evaluate("""([id, r, c]) => {
        const gd = document.getElementById(id), L = gd._fullLayout;
        const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [box.left + L.xaxis.l2p(c), box.top + L.yaxis.l2p(r)]; }""", [div_id, row, col])
    page.mouse.move(x, y)
    label = page.wait_for_selector(f"#{div_id} .hoverlayer .hovertext", timeout=5_000)
    return label.text_content()


def grid_shape(page, div_id: str) -> tuple[int, int]:
    return tuple(page.evaluate("id => { const z = document.getElementById(id).data[0].z; "
                               "return [z.length, z[0].length]; }", div_id))


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def targets_of(name: str, results: dict) -> list[str]:
    if name == "001_comparison":
        return [p["target"] for m in results["models"] for p in m["prompts"]]
    if name == "004":
        return [visible_token(p[k]) for p in results["pairs"] for k in ("clean_answer_token", "corrupt_answer_token")]
    return [visible_token(p["target_token"]) for p in results["prompts"]]


@pytest.mark.parametrize("name", ["001", "001_comparison", "002", "003", "004"])
def test_page_renders_offline_with_no_script_errors(browser, folders, name):
    """The run's page: drawn, no script error, no request but the file, the prompts' targets shown."""
    folder = folders[name]
    html = (folder / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # the library and data are packed; no URL in the page
    page, errors, requests = open_page(browser, folder)
    assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("body")[:500]
    assert errors == []
    assert requests == [(folder / "report.html").as_uri()]  # the file itself, nothing from any network
    shown = app_text(page)
    for target in targets_of(name, results_of(folder)):
        assert target in shown, target
    page.close()


def test_001_grids_have_every_layer_and_hover_shows_the_top_tokens(browser, folders):
    results = results_of(folders["001"])
    page, errors, _ = open_page(browser, folders["001"])
    main = results["prompts"]  # a PROMPTS_FILE: every prompt is a main prompt
    assert all("raw_layers" in p for p in main)  # the other lens, for NORM and RAW side by side
    for lens in ("norm", "raw"):
        assert grid_shape(page, f"grid-{lens}") == (len(main), results["n_layers"] + 1)
    row, layer = 1, results["n_layers"] - 1
    text = hover_cell(page, "grid-norm", row, layer)
    record = main[row]["layers"][layer]
    assert f"layer {layer}" in text and f"p {record['target_prob']:.6f}" in text
    for token, prob in record["top_tokens"]:
        assert f"{visible_token(token)}  {prob:.6f}" in text, (token, text)
    # The cell shows the top-1 token in full, whitespace made visible.
    cell_text = page.evaluate("id => document.getElementById(id).data[0].text", "grid-norm")[row][layer]
    assert cell_text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == \
        visible_token(record["top_tokens"][0][0])
    assert errors == []
    page.close()


def test_002_attention_over_the_tokens_and_its_hover(browser, folders):
    results = results_of(folders["002"])
    page, errors, _ = open_page(browser, folders["002"])
    assert grid_shape(page, "subject-map") == (len(results["layers"]), results["n_heads"])
    page.select_option("#prompt-select", "1")
    page.select_option("#layer-select", "0")
    page.select_option("#head-select", "2")
    prompt = results["prompts"][1]
    bars = page.evaluate("() => document.getElementById('attention').data.map(t => [t.x, t.y])")
    heights = {x: y for xs, ys in bars for x, y in zip(xs, ys)}
    assert sorted(heights) == list(range(len(prompt["tokens"])))
    expected = prompt["layers"][0]["heads"][2]["final_row"]
    assert [heights[i] for i in range(len(expected))] == pytest.approx(expected, abs=1e-6)
    # Hover the last bar: its token and weight.
    last = len(prompt["tokens"]) - 1
    page.evaluate("() => document.getElementById('attention').scrollIntoView()")
    x, y = page.evaluate("""i => { const gd = document.getElementById('attention'), L = gd._fullLayout;
        const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [box.left + L.xaxis.l2p(i), box.top + L.yaxis.l2p(0.0) - 2]; }""", last)
    page.mouse.move(x, y)
    text = page.wait_for_selector("#attention .hoverlayer .hovertext", timeout=5_000).text_content()
    assert f"position {last}: {visible_token(prompt['tokens'][last])}" in text and f"{expected[last]:.6f}" in text
    assert errors == []
    page.close()


def test_003_dla_grid_and_hover(browser, folders):
    results = results_of(folders["003"])
    page, errors, _ = open_page(browser, folders["003"])
    assert grid_shape(page, "dla-heads") == (results["n_layers"], results["n_heads"])
    text = hover_cell(page, "dla-heads", 2, 1)
    assert "L2 H1" in text and f"{results['across_prompts']['mean_heads'][2][1]:.6f}" in text
    page.select_option("#prompt-select", "0")
    assert page.locator("#ablations tr").count() > 1  # the ablation table of that prompt
    assert errors == []
    page.close()


def test_004_grids_have_tokens_on_the_axes_and_every_site(browser, folders):
    results = results_of(folders["004"])
    page, errors, _ = open_page(browser, folders["004"])
    pair = results["pairs"][0]
    seq, n = len(pair["clean_tokens"]), results["n_layers"]
    assert grid_shape(page, "grid-exact") == (seq, n + 1) and grid_shape(page, "grid-attribution") == (seq, n + 1)
    text = hover_cell(page, "grid-exact", seq - 1, n)
    assert f"{seq - 1}: {visible_token(pair['clean_tokens'][-1])}" in text
    assert f"{pair['exact']['resid'][n][seq - 1]:.6f}" in text
    page.select_option("#site-select", "head_final")
    assert grid_shape(page, "grid-exact") == (n, results["n_heads"])
    page.select_option("#site-select", "trace_resid")
    assert grid_shape(page, "grid-exact") == (seq, n + 1)
    assert errors == []
    page.close()


def test_001_shows_a_tuned_lens_when_results_have_one(browser, folders, tmp_path):
    """Another lens per prompt (`tuned_layers`, same fields as `layers`) gets its own grid beside the others.
    Hand-made: the tuned lens is the NORM lens' numbers with p(target) halved, so the grid must differ."""
    results = results_of(folders["001"])
    for prompt in results["prompts"]:
        prompt["tuned_layers"] = [dict(layer, target_prob=layer["target_prob"] / 2) for layer in prompt["layers"]]
    html_report.write_page(RunFolder(tmp_path), results)
    page, errors, _ = open_page(browser, tmp_path)
    assert errors == []
    assert grid_shape(page, "grid-tuned") == (len(results["prompts"]), results["n_layers"] + 1)
    z = page.evaluate("() => document.getElementById('grid-tuned').data[0].z")
    for row, prompt in zip(z, results["prompts"]):  # the page rounds to 6 decimals, as the reports do
        assert row == pytest.approx([round(layer["target_prob"], 6) for layer in prompt["tuned_layers"]], abs=1e-12)
    page.close()


# ----------------------------------------------------------------------------- without a browser (runs everywhere)


def _unpack(html: str, element_id: str) -> str:
    packed = re.search(rf'<script id="{element_id}"[^>]*>([^<]*)</script>', html).group(1)
    return gzip.decompress(base64.b64decode(packed)).decode("utf-8")


def test_the_page_packs_plotly_and_the_data_and_names_no_url(tmp_path):
    results = {"experiment": "001_layers_and_logits", "model": "m", "n_layers": 1, "lens": "norm",
               "prompts": [{"prompt": "The capital of France is", "target_token": " Paris", "tokens": ["The", "\n"],
                            "format": "completion", "variant": 0, "probe": None,
                            "layers": [{"top_tokens": [[" Paris", 0.25], ["<b>", 0.125]], "target_prob": 0.25,
                                        "target_rank": 0, "entropy": 1.5, "kl_to_final": 0.1234567891}] * 2}]}
    path = html_report.write_page(RunFolder(tmp_path), results)
    html = path.read_text()
    assert "http://" not in html and "https://" not in html
    assert _unpack(html, "plotly-gz") == html_report.PLOTLY_FILE.read_text()
    data = json.loads(_unpack(html, "data-gz"))
    [prompt] = data["prompts"]
    assert prompt["target"] == "␣Paris" and prompt["tokens"] == ["The", "↵"]
    assert prompt["lenses"]["norm"]["top"][0] == [["␣Paris", 0.25], ["<b>", 0.125]]
    assert prompt["lenses"]["norm"]["kl"][0] == 0.123457  # the reports' 6 decimals


def test_visible_token():
    assert visible_token(" Paris") == "␣Paris" and visible_token("\n") == "↵" and visible_token("") == "∅"
    assert visible_token("a b\tc", spaces=False) == "a b⇥c" and visible_token("\x00") == "\\x00"
