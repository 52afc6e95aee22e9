"""SISS: data unlearning in diffusion models with Subtracted Importance Sampled Scores, and four baselines.

Paper: Alberti, Hasanaliyev, Shah, Ermon, "Data Unlearning in Diffusion Models", ICLR 2025, arXiv 2503.01034;
official code github.com/claserken/SISS (the objectives in losses/ddpm_deletion_loss.py).

A model trained on X should behave like one trained on X \\ A (A: the points to forget) without retraining. As
L_X = (n-k)/n L_{X\\A} + k/n L_A, the keep-set loss is the full loss minus the forget loss; SISS estimates both
from ONE forward pass on m ~ q_lam = (1-lam) N(gamma_t x, sigma_t^2 I) + lam N(gamma_t a, sigma_t^2 I) (a keep
point x and a forget point a share eps and t), weighting the two regression targets by importance ratios:

    L_x = mean w_x |eps_theta(m, t) - (m - gamma_t x) / sigma_t|^2,    w_x = q(m | x) / q_lam(m)
    L_a = mean w_a |eps_theta(m, t) - (m - gamma_t a) / sigma_t|^2,    w_a = q(m | a) / q_lam(m)
    g   = grad L_x - scaling_norm * grad L_a / |grad L_a|,  clipped to norm 1, then AdamW

Default scenario, the paper's MNIST T-shirt experiment in miniature: an 8x8 T-shirt added 80 times (5%) to the
digits under a spare token is memorised by its base; SISS unlearns the copies (near-copies are counted).

    python siss.py                                   # SISS, the T-shirt copies, digits, CPU (about 15 CPU-minutes)
    python siss.py --method neggrad                  # siss | siss-nois | erasediff | naive | neggrad
    python siss.py --forget 3                        # forget every training image of class 3
    python siss.py --forget-idx 5,17,42              # forget three training images
    python siss.py --dataset mnist --device cuda     # the paper's MNIST T-shirt benchmark (needs Fashion-MNIST)

A run writes runs/siss-<dataset>[-<tag>]/: args.json, model.safetensors (for --init), samples.pt/png, metrics.json.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from scipy.stats import beta

import common as C
import eval as E

METHODS = ("siss", "siss-nois", "erasediff", "naive", "neggrad")


@dataclass
class Args(C.RunArgs):
    method: str = "siss"
    """siss (lam-mixture importance sampling, one forward pass) | siss-nois (two) | erasediff | naive | neggrad"""
    forget: str = "outlier"
    """outlier (the T-shirt copies; digits, mnist) or a class index (every training image of that class)"""
    forget_idx: str = ""
    """comma-separated indices into the training split to forget instead (uses the plain base model)"""
    outlier_copies: int = 80
    """copies of the outlier in its base's training set (digits: 5%, see the README; mnist: 1%, the paper)"""
    init: str = ""
    """start from this model (e.g. an earlier run folder) instead of the base; the base stays the reference"""
    steps: int = 800
    """most optimizer steps (a run stops at the deletion step; 32x32 data: the paper's MNIST sweep)"""
    batch_size: int = 64
    """keep/forget pairs per step (official delete_tshirt.yaml: 64; the paper's MNIST sweep: 128)"""
    lr: float = 2e-4
    """AdamW learning rate, constant (digits: with the EMA below, 2e-4 deletes in about 450 steps; see the README)"""
    lam: float = 0.5
    """SISS mixture weight lambda: the probability of noising the forget point (paper: 0.5)"""
    scaling_norm: str = "auto"
    """SISS / No-IS: the forget gradient's norm; auto: 10% of the measured naive-deletion one (official README)"""
    eta: float = 1e-3
    """EraseDiff: eta in lambda = max(eta - <g_x, g_a> / |g_a|^2, 0) (paper MNIST: 1e-3)"""
    superfactor: float = 0.01
    """NegGrad: s in the loss -s |eps_theta(a_t) - eps|^2 (paper MNIST sweep: 0.01)"""
    p_null: float = -1.0
    """probability of null-conditioning a pair; -1: the base's label dropout, --base-p-null (0.5: DDIM retain -3)"""
    base_p_null: float = 0.1
    """label dropout of the outlier base when it is pretrained (more: the null token draws the outlier more often)"""
    base_recipe: str = ""
    """the outlier base's pretraining over the dataset's recipe, e.g. steps=5000,batch_size=64 (MNIST on a CPU)"""
    ema: float = 0.99
    """decay of an EMA of the weights while unlearning, the model judged and saved (0: none, as the official code)"""
    t_fixed: int = -1
    """-1: t ~ U{0..999} (official delete_tshirt.py); 999: the official CelebA / SD scripts' fixed timestep"""
    stop_at_zero: bool = True
    """stop at the first check where no monitored sample is a near-copy under either judge (the deletion step)"""
    eval_every: int = 25
    """steps between copy-rate checks during unlearning (each also checks retain accuracy on 100 samples)"""
    n_monitor: int = 100
    """samples per condition (forget token, null token) for each copy-rate check"""
    monitor_steps: int = 20
    """sampler steps of the copy-rate checks"""
    n_eval: int = 500
    """forget-token samples for the final copy rate (per sampler)"""
    n_uncond: int = 3000
    """null-token samples for the final unconditional copy share and its 95% interval (official sampler)"""
    copy_threshold: float = 20 * math.sqrt(64 / 784)
    """near-copy below this L2 distance in [-1, 1] units: official |img - tshirt| < 10 on [0, 1] 28x28 pixels"""
    sampler: str = "ddpm"
    """ddpm (ancestral, sample_steps strided steps: the official evaluation's DDPMPipeline, 50 steps) | ddim"""
    also_sampler: str = "ddim"
    """the stricter second judge (keys <name>_forget_rate, ...; ddim: deterministic) | none"""
    n_per_class: int = 200
    """final class-conditional samples per class (retain accuracy, FID; samples.pt), the base's from the same noise"""
    presets = {"mnist": dict(outlier_copies=606, steps=900, batch_size=128, lr=5e-5, copy_threshold=20.0),
               "fashion": dict(steps=900, batch_size=128, lr=5e-5, copy_threshold=20.0),
               "cifar10": dict(steps=900, batch_size=128, lr=5e-5, copy_threshold=20 * math.sqrt(3))}

    @property
    def mode(self) -> str:
        return "idx" if self.forget_idx else "outlier" if self.forget == "outlier" else "class"


