"""sfd.py: the one-step generator against the x0-prediction, the SiD loss against its expanded
form, the loss functions and the two steps copied into a bare namespace, which network each step
may change, which label each network sees, a short end-to-end run that forgets and whose model the
file loads again, an interrupted run that resumes to the same weights, two gloo processes under
torchrun against one (and which handle of each network each step gets there), and (on a GPU) a few
mixed-precision steps."""
import contextlib
import copy
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn as nn
from conftest import hparams, isolated, run_here, run_script

import common as C
import sfd

# ------------------------------------------------------------------------------------ generator


def test_init_coefficients_match_diffusers_schedule():
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    ab = scheduler.alphas_cumprod[440].item()
    b, sigma = (float(v) for v in sfd.init_coefs(C.VP().alpha_bar, 440))
    assert b == pytest.approx((1 - ab) ** 0.5, rel=1e-5)
    assert sigma == pytest.approx(((1 - ab) / ab) ** 0.5, rel=1e-5)
    assert b == pytest.approx(0.9286, abs=1e-4)
    assert sigma == pytest.approx(2.5023, abs=1e-3)      # SiD's sigma_init 2.5


def test_generator_is_the_x0_prediction_at_t_init(digits_base):
    _, model = digits_base
    vp = C.VP()
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 9])
    b = float(sfd.init_coefs(vp.alpha_bar, 440)[0])
    t = torch.full((6,), 440)
    with torch.no_grad():
        x = sfd.generate(model, z, c, 440, vp.alpha_bar)
        x_t = b * z
        expected = vp.eps_to_x0(x_t, t, model(x_t, t.float(), c))
        # the official code's route: x_t / a - sigma eps, a = sqrt(abar), sigma = sqrt(1 / abar - 1)
        ab = vp.alpha_bar[440].item()
        official = x_t / ab ** 0.5 - (1 / ab - 1) ** 0.5 * model(x_t, t.float(), c)
    assert torch.allclose(x, expected, atol=1e-5) and torch.allclose(x, official, atol=1e-5)
    assert x.std() > 0.3                                 # a real image-scale output, not a constant


# ------------------------------------------------------------------------------------- SiD loss


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_sid_loss_matches_expanded_form(alpha):
    g = torch.Generator().manual_seed(1)
    f_phi, f_psi, x = (torch.randn(5, 1, 8, 8, generator=g) for _ in range(3))
    d = (f_phi - f_psi).flatten(1)
    omega = (f_phi - x).abs().flatten(1).mean(1)
    expanded = ((1 - alpha) * d.square().sum(1) + (d * (f_psi - x).flatten(1)).sum(1)) / omega
    loss = sfd.sid_loss(f_phi, f_psi, x, alpha).item()
    assert loss == pytest.approx(expanded.mean().item(), rel=1e-5)
    # With f_phi, f_psi held fixed the gradient in x is -(f_phi - f_psi) / (omega B): omega carries
    # no gradient and x enters through (f_phi - x), not detached.
    x = x.clone().requires_grad_(True)
    sfd.sid_loss(f_phi, f_psi, x, alpha).backward()
    assert torch.allclose(x.grad, -(f_phi - f_psi) / omega.view(-1, 1, 1, 1) / 5, atol=1e-6)


def test_sid_loss_normaliser_is_floored():
    x = torch.zeros(2, 1, 2, 2)
    f_phi, f_psi = x.clone(), torch.full_like(x, 1e-3)     # f_phi = x: omega would be 0
    loss = sfd.sid_loss(f_phi, f_psi, x, 1.2).item()
    assert loss == pytest.approx(-1.2 * 4 * 1e-6 / 1e-5, rel=1e-4)


# ----------------------------------------------------------------------------------- copy-paste


