"""Every metric the five methods report, and a command that evaluates one model.

  CLASSIFIER  a small CNN per dataset, trained once and cached; it judges generated samples
  CLASS       per-class accuracy of samples, forget rate, retain accuracy, Inception-style score
  FID         Frechet distance between feature Gaussians (pytorch-fid's formula; classifier features)
  NLL         exact likelihood in bits/dim through the probability-flow ODE (score_sde's likelihood.py)
  COPIES      share of samples that are near-copies (L2) of given images (data unlearning)
  COMPARISON  the five methods forget one class; every resulting model gets the same evaluation

    python eval.py                                  # digits, the cached base model
    python eval.py --ckpt runs/x/model.pt --forget 0,3
    python eval.py compare                          # five methods + base + retrain, 3 seeds: runs/compare-digits/
    python eval.py compare --dataset mnist --device cuda
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.integrate import solve_ivp

import common as C

# ----------------------------------------------------------------------------------------------------------
# CLASSIFIER
# ----------------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Three conv layers and a 128-d penultimate layer (the FID features)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(512, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(dataset: str, root: str = "data", device="cpu", epochs: int = 0, seed: int = 0):
    """Train on the train split with +-1 pixel shifts (generated digits are rarely centred exactly)."""
    info = C.data_info(dataset)
    x, y = C.load_data(dataset, root, "train")
    epochs = epochs or (60 if dataset == "digits" else 5)
    C.seed_everything(seed)
    clf = Classifier(info.channels, info.num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / 128))
    for _ in C.tqdm(range(epochs), desc=f"classifier ({dataset})", leave=False):
        for idx in torch.randperm(len(x)).split(128):
            xb = x[idx].to(device)
            dx, dy = np.random.randint(-1, 2, size=2)
            xb = torch.roll(xb, shifts=(int(dx), int(dy)), dims=(2, 3))
            loss = F.cross_entropy(clf(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    xt, yt = C.load_data(dataset, root, "test")
    clf.eval()
    acc = (predict(clf, xt) == yt).float().mean().item()
    return clf, acc


def load_classifier(dataset: str = "digits", root: str = "data", device="cpu") -> Classifier:
    """The cached classifier (trained on first use); its held-out accuracy is `clf.test_acc`."""
    info = C.data_info(dataset)
    path = C.RUNS / f"classifier-{dataset}" / "model.pt"
    if path.exists():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            clf = Classifier(info.channels, info.num_classes)
            clf.load_state_dict(ck["model"])
        except Exception:
            raise C.UsageError(f"cannot read classifier checkpoint {path}; delete it to retrain") from None
        acc = ck["test_acc"]
    else:
        clf, acc = train_classifier(dataset, root, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": clf.state_dict(), "test_acc": acc}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    clf = clf.to(device).eval().requires_grad_(False)
    clf.test_acc = acc
    return clf


@torch.no_grad()
def _batched(fn, x, batch=1000):
    dev = next(fn.parameters()).device
    return torch.cat([fn(b.to(dev)).cpu() for b in x.split(batch)])


def predict(clf, x) -> torch.Tensor:
    return _batched(clf, x).argmax(1)


def features(clf, x) -> np.ndarray:
    return _batched(clf.body, x).double().numpy()


# ----------------------------------------------------------------------------------------------------------
# CLASS METRICS
# ----------------------------------------------------------------------------------------------------------

def inception_score(probs: torch.Tensor) -> float:
    """exp E_x KL(p(y|x) || p(y)), with the dataset classifier in Inception's role (1 .. num_classes)."""
    p = probs.double().clamp_min(1e-12)
    return math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().item())


def sample_metrics(clf, x, c, x_real, y_real, forget=()) -> dict:
    """Judge samples x generated for labels c (None: unconditional samples).

    forget_rate: conditional, the share of samples asked for a forgotten class that are classified as it;
                 unconditional, the share of all samples classified as any forgotten class.
    retain_acc:  the share of samples asked for a kept class that are classified as asked (conditional only).
    fid_retain:  FID between the samples for kept classes (unconditional: samples not classified as forgotten)
                 and the real images of the kept classes, in classifier features."""
    forget = torch.as_tensor(list(forget), dtype=torch.long)
    probs = F.softmax(_batched(clf, x), 1)
    pred = probs.argmax(1)
    out = {"n_samples": len(x), "is": inception_score(probs)}
    real_kept = x_real[~torch.isin(y_real, forget)]
    if c is None:
        in_forget = torch.isin(pred, forget)
        out["forget_rate"] = in_forget.float().mean().item()
        out["class_share"] = torch.bincount(pred, minlength=probs.shape[1]).div(len(x)).tolist()
        kept = ~in_forget
    else:
        c = c.cpu()
        K = probs.shape[1]
        out["class_acc"] = [(pred[c == k] == k).float().mean().item() if (c == k).any() else None for k in range(K)]
        kept = (c < K) & ~torch.isin(c, forget)
        out["retain_acc"] = (pred[kept] == c[kept]).float().mean().item() if kept.any() else None
        in_f = torch.isin(c, forget)
        out["forget_rate"] = (pred[in_f] == c[in_f]).float().mean().item() if in_f.any() else None
    out["fid_retain"] = fid(clf, x[kept], real_kept)
    return out


