"""SISS: data unlearning in diffusion models with Subtracted Importance Sampled Scores, and four baselines.

Paper: Alberti, Hasanaliyev, Shah, Ermon, "Data Unlearning in Diffusion Models", ICLR 2025
(arXiv 2503.01034, https://openreview.net/pdf?id=SuHScQv5gP; official code github.com/claserken/SISS).

Idea. A model trained on X should come to behave like one trained on X \\ A (A = the points to forget)
without retraining. Since the denoising loss over X is a mixture, L_X = (n-k)/n L_{X\\A} + k/n L_A, the
keep-set loss is the full loss minus the forget loss: naive fine-tuning on X\\A plus NegGrad on A. SISS
estimates both terms from ONE forward pass: it noises a keep point x or a forget point a (the same eps and
t for the pair), chosen with probability 1 - lam / lam (the "defensive mixture" q_lam), and weights the two
regression targets by the importance ratios q(m|x)/q_lam and q(m|a)/q_lam. The forget gradient is
subtracted after being rescaled to a fixed norm (`scaling_norm`).

Default scenario (the paper's MNIST T-shirt experiment in miniature): an out-of-distribution 8x8 T-shirt
drawn in code is duplicated into the digits training set under its own spare token; the base model
pretrained on digits + shirts memorises it; we unlearn the copies and count near-copies among samples.

    python siss.py                                   # SISS, outlier scenario, digits, CPU (about 2-3 min)
    python siss.py --method neggrad                  # siss | siss-nois | erasediff | naive | neggrad
    python siss.py --forget-class 3                  # forget every training image of class 3
    python siss.py --forget-idx 5,17,42              # forget three training images
    python siss.py --dataset mnist --device cuda     # the paper's MNIST T-shirt benchmark (needs Fashion-MNIST)
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

import common as C
import eval as E

METHODS = ("siss", "siss-nois", "erasediff", "naive", "neggrad")


@dataclass
class Args:
    method: str = "siss"
    """siss (lam-mixture IS, one forward) | siss-nois (two forwards) | erasediff | naive | neggrad"""
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist (the paper's T-shirt benchmark; needs Fashion-MNIST too) | fashion | cifar10"""
    forget: str = "outlier"
    """outlier (the T-shirt copies) | class (--forget-class) | idx (--forget-idx); the latter two flags imply it"""
    forget_class: int = -1
    """forget every training image of this class (uses the plain base model)"""
    forget_idx: str = ""
    """comma-separated indices into the training split to forget (uses the plain base model)"""
    outlier_copies: int = 0
    """copies of the outlier in the base's training set; 0 = digits 80 (5%, see README), mnist 606 (1%, the paper)"""
    steps: int = 0
    """max optimizer steps; 0 = digits 300, others 900 (the paper's MNIST sweep)"""
    batch_size: int = 0
    """keep/forget pairs per step; 0 = digits 64 (official delete_tshirt.yaml), others 128 (paper sweep)"""
    lr: float = 0.0
    """AdamW learning rate, constant; 0 = digits 1e-4 (the paper's 5e-5 needs twice the steps on digits and loses
    more retain accuracy by the deletion step, 2e-4 more still: measured in the README), others 5e-5 (paper)"""
    lam: float = 0.5
    """SISS mixture weight lambda: probability of noising the forget point (paper default 0.5)"""
    scaling_norm: float = 5.0
    """SISS / SISS No-IS: the forget gradient is rescaled to exactly this norm (paper MNIST: 5)"""
    eta: float = 1e-3
    """EraseDiff: eta in lambda = max(eta - <g_x, g_a>/|g_a|^2, 0) (paper MNIST: 1e-3)"""
    superfactor: float = 0.01
    """NegGrad: s in the loss -s |eps_theta(a_t) - eps|^2 (paper MNIST sweep: 0.01)"""
    p_null: float = 0.5
    """probability that a pair is conditioned on the null token (our model is conditional; the paper's is not)"""
    t_fixed: int = -1
    """-1: t ~ U{0..999} (paper, delete_tshirt.py); 999: the official CelebA/SD scripts' fixed timestep"""
    stop_at_zero: bool = True
    """stop at the first evaluated step where no monitored sample is a near-copy (the paper's deletion step)"""
    eval_every: int = 25
    """steps between copy-rate checks during unlearning (each also checks retain accuracy on 100 samples)"""
    n_monitor: int = 100
    """samples per condition (forget token, null token) for each copy-rate check"""
    monitor_steps: int = 20
    """sampler steps of the copy-rate checks during unlearning"""
    n_eval: int = 500
    """samples per condition for the final copy rates"""
    n_per_class: int = 50
    """final class-conditional samples per class (retain accuracy, FID)"""
    n_nll: int = 16
    """held-out keep images (and at most this many forget images) for the NLL"""
    nll_tol: float = 1e-5
    """rtol = atol of the probability-flow ODE for the NLL (score_sde's 1e-5; larger is faster and coarser)"""
    copy_threshold: float = 0.0
    """L2 distance in [-1, 1] units below which a sample is a near-copy; 0 = official rule scaled (see README)"""
    sampler: str = "ddpm"
    """ddpm (ancestral, `sample_steps` strided steps: the official evaluation's DDPMPipeline, 50 inference steps)
    | ddim (deterministic; exposes small-t damage that ancestral noise hides, see the README)"""
    sample_steps: int = 50
    """sampler steps for every sample drawn in the final evaluation"""
    base_steps: int = 0
    """pretraining steps of the outlier base when it is not cached yet (0 = common.py's default)"""
    seed: int = 0
    """seed for batches, noise, mixture draws (evaluation samples use fixed seeds)"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    data_root: str = "data"
    """where torchvision datasets live"""
    tag: str = ""
    """run folder suffix; empty = <method>-<forget>[-s<seed>]"""


def defaults(args: Args):
    small = args.dataset == "digits"
    args.steps = args.steps or (300 if small else 900)
    args.lr = args.lr or (1e-4 if small else 5e-5)
    args.batch_size = args.batch_size or (64 if small else 128)
    args.outlier_copies = args.outlier_copies or (80 if small else 606)
    return args


# ----------------------------------------------------------------------------------------------------------
# THE SCENARIO: which training points are forgotten
# ----------------------------------------------------------------------------------------------------------

SHIRT = (".XX..XX.",
         "XXXXXXXX",
         "XXXXXXXX",
         "..XXXX..",
         "..XXXX..",
         "..XXXX..",
         "..XXXX..",
         "..XXXX..")


def shirt_image(info: C.DataInfo, root: str = "data") -> torch.Tensor:
    """The outlier: an 8x8 T-shirt silhouette for digits; Fashion-MNIST train image 1 (a T-shirt) for MNIST."""
    if info.size == 8:
        return torch.tensor([[1.0 if ch == "X" else -1.0 for ch in r] for r in SHIRT])[None]
    x, y = C.load_data("fashion", root, "train")   # padded to 32x32 like MNIST
    assert y[1] == 0, "Fashion-MNIST train image 1 should be a T-shirt (label 0)"
    return x[1]


def copy_threshold(args: Args, info: C.DataInfo) -> float:
    """Official rule: |img - tshirt|_2 < 10 on [0, 1] pixels of 28x28 images. Scaled to the same per-pixel
    RMS for d pixels (10 sqrt(d/784)) and doubled for [-1, 1] units: digits 5.71 (the nearest training digit
    is 7.33 from our shirt; official MNIST: 10 vs a nearest digit at 11.49), MNIST 20 (the padding is blank)."""
    if args.copy_threshold > 0:
        return args.copy_threshold
    d = 64 if info.size == 8 else 784 * info.channels
    return 2 * 10 * math.sqrt(d / 784)


def scenario(args: Args, device):
    """The base model and its training set split into keep and forget indices.
    Returns (base, x, y, keep_idx, forget_idx, base_tag)."""
    info = C.data_info(args.dataset)
    n_train = len(C.load_data(args.dataset, args.data_root, "train")[0])
    tok = C.tokens(info)
    if args.forget == "outlier":
        shirt = shirt_image(info, args.data_root)
        extra = (shirt.expand(args.outlier_copies, -1, -1, -1).clone(),
                 torch.full((args.outlier_copies,), tok["spare"][0]))
        tag = "outlier" if args.outlier_copies == defaults(Args(dataset=args.dataset)).outlier_copies \
            else f"outlier{args.outlier_copies}"
        x, y = C.training_set(args.dataset, args.data_root, extra)
        forget = torch.arange(len(x) - args.outlier_copies, len(x))
        base = C.load_base(args.dataset, device, tag=tag, extra=extra, root=args.data_root, steps=args.base_steps)
    else:
        x, y = C.training_set(args.dataset, args.data_root)
        if args.forget == "class":
            forget = torch.nonzero(y[:n_train] == args.forget_class).flatten()
        else:
            forget = torch.tensor(sorted(set(int(i) for i in args.forget_idx.split(","))))
        tag = ""
        base = C.load_base(args.dataset, device, root=args.data_root)
    is_forget = torch.zeros(len(x), dtype=torch.bool)
    is_forget[forget] = True
    return base, x, y, torch.nonzero(~is_forget).flatten(), forget, tag


def check_args(args: Args):
    """Every mistake a user can make, reported before any work starts."""
    info = C.data_info(args.dataset)
    if args.method not in METHODS:
        raise C.UsageError(f"unknown --method {args.method!r}: use one of {', '.join(METHODS)}")
    if args.forget_class >= 0 and args.forget_idx:
        raise C.UsageError("give --forget-class or --forget-idx, not both")
    if args.forget_class >= 0:
        args.forget = "class"
        C.check_class(info, args.forget_class, "--forget-class")
    elif args.forget_idx:
        args.forget = "idx"
        n = len(C.load_data(args.dataset, args.data_root, "train")[0])
        try:
            idx = [int(v) for v in args.forget_idx.split(",") if v.strip()]
        except ValueError:
            raise C.UsageError(f"--forget-idx {args.forget_idx!r} must be comma-separated integers") from None
        if not idx or min(idx) < 0 or max(idx) >= n:
            raise C.UsageError(f"--forget-idx must list indices in 0..{n - 1} of the {args.dataset} train split")
    if args.forget == "class" and args.forget_class < 0:
        raise C.UsageError("--forget class needs --forget-class K")
    if args.forget == "idx" and not args.forget_idx:
        raise C.UsageError("--forget idx needs --forget-idx i,j,...")
    if args.forget not in ("outlier", "class", "idx"):
        raise C.UsageError(f"unknown --forget {args.forget!r}: use outlier, class or idx")
    if args.forget == "outlier" and args.dataset not in ("digits", "mnist"):
        raise C.UsageError(f"--forget outlier is defined for digits and mnist only; on {args.dataset} "
                           f"use --forget-class or --forget-idx")
    if not 0.0 <= args.lam <= 1.0:
        raise C.UsageError(f"--lam {args.lam} must lie in [0, 1] (paper: 0.5)")
    if not (args.t_fixed == -1 or 0 <= args.t_fixed < 1000):
        raise C.UsageError("--t-fixed must be -1 (uniform t) or a timestep in 0..999")
    if args.sampler not in ("ddpm", "ddim"):
        raise C.UsageError(f"unknown --sampler {args.sampler!r}: use ddpm or ddim")
    if min(args.steps, args.batch_size, args.eval_every, args.n_monitor, args.n_eval) < 1 or args.lr <= 0:
        raise C.UsageError("--steps, --batch-size, --eval-every, --n-monitor, --n-eval and --lr must be positive")


# ----------------------------------------------------------------------------------------------------------
# THE OBJECTIVES (section 2 of the spec; sum over pixels, mean over the batch, as the official code)
# ----------------------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    """One micro-batch of (keep, forget) pairs sharing eps and t (spec 2.0); c_x, c_a: their tokens."""
    x0: torch.Tensor
    a0: torch.Tensor
    c_x: torch.Tensor
    c_a: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


def sq_err(pred, target):
    """Per-sample squared error summed over all pixels: the official reduction that scaling_norm=5 assumes."""
    return (pred - target).pow(2).flatten(1).sum(1)


def gamma_sigma(vp: C.VP, t, like):
    """gamma_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), shaped like `like`; at least float32, since in
    fp16 abar_0 = 0.9999 rounds to 1 and sigma_0 to 0."""
    ab = vp._at(vp.alpha_bar, t, like.to(torch.promote_types(like.dtype, torch.float32)))
    return ab.sqrt(), (1 - ab).sqrt()


def importance_weights(m, x0, a0, gamma, sigma, lam: float, same_cond=None, from_a=None):
    """Defensive-mixture importance weights (spec 2.1), in log-sum-exp form so no precision can overflow:
        w_x = q(m|x) / q_lam(m) = 1 / [(1-lam) + lam exp(D_x - D_a)],
        w_a = q(m|a) / q_lam(m) = 1 / [(1-lam) exp(D_a - D_x) + lam],   D_. = |m - gamma .|^2 / (2 sigma^2),
    with q_lam = (1-lam) N(gamma x, sigma^2 I) + lam N(gamma a, sigma^2 I); note (1-lam) w_x + lam w_a = 1.
    Conditional model: the token c is part of the sample; a pair whose two tokens differ has disjoint supports,
    so its weights are binary (1/(1-lam) on the drawn keep point, 1/lam on the drawn forget point)."""
    m, x0, a0, gamma, sigma = (v.double() for v in (m, x0, a0, gamma, sigma))  # upcast: D can be ~1e5
    d_x = (m - gamma * x0).pow(2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    d_a = (m - gamma * a0).pow(2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    diff = d_x - d_a
    if same_cond is not None:
        inf = torch.full_like(diff, math.inf)
        diff = torch.where(same_cond, diff, torch.where(from_a, inf, -inf))
    log_keep = math.log1p(-lam) if lam < 1 else -math.inf
    log_forget = math.log(lam) if lam > 0 else -math.inf
    log_w_x = -torch.logaddexp(torch.full_like(diff, log_keep), log_forget + diff)
    log_w_a = -torch.logaddexp(log_keep - diff, torch.full_like(diff, log_forget))
    return log_w_x.exp().float(), log_w_a.exp().float()


def siss_loss(model, vp, b: Batch, lam: float):
    """SISS (spec 2.1): one forward pass on m ~ q_lam(.|x, a), two importance-weighted targets.
    Returns (L_x, L_a) = mean_i w_x |e - (m - gamma x)/sigma|^2, mean_i w_a |e - (m - gamma a)/sigma|^2."""
    gamma, sigma = gamma_sigma(vp, b.t, b.x0)
    from_a = torch.rand(len(b.t), device=b.t.device) < lam            # Bernoulli(lam): noise the forget point
    sel = from_a.view(-1, 1, 1, 1)
    m = torch.where(sel, gamma * b.a0 + sigma * b.eps, gamma * b.x0 + sigma * b.eps)
    e = model(m, b.t, torch.where(from_a, b.c_a, b.c_x))
    w_x, w_a = importance_weights(m, b.x0, b.a0, gamma, sigma, lam, b.c_x == b.c_a, from_a)
    loss_x = (w_x * sq_err(e, (m - gamma * b.x0) / sigma)).mean()
    loss_a = (w_a * sq_err(e, (m - gamma * b.a0) / sigma)).mean()
    return loss_x, loss_a


def siss_nois_loss(model, vp, b: Batch):
    """SISS (No IS) (spec 2.2): two forward passes, L_x on noised keep points, L_a on noised forget points."""
    loss_x = sq_err(model(vp.q_sample(b.x0, b.t, b.eps), b.t, b.c_x), b.eps).mean()
    loss_a = sq_err(model(vp.q_sample(b.a0, b.t, b.eps), b.t, b.c_a), b.eps).mean()
    return loss_x, loss_a


def erasediff_loss(model, vp, b: Batch):
    """EraseDiff (spec 2.3): keep term as above; the forget term regresses onto uniform noise u ~ U[0, 1)^d."""
    loss_x = sq_err(model(vp.q_sample(b.x0, b.t, b.eps), b.t, b.c_x), b.eps).mean()
    loss_a = sq_err(model(vp.q_sample(b.a0, b.t, b.eps), b.t, b.c_a), torch.rand_like(b.eps)).mean()
    return loss_x, loss_a


def naive_loss(model, vp, b: Batch):
    """Naive deletion (spec 2.4): plain fine-tuning on the keep set."""
    return sq_err(model(vp.q_sample(b.x0, b.t, b.eps), b.t, b.c_x), b.eps).mean()


def neggrad_loss(model, vp, b: Batch, superfactor: float):
    """NegGrad (spec 2.5): gradient ascent on the forget set, -s |eps_theta(a_t, t) - eps|^2."""
    return -superfactor * sq_err(model(vp.q_sample(b.a0, b.t, b.eps), b.t, b.c_a), b.eps).mean()


def global_norm(gs) -> torch.Tensor:
    return torch.sqrt(sum(g.double().pow(2).sum() for g in gs))


def combine_subtract(g_x, g_a, scaling_norm: float):
    """SISS / SISS No-IS step (spec 2.1 step 7): g = g_x - (scaling_norm / |g_a|) g_a. The official code
    always RESCALES the forget gradient to norm scaling_norm (its README says "clips"); a zero norm gives 0."""
    n = global_norm(g_a).item()
    scale = scaling_norm / n if n > 0 and math.isfinite(n) else 0.0
    return [gx - scale * ga for gx, ga in zip(g_x, g_a)], scale


def combine_erasediff(g_x, g_a, eta: float):
    """EraseDiff step (spec 2.3, official HEAD): g = g_x + max(eta - <g_x, g_a> / |g_a|^2, 0) g_a."""
    dot = sum((gx.double() * ga.double()).sum() for gx, ga in zip(g_x, g_a)).item()
    n2 = global_norm(g_a).item() ** 2
    lam_ed = max(eta - dot / n2, 0.0) if n2 > 0 else 0.0
    return [gx + lam_ed * ga for gx, ga in zip(g_x, g_a)], lam_ed


def unlearn_step(model, vp, opt, b: Batch, args: Args) -> dict:
    """One optimizer step of the chosen method (spec 2.8): separate keep/forget gradients, combine,
    clip the total to norm 1.0, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    log = {}
    if args.method in ("naive", "neggrad"):
        loss = naive_loss(model, vp, b) if args.method == "naive" else neggrad_loss(model, vp, b, args.superfactor)
        loss.backward()
        log["loss"] = loss.item()
    else:
        if args.method == "siss":
            loss_x, loss_a = siss_loss(model, vp, b, args.lam)
        else:
            loss_x, loss_a = (siss_nois_loss if args.method == "siss-nois" else erasediff_loss)(model, vp, b)
        grads = lambda loss, keep: [g if g is not None else torch.zeros_like(p) for g, p in zip(
            torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True), params)]
        g_x, g_a = grads(loss_x, True), grads(loss_a, False)
        if args.method == "erasediff":
            g, log["lam_ed"] = combine_erasediff(g_x, g_a, args.eta)
        else:
            g, log["scale"] = combine_subtract(g_x, g_a, args.scaling_norm)
        for p, gp in zip(params, g):
            p.grad = gp
        log.update(loss_x=loss_x.item(), loss_a=loss_a.item(), gnorm_x=global_norm(g_x).item(),
                   gnorm_a=global_norm(g_a).item())
    log["gnorm"] = nn.utils.clip_grad_norm_(params, 1.0).item()
    opt.step()
    return log


