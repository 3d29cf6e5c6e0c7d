"""select_subset.py: each method against hand-computed indices or a brute-force reference."""
import json
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402
import select_subset as ss  # noqa: E402

# Tiny case: 24 rows, class 0 on even rows, class 1 on odd rows. Within class c, item j (row
# 2j + c) has rank PERM[c][j] among its class (score 0.5 + 0.1 * rank), so sorted ascending:
#   class 0: rows  4 14  8 18 12  0 22  6 20 10 16  2
#   class 1: rows  3 11 19  1 15 23  9 21  5 13 17  7
PERM = ([5, 11, 0, 7, 2, 9, 4, 1, 10, 3, 8, 6], [3, 0, 8, 11, 6, 1, 9, 4, 10, 2, 7, 5])
LABELS = np.array([0, 1] * 12, dtype=np.int64)
SCORES = np.zeros(24, dtype=np.float32)
SCORES[0::2] = 0.5 + 0.1 * np.array(PERM[0])
SCORES[1::2] = 0.5 + 0.1 * np.array(PERM[1])

# Uneven case: class 0 = rows 0..11 with scores falling with the row (sorted: 11, 10, ..., 0),
# class 1 = rows 12..18 (7 images) sorted: 13 17 15 18 14 12 16.
UNEVEN_LABELS = np.array([0] * 12 + [1] * 7, dtype=np.int64)
UNEVEN_SCORES = np.array([12 - i for i in range(12)] + [0.6, 0.1, 0.5, 0.3, 0.7, 0.2, 0.4], dtype=np.float32)


def pick(method, ipc, labels=LABELS, scores=SCORES, **kw):
    return ss.select(labels, int(labels.max()) + 1, method, ipc, scores=scores, **kw)


# ----------------------------------------------------------------------------- score-based methods

def test_interval_takes_sorted_positions_0_k_2k():
    idx, info = pick("interval", 3, k=4)  # positions 0, 4, 8
    assert idx.tolist() == [3, 4, 5, 12, 15, 20]
    assert idx.dtype == np.int64 and info == {"k_used": {}, "short_classes": {}}


def test_interval_shrinks_k_to_the_largest_that_still_gives_ipc_images():
    idx, info = pick("interval", 3, k=6)  # 2 * 6 = 12 is past the end of 12; k' = 5: positions 0, 5, 10
    assert idx.tolist() == [0, 3, 4, 16, 17, 23]
    assert info["k_used"] == {0: 5, 1: 5}
    # per class: 12 images keep k = 4, the 7-image class gets k' = 3 (positions 0, 3, 6)
    idx, info = pick("interval", 3, UNEVEN_LABELS, UNEVEN_SCORES, k=4)
    assert idx.tolist() == [3, 7, 11, 13, 16, 18]
    assert info["k_used"] == {1: 3}


def test_interval_step_policy_closed_form():
    for n in range(1, 40):
        for ipc in range(1, n + 1):
            for k in range(1, 15):
                kk = ss.interval_step(n, ipc, k)
                brute = max(j for j in range(1, k + 1) if (ipc - 1) * j < n)
                assert kk == brute


def test_min_max_take_the_easiest_and_hardest():
    assert pick("min", 3)[0].tolist() == [3, 4, 8, 11, 14, 19]
    assert pick("max", 3)[0].tolist() == [2, 7, 10, 13, 16, 17]


def test_medium_grows_outward_from_position_n_over_2():
    assert ss.medium_positions(12, 4).tolist() == [6, 7, 5, 8]
    assert ss.medium_positions(12, 1).tolist() == [6]
    assert ss.medium_positions(7, 2).tolist() == [3, 4]
    assert ss.medium_positions(7, 7).tolist() == [3, 4, 2, 5, 1, 6, 0]
    assert ss.medium_positions(6, 6).tolist() == [3, 4, 2, 5, 1, 0]  # upper side runs out first
    assert pick("medium", 4)[0].tolist() == [0, 5, 6, 9, 20, 21, 22, 23]  # sorted positions 5..8
    assert pick("medium", 3, UNEVEN_LABELS, UNEVEN_SCORES)[0].tolist() == [4, 5, 6, 14, 15, 18]


def test_ties_keep_row_order():
    labels = np.zeros(6, dtype=np.int64)
    scores = np.array([1, 0, 1, 0, 1, 0], dtype=np.float32)  # stable order: 1 3 5 0 2 4
    assert ss.select(labels, 1, "interval", 3, scores=scores, k=2)[0].tolist() == [1, 2, 5]
    assert ss.select(labels, 1, "min", 2, scores=scores)[0].tolist() == [1, 3]
    assert ss.select(labels, 1, "max", 2, scores=scores)[0].tolist() == [2, 4]