def evaluate_model(model, clf, forget=(), n_per_class=100, sampler="ddim", steps=50, guidance=1.0, seed=0,
                   root="data"):
    """Sample n_per_class images per class from a CondUNet and judge them (sample_metrics); also sampling speed.
    Returns (metrics, samples, labels)."""
    info = model.info
    dev = next(model.parameters()).device
    c = C.class_tokens(info.num_classes, n_per_class)
    t0 = time.time()
    x = C.sample(model, C.VP(), c.to(dev), sampler, steps, guidance, seed)
    secs = time.time() - t0
    m = sample_metrics(clf, x, c, *C.load_data(info.name, root, "train"), forget)
    nfe = len(C.VP().ddpm_timesteps(steps)) if sampler == "ddpm" else steps
    m.update(images_per_s=len(x) / secs, nfe=nfe * (1 if guidance == 1 else 2))
    return m, x, c


# ----------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it (eps-regularised sqrtm when
    the product is singular; the imaginary part of the root must be numerical noise)."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (mu1, mu2, sigma1, sigma2))
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # dead ReLU features make the product singular; sqrtm still copes
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the FID square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(f: np.ndarray):
    return f.mean(0), np.cov(f, rowvar=False)


def fid(clf, x_a, x_b) -> float:
    return frechet_distance(*feature_stats(features(clf, x_a)), *feature_stats(features(clf, x_b)))


# ----------------------------------------------------------------------------------------------------------
# NLL: the probability-flow ODE (score_sde_pytorch's likelihood.py)
# ----------------------------------------------------------------------------------------------------------

def nll_bpd(eps_fn, x, vp: C.VP, bins: int | None = None, exact: bool = False, dequantize: bool = False,
            rtol: float = 1e-5, atol: float = 1e-5, t_eps: float = 1e-5, seed: int = 0) -> np.ndarray:
    """Per-image negative log-likelihood in bits/dim.

    eps_fn(x, t) -> eps prediction at continuous time t (a [B] tensor in (0, 1]). The probability-flow ODE
    dx/dt = -1/2 beta(t) (x + score) with score = -eps / sigma(t) is solved from t_eps to 1 together with
    d(log p)/dt = div(drift), the divergence exact (dims backward passes) or Hutchinson-Skilling (one
    Rademacher probe fixed over the solve). log p(x) = log N(x(1); 0, I) + integral of the divergence.
    bins: quantisation bins over [-1, 1]; adds log2(bins / 2) per dimension (the density of a bin of width
    2/bins in bits); None reports the continuous density. dequantize adds uniform noise of one bin's width."""
    x = x.detach().cpu().float()
    B, shape, D = len(x), x.shape, x[0].numel()
    g = torch.Generator().manual_seed(seed)
    if dequantize:
        x = x + (torch.rand(shape, generator=g) - 0.5) * (2 / bins)
    probe = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    dev = next(iter(getattr(eps_fn, "parameters", lambda: iter([torch.empty(0)]))())).device

    def drift(xs, t):
        tt = torch.full((B,), t, device=xs.device)
        sigma = vp.marginal(tt)[1].view(-1, *[1] * (xs.ndim - 1))
        return -0.5 * vp.beta(t) * (xs - eps_fn(xs, tt) / sigma)

    def rhs(t, state):
        xs = torch.tensor(state[:-B], dtype=torch.float32, device=dev).view(shape).requires_grad_(True)
        with torch.enable_grad():
            f = drift(xs, t)
            if exact:
                ff = f.flatten(1)
                div = torch.stack([torch.autograd.grad(ff[:, i].sum(), xs, retain_graph=True)[0].flatten(1)[:, i]
                                   for i in range(D)], 1).sum(1)
            else:
                pr = probe.to(dev)
                div = (torch.autograd.grad((f * pr).sum(), xs)[0] * pr).flatten(1).sum(1)
        return np.concatenate([f.detach().cpu().flatten().double().numpy(), div.detach().cpu().double().numpy()])

    init = np.concatenate([x.flatten().double().numpy(), np.zeros(B)])
    sol = solve_ivp(rhs, (t_eps, 1.0), init, rtol=rtol, atol=atol, method="RK45")
    z, delta_logp = sol.y[:-B, -1].reshape(B, D), sol.y[-B:, -1]
    prior_logp = -0.5 * D * np.log(2 * np.pi) - 0.5 * (z ** 2).sum(1)
    offset = math.log2(bins / 2) if bins else 0.0
    return -(prior_logp + delta_logp) / math.log(2) / D + offset


def model_nll(model, x, c=None, **kw) -> np.ndarray:
    """bits/dim of images x under a CondUNet conditioned on tokens c (default: the null token)."""
    vp = C.VP()
    dev = next(model.parameters()).device
    c = torch.full((len(x),), model.tok["null"], device=dev) if c is None else c.to(dev)
    was = model.training
    model.eval().requires_grad_(False)

    class _Eps(nn.Module):  # wraps the model so nll_bpd can find the device
        def __init__(s):
            super().__init__()
            s.m = model

        def forward(s, xs, t):
            return model(xs, (vp.T - 1) * t, c)
    try:
        return nll_bpd(_Eps(), x, vp, bins=model.info.bins, **kw)
    finally:
        model.train(was).requires_grad_(True)


