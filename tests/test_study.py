"""
study.py, the D2C study on a dataset with a held-out split.

The plan is checked without running anything: what a seed changes in every row, that rows share
their settings, that score-based rows are scored by their own seed's full-data model, that every
evaluation is against the held-out split with a classifier trained on the train split. The
statistics are checked against a hand-computed paired t interval, the Fashion-MNIST reader
against a generated IDX file. Then the runner works for real on a user's class folder and
held-out folder of generated images (the "small" profile): pilot, selection and report, and a
second run computes nothing.
"""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import study  # noqa: E402


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


def plan_of(tmp_path, dataset="fashion-mnist", steps=400, **over):
    args = study.get_parser().parse_args(["selection", "--dataset", dataset, "--out", str(tmp_path / "out"),
                                          "--cells", str(tmp_path / "cells"), "--steps", str(steps)])
    args.profile, args.name = args.profile or dataset, dataset
    vars(args).update(over)
    return study.Plan(args)


def chain(cell):
    """(samples, run, dataset) behind one cell."""
    samples = cell.deps[0]
    run = samples.deps[0]
    return samples, run, run.deps[0]


# ----------------------------------------------------------------------------- the plan

def test_every_row_has_five_seeds_and_a_seed_sets_training_sampling_draw_scorer_and_scoring(tmp_path):
    R = study.Rows(plan_of(tmp_path))
    rows = R.selection(60)
    assert set(rows) == {"full data", "random", "min (easiest)", "max (hardest)", "medium", "K-Center", "herding",
                         "interval, span 0.7", "interval, span 1.0"}
    for name, (cells, real) in rows.items():
        assert len(cells) == 5
        for seed, cell in zip((0, 1, 2, 3, 4), cells):
            samples, run, data = chain(cell)
            assert flags(run.cmd("train.py"))["--global-seed"] == str(seed)
            assert flags(samples.cmd("sample.py"))["--global-seed"] == str(seed)
            if name == "random":
                assert flags(data.cmd("select_subset.py"))["--global-seed"] == str(seed)
            if name.startswith(("min", "max", "medium", "interval")):
                scored = data.deps[0]
                scorer = scored.deps[1]
                assert flags(scored.cmd("score.py"))["--global-seed"] == str(seed)
                assert flags(scorer.cmd("train.py"))["--global-seed"] == str(seed)
                assert scorer is R.full_run(seed)  # the full-data model of the same seed
        if name != "full data":
            assert len(real) == 5 and all(c.deps[0].key.startswith("real-") for c in real)


def test_kcenter_and_herding_pick_one_subset_from_the_pixels_that_every_seed_trains_on(tmp_path):
    rows = study.Rows(plan_of(tmp_path)).selection(60)
    for name in ("K-Center", "herding"):
        cells, real = rows[name]
        sets = {chain(c)[2].key for c in cells}
        assert len(sets) == 1 and len({c.key for c in real}) == 1
        select = flags(chain(cells[0])[2].cmd("select_subset.py"))
        assert "--features" not in select  # select_subset.py's default: the encoded images (pixels here)
        assert len({chain(c)[1].key for c in cells}) == 5  # yet five trainings
    assert len({chain(c)[2].key for c in rows["random"][0]}) == 5


def test_real_subset_fd_of_a_deterministic_row_is_its_one_subset_and_of_a_random_row_the_mean(tmp_path):
    class Cell:
        def __init__(self, key, seed, fd):
            self.key, self.path = key, str(tmp_path / f"{key}-{seed}.json")
            with open(self.path, "w") as f:
                json.dump({"seed": seed, "metrics": {"fd": fd}}, f)

        def done(self):
            return True
    one = Cell("kc", 0, 1.734)
    assert study.fmt_real([one] * 5) == "1.73 (one subset)"
    drawn = [Cell(f"r{s}", s, fd) for s, fd in enumerate((1.0, 2.0, 3.0))]
    assert study.fmt_real(drawn).startswith("2.00 ± 1.00 (n=3)")