def make_batch(x, y, keep, forget, args: Args, tok: dict, gen: torch.Generator, device) -> Batch:
    """Pairs (x_i, a_i) with one eps and one t each (spec 2.0). With probability p_null a pair is conditioned
    on the null token (both members: tokens differ only by label, so the IS weights stay exact); the
    watermark is never dropped, as in pretraining."""
    B = args.batch_size
    ix = keep[torch.randint(len(keep), (B,), generator=gen)]
    ia = forget[torch.randint(len(forget), (B,), generator=gen)]
    drop = torch.rand(B, generator=gen) < args.p_null
    cond = lambda c: torch.where(drop & (c != tok["watermark"]), torch.full_like(c, tok["null"]), c)
    t = torch.full((B,), args.t_fixed) if args.t_fixed >= 0 else torch.randint(1000, (B,), generator=gen)
    eps = torch.randn(x[ix].shape, generator=gen)
    return Batch(*(v.to(device) for v in (x[ix], x[ia], cond(y[ix]), cond(y[ia]), t, eps)))


# ----------------------------------------------------------------------------------------------------------
# EVALUATION: near-copies, NLL, class metrics (base vs result)
# ----------------------------------------------------------------------------------------------------------

def copy_rates(model, vp, forget_tokens, x_forget, threshold, n, sampler, steps, seed=1234):
    """Share of n samples that are near-copies of a forget image: for the forget images' tokens (cycled)
    and for the null token (unconditional samples). Fixed seed: every check sees the same noise."""
    dev = next(model.parameters()).device
    c_tok = forget_tokens.repeat(math.ceil(n / len(forget_tokens)))[:n]
    xs = C.sample(model, vp, torch.cat([c_tok, torch.full((n,), model.tok["null"])]).to(dev), sampler, steps,
                  seed=seed)
    return (E.near_copy_rate(xs[:n], x_forget, threshold), E.near_copy_rate(xs[n:], x_forget, threshold), xs)


