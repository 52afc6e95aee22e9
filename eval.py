"""Every metric the five methods report, the evaluation of one run, and the comparison of all five.

Above the COMPARISON banner, the metrics:

  CLASSIFIER  a small CNN per dataset, trained once and cached; it judges generated samples
  CLASS       per-class accuracy of samples, forget rate, retain accuracy, Inception-style score
  FID         Frechet distance between feature Gaussians (pytorch-fid's formula; classifier
              features)
  NLL         exact likelihood in bits/dim through the probability-flow ODE (score_sde's
              likelihood.py)
  COPIES      share of samples that are near-copies (L2) of given images (data unlearning)
  RUNS        judge(samples.pt), the NLL figures a run reports, the cached base evaluation, report()

Below it, `python eval.py` (one checkpoint evaluated) and `python eval.py compare`: every method run
as a program on one scenario, its samples.pt judged by the same functions, its model-bound figures
read from its metrics.json.

    python eval.py                                  # digits, the cached base model
    python eval.py --ckpt runs/siss-digits --forget 0,3
    python eval.py compare                          # 5 methods + base + retrain, 3 seeds
    python eval.py compare --dataset mnist --device cuda
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.integrate import solve_ivp
from scipy.stats import beta

import common as C

# --------------------------------------------------------------------------------------------------
# CLASSIFIER
# --------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Three conv layers and a 128-d penultimate layer (the FID features)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(512, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(dataset: str, root: str = "data", device="cpu", epochs: int = 0,
                     seed: int = 0):
    """Train on the train split with +-1 pixel shifts (generated digits are rarely centred exactly).
    Epochs: 60 on digits, else as many as make about 2,300 updates (5 epochs of the full MNIST; more
    on a subset)."""
    info = C.data_info(dataset)
    x, y = C.load_data(dataset, root, "train")
    epochs = epochs or (60 if dataset == "digits" else max(5, math.ceil(2300 * 128 / len(x))))
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
    """The cached classifier (trained on first use, and again for other data at `root`); its
    held-out accuracy is `clf.test_acc`."""
    info = C.data_info(dataset)
    path = C.RUNS / f"classifier-{dataset}" / "model.safetensors"
    data = C.data_id(*C.load_data(dataset, root))
    ck = {}
    if path.exists():
        try:
            ck = C.load(path)
            clf = Classifier(info.channels, info.num_classes)
            clf.load_state_dict(ck["model"])
        except Exception:
            raise C.UsageError(f"cannot read classifier checkpoint {path}; delete it to "
                               f"retrain") from None
    if ck.get("data") == data:
        acc = ck["test_acc"]
    else:
        clf, acc = train_classifier(dataset, root, device)
        C.atomic_save({"model": clf.state_dict(), "test_acc": acc, "data": data}, path)
    if acc < 0.95:
        print(f"warning: the {dataset} classifier that judges samples reaches only {acc:.1%} "
              f"held-out accuracy (few training images at {root}?): its accuracy and FID figures "
              f"are rough")
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
    """The FID features of images x: the classifier's 128-d penultimate layer, or Inception's 2048-d
    pool features when load_judge attached pytorch-fid's network to the classifier (clf.fid_net)."""
    if getattr(clf, "fid_net", None) is not None:
        return inception_features(clf.fid_net, x)
    return _batched(clf.body, x).double().numpy()


def load_judge(args, device) -> Classifier:
    """The classifier of args.dataset with the FID network args.fid_features asks for attached (see
    fid_network): what every run judges its samples with."""
    clf = load_classifier(args.dataset, args.data_root, device)
    clf.fid_net = fid_network(args.fid_features, args.inception_weights, args.dataset, device)
    return clf


# --------------------------------------------------------------------------------------------------
# CLASS METRICS
# --------------------------------------------------------------------------------------------------

def inception_score(probs: torch.Tensor) -> float:
    """exp E_x KL(p(y|x) || p(y)), with the dataset classifier in Inception's role
    (1 .. num_classes)."""
    p = probs.double().clamp_min(1e-12)
    return math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().item())


def sample_metrics(clf, x, c, x_real, y_real, forget=()) -> dict:
    """Judge samples x generated for labels c (None: unconditional samples).

    forget_rate: conditional, the share of samples asked for a forgotten class that are
                 classified as it; unconditional, the share of all samples classified as any
                 forgotten class.
    retain_acc:  the share of samples asked for a kept class that are classified as asked
                 (conditional only).
    confusion:   (conditional) counts of asked class x predicted class.
    fid_retain:  FID between the samples for kept classes (unconditional: samples not classified
                 as forgotten) and the real images of the kept classes, in classifier features."""
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
        out["class_acc"] = [(pred[c == k] == k).float().mean().item() if (c == k).any() else None
                            for k in range(K)]
        # confusion[k][j]: how many samples asked for class k the classifier assigns to class j
        counts = torch.bincount(c.clamp(max=K - 1) * K + pred, minlength=K * K)
        out["confusion"] = counts.view(K, K).tolist()
        kept = (c < K) & ~torch.isin(c, forget)
        out["retain_acc"] = (pred[kept] == c[kept]).float().mean().item() if kept.any() else None
        in_f = torch.isin(c, forget)
        out["forget_rate"] = (pred[in_f] == c[in_f]).float().mean().item() if in_f.any() else None
    out["fid_retain"] = fid(clf, x[kept], real_kept)
    return out


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it (eps-regularised
    sqrtm when the product is singular; the imaginary part of the root must be numerical noise)."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, dtype=np.float64))
                                for a in (mu1, mu2, sigma1, sigma2))
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    # dead ReLU features make the product singular; sqrtm still copes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the FID "
                             f"square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(f: np.ndarray):
    return f.mean(0), np.cov(f, rowvar=False)


def fid(clf, x_a, x_b) -> float | None:
    """FID between two image sets; None where it is undefined: a set of fewer than 2 images (no
    covariance) or one holding a non-finite image (a diverged model), so a table shows "-" instead
    of a crash."""
    if min(len(x_a), len(x_b)) < 2 or not (torch.isfinite(x_a).all() and torch.isfinite(x_b).all()):
        return None
    return frechet_distance(*feature_stats(features(clf, x_a)), *feature_stats(features(clf, x_b)))


INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def fid_network(choice: str, weights: str, dataset: str, device):
    """None (FID in the classifier's features) or pytorch-fid's InceptionV3 (the TF-Inception
    weights every paper's FID uses), by choice: classifier | inception | auto (inception for cifar10
    when pytorch-fid and its weights are there, else the classifier). weights: the path of
    pytorch-fid's weights file, for machines without network (pytorch-fid otherwise downloads it
    once into torch's hub cache)."""
    if choice not in ("auto", "classifier", "inception"):
        raise C.UsageError(f"unknown --fid-features {choice!r}: use auto, classifier or inception")
    if choice == "classifier" or (choice == "auto" and dataset != "cifar10"):
        return None
    if weights and not Path(weights).is_file():
        raise C.UsageError(f"--inception-weights {weights}: no such file")
    try:
        from pytorch_fid import inception as pfid
        if weights:   # pytorch-fid fetches its weights by URL; hand it the local file instead
            pfid.load_state_dict_from_url = lambda *a, **k: C.load(weights)
        net = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except Exception as e:   # not installed, or no network and no cached weights
        if choice == "auto":
            print(f"FID in classifier features: Inception is unavailable ({type(e).__name__})")
            return None
        raise C.UsageError(f"Inception FID needs pytorch-fid and its weights "
                           f"({type(e).__name__}): `pip install pytorch-fid` on a machine with "
                           f"network, or --inception-weights PATH to {INCEPTION_FILE}") from None
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(net, x, batch: int = 200) -> np.ndarray:
    """pytorch-fid's pipeline (fid_score.get_activations) on images in [-1, 1]: 8-bit levels as in
    the PNG files it reads, grey images repeated to RGB, values in [0, 1] into the network (which
    resizes to 299 x 299 and rescales itself), the pool features averaged to 1 x 1 if they are not
    already."""
    dev, out = next(net.parameters()).device, []
    for b in x.split(batch):
        b = ((b.float().clamp(-1, 1) + 1) * 127.5).round() / 255
        b = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
        f = net(b.to(dev))[0]
        f = F.adaptive_avg_pool2d(f, 1) if f.shape[2:] != (1, 1) else f
        out.append(f.flatten(1).double().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------------
# NLL: the probability-flow ODE (score_sde_pytorch's likelihood.py)
# --------------------------------------------------------------------------------------------------

def nll_bpd(eps_fn, x, vp: C.VP, bins: int | None = None, exact: bool = False,
            dequantize: bool = False, rtol: float = 1e-5, atol: float = 1e-5, t_eps: float = 1e-5,
            seed: int = 0) -> np.ndarray:
    """Per-image negative log-likelihood in bits/dim.

    eps_fn(x, t) -> eps prediction at continuous time t (a [B] tensor in (0, 1]). The
    probability-flow ODE dx/dt = -1/2 beta(t) (x + score) with score = -eps / sigma(t) is solved
    from t_eps to 1 together with d(log p)/dt = div(drift), the divergence exact (dims backward
    passes) or Hutchinson-Skilling (one Rademacher probe fixed over the solve).
    log p(x) = log N(x(1); 0, I) + integral of the divergence. bins: quantisation bins over [-1, 1];
    adds log2(bins / 2) per dimension (the density of a bin of width 2/bins in bits); None reports
    the continuous density. dequantize adds uniform noise of one bin's width."""
    x = x.detach().cpu().float()
    B, shape, D = len(x), x.shape, x[0].numel()
    g = torch.Generator().manual_seed(seed)
    if dequantize:
        x = x + (torch.rand(shape, generator=g) - 0.5) * (2 / bins)
    probe = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    params = eps_fn.parameters() if hasattr(eps_fn, "parameters") else iter(())
    # a function or a module without parameters: the CPU
    dev = next(params, torch.empty(0)).device
    bar = C.tqdm(total=100, desc=f"likelihood ODE, {B} images", unit="% of t", delay=3, leave=False)

    def drift(xs, t):
        tt = torch.full((B,), t, device=xs.device)
        sigma = vp.marginal(tt)[1].view(-1, *[1] * (xs.ndim - 1))
        return -0.5 * vp.beta(t) * (xs - eps_fn(xs, tt) / sigma)

    def rhs(t, state):
        # how far the solve has come in t
        bar.update(max(0, int(100 * (t - t_eps) / (1 - t_eps)) - bar.n))
        xs = torch.tensor(state[:-B], dtype=torch.float32, device=dev).view(shape)
        xs.requires_grad_(True)
        with torch.enable_grad():
            f = drift(xs, t)
            if exact:
                ff = f.flatten(1)
                div = torch.stack([torch.autograd.grad(ff[:, i].sum(), xs, retain_graph=True)[0]
                                   .flatten(1)[:, i] for i in range(D)], 1).sum(1)
            else:
                pr = probe.to(dev)
                div = (torch.autograd.grad((f * pr).sum(), xs)[0] * pr).flatten(1).sum(1)
        return np.concatenate([f.detach().cpu().flatten().double().numpy(),
                               div.detach().cpu().double().numpy()])

    init = np.concatenate([x.flatten().double().numpy(), np.zeros(B)])
    sol = solve_ivp(rhs, (t_eps, 1.0), init, rtol=rtol, atol=atol, method="RK45")
    bar.close()
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
    """Uniform random pixels on the dataset's grey levels, which a model of the data should find
    unlikely."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, info.levels, (n, info.channels, info.size, info.size), generator=g)
    return v.float() * 2 / (info.levels - 1) - 1


# --------------------------------------------------------------------------------------------------
# COPIES (memorisation)
# --------------------------------------------------------------------------------------------------

def near_copy_rate(x_gen, x_ref, threshold: float) -> float:
    """Share of generated images whose L2 distance to the nearest reference image is below
    threshold."""
    d = torch.cdist(x_gen.flatten(1).double(), x_ref.flatten(1).double()).min(1).values
    return (d < threshold).float().mean().item()


def interval(k: int, n: int) -> tuple:
    """The exact (Clopper-Pearson) 95% interval of a share of k in n: (low, high)."""
    if n == 0:
        return (0.0, 1.0)
    lo = beta.ppf(0.025, k, n - k + 1) if k else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return (round(float(lo), 5), round(float(hi), 5))


def count(k: int, n: int) -> str:
    """'3/500 = 0.6% [0.1, 1.7]': a count, its share and the share's exact 95% interval, in %."""
    lo, hi = interval(k, n)
    return f"{k}/{n} = {100 * k / max(n, 1):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def effect_table(before: str, after: str, rows: list) -> str:
    """A run's headline: a header naming the two models, then one aligned line (figure, before,
    after) per row."""
    rows = [("", before, after), *rows]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def change(r: dict) -> str:
    """paired_change's result as '88.5% (change -0.4 ± 1.6 points, paired)'."""
    return (f"{100 * r['after']:.1f}% (change {r['change_points']:+.1f} ± "
            f"{r['change_ci_points']:.1f} points, paired)")


def paired_change(clf, before: dict, after: dict, forget=()) -> dict:
    """Retain accuracy before and after unlearning, judged on samples drawn from the same noise
    (two samples.pt dicts whose first kept-class samples share their c and noise): both shares and
    the change in points with its 95% interval (normal approximation of the mean paired
    difference, so the noise both models share cancels out)."""
    K = clf.head.out_features
    pairs = []
    for s in (before, after):
        kept = (s["c"] < K) & ~torch.isin(s["c"], torch.as_tensor(list(forget), dtype=torch.long))
        pairs.append((predict(clf, s["x"][kept]) == s["c"][kept]).double())
    n = min(len(p) for p in pairs)
    a, b = pairs[0][:n], pairs[1][:n]
    d = b - a
    half = 1.96 * d.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"before": a.mean().item(), "after": b.mean().item(), "n": n,
            "change_points": 100 * d.mean().item(), "change_ci_points": 100 * half}