def test_a_row_shows_mean_and_sample_std_and_one_seed_without_a_spread():
    assert study.fmt_row({0: 1.0, 1: 3.0}) == "2.00 ± 1.41 (n=2)"  # std with ddof 1: sqrt(2)
    assert study.fmt_row({3: 2.75}) == "2.75 (n=1)"
    assert study.fmt_row({}) == "not yet measured"


def test_selection_runs_the_floor_then_the_compared_rows_with_the_full_data_row_before_the_scored_rows(tmp_path):
    plan = plan_of(tmp_path)
    order = []
    for n in study.targets_of(plan, "selection"):
        row = re.split(r", seed |: real images", n.label)[0]
        if row not in order:
            order.append(row)
    assert order[:7] == ["real training images", "random", "full data", "interval, span 0.7", "K-Center", "herding",
                         "interval, span 1.0"]
    assert set(order[7:]) == {"min (easiest)", "max (hardest)", "medium"}


def test_selection_with_claims_only_runs_the_rows_a_claim_compares_and_leaves_the_others(tmp_path):
    rows = {re.split(r", seed |: real images", n.label)[0] for n in study.targets_of(plan_of(tmp_path, claims_only=True),
                                                                                  "selection")}
    assert rows == {"real training images", "random", "full data", "interval, span 0.7", "K-Center", "herding",
                    "interval, span 1.0"}


@pytest.mark.parametrize("table", ["selection", "attach"])
def test_a_trainings_earlier_checkpoints_are_sampled_right_after_its_own_cell(tmp_path, table):
    plan = plan_of(tmp_path, steps=3000)  # 4 points: checkpoints at 750, 1500, 2250 and 3000
    nodes = study.targets_of(plan, table)

    def ckpt(n):  # the checkpoint a cell samples, or None for a real-image cell
        npz = n.deps[0]
        return flags(npz.cmd("sample.py"))["--ckpt"] if npz.key.startswith("samples-") else None

    conv = {chain(c)[1].key for c in study.targets_of(plan, "convergence")}
    followed, seen = [], set()
    for i, n in enumerate(nodes):
        if n.key in seen:  # the full-data row of the second budget: its training is the first's
            continue
        seen.add(n.key)
        if ckpt(n) and ckpt(n).endswith("0003000.pt") and chain(n)[1].key in conv:
            run_dir = os.path.dirname(chain(n)[1].path)
            assert [ckpt(a) for a in nodes[i + 1:i + 4]] == [os.path.join(run_dir, f"{s:07d}.pt")
                                                             for s in (750, 1500, 2250)]
            followed.append(n)
    earlier = [n for n in nodes if ckpt(n) and not ckpt(n).endswith("0003000.pt")]
    assert len(earlier) == 3 * len(followed)  # no earlier checkpoint anywhere else
    # selection: full data, random, interval 0.7; attach: interval 0.7, D2C, random + both, random
    assert len(followed) == (15 if table == "selection" else 20)


def test_a_cell_measured_on_a_lost_cache_leaves_its_earlier_checkpoints_to_the_convergence_table(tmp_path):
    plan = plan_of(tmp_path, steps=3000)
    before = study.targets_of(plan, "selection")
    random0 = study.Rows(plan).selection(60)["random"][0][0]  # seed 0: its run is shared with convergence
    run_dir = os.path.dirname(chain(random0)[1].path)
    earlier = [os.path.join(run_dir, f"{s:07d}.pt") for s in (750, 1500, 2250)]

    def ckpts(nodes):
        return [flags(n.deps[0].cmd("sample.py"))["--ckpt"] for n in nodes if n.deps[0].key.startswith("samples-")]
    assert set(earlier) <= set(ckpts(before))
    os.makedirs(os.path.dirname(random0.path), exist_ok=True)
    open(random0.path, "w").write("{}")  # measured; the run's checkpoints are not in this cache
    after = study.targets_of(plan, "selection")
    assert not set(earlier) & set(ckpts(after))
    assert len(after) == len(before) - 3  # nothing else moved
    assert set(earlier) <= set(ckpts(study.targets_of(plan, "convergence")))
    os.makedirs(os.path.dirname(chain(random0)[1].path), exist_ok=True)
    open(chain(random0)[1].path, "w").write("")  # the run is back in the cache: sampled with the row again
    assert set(earlier) <= set(ckpts(study.targets_of(plan, "selection")))


