"""MSGM: Moderating the Generalization of Score-based Generative Model (Jiang et al., ICCV 2025,
arXiv 2412.07229). Official code: github.com/yunfengdiao/Moderated-Score-based-Generative-Model
(built on score_sde_pytorch).

The claim has two halves. (1) Retraining without the undesirable data, the machine-unlearning "gold
standard", does not stop a score-based model from generating it: the model generalises. (2) MSGM
keeps the undesirable data in training and redirects the score away from it. With the VP-SDE
perturbation x_t = alpha(t) x_0 + sigma(t) z, the model score s_theta = -eps_theta(x_t, t) /
sigma(t) and the conditional score grad log p(x_t | x_0) = -z / sigma:

    L = (1 - lam) E_keep || eps_theta(x_t, t) - z ||^2 / D  +  lam L_forget
                                         (lam = 0.01, on every 4th step)
    Orthogonal-MSGM (--task square):  L_forget = E_undesirable (<eps_theta, z> / D)^2
    Obtuse-MSGM     (--task norm):    L_forget = E_undesirable <eps_theta, z> / D

The network sees x_t, not z: averaged over the z that could have made x_t, Obtuse turns the score at
perturbed undesirable images away from them, while Orthogonal (like the released element-wise
square) shrinks it toward zero there (see the terms below).

Where each part lives (the paper's method section mirrored by the released code):
  vp_marginal, perturb   the VP-SDE kernel (score_sde's sde_lib.py:VPSDE.marginal_prob)
  retain_term            L_retain, denoising score matching (losses.py:get_sde_loss_fn)
  orthogonal_term        L_forget of Orthogonal-MSGM (released losses.py, task square)
  obtuse_term            L_forget of Obtuse-MSGM (released losses.py, task norm)
  msgm_loss              L = (1 - lam) L_retain + lam L_forget (released losses.py:get_step_fngu)
  msgm_batch, msgm_step  one training step (released losses.py:get_step_fngu, run_lib3.py:train)
  train                  the loop: Adam, warm-up, EMA (released run_lib3.py:train)

Training is score_sde's continuous-time VP-SDE (beta 0.1..20, t ~ U(1e-5, 1), network time 999 t);
every model is unconditional (common.CondUNet always gets the null token) and the class labels only
say which images are undesirable. Two experiments, each against its control:
  fine-tuning (default)   MSGM fine-tunes the normal model, against fine-tuning it on kept data
                          only for as many steps (the control, cached): what the forget term adds
                          shows as the difference. By default normal is the cached base model
                          (python common.py), which the other four methods start from too, and
                          the fine-tune is 250 steps: minutes on a CPU
  --no-finetune           from scratch: normal (all data), retrain (kept data only) and MSGM, one
                          recipe; normal and retrain are cached
  --protocol paper        the README's table: every model from scratch (normal too), 5,000
                          samples a model; with --finetune its second half (1,400 steps)
Every run folder holds model.safetensors (C.load_checkpoint(folder, dataset) loads it; sample it
under the null token), samples.pt (unconditional samples of the MSGM model), samples.png and
metrics.json (every row of the table).

    python msgm.py                                # Obtuse-MSGM fine-tunes the base, vs the control
    python msgm.py --task square --tag sq         # Orthogonal-MSGM (--released: the released terms)
    python msgm.py --forget-weight 0.1 --tag w0.1 # the forget-weight sweep
    python msgm.py --protocol paper               # the README: normal, retrain, MSGM from scratch
    python msgm.py --protocol paper --finetune --tag ft   # its fine-tuned half
    python msgm.py --dataset mnist --device cuda  # 32x32 data (cifar10: the released config)
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class MSGMHparams:
    """What MSGM's losses, step and loop use. task dsm (plain denoising score matching, the normal
    and retrain models of the experiment) is not a command-line choice."""
    task: str = "norm"
    """square (Orthogonal-MSGM) | norm (Obtuse-MSGM): the released code's names"""
    forget_weight: float = 0.01
    """lam in L = (1 - lam) L_retain + lam L_forget (released losses.py:get_step_fngu:
    0.99 / 0.01)"""
    forget_every: int = 4
    """the forget term enters on every k-th step only (released: 4)"""
    released: bool = False
    """the released code's forget terms (square: mean of squared element-wise products; norm: the
    opposite sign)"""
    steps: int = 1400
    """fine-tuning steps of MSGM and of its kept-only control (the released fine-tune runs the full
    training length); from scratch the loop runs --scratch-steps"""
    batch_size: int = 64
    """kept images per step, and as many undesirable images on forget steps (released CIFAR-10:
    400 + 400)"""
    lr: float = 2e-4
    """Adam learning rate of fine-tuning (released: 2e-4); from scratch the loop uses
    --scratch-lr"""
    warmup: int = 0
    """linear learning-rate warm-up steps from scratch (fine-tuning has none: the released fine-tune
    restores the pretrained step, so its warm-up is long over)"""
    ema: float = 0.995
    """decay of the EMA weights that are evaluated (released: 0.9999 over 660k steps)"""