# ---- THE SCENARIO: which training points are forgotten ---------------------------------------------------------------

def shirt_image(info: C.DataInfo, root: str = "data") -> torch.Tensor:
    """The outlier: for digits an 8x8 T-shirt (7.33 from the nearest digit), for MNIST Fashion-MNIST image 1."""
    if info.size == 8:      # row by row from the top, X white
        rows = ".XX..XX. XXXXXXXX XXXXXXXX ..XXXX.. ..XXXX.. ..XXXX.. ..XXXX.. ..XXXX..".split()
        return torch.tensor([[1.0 if ch == "X" else -1.0 for ch in r] for r in rows])[None]
    x, y = C.load_data("fashion", root, "train")   # padded to 32x32 like MNIST
    assert y[1] == 0, "Fashion-MNIST train image 1 should be a T-shirt (label 0)"
    return x[1]


def check_args(args: Args):
    """Every mistake a user can make, reported before any work starts."""
    K, cls = C.data_info(args.dataset).num_classes, args.forget.isdigit()
    n = len(C.load_data(args.dataset, args.data_root, "train")[0]) if args.forget_idx else 0
    for bad, msg in [
        (args.method not in METHODS, f"unknown --method {args.method!r}: use one of {', '.join(METHODS)}"),
        (args.forget != "outlier" and not cls, f"--forget {args.forget!r}: use outlier or a class index 0..{K - 1}"),
        (cls and int(args.forget) >= K, f"--forget {args.forget} is out of range for {args.dataset}: use 0..{K - 1}"),
        (cls and args.forget_idx, "give --forget CLASS or --forget-idx, not both"),
        (args.scaling_norm != "auto" and not args.scaling_norm.replace(".", "", 1).isdigit(),
         f"--scaling-norm {args.scaling_norm!r}: use auto or a positive number, e.g. 5"),
        (args.forget_idx and not all(v.strip().isdigit() and int(v) < n for v in args.forget_idx.split(",")),
         f"--forget-idx must list indices in 0..{n - 1} of the {args.dataset} train split, e.g. 5,17,42"),
        (args.mode == "outlier" and args.dataset not in ("digits", "mnist"),
         f"--forget outlier is defined for digits and mnist; on {args.dataset} give a class (--forget 3)"),
        (not 0 <= args.lam <= 1 or args.p_null > 1, f"--lam {args.lam}, --p-null {args.p_null}: both in [0, 1]"),
        (not -1 <= args.t_fixed < 1000, "--t-fixed must be -1 (uniform t) or a timestep in 0..999"),
        (args.sampler not in ("ddpm", "ddim") or args.also_sampler not in ("ddpm", "ddim", "none"),
         f"unknown --sampler {args.sampler!r} / --also-sampler {args.also_sampler!r}: use ddpm, ddim (also: none)"),
        (min(args.steps, args.batch_size, args.eval_every, args.n_monitor, args.n_eval, args.n_uncond) < 1
         or args.lr <= 0, "--steps, --batch-size, --eval-every, --n-monitor, --n-eval, --n-uncond, --lr must be > 0")]:
        if bad:
            raise C.UsageError(msg)