def test_every_row_trains_and_samples_with_the_same_settings(tmp_path):
    R = study.Rows(plan_of(tmp_path))
    cells = [c for cells, _ in R.selection(60).values() for c in cells]
    cells += [c for cs in R.attach(60).values() for c in cs]
    train = {k: v for k, v in flags(chain(cells[0])[1].cmd("train.py")).items()}
    for cell in cells:
        samples, run, _ = chain(cell)
        f = flags(run.cmd("train.py"))
        for k in ("--model", "--global-batch-size", "--max-steps", "--lr", "--ema-decay", "--ckpt-every"):
            assert f[k] == train[k], k
        s = flags(samples.cmd("sample.py"))
        assert (s["--num-fid-samples"], s["--sampler"], s["--num-steps"], s["--cfg-scale"]) == ("2000", "heun-sit", "10",
                                                                                                 "1.5")
    assert train["--max-steps"] == "400"  # --steps, else the pilot's choice


def test_evaluation_is_against_the_heldout_split_with_a_classifier_trained_on_the_train_split(tmp_path):
    plan = plan_of(tmp_path)
    cell = study.Rows(plan).selection(60)["random"][0][0]
    clf = plan.classifier()
    assert clf in cell.deps
    f = flags(clf.cmd("fid.py"))
    assert f["--ref"] == plan.heldout_folder() and f["--classifier-data"] == plan.train_folder()
    assert f["--features"] == "classifier" and f["--classifier"] == clf.path
    assert plan.heldout_folder() != plan.train_folder()
    assert cell.path.startswith(str(tmp_path / "cells" / "fashion-mnist"))


def test_attach_rows_share_one_interval_subset_and_differ_only_in_their_flags(tmp_path):
    rows = study.Rows(plan_of(tmp_path)).attach(60)
    label, text, vis, both = (rows[k] for k in ("class label", "+ text (DC-Embedding)", "+ visual alignment",
                                                 "+ text + visual (D2C)"))
    for cells in zip(label, text, vis, both):
        runs = [chain(c)[1] for c in cells]
        assert len({chain(c)[2].key for c in cells}) == 1
        got = [(("--text-cond" in r.cmd("train.py")), ("--no-vis" not in r.cmd("train.py"))) for r in runs]
        assert got == [(False, False), (True, False), (False, True), (True, True)]
    rnd = rows["random + text + visual (attach without select)"]
    assert flags(chain(rnd[0])[2].cmd("select_subset.py"))["--method"] == "random"
    # the class-label row is the selection table's interval row: one piece of work
    assert label[0] is study.Rows(plan_of(tmp_path)).selection(60)["interval, span 0.7"][0][0] or \
        label[0].key == study.Rows(plan_of(tmp_path)).selection(60)["interval, span 0.7"][0][0].key


def test_convergence_rows_sample_the_selection_and_attach_tables_runs_at_earlier_checkpoints(tmp_path):
    R = study.Rows(plan_of(tmp_path))
    points, conv = R.convergence(60)
    sel, att = R.selection(60), R.attach(60)
    same = {"full data": sel["full data"][0], "random (IPC 60)": sel["random"][0],
            "D2C (IPC 60, interval 0.7 + text + visual)": att["+ text + visual (D2C)"],
            "select alone (interval 0.7, class label)": sel["interval, span 0.7"][0],
            "attach alone (random + text + visual)": att["random + text + visual (attach without select)"]}
    assert set(conv) == set(same)
    for name, per in conv.items():
        assert [c.key for c in per[-1]] == [c.key for c in same[name]]  # the last point is the table's own cell
        for cells in per[:-1]:  # an earlier point: the same run, another checkpoint
            assert [chain(c)[1].key for c in cells] == [chain(c)[1].key for c in same[name]]
            assert all(c.key not in {x.key for x in same[name]} for c in cells)


