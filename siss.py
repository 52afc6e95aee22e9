"""SISS (Subtracted Importance Sampled Scores): data unlearning in diffusion models; 4 baselines.

Paper: Alberti, Hasanaliyev, Shah, Ermon, "Data Unlearning in Diffusion Models", ICLR 2025,
arXiv 2503.01034. Official code: github.com/claserken/SISS (the objectives in
losses/ddpm_deletion_loss.py, the step and the loop in delete_tshirt.py).

A model trained on X should behave like one trained on X \\ A (A: the points to forget) without
retraining. As L_X = (n-k)/n L_{X\\A} + k/n L_A, the keep-set loss is the full loss minus the
forget loss; SISS estimates both from ONE forward pass on m ~ q_lam = (1-lam) N(gamma_t x,
sigma_t^2 I) + lam N(gamma_t a, sigma_t^2 I) (a keep point x and a forget point a share eps and t),
weighting the two regression targets by importance ratios:

    L_x = mean w_x |eps_theta(m, t) - (m - gamma_t x) / sigma_t|^2,    w_x = q(m | x) / q_lam(m)
    L_a = mean w_a |eps_theta(m, t) - (m - gamma_t a) / sigma_t|^2,    w_a = q(m | a) / q_lam(m)
    g   = grad L_x - scaling_norm * grad L_a / |grad L_a|,  clipped to norm 1, then AdamW

Here: siss_loss (L_x, L_a; importance_weights: w_x, w_a), the baselines siss_nois_loss,
erasediff_loss, naive_loss, neggrad_loss; combine_subtract (g), combine_erasediff; make_batch (the
pairs), unlearn_step (one step of the official delete_tshirt.py), unlearn (its loop).

Default scenario, the paper's MNIST T-shirt experiment in miniature: an 8x8 T-shirt added 80
times (5%) to the digits under a spare token is memorised by its base; SISS unlearns its copies.

    python siss.py                                # SISS, the T-shirt copies, digits, CPU, minutes
    python siss.py --protocol paper               # the same at the README's sizes (15 CPU-min)
    python siss.py --method neggrad               # siss | siss-nois | erasediff | naive | neggrad
    python siss.py --forget 3                     # forget every training image of class 3
    python siss.py --forget-idx 5,17,42           # forget three training images
    python siss.py --dataset mnist --device cuda  # the paper's MNIST T-shirt benchmark

A run writes runs/siss-<dataset>[-<tag>]/: args.json, model.safetensors, samples.*, metrics.json.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

import common as C
import eval as E


@dataclass
class SISSHparams:
    """What the losses, unlearn_step and unlearn read (digits values; Args.presets: the others)."""
    method: str = "siss"
    """siss (lam-mixture importance sampling, one forward pass) | siss-nois (two) | erasediff |
    naive | neggrad (official ddpm_deletion_loss.py)"""
    lam: float = 0.5
    """SISS mixture weight lambda: the probability of noising the forget point (paper: 0.5)"""
    scaling_norm: float | str = "auto"
    """SISS / No-IS: the forget gradient's norm (official MNIST config: 5); auto: 10% of the
    measured naive-deletion one (official README)"""
    eta: float = 1e-3
    """EraseDiff: eta in lambda = max(eta - <g_x, g_a> / |g_a|^2, 0) (paper MNIST: 1e-3)"""
    superfactor: float = 0.01
    """NegGrad: s in the loss -s |eps_theta(a_t) - eps|^2 (paper MNIST sweep: 0.01)"""
    p_null: float = -1.0
    """probability of null-conditioning a pair; -1: the base's label dropout, --base-p-null"""
    t_fixed: int | None = -1
    """-1: t ~ U{0..999} (official delete_tshirt.py); 999: the official CelebA / SD scripts' t"""
    lr: float = 2e-4
    """AdamW learning rate, constant (official MNIST T-shirt sweep: 5e-5, the mnist preset)"""
    batch_size: int = 64
    """keep/forget pairs per step (official delete_tshirt.yaml: 64; the paper's MNIST sweep: 128)"""
    steps: int = 800
    """most optimizer steps (a run stops at the deletion step; the paper's MNIST sweep: 900)"""
    ema: float = 0.99
    """decay of an EMA of the weights while unlearning, judged and saved (0: none, as official)"""


# The objectives: squared errors summed over pixels, averaged over the batch (ddpm_deletion_loss.py)

def sq_err(pred, target):
    """Per-sample squared error summed over pixels (official ddpm_deletion_loss.py)."""
    return (pred - target).pow(2).flatten(1).sum(1)


def gamma_sigma(alpha_bar, t, like):
    """gamma_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) (official delete_tshirt.py),
    shaped like `like`, formed in float64, kept in at least float32 (fp16 rounds sigma_0 to 0)."""
    ab = alpha_bar.to(t.device)[t.long()].view(-1, *[1] * (like.ndim - 1))
    dtype = torch.promote_types(like.dtype, torch.float32)
    return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)