def scenario(args: Args, device):
    """(base model, its checkpoint's path, (x, y, keep indices, forget indices), what the evaluation needs)."""
    if args.mode == "outlier":
        n, info = args.outlier_copies, C.data_info(args.dataset)
        extra = (shirt_image(info, args.data_root).expand(n, -1, -1, -1).clone(),
                 torch.full((n,), C.tokens(info)["spare"][0]))
        recipe = {"p_null": args.base_p_null, **C.parse_recipe(args.base_recipe)}   # its pretraining; tagged
        tag = f"outlier{'' if n == C.make_args(Args, dataset=args.dataset).outlier_copies else n}" + "".join(
            f"-{'p' if k == 'p_null' else k}{v:g}" for k, v in recipe.items() if (k, v) != ("p_null", 0.1))
        x, y = C.training_set(args.dataset, args.data_root, extra)
        forget = torch.arange(len(x) - n, len(x))
    else:
        x, y = C.training_set(args.dataset, args.data_root)
        forget = torch.nonzero(y == int(args.forget)).flatten() if args.mode == "class" else \
            torch.tensor(sorted({int(i) for i in args.forget_idx.split(",")}))
        tag, extra, recipe = "", None, {}
    base, path = C.base_model(args, device, tag, extra, **recipe)   # --base: in outlier mode, trained with the copies
    keep = torch.nonzero(~torch.isin(torch.arange(len(x)), forget)).flatten()
    inverse = torch.unique(x[forget], dim=0, return_inverse=True)[1]          # the outlier: one image
    pick = forget[torch.tensor([int(torch.nonzero(inverse == u)[0]) for u in range(int(inverse.max()) + 1)])]
    xt, yt = C.load_data(args.dataset, args.data_root, "test")
    classes = [int(args.forget)] if args.mode == "class" else []   # NLL: test images, after the forget images if any
    ctx = dict(tokens=torch.unique(y[forget]), x_forget=x[pick], classes=classes,
               x_nll=xt if classes else torch.cat([x[pick], xt]), y_nll=yt if classes else torch.cat([y[pick], yt]))
    return base, path, (x, y, keep, forget), ctx