def test_several_tables_in_one_command_run_each_ones_pieces_in_turn_and_a_shared_piece_once(tmp_path):
    plan = plan_of(tmp_path, dataset="digits", steps=3000, jobs=1)  # digits: nothing to download
    done = []

    def make(node):  # instead of the stage scripts: the order, and an output that marks it done
        done.append(node.key)
        os.makedirs(node.path, exist_ok=True)
    plan.make = make
    first = study.Runner(plan).needed(study.targets_of(plan, "attach"))
    second = study.Runner(plan).needed(study.targets_of(plan, "convergence"))
    shared = set(first) & set(second)
    assert shared  # the D2C and attach-alone trainings and their earlier checkpoints
    study.run_tables(plan, ["attach", "convergence"])
    assert len(done) == len(set(done)) == len(set(first) | set(second))
    assert set(done[:len(first)]) == set(first)  # one slot: attach's pieces all before convergence's
    assert set(done[len(first):]) == set(second) - shared


def test_report_is_given_alone_or_says_so(capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["selection", "report", "--dataset", "digits"])
    assert str(e.value) == "error: report runs on its own: give it without the other tables"


@pytest.mark.parametrize("steps", [375, 400, 3000, 7])
def test_every_convergence_point_is_a_checkpoint_that_train_py_writes(tmp_path, steps):
    R = study.Rows(plan_of(tmp_path, steps=steps))
    points, rows = R.convergence(60)
    assert len(points) == R.points and points[-1] == steps
    for per in rows.values():
        for p, cells in zip(points, per):
            run = chain(cells[0])[1]
            f = flags(run.cmd("train.py"))
            every, last = int(f["--ckpt-every"]), int(f["--max-steps"])
            written = {s for s in range(1, last + 1) if s % every == 0 or s == last}  # train.py's saving rule
            assert p in written and flags(chain(cells[0])[0].cmd("sample.py"))["--ckpt"].endswith(f"{p:07d}.pt")


def test_budgets_are_about_one_and_five_percent_of_fashion_mnist():
    assert study.PROFILES["fashion-mnist"]["budgets"] == ((60, "1%"), (300, "5%"))  # 600 and 3,000 of 60,000


# ----------------------------------------------------------------------------- statistics

def test_dry_run_estimates_trainings_by_seconds_per_step_scorings_per_image_forward_and_other_work_by_its_median(
        tmp_path):
    plan = plan_of(tmp_path, dataset="digits", steps=40, profile="small")
    need = study.Runner(plan).needed(study.targets_of(plan, "selection")).values()
    runs = [n for n in need if n.key.startswith("run-")]
    samples = [n for n in need if n.key.startswith("samples-")]
    assert runs and samples and any(n.key.startswith("scored-") for n in need)
    os.makedirs(plan.cache, exist_ok=True)
    rec = [("run-a", "train 100 steps seed 0 on x", 50.0), ("run-b", "train 200 steps seed 1 on x", 80.0),
           ("run-c", "train 100 steps seed 2 on x", 70.0),  # 0.5 (run-a's last start; its log below), 0.4, 0.7
           ("samples-a", "sample", 10.0), ("samples-b", "sample", 30.0),  # median 20
           ("scored-a", "score", 99.0),  # 100 images x 20 forwards: 0.0495 s per image-forward
           ("scored-b", "score with x (kept scores)", 1.0)]  # a restore: not a measure of scoring
    with open(os.path.join(plan.cache, "times.jsonl"), "w") as f:
        for key, label, sec in rec:
            f.write(json.dumps({"key": key, "what": "node", "label": label, "seconds": sec}) + "\n")
    os.makedirs(os.path.join(plan.cells, "scores"), exist_ok=True)
    os.makedirs(plan.path("run-a"))  # run-a was stopped and resumed: 60 s + 40 s over its two starts, not 50
    with open(plan.path("run-a", "log.txt"), "w") as f:
        f.write("[2026-01-01 00:00:00] m: 1 parameters, vis\n[2026-01-01 00:01:00] saved\n"
                "[2026-01-01 00:05:00] m: 1 parameters, vis; resumed\n[2026-01-01 00:05:40] saved\n")
    for key in ("scored-a", "scored-b"):
        with open(os.path.join(plan.cells, "scores", key + ".json"), "w") as f:
            json.dump({"forwards_per_image": 20, "request": {"count": 100}}, f)
    scorings = [n for n in need if n.key.startswith("scored-")]
    assert study.estimate(plan, need)["scored"] == (len(scorings), None)  # the images to score not yet known
    link = [str(a) for a in scorings[0].cmds[0][0]]
    os.makedirs(link[link.index("--parent") + 1])
    with open(os.path.join(link[link.index("--parent") + 1], "meta.json"), "w") as f:
        json.dump({"count": 1437}, f)  # the parent encoded: every scoring of this table scores all of it
    est = study.estimate(plan, need)
    steps = sum(int(flags(n.cmd("train.py"))["--max-steps"]) for n in runs)
    assert est["run"] == (len(runs), pytest.approx(0.7 * steps))  # 1.0 (all its starts), 0.4, 0.7: median 0.7
    assert est["samples"] == (len(samples), pytest.approx(20.0 * len(samples)))
    # 1437 images x 20 forwards (10 timesteps, antithetic) x 0.0495 s each
    assert est["scored"] == (len(scorings), pytest.approx(len(scorings) * 1437 * 20 * 0.0495))