def _tiny(x, t, c):
    """A stand-in eps-network: depends on x, t and c, differentiable in x."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(len(x)).view(-1, 1, 1, 1)
    return torch.tanh(0.5 * x + t / 1000 + 0.1 * c.view(-1, 1, 1, 1).to(x.dtype))


def test_loss_functions_work_when_copied_alone():
    """Each function of sfd.LOSSES, re-created from its source in a namespace holding only torch and
    math, gives what the original gives (same seed for the ones that draw t and noise), gradients
    included."""
    ns = isolated(sfd.LOSSES)
    assert set(ns) == {fn.__name__ for fn in sfd.LOSSES}
    ab = C.VP().alpha_bar
    g = torch.Generator().manual_seed(3)
    x, z, eps = (torch.randn(4, 1, 3, 3, generator=g) for _ in range(3))
    f_psi = torch.randn(4, 1, 3, 3, generator=g)
    c, c2 = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])
    t = torch.tensor([38, 200, 440, 711])

    def fake(a, b, k):
        return 0.9 * _tiny(a, b, k)
    calls = {
        "init_coefs": lambda f, x: torch.stack(f(ab, 440)),
        "generate": lambda f, x: f(_tiny, z, c, 440, ab),
        "diffuse": lambda f, x: f(x, t, eps, ab),
        "predict_x0": lambda f, x: f(_tiny, x, t, c, ab),
        "fake_score_loss": lambda f, x: f(_tiny, x, c, ab, 38, 712),
        "sid_loss": lambda f, x: f(x.detach() + 0.1, f_psi, x, 1.2),
        "generator_loss": lambda f, x: f(_tiny, fake, x, c, c2, ab, 1.2, 38, 712),
    }
    assert set(calls) == set(ns)
    for name, call in calls.items():
        out = []
        for f in (getattr(sfd, name), ns[name]):
            torch.manual_seed(7)
            xg = x.clone().requires_grad_()
            v = call(f, xg)
            grad = None
            if v.requires_grad:
                grad = torch.autograd.grad(v.sum(), xg)[0]
            out.append((v.detach(), grad))
        (a, ga), (b, gb) = out
        assert a.shape == b.shape and torch.equal(a, b), name
        assert (ga is None and gb is None) or torch.equal(ga, gb), name
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name   # a real value, not empty


# -------------------------------------------------------------------------------- the two steps


class Recorder(nn.Module):
    """Wraps a network and remembers the labels it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.info, self.labels = net, net.info, []

    def forward(self, x, t, c):
        self.labels.append(c.clone())
        return self.net(x, t, c)


IMG = (1, 8, 8)   # digits: channels, size, size
NO_SCALER = C.grad_scaler("cpu", False)   # the pass-through a CPU run uses


def _shared(hp) -> dict:
    """What both steps take besides the networks, optimizer and labels: a CPU run's values."""
    return dict(scaler=NO_SCALER, ctx=contextlib.nullcontext(), img=IMG,
                alpha_bar=C.VP().alpha_bar, hp=hp)


def _nets(model):
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher, copy.deepcopy(model), copy.deepcopy(model)


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(net, snap):
    return any(not torch.equal(p, q) for p, q in zip(net.parameters(), snap))


def test_each_step_changes_only_its_own_network(digits_base):
    _, model = digits_base
    torch.manual_seed(0)
    teacher, fake, gen = _nets(model)
    shared = _shared(sfd.Args(batch_size=4))
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-4, betas=(0.0, 0.999))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.0, 0.999))
    c = torch.tensor([2, 3, 4, 5])
    cf = torch.zeros(4, dtype=torch.long)
    co = torch.ones(4, dtype=torch.long)
    nets = {"teacher": teacher, "fake": fake, "gen": gen}
    snaps = {n: _snapshot(m) for n, m in nets.items()}
    sfd.fake_score_step(generator=gen, fake_score=fake, opt=opt_f, c=c, c_forget=cf, **shared)
    assert {n: _changed(m, snaps[n]) for n, m in nets.items()} == \
        {"teacher": False, "fake": True, "gen": False}
    snaps = {n: _snapshot(m) for n, m in nets.items()}
    sfd.generator_step(generator=gen, teacher=teacher, fake_score=fake, opt=opt_g, c=c,
                       c_forget=cf, c_override=co, **shared)
    assert {n: _changed(m, snaps[n]) for n, m in nets.items()} == \
        {"teacher": False, "fake": False, "gen": True}
    assert all(p.grad is None for p in teacher.parameters())


