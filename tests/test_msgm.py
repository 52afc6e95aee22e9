"""msgm.py: the score / eps conversion and the continuous-time loss against hand computation, the
geometry of the forget terms, their sign on a 2-D Gaussian mixture whose score is known exactly, the
training step copied out, and a short run on digits."""
import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import hparams, isolated, run_here, run_script

import common as C
import msgm as M

B0, B1 = 0.1, 20.0


def hand_marginal(t):
    """alpha(t), sigma(t) of the VP-SDE written out independently of common.VP (numpy, float64)."""
    t = np.asarray(t, dtype=np.float64)
    alpha = np.exp(-0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0)
    return alpha, np.sqrt(1 - alpha ** 2)


class Recorder(nn.Module):
    """A stand-in network that returns a fixed eps and remembers what it was called with."""
    tok = {"null": 7}

    def __init__(self, eps):
        super().__init__()
        self.eps, self.calls = eps, []

    def forward(self, x, t, c):
        self.calls.append((t, c))
        return self.eps


# ------------------------------------------------------------------------------------------ by hand


def test_score_is_minus_eps_over_sigma_and_network_time_is_999t():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([1e-5, 0.02, 0.3, 0.7, 1.0])
    net = Recorder(eps)
    s = C.VP().score(net, x, t, torch.full((5,), 7))
    _, sigma = hand_marginal(t.numpy())
    assert np.allclose(s.numpy(), -eps.numpy() / sigma[:, None, None, None], rtol=1e-5)
    M.unconditional(net)(x, t)                       # the wrapper msgm trains through
    t_net, c = net.calls[-1]
    assert torch.allclose(torch.as_tensor(t_net), 999 * t) and (c == 7).all()


@pytest.mark.parametrize("task, released",
                         [("square", False), ("square", True), ("norm", False), ("norm", True)])
def test_continuous_loss_matches_hand_computation(task, released):
    g = torch.Generator().manual_seed(1)
    x_k = torch.rand(6, 1, 3, 3, generator=g) * 2 - 1
    x_u = torch.rand(5, 1, 3, 3, generator=g) * 2 - 1

    def eps_fn(x, t):                                 # any smooth function of (x_t, t)
        return 0.7 * x + 0.1 * t.view(-1, 1, 1, 1)
    torch.manual_seed(3)
    loss, l_keep, l_forget = M.msgm_loss(eps_fn, x_k, x_u, task, lam=0.01, forget_step=True,
                                         released=released)
    torch.manual_seed(3)                              # the same draws, in the order msgm_loss makes
    t_k = (torch.rand(6) * (1 - 1e-5) + 1e-5).double().numpy()
    z_k = torch.randn(6, 1, 3, 3).double().numpy()
    t_u = (torch.rand(5) * (1 - 1e-5) + 1e-5).double().numpy()
    z_u = torch.randn(5, 1, 3, 3).double().numpy()

    def eps_at(x0, t, z):
        a, s = hand_marginal(t)
        xt = a[:, None, None, None] * x0.double().numpy() + s[:, None, None, None] * z
        return 0.7 * xt + 0.1 * t[:, None, None, None], s

    e_k, s_k = eps_at(x_k, t_k, z_k)
    # retain: (1/D) || sigma s_theta + z ||^2 with s_theta = -eps / sigma
    score_k = -e_k / s_k[:, None, None, None]
    want_keep = ((s_k[:, None, None, None] * score_k + z_k) ** 2).reshape(6, -1).mean(1).mean()
    e_u, s_u = eps_at(x_u, t_u, z_u)
    # forget: sigma^2 <s_theta, grad log p(x_t|x0)> with grad log p = -z / sigma, per coordinate
    sig_u = s_u[:, None, None, None]
    prod = (sig_u ** 2 * (-e_u / sig_u) * (-z_u / sig_u))
    prod = prod.reshape(5, -1)
    if task == "square":
        want_forget = (prod ** 2).mean(1).mean() if released else (prod.mean(1) ** 2).mean()
    else:
        want_forget = -prod.mean(1).mean() if released else prod.mean(1).mean()
    assert l_keep.item() == pytest.approx(want_keep, rel=1e-5)
    assert l_forget.item() == pytest.approx(want_forget, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(0.99 * want_keep + 0.01 * want_forget, rel=1e-5, abs=1e-6)
    # off the forget steps only the weighted retain term is left
    torch.manual_seed(3)
    loss_off, _, none = M.msgm_loss(eps_fn, x_k, x_u, task, 0.01, forget_step=False)
    assert none is None and loss_off.item() == pytest.approx(0.99 * want_keep, rel=1e-5)


def test_forget_terms_geometry():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 10, generator=g)
    e = torch.randn(64, 10, generator=g)
    # orthogonal to z, row by row
    e_perp = e - (e * z).sum(1, keepdim=True) / (z * z).sum(1, keepdim=True) * z
    assert M.orthogonal_term(e_perp, z) < 1e-12                # the paper's orthogonality: a zero
    assert M.orthogonal_term(e_perp, z, released=True) > 0.1   # ... not of the element-wise square
    assert M.orthogonal_term(torch.zeros_like(z), z, released=True) == 0
    # eps = -z: the score points away from x_0 (obtuse) -> our obtuse term is at its low end, the
    # released one high
    away, toward = -z, z
    assert M.obtuse_term(away, z) < 0 < M.obtuse_term(toward, z)
    assert M.obtuse_term(away, z, released=True) > 0 > M.obtuse_term(toward, z, released=True)