# --------------------------------------------------------------------------------------------------
# REVIVAL: is the class gone from the model, or only from its token? (Pham et al., ICLR 2024)
# --------------------------------------------------------------------------------------------------

def learn_token(model, loss_fn, steps: int, lr: float, seed: int = 0):
    """Textual inversion (Gal et al., ICLR 2023) as Pham et al. turn it against erasure: one new
    token embedding, started at the null token's, learned with Adam for `steps` steps to minimise
    loss_fn(model copy, token id, generator) while every weight of the model stays frozen. It lives
    in a spare token of a copy; the model itself is not touched. Returns (copy, token id)."""
    m = copy.deepcopy(model).eval().requires_grad_(False)
    spare, table = m.tok["spare"][0], m.token_emb.weight
    with torch.no_grad():
        table[spare] = table[m.tok["null"]]
    table.requires_grad_(True)
    # Adam over the table: the other rows get zero gradients, hence zero updates
    opt, g = torch.optim.Adam([table], lr=lr), torch.Generator().manual_seed(seed)
    for _ in C.tqdm(range(steps), desc="revival attack", leave=False):
        loss = loss_fn(m, spare, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.requires_grad_(False), spare


def denoising_loss(x_class, batch: int = 32):
    """The model's own training loss on real images of the class under the new token: eps-MSE at
    t ~ U{0..999}."""
    vp = C.VP()

    def loss(m, token, g):
        dev = next(m.parameters()).device
        x0 = x_class[torch.randint(len(x_class), (batch,), generator=g)].to(dev)
        t, noise = torch.randint(vp.T, (batch,), generator=g), torch.randn(x0.shape, generator=g)
        c = torch.full((batch,), token, device=dev)
        return F.mse_loss(m(vp.q_sample(x0, t.to(dev), noise.to(dev)), t.float().to(dev), c),
                          noise.to(dev))
    return loss


def classifier_loss(clf, k: int, t_init: int, batch: int = 32):
    """For a one-step generator, which has no multi-step score to invert: minus the classifier's
    log-probability of class k on the generator's images under the new token."""
    def loss(m, token, g):
        dev = next(m.parameters()).device
        z = torch.randn((batch, m.info.channels, m.info.size, m.info.size), generator=g).to(dev)
        x = C.one_step_images(m, z, torch.full((batch,), token, device=dev), t_init)
        return -F.log_softmax(clf(x.clamp(-1, 1)), 1)[:, k].mean()
    return loss


def revival(model, clf, k: int, x_class, args, one_step_t: int | None = None) -> dict:
    """The attack on class k: a token learned by learn_token (denoising loss; a one-step generator:
    the classifier's), args.attack_samples images drawn with it (args.sampler; the generator: its
    one step), the share classified as k with its exact 95% interval, and their FID against the
    class's real images."""
    loss = (denoising_loss(x_class) if one_step_t is None
            else classifier_loss(clf, k, one_step_t))
    m, token = learn_token(model, loss, args.attack_steps, args.attack_lr, args.seed)
    dev, n = next(m.parameters()).device, args.attack_samples
    c = torch.full((n,), token, device=dev)
    x = (C.one_step(m, c, one_step_t, args.seed) if one_step_t is not None else
         C.sample(m, C.VP(), c, args.sampler, args.sample_steps, seed=args.seed, amp=args.amp))
    hits = int((predict(clf, x) == k).sum())
    lo, hi = interval(hits, n)
    return {"revived": hits / n, "revived_count": hits, "revived_lo": lo, "revived_hi": hi,
            "revived_fid": fid(clf, x, x_class),
            "attack": "classifier guidance (one-step generator)" if one_step_t is not None
            else "textual inversion"}


# --------------------------------------------------------------------------------------------------
# REPORTING
# --------------------------------------------------------------------------------------------------

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
    """Write metrics.json (if path) and print the figures as the last stdout line, in one line
    of JSON."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), flush=True)


# --------------------------------------------------------------------------------------------------
# RUNS: what every method run reports, computed by the same functions everywhere
# --------------------------------------------------------------------------------------------------

def load_samples(path) -> dict:
    """A run's samples.pt (see common.save_samples), checked."""
    path = Path(path)
    if not path.exists():
        raise C.UsageError(f"no samples at {path}: the run did not finish")
    s = C.load(path)
    if not {"x", "c", "sampler", "nfe", "null"} <= set(s) or len(s["x"]) != len(s["c"]):
        raise C.UsageError(f"{path} is not a samples.pt of this repository; run the method again")
    return s


def judge(s: dict, clf, x_real, y_real, forget) -> dict:
    """The evaluation of one samples.pt (its dict). Samples drawn for a class (c < K) give
    forget_rate, retain_acc, fid_retain, class_acc and IS as sample_metrics defines them; null-token
    samples give forget_rate_uncond, the share classified as a forgotten class. A model with only
    null-token samples (an unconditional model) takes that share as its forget rate, FID from the
    samples not classified as forgotten, and as retain_acc the classifier's mean confidence on them
    (there is no asked-for class)."""
    x, c, K = s["x"], s["c"], clf.head.out_features
    m = {"sampler": s["sampler"], "nfe": s["nfe"]}
    cond, unc = c < K, c == s["null"]
    if cond.any():
        m.update(sample_metrics(clf, x[cond], c[cond], x_real, y_real, forget))
    if unc.any():
        u = sample_metrics(clf, x[unc], None, x_real, y_real, forget)
        m.update(forget_rate_uncond=u["forget_rate"], class_share=u["class_share"],
                 n_uncond=u["n_samples"])
        if not cond.any():
            p = F.softmax(_batched(clf, x[unc]), 1)
            kept = ~torch.isin(p.argmax(1), torch.as_tensor(list(forget), dtype=torch.long))
            m.update({"forget_rate": u["forget_rate"], "fid_retain": u["fid_retain"], "is": u["is"],
                      "n_samples": u["n_samples"],
                      "retain_acc": p[kept].max(1).values.mean().item() if kept.any() else None})
    return m


def class_nll(model, x_test, y_test, forget, n: int, tol: float, conditional: bool = True) -> dict:
    """The NLL figures every run reports (bits/dim, one probability-flow ODE solve for all of them):
    the first n held-out images of the forgotten classes under their class token (nll_forget_bpd)
    and under the null token (nll_forget_null_bpd), the first n of the kept classes under theirs
    (nll_kept_bpd). An unconditional model (conditional=False) is asked under the null token
    only."""
    f = torch.isin(y_test, torch.as_tensor(list(forget), dtype=torch.long))
    xf, yf, xk, yk = x_test[f][:n], y_test[f][:n], x_test[~f][:n], y_test[~f][:n]
    null = lambda k: torch.full((k,), model.tok["null"], dtype=torch.long)
    if conditional:
        xs, cs = torch.cat([xf, xk, xf]), torch.cat([yf, yk, null(len(xf))])
    else:
        xs, cs = torch.cat([xf, xk]), null(len(xf) + len(xk))
    bpd = model_nll(model, xs, cs, rtol=tol, atol=tol)
    nf, nk = len(xf), len(xk)
    return {"nll_forget_bpd": float(bpd[:nf].mean()), "nll_kept_bpd": float(bpd[nf:nf + nk].mean()),
            "nll_forget_null_bpd": float(bpd[nf + nk:].mean() if conditional else bpd[:nf].mean()),
            "nll_n": n, "nll_tol": tol}


def evaluate_model(model, clf, args, forget, sampler: str = "", nll: bool = True,
                   conditional: bool = True):
    """Sample args.n_per_class images per class from a CondUNet (args: a common.RunArgs) with
    `sampler` (default args.sampler), judge them, add the NLL figures and the sampling speed.
    Returns (metrics, samples.pt's dict)."""
    dev, info, sampler = next(model.parameters()).device, model.info, sampler or args.sampler
    c = C.class_tokens(info.num_classes, args.n_per_class) if conditional else \
        torch.full((args.n_per_class * info.num_classes,), model.tok["null"])
    t0 = time.time()
    x = C.sample(model, C.VP(), c.to(dev), sampler, args.sample_steps, seed=args.seed,
                 amp=args.amp)
    secs = time.time() - t0
    s = C.sample_record(x, c, sampler, args.sample_steps, model.tok["null"])
    m = judge(s, clf, *C.load_data(info.name, args.data_root, "train"), forget)
    m.update(images_per_s=len(x) / secs, params=C.n_params(model))
    if nll and args.n_nll > 0:
        x_test, y_test = C.load_data(info.name, args.data_root, "test")
        m.update(class_nll(model, x_test, y_test, forget, args.n_nll, args.nll_tol, conditional))
    return m, s


def evaluate_base(path, clf, args, forget, sampler: str = "", conditional: bool = True) -> tuple:
    """evaluate_model for a checkpoint that does not change between runs (the base model): computed
    once per (model file, evaluation settings) and cached next to the checkpoint. Returns (metrics,
    first 10 samples per class for sample grids)."""
    keys = ("n_per_class", "sample_steps", "n_nll", "nll_tol", "seed", "data_root")
    sampler = sampler or args.sampler
    key = dict(model=C.file_id(path), forget=sorted(forget), sampler=sampler,
               conditional=conditional, version=2, **{k: getattr(args, k) for k in keys})
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def compute():
        model = C.load_checkpoint(path, args.dataset, C.pick_device(args.device))[0]
        m, s = evaluate_model(model, clf, args, forget, sampler, conditional=conditional)
        n = args.n_per_class
        return m, s["x"].view(-1, n, *s["x"].shape[1:])[:, :10].flatten(0, 1)
    return C.cached(C.cache_beside(path, f"eval-{name}.safetensors"), key, compute)


# ---- COMPARISON: python eval.py (one checkpoint) and python eval.py compare (all five) ----

# --------------------------------------------------------------------------------------------------
# CLI: evaluate one checkpoint
# --------------------------------------------------------------------------------------------------

@dataclass
class Args:
    dataset: str = "digits"
    """digits | mnist | fashion | cifar10"""
    threads: int = C.default_threads()
    """CPU threads of torch (OMP_NUM_THREADS if set, else half the cores: safe when other jobs
    share them)"""
    ckpt: str = ""
    """model to evaluate: a model.safetensors, a run folder or a diffusers UNet folder; empty = the
    cached base model (pretrained first if absent)"""
    forget: str = ""
    """comma-separated classes counted as forgotten (e.g. 0,3); empty = none"""
    n_per_class: int = 100
    """samples per class for accuracy, FID and IS"""
    sampler: str = "ddim"
    """ddim | ddpm | em"""
    sample_steps: int = 50
    """sampler steps (ddpm: strided as DDPMPipeline, 0 = all 1000)"""
    n_nll: int = 16
    """with --forget: held-out images per group (forgotten / kept) for the class NLL figures"""
    nll_real: int = 100
    """held-out real images (and as many noise images) for the NLL of real data against noise"""
    nll_tol: float = 1e-5
    """rtol = atol of the probability-flow ODE (score_sde's 1e-5)"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    amp: str = "off"
    """mixed precision of the sampler's network: off | auto (`--amp` alone) | bf16 | fp16"""
    fid_features: str = "auto"
    """classifier | inception (pytorch-fid's TF-Inception, as the papers; pip install pytorch-fid) |
    auto (inception for cifar10 when installed, else the dataset classifier's features)"""
    inception_weights: str = ""
    """path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth for machines without network"""
    seed: int = 0
    """sampling seed"""
    attack: bool = False
    """run the revival attack on the --forget class instead (a learned token; see revival)"""
    attack_steps: int = 200
    """Adam steps of the attack's token embedding"""
    attack_lr: float = 0.01
    """learning rate of the attack's token embedding"""
    attack_samples: int = 100
    """images drawn with the learned token"""


def attack(args: Args, model, ck: dict, k: int, clf, where: Path) -> dict | None:
    """`python eval.py --ckpt RUN --forget K --attack`: revival() on a conditional model, or n/a
    in one line for MSGM's unconditional ones."""
    if ck.get("method") == "msgm":
        print("revival attack: n/a (MSGM's models are unconditional: no class token to learn)")
        return None
    x, y = C.load_data(args.dataset, args.data_root, "train")
    r = revival(model, clf, k, x[y == k], args, C.one_step_t(ck))
    print(f"revival attack ({r['attack']}, {args.attack_steps} steps): class {k} drawn "
          f"{count(r['revived_count'], args.attack_samples)} of the time, FID to its real images "
          f"{r['revived_fid']:.2f}")
    report(r, where / "attack.json")
    return r


def main(args: Args):
    info = C.data_info(args.dataset)
    forget = C.parse_classes(args.forget, info, "forget class")
    dev = C.pick_device(args.device)
    t0 = time.time()
    # eval.json goes beside the model
    where = Path(args.ckpt) if args.ckpt else C.base_path(args.dataset)
    run_folder = where.is_dir() and not (where / "config.json").exists()
    where = C.writable(where if run_folder else where.parent)
    if args.attack and len(forget) != 1:
        raise C.UsageError("--attack revives one class: name it with --forget K")
    # checked first: a bad checkpoint must fail before anything is trained or written
    ck = {}
    if args.ckpt:
        model, ck = C.load_checkpoint(args.ckpt, args.dataset, dev)
        if ck.get("method") == "sfd" and not args.attack:   # one call from noise to an image
            raise C.UsageError(f"{args.ckpt} is an SFD one-step generator: evaluate it with "
                               f"python sfd.py --init {args.ckpt} --iters 0")
    else:
        model = C.load_base(args.dataset, dev, root=args.data_root)
    clf = load_judge(args, dev)
    if args.attack:
        return attack(args, model, ck, forget[0], clf, where)
    x_real, _ = C.load_data(args.dataset, args.data_root, "train")
    x_test, _ = C.load_data(args.dataset, args.data_root, "test")
    m, s = evaluate_model(model, clf, args, forget, args.sampler, nll=bool(forget))
    m["sample_acc"] = (predict(clf, s["x"]) == s["c"]).float().mean().item()
    m["classifier_test_acc"] = clf.test_acc
    # the floor: held-out real images vs the training set
    m["fid_real_test"] = fid(clf, x_test, x_real)
    n = min(args.nll_real, len(x_test))
    tol = dict(rtol=args.nll_tol, atol=args.nll_tol)
    m["nll_real_bpd"] = float(model_nll(model, x_test[:n], **tol).mean())
    m["nll_noise_bpd"] = float(model_nll(model, noise_images(info, n, args.seed), **tol).mean())
    m["seconds"] = time.time() - t0
    acc = {info.class_names[k]: {"accuracy": a} for k, a in enumerate(m["class_acc"])}
    print(f"\nclass-conditional samples ({args.n_per_class} per class, {s['sampler']}):")
    print(table(acc, ["accuracy"]))
    print()
    print(table({"model": m}, ["classifier_test_acc", "sample_acc", "retain_acc", "forget_rate",
                               "fid_retain", "fid_real_test", "is", "nll_real_bpd",
                               "nll_noise_bpd"]))
    report(m, where / "eval.json")


# --------------------------------------------------------------------------------------------------
# COMPARISON: the five methods on one scenario, each run as a program, every samples.pt judged alike
# --------------------------------------------------------------------------------------------------
#
# `python eval.py compare` forgets one class (default 0) with each method by running its file as a
# user would (`python siss.py --forget 0 --seed 1 ...`, the way CleanRL's benchmark utility runs its
# scripts), then judges every samples.pt the runs left with judge() and reads the figures that need
# the model (NLL, unlearning seconds, parameters, network evaluations per image) from each run's
# metrics.json. The runs write into a workspace, runs/compare-<dataset>[-<budget>]/, that holds
# copies of the cached base model and classifier (the children get UNLEARN_RUNS pointing there):
# their caches stay inside it and the user's own runs are never read or overwritten. The gold
# standard, the base recipe trained without the class, is `python common.py --drop-classes <class>`.
# A finished run is found again by a later call (records/), so an interrupted comparison resumes.

MODELS = ("base", "retrain", "sfd", "srs_me", "siss", "bilevel_prune", "msgm")
LABELS = {"base": "base (all data)", "retrain": "retrain w/o class", "sfd": "SFD (1 step)",
          "srs_me": "SRS-ME", "siss": "SISS", "bilevel_prune": "bilevel prune",
          "msgm": "Obtuse-MSGM"}

# Each budget: every row's command-line flags (beyond dataset, seed, tag, forget class and the
# evaluation's sizes, which compare passes to all), and the evaluation's settings.
COMPARE_BUDGETS = {
    # 2-core CPU, three seeds within about 35 minutes; each method removes the class on its own.
    ("digits", "full"): dict(
        # the base recipe's steps: a shorter retrain is an undertrained reference
        retrain=dict(steps=1400),
        sfd=dict(iters=150),                   # its forget rate reaches 0 at 150 (default 300)
        srs_me={},                             # the file's defaults: its stop rule ends the shift
        # every image of the class, a fixed budget, no copy monitoring; the official constants
        # (delete_tshirt.yaml: scaling_norm 5, no EMA), because the defaults' rule (10% of the
        # naive norm) and EMA, set on the T-shirt copies, push too little to remove a class; half
        # the pairs null-conditioned, so that this push keeps the other classes and the FID
        siss=dict(steps=150, stop_at_zero=False, sampler="ddim", eval_every=1000, n_eval=20,
                  scaling_norm="5", ema=0.0, lr=1e-4, p_null=0.5),
        bilevel_prune={},                      # the defaults (keep 0.55): shorter costs retain acc
        msgm=dict(finetune=True, task="norm", steps=300, control=False),  # from the base
        eval=dict(n_per_class=50, sample_steps=50, n_uncond=500, n_nll=12, nll_tol=1e-4,
                  attack_steps=200, attack_samples=100)),
    # CI: one seed on the 700-step test base, with the short-run settings of the methods' own tests
    ("digits", "ci"): dict(
        retrain=dict(steps=10),                # the path only: 10 steps make no usable model
        sfd=dict(iters=50, batch_size=16, lr_g=5e-4, lr_fake=5e-4, ema=0.5),
        srs_me=dict(max_steps=60, tau=0.0, lr=0.8, batch_size=8, n_train_images=32),
        siss=dict(steps=30, batch_size=32, lr=2e-4, stop_at_zero=False, sampler="ddim",
                  eval_every=1000, n_eval=20, scaling_norm="5", ema=0.0),
        bilevel_prune=dict(keep=0.8, steps=60, batch_size=32, upper_every=2, lr_up_mult=1.0,
                           warmup=10),
        msgm=dict(finetune=True, task="norm", steps=40, batch_size=32, forget_weight=0.5,
                  forget_every=1, ema=0.5, control=False),
        eval=dict(n_per_class=20, sample_steps=10, n_uncond=300, n_nll=2, nll_tol=1e-3,
                  attack_steps=30, attack_samples=20)),
    # 32x32 data on a GPU: the digits budget scaled up, not measured
    ("32px", "full"): dict(
        retrain=dict(steps=20_000),
        sfd=dict(iters=2000, lr_g=1e-4, lr_fake=1e-4, ema=0.99),
        srs_me={},
        siss=dict(stop_at_zero=False, sampler="ddim", eval_every=1000, n_eval=100),
        bilevel_prune=dict(steps=5000, lr=1e-4),
        msgm=dict(finetune=True, task="norm", steps=2000, control=False),
        eval=dict(n_per_class=100, sample_steps=50, n_uncond=1000, n_nll=50, nll_tol=1e-5,
                  attack_steps=500, attack_samples=100)),
}

COMPARE_COLS = [  # (metric, header, format)
    ("forget_rate", "forget rate", "{:.2f}"),
    ("forget_rate_uncond", "share of class in uncond. samples", "{:.3f}"),
    ("retain_acc", "retain acc", "{:.3f}"), ("fid_retain", "FID kept", "{:.2f}"),
    ("nll_forget_bpd", "NLL forget (bpd)", "{:.3f}"),
    ("nll_forget_null_bpd", "NLL forget, null token", "{:.3f}"),
    ("nll_kept_bpd", "NLL kept", "{:.3f}"), ("seconds", "unlearning s", "{:.0f}"),
    ("nfe", "NFE / image", "{:.0f}"), ("params_m", "parameters (M)", "{:.3f}"),
    ("revived", "revived (attack)", "{:.2f}")]
# what the sampler changes
SAMPLER_COLS = ("forget_rate", "forget_rate_uncond", "retain_acc", "fid_retain", "nfe")
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "ancestral DDPM (strided as DDPMPipeline)",
                 "em": "Euler-Maruyama"}