def test_forget_term_routes_override_label_to_teacher_and_forget_label_to_fake(digits_base):
    """Teacher sees [c, c_o], fake score sees [c, c_f], the generator draws [c, c_f]. With fake =
    teacher the distillation term vanishes (its gradient is rounding noise), so the generator's
    gradient is the forget term."""
    _, model = digits_base
    torch.manual_seed(0)
    teacher, fake, gen = (Recorder(m) for m in _nets(model))
    c, cf, co = torch.tensor([2, 3, 4, 5]), torch.full((4,), 7), torch.full((4,), 8)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.0)      # keep the weights: we compare gradients

    def grad_max():
        return max(p.grad.abs().max().item() for p in gen.parameters() if p.grad is not None)

    def step(forget_coef):
        return sfd.generator_step(generator=gen, teacher=teacher, fake_score=fake, opt=opt_g, c=c,
                                  c_forget=cf, c_override=co,
                                  **_shared(sfd.Args(forget_coef=forget_coef)))
    logs = step(0.0)
    assert logs["g_remain"] == 0.0 and "g_forget" not in logs
    remain_only = grad_max()
    for rec in (teacher, fake, gen):
        rec.labels.clear()
    logs = step(0.01)
    assert logs["g_remain"] == 0.0 and logs["g_forget"] != 0.0
    assert remain_only < 1e-4 * grad_max()

    def same(got, want):
        return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert same(teacher.labels, [c, co]) and same(fake.labels, [c, cf])
    assert same(gen.labels, [c, cf])


def test_steps_work_when_copied_alone():
    """sfd.STEPS compiled from their source in a namespace holding only torch, math, sfd.LOSSES and
    SFDHparams (as a user copies them): a fake-score step, then a generator step, move a tiny
    model's fake score and generator exactly as the originals do, from the same weights and seed
    with fresh Adams each; and both moved, the teacher not."""
    hp_class = hparams(sfd)
    assert hp_class is sfd.SFDHparams
    ns = isolated([*sfd.LOSSES, *sfd.STEPS], extra={hp_class.__name__: hp_class})
    shared = _shared(hp_class(forget_coef=0.5))
    c = torch.tensor([2, 3, 4, 5])
    cf = torch.zeros(4, dtype=torch.long)
    co = torch.ones(4, dtype=torch.long)
    moved = []
    for fake_step, gen_step in ((sfd.fake_score_step, sfd.generator_step),
                                (ns["fake_score_step"], ns["generator_step"])):
        torch.manual_seed(0)
        teacher, fake, gen = _nets(C.CondUNet("digits"))
        start = [_snapshot(m) for m in (teacher, fake, gen)]
        opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.999))
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.0, 0.999))
        torch.manual_seed(1)     # the steps draw noise, t and dropout from torch's generator
        logs = fake_step(generator=gen, fake_score=fake, opt=opt_f, c=c, c_forget=cf, **shared)
        logs |= gen_step(generator=gen, teacher=teacher, fake_score=fake, opt=opt_g, c=c,
                         c_forget=cf, c_override=co, **shared)
        assert set(logs) == {"fake_remain", "fake_forget", "g_remain", "g_forget"}
        assert all(math.isfinite(v) for v in logs.values()), logs
        assert [_changed(m, s) for m, s in zip((teacher, fake, gen), start)] == [False, True, True]
        moved.append([p.detach().clone() for m in (fake, gen) for p in m.parameters()])
    assert ns["generator_step"] is not sfd.generator_step
    assert ns["generator_step"].__globals__ is not sfd.__dict__
    assert all(torch.equal(a, b) for a, b in zip(*moved))


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("argv, message, as_process", [
    (["--forget", "12"], "out of range", True),
    (["--override", "0"], "equals --forget", False),
    (["--iters", "0"], "needs --init", False),
    (["--init", "BASE"], "not an sfd.py run", False),
])
def test_bad_input_is_one_line_error(argv, message, as_process, digits_base, runs_dir, capsys):
    argv = [str(digits_base[0]) if a == "BASE" else a for a in argv]
    before = sorted(runs_dir.rglob("*"))
    r = run_script("sfd.py", *argv) if as_process else run_here(sfd, argv, capsys)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before


