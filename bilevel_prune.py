"""Bilevel pruning: prune the UNet, then fine-tune it and suppress a concept in one bilevel loop.

Paper: Shirkavand, Yu, Gao, Somepalli, Goldstein, Huang, "Efficient Fine-Tuning and Concept
Suppression for Pruned Diffusion Models", CVPR 2025, arXiv 2412.15341. Official code:
github.com/rezashkv/unlearn-ft (pdm/training/trainer.py: BilevelUnetFineTuner).

A pruned diffusion model must be fine-tuned (distilled from its unpruned teacher T) to recover its
quality, and distillation also hands down concepts one would rather drop. Instead of fine-tuning,
then erasing (two stages), the paper solves one bilevel problem for the student S = S_theta:

    min_theta L_CU(theta)   s.t.   theta in argmin L_ft
    L_ft = MSE(S(x_t, t, y), eps) + 2 MSE(S(x_t, t, y), T(x_t, t, y)) + 0.1 mean_b MSE(S_b, T_b)
                                                                           (b: the UNet's blocks)
    L_CU = MSE(S(x_t, t, c*), T(x_t, t, null) - eta (T(x_t, t, c*) - T(x_t, t, null)))   (ESD's)

with a lower (L_ft) step every iteration and an upper (L_CU) step every K-th. Here the concept c*
is a class, and structured pruning (ResNet inner groups, attention heads, feed-forward groups)
makes a smaller, faster student.

Where each part lives:
  with_blocks, lower_loss                 L_ft and the block outputs it distils
  negative_guidance_target, upper_loss    L_CU and its target
  lower_batch, upper_batch                the batches of the two levels
  lower_step, upper_step                  one step of each level (official BilevelUnetFineTuner)
  constant_with_warmup                    the lr schedule of both optimisers
  train                                   the loop (BilevelUnetFineTuner.train)
Below the banner: the pruned student (a magnitude-pruned stand-in for the learned APTP
architecture the official code loads), the two-stage baseline's ESD stage, the judging.

    python bilevel_prune.py                                 # digits, forget 0, keep ~55% of MACs
    python bilevel_prune.py --protocol paper                # the README's table: 1,100 steps
    python bilevel_prune.py --forget 3 --keep 0.8           # the paper's larger budget
    python bilevel_prune.py --schedule distill-only --tag ref-s0   # the CP-score reference
    python bilevel_prune.py --schedule two-stage --tag two-stage   # fine-tune, then ESD
    python bilevel_prune.py --dataset mnist --device cuda

model.safetensors holds {"config", "plan", "model"}: `load_student(path)` rebuilds the pruned
network and loads it."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import Conv2d, GroupNorm, Linear
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class BilevelHparams:
    """What the losses, lower_step, upper_step and train read (digits values; Args.presets: the
    others)."""
    schedule: str = "bilevel"
    """bilevel | two-stage (fine-tune, then ESD) | distill-only (no suppression: the CP-score
    reference)"""
    steps: int = 1100
    """lower-level (fine-tuning) steps N (the paper: 20k on Stable Diffusion)"""
    batch_size: int = 64
    """batch of both levels (the paper's global batch)"""
    lr: float = 5e-4
    """lower-level AdamW lr (official 1e-6 for SD; a 1M-parameter student after 45% pruning needs
    far more)"""
    lr_up_mult: float = 2.0
    """upper-level lr = lr_up_mult x lr (official 5x: 5e-6 vs 1e-6 for SD); 2x makes it the base's
    own pretraining lr, the largest step the base was trained with"""
    upper_every: int = 10
    """K: an upper (unlearning) step every K lower steps (the official code's 10)"""
    warmup: int = 25
    """linear warm-up of both optimisers, each counted in its own steps (official 250 lower and
    250 upper steps); 0: none"""
    ema: float = 0.995
    """decay of an EMA of the student, whose weights are the result (the base's; 0: none, as the
    official code)"""
    eta: float = 1.0
    """negative-guidance strength of the upper target T(null) - eta (T(c*) - T(null))"""
    w_diff: float = 1.0
    """weight of the denoising loss in L_ft"""
    w_out: float = 2.0
    """weight of the output distillation MSE to the teacher in L_ft"""
    w_feat: float = 0.1
    """weight of the mean block-output distillation MSE in L_ft"""
    p_null: float = 0.1
    """share of lower-level labels dropped to the null token (keeps classifier-free guidance
    alive)"""


# --------------------------------------------------------------------------------------------------
# LOSSES: the two levels (copy-paste ready: torch and the arguments only)
# --------------------------------------------------------------------------------------------------

def with_blocks(model, x_t, t, c) -> tuple:
    """model(x_t, t, c) and the outputs of every down block, the mid block and every up block
    (the official UnetFineTuner's KD blocks), by forward hooks that are removed afterwards."""
    feats = []
    u = model.unet

    def keep(module, inputs, out):
        feats.append(out[0] if isinstance(out, tuple) else out)
    hooks = [b.register_forward_hook(keep) for b in [*u.down_blocks, u.mid_block, *u.up_blocks]]
    eps = model(x_t, t, c)
    for h in hooks:
        h.remove()
    return eps, feats


def negative_guidance_target(teacher, x_t, t, c, null: int, eta: float = 1.0):
    """ESD's negative guidance from the frozen unpruned teacher (official
    BilevelUnetFineTuner.upper_step): T(x_t, t, null) - eta (T(x_t, t, c*) - T(x_t, t, null));
    `null` is the unconditional token id."""
    with torch.no_grad():
        both = torch.cat([c, torch.full_like(c, null)])     # c* and null in one batch
        e_c, e_null = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return e_null - eta * (e_c - e_null)


def lower_loss(eps_s, eps_t, noise, feats_s, feats_t, w_diff=1.0, w_out=2.0, w_feat=0.1):
    """L_ft (official UnetFineTuner.step): w_diff MSE(S, eps) + w_out MSE(S, T) + w_feat mean_b
    MSE(S_b, T_b), from the student's and the frozen teacher's outputs on the same x_t, t, y and
    their block outputs (every down block, the mid block, every up block). The official Min-SNR
    weighting of the first term is left out: it serves SD's v-prediction, while our
    eps-prediction base was pretrained with the plain eps-MSE."""
    mse = torch.nn.functional.mse_loss
    l_feat = torch.stack([mse(s, f) for s, f in zip(feats_s, feats_t)]).mean()
    return w_diff * mse(eps_s, noise) + w_out * mse(eps_s, eps_t) + w_feat * l_feat


def upper_loss(student, teacher, x_t, t, c, null: int, eta: float = 1.0):
    """L_CU (official BilevelUnetFineTuner.upper_step): MSE(S(x_t, t, c*), negative-guidance
    target), x_t a noised real image of the concept at uniform t (not the model's own samples, as
    in ESD)."""
    eps_s = student(x_t, t, c)
    target = negative_guidance_target(teacher, x_t, t, c, null, eta)
    return torch.nn.functional.mse_loss(eps_s, target)


LOSSES = (with_blocks, negative_guidance_target, lower_loss, upper_loss)


# --------------------------------------------------------------------------------------------------
# TRAINING: the batches, one step of each level, the warm-up, the loop
# --------------------------------------------------------------------------------------------------

def noised(x0, vp):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at uniform t (the official
    noise_scheduler.add_noise). Returns (x_t, t, eps)."""
    t = torch.randint(vp.T, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    return vp.q_sample(x0, t, noise), t, noise


def lower_batch(x_keep, y_keep, hp: BilevelHparams, null: int, vp, device) -> tuple:
    """(x_t, t, noise, c): hp.batch_size kept images noised at uniform t, their labels dropped to
    the null token with probability hp.p_null (the official SD code drops no captions; the drop
    keeps classifier-free guidance working)."""
    idx = torch.randint(len(x_keep), (hp.batch_size,))
    drop = torch.rand(len(idx)) < hp.p_null
    c = torch.where(drop, null, y_keep[idx]).to(device)
    x_t, t, noise = noised(x_keep[idx].to(device), vp)
    return x_t, t, noise, c


def upper_batch(x_concept, y_concept, hp: BilevelHparams, vp, device) -> tuple:
    """(x_t, t, c*): hp.batch_size images of the concept noised at uniform t, and their token
    (official: a batch of the concept's dataset)."""
    idx = torch.randint(len(x_concept), (hp.batch_size,))
    x_t, t, _ = noised(x_concept[idx].to(device), vp)
    return x_t, t, y_concept[idx].to(device)


def lower_step(student, teacher, opt, scaler, ctx, batch: tuple, hp: BilevelHparams) -> float:
    """The lower (fine-tuning) step of official BilevelUnetFineTuner.train (UnetFineTuner.step):
    L_ft on batch = (x_t, t, noise, c), the frozen teacher's output and block outputs as targets,
    one step of the lower optimiser. ctx: the forward pass's autocast context; scaler: the fp16
    GradScaler (else a pass-through), whose update() the loop calls once per iteration, after
    both levels (GradScaler's rule for two optimisers). Returns L_ft."""
    x_t, t, noise, c = batch
    with ctx:
        with torch.no_grad():
            eps_t, feats_t = with_blocks(teacher, x_t, t, c)
        eps_s, feats_s = with_blocks(student, x_t, t, c)
        l_ft = lower_loss(eps_s, eps_t, noise, feats_s, feats_t, hp.w_diff, hp.w_out, hp.w_feat)
    opt.zero_grad(set_to_none=True)
    scaler.scale(l_ft).backward()
    scaler.step(opt)
    return l_ft.item()


def upper_step(student, teacher, opt, scaler, ctx, batch: tuple, hp: BilevelHparams) -> float:
    """The upper (unlearning) step of official BilevelUnetFineTuner.upper_step: L_CU on batch =
    (x_t, t, c*) towards the frozen teacher's negative guidance, one step of the upper optimiser
    (its own AdamW over the same weights). ctx, scaler: as in lower_step. Returns L_CU."""
    x_t, t, c = batch
    with ctx:
        l_cu = upper_loss(student, teacher, x_t, t, c, teacher.tok["null"], hp.eta)
    opt.zero_grad(set_to_none=True)
    scaler.scale(l_cu).backward()
    scaler.step(opt)
    return l_cu.item()


STEPS = (lower_step, upper_step)


def constant_with_warmup(lr: float, n: int, warmup: int) -> float:
    """The lr of step n: linear warm-up over `warmup` steps, then constant (official
    get_scheduler("constant_with_warmup"); n counts from 1, so the first step moves too);
    warmup 0: lr from the first step."""
    if warmup == 0:
        return lr
    return lr * min(1.0, n / warmup)


def train(args: Args, teacher, student, data: tuple, device, out, on_step) -> dict:
    """The official schedule (BilevelUnetFineTuner.train) on data = (x_keep, y_keep, x_concept,
    y_concept): one student, two AdamW optimisers over all its weights, each warmed up over its
    own steps; every iteration a lower step on L_ft, every K-th (schedule bilevel) also an upper
    step on L_CU. The paper's penalty form min_theta max_vartheta L_CU(theta) + lam (L_ft(theta) -
    L_ft(vartheta)) has the theta-gradient grad L_CU + lam grad L_ft: alternating descent with a
    fixed balance, set in the official code by the lr ratio and K. on_step(step, level, log), the
    experiment's monitor, runs before the "lower" and the "upper" step and at the "end" of each
    iteration; what it adds to log is resumed with it. Resumable (out/resume.pt); the student ends
    with its EMA weights. Returns the log and the clock."""
    vp = C.VP()
    params = list(student.parameters())
    lr_up = args.lr * args.lr_up_mult
    opt_low = torch.optim.AdamW(params, args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt_up = torch.optim.AdamW(params, lr_up, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = C.EMA(student, args.ema)
    scaler = C.grad_scaler(device, args.amp)
    ctx = C.autocast(device, args.amp)
    x_keep, y_keep, x_concept, y_concept = data
    log = {"l_ft": [], "l_cu": []}
    resume = C.Resume(out / "resume.pt", asdict(args), args.save_every, args.track and out / "tb",
                      student=student, ema=ema, opt_low=opt_low, opt_up=opt_up, scaler=scaler,
                      log=log)
    start = resume.load()
    for step in tqdm(range(start, args.steps), desc=args.schedule, total=args.steps, initial=start):
        n = step + 1
        # the run ends on a lower step: the result is fine-tuned last
        upper = args.schedule == "bilevel" and n % args.upper_every == 0 and n < args.steps
        batch = lower_batch(x_keep, y_keep, args, teacher.tok["null"], vp, device)
        opt_low.param_groups[0]["lr"] = constant_with_warmup(args.lr, n, args.warmup)
        on_step(n, "lower", log)
        log["l_ft"].append(lower_step(student, teacher, opt_low, scaler, ctx, batch, args))
        if upper:
            n_up = n // args.upper_every      # the official upper scheduler counts upper steps
            opt_up.param_groups[0]["lr"] = constant_with_warmup(lr_up, n_up, args.warmup)
            batch = upper_batch(x_concept, y_concept, args, vp, device)
            on_step(n, "upper", log)
            log["l_cu"].append(upper_step(student, teacher, opt_up, scaler, ctx, batch, args))
        scaler.update()
        ema.decay = min(args.ema, (1 + step) / (10 + step))   # EMAModel.get_decay's warm-up
        ema.update(student)
        on_step(n, "end", log)
        resume.save(n)
    if args.ema > 0:
        student.load_state_dict(ema.state_dict())
    resume.finish()
    return log | {"clock": resume.clock()}   # seconds over every call, when resumed


# ---- EXPERIMENT: python bilevel_prune.py (pruning, ESD, judging); not needed for bilevel ----

SCHEDULES = ("bilevel", "two-stage", "distill-only")   # the values of --schedule


@dataclass
class Args(BilevelHparams, C.RunArgs):
    forget: int = 0
    """the class (concept c*) to suppress"""
    keep: float = 0.55
    """share of the teacher's multiply-accumulates the student keeps (the paper's budgets: 0.55
    and 0.8)"""
    esd_batch: int = 8
    """two-stage only: images per ESD step, each drawn by partial DDIM sampling of the student
    (guidance 3)"""
    steps: int = 600
    """lower-level steps, an upper-level step every --upper-every (the README's table: 1,100; 500
    already suppress the class, at 2 points of the other classes' accuracy)"""
    n_per_class: int = 20
    """samples per class drawn from the teacher and the student from the same noise (samples.pt,
    the evaluation)"""
    n_nll: int = 8
    """held-out images per group (forgotten / kept) whose NLL in bits/dim the run reports"""
    # 32x32 data (17.6M / 42.9M-parameter UNets): the paper's N and warm-up, a smaller lr (not yet
    # measured)
    presets = {ds: dict(steps=20_000, lr=1e-4, warmup=250)
               for ds in ("mnist", "fashion", "cifar10")}
    # --protocol paper: the sizes of the README's table
    paper = dict(steps=1100, n_per_class=100, n_nll=16)
    unsupported = dict(compile="the distillation reads the block outputs through forward hooks "
                               "added at every step, which a compiled UNet would recompile for")


def check_args(args: Args):
    """Every mistake a user can make, reported before any work starts."""
    C.check_class(C.data_info(args.dataset), args.forget, "--forget class")
    if args.schedule not in SCHEDULES:
        raise C.UsageError(f"unknown --schedule {args.schedule!r}: use bilevel, two-stage or "
                           "distill-only")
    sizes = (args.steps, args.upper_every, args.batch_size, args.esd_batch, args.n_per_class)
    if min(sizes) < 1 or not 0 < args.keep <= 1:
        raise C.UsageError("--steps, --upper-every, --batch-size, --esd-batch, --n-per-class must "
                           "be positive, --keep a share of the teacher's MACs in (0, 1]")
    if args.warmup < 0:
        raise C.UsageError(f"--warmup {args.warmup}: must be 0 (no warm-up) or a number of steps")


# --------------------------------------------------------------------------------------------------
# The student: prunable units, their magnitude, their measured cost, and the physical slicing
# --------------------------------------------------------------------------------------------------

def prunable_units(unet) -> dict:
    """name -> (kind, number of units): the insides of blocks, as APTP's gates in the official
    models/unet (ResNet inner width in GroupNorm groups, attention heads, GEGLU hidden width in 32
    groups). Block outputs, skips and resamplers stay whole, so every block output keeps the
    teacher's shape (block KD needs no adapters)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    units = {}
    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            assert m.time_embedding_norm == "default", "scale_shift time embeddings are not handled"
            units[name] = ("resnet", m.norm2.num_groups)
        elif isinstance(m, Attention):
            units[name] = ("attn", m.heads)
        elif isinstance(m, FeedForward):
            units[name] = ("ff", min(32, m.net[2].in_features))
    return units


def unit_slices(kind: str, m, n: int, keep) -> torch.Tensor:
    """Channel indices of the kept units: each unit is a contiguous block of dim / n channels (a
    GroupNorm group of conv1's output, a head's slice of q/k/v, a group of the GEGLU hidden
    width)."""
    if kind == "resnet":
        dim = m.conv1.out_channels
    elif kind == "attn":
        dim = m.to_q.out_features
    else:
        dim = m.net[2].in_features
    return torch.cat([torch.arange(u * (dim // n), (u + 1) * (dim // n)) for u in keep])


def unit_magnitude(kind: str, m, n: int) -> torch.Tensor:
    """The L2 norm of each unit's producing weights (conv1 filters of a GroupNorm group; q/k/v
    rows of a head; both GEGLU halves of a feed-forward group)."""
    if kind == "resnet":
        w = m.conv1.weight.flatten(1)
    elif kind == "attn":
        w = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight], 1)
    else:
        w = torch.cat(m.net[0].proj.weight.chunk(2), 1)    # hidden half and gate half of a unit
    return torch.stack([w.detach()[unit_slices(kind, m, n, [u])].norm() for u in range(n)])


@torch.no_grad()
def count_macs(model) -> tuple[int, dict]:
    """Multiply-accumulates of one image's forward pass, by forward hooks on the layers that ran:
    conv (out elements x in/groups x kh x kw), linear (out elements x in), attention (Lq x Lk x
    inner, twice). (total, per module)"""
    from diffusers.models.attention_processor import Attention
    per = {}
    names = {m: name for name, m in model.named_modules()}

    def hook(m, args, kwargs, out):
        if isinstance(m, Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            per[names[m]] = out[0].numel() * m.in_channels // m.groups * k
        elif isinstance(m, Linear):
            per[names[m]] = out[0].numel() * m.in_features
        else:
            lq, ctx = args[0].shape[1], kwargs.get("encoder_hidden_states")
            lk = lq if ctx is None else ctx.shape[1]
            per[names[m]] = 2 * lq * lk * m.to_q.out_features
    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in names
             if isinstance(m, (Conv2d, Linear, Attention))]
    info = model.info
    x = torch.zeros(1, info.channels, info.size, info.size, device=next(model.parameters()).device)
    model(x, 500.0, torch.zeros(1, dtype=torch.long, device=x.device))
    for h in hooks:
        h.remove()
    return sum(per.values()), per


def unit_cost(kind: str, name: str, m, n: int, macs: dict, measure: str) -> float:
    """What removing one unit of module m saves: measured MACs of the sliced layers, or
    parameters, / n."""
    sliced = {"resnet": ["conv1", "time_emb_proj", "conv2"],
              "attn": ["to_q", "to_k", "to_v", "to_out.0"], "ff": ["net.0.proj", "net.2"]}[kind]
    if measure == "macs":
        total = sum(macs[f"unet.{name}.{k}"] for k in sliced)
        if kind == "attn":   # also its two matmuls, counted on the Attention module itself
            total += macs["unet." + name]
        return total / n
    layers = [m.get_submodule(k) for k in sliced]
    biases = sum(l.bias.numel() for l in layers[:-1] if l.bias is not None)  # the last one's stays
    norm2 = 2 * m.norm2.num_channels if kind == "resnet" else 0    # norm2's affine parameters
    return (sum(l.weight.numel() for l in layers) + biases + norm2) / n


def prune_plan(model, keep: float, measure: str = "macs") -> dict:
    """Greedy global magnitude pruning, a cheap stand-in for the learned APTP architecture the
    official code loads: rank every unit by its magnitude relative to its layer's mean, drop the
    weakest (one unit stays per layer) until the MACs (or parameters) are at most `keep` x the
    teacher's. {module name: sorted kept units}"""
    units = prunable_units(model.unet)
    total, macs = count_macs(model)
    if measure == "params":
        total = C.n_params(model)
    cand, kept = [], {}
    for name, (kind, n) in units.items():
        m = model.unet.get_submodule(name)
        mag, cost = unit_magnitude(kind, m, n), unit_cost(kind, name, m, n, macs, measure)
        cand += [(float(mag[u] / mag.mean()), name, u, cost) for u in range(n)]
        kept[name] = set(range(n))
    full, budget = total, keep * total
    for score, name, u, cost in sorted(cand):
        if total > budget and len(kept[name]) > 1:
            kept[name].discard(u)
            total -= cost
    if total > budget + 1e-6:
        raise C.UsageError(f"--keep {keep} is out of reach: pruning inside blocks keeps at least "
                           f"{total / full:.2f} of the teacher's {measure}; use a larger --keep")
    return {name: sorted(k) for name, k in kept.items()}


def _sliced(layer, out_idx=None, in_idx=None):
    """A new Conv2d / Linear / GroupNorm holding only the given output (and input) channels of
    `layer`."""
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if out_idx is not None:
        w, b = w[out_idx], None if b is None else b[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    if isinstance(layer, GroupNorm):
        per_group = layer.num_channels // layer.num_groups
        new = GroupNorm(len(w) // per_group, len(w), layer.eps, layer.affine)
    elif isinstance(layer, Conv2d):
        new = Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding,
                     bias=b is not None)
    else:
        new = Linear(w.shape[1], w.shape[0], bias=b is not None)
    new.load_state_dict({"weight": w} if b is None else {"weight": w, "bias": b})
    return new.to(w.device)


def apply_plan(model, plan: dict):
    """A deep copy of `model` with the weights of every dropped unit physically removed (not
    masked)."""
    student = copy.deepcopy(model)
    units = prunable_units(student.unet)
    for name, keep in plan.items():
        kind, n = units[name]
        m = student.unet.get_submodule(name)
        idx = unit_slices(kind, m, n, keep)
        if kind == "resnet":   # conv1 out, its time-embedding rows, norm2 groups, conv2 in
            m.conv1, m.time_emb_proj = _sliced(m.conv1, idx), _sliced(m.time_emb_proj, idx)
            m.norm2, m.conv2 = _sliced(m.norm2, idx), _sliced(m.conv2, None, idx)
        elif kind == "attn":   # q/k/v rows, out-projection columns, heads (head_dim stays: so
            # does the attention scale)
            m.to_q, m.to_k, m.to_v = (_sliced(l, idx) for l in (m.to_q, m.to_k, m.to_v))
            m.to_out[0] = _sliced(m.to_out[0], None, idx)
            m.heads, m.inner_dim, m.inner_kv_dim = len(keep), len(idx), len(idx)
        else:                  # GEGLU: the hidden half and its gate half, the output's columns
            h = m.net[2].in_features
            m.net[0].proj = _sliced(m.net[0].proj, torch.cat([idx, idx + h]))
            m.net[2] = _sliced(m.net[2], None, idx)
    student.plan = plan
    return student


def load_student(path, device="cpu"):
    """Rebuild the pruned architecture from the plan saved in a run's model.safetensors, then
    load its weights."""
    ck = C.load(C.model_file(path))
    if "plan" not in ck:
        raise C.UsageError(f"{path} holds no pruning plan: it is not a bilevel_prune student")
    student = apply_plan(C.CondUNet(ck["config"]["dataset"]), ck["plan"])
    student.load_state_dict(ck["model"])
    return student.to(device)


# --------------------------------------------------------------------------------------------------
# The two-stage baseline's second stage (ESD), the monitor, the fine-tuning run
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def esd_partial_sample(model, vp, c, steps: int = 50, guidance: float = 3.0):
    """ESD's x_t: DDIM with guidance 3 from noise, stopped after a random number k in
    [1, steps-1] of steps."""
    ts = np.linspace(0, vp.T - 1, steps).round().astype(int)[::-1]
    k = int(np.random.randint(1, steps))
    x = torch.randn(len(c), model.info.channels, model.info.size, model.info.size, device=c.device)
    eps = C.guided(model, c, guidance, model.tok["null"])
    for i in range(k):
        e = eps(x, float(ts[i]))
        x0 = vp.eps_to_x0(x, torch.full((len(x),), int(ts[i]), device=c.device), e).clamp(-1, 1)
        ab = vp.alpha_bar[ts[i + 1]].item()
        x = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * e
    return x, torch.full((len(c),), int(ts[k]), device=c.device)


def esd(args: Args, student, dev, steps: int | None = None) -> list:
    """Stage 2 of the two-stage baseline (official baselines/erasing/esd_diffusers.py, 'xattn'):
    only the attn2 weights move (Adam), towards the negative-guidance target of a frozen copy of
    the fine-tuned student, at x_t from the edited student's own partial samples. The bilevel
    run's budget: N / K steps at the upper lr."""
    vp = C.VP()
    frozen = copy.deepcopy(student).eval().requires_grad_(False)
    xattn = [p for n, p in student.named_parameters() if ".attn2." in n]
    opt = torch.optim.Adam(xattn, lr=args.lr * args.lr_up_mult)
    c = torch.full((args.esd_batch,), args.forget, device=dev)
    log = []
    for _ in tqdm(range(steps or max(1, args.steps // args.upper_every)), desc="ESD (two-stage)"):
        x_t, t = esd_partial_sample(student, vp, c)
        student.train()
        loss = upper_loss(student, frozen, x_t, t, c, student.tok["null"], args.eta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
    return log


def update_monitor(args: Args, student):
    """train()'s on_step: the student's weights as one vector before the lower and the upper step
    and at the end of an iteration with an upper step, whose |upper update| / |lower update| goes
    to log["update_ratio"] (the balance of the two levels that the lr ratio and K set); every 100
    steps and at the last, the mean losses and ratio on stdout."""
    weights = {}    # level -> the student's weights at that point of the current iteration

    def on_step(step: int, level: str, log: dict):
        if level == "lower":
            weights.clear()
        if level != "end" or "upper" in weights:
            with torch.no_grad():
                weights[level] = torch.nn.utils.parameters_to_vector(student.parameters())
        if level == "end" and "upper" in weights:
            upper = (weights["end"] - weights["upper"]).norm()
            lower = (weights["upper"] - weights["lower"]).norm()
            log.setdefault("update_ratio", []).append((upper / lower).item())
        if level == "end" and (step % 100 == 0 or step == args.steps):
            up = ""
            if log["l_cu"]:
                up = (f"l_cu {np.mean(log['l_cu'][-10:]):.4f}  |upper|/|lower| "
                      f"{np.mean(log['update_ratio'][-10:]):.2f}")
            tqdm.write(f"step {step:>6}  l_ft {np.mean(log['l_ft'][-100:]):.4f}  {up}")
    return on_step


def fine_tune(args: Args, out, teacher, student, data: tuple, dev) -> dict:
    """train() under the update monitor, then for two-stage the ESD stage (its seconds added to
    the clock); writes model.safetensors. Returns train()'s log (two-stage: with l_esd)."""
    log = train(args, teacher, student, data, dev, out, update_monitor(args, student))
    if args.schedule == "two-stage":
        w0, p0 = time.time(), time.process_time()
        log["l_esd"] = esd(args, student, dev)
        log["clock"]["seconds"] += time.time() - w0
        log["clock"]["cpu_seconds"] += time.process_time() - p0
    ck = {"config": student.config, "plan": student.plan, "step": args.steps,
          "model": student.state_dict()}
    C.atomic_save(ck, out / "model.safetensors")
    return log


# --------------------------------------------------------------------------------------------------
# Judging and the report
# --------------------------------------------------------------------------------------------------

def timed_samples(model, args: Args, c) -> tuple:
    """Samples (--sampler) for tokens c, and images per wall-clock and per CPU second (robust to
    other jobs)."""
    w0, p0 = time.time(), time.process_time()
    x = C.sample(model, C.VP(), c.to(next(model.parameters()).device), args.sampler,
                 args.sample_steps, seed=args.seed, amp=args.amp)
    return x, len(c) / (time.time() - w0), len(c) / (time.process_time() - p0)


def evaluate(args: Args, out, teacher, student, clf, log: dict, seconds: float,
             cpu_seconds: float) -> dict:
    """samples.pt / .png of the student, its figures as E.evaluate_model computes them (the
    teacher timed on the same batch), the teacher's cached ones as base_*, the cost of both, the
    CP score against distill-only."""
    info, f, g = student.info, args.forget, min(10, args.n_per_class)
    dev = next(clf.parameters()).device
    c = C.class_tokens(info.num_classes, args.n_per_class)
    student.eval().requires_grad_(False)
    xt, ips_t, ipc_t = timed_samples(teacher, args, c)
    x, ips_s, ipc_s = timed_samples(student, args, c)
    s = C.sample_record(x, c, args.sampler, args.sample_steps, student.tok["null"])
    C.save_samples(out, s)
    m = E.judge(s, clf, *C.load_data(args.dataset, args.data_root, "train"), [f])
    if args.n_nll > 0:
        x_test, y_test = C.load_data(args.dataset, args.data_root, "test")
        m.update(E.class_nll(student, x_test, y_test, [f], args.n_nll, args.nll_tol))
    mb = E.evaluate_base(args.base or C.base_path(args.dataset), clf, args, [f])[0]

    def p_concept(x):   # the CLIP score's analogue
        return torch.softmax(clf(x[c == f].to(dev)), 1)[:, f].tolist()
    pc, pc_t = p_concept(x), p_concept(xt)
    macs_t, macs_s = count_macs(teacher)[0], count_macs(student)[0]
    n_t, n_s = C.n_params(teacher), C.n_params(student)
    ratios = log.get("update_ratio")
    keys = ("forget_rate", "retain_acc", "fid_retain", "nll_forget_bpd", "nll_kept_bpd",
            "nll_forget_null_bpd", "is")
    res = {**{k: m.get(k) for k in keys}, **{f"base_{k}": mb.get(k) for k in keys},
           "cp_score": None}
    res.update(seconds=seconds, cpu_seconds=cpu_seconds, nfe=s["nfe"], params=n_s,
               base_seconds=None, base_nfe=s["nfe"], base_params=n_t, class_acc=m["class_acc"],
               schedule=args.schedule, keep=args.keep, params_teacher=n_t, params_student=n_s,
               params_ratio=n_s / n_t, macs_teacher=macs_t, macs_student=macs_s,
               macs_ratio=macs_s / macs_t, images_per_s_teacher=ips_t, images_per_s_student=ips_s,
               speedup=ips_s / ips_t, speedup_cpu=ipc_s / ipc_t, p_concept=pc,
               p_concept_mean=float(np.mean(pc)), base_p_concept_mean=float(np.mean(pc_t)),
               l_ft_final=float(np.mean(log["l_ft"][-50:])),
               update_ratio=float(np.mean(ratios)) if ratios else None)
    # the CP reference: the distilled-only run of the same seed
    ref = C.run_dir("bilevel_prune", args.dataset, f"ref-s{args.seed}") / "metrics.json"
    r = json.loads(ref.read_text()) if ref.exists() and args.schedule != "distill-only" else {}
    if len(r.get("p_concept") or []) == len(pc):   # the same sampling seeds: same n_per_class, seed
        res.update(cp_score=float(np.mean(np.array(pc) < np.array(r["p_concept"]))),
                   cp_reference=str(ref))
    grid = [z.view(info.num_classes, -1, *z.shape[1:])[:, :g].flatten(0, 1) for z in (xt, x)]
    C.save_grid(torch.cat(grid), out / "samples.png", nrow=g,
                highlight_rows=(f, info.num_classes + f))
    no_cp = "" if res["cp_score"] is not None else f"; no CP score: no reference at {ref}"
    print(f"\nsamples: {out / 'samples.png'} (teacher rows 0-{info.num_classes - 1}, student "
          f"below; class {f} framed){no_cp}")
    cols = ["forget_rate", "retain_acc", "fid_retain", "p_concept_mean", "cp_score", "params",
            "MACs", "img/s"]
    base = {k[5:]: v for k, v in res.items() if k[:5] == "base_"}
    print(E.table({"teacher": {**base, "MACs": macs_t, "img/s": ips_t},
                   f"student ({args.schedule})": {**res, "MACs": macs_s, "img/s": ips_s}}, cols))
    before = dict(s, x=xt)
    # the student's count is in its confusion matrix; the teacher's samples are judged here
    res["forget_counts"] = [int((E.predict(clf, xt[c == f]) == f).sum()), m["confusion"][f][f]]
    res["retain_change"] = E.paired_change(clf, before, s, [f])
    return res


def headline(args: Args, res: dict) -> str:
    """The effect in two lines: samples asked for the class that are classified as it (a count with
    its exact 95% interval), teacher then student, from the same noise; the other classes' accuracy
    with its paired change."""
    n, (k_t, k_s), r = args.n_per_class, res["forget_counts"], res["retain_change"]
    who = f"student ({res['macs_ratio']:.0%} of the MACs)"
    return E.effect_table("teacher", who, [
        (f"class {args.forget} drawn as asked", E.count(k_t, n), E.count(k_s, n)),
        ("other classes, accuracy", f"{100 * r['before']:.1f}%", E.change(r))])


def main(args: Args):
    C.one_process("bilevel_prune.py")   # no data-parallel loop: N copies would write one folder
    check_args(args)
    dev, clock = C.pick_device(args.device), C.Clock()
    with clock("base and classifier"):
        teacher = C.base_model(args, dev)[0].eval().requires_grad_(False)
        clf = E.load_judge(args, dev)
    C.seed_everything(args.seed)
    plan = prune_plan(teacher, args.keep)          # a UsageError for an unreachable --keep, first
    student = apply_plan(teacher, plan).train().requires_grad_(True)
    out = C.start_run("bilevel_prune", args)
    x, y = C.load_data(args.dataset, args.data_root, "train")
    concept = y == args.forget
    data = (x[~concept], y[~concept], x[concept], y[concept])
    share = count_macs(student)[0] / count_macs(teacher)[0]
    print(f"student: {share:.1%} of the teacher's MACs; units kept per layer "
          f"{list(map(len, plan.values()))}")
    with clock("training"):
        log = fine_tune(args, out, teacher, student, data, dev)
    seconds, cpu_seconds = log["clock"]["seconds"], log["clock"]["cpu_seconds"]
    with clock("judging"):
        metrics = evaluate(args, out, teacher, student, clf, log, seconds, cpu_seconds)
    metrics["time"] = clock.seconds()
    print(f"\n{headline(args, metrics)}\n{out}: {clock.line()}")
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