def test_a_training_stopped_and_resumed_counts_the_seconds_of_all_its_starts(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "[2026-01-01 00:00:00] SiT-T/4 on d: 600 images, latents (1, 16, 16), 8,893,392 parameters, vis=True\n"
        "[2026-01-01 00:10:00] step 0000750 loss 0.3\n"
        "[2026-01-01 00:12:30] saved d/checkpoints/0000750.pt\n"          # stopped 20 min later, redone
        "Traceback (most recent call last):\n[0, 1] a logged message's own second line\n"
        "[2026-01-01 01:00:00] SiT-T/4 on d: 600 images, latents (1, 16, 16), 8,893,392 parameters, vis=True; "
        "resumed from d/checkpoints/0000750.pt at step 750\n"
        "[2026-01-01 01:40:00] step 0003000 loss 0.2\n")
    assert study.train_seconds(str(log)) == (12 * 60 + 30) + 40 * 60
    assert study.train_seconds(str(tmp_path / "absent.txt")) == 0


def test_dry_run_on_a_new_machine_estimates_trainings_and_samplings_from_the_committed_cells(tmp_path):
    plan = plan_of(tmp_path, dataset="digits", steps=40, profile="small")
    need = study.Runner(plan).needed(study.targets_of(plan, "selection")).values()
    runs = [n for n in need if n.key.startswith("run-")]
    samples = [n for n in need if n.key.startswith("samples-")]
    assert study.estimate(plan, need)["run"] == (len(runs), None)  # no cache, no cells: nothing to go by
    os.makedirs(plan.cells)
    cells = [({"run": 300.0, "samples": 12.0}, {"steps": 1000}),  # 0.3 s per step
             ({"run": 500.0, "samples": 20.0}, {"steps": 1000}),  # 0.5
             ({"run": 400.0, "samples": 16.0}, {"steps": 1000}),  # 0.4: median 0.4 s per step, 16 s a sampling
             ({"run": 9000.0}, {"steps": 1000, "vis": True})]  # visual alignment: its own group
    for i, (sec, spec) in enumerate(cells):
        with open(os.path.join(plan.cells, f"cell-{i}.json"), "w") as f:
            json.dump({"seconds": sec, "settings": spec}, f)
    est = study.estimate(plan, need)
    steps = sum(int(flags(n.cmd("train.py"))["--max-steps"]) for n in runs)
    assert est["run"] == (len(runs), pytest.approx(0.4 * steps))
    assert est["samples"] == (len(samples), pytest.approx(16.0 * len(samples)))
    os.makedirs(plan.cache)
    with open(os.path.join(plan.cache, "times.jsonl"), "w") as f:  # this machine's own measure comes first
        f.write(json.dumps({"key": "run-a", "what": "node", "label": "train 100 steps seed 0", "seconds": 10.0}) + "\n")
    assert study.estimate(plan, need)["run"] == (len(runs), pytest.approx(0.1 * steps))


def test_a_difference_is_judged_only_over_five_shared_seeds():
    a = {s: 1.0 + 0.01 * s for s in range(5)}
    b = {s: 2.0 for s in range(5)}  # a is lower by ~1 on every seed: the interval excludes 0 from n = 2 on
    two = study.paired({s: a[s] for s in (0, 1)}, b)
    assert two["verdict"] == "lower" and study.word(two) == "not judged yet (n < 5)"
    assert study.word(study.paired(a, b)) == "**lower FD**"


