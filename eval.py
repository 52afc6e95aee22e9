"""Every metric the five methods report, and a command that evaluates one model.

  CLASSIFIER  a small CNN per dataset, trained once and cached; it judges generated samples
  CLASS       per-class accuracy of samples, forget rate, retain accuracy, Inception-style score
  FID         Frechet distance between feature Gaussians (pytorch-fid's formula; classifier features)
  NLL         exact likelihood in bits/dim through the probability-flow ODE (score_sde's likelihood.py)
  COPIES      share of samples that are near-copies (L2) of given images (data unlearning)

    python eval.py                                  # digits, the cached base model
    python eval.py --ckpt runs/x/model.pt --forget 0,3
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
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
    m.update(images_per_s=len(x) / secs, nfe=(steps if sampler != "ddpm" else C.VP().T) * (1 if guidance == 1 else 2))
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
    """sampler steps (ddim, em)"""
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


if __name__ == "__main__":
    C.cli(main, Args)