# --------------------------------------------------------------------------------------------------
# LOSS: denoising score matching on kept data, a score-redirecting term on undesirable data
# --------------------------------------------------------------------------------------------------

def vp_marginal(t, beta_min: float = 0.1, beta_max: float = 20.0):
    """(alpha(t), sigma(t)) of the VP-SDE, log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2 (score_sde's
    sde_lib.py:VPSDE.marginal_prob); sigma through expm1 so it keeps its precision near t = 0."""
    log_alpha = -0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min
    return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))


def perturb(x0, t, z, beta_min: float = 0.1, beta_max: float = 20.0):
    """x_t = alpha(t) x_0 + sigma(t) z, the perturbation kernel p(x_t | x_0) (score_sde's
    losses.py:get_sde_loss_fn)."""
    alpha, sigma = vp_marginal(t, beta_min, beta_max)
    shape = (-1, *[1] * (x0.ndim - 1))
    return alpha.view(shape) * x0 + sigma.view(shape) * z


def retain_term(eps, z):
    """L_retain = (1/D) || sigma(t) s_theta(x_t, t) + z ||^2 = (1/D) || eps_theta - z ||^2, batch
    mean: denoising score matching with lambda(t) = sigma^2 and the mean over D coordinates
    (losses.py, reduce_mean=True)."""
    return (eps - z).square().flatten(1).mean(1).mean()


def orthogonal_term(eps, z, released: bool = False):
    """Orthogonal-MSGM (released losses.py, task square). sigma^2 <s_theta, grad log p(x_t|x_0)> =
    <eps_theta, z>: we penalise (<eps_theta, z> / D)^2, the released code (released=True) the
    element-wise square (1/D) sum_d (eps_d z_d)^2. What either does: the network sees x_t, not z,
    so averaged over the z that could have made x_t ours is eps_theta^T E[z z^T | x_t] eps_theta /
    D^2 and the released one sum_d eps_d^2 E[z_d^2 | x_t] / D. Both are positive quadratics
    minimised by eps_theta = 0: they do not turn the score orthogonal, they shrink it toward zero
    at perturbed undesirable images (ours about D times more weakly)."""
    prod = (eps * z).flatten(1)
    if released:
        per_image = prod.square().mean(1)
    else:
        per_image = prod.mean(1).square()
    return per_image.mean()


def obtuse_term(eps, z, released: bool = False):
    """Obtuse-MSGM (released losses.py, task norm). Minimising +<eps_theta, z> / D drives
    <s_theta, grad log p(x_t|x_0)> = <eps_theta, z> / sigma^2 negative: the score at a perturbed
    undesirable image points away from it. The released loss, (1/D) sum_d sigma s_theta,d z_d =
    -<eps_theta, z> / D, has the opposite sign and makes the angle acute (the 2-D test measures
    it); released=True restores it. Averaged over z it is <eps_theta, E[z | x_t]> / D, with
    E[z | x_t] = -sigma grad log p_t(x_t) of the perturbed undesirable data: it pushes the model
    score toward minus that score, away from the undesirable data. Linear and unbounded, as
    released."""
    inner = (eps * z).flatten(1).mean(1)
    if released:
        inner = -inner
    return inner.mean()