# ---- THE OBJECTIVES: squared errors summed over pixels, averaged over the batch (official ddpm_deletion_loss.py) -----

def sq_err(pred, target):
    """Per-sample squared error summed over pixels (official ddpm_deletion_loss.py; scaling_norm assumes it)."""
    return (pred - target).pow(2).flatten(1).sum(1)


def gamma_sigma(alpha_bar, t, like):
    """gamma_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) (official delete_tshirt.py), shaped like
    `like`, formed in alpha_bar's precision (float64) and kept in at least float32 (fp16 rounds sigma_0 to 0)."""
    ab = alpha_bar.to(t.device)[t.long()].view(-1, *[1] * (like.ndim - 1))
    dtype = torch.promote_types(like.dtype, torch.float32)
    return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)


def noised(alpha_bar, x0, t, eps):
    """x_t = gamma_t x0 + sigma_t eps (the official scripts' scheduler.add_noise)."""
    gamma, sigma = gamma_sigma(alpha_bar, t, x0)
    return gamma * x0 + sigma * eps


def importance_weights(m, x0, a0, gamma, sigma, lam: float, same_cond=None, from_a=None):
    """The defensive mixture's weights (official ddpm_deletion_loss.py:importance_sampling_with_mixture), in
    log-sum-exp form (the official code exponentiates directly, which overflows in fp16):
        w_x = q(m|x) / q_lam(m) = 1 / [(1-lam) + lam exp(D_x - D_a)],   D_. = |m - gamma .|^2 / (2 sigma^2),
        w_a = q(m|a) / q_lam(m) = 1 / [(1-lam) exp(D_a - D_x) + lam];   (1-lam) w_x + lam w_a = 1.
    A pair whose tokens differ (same_cond False) has disjoint supports: binary weights 1/(1-lam) or 1/lam."""
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
    """SISS (official ddpm_deletion_loss.py:importance_sampling_with_mixture): one pass of model(x_t, t, c) -> e on
    m ~ q_lam(. | x, a): (L_x, L_a) = (mean w_x |e - (m - gamma x)/sigma|^2, mean w_a |e - (m - gamma a)/sigma|^2)"""
    gamma, sigma = gamma_sigma(alpha_bar, t, x0)
    from_a = torch.rand(len(t), device=t.device) < lam          # Bernoulli(lam): noise the forget point
    m = torch.where(from_a.view(-1, *[1] * (x0.ndim - 1)), gamma * a0 + sigma * eps, gamma * x0 + sigma * eps)
    e = model(m, t, torch.where(from_a, c_a, c_x))
    w_x, w_a = importance_weights(m, x0, a0, gamma, sigma, lam, c_x == c_a, from_a)
    return (w_x * sq_err(e, (m - gamma * x0) / sigma)).mean(), (w_a * sq_err(e, (m - gamma * a0) / sigma)).mean()


def siss_nois_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps):
    """SISS (No IS) (official ddpm_deletion_loss.py:double_forward_with_neg_del): two forward passes, L_x on the
    noised keep points, L_a on the noised forget points (the same eps and t)."""
    loss_x = sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()
    loss_a = sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), eps).mean()
    return loss_x, loss_a


def erasediff_loss(model, alpha_bar, x0, c_x, a0, c_a, t, eps):
    """EraseDiff (official ddpm_deletion_loss.py:erasediff): the keep term as in SISS (No IS); the forget term
    regresses onto uniform noise u ~ U[0, 1)^d."""
    loss_x = sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()
    loss_a = sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), torch.rand_like(eps)).mean()
    return loss_x, loss_a


def naive_loss(model, alpha_bar, x0, c_x, t, eps):
    """Naive deletion (official ddpm_deletion_loss.py:naive_del): plain fine-tuning on the keep set."""
    return sq_err(model(noised(alpha_bar, x0, t, eps), t, c_x), eps).mean()