def test_the_verdict_table_shows_a_one_seed_difference_unjudged_and_says_not_measured_only_without_a_seed():
    assert study.verdict_cell(None) == "not yet measured"
    assert study.verdict_cell(study.paired({}, {0: 1.0})) == "not yet measured"
    one = study.verdict_cell(study.paired({0: 0.78}, {0: 0.83, 1: 0.9}))  # seed 1 has no partner yet
    assert one == "not judged yet: ΔFD -0.05 (n=1)"
    a, b = {s: 1.0 + 0.01 * s for s in range(5)}, {s: 2.0 for s in range(5)}
    assert study.verdict_cell(study.paired(a, b)).startswith("holds: ΔFD -0.98 [")
    assert study.verdict_cell(study.paired(b, a)).startswith("does not hold: ΔFD +0.98 [")


def test_the_verdict_table_has_a_column_per_budget_and_a_dash_where_a_budget_runs_no_such_table():
    a, b = {s: 1.0 + 0.1 * s for s in range(5)}, {s: 2.0 + 0.05 * s for s in range(5)}  # d = -1 + 0.05 s
    first = {c[0]: study.paired(a, b) for c in study.CLAIMS}
    second = {c[0]: study.paired(b, a) for c in study.CLAIMS if c[1] == "selection"}
    V = study.verdict_lines({"x (IPC 7, ~5%)": first, "x (IPC 14, ~10%)": second})
    assert V[0] == "| claim (paper) | x (IPC 7, ~5%) | x (IPC 14, ~10%) |"
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in V[2:2 + len(study.CLAIMS)]}
    assert len(rows) == len(study.CLAIMS)
    assert rows["Select beats random"][0].startswith("holds: ΔFD -0.90 [")
    assert rows["Select beats random"][1].startswith("does not hold: ΔFD +0.90 [")
    assert rows["+ text helps (DC-Embedding)"][1] == "-"  # attach runs at the smallest budget only
    assert rows["D2C converges faster than random (first checkpoint)"][1] == "-"
    assert V[-1].endswith("(Holm, family-wise 5%): x (IPC 7, ~5%): 13 of 13, x (IPC 14, ~10%): 4 of 4.")
    c = {s: 1.0 + 0.1 * s for s in range(5)}
    weak = [study.paired(c, {s: c[s] + d[s] for s in range(5)}) for d in ((0.3, 0.1, 0.1, 0.2, 0.05),
                                                                          (0.3, 0.05, 0.15, 0.2, 0.05))]
    assert [round(w["p"], 3) for w in weak] == [0.028, 0.034] and all(w["verdict"] == "lower" for w in weak)
    # 11 near-certain claims pass; then 0.028 > 0.05 / 2 stops it: both weak ones lose their call
    V = study.verdict_lines({"x (IPC 7, ~5%)": {**first, "both together help": weak[0], "both beat text alone": weak[1]}})
    assert V[-1].endswith("x (IPC 7, ~5%): 11 of 13 (not: both together help; both beat text alone).")