def msgm_loss(eps_fn, x_keep, x_forget, task: str, lam: float, forget_step: bool,
              released: bool = False, t_eps: float = 1e-5, beta_min: float = 0.1,
              beta_max: float = 20.0):
    """L = (1 - lam) L_retain + lam L_forget on forget steps, (1 - lam) L_retain on the others
    (released losses.py:get_step_fngu, 0.99 / 0.01); each batch draws its own t ~ U(t_eps, 1) and
    z ~ N(0, I). eps_fn(x_t, t) takes continuous time. task "square" (Orthogonal) | "norm" (Obtuse)
    | "dsm": plain denoising score matching on x_keep, weight 1 (the released run_lib.py's normal
    and no_u models). Returns (loss, retain term, forget term or None)."""
    if task not in ("dsm", "square", "norm"):
        raise ValueError(f"unknown task {task!r}: use dsm, square or norm")
    t = torch.rand(len(x_keep), device=x_keep.device) * (1 - t_eps) + t_eps
    z = torch.randn_like(x_keep)
    x_t = perturb(x_keep, t, z, beta_min, beta_max)
    l_keep = retain_term(eps_fn(x_t, t), z)
    if task == "dsm":
        return l_keep, l_keep, None
    if not forget_step or lam == 0:
        return (1 - lam) * l_keep, l_keep, None
    t_u = torch.rand(len(x_forget), device=x_forget.device) * (1 - t_eps) + t_eps
    z_u = torch.randn_like(x_forget)
    x_t_u = perturb(x_forget, t_u, z_u, beta_min, beta_max)
    eps_u = eps_fn(x_t_u, t_u)
    if task == "square":
        l_forget = orthogonal_term(eps_u, z_u, released)
    elif task == "norm":
        l_forget = obtuse_term(eps_u, z_u, released)
    loss = (1 - lam) * l_keep + lam * l_forget
    return loss, l_keep, l_forget


LOSSES = (vp_marginal, perturb, retain_term, orthogonal_term, obtuse_term, msgm_loss)


# --------------------------------------------------------------------------------------------------
# TRAINING: the batch, one step, the loop
# --------------------------------------------------------------------------------------------------

def unconditional(model):
    """eps_theta(x_t, t) of a CondUNet under the null token, in continuous time t (network time
    999 t)."""
    def eps_fn(x, t):
        null = torch.full((len(x),), model.tok["null"], device=x.device)
        return model(x, 999 * t, null).float()
    return eps_fn


def msgm_batch(x_keep, x_forget, forget_step: bool, hp: MSGMHparams, hflip: bool, device):
    """hp.batch_size kept images every step and as many undesirable ones on forget steps (released
    run_lib3.py:train draws a retain and a forget batch); hflip: random horizontal flips of the
    kept batch (the CIFAR-10 configs; digits are not flip-invariant). Returns (x_keep, x_forget or
    None)."""
    x_k = x_keep[torch.randint(len(x_keep), (hp.batch_size,))].to(device)
    x_u = None
    if forget_step:
        x_u = x_forget[torch.randint(len(x_forget), (hp.batch_size,))].to(device)
    if hflip:
        flip = torch.rand(hp.batch_size, 1, 1, 1, device=device) < 0.5
        x_k = torch.where(flip, x_k.flip(3), x_k)
    return x_k, x_u


def msgm_step(eps_fn, model, opt, scaler, ema, x_keep, x_forget, forget_step: bool,
              hp: MSGMHparams, ctx) -> tuple:
    """One MSGM update (released losses.py:get_step_fngu with score_sde's optimize_fn): msgm_loss
    under the autocast context ctx, backward through the loss scaler, global grad-norm clip 1.0
    (config.optim.grad_clip), an Adam step, the EMA update. eps_fn(x_t, t) is model (or its
    compiled copy) in continuous time. Returns (retain term, forget term or NaN off its steps)."""
    with ctx:
        loss, l_keep, l_forget = msgm_loss(eps_fn, x_keep, x_forget, hp.task, hp.forget_weight,
                                           forget_step, hp.released)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    ema.update(model)
    forget = math.nan
    if l_forget is not None:
        forget = l_forget.item()
    return l_keep.item(), forget


STEPS = (msgm_step,)