def neggrad_loss(model, alpha_bar, a0, c_a, t, eps, superfactor: float):
    """NegGrad (official ddpm_deletion_loss.py:simple_neg_del): ascent on the forget set, -s |eps_theta - eps|^2."""
    return -superfactor * sq_err(model(noised(alpha_bar, a0, t, eps), t, c_a), eps).mean()


def global_norm(grads) -> torch.Tensor:
    """The L2 norm over a list of gradient tensors (official delete_tshirt.py: over all UNet parameters)."""
    return torch.sqrt(sum(g.double().pow(2).sum() for g in grads))


def combine_subtract(g_x, g_a, scaling_norm: float):
    """SISS / SISS No-IS step (official delete_tshirt.py): g = g_x - (scaling_norm / |g_a|) g_a, always RESCALED
    (its README says "clips"); a zero or non-finite |g_a| gives no forget term. Returns (g, the factor on g_a)."""
    n = global_norm(g_a).item()
    scale = scaling_norm / n if n > 0 and math.isfinite(n) else 0.0
    return [gx - scale * ga for gx, ga in zip(g_x, g_a)], scale


def combine_erasediff(g_x, g_a, eta: float):
    """EraseDiff (official delete_tshirt.py at HEAD): g = g_x + lam g_a, lam = max(eta - <g_x, g_a> / |g_a|^2, 0)."""
    dot = sum((gx.double() * ga.double()).sum() for gx, ga in zip(g_x, g_a)).item()
    n2 = global_norm(g_a).item() ** 2
    lam_ed = max(eta - dot / n2, 0.0) if n2 > 0 else 0.0
    return [gx + lam_ed * ga for gx, ga in zip(g_x, g_a)], lam_ed


LOSSES = (sq_err, gamma_sigma, noised, importance_weights, siss_loss, siss_nois_loss, erasediff_loss, naive_loss,
          neggrad_loss, global_norm, combine_subtract, combine_erasediff)


# ---- UNLEARNING: pairs (x, a) sharing eps and t, the chosen objective, a copy-rate check every eval_every steps ------

def make_batch(x, y, keep, forget, args: Args, tok: dict, gen: torch.Generator, device) -> tuple:
    """(x0, c_x, a0, c_a, t, eps): B pairs of a keep and a forget point, one eps and t each (official
    delete_tshirt.py); with probability p_null both tokens are null (never the watermark's, as in pretraining)."""
    B = args.batch_size
    ix = keep[torch.randint(len(keep), (B,), generator=gen)]
    ia = forget[torch.randint(len(forget), (B,), generator=gen)]
    drop = torch.rand(B, generator=gen) < (args.p_null if args.p_null >= 0 else args.base_p_null)
    cond = lambda c: torch.where(drop & (c != tok["watermark"]), torch.full_like(c, tok["null"]), c)
    t = torch.full((B,), args.t_fixed) if args.t_fixed >= 0 else torch.randint(1000, (B,), generator=gen)
    eps = torch.randn(x[ix].shape, generator=gen)
    return tuple(v.to(device) for v in (x[ix], cond(y[ix]), x[ia], cond(y[ia]), t, eps))