CI_FLAGS = ["--iters", "60", "--batch-size", "16", "--lr-g", "5e-4", "--lr-fake", "5e-4",
            "--ema", "0.5", "--n-per-class", "20", "--sample-steps", "10", "--n-nll", "2",
            "--nll-tol", "0.001", "--log-every", "20"]
FIGURES = ("forget_rate", "override_rate", "retain_acc", "fid_retain")
NLL = ("nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd")


def test_short_run_lowers_forget_rate(digits_base, digits_classifier, runs_dir):
    # Calibrated on the CI base: forget rate 0.95 -> 0.67 (30 iterations) -> 0.00 (50, 60),
    # retain 0.98.
    r = run_script("sfd.py", *CI_FLAGS, "--tag", "ci")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    out = runs_dir / "sfd-digits-ci"
    files = ("args.json", "model.safetensors", "samples.pt", "samples.png", "metrics.json")
    assert all((out / f).exists() for f in files)
    assert m == json.loads((out / "metrics.json").read_text())
    assert m["nfe"] == 1 and m["base_nfe"] == 10 and m["images_per_s"] > m["base_images_per_s"]
    assert m["base_forget_rate"] >= 0.8                      # the CI base draws its zeros
    assert m["forget_rate"] <= m["base_forget_rate"] - 0.5   # ... the generator mostly does not
    assert m["retain_acc"] >= 0.7                            # and the kept classes survive
    # the common keys: no likelihood for a one-step generator, the base's from the probability-flow
    # ODE
    assert all(m[k] is None for k in NLL)
    assert all(math.isfinite(m[f"base_{k}"]) for k in NLL)
    assert m["params"] == m["base_params"] == C.n_params(digits_base[1]) and m["seconds"] > 0
    assert [p["iter"] for p in m["curve"]] == [0, 20, 40, 60]
    assert m["curve"][0]["forget_rate"] >= 0.8
    s = C.load(out / "samples.pt")
    assert s["nfe"] == 1 and s["x"].shape == (200, 1, 8, 8)
    assert torch.equal(s["c"], C.class_tokens(10, 20))
    ck = C.load(out / "model.safetensors")
    assert ck["method"] == "sfd" and ck["t_init"] == 440 and ck["forget"] == 0 and "fake" in ck
    # the model is loaded again by --init: evaluating it alone draws the same samples, so the same
    # figures
    r = run_script("sfd.py", *CI_FLAGS, "--init", str(out / "model.safetensors"), "--iters", "0",
                   "--tag", "ci-re")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert torch.equal(C.load(runs_dir / "sfd-digits-ci-re" / "samples.pt")["x"], s["x"])
    assert {k: again[k] for k in FIGURES} == {k: m[k] for k in FIGURES}


# ------------------------------------------------------------------------------------ long runs


TINY = dict(iters=10, batch_size=4, lr_g=5e-4, lr_fake=5e-4, ema=0.5, log_every=5, n_per_class=2,
            sample_steps=2, n_nll=0)