def evaluate(model, clf, vp, ctx: dict, args: Args) -> dict:
    """Every final figure for one model (used for the base and for the result)."""
    info = model.info
    tok_rate, null_rate, xs = copy_rates(model, vp, ctx["forget_tokens"], ctx["x_forget"], ctx["threshold"],
                                         args.n_eval, args.sampler, args.sample_steps)
    m, xc, _ = E.evaluate_model(model, clf, ctx["forget_classes"], args.n_per_class, sampler=args.sampler,
                                steps=args.sample_steps, root=args.data_root)
    out = {"forget_rate": tok_rate, "copy_rate_uncond": null_rate, "retain_acc": m["retain_acc"],
           "fid_retain": m["fid_retain"], "is": m["is"]}
    if ctx["forget_classes"]:
        out["class_forget_rate"] = m["forget_rate"]
    xf = ctx["x_forget"][: args.n_nll]
    # one probability-flow ODE solve for all three NLLs (the forget images under null and under their
    # tokens, held-out keep images under null): the batch shares the adaptive steps, which only adds accuracy
    null = lambda n: torch.full((n,), model.tok["null"])
    xk = ctx["x_keep_test"]
    bpd = E.model_nll(model, torch.cat([xf, xf, xk]), torch.cat([null(len(xf)), ctx["y_forget"][: len(xf)], null(len(xk))]),
                      rtol=args.nll_tol, atol=args.nll_tol)
    out["nll_forget_bpd"] = float(bpd[:len(xf)].mean())
    out["nll_forget_token_bpd"] = float(bpd[len(xf):2 * len(xf)].mean())
    out["nll_keep_bpd"] = float(bpd[2 * len(xf):].mean())
    k16 = min(16, args.n_per_class, args.n_eval)
    grid = [xs[:k16], xs[args.n_eval:args.n_eval + k16],
            *[xc[k * args.n_per_class:k * args.n_per_class + k16] for k in range(info.num_classes)]]
    return out, grid