def noised(alpha_bar, x0, t, eps):
    """x_t = gamma_t x0 + sigma_t eps (the official scripts' scheduler.add_noise)."""
    gamma, sigma = gamma_sigma(alpha_bar, t, x0)
    return gamma * x0 + sigma * eps


def importance_weights(m, x0, a0, gamma, sigma, lam: float, same_cond=None, from_a=None):
    """The defensive mixture's weights (official
    ddpm_deletion_loss.py:importance_sampling_with_mixture), in log-sum-exp form (the official code
    exponentiates directly, which overflows in fp16), with D_. = |m - gamma .|^2 / (2 sigma^2):
        w_x = q(m|x) / q_lam(m) = 1 / [(1-lam) + lam exp(D_x - D_a)],
        w_a = q(m|a) / q_lam(m) = 1 / [(1-lam) exp(D_a - D_x) + lam];   (1-lam) w_x + lam w_a = 1.
    Tokens that differ (same_cond False): disjoint supports, binary weights 1/(1-lam) or 1/lam."""
    m, x0, a0, gamma, sigma = (v.double() for v in (m, x0, a0, gamma, sigma))  # D can be ~1e5
    d_x = (m - gamma * x0).pow(2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    d_a = (m - gamma * a0).pow(2).flatten(1).sum(1) / (2 * sigma.flatten() ** 2)
    diff = d_x - d_a
    if same_cond is not None:
        diff = torch.where(same_cond, diff, torch.where(from_a, math.inf, -math.inf))
    log_keep = math.log1p(-lam) if lam < 1 else -math.inf
    log_forget = math.log(lam) if lam > 0 else -math.inf
    log_w_x = -torch.logaddexp(torch.full_like(diff, log_keep), log_forget + diff)
    log_w_a = -torch.logaddexp(log_keep - diff, torch.full_like(diff, log_forget))
    return log_w_x.exp().float(), log_w_a.exp().float()


def siss_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps, lam: float):
    """SISS (official ddpm_deletion_loss.py:importance_sampling_with_mixture): one pass of
    model(x_t, t, c) -> e on m ~ q_lam(. | x, a):
        (L_x, L_a) = (mean w_x |e - (m - gamma x)/sigma|^2, mean w_a |e - (m - gamma a)/sigma|^2)"""
    gamma, sigma = gamma_sigma(alpha_bar, t, x0)
    from_a = torch.rand(len(t), device=t.device) < lam    # Bernoulli(lam): noise the forget point
    pick_a = from_a.view(-1, *[1] * (x0.ndim - 1))
    m = torch.where(pick_a, gamma * a0 + sigma * eps, gamma * x0 + sigma * eps)
    e = model(m, t, torch.where(from_a, c_a, c_x))
    w_x, w_a = importance_weights(m, x0, a0, gamma, sigma, lam, c_x == c_a, from_a)
    loss_x = (w_x * sq_err(e, (m - gamma * x0) / sigma)).mean()
    loss_a = (w_a * sq_err(e, (m - gamma * a0) / sigma)).mean()
    return loss_x, loss_a


def siss_nois_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps):
    """SISS (No IS) (official ddpm_deletion_loss.py:double_forward_with_neg_del): two forward
    passes, L_x on the noised keep points, L_a on the noised forget points (the same eps and t)."""
    loss_x = sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()
    loss_a = sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), eps).mean()
    return loss_x, loss_a


def erasediff_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps):
    """EraseDiff (official ddpm_deletion_loss.py:erasediff): the keep term as in SISS (No IS); the
    forget term regresses onto uniform noise u ~ U[0, 1)^d."""
    loss_x = sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()
    loss_a = sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), torch.rand_like(eps)).mean()
    return loss_x, loss_a


def naive_loss(model, alpha_bar, x0, c_x, t, eps):
    """Naive deletion (official ddpm_deletion_loss.py:naive_del): fine-tuning on the keep set."""
    return sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()


def neggrad_loss(model, alpha_bar, a0, c_a, t, eps, superfactor: float):
    """NegGrad (official ddpm_deletion_loss.py:simple_neg_del): -s |eps_theta(a_t) - eps|^2."""
    return -superfactor * sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), eps).mean()


def global_norm(grads) -> torch.Tensor:
    """The L2 norm over a list of gradients (official delete_tshirt.py: all UNet parameters)."""
    return torch.sqrt(sum(g.double().pow(2).sum() for g in grads))