def test_interrupted_run_resumes_to_the_same_weights(digits_base, digits_classifier, runs_dir,
                                                     monkeypatch):
    """Interrupted in iteration 7 with a checkpoint every 4, a rerun with the same arguments
    continues from 4 and ends with the weights of an uninterrupted run, bit for bit."""
    for t in ("whole", "cut"):                  # a runs/ kept between sessions may hold older runs
        shutil.rmtree(runs_dir / f"sfd-digits-{t}", ignore_errors=True)
    whole = sfd.main(C.make_args(sfd.Args, tag="whole", save_every=4, **TINY))
    step, calls = sfd.generator_step, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == 7 and interrupt:
            raise KeyboardInterrupt
        return step(*a, **k)
    monkeypatch.setattr(sfd, "generator_step", counted)
    args, interrupt = C.make_args(sfd.Args, tag="cut", save_every=4, **TINY), True
    with pytest.raises(KeyboardInterrupt):
        sfd.main(args)
    out = runs_dir / "sfd-digits-cut"
    assert (out / "resume.pt").exists() and not (out / "model.safetensors").exists()
    calls.clear()
    interrupt = False
    resumed = sfd.main(args)
    assert len(calls) == 10 - 4                 # it continued from the checkpoint of iteration 4
    assert not (out / "resume.pt").exists()     # and the finished run leaves no checkpoint behind
    a, b = (C.load(runs_dir / f"sfd-digits-{t}" / "model.safetensors") for t in ("whole", "cut"))
    for key in ("model", "fake", "generator_raw"):      # EMA generator, fake score, raw generator
        assert a[key].keys() == b[key].keys(), key
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [p["iter"] for p in resumed["curve"]] == [0, 5, 10]
    assert resumed["curve"] == whole["curve"]
    assert resumed["forget_rate"] == whole["forget_rate"] and resumed["seconds"] > 0


DDP_SCRIPT = """
import sys, torch, common as C, sfd
distill, steps = sfd.distill, {s.__name__: s for s in sfd.STEPS}
labels, losses, handles = [], [], {}
def handle_names(kw):   # each network argument: its type, and the id of the module it calls
    return {k: (type(v).__name__, id(getattr(v, "module", v)))
            for k, v in kw.items() if isinstance(v, torch.nn.Module)}
def fake_score_step(**kw):      # the handles it gets, the same at every call
    assert handles.setdefault("fake_score_step", handle_names(kw)) == handle_names(kw)
    return steps["fake_score_step"](**kw)
def generator_step(**kw):       # the handles, each process's labels and its own generator losses
    assert handles.setdefault("generator_step", handle_names(kw)) == handle_names(kw)
    labels.append(kw["c"].clone())
    losses.append(steps["generator_step"](**kw))
    return losses[-1]
def keep(teacher, generator, fake_score, forget, args, out, on_check):   # what each process saw
    result = distill(teacher, generator, fake_score, forget, args, out, on_check)
    saw = {"gen": generator.state_dict(), "labels": torch.stack(labels), "losses": losses,
           "handles": handles}
    torch.save(saw, out / f"rank{C.distributed()[0]}.pt")
    return result
sfd.distill, sfd.fake_score_step, sfd.generator_step = keep, fake_score_step, generator_step
C.cli(sfd.main, sfd.Args, sys.argv[1:])
"""


