"""score.py: the per-image denoising loss against a direct computation, independence from ranks and
batch size, resumption, a trained model's ordering, existing outputs and bad inputs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402
import score  # noqa: E402
from diffusion import DDPMSchedule, ddpm_loss, linear_betas  # noqa: E402
import launch
from launch import script_cmd

N, C, S, K, T = 12, 4, 8, 3, 4           # images, latent channels, latent side, classes, timesteps
KWARGS = dict(input_size=S, in_channels=C, num_classes=K)
META = {"num_classes": K, "class_names": ["c0", "c1", "c2"], "latent_shape": [C, S, S], "count": N}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process
# The registry's smallest network (S: depth 12, width 384) is too slow to train on two CPU cores
# within seconds; the in-process tests that train or only check a loss formula shrink "S" to this
# while they run (a checkpoint saved then is rebuilt through the same registry name).
TINY = dict(depth=2, hidden_size=64, num_heads=4)


def random_net(name, seed, **kw):
    """A registry network with every weight perturbed, so that its output depends on x, t and y
    (DiT's zero-initialised output layer and gates would make it ignore them)."""
    torch.manual_seed(seed)
    m = models.DiT_models[name](**kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def make_data(d, latents, labels, meta):
    os.makedirs(d, exist_ok=True)
    np.save(os.path.join(d, "latents.npy"), latents.astype(np.float16))
    np.save(os.path.join(d, "labels.npy"), labels.astype(np.int64))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(d)


def run(args, nproc=1):
    if nproc == 1:   # forked from the tests' preloaded server
        return launch.run("score.py", args, ROOT, ENV, timeout=120)
    return subprocess.run(script_cmd("score.py", nproc) + [str(a) for a in args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def cli(data, ckpt, *extra):
    return [str(a) for a in ("--data-path", data, "--ckpt", ckpt, "--num-timesteps", T, *extra)]


def main(args):
    """score.py in this process (no interpreter start-up), one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score.main(score.get_parser().parse_args([str(a) for a in args]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A dataset, a checkpoint in train.py's format (EMA weights differ from the raw weights) and
    the scores of one plain run (batch 4, chunk 8)."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((N, C, S, S)).astype(np.float16)
    labels = np.arange(N) % K
    ema = random_net("DiT-S/4", 0, **KWARGS)
    raw = random_net("DiT-S/4", 1, **KWARGS)
    ckpt = str(root / "ckpt.pt")
    torch.save({"config": {"model": "DiT-S/4", "kwargs": KWARGS}, "model": raw.state_dict(),
                "ema": ema.state_dict(), "meta": META, "step": 10}, ckpt)
    data = make_data(root / "ref", latents, labels, META)
    main(cli(data, ckpt, "--batch-size", 4, "--chunk-size", 8))
    ref = np.load(os.path.join(data, "scores.npy"))
    return dict(root=root, latents=latents, labels=labels, ckpt=ckpt, ema=ema, data=data, ref=ref)


def fresh(base, name, **over):
    return make_data(base["root"] / name, over.get("latents", base["latents"]), over.get("labels", base["labels"]),
                     over.get("meta", META))


# ----------------------------------------------------------------------------- the score itself

def test_draws_follow_the_documented_recipe_and_are_stratified():
    for index, seed in ((0, 0), (7, 3)):
        t, noise = score.draws(index, 5, (C, S, S), "ddpm", seed)
        g = torch.Generator().manual_seed(score.draw_seed(seed, index))
        u = torch.rand(5, generator=g, dtype=torch.float64)
        assert torch.equal(noise, torch.randn(5, 1, C, S, S, generator=g).reshape(5, C, S, S))
        assert t.dtype == torch.int64 and t.tolist() == [int((j + u[j].item()) * 1000 / 5) for j in range(5)]
        assert all(200 * j <= t[j] < 200 * (j + 1) for j in range(5))
        ts, noise_s = score.draws(index, 5, (C, S, S), "sit", seed)
        assert torch.equal(noise_s, noise)
        assert torch.allclose(ts.double(), (torch.arange(5) + u) / 5)
    assert not torch.equal(score.draws(1, 5, (C, S, S), "ddpm")[1], score.draws(2, 5, (C, S, S), "ddpm")[1])


def test_antithetic_noises_and_extra_draws_share_their_stratum_time_and_the_t_range_is_respected():
    t, noise = score.draws(3, 4, (C, S, S), "sit", 0, noises=2, antithetic=True, t_range=(0.2, 0.6))
    assert t.shape == (16,) and noise.shape == (16, C, S, S)
    for j in range(4):  # rows 4j .. 4j+3: noises a, b, -a, -b at one time inside stratum j of [0.2, 0.6)
        rows = slice(4 * j, 4 * j + 4)
        assert len(set(t[rows].tolist())) == 1 and 0.2 + 0.1 * j <= t[4 * j] < 0.2 + 0.1 * (j + 1)
        assert torch.equal(noise[4 * j + 2], -noise[4 * j]) and torch.equal(noise[4 * j + 3], -noise[4 * j + 1])
        assert not torch.equal(noise[4 * j], noise[4 * j + 1])


def test_two_global_seeds_never_share_a_draw():
    # seed * 1_000_003 + index would give seed 1's image i the draws of seed 0's image i + 1_000_003
    seeds = {score.draw_seed(g, i) for g in range(5) for i in [None, *range(0, 3000), 1_000_003, 2_000_006]}
    assert len(seeds) == 5 * 3003
    for index in (None, 0, 5):
        a, b = (score.draws(index, 4, (C, S, S), "sit", g)[1] for g in (0, 1))
        assert not torch.equal(a, b)
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 4 / np.sqrt(a.numel())  # 4 standard errors of independent draws' correlation


def test_spearman_within_class_and_spearman_brown_match_hand_computed_values():
    # class 0: ranks (1 2 3 4) vs (1 3 2 4): 1 - 6*2/(4*15) = 0.8; class 1: (3 1 2) vs (1 2 3):
    # d = (2, -1, -1), 1 - 6*6/(3*8) = -0.5; class 2 has 2 images: left out. Mean 0.15.
    a = np.array([10, 20, 30, 40, 3, 1, 2, 5, 6], dtype=np.float64)
    b = np.array([1, 3, 2, 4, 10, 20, 30, 6, 5], dtype=np.float64)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    assert score.spearman_within_class(a, b, labels) == pytest.approx(0.15, abs=1e-12)
    assert score.spearman_brown(0.15) == pytest.approx(2 * 0.15 / 1.15, abs=1e-12)
    assert score.spearman_brown(0.5, factor=4) == pytest.approx(4 * 0.5 / (1 + 3 * 0.5))
    # ties take average ranks, as scipy's spearmanr
    from scipy.stats import spearmanr
    x, y = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 5.0]), np.array([2.0, 1.0, 1.0, 4.0, 3.0, 3.0])
    assert score.spearman_within_class(x, y, np.zeros(6, int)) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[eps - x | x_t] for data x ~ N(0, s2 I) and x_t = (1 - t) x + t eps."""

    def __init__(self, s2):
        super().__init__()
        self.s2 = s2

    def forward(self, xt, t, y):
        t = t.view(-1, 1, 1, 1).double()
        return ((t - (1 - t) * self.s2) / ((1 - t) ** 2 * self.s2 + t ** 2) * xt).float()


def gaussian_score(x, s2, n=200_000):
    """The exact expected score of image x: the mean over t in [0, 1) (midpoints) of
    E_eps |eps - x - a(t) x_t|^2 / D = (1 - a t)^2 + (1 + a (1 - t))^2 |x|^2 / D."""
    t = (np.arange(n) + 0.5) / n
    a = (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t ** 2)
    return float(np.mean((1 - a * t) ** 2 + (1 + a * (1 - t)) ** 2 * float((x.double() ** 2).mean())))


def test_shared_antithetic_draws_keep_the_mean_and_cut_the_variance_of_a_gaussian_denoisers_score():
    # Under the exact denoiser the loss is |(1 - a t) eps - (1 + a (1 - t)) x|^2 / D: its cross term
    # <eps, x> is what makes one image's estimate noisy (antithetic pairs cancel it exactly), and
    # different draws per image add noise to a difference of two images that shared draws remove.
    s2, T, reps = 0.5, 4, 300
    net, sched = GaussianVelocity(s2), DDPMSchedule(linear_betas())
    # images 0 and 1 have the same norm (equally hard for this denoiser), image 2 another one
    checker = (torch.arange(C * S * S) % 2 * 2 - 1).float().view(C, S, S)
    x = torch.stack([torch.full((C, S, S), 0.6), 0.6 * checker, torch.linspace(-1.2, 1.2, C * S * S).view(C, S, S)])
    exact = [gaussian_score(xi, s2) for xi in x]

    def estimates(antithetic, shared):
        out = np.zeros((reps, 3))
        for g in range(reps):
            d = [score.draws(None if shared else i, T, (C, S, S), "sit", g, antithetic=antithetic) for i in range(3)]
            t, noise = torch.stack([e[0] for e in d]), torch.stack([e[1] for e in d])
            with torch.no_grad():
                out[g] = score.score_batch(net, "sit", sched, x, torch.zeros(3, dtype=torch.long), t, noise).mean(1)
        return out
    plain, shared, both = estimates(False, False), estimates(False, True), estimates(True, True)
    for est in (plain, shared, both):  # unbiased: the mean over draws is the exact expectation
        se = est.std(0, ddof=1) / np.sqrt(reps)
        assert np.all(np.abs(est.mean(0) - exact) < 4 * se + 1e-4), (est.mean(0), exact)
    # what a ranking depends on: the difference of two images' scores. Shared draws remove the
    # draws' own difference; antithetic pairs then remove the cross term, the only part left
    # between two images of equal norm.
    var = [(e[:, 0] - e[:, 1]).var() for e in (plain, shared, both)]
    assert var[1] < 0.5 * var[0] and var[2] < 1e-6 * var[1], var
    var02 = [(e[:, 0] - e[:, 2]).var() for e in (plain, shared, both)]
    assert var02[1] < 0.5 * var02[0] and var02[2] < var02[1], var02


def ddpm_reference(net, x, y, t, noise):
    """mean over (C, H, W) and timesteps of (eps - eps_theta(x_t, t, y))^2, x_t in closed form."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = torch.from_numpy(np.cumprod(1.0 - betas))[t].float()[:, None, None, None]
    xt = abar.sqrt() * x + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps = net(xt, t, torch.full_like(t, y))[:, :C]
    return ((noise - eps) ** 2).mean().item()


def test_scores_equal_the_epsilon_loss_of_the_ema_weights_computed_directly(base):
    # float tolerance only: the reference runs the network on T rows, the script on B*T rows
    for i in (0, 5, 11):  # the default: draws shared by every image, antithetic
        x = torch.from_numpy(base["latents"][i].astype(np.float32))
        t, noise = score.draws(None, T, (C, S, S), "ddpm", 0, antithetic=True)
        want = ddpm_reference(base["ema"], x, int(base["labels"][i]), t, noise)
        assert base["ref"][i] == pytest.approx(want, rel=1e-5)
    assert base["ref"].dtype == np.float32 and base["ref"].shape == (N,)
    with open(os.path.join(base["data"], "scores.json")) as f:
        info = json.load(f)
    assert info["request"]["num_timesteps"] == T and info["objective"] == "ddpm"
    assert info["request"]["draws"] == "shared" and info["request"]["antithetic"] and info["forwards_per_image"] == 2 * T
    assert not os.path.exists(os.path.join(base["data"], "scores.partial"))
    assert "images/s" in open(os.path.join(base["data"], "score_log.txt")).read()


def test_scores_json_holds_the_split_half_reliability_of_the_even_and_odd_strata(base):
    # half A: strata 0, 2; half B: strata 1, 3 (each stratum's two antithetic rows in its half)
    from scipy.stats import spearmanr
    t, noise = score.draws(None, T, (C, S, S), "ddpm", 0, antithetic=True)
    rows = [np.flatnonzero(np.arange(2 * T) // 2 % 2 == h) for h in (0, 1)]
    halves = np.array([[ddpm_reference(base["ema"], torch.from_numpy(base["latents"][i].astype(np.float32)),
                                       int(base["labels"][i]), t[r], noise[r]) for r in rows] for i in range(N)])
    r = np.mean([spearmanr(halves[base["labels"] == c, 0], halves[base["labels"] == c, 1])[0] for c in range(K)])
    with open(os.path.join(base["data"], "scores.json")) as f:
        rel = json.load(f)["reliability"]
    assert rel["classes"] == K
    assert rel["split_half_spearman"] == pytest.approx(r, abs=1e-9)
    assert rel["spearman_brown"] == pytest.approx(2 * r / (1 + r), abs=1e-9)
    assert "ranking reliability" in open(os.path.join(base["data"], "score_log.txt")).read()
    # a zero-output network's loss on the same draws is mean (eps - 0)^2: equal for every image under
    # shared draws, so the scores cannot follow it
    assert rel["zero_model_spearman"] == pytest.approx(0.0)


def test_an_untrained_sit_scorer_ranks_like_a_zero_network(tmp_path):
    # SiT's zero-initialised output layer: the loss is mean (eps - x)^2, so the ranking is the norm's
    net = models.DiT_models["SiT-S/8"](**KWARGS)
    torch.save({"config": {"model": "SiT-S/8", "kwargs": KWARGS}, "model": net.state_dict(), "ema": net.state_dict(),
                "meta": META}, tmp_path / "zero.pt")
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((N, C, S, S)) * rng.uniform(0.5, 2, (N, 1, 1, 1))
    data = make_data(tmp_path / "d", latents, np.arange(N) % K, META)
    main(["--data-path", data, "--ckpt", str(tmp_path / "zero.pt"), "--num-timesteps", 4])
    with open(os.path.join(data, "scores.json")) as f:
        assert json.load(f)["reliability"]["zero_model_spearman"] == pytest.approx(1.0)


def test_out_writes_a_second_scoring_beside_the_first_with_its_own_settings(base):
    data = fresh(base, "retest")
    main(cli(data, base["ckpt"], "--out", os.path.join(data, "scores_seed1.npy"), "--global-seed", 1))
    with open(os.path.join(data, "scores_seed1.json")) as f:
        assert json.load(f)["request"]["global_seed"] == 1
    other = np.load(os.path.join(data, "scores_seed1.npy"))
    assert other.shape == (N,) and not np.array_equal(other, base["ref"])  # other draws
    assert not os.path.exists(os.path.join(data, "scores.npy"))


def sit_reference(net, x, y, t, noise, reverse=False):
    """mean of (eps - x - v)^2 with x_t = (1 - t) x + t eps; reverse: v = -net(x_t, 1 - t)."""
    tt = t[:, None, None, None]
    xt = (1 - tt) * x + tt * noise
    with torch.no_grad():
        out = net(xt, 1 - t if reverse else t, torch.full((len(t),), y))
        out = out[0] if isinstance(out, tuple) else out
        v = -out[:, :C] if reverse else out[:, :C]
    return ((noise - x - v) ** 2).mean().item()


@pytest.mark.parametrize("fmt", ["ours-sit", "official-sit", "repa", "public-dit"])
def test_each_checkpoint_format_is_scored_with_its_own_loss_and_time(tmp_path, monkeypatch, fmt):
    monkeypatch.setitem(models.SIZES, "S", TINY)  # only the loss and the time convention matter here
    if fmt == "ours-sit":
        net = random_net("SiT-S/8", 2, **KWARGS)
        ck = {"config": {"model": "SiT-S/8", "kwargs": KWARGS}, "model": net.state_dict(), "ema": net.state_dict()}
    elif fmt == "official-sit":  # bare state dict, learned sigma kept, time runs from noise (0) to data (1)
        net = random_net("SiT-S/8", 3, **KWARGS, learn_sigma=True)
        ck = net.state_dict()
    elif fmt == "repa":  # projectors present, no learned sigma
        net = random_net("SiT-S/8", 4, **KWARGS, learn_sigma=False, z_dims=[16], projector_dim=32, encoder_depth=4)
        ck = {"ema": net.state_dict(), "args": {"model": "SiT-S/8", "encoder_depth": 4}}
    else:  # DiT's bare state dict: epsilon loss, the learned-sigma half ignored
        net = random_net("DiT-S/8", 5, **KWARGS, learn_sigma=True)
        ck = net.state_dict()
    path = str(tmp_path / "ck.pt")
    torch.save(ck, path)
    name = None if fmt in ("ours-sit", "repa") else ("SiT-S/8" if fmt == "official-sit" else "DiT-S/8")
    model, info = score.load_scorer(path, name, "cpu")
    assert info["reverse_time"] == (fmt == "official-sit")
    objective = "ddpm" if fmt == "public-dit" else "sit"
    assert info["objective"] == objective
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((3, C, S, S)).astype(np.float32))
    y = torch.tensor([0, 2, 1])
    drawn = [score.draws(i, T, (C, S, S), objective) for i in range(3)]
    t, noise = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
    with torch.no_grad():
        got = score.score_batch(model, objective, DDPMSchedule(linear_betas()), x, y, t, noise).mean(1)
    for i in range(3):
        if objective == "ddpm":
            want = ddpm_reference(net, x[i], int(y[i]), t[i], noise[i])
        else:
            want = sit_reference(net, x[i], int(y[i]), t[i], noise[i], reverse=fmt == "official-sit")
        assert got[i].item() == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- ranks, batches, resumption

def test_scores_do_not_depend_on_the_number_of_ranks_or_the_batch_size(base):
    # Two ranks run the same batches (batches never cross a chunk), so the scores are bit-identical.
    data = fresh(base, "ranks")
    r = run(cli(data, base["ckpt"], "--batch-size", 4, "--chunk-size", 8), nproc=2)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(os.path.join(data, "scores.npy")), base["ref"])
    # Another batch size changes the number of rows of every matmul, which may change the
    # kernel's summation order: equal within float32 rounding.
    data = fresh(base, "batch")
    main(cli(data, base["ckpt"], "--batch-size", 3, "--chunk-size", 5))
    np.testing.assert_allclose(np.load(os.path.join(data, "scores.npy")), base["ref"], rtol=1e-6)


def test_a_stopped_run_resumes_without_recomputing_finished_chunks(base):
    data = fresh(base, "resume")
    args = cli(data, base["ckpt"], "--batch-size", 4, "--chunk-size", 4)
    r = run(args + ["--stop-after-chunks", 1])
    assert r.returncode == 1 and "--stop-after-chunks" in r.stderr
    assert not os.path.exists(os.path.join(data, "scores.npy"))
    partial = os.path.join(data, "scores.partial")
    assert os.listdir(os.path.join(partial, "done")) == ["0"]
    rows = np.load(os.path.join(partial, "scores.npy"), mmap_mode="r+")
    assert np.array_equal(rows[:4], base["ref"][:4])
    rows[:4] = -1.0  # a recomputed chunk would overwrite this mark
    rows.flush()
    del rows
    main(args)
    out = np.load(os.path.join(data, "scores.npy"))
    assert np.all(out[:4] == -1.0)
    assert np.array_equal(out[4:], base["ref"][4:])
    assert "1 of 3 chunks already done; 8 images to do" in open(os.path.join(data, "score_log.txt")).read()
    assert not os.path.exists(partial)


def tiny_ckpt(path, seed=0, nan=False):
    """A train.py-format checkpoint of the shrunk DiT-S/8 (call with TINY patched in)."""
    net = random_net("DiT-S/8", seed, **KWARGS)
    if nan:
        with torch.no_grad():
            net.final_layer.linear.bias[0] = float("nan")
    torch.save({"config": {"model": "DiT-S/8", "kwargs": KWARGS}, "model": net.state_dict(),
                "ema": net.state_dict(), "meta": META}, path)
    return str(path)


def test_a_partial_run_with_other_settings_is_started_over(base, tmp_path, monkeypatch):
    monkeypatch.setitem(models.SIZES, "S", TINY)
    data, ckpt = fresh(base, "stale"), tiny_ckpt(tmp_path / "tiny.pt")
    args = ["--data-path", data, "--ckpt", ckpt, "--chunk-size", 4, "--num-timesteps"]
    with pytest.raises(SystemExit, match="stop-after-chunks"):
        main(args + [4, "--stop-after-chunks", 1])
    rows = np.load(os.path.join(data, "scores.partial", "scores.npy"), mmap_mode="r+")
    rows[:4] = -1.0
    rows.flush()
    del rows
    main(args + [3])
    assert np.all(np.load(os.path.join(data, "scores.npy")) > 0)  # chunk 0 was scored again, with T = 3


def test_a_non_finite_loss_stops_without_writing_scores(base, tmp_path, monkeypatch):
    monkeypatch.setitem(models.SIZES, "S", TINY)
    data = fresh(base, "nan")
    with pytest.raises(SystemExit, match="non-finite loss for images 0..3 .*broken"):
        main(["--data-path", data, "--ckpt", tiny_ckpt(tmp_path / "nan.pt", nan=True), "--batch-size", 4])
    assert not os.path.exists(os.path.join(data, "scores.npy"))


def test_existing_scores_are_kept_for_the_same_settings_and_refused_for_others(base, tmp_path, capsys):
    data = fresh(base, "existing")
    for name in ("scores.npy", "scores.json"):
        shutil.copy(os.path.join(base["data"], name), os.path.join(data, name))
    before = os.stat(os.path.join(data, "scores.npy")).st_mtime_ns
    args = ["--data-path", data, "--ckpt", base["ckpt"], "--num-timesteps", str(T)]
    main(args)
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(os.path.join(data, "scores.npy")).st_mtime_ns == before
    with pytest.raises(SystemExit, match="num_timesteps: 4 != 3.*--overwrite"):
        main(args[:-1] + ["3"])
    main(args[:-1] + ["3", "--overwrite"])
    with open(os.path.join(data, "scores.json")) as f:
        assert json.load(f)["request"]["num_timesteps"] == 3
    os.remove(os.path.join(data, "scores.json"))  # a scores.npy of unknown origin
    with pytest.raises(SystemExit, match="does not say how it was made"):
        main(args)


# ----------------------------------------------------------------------------- bad inputs

def _refused(data, ckpt, match):
    with pytest.raises(SystemExit, match=match) as e:
        main(["--data-path", data, "--ckpt", ckpt])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)  # exit status 1, one line
    for name in ("scores.npy", "scores.json", "scores.partial", "score_log.txt"):
        assert not os.path.exists(os.path.join(data, name))


def test_checkpoint_classes_must_match_the_dataset(base):
    data = fresh(base, "classes", labels=np.arange(N) % 5, meta={**META, "num_classes": 5, "class_names": None})
    _refused(data, base["ckpt"], r"conditioned on 3 classes .*num_classes 5")
    data = fresh(base, "names", meta={**META, "class_names": ["c0", "x", "c2"]})
    _refused(data, base["ckpt"], r"other classes .*class 1: 'c1' vs 'x'")


def test_latent_shape_must_match_the_model_input(base):
    data = fresh(base, "shape", latents=np.zeros((N, C, 2 * S, 2 * S)))
    _refused(data, base["ckpt"], r"\(4, 16, 16\) but .*takes \(4, 8, 8\).*encode")


def test_missing_latents_are_named_with_the_fix(base):
    data = fresh(base, "missing")
    os.remove(os.path.join(data, "latents.npy"))
    _refused(data, base["ckpt"], "has no latents.npy: run encode.py")
    assert sorted(os.listdir(data)) == ["labels.npy", "meta.json"]


# ----------------------------------------------------------------------------- a trained scorer

def pattern(labels, gen):
    """Smooth class-dependent waves (frequency = class + 1) with a random amplitude and phase."""
    n, grid = len(labels), torch.arange(S).float()
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    amp = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    phase = 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    freq, ch = (labels.float() + 1)[:, None, None, None], torch.arange(C).float()[None, :, None, None]
    return amp * torch.sin(np.pi * (freq * xx / S + ch * yy / (2 * S)) + phase + ch)


def test_noisier_images_score_harder_under_a_trained_model(tmp_path, monkeypatch):
    monkeypatch.setitem(models.SIZES, "S", TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen, sched = torch.Generator().manual_seed(0), DDPMSchedule(linear_betas())
        kw = dict(KWARGS, learn_sigma=False)
        net = models.DiT_models["DiT-S/2"](**kw)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(200):
            y = torch.randint(0, K, (64,), generator=gen)
            loss, _ = ddpm_loss(net, pattern(y, gen), y, torch.randint(0, 1000, (64,), generator=gen),
                                torch.randn(64, C, S, S, generator=gen), sched, vb=False)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        ckpt = str(tmp_path / "trained.pt")
        torch.save({"config": {"model": "DiT-S/2", "kwargs": kw}, "model": net.state_dict(),
                    "ema": net.state_dict(), "meta": META}, ckpt)
        # rows 0..8: clean; 9..17 and 18..26: the same images with noise of std 0.2 and 0.5 added
        y = torch.arange(9) % K
        clean = pattern(y, gen)
        extra = torch.randn(clean.shape, generator=gen)
        latents = torch.cat([clean, clean + 0.2 * extra, clean + 0.5 * extra]).numpy()
        data = make_data(tmp_path / "noisy", latents, np.tile(y.numpy(), 3), META)
        main(["--data-path", data, "--ckpt", ckpt, "--num-timesteps", 16])
    finally:
        torch.set_num_threads(threads)
    s = np.load(os.path.join(data, "scores.npy")).reshape(3, 9)
    assert np.all(s[0] < s[1]) and np.all(s[1] < s[2]), s


def test_a_scorer_whose_ema_is_mostly_its_initialisation_is_named_in_the_log(base, tmp_path, monkeypatch):
    monkeypatch.setitem(models.SIZES, "S", TINY)
    path = tiny_ckpt(tmp_path / "young.pt")
    ck = torch.load(path, weights_only=False)
    ck.update(args={"ema_decay": 0.999, "ema_warmup": False}, step=10)  # 0.999 ** 10 = 99% the initialisation
    torch.save(ck, path)
    data = fresh(base, "young")
    main(["--data-path", data, "--ckpt", path, "--num-timesteps", 2])
    assert "EMA weights are still 99% its initialisation" in open(os.path.join(data, "score_log.txt")).read()