def unscaled_grads(loss, params, scaler, retain_graph: bool) -> list:
    """One of the separate backward passes of official delete_tshirt.py, in true units under fp16
    loss scaling (divided by the scale); zeros for a parameter the loss does not reach."""
    scale = scaler.get_scale()                 # 1 unless fp16
    grads = torch.autograd.grad(scaler.scale(loss), params, retain_graph=retain_graph,
                                allow_unused=True)
    return [g / scale if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def combine_subtract(g_x, g_a, scaling_norm: float):
    """SISS / SISS No-IS step (official delete_tshirt.py): g = g_x - (scaling_norm / |g_a|) g_a,
    always RESCALED (its README says "clips"); no forget term where |g_a| is 0 or not finite.
    Returns (g, the factor on g_a)."""
    n = global_norm(g_a).item()
    scale = scaling_norm / n if n > 0 and math.isfinite(n) else 0.0
    return [gx - scale * ga for gx, ga in zip(g_x, g_a)], scale


def combine_erasediff(g_x, g_a, eta: float):
    """EraseDiff (delete_tshirt.py): g = g_x + lam g_a, lam = max(eta - <g_x, g_a> / |g_a|^2, 0)."""
    dot = sum((gx.double() * ga.double()).sum() for gx, ga in zip(g_x, g_a)).item()
    n2 = global_norm(g_a).item() ** 2
    lam_ed = max(eta - dot / n2, 0.0) if n2 > 0 else 0.0
    return [gx + lam_ed * ga for gx, ga in zip(g_x, g_a)], lam_ed


LOSSES = (sq_err, gamma_sigma, noised, importance_weights, siss_loss, siss_nois_loss,
          erasediff_loss, naive_loss, neggrad_loss, global_norm, unscaled_grads, combine_subtract,
          combine_erasediff)


# Unlearning: pairs (x, a) sharing eps and t, the chosen objective, the experiment's check

def make_batch(x, y, keep, forget, hp: SISSHparams, tok: dict, gen: torch.Generator, device):
    """(x0, c_x, a0, c_a, t, eps): batch_size pairs of a keep and a forget point, one eps and t each
    (official delete_tshirt.py); with probability p_null both tokens are null (never the
    watermark's, as in pretraining)."""
    B = hp.batch_size
    ix = keep[torch.randint(len(keep), (B,), generator=gen)]
    ia = forget[torch.randint(len(forget), (B,), generator=gen)]
    drop = torch.rand(B, generator=gen) < hp.p_null
    null = torch.full((B,), tok["null"], dtype=y.dtype)
    c_x = torch.where(drop & (y[ix] != tok["watermark"]), null, y[ix])
    c_a = torch.where(drop & (y[ia] != tok["watermark"]), null, y[ia])
    if hp.t_fixed is None:
        t = torch.randint(1000, (B,), generator=gen)
    else:
        t = torch.full((B,), hp.t_fixed)
    eps = torch.randn(x[ix].shape, generator=gen)
    return tuple(v.to(device) for v in (x[ix], c_x, x[ia], c_a, t, eps))


def unlearn_step(model, alpha_bar, opt, scaler, ctx, batch: tuple, hp: SISSHparams) -> dict:
    """One step of official delete_tshirt.py: the keep gradient g_x and the forget gradient g_a
    taken separately, combined (combine_subtract or combine_erasediff), clipped to norm 1, AdamW.
    ctx: the forward pass's autocast context; scaler: the fp16 GradScaler (else a pass-through).
    Both gradients are unscaled first: scaling_norm is in true units. Returns the step's log."""
    x0, c_x, a0, c_a, t, eps = batch
    params = [p for p in model.parameters() if p.requires_grad]
    with ctx:
        if hp.method == "siss":
            loss_x, loss_a = siss_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps, hp.lam)
        elif hp.method == "siss-nois":
            loss_x, loss_a = siss_nois_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps)
        elif hp.method == "erasediff":
            loss_x, loss_a = erasediff_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps)
        elif hp.method == "naive":          # the keep term alone
            loss_x = naive_loss(model, alpha_bar, x0, c_x, t, eps)
        elif hp.method == "neggrad":        # the forget term alone
            loss_a = neggrad_loss(model, alpha_bar, a0, c_a, t, eps, hp.superfactor)
        else:
            raise ValueError(f"unknown method {hp.method!r}")
    log = {}
    if hp.method == "naive":
        g = unscaled_grads(loss_x, params, scaler, retain_graph=False)
        log["loss_x"] = loss_x.item()
    elif hp.method == "neggrad":
        g = unscaled_grads(loss_a, params, scaler, retain_graph=False)
        log["loss_a"] = loss_a.item()
    else:
        g_x = unscaled_grads(loss_x, params, scaler, retain_graph=True)   # L_a needs the graph too
        g_a = unscaled_grads(loss_a, params, scaler, retain_graph=False)
        if hp.method == "erasediff":
            g, lam_ed = combine_erasediff(g_x, g_a, hp.eta)
            log["lam_ed"] = lam_ed
        else:
            g, scale = combine_subtract(g_x, g_a, hp.scaling_norm)
            log["scale"] = scale
        log.update(loss_x=loss_x.item(), loss_a=loss_a.item(), gnorm_x=global_norm(g_x).item(),
                   gnorm_a=global_norm(g_a).item())
    loss_scale = scaler.get_scale()
    for p, g_p in zip(params, g):   # back at the loss scale (a power of 2: exact) for its inf check
        p.grad = g_p * loss_scale
    scaler.unscale_(opt)
    log["gnorm"] = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    scaler.step(opt)               # skipped when a gradient overflowed in fp16
    scaler.update()
    return log