def test_two_gloo_processes_follow_the_curve_of_one(digits_base, digits_classifier, runs_dir):
    """torchrun --nproc_per_node 2 on the CPU (gloo) against one process with the same global batch
    of 16: each step trains its network through the DDP wrapper and only reads the other through
    the module itself; each process draws its own 8 labels per iteration, both end with the same
    weights (DDP averages the gradients), the logged losses are the means of the two processes'
    own, and they follow the single process's curve within noise: per loss, the mean over the 16
    iterations of the difference between the two runs lies within 5 standard errors of zero (a
    paired test; the runs draw different noise, so single iterations differ, but a systematic
    offset such as a wrong loss scale or a diverging run does not average out)."""
    flags = ["--iters", "16", "--batch-size", "16", "--log-every", "1", "--n-per-class", "2",
             "--sample-steps", "2", "--n-nll", "0"]
    one = run_script("sfd.py", *flags, "--tag", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "--no-python", sys.executable, "-c", DDP_SCRIPT, *flags, "--tag", "two",
                     "--threads", "1")   # 1 per core
    assert two.returncode == 0, two.stderr[-3000:]
    assert "iterations of batch 16 (2 processes)" in two.stdout
    ranks = [torch.load(runs_dir / "sfd-digits-two" / f"rank{r}.pt") for r in (0, 1)]
    for r in ranks:     # the trained handle: DDP; the read one: the module the wrapper calls
        psi_step, theta_step = r["handles"]["fake_score_step"], r["handles"]["generator_step"]
        assert {k: v[0] for k, v in psi_step.items()} == \
            {"generator": "CondUNet", "fake_score": "DistributedDataParallel"}
        assert {k: v[0] for k, v in theta_step.items()} == {
            "generator": "DistributedDataParallel", "teacher": "CondUNet", "fake_score": "CondUNet"}
        assert psi_step["generator"][1] == theta_step["generator"][1]
        assert psi_step["fake_score"][1] == theta_step["fake_score"][1]
    # 8 kept labels each, not the same ones
    assert all(r["labels"].shape == (16, 8) and (r["labels"] != 0).all() for r in ranks)
    assert not torch.equal(ranks[0]["labels"], ranks[1]["labels"])
    gens, base = [r["gen"] for r in ranks], digits_base[1].state_dict()
    assert all(torch.equal(gens[0][k], gens[1][k]) for k in base)    # one model in two places
    assert any(not torch.equal(gens[0][k], base[k]) for k in base)   # that did train
    curves = [json.loads((runs_dir / f"sfd-digits-{t}" / "metrics.json").read_text())["curve"][1:]
              for t in ("one", "two")]
    assert [p["iter"] for p in curves[0]] == [p["iter"] for p in curves[1]] == list(range(1, 17))
    for i, logged in enumerate(curves[1]):
        for key in ("g_remain", "g_forget"):
            mean = (ranks[0]["losses"][i][key] + ranks[1]["losses"][i][key]) / 2
            assert logged[key] == pytest.approx(mean, rel=1e-6, abs=1e-9)
    for key in ("fake_remain", "fake_forget", "g_remain", "g_forget"):
        d = torch.tensor([a[key] - b[key] for a, b in zip(*curves)], dtype=torch.float64)
        assert d.mean().abs() <= 5 * d.std() / math.sqrt(len(d)), (key, d.tolist())


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_few_mixed_precision_iterations_at_mnist_size_on_cuda(tmp_path, monkeypatch):
    """Three iterations on MNIST-sized stand-in tensors (the GPU machine may have no network) with
    --amp: a random-weight base in MNIST's architecture, a classifier trained on the stand-ins, the
    whole run to metrics.json. Checks that the path runs and stays finite, not what it learns."""
    g = torch.Generator().manual_seed(0)
    data = {split: (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.arange(n) % 10)
            for split, n in (("train", 200), ("test", 50))}
    monkeypatch.setattr(C, "load_data",
                        lambda name="digits", root="data", split="train": data[split])
    monkeypatch.setattr(C, "RUNS", tmp_path)   # the stand-in base and classifier stay out of runs/
    C.seed_everything(0)
    C.save_checkpoint(C.base_path("mnist"), C.CondUNet("mnist"), 0, done=True)
    args = C.make_args(sfd.Args, dataset="mnist", device="cuda", amp=True, iters=3, batch_size=8,
                       log_every=1, n_per_class=2, sample_steps=2, n_nll=0, tag="cuda")
    m = sfd.main(args)
    assert m["nfe"] == 1 and [p["iter"] for p in m["curve"]] == [0, 1, 2, 3]
    losses = ("fake_remain", "g_remain", "g_forget")
    assert all(math.isfinite(p[k]) for p in m["curve"][1:] for k in losses)
    ck = C.load(tmp_path / "sfd-mnist-cuda" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    x = C.load(tmp_path / "sfd-mnist-cuda" / "samples.pt")["x"]
    assert x.shape == (20, 1, 32, 32) and torch.isfinite(x).all()