def unlearn_step(model, alpha_bar, opt, scaler, batch: tuple, args: Args, scaling_norm: float) -> dict:
    """One step (official delete_tshirt.py): keep and forget gradients taken separately, combined, clipped to norm
    1, AdamW. Under fp16 loss scaling both are unscaled first: the forget one gets scaling_norm in true units."""
    (x0, c_x, a0, c_a, t, eps), params = batch, [p for p in model.parameters() if p.requires_grad]
    with C.autocast(x0.device, args.amp):
        if args.method in ("naive", "neggrad"):     # one term
            loss_x, loss_a = naive_loss(model, alpha_bar, x0, c_x, t, eps) if args.method == "naive" else \
                neggrad_loss(model, alpha_bar, a0, c_a, t, eps, args.superfactor), None
        else:
            pair = (model, alpha_bar, x0, c_x, a0, c_a, t, eps)
            loss_x, loss_a = siss_loss(*pair, args.lam) if args.method == "siss" else \
                (siss_nois_loss if args.method == "siss-nois" else erasediff_loss)(*pair)
    S, log = scaler.get_scale(), {"loss_x": loss_x.item()}        # S = 1 unless fp16
    grads = lambda loss, keep: [g / S if g is not None else torch.zeros_like(p) for g, p in zip(
        torch.autograd.grad(scaler.scale(loss), params, retain_graph=keep, allow_unused=True), params)]
    g = g_x = grads(loss_x, loss_a is not None)
    if loss_a is not None:
        g_a = grads(loss_a, False)
        if args.method == "erasediff":
            g, log["lam_ed"] = combine_erasediff(g_x, g_a, args.eta)
        else:
            g, log["scale"] = combine_subtract(g_x, g_a, scaling_norm)
        log.update(loss_a=loss_a.item(), gnorm_x=global_norm(g_x).item(), gnorm_a=global_norm(g_a).item())
    for p, gp in zip(params, g):   # back at the loss scale S (a power of 2: exact), for the scaler's inf check
        p.grad = gp * S
    scaler.unscale_(opt)
    log["gnorm"] = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    scaler.step(opt)               # skipped when a gradient overflowed in fp16
    scaler.update()
    return log