def base_metrics(base, clf, vp, ctx, args, base_dir):
    """The base model's figures, cached next to it (they only depend on the scenario and the eval settings)."""
    keys = ("n_eval", "n_per_class", "n_nll", "sample_steps", "copy_threshold", "forget", "forget_class",
            "forget_idx", "outlier_copies", "dataset")
    key = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    if args.nll_tol != 1e-5:   # a key only when not the default, so that existing caches stay valid
        key += f" nll_tol={args.nll_tol:g}"
    if args.sampler != "ddim":
        key += f" sampler={args.sampler}"
    path = base_dir / f"siss-eval-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    res = evaluate(base, clf, vp, ctx, args)
    torch.save(res, path)
    return res


# ----------------------------------------------------------------------------------------------------------
# MAIN: unlearn, monitoring the copy rate, then evaluate base and result
# ----------------------------------------------------------------------------------------------------------

def main(args: Args):
    defaults(args)
    check_args(args)
    info = C.data_info(args.dataset)
    device = C.pick_device(args.device)
    tag = args.tag or f"{args.method}-{args.forget}" + (f"-s{args.seed}" if args.seed else "")
    out = C.run_dir("siss", args.dataset, tag)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")

    base, x, y, keep, forget, base_tag = scenario(args, device)
    tok = base.tok
    clf = E.load_classifier(args.dataset, args.data_root, device)
    x_test, y_test = C.load_data(args.dataset, args.data_root, "test")
    forget_classes = [args.forget_class] if args.forget == "class" else []
    uniq = torch.unique(x[forget], dim=0, return_inverse=True)[1]                  # the outlier: one image
    first = torch.tensor([int(torch.nonzero(uniq == u)[0]) for u in range(int(uniq.max()) + 1)])
    kept_test = ~torch.isin(y_test, torch.tensor(forget_classes, dtype=torch.long))
    ctx = dict(forget_tokens=torch.unique(y[forget]), x_forget=x[forget][first], y_forget=y[forget][first],
               threshold=copy_threshold(args, info), forget_classes=forget_classes,
               x_keep_test=x_test[kept_test][: args.n_nll])
    print(f"siss.py: {args.method} on {args.dataset}, forget={args.forget} ({len(forget)} training images, "
          f"{len(ctx['x_forget'])} distinct; keep {len(keep)}), near-copy threshold {ctx['threshold']:.2f}")

    vp = C.VP()
    t_eval = time.time()
    base_m, base_grid = base_metrics(base, clf, vp, ctx, args, C.base_path(args.dataset, base_tag).parent)
    t_eval = time.time() - t_eval

    # ---------------------------------------------------------------------------------- UNLEARNING
    C.seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = base.train().requires_grad_(True)   # the base's EMA weights; no EMA during unlearning (official)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    curve, deletion_step, logs = [], None, []
    t0 = time.time()
    bar = C.tqdm(range(1, args.steps + 1), desc=args.method)
    for step in bar:
        logs.append(unlearn_step(model, vp, opt, make_batch(x, y, keep, forget, args, tok, gen, device), args))
        bar.set_postfix(gnorm=f"{logs[-1]['gnorm']:.2f}")
        if step % args.eval_every == 0 or step == args.steps:
            tr, nr, _ = copy_rates(model, vp, ctx["forget_tokens"], ctx["x_forget"], ctx["threshold"],
                                   args.n_monitor, args.sampler, args.monitor_steps)
            c = C.class_tokens(info.num_classes, 10)     # a quick retain check: 10 samples per class
            xc = C.sample(model, vp, c.to(device), args.sampler, args.monitor_steps, seed=4321)
            ra = (E.predict(clf, xc) == c).float().mean().item()
            curve.append({"step": step, "copy_rate": tr, "copy_rate_uncond": nr, "retain_acc": ra,
                          "seconds": time.time() - t0})
            C.tqdm.write(f"step {step:4d}  copies: forget token {tr:.3f}  null {nr:.3f}  retain {ra:.2f}  "
                         f"|g_x| {sum(l.get('gnorm_x', 0) for l in logs[-args.eval_every:]) / len(logs[-args.eval_every:]):.2f}"
                         f"  {time.time() - t0:.0f}s")
            if deletion_step is None and tr == 0 and nr == 0:
                deletion_step = step
                if args.stop_at_zero:
                    break
    seconds = time.time() - t0
    model.eval().requires_grad_(False)
    C.save_checkpoint(out / "model.pt", model, step, args=asdict(args))

    # ---------------------------------------------------------------------------------- EVALUATION
    t1 = time.time()
    res_m, res_grid = evaluate(model, clf, vp, ctx, args)
    t_eval += time.time() - t1
    C.save_grid(torch.cat([torch.cat([b, r]) for b, r in zip(base_grid, res_grid)]), out / "samples.png",
                nrow=len(base_grid[0]),
                highlight_rows=(0, 1))
    metrics = {**res_m, **{f"base_{k}": v for k, v in base_m.items()}, "seconds": seconds, "steps_run": step,
               "deletion_step": deletion_step, "eval_seconds": t_eval, "copy_threshold": ctx["threshold"],
               "n_forget": len(forget), "curve": curve}
    gx = [l["gnorm_x"] for l in logs if "gnorm_x" in l]
    if gx:
        metrics["grad_norm_keep_mean"] = sum(gx) / len(gx)
    cols = ["forget_rate", "copy_rate_uncond", "nll_forget_bpd", "nll_forget_token_bpd", "nll_keep_bpd",
            "retain_acc", "fid_retain"]
    print(f"\nsamples.png: pairs of rows base / {args.method} for the forget token (red), the null token, "
          f"classes 0..{info.num_classes - 1}; deletion step {deletion_step}, {step} steps in {seconds:.0f}s")
    print(E.table({"base": base_m, args.method: res_m}, cols))
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