def noise_images(info: C.DataInfo, n: int, seed: int = 0) -> torch.Tensor:
    """Uniform random pixels on the dataset's grey levels: what a model of the data should find unlikely."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, info.levels, (n, info.channels, info.size, info.size), generator=g)
    return v.float() * 2 / (info.levels - 1) - 1


# ----------------------------------------------------------------------------------------------------------
# COPIES (memorisation)
# ----------------------------------------------------------------------------------------------------------

def near_copy_rate(x_gen, x_ref, threshold: float) -> float:
    """Share of generated images whose L2 distance to the nearest reference image is below threshold."""
    d = torch.cdist(x_gen.flatten(1).double(), x_ref.flatten(1).double()).min(1).values
    return (d < threshold).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# REPORTING
# ----------------------------------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def table(rows: dict, cols) -> str:
    """A plain-text table: one row per model (name -> metrics dict), one column per metric."""
    head = ["model", *cols]
    body = [[name, *(fmt(m.get(k)) for k in cols)] for name, m in rows.items()]
    w = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(s.ljust(w[i]) if i == 0 else s.rjust(w[i]) for i, s in enumerate(r))
    return "\n".join([line(head), line(["-" * n for n in w]), *map(line, body)])


def report(metrics: dict, path=None):
    """Write metrics.json (if path) and print the figures as the last stdout line, one line of JSON."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), flush=True)