def test_short_class_is_an_error_unless_allow_short():
    with pytest.raises(SystemExit, match="allow-short"):
        pick("interval", 8, UNEVEN_LABELS, UNEVEN_SCORES, k=1)
    idx, info = pick("interval", 8, UNEVEN_LABELS, UNEVEN_SCORES, k=1, allow_short=True)
    assert idx.tolist() == list(range(4, 19))  # class 0: rows 11..4; class 1: all 7
    assert info["short_classes"] == {1: 7}
    idx, _ = pick("max", 8, UNEVEN_LABELS, UNEVEN_SCORES, allow_short=True)
    assert idx.tolist() == list(range(0, 8)) + list(range(12, 19))


# ----------------------------------------------------------------------------- random

def test_random_is_balanced_seeded_and_uniform():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), 40))
    a = ss.select(labels, 5, "random", 7, seed=3)[0]
    assert np.bincount(labels[a], minlength=5).tolist() == [7] * 5 and len(set(a.tolist())) == 35
    assert np.array_equal(a, ss.select(labels, 5, "random", 7, seed=3)[0])
    assert not np.array_equal(a, ss.select(labels, 5, "random", 7, seed=4)[0])
    # scores and the other classes do not change a class's draw
    other = labels.copy()
    other[labels == 0] = 5
    b = ss.select(other, 6, "random", 7, seed=3, scores=rng.random(200), allow_short=True)[0]  # class 0 now empty
    keep = lambda idx, lab: sorted(i for i in idx.tolist() if lab[i] in (1, 2, 3, 4))  # noqa: E731
    assert keep(a, labels) == keep(b, other)
    # every image of a class is about equally likely (expected 200 * 7 / 40 = 35 times)
    hits = np.bincount(np.concatenate([ss.select(labels, 5, "random", 7, seed=s)[0] for s in range(200)]),
                       minlength=200)
    assert hits.min() > 12 and hits.max() < 65


# ----------------------------------------------------------------------------- kcenter, herding

def brute_kcenter(x, m):
    x = x.astype(np.float64)
    n = len(x)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    to_mean = np.sqrt(((x - x.mean(0)) ** 2).sum(-1))
    chosen = [int(np.argmin(to_mean))]
    while len(chosen) < m:
        best, best_d = None, -1.0
        for j in range(n):
            if j in chosen:
                continue
            d = min(dist[j, c] for c in chosen)
            if d > best_d:
                best, best_d = j, d
        chosen.append(best)
    return chosen


def brute_herding(x, m):
    x = x.astype(np.float64)
    mean, total, chosen = x.mean(0), np.zeros(x.shape[1]), []
    for i in range(m):
        target = (i + 1) * mean - total
        best, best_d = None, np.inf
        for j in range(len(x)):
            d = np.sqrt(((x[j] - target) ** 2).sum())
            if j not in chosen and d < best_d:
                best, best_d = j, d
        chosen.append(best)
        total += x[best]
    return chosen


def brute_per_class(labels, feats, m, fn):
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out += idx[fn(feats[idx], m)].tolist()
    return sorted(out)


@pytest.mark.parametrize("method,brute", [("kcenter", brute_kcenter), ("herding", brute_herding)])
@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_feature_methods_match_brute_force(method, brute, tiny_chunks, monkeypatch):
    if tiny_chunks:
        monkeypatch.setattr(ss, "CHUNK_BYTES", 8 * 5 * 3)  # three rows per chunk
    for trial in range(4):
        rng = np.random.default_rng(trial)
        labels = rng.permutation(np.repeat(np.arange(3), [30, 25, 17]))
        feats = rng.standard_normal((len(labels), 5)).astype(np.float32)
        m = 6 + trial
        got = ss.select(labels, 3, method, m, features=feats)[0]
        assert got.tolist() == brute_per_class(labels, feats, m, brute)
        order = (ss.kcenter if method == "kcenter" else ss.herding)(feats[labels == 0], m)
        assert order.tolist() == brute(feats[labels == 0], m)  # the greedy order too


def test_kcenter_never_repeats_a_point_when_points_coincide():
    x = np.ones((5, 3), dtype=np.float32)
    assert sorted(ss.kcenter(x, 5).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(ss.herding(x, 5).tolist()) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- budget

def test_budget_fraction_and_count():
    assert ss.ipc_from_budget(0.25, 24, 2) == (3, 6)
    assert ss.ipc_from_budget(6, 24, 2) == (3, 6)
    assert ss.ipc_from_budget(7, 24, 2) == (3, 7)
    assert ss.ipc_from_budget(0.29, 100, 1) == (29, 29)  # 0.29 * 100 = 28.999999999999996
    assert ss.ipc_from_budget(0.008, 1281167, 1000) == (10, 10249)
    for bad in (0.01, 1, 2.5, 0, -3):
        with pytest.raises(SystemExit, match="--budget"):
            ss.ipc_from_budget(bad, 24, 2)


# ----------------------------------------------------------------------------- CLI

def make_dataset(path, labels=LABELS, scores=SCORES, flips=False, seed=0):
    os.makedirs(path, exist_ok=True)
    n = len(labels)
    shape = (n, 2, 4, 4, 4) if flips else (n, 4, 4, 4)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float16)
    np.save(os.path.join(path, "latents.npy"), latents)
    np.save(os.path.join(path, "labels.npy"), labels.astype(np.int64))
    if scores is not None:
        np.save(os.path.join(path, "scores.npy"), scores)
    num_classes = int(labels.max()) + 1
    meta = {"num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)],
            "image_size": 32, "vae": "none"}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return latents