def test_a_dataset_whose_pilot_is_unfinished_shows_every_claim_not_yet_measured(tmp_path):
    plan = plan_of(tmp_path, dataset="digits")
    plan.args.steps = None  # and no pilot cells: no training length yet
    _, cols = study.report_dataset(plan)
    assert list(cols) == ["IPC 7, ~5%", "IPC 14, ~10%"]
    V = study.verdict_lines({f"digits ({k})": v for k, v in cols.items()})
    rows = [line.strip("| ").split(" | ")[1:] for line in V[2:2 + len(study.CLAIMS)]]
    assert all(r[0] == "not yet measured" for r in rows)
    assert [r[1] for r in rows] == ["not yet measured" if c[1] == "selection" else "-" for c in study.CLAIMS]


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 10.0, 1: 12.0, 2: 11.0, 3: 13.0, 4: 9.0}
    b = {0: 11.0, 1: 14.0, 2: 11.5, 3: 15.0, 4: 10.0, 7: 99.0}  # seed 7 has no partner: left out
    # d = -1, -2, -0.5, -2, -1: mean -1.3, sd = sqrt(((.3)^2 + (.7)^2 + (.8)^2 + (.7)^2 + (.3)^2) / 4)
    sd = np.sqrt((0.09 + 0.49 + 0.64 + 0.49 + 0.09) / 4)
    half = 2.7764451051977987 * sd / np.sqrt(5)  # t(0.975, df 4)
    c = study.paired(a, b)
    assert c["n"] == 5 and c["mean"] == pytest.approx(-1.3)
    assert (c["lo"], c["hi"]) == (pytest.approx(-1.3 - half), pytest.approx(-1.3 + half))
    assert c["verdict"] == "lower"
    assert study.paired({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})["verdict"] == "can't tell"  # d = -1, +1
    assert study.paired({0: 1.0}, {0: 2.0})["verdict"] == "can't tell"
    from scipy.stats import ttest_rel  # the paired t test's p: below 0.05 exactly when the interval excludes 0
    assert c["p"] == pytest.approx(ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue)


def test_holm_holds_the_ith_smallest_p_against_alpha_over_the_tests_left_and_stops_at_the_first_failure():
    p = lambda **kw: {k: {"p": v} for k, v in kw.items()}  # noqa: E731
    # m = 4: 0.01 <= 0.05/4; 0.02 > 0.05/3, so 0.03 is not called either, though 0.03 < 0.05/2
    assert study.holm(p(a=0.01, b=0.02, c=0.03, d=0.2)) == {"a"}
    assert study.holm(p(a=0.04, b=0.001, c=0.01)) == {"a", "b", "c"}  # 0.001 <= .05/3, 0.01 <= .05/2, 0.04 <= .05
    assert study.holm(p(a=0.04, b=0.03)) == set()  # 0.03 > 0.05/2
    assert study.holm({}) == set()



def test_an_interval_bound_near_zero_is_printed_with_the_digit_that_shows_its_side_of_zero():
    c = {"n": 5, "mean": -0.0398, "lo": -0.0840, "hi": 0.0044}  # can't tell: the interval holds 0
    assert study.fmt_pair(c) == "-0.04 [-0.08, +0.004] (n=5)"
    assert study.fmt_pair({**c, "hi": -0.0044}) == "-0.04 [-0.08, -0.004] (n=5)"
    assert study.fmt_pair({**c, "lo": -1.234, "hi": 0.5}) == "-0.04 [-1.23, +0.50] (n=5)"

# ----------------------------------------------------------------------------- Fashion-MNIST

