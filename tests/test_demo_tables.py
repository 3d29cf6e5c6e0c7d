"""
demo_tables.py, the paper's tables in miniature (bash demo.sh tables | span | scorer).

The plan of the full size is checked without running anything: which stage command lines each
table cell runs, that every row of a table shares its settings, that a cell has three seeds and
what a seed changes, and which cells the tables share. The reduced size (D2C_DEMO_SMALL=1) then
runs for real, through demo.sh: the tables' structure, and that a second run (and the span and
scorer studies, which share cells with the tables) recompute nothing they can reuse.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo_tables as dt  # noqa: E402

PAPER_METHODS = {"random", "min", "max", "medium", "kcenter", "herding", "interval"}


def flags(cmd):
    """[script, --flag, value, --switch, ...] -> {--flag: value as str, --switch: True}."""
    out, i = {}, 1
    while i < len(cmd):
        if i + 1 < len(cmd) and not str(cmd[i + 1]).startswith("--"):
            out[cmd[i]] = str(cmd[i + 1])
            i += 2
        else:
            out[cmd[i]] = True
            i += 1
    return out


def chain(cell):
    """(eval, samples, run, dataset) nodes behind one cell."""
    samples = cell.deps[0]
    run = samples.deps[0]
    return cell, samples, run, run.deps[0]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    plan = dt.Plan(str(tmp_path_factory.mktemp("plan")), "full", 2)
    return plan, dt.tables_plan(plan)


def rows_of(t):
    """Every (table, row name, cells) of the tables."""
    rows = [("selection", n, c) for n, _, c in t["selection"]] + [("attach", n, c) for n, _, c in t["attach"]]
    for ipc, _, rc, _, dc in t["budget"]:
        rows += [("budget", f"random {ipc}", rc), ("budget", f"d2c {ipc}", dc)]
    steps, conv = t["convergence"]
    rows += [("convergence", f"{name} {s}", cells) for name, per in conv.items() for s, cells in zip(steps, per)]
    return rows


# ----------------------------------------------------------------------------- the plan of the full size

def test_every_cell_is_three_or_more_seeds_and_a_seed_sets_training_sampling_and_the_random_draw(full):
    plan, t = full
    for table, name, cells in rows_of(t):
        seeds = [int(flags(chain(c)[2].cmd("train.py"))["--global-seed"]) for c in cells]
        assert len(cells) >= 3 and len(set(seeds)) == len(seeds), (table, name)
        for c, seed in zip(cells, seeds):
            _, samples, run, data = chain(c)
            assert int(flags(samples.cmd("sample.py"))["--global-seed"]) == seed
            if data.key.startswith("set-") and flags(data.cmd("select_subset.py"))["--method"] == "random":
                assert int(flags(data.cmd("select_subset.py"))["--global-seed"]) == seed


def test_every_row_trains_and_samples_with_the_same_settings(full):
    plan, t = full
    train_keys = ("--model", "--global-batch-size", "--max-steps", "--lr", "--ema-decay", "--ckpt-every")
    sample_keys = ("--num-fid-samples", "--sampler", "--num-steps", "--cfg-scale", "--class-balanced")
    trains, samples, steps = set(), set(), set()
    for _, _, cells in rows_of(t):
        for c in cells:
            _, smp, run, _ = chain(c)
            f = flags(run.cmd("train.py"))
            trains.add(tuple(f[k] for k in train_keys))
            s = flags(smp.cmd("sample.py"))
            samples.add(tuple(s[k] for k in sample_keys))
            steps.add(int(os.path.basename(s["--ckpt"])[:-3]))
    assert trains == {("SiT-T/4", "128", str(dt.SIZES["full"]["steps"]), "0.001", "0.98",
                       str(dt.SIZES["full"]["steps"] // 4))}
    assert len(samples) == 1
    assert len(steps) >= 4 and max(steps) == dt.SIZES["full"]["steps"]   # the convergence points


def test_selection_rows_are_the_papers_strategies_at_one_ipc_with_class_labels_only(full):
    plan, t = full
    names = [n for n, _, _ in t["selection"]]
    assert names[0] == "full data" and len(names) == 8
    methods, ipcs = set(), set()
    for name, _, cells in t["selection"][1:]:
        for c in cells:
            _, _, run, data = chain(c)
            sel = flags(data.cmd("select_subset.py"))
            methods.add(sel["--method"])
            ipcs.add(sel["--ipc"])
            if sel["--method"] == "interval":
                assert (sel["--k"], sel["--span"]) == ("auto", "0.7")
            train = flags(run.cmd("train.py"))
            assert "--text-cond" not in train and train["--no-vis"] is True
    assert methods == PAPER_METHODS and ipcs == {"18"}
    full_runs = [chain(c)[2] for c in t["selection"][0][2]]
    assert all(run.deps[0] is t["parent"] for run in full_runs)


def test_attach_rows_share_one_interval_subset_and_differ_only_in_the_text_and_visual_flags(full):
    plan, t = full
    want = {"class label": (False, True), "+ text (DC-Embedding)": (True, True), "+ visual alignment": (False, False),
            "+ text + visual (D2C)": (True, False)}
    datasets = set()
    for name, _, cells in t["attach"]:
        for c in cells:
            _, _, run, data = chain(c)
            f = flags(run.cmd("train.py"))
            assert ("--text-cond" in f, "--no-vis" in f) == want[name]
            datasets.add(data.key)
    assert len(datasets) == 1 and set(want) == {n for n, _, _ in t["attach"]}
    # the class-label row is the interval row of the selection table: the same cells
    assert t["attach"][0][2] == next(c for n, _, c in t["selection"] if n.startswith("interval"))


def test_visual_tokens_come_from_the_digits_mae_through_attach_vis_features(full):
    plan, t = full
    interval = chain(t["attach"][0][2][0])[3]
    attach = flags(interval.cmd("attach.py"))
    vis = next(d for d in interval.deps if d.key.startswith("vis-"))
    assert attach["--vis-features"] == vis.path and attach["--vis-tokens"] == "4"
    mae = flags(vis.cmd("demo.py"))
    assert vis.cmd("demo.py")[1] == "vis-features" and mae["--data-path"] == os.path.dirname(t["parent"].path)
    assert mae["--seed"] != "0"                       # the digits CNN (the FD's features) uses seed 0
    assert attach["--text-encoder"].endswith("model") and attach["--prompt"] == "a handwritten digit {}"


def test_the_mae_tokens_need_no_labels_one_token_per_quarter(tmp_path):
    """vis-features reads the pixels alone: it runs on a dataset directory without labels.npy."""
    from sklearn.datasets import load_digits
    images = load_digits().images[:50] / 16 * 2 - 1
    os.makedirs(tmp_path / "data")
    np.save(tmp_path / "data" / "latents.npy", np.repeat(images[:, None], 3, 1).astype(np.float16))
    r = subprocess.run([sys.executable, "demo.py", "vis-features", "--data-path", str(tmp_path / "data"), "--out",
                        str(tmp_path / "tokens.npy"), "--epochs", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tokens = np.load(tmp_path / "tokens.npy")
    assert tokens.dtype == np.float32 and tokens.shape == (50, 4, 64) and np.isfinite(tokens).all()


def test_budgets_are_about_5_10_and_25_percent_of_a_class_random_against_d2c(full):
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target).mean()
    plan, t = full
    shares = [ipc / per_class for ipc, *_ in t["budget"]]
    np.testing.assert_allclose(shares, [0.05, 0.10, 0.25], atol=0.01)
    for ipc, rnd, rc, d2c, dc in t["budget"]:
        assert all(flags(s.cmd("select_subset.py"))["--method"] == "random" for s in rnd)
        assert flags(d2c.cmd("select_subset.py"))["--method"] == "interval"
        for c in rc:
            f = flags(chain(c)[2].cmd("train.py"))
            assert "--text-cond" not in f and "--no-vis" in f
        for c in dc:
            f = flags(chain(c)[2].cmd("train.py"))
            assert "--text-cond" in f and "--no-vis" not in f


def test_cells_that_several_tables_show_are_one_piece_of_work(full):
    plan, t = full
    steps, conv = t["convergence"]
    d2c_final = [per[-1] for name, per in conv.items() if name.startswith("D2C")][0]
    both = next(c for n, _, c in t["attach"] if n.startswith("+ text + visual"))
    budget = next(dc for ipc, _, _, _, dc in t["budget"] if ipc == plan.z["ipc"])
    assert d2c_final == both == budget
    random_sel = next(c for n, _, c in t["selection"] if n == "random")
    assert [per[-1] for name, per in conv.items() if name.startswith("random")][0] == random_sel
    assert conv["full data"][-1] == t["selection"][0][2]
    # the scorer is the full-data model of seed 0
    assert chain(t["selection"][0][2][0])[2] in t["scored"].deps
    runs = [n for n in plan.nodes.values() if n.key.startswith("run-")]
    # selection 8 rows + attach 3 more + budget 2 x 2 more, 3 seeds each
    assert len(runs) == (8 + 3 + 4) * 3


def test_keys_name_the_settings_and_everything_upstream(tmp_path):
    a, b = dt.Plan(str(tmp_path), "full", 2), dt.Plan(str(tmp_path), "full", 1)
    assert dt.tables_plan(a)["targets"][0].key == dt.tables_plan(b)["targets"][0].key   # jobs change no result
    c = dt.Plan(str(tmp_path), "full", 2)
    c.z = {**c.z, "lr": 2e-3}
    ca, cc = dt.tables_plan(a), dt.tables_plan(c)
    run_a, run_c = chain(ca["targets"][0])[2], chain(cc["targets"][0])[2]
    assert run_a.key != run_c.key and ca["parent"].key == cc["parent"].key


# ----------------------------------------------------------------------------- statistics

def test_stats_are_the_mean_and_the_sample_standard_deviation():
    s = dt.stats([30.0, 34.0, 41.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(35.0)
    assert s["std"] == pytest.approx(np.std([30.0, 34.0, 41.0], ddof=1))


def test_a_difference_counts_only_beyond_the_sum_of_the_spreads():
    a, b = {"mean": 40.0, "std": 2.0}, {"mean": 45.0, "std": 2.5}
    assert dt.beyond_spread(a, b)                                     # 5 > 4.5
    assert not dt.beyond_spread(a, {"mean": 44.0, "std": 2.5})        # 4 < 4.5
    assert dt.compare({"fd": a}, {"fd": b})["verdict"] == "lower FD"


# ----------------------------------------------------------------------------- the reduced size, for real

def demo(out, mode):
    env = {**os.environ, "D2C_DEMO_SMALL": "1", "D2C_DEMO_OUT": str(out), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "demo.sh", mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"demo.sh {mode} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    with open(os.path.join(out, f"{mode}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("tables") / "demo"
    first = demo(out, "tables")
    with open(out / "tables.md") as f:
        md = f.read()
    again = demo(out, "tables")
    return out, first, md, again


def test_tables_md_holds_every_table_with_its_rows(small):
    out, res, md, _ = small
    z = dt.SIZES["small"]
    for heading in (f"## Selection strategies (IPC {z['ipc']}", "## Attach ablation", "## Budget: random vs D2C",
                    "## Convergence"):
        assert heading in md
    n = len(z["seeds"])
    for name in ["full data"] + [dt.METHOD_NAMES[m] for m in z["methods"]] + [dt.ATTACH_NAMES[a] for a in z["attach_rows"]]:
        assert f"| {name} |" in md and f"(n={n})" in md
    assert md.count("Measured: ") == 4 and md.count("Paper") >= 4
    assert dt.VIS_ENCODER in md
    for path in res["grids"].values():   # 10 rows of 10 digits of 8x8 px, a 1 px gap, upscaled 4x
        assert Image.open(os.path.join(out, path)).size == (360, 360)


def test_tables_json_cells_are_per_seed_values_with_their_statistics(small):
    _, res, _, _ = small
    n = len(dt.SIZES["small"]["seeds"])
    rows = res["selection"]["rows"] + res["attach"]["rows"]
    rows += [r[k] for r in res["budget"]["rows"] for k in ("random", "d2c")]
    for r in rows:
        for metric in ("fd", "precision", "recall", "accuracy"):
            s = r[metric]
            assert s["n"] == n == len(s["values"]) and np.isfinite(s["values"]).all()
            assert s["mean"] == pytest.approx(np.mean(s["values"]))
    conv = res["convergence"]
    assert conv["steps"] == [2, 4] and all(len(per) == 2 for per in conv["rows"].values())
    img = Image.open(os.path.join(small[0], "convergence.png"))
    assert img.format == "PNG" and img.size[0] >= 600


def test_a_second_run_computes_nothing_and_writes_the_same_tables(small):
    _, first, _, again = small
    assert first["run"]["num_computed"] > 0 and again["run"]["num_computed"] == 0
    strip = lambda r: {k: v for k, v in r.items() if k != "run"}  # noqa: E731
    assert strip(again) == strip(first)


def test_the_span_study_reuses_the_tables_cells_and_runs_only_new_spans(small):
    out = small[0]
    res = demo(out, "span")
    z = dt.SIZES["small"]
    new_spans = [s for s in z["spans"] if s != z["span"]]
    # per new span: select + attach, then a run, samples and evaluation per seed
    assert res["run"]["num_computed"] == len(new_spans) * (1 + 3 * len(z["seeds"]))
    assert [r["span"] for r in res["budgets"][0]["rows"]] == list(z["spans"])
    assert os.path.exists(out / "span.png") and "## IPC" in open(out / "span.md").read()


def test_the_scorer_study_reuses_the_full_scorer_and_reports_compute_shares(small):
    out = small[0]
    res = demo(out, "scorer")
    z = dt.SIZES["small"]
    assert [r["name"] for r in res["rows"]][-1].startswith(z["small_scorer"])
    for r in res["rows"]:
        assert r["fd"]["n"] == len(z["seeds"]) and 0 < r["compute_share"] < 1
    # new: the small scorer's run, its scored copy, its subset and 3 pieces per seed
    assert res["run"]["num_computed"] == 3 + 3 * len(z["seeds"])


def test_the_default_demo_keeps_the_tables_cache(tmp_path):
    """demo.sh (no mode) starts its own outputs afresh but leaves OUT/cache and the tables alone."""
    out = tmp_path / "demo"
    (out / "cache").mkdir(parents=True)
    for name in (".d2c_demo", "cache/keep", "tables.md", "results.md"):
        (out / name).write_text("x")
    env = {**os.environ, "D2C_DEMO_OUT": str(out), "PYTHON": "false"}   # stops at the first python call
    subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (out / "cache" / "keep").exists() and (out / "tables.md").exists()
    assert not (out / "results.md").exists()