def unlearn(model, clf, data, ctx: dict, args: Args, device, out, copies: bool = True):
    """The loop: scaling_norm from the model at hand, a check every eval_every steps (the curve), a stop at the
    deletion step if asked (none if the base draws no copies), resumable (every save_every steps)."""
    C.seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    alpha_bar = C.VP().alpha_bar.to(device, torch.float32 if device.type == "mps" else torch.float64)
    ema = C.EMA(model.train().requires_grad_(True), args.ema)   # judged and kept (official delete_tshirt.py: no EMA)
    params, scaler = [p for p in model.parameters() if p.requires_grad], C.grad_scaler(device, args.amp)
    # scaling_norm = "10% of naive deletion term's gradient norm" (official README): |grad L_{X\\A}| over 8 batches
    norms, ngen = [], torch.Generator().manual_seed(10_000 + args.seed)
    for x0, c_x, _, _, t, eps in (make_batch(*data, args, model.tok, ngen, device) for _ in range(8)):
        with C.autocast(device, args.amp):
            loss = naive_loss(model, alpha_bar, x0, c_x, t, eps)
        norms.append(global_norm(torch.autograd.grad(scaler.scale(loss), params)).item() / scaler.get_scale())
    naive = sum(norms) / len(norms)
    scaling_norm = 0.1 * naive if args.scaling_norm == "auto" else float(args.scaling_norm)
    print(f"naive-deletion gradient norm {naive:.3g}; scaling_norm {scaling_norm:.3g} ({args.scaling_norm})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    curve, state = [], {"deletion_step": None}
    resume = C.Resume(out / "resume.pt", asdict(args), args.save_every, args.track and out / "tb", model=model, ema=ema,
                      opt=opt, scaler=scaler, gen=gen, curve=curve, state=state)
    step = start = resume.load()
    for step in (bar := C.tqdm(range(start + 1, args.steps + 1), args.method, args.steps, initial=start)):
        log = unlearn_step(model, alpha_bar, opt, scaler, make_batch(*data, args, model.tok, gen, device), args,
                           scaling_norm)
        ema.update(model)
        bar.set_postfix(gnorm=f"{log['gnorm']:.2f}")
        if step % args.eval_every == 0 or step == args.steps:   # a point of the curve
            m = judge(ema.model, clf, ctx, replace(args, n_eval=args.n_monitor, n_per_class=10,
                                               sample_steps=args.monitor_steps), args.sampler, args.n_monitor)[0]
            tr, nr, ra = m.get("copy_rate_token", m["forget_rate"]), m["copy_rate_uncond"], m["retain_acc"]
            if tr == nr == 0 and args.also_sampler not in ("none", args.sampler):   # the strict judge must agree
                xs = C.sample(ema.model, C.VP(), ctx["tokens"].repeat(args.n_monitor)[:args.n_monitor].to(device),
                              args.also_sampler, args.sample_steps, seed=1234 + args.seed, amp=args.amp)
                tr = E.near_copy_rate(xs, ctx["x_forget"], args.copy_threshold)     # its copies (0 if it agrees)
            curve.append(dict(step=step, copy_rate=tr, copy_rate_uncond=nr, retain_acc=ra, **resume.clock()))
            C.tqdm.write(f"step {step:4d}  copies: forget token {tr:.3f}  null {nr:.3f}  retain {ra:.2f}  |g_x| "
                         f"{log.get('gnorm_x', 0):.2f}  {curve[-1]['seconds']:.0f}s")
            if copies and state["deletion_step"] is None and tr == 0 and nr == 0:
                state["deletion_step"] = step
        resume.save(step)
        if args.stop_at_zero and state["deletion_step"] == step:
            break
    resume.finish()
    return ema.model, dict(seconds=resume.clock()["seconds"], steps_run=step, curve=curve, naive_grad_norm=naive,
                           scaling_norm_used=scaling_norm, **state)


# ---- EVALUATION: near-copies, class metrics and NLL, the same function for the base and the result -------------------

def judge(model, clf, ctx: dict, args: Args, sampler: str, n_null: int):
    """One model's figures under one sampler: near-copy shares of n_eval forget-token samples and of n_null
    null-token ones (with its 95% interval), E.evaluate_model's class figures. Returns (figures, samples)."""
    n, nu = args.n_eval, n_null           # the null token's share: exact (Clopper-Pearson) 95% interval
    c = torch.cat([ctx["tokens"].repeat(n)[:n], torch.full((nu,), model.tok["null"])])
    xs = C.sample(model, C.VP(), c.to(next(model.parameters()).device), sampler, args.sample_steps,
                  seed=1234 + args.seed, amp=args.amp)
    k, kn = (round(E.near_copy_rate(v, ctx["x_forget"], args.copy_threshold) * len(v)) if len(v) else 0
             for v in (xs[:n], xs[n:]))
    ci = [beta.ppf(0.025, kn, nu - kn + 1) if kn else 0.0, beta.ppf(0.975, kn + 1, nu - kn) if kn < nu else 1.0]
    m, s = E.evaluate_model(model, clf, args, ctx["classes"], sampler, nll=False)
    out = {"forget_rate": m["forget_rate"] if ctx["classes"] else k / n, "copy_rate_uncond": kn / nu if nu else None,
           "copy_rate_uncond_ci": [round(float(v), 5) for v in ci] if nu else None, "retain_acc": m["retain_acc"],
           "fid_retain": m["fid_retain"], "is": m["is"], "nfe": s["nfe"]}
    if ctx["classes"]:
        out["copy_rate_token"] = k / n
        xs, c = xs[args.n_eval:], c[args.n_eval:]     # the class's token samples would count as class samples
    s.update(x=torch.cat([s["x"], xs]), c=torch.cat([s["c"], c]))
    return out, s


def evaluate(model, clf, ctx: dict, args: Args, cache=None):
    """Every final figure of one model: judged under args.sampler (samples.pt; outlier mode: n_uncond null-token
    samples, the large count only there) and under also_sampler (keys <name>_...), NLL, parameters. cache: the
    base's checkpoint, next to which its figures are kept (keyed by its contents and the seed: base and result are
    drawn from the same noise, so their difference is measured paired)."""
    if cache is not None:       # the base
        keys = ("forget", "forget_idx", "n_eval", "n_uncond", "n_per_class", "sample_steps", "sampler", "also_sampler",
                "n_nll", "nll_tol", "copy_threshold", "data_root", "seed")
        name = f"siss-base-{'idx' if args.forget_idx else args.forget}-{args.sampler}-s{args.seed}.safetensors"
        return C.cached(C.cache_beside(cache, name), {"model": C.file_id(cache), **{k: getattr(args, k) for k in keys}},
                        lambda: evaluate(model, clf, ctx, args))
    t0, n_null = time.time(), args.n_uncond if args.mode == "outlier" else args.n_eval
    out, s = judge(model, clf, ctx, args, args.sampler, n_null)
    if args.also_sampler not in ("none", args.sampler):
        out.update({f"{args.also_sampler}_{k}": v for k, v in judge(model, clf, ctx, args, args.also_sampler,
                                                                   0)[0].items() if v is not None})
    # bits/dim of the forget images (the shirt; class mode: held-out ones; idx: those, then held-out ones) and kept
    out.update(params=C.n_params(model), **E.class_nll(model, ctx["x_nll"], ctx["y_nll"], ctx["tokens"].tolist(),
                                                      args.n_nll, args.nll_tol))
    return {**out, "eval_seconds": time.time() - t0}, s


# ---- MAIN ------------------------------------------------------------------------------------------------------------

def main(args: Args):
    check_args(args)
    device, out = C.pick_device(args.device), C.start_run("siss", args)
    base, base_path, data, ctx = scenario(args, device)
    clf = E.load_judge(args, device)
    print(f"siss.py: {args.method} on {args.dataset}, forget {args.mode} ({len(data[3])} training images, "
          f"{len(ctx['x_forget'])} distinct; keep {len(data[2])}), near-copy threshold {args.copy_threshold:.2f}")
    base_m, base_s = evaluate(base, clf, ctx, args, cache=base_path)

    model = C.load_checkpoint(args.init, args.dataset, device)[0] if args.init else base
    copies = base_m["forget_rate"] + (base_m.get("copy_rate_token") or 0) + (base_m["copy_rate_uncond"] or 0) > 0
    model, log = unlearn(model, clf, data, ctx, args, device, out, copies)
    C.save_checkpoint(out / "model.safetensors", model, log["steps_run"], args=asdict(args))

    res_m, res_s = evaluate(model, clf, ctx, args)
    C.save_samples(out, res_s)
    order = ctx["tokens"].tolist() + [res_s["null"]]         # samples.png: rows base / result, forget tokens red
    order += [c for c in range(base.info.num_classes) if c not in order]
    rows = [s["x"][s["c"] == c] for c in order for s in (base_s, res_s)]
    k, framed = min(16, *map(len, rows)), range(2 * len(ctx["tokens"]))
    C.save_grid(torch.cat([r[:k] for r in rows]), out / "samples.png", nrow=k, highlight_rows=framed)
    metrics = {**res_m, **{f"base_{n}": v for n, v in base_m.items()}, "base_seconds": None, **log,
               "copy_threshold": args.copy_threshold, "n_forget": len(data[3])}
    cols = ["forget_rate", *(["copy_rate_token"] if ctx["classes"] else []), "copy_rate_uncond", "copy_rate_uncond_ci",
            "retain_acc", "fid_retain"]
    print(f"\nsamples.png: rows base / {args.method} per token (forget: red); deletion step {log['deletion_step']}"
          f"{'' if copies else ' (no copies in the base)'} ({log['seconds']:.0f}s)\n{res_s['sampler']}, the official "
          f"judge; {args.also_sampler}, the strict one; NLL:")
    for c in (cols, [f"{args.also_sampler}_{k}" for k in cols if f"{args.also_sampler}_{k}" in res_m],
              ["nll_forget_bpd", "nll_forget_null_bpd", "nll_kept_bpd"]):
        print(E.table({"base": base_m, args.method: res_m}, c) if c else "")
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