# ------------------------------------------------------------------------------------------ 2-D toy

MEANS = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [0.0, 0.0]])
STDS = torch.tensor([0.7, 0.7, 0.4])
WEIGHTS = torch.tensor([0.4, 0.4, 0.2])      # the third component (at the origin) is undesirable


def toy_data(n, comps, g):
    k = torch.tensor(comps)[torch.randint(len(comps), (n,), generator=g)]
    return MEANS[k] + STDS[k, None] * torch.randn(n, 2, generator=g)


def exact_score(x, t):
    """grad log p_t(x) of the Gaussian mixture under the VP-SDE: each component becomes
    N(alpha m, alpha^2 s^2 + sigma^2)."""
    a, s = (torch.tensor(v, dtype=torch.float32) for v in hand_marginal(t))
    var = a ** 2 * STDS ** 2 + s ** 2                                   # [K]
    d = x[:, None, :] - a * MEANS[None]                                # [N, K, 2]
    logw = WEIGHTS.log() - (d ** 2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    r = torch.softmax(logw, 1)
    return (r[..., None] * (-d / var[None, :, None])).sum(1)


class ToyNet(nn.Module):
    """A tiny MLP eps_theta(x, t) with CondUNet's call signature (t in DDPM index units, a token
    that it ignores)."""
    tok = {"null": 0}

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x, t, c):
        t = torch.as_tensor(t, dtype=torch.float32).expand(len(x)) / 999
        f = torch.exp(torch.linspace(0, 5, 8)) * t[:, None]
        return self.net(torch.cat([x, f.sin(), f.cos()], 1))