def cli(*args, env=None):
    """Start `python select_subset.py ARGS` (forked from the tests' preloaded server); finish() waits."""
    return launch.start("select_subset.py", args, ROOT, env)


def finish(run):
    r = run(120)
    return r.returncode, r.stdout, r.stderr


def test_cli_interval_writes_indices_and_summary(tmp_path):
    make_dataset(tmp_path / "d")
    out = tmp_path / "sel" / "s.npy"
    rc, stdout, err = finish(cli("--data-path", tmp_path / "d", "--method", "interval", "--ipc", 3, "--k", 6,
                                 "--out", out))
    assert rc == 0, err
    idx = np.load(out)
    assert idx.dtype == np.int64 and idx.tolist() == [0, 3, 4, 16, 17, 23]
    s = json.loads((tmp_path / "sel" / "s.json").read_text())
    assert s["per_class_counts"] == [3, 3] and s["ipc"] == 3 and s["k"] == 6
    assert s["k_used"] == {"0": 5, "1": 5} and s["short_classes"] == {}
    q = s["score_quantiles"]
    assert np.allclose(q["selected"], np.quantile(SCORES[[0, 3, 4, 16, 17, 23]], q["q"]))
    assert np.allclose(q["all"], np.quantile(SCORES, q["q"]))
    assert s["args"]["method"] == "interval" and s["args"]["k"] == 6
    assert len(stdout.strip().splitlines()) == 1 and "6 of 24" in stdout and "--k 6 lowered to 5 (2 classes)" in stdout
    assert sorted(os.listdir(tmp_path / "sel")) == ["s.json", "s.npy"]