def train(model, x_keep, x_forget, hp: MSGMHparams, device, save: dict, hflip: bool = False,
          amp="off", compile: bool = False, desc: str = "msgm", on_log=None):
    """The training loop (released run_lib3.py:train): Adam with hp.warmup steps of linear warm-up,
    msgm_batch and msgm_step for hp.steps steps, the forget term on every hp.forget_every-th step
    (never with task dsm). Returns the EMA model and the training seconds (over every call, when
    resumed). save: C.Resume's path, key (what defines this model), every and track: a rerun with
    the same key continues from the last save. on_log(step, log, bar, seconds) after every step:
    the experiment's progress report (log: the retain and forget terms of every step so far)."""
    model = model.to(device).train()
    ema = C.EMA(model, hp.ema)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr)
    scaler = C.grad_scaler(device, amp)
    ctx = C.autocast(device, amp)
    log = {"retain": [], "forget": []}
    net = model
    if compile:
        net = torch.compile(model)
    eps_fn = unconditional(net)
    resume = C.Resume(**save, model=model, ema=ema, opt=opt, scaler=scaler, log=log)
    start = resume.load()
    bar = tqdm(range(start, hp.steps), initial=start, total=hp.steps, desc=desc)
    for step in bar:
        if hp.task == "dsm":
            forget_step = False
        else:   # released: keyed on the step counter
            forget_step = step % hp.forget_every == 0
        x_k, x_u = msgm_batch(x_keep, x_forget, forget_step, hp, hflip, device)
        lr = hp.lr
        if hp.warmup:
            lr = hp.lr * min(1.0, (step + 1) / hp.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        retain, forget = msgm_step(eps_fn, model, opt, scaler, ema, x_k, x_u, forget_step, hp, ctx)
        log["retain"].append(retain)
        log["forget"].append(forget)
        if on_log is not None:
            on_log(step + 1, log, bar, resume.clock()["seconds"])
        resume.save(step + 1)
    resume.finish()
    return ema.model, resume.clock()["seconds"]


# ---- EXPERIMENT: python msgm.py (references, evaluation, report); not needed to follow MSGM ----

@dataclass
class Args(MSGMHparams, C.RunArgs):
    forget: str = "9"
    """undesirable classes, comma-separated. Digits: 9, the class whose retrain still draws it most
    often among the splits measured (see the README); cifar10: the released split, automobile and
    dog (1,5)"""
    finetune: bool = True
    """MSGM fine-tunes the normal model for --steps, against fine-tuning it on kept data only for as
    many steps (the paper's second experiment); --no-finetune: MSGM from scratch against a retrain
    (the first)"""
    normal: str = "base"
    """the normal model: base (the cached base model of python common.py, unconditional through its
    null token; or --base) | scratch (an unconditional model trained here on all data with the
    from-scratch recipe, as the paper)"""
    steps: int = 250
    """fine-tuning steps of MSGM and of its kept-only control (the released fine-tune runs the full
    training length); from scratch the loop runs --scratch-steps"""
    control: bool = True
    """--finetune: train and evaluate the kept-only control too (eval.py compare, which has its own,
    leaves it out)"""
    scratch_steps: int = 1400
    """training steps of every model trained from scratch (the base model's length on digits)"""
    scratch_lr: float = 1e-3
    """Adam learning rate from scratch (the base model's on digits)"""
    n_samples: int = 600
    """unconditional samples per model for the undesirable share and FID"""
    sample_steps: int = 20
    """sampler steps; 20 DDIM steps keep 5000 samples per model affordable on a CPU"""
    n_nll: int = 16
    """held-out images per group (undesirable / kept) for the NLL; 1000 = all of digits' test
    images"""
    # 32x32: the base recipe's length; cifar10: the released config (660k steps of 400 + 400)
    presets = {
        "mnist": dict(scratch_steps=50_000, scratch_lr=2e-4, warmup=1000, ema=0.9999, steps=2000,
                      n_nll=100),
        "fashion": dict(scratch_steps=50_000, scratch_lr=2e-4, warmup=1000, ema=0.9999, steps=2000,
                        n_nll=100),
        "cifar10": dict(forget="1,5", scratch_steps=660_000, batch_size=400, scratch_lr=2e-4,
                        warmup=5000, ema=0.9999, steps=10_000, n_nll=100)}
    # --protocol paper: the README's table (add --finetune for its fine-tuned half)
    paper = dict(finetune=False, normal="scratch", steps=1400, n_samples=5000, n_nll=1000)
    unsupported = dict(n_per_class="MSGM's models are unconditional: --n-samples sets how many "
                                   "samples are drawn")


VARIANTS = {"square": "Orthogonal-MSGM", "norm": "Obtuse-MSGM"}
RECIPE = ("steps", "batch_size", "lr", "warmup", "ema")   # what defines a cached reference model


def check(args: Args, info) -> list:
    """Every mistake a user can make, as a one-line error before any work; returns the undesirable
    classes."""
    forget = C.parse_classes(args.forget, info, "--forget class")
    if not forget:
        raise C.UsageError("--forget is empty: name at least one undesirable class, "
                           "e.g. --forget 1,5")
    if len(set(forget)) == info.num_classes:
        raise C.UsageError(f"--forget {args.forget} leaves no kept class: keep one of "
                           f"0..{info.num_classes - 1}")
    if args.task not in VARIANTS:
        raise C.UsageError(f"unknown --task {args.task!r}: use square (Orthogonal-MSGM) or norm "
                           f"(Obtuse-MSGM)")
    if not 0 <= args.forget_weight <= 1:
        raise C.UsageError(f"--forget-weight {args.forget_weight} must lie in [0, 1] "
                           f"(released: 0.01)")
    sizes = (args.forget_every, args.steps, args.scratch_steps, args.batch_size, args.n_nll)
    if min(sizes) < 1 or args.n_samples < 2:
        raise C.UsageError("--forget-every, --steps, --scratch-steps, --batch-size and --n-nll "
                           "must be >= 1, --n-samples >= 2")
    if args.normal not in ("base", "scratch"):
        raise C.UsageError(f"unknown --normal {args.normal!r}: use base or scratch")
    if args.base and not args.finetune:
        raise C.UsageError("--base is the normal model that --finetune starts from: add "
                           "--finetune, or leave it out")
    return sorted(set(forget))


def recipe(args: Args, scratch: bool) -> Args:
    """The hyperparameters of one training: from scratch --scratch-steps and --scratch-lr with the
    warm-up; fine-tuning --steps and --lr without one."""
    if scratch:
        return replace(args, steps=args.scratch_steps, lr=args.scratch_lr)
    return replace(args, warmup=0)


def show_progress(step: int, log: dict, bar, seconds: float):
    """train()'s callback: every 100 steps (and at the last) the mean retain and forget terms of the
    last 100 steps on the progress bar, every 500 steps a line with the seconds so far."""
    if step % 100 != 0 and step != bar.total:
        return
    retain = torch.tensor(log["retain"][-100:]).nanmean()
    forget = torch.tensor(log["forget"][-100:]).nanmean()
    bar.set_postfix(retain=f"{retain:.4f}", forget=f"{forget:.4f}")
    if step % 500 == 0:
        tqdm.write(f"{bar.desc} step {step}: retain {retain:.4f}  forget {forget:.4f}  "
                   f"{seconds:.0f}s")


def fit(args: Args, model, x_keep, x_forget, hp: Args, folder, key: dict, device, desc: str):
    """train() with this run's device options, resumable in folder (TensorBoard files in folder/tb
    with --track); random flips on cifar10 only."""
    save = dict(path=folder / "resume.pt", key=key, every=args.save_every,
                track=args.track and folder / "tb")
    return train(model, x_keep, x_forget, hp, device, save, hflip=model.info.name == "cifar10",
                 amp=args.amp, compile=args.compile, desc=desc, on_log=show_progress)


def reference_model(args: Args, x, classes: list, device, init: tuple | None = None):
    """Plain DSM on images x of `classes`, trained once per recipe and seed and cached: from scratch
    (normal: every class, retrain: the kept ones) in runs/msgm-<dataset>-dsm-c<classes>-s<seed>/,
    or from init = (model, its file), the kept-only fine-tune of --finetune in
    ...-ft-c<classes>-s<seed>/. Returns (model, seconds, path)."""
    kind = "dsm"
    if init:
        kind = "ft"
    folder = C.run_dir("msgm", args.dataset, f"{kind}-c{''.join(map(str, classes))}-s{args.seed}")
    hp = replace(recipe(args, scratch=init is None), task="dsm")
    key = dict({k: getattr(hp, k) for k in RECIPE}, classes=classes, n=len(x), seed=args.seed)
    if init:
        key["init"] = C.file_id(init[1])

    def compute():
        C.seed_everything(args.seed)
        start = copy.deepcopy(init[0]) if init else C.CondUNet(args.dataset)
        model, seconds = fit(args, start, x, None, hp, folder, key, device, folder.name)
        # config and step: C.load_checkpoint reads the cached model as any other model file
        return {"config": model.config, "step": hp.steps, "model": model.state_dict(),
                "seconds": seconds}
    ck = C.cached(folder / "model.safetensors", key, compute)
    model = C.CondUNet(args.dataset)
    model.load_state_dict(ck["model"])
    return model.to(device), ck["seconds"], folder / "model.safetensors"


@torch.no_grad()
def score_cosine(eps_fn, x0, ts=(0.02, 0.1, 0.3), seed: int = 0) -> dict:
    """The angle diagnostic: mean cosine between s_theta(x_t, t) and grad log p(x_t | x_0) =
    -z / sigma, which is cos(eps_theta, z), at a few t over images x0 (fixed noise, so models are
    compared on the same x_t)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        z = torch.randn(x0.shape, generator=g).to(x0.device)
        tt = torch.full((len(x0),), float(t), device=x0.device)
        eps = eps_fn(perturb(x0, tt, z), tt)
        cos = torch.nn.functional.cosine_similarity(eps.flatten(1), z.flatten(1), dim=1)
        out[f"{t:g}"] = cos.mean().item()
    return out


def evaluate(model, clf, args: Args, forget, data) -> tuple:
    """args.n_samples unconditional samples judged by E.judge (undesirable share with its exact 95%
    interval, FID of the kept samples against the real kept images), the NLL of held-out undesirable
    and kept images under the null token (E.class_nll), and the angle diagnostic on both groups.
    Returns (metrics, samples)."""
    x_tr, y_tr, xt, yt = data
    model = model.eval()
    dev, null = next(model.parameters()).device, model.tok["null"]
    c = torch.full((args.n_samples,), null)
    x = C.sample(model, C.VP(), c.to(dev), args.sampler, args.sample_steps, seed=args.seed,
                 amp=args.amp)
    s = C.sample_record(x, c, args.sampler, args.sample_steps, null)
    m = E.judge(s, clf, x_tr, y_tr, forget)
    m["forget_count"] = round(m["forget_rate"] * len(x))
    m["forget_rate_lo"], m["forget_rate_hi"] = E.interval(m["forget_count"], len(x))
    m.update(E.class_nll(model, xt, yt, forget, args.n_nll, args.nll_tol, conditional=False),
             params=C.n_params(model))
    f = torch.isin(yt, torch.tensor(forget))
    for group, xs in (("forget", xt[f][:args.n_nll]), ("kept", xt[~f][:args.n_nll])):
        cos = score_cosine(unconditional(model), xs.to(dev), seed=args.seed)
        m.update({f"cos_{group}@{t}": v for t, v in cos.items()})
    return m, s


def evaluate_fixed(path, model, clf, args: Args, forget, data) -> tuple:
    """evaluate() of a model that does not change between runs (the base, a cached from-scratch
    model), cached next to it under its file identity and the evaluation's settings. Returns
    (metrics, first 32 samples)."""
    keys = ("n_samples", "sampler", "sample_steps", "n_nll", "nll_tol", "seed", "data_root",
            "fid_features")
    # interval: entries written with the earlier Wilson bounds and without forget_count are redone
    key = dict(model=C.file_id(path), forget=forget, interval="exact",
               **{k: getattr(args, k) for k in keys})

    def compute():
        m, s = evaluate(model, clf, args, forget, data)
        return m, s["x"][:32]
    name = f"msgm-eval-f{''.join(map(str, forget))}-s{args.seed}.safetensors"
    return C.cached(C.cache_beside(path, name), key, compute)


COLS = ["share", "fid_retain", "retain_acc", "nll_forget_bpd", "nll_kept_bpd", "cos_forget@0.02",
        "cos_forget@0.1", "cos_forget@0.3", "cos_kept@0.1", "seconds"]


def references(args: Args, x, x_keep, kept: list, info, device) -> dict:
    """{row name: (model, training seconds, file)} of the models MSGM is compared with: normal
    (someone's with --base), then retrain from scratch or, with --finetune, the kept-only
    fine-tune of normal (unless --no-control)."""
    if args.base or args.normal == "base":   # the cached base model, or someone's (--base)
        model, path = C.base_model(args, device)
        normal = model, None, path
    else:
        normal = reference_model(args, x, list(range(info.num_classes)), device)
    refs = {"normal (all data)": normal}
    if not args.finetune:
        refs["retrain (kept data)"] = reference_model(args, x_keep, kept, device)
    elif args.control:   # the same normal model fine-tuned on kept data only, for as many steps
        init = (normal[0], normal[2])
        refs["fine-tune on kept data"] = reference_model(args, x_keep, kept, device, init=init)
    return refs


def report(rows: dict, args: Args, sampler: str, forget: list):
    """The table of every model, then the effect: the undesirable classes' share of each model's
    unconditional samples, a count with its exact 95% interval."""
    print(f"\n{args.n_samples} unconditional samples per model ({sampler}); share of "
          f"undesirable classes with its 95% interval; NLL in bits/dim of held-out images; "
          f"samples.png: 2 rows per model in table order")
    for r in rows.values():
        lo, hi = 100 * r["forget_rate_lo"], 100 * r["forget_rate_hi"]
        r["share"] = f"{100 * r['forget_rate']:.2f}% [{lo:.2f}, {hi:.2f}]"
    print(E.table(rows, COLS))
    n = args.n_samples
    print(f"\nsamples classified as {','.join(map(str, forget))}, of {n} unconditional ones:")
    for name, r in rows.items():
        print(f"  {name:<34} {E.count(r['forget_count'], n)}")


def main(args: Args):
    C.one_process("msgm.py")   # no data-parallel loop: N copies would write one folder
    info, clock = C.data_info(args.dataset), C.Clock()
    forget = check(args, info)
    device = C.pick_device(args.device)
    out = C.start_run("msgm", args)
    x, y = C.load_data(info.name, args.data_root, "train")
    data = (x, y, *C.load_data(info.name, args.data_root, "test"))
    is_f = torch.isin(y, torch.tensor(forget))
    x_keep, x_forget = x[~is_f], x[is_f]
    kept = [k for k in range(info.num_classes) if k not in forget]
    with clock("classifier"):
        clf = E.load_judge(args, device)
    name = VARIANTS[args.task] + (" (released)" if args.released else "")
    against = "normal, retrain and MSGM from scratch"
    if args.finetune:
        against = "fine-tuning normal, against fine-tuning it on kept data only"
    print(f"{name} on {info.name}: undesirable {forget} ({len(x_forget)} train images), "
          f"kept {kept} ({len(x_keep)}); {against}")
    with clock("reference models"):      # trained once and cached: the base, or from scratch
        refs = references(args, x, x_keep, kept, info, device)
    rows, grid = {}, {}
    with clock("judging"):
        for ref, (model, secs, path) in refs.items():
            m, grid[ref] = evaluate_fixed(path, model, clf, args, forget, data)
            rows[ref] = dict(m, seconds=secs)
    C.seed_everything(args.seed)
    start = copy.deepcopy(refs["normal (all data)"][0]) if args.finetune else C.CondUNet(info.name)
    hp = recipe(args, scratch=not args.finetune)
    with clock("training"):
        model, seconds = fit(args, start, x_keep, x_forget, hp, out, asdict(args), device,
                             args.task)
    C.save_checkpoint(out / "model.safetensors", model, hp.steps, method="msgm", args=asdict(args))
    name += " (fine-tuned)" if args.finetune else ""
    with clock("judging"):
        m, s = evaluate(model, clf, args, forget, data)
    rows[name] = dict(m, seconds=seconds)
    C.save_samples(out, s)
    C.save_grid(torch.cat([*grid.values(), s["x"][:32]]), out / "samples.png", nrow=16)
    report(rows, args, s["sampler"], forget)
    base = next(iter(rows.values()))
    metrics = dict(rows[name], **{f"base_{k}": v for k, v in base.items() if k != "class_share"},
                   models=rows, time=clock.seconds())
    print(f"{out}: {clock.line()}")
    start_from = refs["normal (all data)"][2] if args.finetune else "none (trained from scratch)"
    C.save_result(model, out, "msgm", start_from, forget, metrics)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