STEPS = (unlearn_step,)


def unlearn(model, data: tuple, args: Args, device, out, on_check) -> tuple:
    """The loop of official delete_tshirt.py on data = (x, y, keep indices, forget indices), with an
    EMA of the weights, resumable. Every eval_every steps and at the last, the experiment's check
    on_check(step, EMA model, step log and clock) -> (figures, stop) adds a point to the curve; stop
    ends the loop. args: an Args (SISSHparams, scaling_norm a number; the run options)."""
    gen = torch.Generator().manual_seed(args.seed)                 # the pairs' own stream
    dtype = torch.float32 if device.type == "mps" else torch.float64   # mps has no float64
    alpha_bar = C.VP().alpha_bar.to(device, dtype)
    ema = C.EMA(model.train().requires_grad_(True), args.ema)   # judged and kept
    scaler = C.grad_scaler(device, args.amp)
    ctx = C.autocast(device, args.amp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6,
                            eps=1e-8)
    net = torch.compile(model) if args.compile else model   # the same parameters, compiled calls
    curve = []
    resume = C.Resume(out / "resume.pt", asdict(args), args.save_every, args.track and out / "tb",
                      model=model, ema=ema, opt=opt, scaler=scaler, gen=gen, curve=curve)
    step = start = resume.load()
    bar = C.tqdm(range(start + 1, args.steps + 1), args.method, args.steps, initial=start)
    for step in bar:
        batch = make_batch(*data, args, model.tok, gen, device)
        log = unlearn_step(net, alpha_bar, opt, scaler, ctx, batch, args)
        ema.update(model)
        bar.set_postfix(gnorm=f"{log['gnorm']:.2f}")
        stop = False
        if step % args.eval_every == 0 or step == args.steps:   # a point of the curve
            figures, stop = on_check(step, ema.model, {**log, **resume.clock()})
            curve.append(dict(step=step, **figures, **resume.clock()))
        resume.save(step)
        if stop:
            break
    resume.finish()
    return ema.model, dict(seconds=resume.clock()["seconds"], steps_run=step, curve=curve)


# ---- EXPERIMENT: python siss.py (scenario, judging, report); not needed to follow SISS ----

METHODS = ("siss", "siss-nois", "erasediff", "naive", "neggrad")   # the values of --method


@dataclass
class Args(SISSHparams, C.RunArgs):
    forget: str = "outlier"
    """outlier (the T-shirt copies; digits, mnist) or a class index (every training image of that
    class)"""
    forget_idx: str = ""
    """comma-separated indices into the training split to forget instead (uses the plain base
    model)"""
    outlier_copies: int = 80
    """copies of the outlier in its base's training set (digits: 5%, see the README; mnist: 1%, the
    paper)"""
    init: str = ""
    """start from this model (e.g. an earlier run folder) instead of the base; the base stays the
    reference"""
    base_p_null: float = 0.1
    """label dropout of the outlier base when it is pretrained (more: the null token draws the
    outlier more often)"""
    base_recipe: str = ""
    """the outlier base's pretraining over the dataset's recipe, e.g. steps=5000,batch_size=64
    (MNIST on a CPU)"""
    stop_at_zero: bool = True
    """stop at the first check where no monitored sample is a near-copy under either judge (the
    deletion step)"""
    eval_every: int = 50
    """steps between copy-rate checks during unlearning (each also checks retain accuracy on 100
    samples)"""
    n_monitor: int = 30
    """samples per condition (forget token, null token) for each copy-rate check"""
    monitor_steps: int = 20
    """sampler steps of the copy-rate checks"""
    n_eval: int = 50
    """forget-token samples for the final copy rate (per sampler)"""
    n_uncond: int = 300
    """null-token samples for the final unconditional copy share and its 95% interval (official
    sampler)"""
    copy_threshold: float = 20 * math.sqrt(64 / 784)
    """near-copy below this L2 distance in [-1, 1] units: official |img - tshirt| < 10 on [0, 1]
    28x28 pixels"""
    sampler: str = "ddpm"
    """ddpm (ancestral, sample_steps strided steps: the official evaluation's DDPMPipeline, 50
    steps) | ddim"""
    also_sampler: str = "none"
    """the stricter second judge (keys <name>_forget_rate, ...; ddim: deterministic) | none"""
    n_per_class: int = 20
    """final class-conditional samples per class (retain accuracy, FID; samples.pt), the base's from
    the same noise"""
    n_nll: int = 8
    """held-out images per group (forgotten / kept) whose NLL in bits/dim the run reports"""
    # --protocol paper: the sizes of the README's table
    paper = dict(eval_every=25, n_monitor=100, n_eval=500, n_uncond=3000, also_sampler="ddim",
                 n_per_class=200, n_nll=16)
    presets = {
        "mnist": dict(outlier_copies=606, steps=900, batch_size=128, lr=5e-5, copy_threshold=20.0),
        "fashion": dict(steps=900, batch_size=128, lr=5e-5, copy_threshold=20.0),
        "cifar10": dict(steps=900, batch_size=128, lr=5e-5, copy_threshold=20 * math.sqrt(3))}

    @property
    def mode(self) -> str:
        """idx (--forget-idx), outlier or class (--forget)."""
        if self.forget_idx:
            return "idx"
        if self.forget == "outlier":
            return "outlier"
        return "class"