# ----------------------------------------------------------------------------------------------------------
# CLI: evaluate one checkpoint
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Args:
    dataset: str = "digits"
    """digits | mnist | fashion | cifar10"""
    ckpt: str = ""
    """model checkpoint; empty = the cached base model (pretrained first if absent)"""
    forget: str = ""
    """comma-separated classes counted as forgotten (e.g. 0,3); empty = none"""
    n_per_class: int = 100
    """samples per class for accuracy, FID and IS"""
    sampler: str = "ddim"
    """ddim | ddpm | em"""
    steps: int = 50
    """sampler steps (ddpm: strided as DDPMPipeline, 0 = all 1000)"""
    guidance: float = 1.0
    """classifier-free guidance scale (1 = plain conditional)"""
    nll_n: int = 100
    """held-out real images (and as many noise images) for the NLL"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    seed: int = 0
    """sampling seed"""


def parse_classes(s: str, info: C.DataInfo, what: str = "class") -> list:
    try:
        cs = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise C.UsageError(f"{what} list {s!r} must be comma-separated integers, e.g. 0,3") from None
    return [C.check_class(info, c, what) for c in cs]


def main(args: Args):
    info = C.data_info(args.dataset)
    forget = parse_classes(args.forget, info, "forget class")
    dev = C.pick_device(args.device)
    t0 = time.time()
    if args.ckpt:   # checked first: a bad checkpoint must fail before anything is trained or written
        model = C.load_checkpoint(args.ckpt, args.dataset, dev)[0]
    else:
        model = C.load_base(args.dataset, dev, root=args.data_root)
    clf = load_classifier(args.dataset, args.data_root, dev)
    x_real, _ = C.load_data(args.dataset, args.data_root, "train")
    x_test, _ = C.load_data(args.dataset, args.data_root, "test")
    m, x, c = evaluate_model(model, clf, forget, args.n_per_class, args.sampler, args.steps, args.guidance,
                             args.seed, args.data_root)
    m["sample_acc"] = (predict(clf, x) == c).float().mean().item()
    m["classifier_test_acc"] = clf.test_acc
    m["fid_real_test"] = fid(clf, x_test, x_real)   # the floor: held-out real images vs the training set
    n = min(args.nll_n, len(x_test))
    m["nll_real_bpd"] = float(model_nll(model, x_test[:n]).mean())
    m["nll_noise_bpd"] = float(model_nll(model, noise_images(info, n, args.seed)).mean())
    m["seconds"] = time.time() - t0
    acc = {info.class_names[k]: {"accuracy": a} for k, a in enumerate(m["class_acc"])}
    print(f"\nclass-conditional samples ({args.n_per_class} per class, {args.sampler} {args.steps} steps):")
    print(table(acc, ["accuracy"]))
    print()
    print(table({"model": m}, ["classifier_test_acc", "sample_acc", "retain_acc", "forget_rate", "fid_retain",
                               "fid_real_test", "is", "nll_real_bpd", "nll_noise_bpd"]))
    ckpt_dir = Path(args.ckpt).parent if args.ckpt else C.base_path(args.dataset).parent
    report(m, ckpt_dir / "eval.json")


# ----------------------------------------------------------------------------------------------------------
# COMPARISON: the five methods on one scenario, judged by one evaluation (issue 8)
# ----------------------------------------------------------------------------------------------------------
#
# `python eval.py compare` forgets one class (default 0) with each method, each through its own file's main()
# with compare-specific Args, then loads every resulting model and judges all of them with compare_evaluate:
# the same samples per class, sampler, classifier, FID reference and NLL images. Method runs write into a
# workspace, runs/compare-<dataset>[-<budget>]/, that holds copies of the cached base model and classifier:
# the methods' own caches (SISS's and MSGM's base evaluations, bilevel pruning's CP reference) then stay
# inside it and the user's default runs are never read or overwritten. The gold standard, the base recipe
# trained without the class, is cached there too: base-<dataset>-no<class>-<steps>-s<seed>/. A finished run
# and its evaluation are found again by a later call (records/), so an interrupted comparison resumes.

MODELS = ("base", "retrain", "sfd", "srs_me", "siss", "bilevel_prune", "msgm")
LABELS = {"base": "base (all data)", "retrain": "retrain w/o class", "sfd": "SFD (1 step)", "srs_me": "SRS-ME",
          "siss": "SISS", "bilevel_prune": "bilevel prune", "msgm": "Obtuse-MSGM"}

# Each budget: every method's Args overrides, the retrain's steps, and the shared evaluation's settings.
COMPARE_BUDGETS = {
    # 2-core CPU. Lengths are cut from the method defaults (measured costs in the README) to keep three seeds
    # within 60 minutes; each still removes the class on its own (one-seed calibration, README).
    ("digits", "full"): dict(
        retrain=1400,                  # the base recipe (700 steps, tried first, left an undertrained gold
                                       # standard: retain acc 0.80, FID 20 against the base's 0.92, 7.5)
        sfd=dict(iters=150),           # default 300; the default run's curve reaches forget rate 0 at 150
        srs_me={},                     # the file's defaults: its momentum rule stops the shift (about 70 steps)
        siss=dict(steps=150, lr=1e-4),  # default at most 300, stopping at the deletion step (here it cannot)
        bilevel_prune={},              # the defaults (keep 0.55, 1100 steps): 600 steps left retain acc 0.71
                                       # (FID 105), keep 0.8 and 600 steps 0.83 (FID 29); the base has 0.92 (7.5)
        msgm=dict(steps=300),          # default 500 fine-tuning steps
        eval=dict(n_per_class=50, sample_steps=50, n_uncond=500, n_nll=12, nll_tol=1e-4)),
    # CI: one seed on the 700-step test base; the short-run settings the methods' own tests calibrated
    ("digits", "ci"): dict(
        retrain=10,                    # exercises the path only: 10 steps make no usable model
        sfd=dict(iters=50, batch_size=16, lr_g=5e-4, lr_fake=5e-4, ema=0.5),   # 40 iterations: forget rate 0.4
        srs_me=dict(max_steps=60, tau=3e-3, scale_factor=1e-2, n_train_images=32, eval_steps=20),
        siss=dict(steps=30, batch_size=32, lr=2e-4),
        bilevel_prune=dict(keep=0.8, steps=60, batch_size=32, upper_every=2, lr_up_mult=1.0, warmup=10),
        msgm=dict(steps=40, batch_size=32, forget_weight=0.5, forget_every=1, ema=0.5),
        eval=dict(n_per_class=20, sample_steps=10, n_uncond=300, n_nll=2, nll_tol=1e-3)),
    # 32x32 data on a GPU: NOT MEASURED yet, first guesses scaled from the digits budget
    ("32px", "full"): dict(
        retrain=20_000,
        sfd=dict(iters=2000, lr_g=1e-4, lr_fake=1e-4, ema=0.99),
        srs_me={},
        siss={},                       # the paper's MNIST 900 steps
        bilevel_prune=dict(steps=5000, lr=1e-4),
        msgm=dict(steps=2000),
        eval=dict(n_per_class=100, sample_steps=50, n_uncond=1000, n_nll=50, nll_tol=1e-5)),
}


@dataclass
class CompareArgs:
    dataset: str = "digits"
    """digits | mnist | fashion | cifar10"""
    seeds: str = "0,1,2"
    """comma-separated seeds; each method and the retrain run once per seed (the base is evaluated once)"""
    budget: str = "full"
    """full (digits: 2-core CPU; 32x32 data: GPU) | ci (one seed, seconds per method: the test suite's size)"""
    forget: int = 0
    """the class every method forgets"""
    models: str = ",".join(MODELS)
    """rows of the table, a subset of the default"""
    rerun: bool = False
    """run the methods and evaluations again even if this budget's workspace holds finished ones"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    readme: str = ""
    """also paste the report into this markdown file, between the lines <!-- compare-DATASET:begin --> and
    <!-- compare-DATASET:end --> (how README.md's table is regenerated rather than typed)"""


def _method_run(name, a: CompareArgs, seed: int, b: dict, dev):
    """One row of the comparison for one seed: (run, args, load, seconds). run() trains it through its file's
    main() (the retrain: common.pretrain) and returns that call's result; args identify the run for the cache;
    load() gives the model to judge; seconds(result) is the unlearning time the method reports. The method's
    own evaluation is kept small: the figures that count come from compare_evaluate."""
    info, tag, f = C.data_info(a.dataset), f"s{seed}", a.forget
    if name == "retrain":   # the gold standard: the base recipe (shortened) on the data without the class
        steps = b["retrain"]
        run = lambda: C.pretrain(a.dataset, f"no{f}-{steps}-s{seed}", steps=steps, seed=seed, device=dev,
                                 root=a.data_root, drop_classes=(f,))
        return (run, dict(steps=steps, seed=seed, drop_classes=[f]),
                lambda: dict(model=C.load_checkpoint(run(), a.dataset, dev)[0], uncond=True),
                lambda path: torch.load(path, weights_only=False)["seconds"])
    kw = dict(dataset=a.dataset, device=a.device, seed=seed, tag=tag, **b[name])
    folder = C.run_dir(name, a.dataset, tag)
    load = lambda: dict(model=C.load_checkpoint(folder / "model.pt", a.dataset, dev)[0])
    secs = lambda m: m["seconds"]
    if name == "sfd":
        import sfd as M
        args = M.Args(forget=str(f), override=(f + 1) % info.num_classes, n_per_class=10, eval_steps=10,
                      log_every=10 ** 9, data_root=a.data_root, **kw)

        def load():   # the one-step generator: one network evaluation per image, and no likelihood
            gen, ck = C.load_checkpoint(folder / "model.pt", a.dataset, dev)
            g_args = M.Args(t_init=ck["t_init"])
            return dict(model=gen, nfe=1, nll=False, draw=lambda c, s: M.sample_generator(gen, c, g_args, C.VP(), s))
    elif name == "srs_me":
        import srs_me as M
        # erase only the class, with the file's default erasable set (0-5, plus the class): the class's shift
        # protects the others, as in the paper's scenes; --retrain, so that its seconds are always measured
        erasable = ",".join(map(str, sorted(set(range(6)) | {f})))
        args = M.Args(erase=str(f), erasable=erasable, retrain=True, n_per_class=10, **kw)
        secs = lambda m: m["train"]["seconds"] + m["train"]["data_seconds"]   # with drawing its training images

        def load():   # the base plus the class's weight shift
            shift = torch.load(folder / "shifts" / f"concept_{f}.pt", weights_only=False)["shift"]
            return dict(model=M.combine(C.load_base(a.dataset, dev, root=a.data_root), {f: shift}, [f]))
    elif name == "siss":
        import siss as M
        # every training image of the class, for a fixed budget (no stop at the first zero-copy check)
        args = M.Args(forget_class=f, stop_at_zero=False, eval_every=10 ** 9, n_monitor=20, monitor_steps=10,
                      n_eval=20, n_per_class=10, n_nll=2, nll_tol=1e-3, sample_steps=10, data_root=a.data_root,
                      **kw)
    elif name == "bilevel_prune":
        import bilevel_prune as M
        args = M.Args(forget=f, n_per_class=10, sample_steps=10, data_root=a.data_root, **kw)
        load = lambda: dict(model=M.load_student(folder / "model.pt", dev))   # physically smaller
    else:
        import msgm as M
        # Obtuse-MSGM fine-tuned from the base (the variant its README measured); an unconditional model
        args = M.Args(forget=str(f), task="norm", n_samples=60, sample_steps=10, nll_n=2, nll_tol=1e-3,
                      data_root=a.data_root, **kw)
        load = lambda: dict(model=C.load_checkpoint(folder / "model.pt", a.dataset, dev)[0], conditional=False)
    return lambda: M.main(args), dataclasses.asdict(args), load, secs


@torch.no_grad()
def _first_per_class(x, pred, K: int, g: int):
    """Grid cells of an unconditional model: the first g samples assigned to each class, blank (grey) if fewer."""
    cells = torch.zeros(K, g, *x.shape[1:])
    for k in range(K):
        got = x[pred == k][:g]
        cells[k, :len(got)] = got
    return cells.flatten(0, 1)


def compare_evaluate(entry: dict, clf, data, e: dict, forget: int, seed: int, g: int = 3):
    """The one evaluation every model of the comparison gets. Returns (metrics, K * g grid cells).

    Class-conditional models: e["n_per_class"] samples per class (DDIM, e["sample_steps"], or the model's own
    draw), forget rate and retain accuracy as in sample_metrics, FID of kept classes against the real training
    images of those classes. The unconditional model (MSGM; entry conditional=False) and the two references
    (base, retrain; entry uncond=True) also get e["n_uncond"] null-token samples: forget_rate_uncond is the
    share classified as the class, and for MSGM it is the forget rate. NLL (bits/dim, one probability-flow
    ODE solve for all groups) of the first e["n_nll"] held-out images of the class and of the other classes,
    under their class token, and of the class's images under the null token; MSGM: the null token only."""
    model, null = entry["model"], entry["model"].tok["null"]
    K, dev = model.info.num_classes, next(entry["model"].parameters()).device
    x_real, y_real, x_test, y_test = data
    draw = entry.get("draw") or (lambda c, s: C.sample(model, C.VP(), c.to(dev), "ddim", e["sample_steps"], seed=s))
    conditional = entry.get("conditional", True)
    m = {"nfe": entry.get("nfe", e["sample_steps"]), "params": C.n_params(model), "params_m": C.n_params(model) / 1e6,
         "nll_forget_bpd": None, "nll_kept_bpd": None, "nll_forget_null_bpd": None}
    if conditional:
        c = C.class_tokens(K, e["n_per_class"])
        x = draw(c, seed)
        m.update({k: v for k, v in sample_metrics(clf, x, c, x_real, y_real, [forget]).items()
                  if k in ("forget_rate", "retain_acc", "fid_retain", "class_acc")})
        cells = x.view(K, e["n_per_class"], *x.shape[1:])[:, :g].flatten(0, 1)
    if entry.get("uncond") or not conditional:
        xu = draw(torch.full((e["n_uncond"],), null), seed)
        s = sample_metrics(clf, xu, None, x_real, y_real, [forget])
        m["forget_rate_uncond"] = s["forget_rate"]
        if not conditional:
            # no asked-for class: retain accuracy is the classifier's mean confidence on the samples it assigns
            # to a kept class (msgm.py's definition)
            p = F.softmax(_batched(clf, xu), 1)
            kept = p.argmax(1) != forget
            m.update(forget_rate=s["forget_rate"], fid_retain=s["fid_retain"],
                     retain_acc=p[kept].max(1).values.mean().item() if kept.any() else None)
            cells = _first_per_class(xu, p.argmax(1), K, g)
    if entry.get("nll", True):
        xf, xk = x_test[y_test == forget][:e["n_nll"]], x_test[y_test != forget][:e["n_nll"]]
        yk = y_test[y_test != forget][:e["n_nll"]]
        full = lambda n, v: torch.full((n,), v, dtype=torch.long)
        xs, cs = (torch.cat([xf, xk, xf]), torch.cat([full(len(xf), forget), yk, full(len(xf), null)])) \
            if conditional else (torch.cat([xf, xk]), full(len(xf) + len(xk), null))
        bpd = model_nll(model, xs, cs, rtol=e["nll_tol"], atol=e["nll_tol"])
        nf, nk = len(xf), len(xk)
        m.update(nll_forget_bpd=float(bpd[:nf].mean()), nll_kept_bpd=float(bpd[nf:nf + nk].mean()),
                 nll_forget_null_bpd=float(bpd[nf + nk:].mean() if conditional else bpd[:nf].mean()))
    return m, cells


def _copy_if_changed(src: Path, dst: Path):
    if not dst.exists() or (dst.stat().st_size, dst.stat().st_mtime_ns) != (src.stat().st_size, src.stat().st_mtime_ns):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


@contextmanager
def _runs_in(folder: Path):
    """Point every run folder (common.run_dir, base_path, the classifier cache) into `folder` for a while."""
    old, C.RUNS = C.RUNS, folder
    try:
        yield
    finally:
        C.RUNS = old


COMPARE_COLS = [  # (metric, header, format)
    ("forget_rate", "forget rate", "{:.2f}"), ("forget_rate_uncond", "share of class in uncond. samples", "{:.3f}"),
    ("retain_acc", "retain acc", "{:.3f}"), ("fid_retain", "FID kept", "{:.2f}"),
    ("nll_forget_bpd", "NLL forget (bpd)", "{:.3f}"), ("nll_forget_null_bpd", "NLL forget, null token", "{:.3f}"),
    ("nll_kept_bpd", "NLL kept", "{:.3f}"), ("seconds", "unlearning s", "{:.0f}"), ("nfe", "NFE / image", "{:.0f}"),
    ("params_m", "parameters (M)", "{:.3f}")]


def _summarise(per_seed: dict) -> dict:
    """{metric: {mean, std, n}} over seeds (sample std, ddof 1), numeric metrics only; None where absent."""
    out = {}
    for k, _, _ in COMPARE_COLS:
        v = [r[k] for r in per_seed.values() if isinstance(r.get(k), (int, float))]
        out[k] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                  "n": len(v)} if v else None
    return out


def _results_md(summary: dict, settings: dict, text_grid: str, figure: str = "grid.png") -> str:
    cell = lambda s, f: "n/a" if s is None else \
        f.format(s["mean"]) + (f" ± {f.format(s['std'])}" if s["std"] is not None else "")
    head = ["model", *[h for _, h, _ in COMPARE_COLS]]
    rows = [[LABELS[n] + (" †" if n == "msgm" else ""), *[cell(s[k], f) for k, _, f in COMPARE_COLS]]
            for n, s in summary.items()]
    st, e = settings, settings["eval"]
    return "\n".join([
        f"Forget class {st['forget']} on {st['dataset']}, budget `{st['budget']}`, seeds {st['seeds']} "
        f"(mean ± std over seeds; the base is one model, evaluated once). Command: `{st['command']}`.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows], "",
        f"- Every model is judged by the same evaluation: {e['n_per_class']} samples per class (DDIM "
        f"{e['sample_steps']} steps; SFD its one-step generator), the dataset classifier (held-out accuracy "
        f"{st['classifier_test_acc']:.3f}), FID of the kept classes' samples against their real training images "
        f"(classifier features). Forget rate: share of samples asked for class {st['forget']} that are classified "
        f"as it; retain acc: the same for the kept classes.",
        f"- † MSGM trains an unconditional model: its forget rate is the share of {e['n_uncond']} unconditional "
        f"(null-token) samples classified as class {st['forget']} (compare with the base's figure in the next "
        f"column), its retain acc the classifier's mean confidence on the samples it assigns to kept classes, "
        f"and its NLLs are under the null token.",
        f"- NLL: bits/dim through the probability-flow ODE (RK45, rtol = atol = {e['nll_tol']:g}) of "
        f"{e['n_nll']} held-out images of the class and {e['n_nll']} of the other classes, under their class "
        f"token, and of the class's images under the null token. SFD: n/a, since a one-step generator pushes "
        f"noise through one network call and has no score over time to integrate, so no likelihood.",
        f"- Unlearning s: wall-clock seconds of each method's unlearning phase as the method reports it "
        f"(SRS-ME: with drawing its training images; retrain: {st['retrain_steps']} training steps of the base "
        f"recipe on the data without the class). Cost of the table: {st['runs_wall_s'] / 60:.1f} min wall-clock, "
        f"{st['runs_cpu_s'] / 60:.1f} CPU-min on {st['device']} (every run and evaluation, the cached base and "
        f"classifier excepted; per run in results.json).",
        f"- Method settings: {st['methods']}.", "",
        f"![one row per model, samples per class, the forgotten class framed]({figure})", "",
        f"The first sample of each class, as text (class {st['forget']} between bars):", "",
        "```text", text_grid, "```", ""])


def _text_grid(cells: dict, K: int, g: int, forget: int, ramp: str = " .:-=+*#%@") -> str:
    """The figure as text, for a README that shows it without a binary file: per model the first sample of
    each class, one grey level per character pair (two characters per pixel keep the aspect), the
    forgotten class between bars. Readable for 8x8 images; larger ones are block-averaged to 8x8."""
    bar = lambda k, p: f"|{p}|" if k == forget else f" {p} "
    lines = ["  " + "".join(bar(k, f"{k:^16}") for k in range(K))]
    for name, x in cells.items():
        x = F.adaptive_avg_pool2d(x[::g].float().mean(1, keepdim=True), 8)[:, 0]   # K first samples, 8x8 grey
        level = ((x + 1) / 2 * len(ramp)).long().clamp(0, len(ramp) - 1)
        lines.append(LABELS[name])
        for r in range(8):
            px = ["".join(ramp[v] * 2 for v in level[k, r].tolist()) for k in range(K)]
            lines.append("  " + "".join(bar(k, p) for k, p in enumerate(px)))
    return "\n".join(lines)


def _markers(path: Path, dataset: str) -> tuple[str, str]:
    """The text of path around its lines <!-- compare-<dataset>:begin --> and <!-- compare-<dataset>:end -->:
    (before and begin, end and after); a usage error if they are missing, doubled or out of order."""
    begin, end = f"<!-- compare-{dataset}:begin -->\n", f"<!-- compare-{dataset}:end -->"
    doc = path.read_text() if path.is_file() else ""
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise C.UsageError(f"--readme {path}: needs one line {begin.strip()} and, after it, one line {end}")
    head, rest = doc.split(begin)
    return head + begin, end + rest.split(end)[1]


def _grid(cells: dict, path: Path, K: int, g: int, forget: int):
    """One row per model, g samples per class, the forgotten class's columns framed; names on the left."""
    from PIL import Image, ImageDraw
    C.save_grid(torch.cat(list(cells.values())), path, nrow=K * g, highlight_cols=range(forget * g, (forget + 1) * g))
    im = Image.open(path)
    left, top = 130, 16
    out = Image.new("RGB", (im.width + left, im.height + top), "white")
    out.paste(im, (left, top))
    d = ImageDraw.Draw(out)
    h, w = im.height / len(cells), im.width / (K * g)
    for i, name in enumerate(cells):
        d.text((4, top + (i + 0.5) * h - 6), LABELS[name], fill="black")
    for k in range(K):
        d.text((left + (k + 0.5) * g * w - 3, 2), str(k), fill="red" if k == forget else "black")
    out.save(path)


def compare(a: CompareArgs) -> dict:
    # every mistake a user can make, before any work
    info = C.data_info(a.dataset)
    C.check_class(info, a.forget, "--forget class")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise C.UsageError(f"--seeds {a.seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not seeds or not models or not set(models) <= set(MODELS):
        raise C.UsageError(f"--seeds needs at least one seed and --models a subset of {','.join(MODELS)}")
    key = ("digits" if a.dataset == "digits" else "32px", a.budget)
    if key not in COMPARE_BUDGETS:
        raise C.UsageError(f"unknown --budget {a.budget!r} for {a.dataset}: use "
                           f"{' or '.join(b for d, b in COMPARE_BUDGETS if d == key[0])}")
    b, dev, models = COMPARE_BUDGETS[key], C.pick_device(a.device), [m for m in MODELS if m in models]
    ws = C.RUNS / f"compare-{a.dataset}{'' if a.budget == 'full' else '-' + a.budget}"
    if a.readme:
        _markers(Path(a.readme), a.dataset)
    t0 = time.time()

    # the cached base and classifier (trained first if absent), copied into the workspace
    base_src = C.pretrain(a.dataset, device=dev, root=a.data_root)
    clf = load_classifier(a.dataset, a.data_root, dev)
    base = ws / base_src.relative_to(C.RUNS)
    _copy_if_changed(base_src, base)
    _copy_if_changed(C.RUNS / f"classifier-{a.dataset}" / "model.pt", ws / f"classifier-{a.dataset}" / "model.pt")
    data = (*C.load_data(a.dataset, a.data_root, "train"), *C.load_data(a.dataset, a.data_root, "test"))
    records = ws / "records"
    records.mkdir(parents=True, exist_ok=True)
    jobs = [(n, s) for s in seeds for n in models if n != "base" or s == seeds[0]]   # one base, judged once
    per_seed, cells = {n: {} for n in models}, {}
    print(f"compare on {a.dataset}: forget {a.forget}, budget {a.budget}, seeds {seeds}, {len(jobs)} runs in {ws}")
    for i, (name, seed) in enumerate(jobs):
        tag, rec = f"[{i + 1}/{len(jobs)}] {name} seed {seed}", {}
        with _runs_in(ws):
            if name == "base":
                entry, ident = dict(model=C.load_checkpoint(base, a.dataset, dev)[0], uncond=True), base
            else:   # train (or find this budget's finished run), then load what it left
                run, args, load, secs = _method_run(name, a, seed, b, dev)
                want, ident = json.loads(json.dumps(args)), records / f"{name}-s{seed}.json"
                rec = json.loads(ident.read_text()) if ident.exists() and not a.rerun else {}
                if rec.get("args") != want:
                    print(f"{tag}: training (budget {a.budget}) ...", flush=True)
                    w0, c0 = time.time(), time.process_time()
                    out = run()
                    rec = dict(args=want, seconds=secs(out), run_wall_s=time.time() - w0,
                               run_cpu_s=time.process_time() - c0)
                    ident.write_text(json.dumps(rec) + "\n")
                entry = load()
        # the shared evaluation, cached under its settings and the identity of what it judges
        epath = records / f"{name}-s{seed}-eval.pt"
        ekey = json.dumps([b["eval"], a.forget, seed, str(ident), ident.stat().st_mtime_ns])
        cached = torch.load(epath, weights_only=False) if epath.exists() and not a.rerun else {}
        if cached.get("key") != ekey:
            print(f"{tag}: evaluating ...", flush=True)
            w0, c0 = time.time(), time.process_time()
            m, grid_cells = compare_evaluate(entry, clf, data, b["eval"], a.forget, seed)
            m.update(eval_wall_s=time.time() - w0, eval_cpu_s=time.process_time() - c0)
            cached = {"key": ekey, "metrics": m, "cells": grid_cells}
            torch.save(cached, epath)
        m = dict(cached["metrics"], **{k: v for k, v in rec.items() if k != "args"})
        per_seed[name][seed] = m
        cells.setdefault(name, cached["cells"])
        print(f"{tag}: " + "  ".join(f"{k} {fmt(m.get(k))}" for k in (
            "forget_rate", "forget_rate_uncond", "retain_acc", "fid_retain", "nll_forget_bpd", "nll_kept_bpd",
            "seconds", "run_wall_s", "run_cpu_s", "eval_wall_s", "eval_cpu_s")), flush=True)

    summary = {n: _summarise(per_seed[n]) for n in models}
    total = lambda k: sum(r.get(f"run_{k}", 0) + r.get(f"eval_{k}", 0) for n in models for r in per_seed[n].values())
    flag = lambda k, v: f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
    threads = torch.get_num_threads()
    settings = dict(
        dataset=a.dataset, forget=a.forget, budget=a.budget, seeds=seeds, eval=b["eval"], retrain_steps=b["retrain"],
        methods="; ".join(f"{n} " + (" ".join(flag(k, v) for k, v in b[n].items()) or "defaults")
                          for n in models if n not in ("base", "retrain")),
        classifier_test_acc=clf.test_acc, device=f"{dev} ({threads} thread{'s' * (threads > 1)})",
        runs_wall_s=total("wall_s"), runs_cpu_s=total("cpu_s"), wall_s=time.time() - t0,
        command=f"python eval.py compare --dataset {a.dataset} --seeds {a.seeds} --budget {a.budget}"
                + (f" --forget {a.forget}" if a.forget else "")
                + (f" --device {a.device}" if a.device != "auto" else ""))
    results = {"settings": settings, "summary": summary, "per_seed": per_seed}
    (ws / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text_grid = _text_grid(cells, info.num_classes, 3, a.forget)
    (ws / "results.md").write_text(_results_md(summary, settings, text_grid))
    if a.readme:   # the same report, its figure linked from where the markdown file lies
        figure = Path(os.path.relpath(ws / "grid.png", Path(a.readme).resolve().parent)).as_posix()
        head, tail = _markers(Path(a.readme), a.dataset)
        Path(a.readme).write_text(head + _results_md(summary, settings, text_grid, figure) + tail)
    _grid(cells, ws / "grid.png", info.num_classes, 3, a.forget)
    means = {LABELS[n]: {k: (s[k] or {}).get("mean") for k, _, _ in COMPARE_COLS} for n, s in summary.items()}
    print("\n" + table(means, [k for k, _, _ in COMPARE_COLS]))
    print(f"\n{ws / 'results.md'}, results.json, grid.png; training and evaluation {settings['runs_wall_s'] / 60:.1f} "
          f"min wall ({settings['runs_cpu_s'] / 60:.1f} CPU-min); this call {settings['wall_s'] / 60:.1f} min")
    return results


def compare_cli(argv):
    """`python eval.py compare ...`: argparse's own errors (an unknown option, a bad value) become one line too."""
    try:
        buf = io.StringIO()
        try:
            with redirect_stderr(buf):
                a = C.parse_args(CompareArgs, argv)
        except SystemExit as e:
            if e.code == 0:   # --help
                raise
            raise C.UsageError(buf.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]) from None
        return compare(a)
    except C.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare_cli(sys.argv[2:])
    else:
        C.cli(main, Args)