def test_cli_feature_methods_budget_plot_and_missing_matplotlib(tmp_path):
    """Runs four CLI calls at once: default and --features spaces, --budget, --plot with and without matplotlib."""
    lat = make_dataset(tmp_path / "d", flips=True)
    feats = np.random.default_rng(1).standard_normal((24, 7)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    fake = tmp_path / "nompl" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "nompl"))
    d = tmp_path / "d"
    procs = {
        "kc": cli("--data-path", d, "--method", "kcenter", "--ipc", 4, "--out", tmp_path / "kc.npy"),
        "hd": cli("--data-path", d, "--method", "herding", "--budget", 10, "--features", tmp_path / "f.npy",
                  "--out", tmp_path / "hd.npy"),
        "plot": cli("--data-path", d, "--method", "interval", "--budget", 0.25, "--k", 4,
                    "--out", tmp_path / "iv.npy", "--plot", tmp_path / "iv.png"),
        "nompl": cli("--data-path", d, "--method", "min", "--ipc", 3, "--out", tmp_path / "mn.npy",
                     "--plot", tmp_path / "mn.png", env=env),
    }
    res = {name: finish(p) for name, p in procs.items()}
    for name, (rc, _, err) in res.items():
        assert rc == 0, (name, err)

    unflipped = lat[:, 0].astype(np.float32).reshape(24, -1)
    assert np.load(tmp_path / "kc.npy").tolist() == brute_per_class(LABELS, unflipped, 4, brute_kcenter)
    kc = json.loads((tmp_path / "kc.json").read_text())
    assert kc["first_centre"] == "closest to the class mean" and "latents" in kc["features"]
    # --budget 10 on 2 classes: 5 per class, in the --features space
    assert np.load(tmp_path / "hd.npy").tolist() == brute_per_class(LABELS, feats, 5, brute_herding)
    hd = json.loads((tmp_path / "hd.json").read_text())
    assert hd["ipc"] == 5 and hd["budget"]["images"] == 10 and "images // num_classes" in hd["budget"]["rule"]
    # --budget 0.25 of 24 = 6 images = 3 per class, same as --ipc 3 --k 4
    assert np.load(tmp_path / "iv.npy").tolist() == [3, 4, 5, 12, 15, 20]
    assert (tmp_path / "iv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, stdout, _ = res["nompl"]
    assert "pip install matplotlib" in stdout
    assert np.load(tmp_path / "mn.npy").tolist() == [3, 4, 8, 11, 14, 19]
    assert not (tmp_path / "mn.png").exists()


def test_cli_allow_short_reports_the_short_class(tmp_path, capsys):
    make_dataset(tmp_path / "d", UNEVEN_LABELS, UNEVEN_SCORES)
    ss.main(["--data-path", str(tmp_path / "d"), "--method", "interval", "--ipc", "8", "--k", "1",
             "--allow-short", "--out", str(tmp_path / "s.npy")])
    assert np.load(tmp_path / "s.npy").tolist() == list(range(4, 19))
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["short_classes"] == {"1": 7} and s["per_class_counts"] == [8, 7]
    assert "1 classes short" in capsys.readouterr().out


def test_cli_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    def dataset(name, **kw):
        make_dataset(tmp_path / name, **kw)
        return tmp_path / name

    np.save(tmp_path / "short.npy", np.zeros((23, 3), np.float32))
    base = ["--method", "interval", "--ipc", 3, "--k", 4]
    nan = SCORES.copy()
    nan[5] = np.nan
    cases = {
        "no scores": (dataset("a", scores=None), base, "run score.py"),
        "mismatch": (dataset("b", scores=SCORES[:20]), base, "re-run score.py"),
        "nan": (dataset("c", scores=nan), base, "NaN"),
        "ipc too large": (dataset("e"), ["--method", "min", "--ipc", 13], "--allow-short"),
        "unknown method": (dataset("f"), ["--method", "kmeans", "--ipc", 3], "choose one of"),
        "no features": (dataset("g"), ["--method", "kcenter", "--ipc", 3, "--features", tmp_path / "nope.npy"],
                        "does not exist"),
        "bad features": (dataset("h"), ["--method", "herding", "--ipc", 3, "--features", tmp_path / "short.npy"],
                         "expected (N, D)"),
        "no k": (dataset("i"), ["--method", "interval", "--ipc", 3], "needs --k"),
        "budget": (dataset("j"), ["--method", "random", "--budget", 1], "less than one per class"),
    }
    # four as real processes (exit status 1, one stderr line), the rest in-process to save time
    def out(d):
        return tmp_path / "out" / d.name

    procs = {}
    for i, (name, (d, args, message)) in enumerate(cases.items()):
        out(d).mkdir(parents=True)
        argv = ["--data-path", d, *args, "--out", out(d) / "s.npy", "--plot", out(d) / "s.png"]
        if i < 4:
            procs[name] = cli(*argv)
        else:
            with pytest.raises(SystemExit, match="^error: .*" + re.escape(message)):
                ss.main([str(a) for a in argv])
    for name, p in procs.items():
        rc, _, err = finish(p)
        assert rc == 1, (name, err)
        assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, (name, err)
        assert cases[name][2] in err, (name, err)
    for name, (d, _, _) in cases.items():
        assert os.listdir(out(d)) == [], name


def test_k_auto_spreads_the_picks_over_the_easiest_span_of_each_class():
    # the largest k with (ipc - 1) k < span n, by brute force, and the paper's ImageNet settings
    for n in (7, 12, 180, 1281):
        for ipc in (2, 3, 10):
            for span in (0.3, 0.61, 1.0):
                if ipc <= n:
                    want = max([k for k in range(1, n + 1) if (ipc - 1) * k < span * n] or [1])
                    assert ss.auto_step(n, ipc, span) == want, (n, ipc, span)
    assert [ss.auto_step(1281, ipc, span) for ipc, span in ((10, 0.675), (50, 0.613), (100, 0.774))] == [96, 16, 10]
    # classes of 12 and 7 at span 0.5: k = 2 (positions 0, 2, 4 < 6) and k = 1 (0, 1, 2 < 3.5)
    idx, info = pick("interval", 3, UNEVEN_LABELS, UNEVEN_SCORES, k="auto", span=0.5)
    assert idx.tolist() == [7, 9, 11, 13, 15, 17] and info["k_used"] == {0: 2, 1: 1}


def test_cli_k_auto_records_the_k_of_every_class(tmp_path):
    make_dataset(tmp_path / "d", UNEVEN_LABELS, UNEVEN_SCORES)
    rc, stdout, err = finish(cli("--data-path", tmp_path / "d", "--ipc", 3, "--k", "auto", "--span", 0.5,
                                 "--out", tmp_path / "s.npy"))
    assert rc == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["k"] == "auto" and s["span"] == 0.5 and s["k_used"] == {"0": 2, "1": 1}
    assert np.load(tmp_path / "s.npy").tolist() == [7, 9, 11, 13, 15, 17]
    assert "k per class: 1 (1 class), 2 (1 class)" in stdout
    assert ss.k_counts({0: 21, 1: 22, 2: 21, 3: 21}) == "21 (3 classes), 22 (1 class)"