@dataclass
class CompareArgs:
    dataset: str = "digits"
    """digits | mnist | fashion | cifar10"""
    threads: int = C.default_threads()
    """CPU threads of torch here and in every run it starts (OMP_NUM_THREADS if set, else half the
    cores)"""
    seeds: str = "0,1,2"
    """comma-separated seeds; each method and the retrain run once per seed (the base is evaluated
    once)"""
    budget: str = "full"
    """full (digits: 2-core CPU; 32x32 data: GPU) | ci (one seed, seconds per method: the test
    suite's size)"""
    sampler: str = "ddim"
    """the sampler of every row's samples: ddim | ddpm (SISS's official evaluation: ancestral,
    strided) | em; not ddim: the same runs with --sampler in the workspace
    runs/compare-<dataset>[-<budget>]-<sampler>/, a table of the figures the sampler changes (SFD's
    one-step generator is the same under every sampler)"""
    forget: int = 0
    """the class every method forgets"""
    models: str = ",".join(MODELS)
    """rows of the table, a subset of the default"""
    rerun: bool = False
    """run the methods again even if this budget's workspace holds finished runs with the same
    arguments"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    fid_features: str = "auto"
    """classifier | inception (pytorch-fid's TF-Inception, as the papers; pip install pytorch-fid) |
    auto (inception for cifar10 when installed, else the dataset classifier's features)"""
    inception_weights: str = ""
    """path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth for machines without network"""
    readme: str = ""
    """also paste the report into this markdown file, between the lines <!-- compare-DATASET:begin
    --> and <!-- compare-DATASET:end --> (how README.md's table is regenerated rather than typed)"""


def flags(d: dict) -> list:
    """{"steps": 150, "stop_at_zero": False} -> ["--steps", "150", "--no-stop-at-zero"]."""
    out = []
    for k, v in d.items():
        k = k.replace("_", "-")
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        else:
            out += [f"--{k}", f"{v:g}" if isinstance(v, float) else str(v)]
    return out


def command(name: str, a: CompareArgs, seed: int, b: dict, ws: Path) -> tuple[list, Path]:
    """The command line of one row for one seed, and the run folder it writes inside the workspace
    ws."""
    e, f, ds = b["eval"], a.forget, a.dataset
    common = dict(dataset=ds, seed=seed, device=a.device, data_root=a.data_root,
                  sample_steps=e["sample_steps"])
    # ddim: every program's default (SISS's budget names it)
    if a.sampler != "ddim" and name != "sfd":
        common["sampler"] = a.sampler
    if name in ("base", "retrain"):
        tag = "" if name == "base" else f"no{f}-s{seed}"
        extra = {} if name == "base" else dict(drop_classes=str(f), tag=tag, **b["retrain"])
        argv = ["common.py", *flags(dict(common, n_per_class=e["n_per_class"],
                                         n_uncond=e["n_uncond"], **extra))]
        return argv, ws / C.run_dir("base", ds, tag).relative_to(C.RUNS)
    if name == "srs_me":
        forget = dict(erase=str(f), erasable=",".join(map(str, sorted(set(range(6)) | {f}))))
    else:
        forget = dict(forget=str(f))
    # msgm: unconditional samples, from the workspace's base (its null token)
    n = dict(n_per_class=e["n_per_class"])
    if name == "msgm":
        n = dict(n_samples=e["n_uncond"], base=str(ws / C.base_path(ds).relative_to(C.RUNS)))
    row = {k: v for k, v in b[name].items() if k != "sampler" or "sampler" not in common}
    # the methods at their README sizes (--protocol paper), the budget's own values over them
    argv = [f"{name}.py", *flags(dict(common, protocol="paper", tag=f"s{seed}", n_nll=e["n_nll"],
                                      nll_tol=e["nll_tol"], **n, **forget, **row))]
    return argv, ws / C.run_dir(name, ds, f"s{seed}").relative_to(C.RUNS)


def run_program(argv: list, ws: Path, log: Path, threads: int) -> dict:
    """Run `python <argv>` with its runs/ in the workspace and `threads` CPU threads, output to a
    log file; wall and CPU seconds."""
    w0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        env = {**os.environ, "UNLEARN_RUNS": str(ws.resolve()), "OMP_NUM_THREADS": str(threads)}
        p = subprocess.run([sys.executable, *argv], cwd=Path(__file__).resolve().parent, stdout=out,
                           stderr=subprocess.STDOUT, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"`python {' '.join(argv)}` failed (exit {p.returncode}); its output "
                           f"is in {log}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"run_wall_s": time.time() - w0, "run_cpu_s": cpu}


def _summarise(per_seed: dict) -> dict:
    """{metric: {mean, std, n}} over seeds (sample std, ddof 1), numeric metrics only; None where
    absent."""
    out = {}
    for k, _, _ in COMPARE_COLS:
        v = [r[k] for r in per_seed.values() if isinstance(r.get(k), (int, float))]
        if not v:
            out[k] = None
            continue
        std = float(np.std(v, ddof=1)) if len(v) > 1 else None
        out[k] = {"mean": float(np.mean(v)), "std": std, "n": len(v)}
    return out


def _results_md(summary: dict, settings: dict, figure: str = "grid.png") -> str:
    cell = lambda s, f: "n/a" if s is None else \
        f.format(s["mean"]) + (f" ± {f.format(s['std'])}" if s["std"] is not None else "")
    st, e = settings, settings["eval"]
    cols = [c for c in COMPARE_COLS if st.get("sampler", "ddim") == "ddim" or c[0] in SAMPLER_COLS]
    head = ["model", *[h for _, h, _ in cols]]
    rows = [[LABELS[n] + (" †" if n == "msgm" else ""), *[cell(s[k], f) for k, _, f in cols]]
            for n, s in summary.items()]
    table_ = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
              *["| " + " | ".join(r) + " |" for r in rows]]
    # the same runs, drawn by another sampler: what it changes
    if st.get("sampler", "ddim") != "ddim":
        return "\n".join([
            f"The same runs, every row's samples drawn by {SAMPLER_NAMES[st['sampler']]}, "
            f"{e['sample_steps']} steps (the commands above with `--sampler {st['sampler']}`; SFD: "
            f"its one-step generator; NLL and time do not depend on the sampler), seeds "
            f"{st['seeds']}: `{st['command']}`.", "", *table_, ""])
    return "\n".join([
        f"Forget class {st['forget']} on {st['dataset']}, budget `{st['budget']}`, "
        f"seeds {st['seeds']} (mean ± std over seeds; the base is one model, evaluated once).", "",
        *table_, "",
        f"- Every row is judged by the same function on the samples its run drew: "
        f"{e['n_per_class']} per class (DDIM {e['sample_steps']} steps; SFD its one-step "
        f"generator), the dataset classifier (held-out accuracy {st['classifier_test_acc']:.3f}), "
        f"FID of the kept classes' samples against their real training images (classifier "
        f"features). Forget rate: share of samples asked for class {st['forget']} that are "
        f"classified as it; retain acc: the same for the kept classes.",
        f"- † MSGM trains an unconditional model: its forget rate is the share of "
        f"{e['n_uncond']} unconditional samples classified as class {st['forget']} (the base's "
        f"and the retrain's in the next column), its retain acc the classifier's mean confidence "
        f"on the samples it assigns to kept classes, and its NLLs are under the null token.",
        f"- NLL: bits/dim through the probability-flow ODE (RK45, rtol = atol = "
        f"{e['nll_tol']:g}) of {e['n_nll']} held-out images of the class and {e['n_nll']} of the "
        f"other classes, under their class token, and of the class's images under the null token. "
        f"SFD: n/a (a one-step generator has no score over time to integrate).",
        f"- Unlearning s: wall-clock seconds of each method's unlearning phase as its run reports "
        f"it (retrain: {st['retrain_steps']} steps of the base recipe without the class). Cost of "
        f"the table: {st['runs_wall_s'] / 60:.1f} min wall-clock, "
        f"{st['runs_cpu_s'] / 60:.1f} CPU-min on {st['device']}.",
        f"- Revived: share of the {e.get('attack_samples')} samples drawn with a token learned by "
        f"textual inversion ({e.get('attack_steps')} Adam steps on real images of class "
        f"{st['forget']}, the model frozen; SFD's generator: through the classifier) that are "
        f"classified as it (Pham et al., ICLR 2024); MSGM (unconditional) and bilevel: n/a.",
        f"- Commands (seed 0): {st['commands']}.", "",
        f"![one row per model, three samples per class, the forgotten class framed]({figure})", ""])


def _markers(path: Path, name: str) -> tuple[str, str]:
    """The text of path around its lines <!-- compare-<name>:begin --> and <!-- compare-<name>:end
    --> (name: the dataset, then -<sampler> if not ddim): (before and begin, end and after); a usage
    error if they are missing, doubled or out of order."""
    begin, end = f"<!-- compare-{name}:begin -->\n", f"<!-- compare-{name}:end -->"
    doc = path.read_text() if path.is_file() else ""
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise C.UsageError(f"--readme {path}: needs one line {begin.strip()} and, after it, one "
                           f"line {end}")
    head, rest = doc.split(begin)
    return head + begin, end + rest.split(end)[1]


def _cells(s: dict, clf, K: int, g: int) -> torch.Tensor:
    """g samples per class for the figure: the first drawn for each class, or for an unconditional
    model the first the classifier assigns to each class (grey where it drew fewer)."""
    x, c = s["x"], s["c"]
    if not (c < K).any():
        c = predict(clf, x)
    cells = torch.zeros(K, g, *x.shape[1:])
    for k in range(K):
        got = x[c == k][:g]
        cells[k, :len(got)] = got
    return cells.flatten(0, 1)


def _grid(cells: dict, path: Path, K: int, g: int, forget: int):
    """One row per model, g samples per class, the forgotten class's columns framed; names on the
    left."""
    from PIL import Image, ImageDraw
    C.save_grid(torch.cat(list(cells.values())), path, nrow=K * g,
                highlight_cols=range(forget * g, (forget + 1) * g))
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


def revived(name: str, folder: Path, a: CompareArgs, e: dict, seed: int, clf, x_class, dev):
    """The revival attack's share on one compared run (the same budget for every row), cached
    beside it; None where it does not apply: MSGM's models are unconditional, and bilevel's pruned
    student loads only through bilevel_prune.py (this file's imports point down)."""
    if name in ("msgm", "bilevel_prune"):
        return None
    path = folder / "diffusers" if name == "srs_me" else folder / "model.safetensors"
    weights = path / "unet" / "diffusion_pytorch_model.safetensors" if name == "srs_me" else path
    opts = dict(attack_steps=e["attack_steps"], attack_lr=Args.attack_lr,
                attack_samples=e["attack_samples"], seed=seed, sampler=a.sampler,
                sample_steps=e["sample_steps"], amp="off")
    key = dict(model=C.file_id(weights), forget=a.forget, **opts)

    def compute():
        model, ck = C.load_checkpoint(path, a.dataset, dev)
        r = revival(model, clf, a.forget, x_class, SimpleNamespace(**opts), C.one_step_t(ck))
        return {"revived": r["revived"]}
    return C.cached(folder / f"revival-{a.forget}.safetensors", key, compute)["revived"]


def compare(a: CompareArgs) -> dict:
    # every mistake a user can make, before any work
    info = C.data_info(a.dataset)
    C.check_class(info, a.forget, "--forget class")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise C.UsageError(f"--seeds {a.seeds!r} must be comma-separated integers, "
                           f"e.g. 0,1,2") from None
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not seeds or not models or not set(models) <= set(MODELS):
        raise C.UsageError(f"--seeds needs at least one seed and --models a subset of "
                           f"{','.join(MODELS)}")
    key = ("digits" if a.dataset == "digits" else "32px", a.budget)
    if key not in COMPARE_BUDGETS:
        raise C.UsageError(f"unknown --budget {a.budget!r} for {a.dataset}: use "
                           f"{' or '.join(b for d, b in COMPARE_BUDGETS if d == key[0])}")
    b = COMPARE_BUDGETS[key]
    dev = C.pick_device(a.device)
    models = [m for m in MODELS if m in models]
    other = "" if a.sampler == "ddim" else "-" + a.sampler
    ws = C.RUNS / f"compare-{a.dataset}{'' if a.budget == 'full' else '-' + a.budget}{other}"
    marker = a.dataset + other
    if a.readme:
        _markers(Path(a.readme), marker)
    t0 = time.time()

    # the cached base and classifier (trained first if absent), copied into the workspace
    base_src = C.pretrain(a.dataset, device=dev, root=a.data_root)
    clf = load_judge(a, dev)
    clf_src = C.RUNS / f"classifier-{a.dataset}" / "model.safetensors"
    for src in (base_src, base_src.parent / "unet", clf_src):
        dst = ws / src.relative_to(C.RUNS)
        if src.exists() and (not dst.exists() or C.file_id(dst) != C.file_id(src)):
            shutil.rmtree(dst, ignore_errors=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    x_real, y_real = C.load_data(a.dataset, a.data_root, "train")
    x_test, y_test = C.load_data(a.dataset, a.data_root, "test")
    (ws / "records").mkdir(parents=True, exist_ok=True)
    # one base, judged once
    jobs = [(n, s) for s in seeds for n in models if n != "base" or s == seeds[0]]
    per_seed, cells, commands = {n: {} for n in models}, {}, {}
    print(f"compare on {a.dataset}: forget {a.forget}, budget {a.budget}, seeds {seeds}, "
          f"{len(jobs)} runs in {ws}")
    for i, (name, seed) in enumerate(jobs):
        argv, folder = command(name, a, seed, b, ws)
        commands.setdefault(name, "python " + " ".join(argv))
        rec_path = ws / "records" / f"{name}-s{seed}.json"
        tag = f"[{i + 1}/{len(jobs)}] {name} seed {seed}"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() and not a.rerun else {}
        if rec.get("argv") != argv or not (folder / "samples.pt").exists():
            print(f"{tag}: python {' '.join(argv)}", flush=True)
            log = ws / "records" / f"{name}-s{seed}.log"
            rec = dict(argv=argv, **run_program(argv, ws, log, a.threads))
            rec_path.write_text(json.dumps(rec) + "\n")
        s = load_samples(folder / "samples.pt")
        m = judge(s, clf, x_real, y_real, [a.forget])
        ran = json.loads((folder / "metrics.json").read_text())
        # models of common.py, which reports no NLL: computed here, cached
        if name in ("base", "retrain"):
            path = folder / "model.safetensors"
            key = dict(model=C.file_id(path), forget=a.forget, n=b["eval"]["n_nll"],
                       tol=b["eval"]["nll_tol"])
            ran.update(C.cached(folder / f"nll-{a.forget}.safetensors", key, lambda: class_nll(
                C.load_checkpoint(path, a.dataset, dev)[0], x_test, y_test, [a.forget],
                key["n"], key["tol"])))
            ran["seconds"] = ran["seconds"] if name == "retrain" else None
        m.update({k: ran.get(k) for k in ("nll_forget_bpd", "nll_kept_bpd",
                                           "nll_forget_null_bpd", "seconds", "params")})
        m.update(nfe=ran.get("nfe", s["nfe"]), params_m=(ran.get("params") or 0) / 1e6 or None,
                 run_wall_s=rec["run_wall_s"], run_cpu_s=rec["run_cpu_s"],
                 revived=revived(name, folder, a, b["eval"], seed, clf, x_real[y_real == a.forget],
                                 dev))
        per_seed[name][seed] = m
        cells.setdefault(name, _cells(s, clf, info.num_classes, 3))
        print(f"{tag}: " + "  ".join(f"{k} {fmt(m.get(k))}" for k in (
            "forget_rate", "forget_rate_uncond", "retain_acc", "fid_retain", "nll_forget_bpd",
            "nll_kept_bpd", "seconds", "run_wall_s", "run_cpu_s")), flush=True)

    summary = {n: _summarise(per_seed[n]) for n in models}
    total = lambda k: sum(r[f"run_{k}"] for n in models for r in per_seed[n].values())
    threads = torch.get_num_threads()
    settings = dict(
        dataset=a.dataset, forget=a.forget, budget=a.budget, seeds=seeds, eval=b["eval"],
        sampler=a.sampler,
        retrain_steps=b["retrain"]["steps"], classifier_test_acc=clf.test_acc,
        device=f"{dev} ({threads} thread{'s' * (threads > 1)})", runs_wall_s=total("wall_s"),
        runs_cpu_s=total("cpu_s"), wall_s=time.time() - t0,
        commands="; ".join(f"`{c}`" for c in commands.values()),
        command=f"python eval.py compare --dataset {a.dataset} --seeds {a.seeds} "
                f"--budget {a.budget}"
                + (f" --sampler {a.sampler}" if other else "")
                + (f" --forget {a.forget}" if a.forget else "")
                + (f" --device {a.device}" if a.device != "auto" else ""))
    results = {"settings": settings, "summary": summary, "per_seed": per_seed}
    (ws / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (ws / "results.md").write_text(_results_md(summary, settings))
    if a.readme:   # the same report, its figure linked from where the markdown file lies
        figure = Path(os.path.relpath(ws / "grid.png", Path(a.readme).resolve().parent)).as_posix()
        head, tail = _markers(Path(a.readme), marker)
        Path(a.readme).write_text(head + _results_md(summary, settings, figure) + tail)
    _grid(cells, ws / "grid.png", info.num_classes, 3, a.forget)
    means = {LABELS[n]: {k: (s[k] or {}).get("mean") for k, _, _ in COMPARE_COLS}
             for n, s in summary.items()}
    print("\n" + table(means, [k for k, _, _ in COMPARE_COLS]))
    print(f"\n{ws / 'results.md'}, results.json, grid.png; runs "
          f"{settings['runs_wall_s'] / 60:.1f} min wall "
          f"({settings['runs_cpu_s'] / 60:.1f} CPU-min); "
          f"this call {settings['wall_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        C.cli(compare, CompareArgs, sys.argv[2:])
    else:
        C.cli(main, Args)