def toy_train(net, task, steps, lam, released=False, every=1, seed=0):
    """task dsm: plain DSM on all three components (the all-data model); square / norm: MSGM with
    the third component undesirable."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    eps_fn = M.unconditional(net)
    for step in range(steps):
        comps = [0, 1, 2] if task == "dsm" else [0, 1]
        x_k, x_u = toy_data(256, comps, g), toy_data(256, [2], g)
        loss, _, _ = M.msgm_loss(eps_fn, x_k, x_u, task, lam, step % every == 0, released)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return net


def forget_cos(net):
    c = M.score_cosine(M.unconditional(net), toy_data(4000, [2], torch.Generator().manual_seed(9)))
    return np.mean(list(c.values()))


@pytest.fixture(scope="module")
def toy_normal():
    # Tiny tensors: one thread avoids OpenMP wake-up costs that dominate (and explode on a busy
    # machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield toy_train(ToyNet(), "dsm", 1500, 0.0)
    torch.set_num_threads(threads)


def test_toy_normal_model_learns_the_exact_mixture_score(toy_normal):
    """The continuous-time DSM loss and the -eps/sigma conversion recover the analytic score
    (direction and size)."""
    g = torch.Generator().manual_seed(5)
    for t, min_cos, max_err in ((0.3, 0.85, 0.05), (0.6, 0.97, 0.02)):
        a, s = hand_marginal(t)
        x_0 = toy_data(3000, [0, 0, 1, 1, 2], g)
        x_t = float(a) * x_0 + float(s) * torch.randn(3000, 2, generator=g)
        with torch.no_grad():
            model = C.VP().score(toy_normal, x_t, torch.full((3000,), t), None)
        exact = exact_score(x_t, t)
        cos = torch.nn.functional.cosine_similarity(model, exact, dim=1).mean()
        rel_err = (model - exact).square().sum(1).mean() / exact.square().sum(1).mean()
        assert cos > min_cos and rel_err < max_err, (t, cos, rel_err)
    # the all-data score on perturbed undesirable points agrees with their conditional score
    # (acute angle)
    assert forget_cos(toy_normal) > 0.2


def test_toy_forget_terms_point_the_score_where_their_names_say(toy_normal):
    """300 MSGM steps (weight 0.3, every step) from the all-data model, against the same
    fine-tuning on kept data only: Obtuse (ours) makes the mean cosine between the model score and
    grad log p(x_t|x_0) of undesirable points negative, the released sign makes it positive,
    Orthogonal brings it to about 0.
    Measured: all-data 0.32, kept-only 0.08, obtuse -0.18, released sign 0.22, orthogonal 0.01."""
    base = forget_cos(toy_normal)

    def run(task, lam, released=False):
        return forget_cos(toy_train(copy.deepcopy(toy_normal), task, 300, lam, released))
    keep_only, obtuse = run("norm", 0.0), run("norm", 0.3)
    released, ortho = run("norm", 0.3, True), run("square", 0.3)
    assert obtuse < -0.1 and obtuse < keep_only - 0.15, (base, keep_only, obtuse)
    assert released > 0.1 and released > keep_only + 0.08, (base, keep_only, released)
    assert abs(ortho) < 0.5 * abs(keep_only) and abs(ortho) < 0.2 * base, (base, keep_only, ortho)


# ------------------------------------------------------------------------------------------ digits


def test_short_digits_run_writes_the_report_and_moves_the_angle(digits_base, digits_classifier,
                                                                 runs_dir):
    # EMA 0.5: with the default 0.995 forty steps barely reach the evaluated (EMA) weights
    # (measured: no change)
    r = run_script("msgm.py", "--finetune", "--base", str(digits_base[0]), "--forget", "1,5",
                   "--task", "norm", "--steps", "40", "--forget-weight", "0.5", "--forget-every",
                   "1", "--ema", "0.5", "--n-samples", "300", "--sample-steps", "10", "--n-nll",
                   "12", "--tag", "ci")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("forget_rate", "retain_acc", "fid_retain", "seconds", "nfe", "params",
              "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd", "base_forget_rate",
              "base_retain_acc", "base_fid_retain", "base_nll_kept_bpd", "forget_rate_lo",
              "forget_rate_hi", "cos_forget@0.1"):
        assert k in m, k
    assert m["n_samples"] == 300 and m["nfe"] == 10
    assert m["forget_rate_lo"] <= m["forget_rate"] <= m["forget_rate_hi"]
    out = runs_dir / "msgm-digits-ci"
    files = ("args.json", "model.safetensors", "samples.png", "samples.pt", "metrics.json")
    assert all((out / f).exists() for f in files)
    s = torch.load(out / "samples.pt")
    assert s["x"].shape == (300, 1, 8, 8) and (s["c"] == s["null"]).all()
    assert s["sampler"] == "ddim-10"
    assert C.load_checkpoint(out / "model.safetensors", "digits")[0].tok["null"] == s["null"]
    # Obtuse steps turn the score on undesirable images away from them more than on kept images
    # (measured in one run: forget cosine 0.837 -> 0.791 at t = 0.1 and 0.928 -> 0.905 at t = 0.3;
    # kept 0.828 -> 0.820, 0.939 -> 0.930)
    for t in ("0.1", "0.3"):
        drop_forget = m[f"base_cos_forget@{t}"] - m[f"cos_forget@{t}"]
        drop_keep = m[f"base_cos_kept@{t}"] - m[f"cos_kept@{t}"]
        assert drop_forget > 0.015 and drop_forget > 2 * drop_keep, (t, drop_forget, drop_keep)


def test_from_scratch_experiment_shares_its_cached_references(digits_classifier, runs_dir):
    """The paper's first experiment: normal (all data), retrain (kept data) and MSGM on one recipe,
    from scratch. A second variant with the same recipe and seed reuses the cached normal and
    retrain (their figures are identical and nothing is retrained); load_checkpoint reads them."""
    small = ["--no-finetune", "--normal", "scratch", "--scratch-steps", "30", "--n-samples", "100",
             "--sample-steps", "3", "--n-nll", "2", "--nll-tol", "0.01", "--seed", "7"]
    first = run_script("msgm.py", *small, "--tag", "scratch-a")
    cache = [runs_dir / f"msgm-digits-dsm-c{c}-s7" / "model.safetensors"
             for c in ("0123456789", "012345678")]
    stamps = [p.stat().st_mtime_ns for p in cache]
    second = run_script("msgm.py", *small, "--task", "square", "--released", "--tag", "scratch-b")
    assert first.returncode == 0 and second.returncode == 0, \
        (first.stderr[-2000:], second.stderr[-2000:])
    a, b = (json.loads(r.stdout.strip().splitlines()[-1])["models"] for r in (first, second))
    assert list(a) == ["normal (all data)", "retrain (kept data)", "Obtuse-MSGM"]
    assert list(b) == ["normal (all data)", "retrain (kept data)", "Orthogonal-MSGM (released)"]
    for ref in ("normal (all data)", "retrain (kept data)"):
        assert a[ref] == b[ref]
    assert [p.stat().st_mtime_ns for p in cache] == stamps     # read, not retrained
    # each cached reference is a model file like any other: load_checkpoint reads it
    for path in cache:
        model, ck = C.load_checkpoint(path, "digits")
        assert ck["step"] == 30 and C.n_params(model) == 1_001_121


@pytest.mark.parametrize("argv, message, as_process", [
    (["--task", "erase"], "unknown --task", True),
    (["--task", "dsm"], "unknown --task", False),
    (["--forget", "0,1,2,3,4,5,6,7,8,9"], "no kept class", False),
    (["--forget", "12"], "out of range", False),
])
def test_bad_input_is_one_line_error_before_any_work(argv, message, as_process, runs_dir, capsys):
    before = sorted(runs_dir.glob("msgm-*")) + sorted(runs_dir.glob("msgm-*/**/*"))
    r = run_script("msgm.py", *argv) if as_process else run_here(M, argv, capsys)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.glob("msgm-*")) + sorted(runs_dir.glob("msgm-*/**/*")) == before


def test_32px_training_step_constructs(tmp_path):
    """The MNIST / CIFAR-10 path (fake images of the right shape): two MSGM steps (flips on
    CIFAR-10) run and change the weights."""
    for name in ("mnist", "cifar10"):
        model = C.CondUNet(name)
        x = torch.rand(4, model.info.channels, 32, 32) * 2 - 1
        before = model.unet.conv_out.weight.detach().clone()
        args = C.make_args(M.Args, dataset=name, task="square", forget_every=1, save_every=0)
        hp = replace(M.recipe(args, scratch=True), steps=2, batch_size=2)
        save = dict(path=tmp_path / "resume.pt", key={}, every=0)
        ema, _ = M.train(model, x, x.flip(0), hp, "cpu", save, hflip=name == "cifar10", desc=name)
        assert not torch.equal(model.unet.conv_out.weight, before)
        assert ema is not model and torch.isfinite(ema.unet.conv_out.weight).all()


def test_losses_run_the_same_when_copied_out():
    """Each function in LOSSES, re-created from its source in a namespace holding only torch and
    math, gives the same result as the original on tiny tensors (and the VP marginal agrees with
    common.VP and the hand formula)."""
    ns = isolated(M.LOSSES)
    g = torch.Generator().manual_seed(4)
    x0, z, eps = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([1e-5, 0.4, 1.0])
    for a, b in zip(ns["vp_marginal"](t), M.vp_marginal(t)):
        assert torch.equal(a, b)
    assert np.allclose(M.vp_marginal(t.double())[1].numpy(), hand_marginal(t.numpy())[1], rtol=1e-6)
    assert torch.allclose(M.vp_marginal(t)[0], C.VP().marginal(t)[0])
    assert torch.equal(ns["perturb"](x0, t, z), M.perturb(x0, t, z))
    assert torch.equal(ns["retain_term"](eps, z), M.retain_term(eps, z))
    for released in (False, True):
        assert torch.equal(ns["orthogonal_term"](eps, z, released),
                           M.orthogonal_term(eps, z, released))
        assert torch.equal(ns["obtuse_term"](eps, z, released), M.obtuse_term(eps, z, released))

    def eps_fn(x, t):
        return 0.5 * x - t.view(-1, 1, 1, 1)
    for task in ("square", "norm", "dsm"):
        torch.manual_seed(7)
        copied = ns["msgm_loss"](eps_fn, x0, z, task, 0.3, True)
        torch.manual_seed(7)
        original = M.msgm_loss(eps_fn, x0, z, task, 0.3, True)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(copied, original))
        assert copied[0].item() != 0
    with pytest.raises(ValueError, match="unknown task"):
        M.msgm_loss(eps_fn, x0, z, None, 0.3, True)   # no silent fallback to plain DSM


@pytest.mark.parametrize("task, forget_step", [("norm", True), ("square", True), ("norm", False),
                                               ("dsm", False)])
def test_step_runs_the_same_when_copied_out(task, forget_step):
    """msgm_step, re-created from its source in a namespace holding only torch, math, the LOSSES
    and MSGMHparams, makes the same update as the original on a digits CondUNet (same seed, same
    batch, a fresh Adam each): the weights and the EMA weights after the step are equal, and
    moved."""
    ns = isolated([*M.LOSSES, *M.STEPS], extra={hparams(M).__name__: hparams(M)})
    hp = M.MSGMHparams(task=task, forget_weight=0.5, batch_size=4, ema=0.5)
    torch.manual_seed(0)
    start = C.CondUNet("digits")
    g = torch.Generator().manual_seed(1)
    x_keep = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    x_forget = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1 if forget_step else None
    results = []
    for step in (ns["msgm_step"], M.msgm_step):
        model = copy.deepcopy(start)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ema = C.EMA(model, hp.ema)
        scaler, ctx = C.grad_scaler("cpu", False), C.autocast("cpu", False)
        torch.manual_seed(2)
        losses = step(M.unconditional(model), model, opt, scaler, ema, x_keep, x_forget,
                      forget_step, hp, ctx)
        results.append((model, ema.model, losses))
    (copied, copied_ema, copied_losses), (original, original_ema, original_losses) = results
    for a, b in zip(copied.parameters(), original.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(copied_ema.parameters(), original_ema.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(original.parameters(), start.parameters()))
    assert copied_losses[0] == original_losses[0]
    assert math.isnan(copied_losses[1]) == (not forget_step)
    if forget_step:
        assert copied_losses[1] == original_losses[1]


def test_the_default_normal_model_is_the_cached_base(digits_base):
    """By default (the quick fine-tuning experiment) normal is the base model the other methods
    start from, read from its cache, not trained here; --normal scratch asks for one trained from
    scratch."""
    x, y = C.load_data("digits")
    keep = y != 9
    args = C.make_args(M.Args, control=False)
    refs = M.references(args, x, x[keep], list(range(9)), C.data_info("digits"), "cpu")
    assert list(refs) == ["normal (all data)"]
    model, seconds, path = refs["normal (all data)"]
    assert path == digits_base[0] and seconds is None
    assert torch.equal(model.unet.conv_out.weight, digits_base[1].unet.conv_out.weight)
    with pytest.raises(C.UsageError, match="unknown --normal 'pretrained'"):
        M.check(C.make_args(M.Args, normal="pretrained"), C.data_info("digits"))