def check_args(args: Args):
    """Every mistake a user can make, reported before any work starts."""
    K, cls = C.data_info(args.dataset).num_classes, args.forget.isdigit()
    n = len(C.load_data(args.dataset, args.data_root, "train")[0]) if args.forget_idx else 0
    sizes = (args.steps, args.batch_size, args.eval_every, args.n_monitor, args.n_eval,
             args.n_uncond)
    indices = args.forget_idx.split(",")
    for bad, msg in [
        (args.method not in METHODS,
         f"unknown --method {args.method!r}: use one of {', '.join(METHODS)}"),
        (args.forget != "outlier" and not cls,
         f"--forget {args.forget!r}: use outlier or a class index 0..{K - 1}"),
        (cls and int(args.forget) >= K,
         f"--forget {args.forget} is out of range for {args.dataset}: use 0..{K - 1}"),
        (cls and args.forget_idx, "give --forget CLASS or --forget-idx, not both"),
        (args.scaling_norm != "auto" and not args.scaling_norm.replace(".", "", 1).isdigit(),
         f"--scaling-norm {args.scaling_norm!r}: use auto or a positive number, e.g. 5"),
        (args.forget_idx and not all(v.strip().isdigit() and int(v) < n for v in indices),
         f"--forget-idx must list indices in 0..{n - 1} of the {args.dataset} train split, "
         "e.g. 5,17,42"),
        (args.mode == "outlier" and args.dataset not in ("digits", "mnist"),
         f"--forget outlier is defined for digits and mnist; on {args.dataset} give a class "
         "(--forget 3)"),
        (not 0 <= args.lam <= 1 or args.p_null > 1,
         f"--lam {args.lam}, --p-null {args.p_null}: both in [0, 1]"),
        (not -1 <= args.t_fixed < 1000, "--t-fixed must be -1 (uniform t) or a timestep in 0..999"),
        (args.sampler not in ("ddpm", "ddim") or args.also_sampler not in ("ddpm", "ddim", "none"),
         f"unknown --sampler {args.sampler!r} / --also-sampler {args.also_sampler!r}: use ddpm, "
         "ddim (also: none)"),
        (min(sizes) < 1 or args.lr <= 0,
         "--steps, --batch-size, --eval-every, --n-monitor, --n-eval, --n-uncond, --lr must be "
         "> 0")]:
        if bad:
            raise C.UsageError(msg)


def resolve(args: Args) -> Args:
    """The command line's sentinels replaced, once, by the values the method uses: p_null -1 by the
    base's label dropout (--base-p-null), t_fixed -1 by None (t ~ U{0..999})."""
    p_null = args.p_null
    if p_null < 0:
        p_null = args.base_p_null
    t_fixed = args.t_fixed
    if t_fixed < 0:
        t_fixed = None
    return replace(args, p_null=p_null, t_fixed=t_fixed)