def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_official_idx_layout(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for split, (im, lb) in study.IDX.items():
        images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
        write_idx(tmp_path / im, images)
        write_idx(tmp_path / lb, labels)
        want[split] = images, labels
    got = study.fashion_mnist(str(tmp_path))
    for split in want:
        assert np.array_equal(got[split][0], want[split][0]) and np.array_equal(got[split][1], want[split][1])


def test_missing_fashion_mnist_names_both_sources(tmp_path):
    with pytest.raises(SystemExit) as e:
        study.fashion_mnist(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "github.com/zalandoresearch/fashion-mnist" in msg


# ----------------------------------------------------------------------------- a user's folders, for real

def shapes(root, per_class, seed):
    """Class folders of 16 px grayscale images: a disc, a square, stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    for c in ("disc", "square", "stripes"):
        os.makedirs(root / c)
        for i in range(per_class):
            cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 5)
            mask = {"disc": (yy - cy) ** 2 + (xx - cx) ** 2 < r * r, "square": (abs(yy - cy) < r) & (abs(xx - cx) < r),
                    "stripes": (yy // int(rng.integers(2, 4))) % 2 == 0}[c]
            img = np.where(mask, rng.integers(150, 256), rng.integers(0, 60)).astype(np.uint8)
            Image.fromarray(img, "L").save(root / c / f"{i:03d}.png")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    shapes(root / "train", 10, 0)
    shapes(root / "heldout", 6, 1)
    base = [sys.executable, "study.py", "--dataset", str(root / "train"), "--heldout", str(root / "heldout"),
            "--profile", "small", "--out", str(root / "out"), "--cells", str(root / "cells"), "--jobs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = {}
    for table in ("pilot", "selection", "selection"):
        r = subprocess.run(base[:2] + [table] + base[2:], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs.setdefault(table, []).append(r.stdout)
    return dict(root=root, runs=runs, cells=root / "cells" / "train-small")


def test_the_runner_evaluates_every_cell_on_the_heldout_split_and_stores_it(user):
    cells = [json.load(open(user["cells"] / f)) for f in os.listdir(user["cells"]) if f.startswith("cell-")]
    assert cells and all(c["metrics"]["fd"] is not None and c["commit"] for c in cells)
    assert all("classifier" in str(c["metrics"]["features"]) for c in cells)
    seeds = {c["seed"] for c in cells}
    assert seeds == {0, 1}
    with open(user["cells"] / "dataset.json") as f:  # what the report needs to rebuild the plan
        assert json.load(f)["heldout"] == str(user["root"] / "heldout")


def test_a_second_run_computes_nothing(user):
    assert "pieces of work" not in user["runs"]["selection"][1]
    assert "0 pieces computed" in user["runs"]["selection"][1]


def test_the_report_shows_each_rows_mean_fd_over_its_stored_cells_and_the_paired_claims(user):
    root = user["root"]
    args = study.get_parser().parse_args(["report", "--dataset", str(root / "train"), "--heldout", str(root / "heldout"),
                                          "--profile", "small", "--out", str(root / "out"), "--cells", str(root / "cells")])
    args.name = "train-small"
    lines, cols = study.report_dataset(study.Plan(args))
    assert list(cols) == ["IPC 3, ~30%"]  # 3 of the 10 training images of each class
    claims = cols["IPC 3, ~30%"]
    fd = {}
    for f in user["cells"].glob("cell-*.json"):
        c = json.load(open(f))
        s = c["settings"]
        if not s.get("real") and s["row"] in ("random", "interval, span 0.7"):
            fd.setdefault(s["row"], {})[c["seed"]] = c["metrics"]["fd"]
    assert set(fd) == {"random", "interval, span 0.7"}
    for row, v in fd.items():
        x = np.array(list(v.values()))
        want = f"| {row} | {x.mean():.2f} ± {x.std(ddof=1):.2f} (n={len(x)}) |"
        assert any(line.startswith(want) for line in lines), (want, [ln for ln in lines if ln.startswith(f"| {row}")])
    d = [fd["interval, span 0.7"][s] - fd["random"][s] for s in (0, 1)]
    assert claims["Select beats random"]["mean"] == pytest.approx(np.mean(d))
    assert claims["Select beats random"]["n"] == 2


def test_kept_scores_rebuild_a_scoring_on_a_new_machine_without_training_its_scorer(user):
    # last in this file: it changes the shared cache
    import shutil
    cache, kept = user["root"] / "out" / "cache", user["cells"] / "scores"
    scored = sorted(p.name for p in cache.iterdir() if p.name.startswith("scored-") and p.is_dir())
    assert scored and sorted(p.stem for p in kept.glob("*.npy")) == scored
    before = {k: np.load(cache / k / "scores.npy") for k in scored}
    for k in scored:
        assert np.array_equal(np.load(kept / f"{k}.npy"), before[k])
    # a new machine: the scorings, the trainings and the subsets chosen from the scores are gone
    for p in cache.iterdir():
        if p.name.startswith(("scored-", "run-", "set-", "samples-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for c in user["cells"].glob("cell-*.json"):
        if json.load(open(c))["settings"]["row"].startswith("interval"):
            c.unlink()
    base = [sys.executable, "study.py", "selection", "--dataset", str(user["root"] / "train"), "--heldout",
            str(user["root"] / "heldout"), "--profile", "small", "--out", str(user["root"] / "out"), "--cells",
            str(user["root"] / "cells"), "--jobs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trained = [line for line in r.stdout.splitlines() if "] train " in line]
    assert all("full data" not in line and "encode the train split" not in line for line in trained), trained
    assert r.stdout.count("(kept scores)") >= len(scored)
    for k in scored:
        assert np.array_equal(np.load(cache / k / "scores.npy"), before[k])