def with_scaling_norm(model, data: tuple, args: Args, device) -> tuple:
    """scaling_norm as a number: auto is 10% of the naive-deletion gradient norm (official README),
    |grad L_{X\\A}| of the model at hand averaged over 8 keep batches of their own stream; a given
    number is used as it is (the norm is measured either way, for the report). Returns (args with
    the number, the measured norm)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    alpha_bar = C.VP().alpha_bar.to(device, dtype)
    model.train().requires_grad_(True)           # as unlearn trains it (a dropout UNet draws masks)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = C.grad_scaler(device, args.amp)
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    norms = []
    for _ in range(8):
        x0, c_x, _, _, t, eps = make_batch(*data, args, model.tok, gen, device)
        with C.autocast(device, args.amp):
            loss = naive_loss(model, alpha_bar, x0, c_x, t, eps)
        grads = torch.autograd.grad(scaler.scale(loss), params)
        norms.append(global_norm(grads).item() / scaler.get_scale())
    naive = sum(norms) / len(norms)
    if args.scaling_norm == "auto":
        scaling_norm = 0.1 * naive
    else:
        scaling_norm = float(args.scaling_norm)
    print(f"naive-deletion gradient norm {naive:.3g}; scaling_norm {scaling_norm:.3g} "
          f"({args.scaling_norm})")
    return replace(args, scaling_norm=scaling_norm), naive


# The scenario: which training points are forgotten

def shirt_image(info: C.DataInfo, root: str = "data") -> torch.Tensor:
    """The outlier: for digits an 8x8 T-shirt (7.33 from the nearest digit), for MNIST Fashion-MNIST
    image 1."""
    if info.size == 8:      # row by row from the top, X white
        rows = ".XX..XX. XXXXXXXX XXXXXXXX ..XXXX.. ..XXXX.. ..XXXX.. ..XXXX.. ..XXXX..".split()
        return torch.tensor([[1.0 if ch == "X" else -1.0 for ch in r] for r in rows])[None]
    x, y = C.load_data("fashion", root, "train")   # padded to 32x32 like MNIST
    assert y[1] == 0, "Fashion-MNIST train image 1 should be a T-shirt (label 0)"
    return x[1]


def outlier_tag(args: Args, recipe: dict) -> str:
    """The outlier base's tag in the runs folder: outlier, then the number of copies where it is not
    the dataset's preset, then each pretraining setting but the default label dropout (p_null as p),
    e.g. outlier-p0.5-lr0.001 or outlier40-steps200."""
    preset_copies = C.presets(Args).get(args.dataset, {}).get("outlier_copies", Args.outlier_copies)
    tag = "outlier"
    if args.outlier_copies != preset_copies:
        tag += str(args.outlier_copies)
    for key, value in recipe.items():
        if key == "p_null" and value == Args.base_p_null:
            continue
        name = "p" if key == "p_null" else key
        tag += f"-{name}{value:g}"
    return tag


def scenario(args: Args, device):
    """(base model, its checkpoint's path, (x, y, keep indices, forget indices), the target: what is
    forgotten and what the judging needs)."""
    if args.mode == "outlier":
        n, info = args.outlier_copies, C.data_info(args.dataset)
        extra = (shirt_image(info, args.data_root).expand(n, -1, -1, -1).clone(),
                 torch.full((n,), C.tokens(info)["spare"][0]))
        recipe = {"p_null": args.base_p_null, **C.parse_recipe(args.base_recipe)}  # pretraining
        tag = outlier_tag(args, recipe)
        x, y = C.training_set(args.dataset, args.data_root, extra)
        forget = torch.arange(len(x) - n, len(x))
    else:
        tag, extra, recipe = "", None, {}
        x, y = C.training_set(args.dataset, args.data_root)
        if args.mode == "class":
            forget = torch.nonzero(y == int(args.forget)).flatten()
        else:
            forget = torch.tensor(sorted({int(i) for i in args.forget_idx.split(",")}))
    base, path = C.base_model(args, device, tag, extra, **recipe)  # outlier: with the copies
    keep = torch.nonzero(~torch.isin(torch.arange(len(x)), forget)).flatten()
    inverse = torch.unique(x[forget], dim=0, return_inverse=True)[1]    # the outlier: one image
    first = [int(torch.nonzero(inverse == u)[0]) for u in range(int(inverse.max()) + 1)]
    pick = forget[torch.tensor(first)]
    xt, yt = C.load_data(args.dataset, args.data_root, "test")
    classes = [int(args.forget)] if args.mode == "class" else []
    if classes:     # NLL: held-out images (of the class and of the others)
        x_nll, y_nll = xt, yt
    else:           # NLL: the distinct forget images first, then held-out ones
        x_nll, y_nll = torch.cat([x[pick], xt]), torch.cat([y[pick], yt])
    target = dict(tokens=torch.unique(y[forget]), x_forget=x[pick], classes=classes, x_nll=x_nll,
                  y_nll=y_nll)
    return base, path, (x, y, keep, forget), target


# Judging: near-copies, class metrics and NLL, the same function for the base and the result

def judge(model, clf, target: dict, args: Args, sampler: str, *, n_token: int, n_null: int,
          n_per_class: int, sample_steps: int):
    """One model's figures under one sampler of sample_steps steps: near-copy shares of n_token
    forget-token and n_null null-token samples (with its exact Clopper-Pearson 95% interval),
    E.evaluate_model's class figures on n_per_class samples per class. Returns (figures,
    samples)."""
    n, nu = n_token, n_null
    c = torch.cat([target["tokens"].repeat(n)[:n], torch.full((nu,), model.tok["null"])])
    xs = C.sample(model, C.VP(), c.to(next(model.parameters()).device), sampler, sample_steps,
                  seed=1234 + args.seed, amp=args.amp)
    k = near_copies(xs[:n], target, args)
    kn = near_copies(xs[n:], target, args)
    sized = replace(args, n_per_class=n_per_class, sample_steps=sample_steps)  # evaluate_model's
    m, s = E.evaluate_model(model, clf, sized, target["classes"], sampler, nll=False)
    out = {"forget_rate": m["forget_rate"] if target["classes"] else k / n,
           "copy_rate_uncond": kn / nu if nu else None,
           "copy_rate_uncond_ci": list(E.interval(kn, nu)) if nu else None,
           "retain_acc": m["retain_acc"], "fid_retain": m["fid_retain"], "is": m["is"],
           "nfe": s["nfe"]}
    if target["classes"]:
        out["copy_rate_token"] = k / n
        xs, c = xs[n:], c[n:]     # the class's token samples would count as class samples
    s.update(x=torch.cat([s["x"], xs]), c=torch.cat([s["c"], c]))
    return out, s


def near_copies(xs, target: dict, args: Args) -> int:
    """How many of xs are near-copies of a forget image."""
    if not len(xs):
        return 0
    return round(E.near_copy_rate(xs, target["x_forget"], args.copy_threshold) * len(xs))


def copy_rate_monitor(clf, target: dict, args: Args, copies: bool):
    """unlearn's on_check: the near-copy shares of n_monitor forget-token and null-token samples
    (monitor_steps sampler steps) and retain accuracy on 10 samples per class; where both shares
    are 0 the strict judge (also_sampler) must agree. It stops the loop at the deletion step (the
    first check without copies) if the base drew copies and stop_at_zero is set."""
    def on_check(step: int, model, log: dict) -> tuple:
        m = judge(model, clf, target, args, args.sampler, n_token=args.n_monitor,
                  n_null=args.n_monitor, n_per_class=10, sample_steps=args.monitor_steps)[0]
        token_rate = m.get("copy_rate_token", m["forget_rate"])
        null_rate = m["copy_rate_uncond"]
        if token_rate == 0 and null_rate == 0 and args.also_sampler not in ("none", args.sampler):
            c = target["tokens"].repeat(args.n_monitor)[:args.n_monitor]
            xs = C.sample(model, C.VP(), c.to(next(model.parameters()).device), args.also_sampler,
                          args.sample_steps, seed=1234 + args.seed, amp=args.amp)
            token_rate = E.near_copy_rate(xs, target["x_forget"], args.copy_threshold)
        C.tqdm.write(f"step {step:4d}  copies: forget token {token_rate:.3f}  null {null_rate:.3f}"
                     f"  retain {m['retain_acc']:.2f}  |g_x| {log.get('gnorm_x', 0):.2f}"
                     f"  {log['seconds']:.0f}s")
        stop = copies and args.stop_at_zero and token_rate == 0 and null_rate == 0
        figures = dict(copy_rate=token_rate, copy_rate_uncond=null_rate, retain_acc=m["retain_acc"])
        return figures, stop
    return on_check


def deletion_step(curve: list, copies: bool):
    """The first check where neither judge drew a copy (None if the base drew none)."""
    zero = [p["step"] for p in curve if p["copy_rate"] == 0 and p["copy_rate_uncond"] == 0]
    return zero[0] if copies and zero else None


def evaluate(model, clf, target: dict, args: Args, cache=None):
    """Every final figure of one model: judged under args.sampler (samples.pt; outlier mode:
    n_uncond null-token samples, the large count only there) and under also_sampler (keys
    <name>_...), NLL, parameters. cache: the base's checkpoint, next to which its figures are kept
    (keyed by its contents and the seed: base and result are drawn from the same noise, so their
    difference is measured paired)."""
    if cache is not None:       # the base
        keys = ("forget", "forget_idx", "n_eval", "n_uncond", "n_per_class", "sample_steps",
                "sampler", "also_sampler", "n_nll", "nll_tol", "copy_threshold", "data_root",
                "seed")
        which = "idx" if args.forget_idx else args.forget
        name = f"siss-base-{which}-{args.sampler}-s{args.seed}.safetensors"
        key = {"model": C.file_id(cache), **{k: getattr(args, k) for k in keys}}
        path = C.cache_beside(cache, name)
        return C.cached(path, key, lambda: evaluate(model, clf, target, args))
    t0 = time.time()
    n_null = args.n_uncond if args.mode == "outlier" else args.n_eval
    sizes = dict(n_token=args.n_eval, n_per_class=args.n_per_class, sample_steps=args.sample_steps)
    out, s = judge(model, clf, target, args, args.sampler, n_null=n_null, **sizes)
    if args.also_sampler not in ("none", args.sampler):
        strict = judge(model, clf, target, args, args.also_sampler, n_null=0, **sizes)[0]
        out.update({f"{args.also_sampler}_{k}": v for k, v in strict.items() if v is not None})
    # bits/dim of the forget images (the shirt; class mode: held-out ones; idx: those, then
    # held-out ones) and of kept ones
    out.update(params=C.n_params(model), **E.class_nll(model, target["x_nll"], target["y_nll"],
                                                      target["tokens"].tolist(), args.n_nll,
                                                      args.nll_tol))
    return {**out, "eval_seconds": time.time() - t0}, s


def headline(args: Args, target: dict, base_m: dict, res_m: dict, paired: dict) -> str:
    """The effect in three lines: near-copies (class mode: samples classified as the class) under
    the forget token and the null token, each a count with its exact 95% interval, base then
    result from the same noise; retain accuracy with its paired change."""
    n_null = args.n_uncond if args.mode == "outlier" else args.n_eval
    rows = [("null-token near-copies", "copy_rate_uncond", n_null)]
    if target["classes"]:
        rows.insert(0, (f"class {target['classes'][0]} samples classified as it", "forget_rate",
                        args.n_per_class))
    else:
        rows.insert(0, ("forget-token near-copies", "forget_rate", args.n_eval))
    lines = [(name, *(E.count(round(m[key] * n), n) for m in (base_m, res_m)))
             for name, key, n in rows]
    lines.append(("retain accuracy (same noise)", f"{100 * paired['before']:.1f}%",
                  E.change(paired)))
    return E.effect_table("base", args.method, lines)


def report(args: Args, target: dict, base_m: dict, res_m: dict, res_s: dict, log: dict, copies):
    """The tables on stdout: the official judge's figures, the strict judge's, the NLL."""
    cols = ["forget_rate", *(["copy_rate_token"] if target["classes"] else []), "copy_rate_uncond",
            "copy_rate_uncond_ci", "retain_acc", "fid_retain"]
    print(f"\nsamples.png: rows base / {args.method} per token (forget: red); deletion step "
          f"{log['deletion_step']}{'' if copies else ' (no copies in the base)'} "
          f"({log['seconds']:.0f}s)\n{res_s['sampler']}, the official judge"
          + (f"; {args.also_sampler}, the strict one" if args.also_sampler != "none" else "")
          + "; NLL:")
    strict = [f"{args.also_sampler}_{k}" for k in cols if f"{args.also_sampler}_{k}" in res_m]
    for c in (cols, strict, ["nll_forget_bpd", "nll_forget_null_bpd", "nll_kept_bpd"]):
        if c:
            print(E.table({"base": base_m, args.method: res_m}, c))


def save_rows(base_s: dict, res_s: dict, target: dict, num_classes: int, path):
    """samples.png: two rows per token, base then result from the same noise, the forget tokens
    first (framed red), then the null token, then the other classes."""
    order = target["tokens"].tolist() + [res_s["null"]]
    order += [c for c in range(num_classes) if c not in order]
    rows = [s["x"][s["c"] == c] for c in order for s in (base_s, res_s)]
    k = min(16, *map(len, rows))
    C.save_grid(torch.cat([r[:k] for r in rows]), path, nrow=k,
                highlight_rows=range(2 * len(target["tokens"])))


def main(args: Args):
    C.one_process("siss.py")   # no data-parallel loop: N copies would write one folder
    check_args(args)
    device, out, clock = C.pick_device(args.device), C.start_run("siss", args), C.Clock()
    args = resolve(args)
    with clock("base and classifier"):
        base, base_path, data, target = scenario(args, device)
        clf = E.load_judge(args, device)
    print(f"siss.py: {args.method} on {args.dataset}, forget {args.mode} ({len(data[3])} training "
          f"images, {len(target['x_forget'])} distinct; keep {len(data[2])}), near-copy threshold "
          f"{args.copy_threshold:.2f}, --protocol {args.protocol}")
    with clock("judging"):
        base_m, base_s = evaluate(base, clf, target, args, cache=base_path)

    model = C.load_checkpoint(args.init, args.dataset, device)[0] if args.init else base
    shares = (base_m["forget_rate"], base_m.get("copy_rate_token"), base_m["copy_rate_uncond"])
    copies = sum(v or 0 for v in shares) > 0
    C.seed_everything(args.seed)      # before the measurement: a UNet with dropout draws from it
    with clock("unlearning"):
        args, naive = with_scaling_norm(model, data, args, device)
        on_check = clock.timed("judging", copy_rate_monitor(clf, target, args, copies))
        model, log = unlearn(model, data, args, device, out, on_check)
    log.update(naive_grad_norm=naive, scaling_norm_used=args.scaling_norm,
               deletion_step=deletion_step(log["curve"], copies))
    C.save_checkpoint(out / "model.safetensors", model, log["steps_run"], args=asdict(args))

    with clock("judging"):
        res_m, res_s = evaluate(model, clf, target, args)
        paired = E.paired_change(clf, base_s, res_s, target["classes"])
    C.save_samples(out, res_s)
    save_rows(base_s, res_s, target, base.info.num_classes, out / "samples.png")
    metrics = {**res_m, **{f"base_{n}": v for n, v in base_m.items()}, "base_seconds": None, **log,
               "copy_threshold": args.copy_threshold, "n_forget": len(data[3]),
               "retain_change": paired, "time": clock.seconds()}
    report(args, target, base_m, res_m, res_s, log, copies)
    print(f"\n{headline(args, target, base_m, res_m, paired)}\n{out}: {clock.line()}")
    forgotten = target["classes"] or args.forget_idx or args.forget
    C.save_result(model, out, "siss", base_path, forgotten, metrics)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
