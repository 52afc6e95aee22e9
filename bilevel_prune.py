"""Bilevel pruning: prune the UNet, then fine-tune it and suppress a concept in one bilevel loop.

Paper: Shirkavand, Yu, Gao, Somepalli, Goldstein, Huang, "Efficient Fine-Tuning and Concept Suppression for
Pruned Diffusion Models", CVPR 2025, arXiv 2412.15341; official code github.com/rezashkv/unlearn-ft.

A pruned diffusion model must be fine-tuned (distilled from its unpruned teacher T) to recover its quality, and
distillation also hands down concepts one would rather drop. Instead of fine-tuning, then erasing (two stages),
the paper solves one bilevel problem for the student S = S_theta:

    min_theta L_CU(theta)   s.t.   theta in argmin L_ft
    L_ft = MSE(S(x_t, t, y), eps) + 2 MSE(S(x_t, t, y), T(x_t, t, y)) + 0.1 mean_b MSE(S_b, T_b)   (b: UNet blocks)
    L_CU = MSE(S(x_t, t, c*), T(x_t, t, null) - eta (T(x_t, t, c*) - T(x_t, t, null)))          (ESD's target)

with a lower (L_ft) step every iteration and an upper (L_CU) step every K-th. Here the concept c* is a class, and the
structured pruning (ResNet inner groups, attention heads, feed-forward groups) makes a smaller, faster student.

    python bilevel_prune.py                                      # digits, forget class 0, keep ~55% of the MACs
    python bilevel_prune.py --forget 3 --keep 0.8                # the paper's larger budget
    python bilevel_prune.py --schedule distill-only --tag ref-s0 # no suppression: the CP-score reference (seed 0)
    python bilevel_prune.py --schedule two-stage --tag two-stage # baseline: fine-tune, then ESD on cross-attention
    python bilevel_prune.py --dataset mnist --device cuda

model.safetensors holds {"config", "plan", "model"}: `load_student(path)` rebuilds the pruned network and loads it."""
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
class Args(C.RunArgs):
    forget: int = 0
    """the class (concept c*) to suppress"""
    keep: float = 0.55
    """share of the teacher's multiply-accumulates the student keeps (the paper's budgets: 0.55 and 0.8)"""
    schedule: str = "bilevel"
    """bilevel | two-stage (fine-tune, then ESD) | distill-only (no suppression: the CP-score reference)"""
    steps: int = 1100
    """lower-level (fine-tuning) steps N (the paper: 20k on Stable Diffusion)"""
    batch_size: int = 64
    """batch of both levels (the paper's global batch)"""
    lr: float = 5e-4
    """lower-level AdamW lr (official 1e-6 for SD; a 1M-parameter student after 45% pruning needs far more)"""
    lr_up_mult: float = 2.0
    """upper-level lr = lr_up_mult x lr: the base's own pretraining lr (official 5x: 5e-6 vs 1e-6 for SD, whose
    pretraining lr is 1e-4; 5x here would be 2.5x ours). Logged: |upper step| / |lower step|, 2.1-2.7 here"""
    upper_every: int = 10
    """K: an upper (unlearning) step every K lower steps (the official code's 10)"""
    warmup: int = 25
    """linear warm-up of both optimisers, each counted in its own steps (official 250 lower and 250 upper steps)"""
    ema: float = 0.995
    """decay of an EMA of the student, whose weights are the result (the base's; 0: none, as the official code)"""
    eta: float = 1.0
    """negative-guidance strength of the upper target T(null) - eta (T(c*) - T(null))"""
    w_diff: float = 1.0
    """weight of the denoising loss in L_ft"""
    w_out: float = 2.0
    """weight of the output distillation MSE to the teacher in L_ft"""
    w_feat: float = 0.1
    """weight of the mean block-output distillation MSE in L_ft"""
    p_null: float = 0.1
    """share of lower-level labels dropped to the null token (keeps classifier-free guidance alive)"""
    esd_batch: int = 8
    """two-stage only: images per ESD step, each drawn by partial DDIM sampling of the student (guidance 3)"""
    # 32x32 data (17.6M / 42.9M-parameter UNets): the paper's N and warm-up, a smaller lr (not yet measured)
    presets = {ds: dict(steps=20_000, lr=1e-4, warmup=250) for ds in ("mnist", "fashion", "cifar10")}


# ----------------------------------------------------------------------------------------------------------
# LOSSES: the two levels (copy-paste ready: torch and the arguments only)
# ----------------------------------------------------------------------------------------------------------

def negative_guidance_target(teacher, x_t, t, c, null: int, eta: float = 1.0):
    """ESD's negative guidance from the frozen unpruned teacher (official BilevelUnetFineTuner.upper_step):
    T(x_t, t, null) - eta (T(x_t, t, c*) - T(x_t, t, null)); `null` is the unconditional token id."""
    with torch.no_grad():
        e_c, e_null = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, torch.full_like(c, null)])).chunk(2)
    return e_null - eta * (e_c - e_null)


def lower_loss(eps_s, eps_t, noise, feats_s, feats_t, w_diff=1.0, w_out=2.0, w_feat=0.1):
    """L_ft (official UnetFineTuner.step): w_diff MSE(S, eps) + w_out MSE(S, T) + w_feat mean_b MSE(S_b, T_b),
    from the student's and the frozen teacher's outputs on the same x_t, t, y and their block outputs (every
    down block, the mid block, every up block). The official Min-SNR weighting of the first term is left out:
    it serves SD's v-prediction, while our eps-prediction base was pretrained with the plain eps-MSE."""
    mse = torch.nn.functional.mse_loss
    l_feat = torch.stack([mse(s, f) for s, f in zip(feats_s, feats_t)]).mean()
    return w_diff * mse(eps_s, noise) + w_out * mse(eps_s, eps_t) + w_feat * l_feat


def upper_loss(student, teacher, x_t, t, c, null: int, eta: float = 1.0):
    """L_CU (official BilevelUnetFineTuner.upper_step): MSE(S(x_t, t, c*), negative-guidance target), x_t a
    noised real image of the concept at uniform t (not the model's own samples, as in ESD)."""
    return torch.nn.functional.mse_loss(student(x_t, t, c), negative_guidance_target(teacher, x_t, t, c, null, eta))


LOSSES = (negative_guidance_target, lower_loss, upper_loss)


# ----------------------------------------------------------------------------------------------------------
# PRUNING: units, their magnitude, their measured cost, and the physical slicing
# ----------------------------------------------------------------------------------------------------------

def prunable_units(unet) -> dict:
    """name -> (kind, number of units): the insides of blocks, as APTP's gates in the official models/unet
    (ResNet inner width in GroupNorm groups, attention heads, GEGLU hidden width in 32 groups). Block outputs,
    skips and resamplers stay whole, so every block output keeps the teacher's shape (block KD needs no adapters)."""
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
    """Channel indices of the kept units: each unit is a contiguous block of dim / n channels (a GroupNorm
    group of conv1's output, a head's slice of q/k/v, a group of the GEGLU hidden width)."""
    dim = m.conv1.out_channels if kind == "resnet" else m.to_q.out_features if kind == "attn" else m.net[2].in_features
    return torch.cat([torch.arange(u * (dim // n), (u + 1) * (dim // n)) for u in keep])


def unit_magnitude(kind: str, m, n: int) -> torch.Tensor:
    """The L2 norm of each unit's producing weights (conv1 filters of a GroupNorm group; q/k/v rows of a head;
    both GEGLU halves of a feed-forward group)."""
    if kind == "resnet":
        w = m.conv1.weight.flatten(1)
    elif kind == "attn":
        w = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight], 1)
    else:
        w = torch.cat(m.net[0].proj.weight.chunk(2), 1)    # hidden half and gate half of each GEGLU unit
    return torch.stack([w.detach()[unit_slices(kind, m, n, [u])].norm() for u in range(n)])


@torch.no_grad()
def count_macs(model) -> tuple[int, dict]:
    """Multiply-accumulates of one image's forward pass, by forward hooks on the layers that ran: conv (out elements
    x in/groups x kh x kw), linear (out elements x in), attention (Lq x Lk x inner, twice). (total, per module)"""
    from diffusers.models.attention_processor import Attention
    per, names = {}, {m: name for name, m in model.named_modules()}

    def hook(m, args, kwargs, out):
        if isinstance(m, Conv2d):
            per[names[m]] = out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, Linear):
            per[names[m]] = out[0].numel() * m.in_features
        else:
            lq, ctx = args[0].shape[1], kwargs.get("encoder_hidden_states")
            per[names[m]] = 2 * lq * (lq if ctx is None else ctx.shape[1]) * m.to_q.out_features
    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in names
             if isinstance(m, (Conv2d, Linear, Attention))]
    x = torch.zeros(1, model.info.channels, model.info.size, model.info.size, device=next(model.parameters()).device)
    model(x, 500.0, torch.zeros(1, dtype=torch.long, device=x.device))
    for h in hooks:
        h.remove()
    return sum(per.values()), per


def unit_cost(kind: str, name: str, m, n: int, macs: dict, measure: str) -> float:
    """What removing one unit of module m saves: measured MACs of the sliced layers, or parameters, / n."""
    sliced = {"resnet": ["conv1", "time_emb_proj", "conv2"], "attn": ["to_q", "to_k", "to_v", "to_out.0"],
              "ff": ["net.0.proj", "net.2"]}[kind]
    if measure == "macs":   # attention: also its two matmuls, counted on the Attention module itself
        return (sum(macs[f"unet.{name}.{k}"] for k in sliced) + (macs["unet." + name] if kind == "attn" else 0)) / n
    layers = [m.get_submodule(k) for k in sliced]
    biases = sum(l.bias.numel() for l in layers[:-1] if l.bias is not None)  # the last layer's bias stays whole
    norm2 = 2 * m.norm2.num_channels if kind == "resnet" else 0              # norm2's affine parameters
    return (sum(l.weight.numel() for l in layers) + biases + norm2) / n


def prune_plan(model, keep: float, measure: str = "macs") -> dict:
    """Greedy global magnitude pruning, a cheap stand-in for the learned APTP architecture the official code loads:
    rank every unit by its magnitude relative to its layer's mean, drop the weakest (one unit stays per layer)
    until the MACs (or parameters) are at most `keep` x the teacher's. {module name: sorted kept units}"""
    units, (total, macs) = prunable_units(model.unet), count_macs(model)
    total = C.n_params(model) if measure == "params" else total
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
    """A new Conv2d / Linear / GroupNorm holding only the given output (and input) channels of `layer`."""
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    w, b = (w, b) if out_idx is None else (w[out_idx], None if b is None else b[out_idx])
    w = w if in_idx is None else w[:, in_idx]
    if isinstance(layer, GroupNorm):
        new = GroupNorm(len(w) // (layer.num_channels // layer.num_groups), len(w), layer.eps, layer.affine)
    elif isinstance(layer, Conv2d):
        new = Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding, bias=b is not None)
    else:
        new = Linear(w.shape[1], w.shape[0], bias=b is not None)
    new.load_state_dict({"weight": w} if b is None else {"weight": w, "bias": b})
    return new.to(w.device)


def apply_plan(model, plan: dict):
    """A deep copy of `model` with the weights of every dropped unit physically removed (not masked)."""
    student = copy.deepcopy(model)
    units = prunable_units(student.unet)
    for name, keep in plan.items():
        kind, n = units[name]
        m = student.unet.get_submodule(name)
        idx = unit_slices(kind, m, n, keep)
        if kind == "resnet":   # conv1 out, its time-embedding rows, norm2 groups, conv2 in
            m.conv1, m.time_emb_proj = _sliced(m.conv1, idx), _sliced(m.time_emb_proj, idx)
            m.norm2, m.conv2 = _sliced(m.norm2, idx), _sliced(m.conv2, None, idx)
        elif kind == "attn":   # q/k/v rows, out-projection columns, head count (head_dim stays, so the scale does)
            m.to_q, m.to_k, m.to_v = (_sliced(l, idx) for l in (m.to_q, m.to_k, m.to_v))
            m.to_out[0] = _sliced(m.to_out[0], None, idx)
            m.heads, m.inner_dim, m.inner_kv_dim = len(keep), len(idx), len(idx)
        else:                  # GEGLU: the hidden half and its gate half, then the output projection's columns
            h = m.net[2].in_features
            m.net[0].proj = _sliced(m.net[0].proj, torch.cat([idx, idx + h]))
            m.net[2] = _sliced(m.net[2], None, idx)
    student.plan = plan
    return student


def load_student(path, device="cpu"):
    """Rebuild the pruned architecture from the plan saved in a run's model.safetensors, then load its weights."""
    ck = C.load(C.model_file(path))
    if "plan" not in ck:
        raise C.UsageError(f"{path} holds no pruning plan: it is not a bilevel_prune student")
    student = apply_plan(C.CondUNet(ck["config"]["dataset"]), ck["plan"])
    student.load_state_dict(ck["model"])
    return student.to(device)


# ----------------------------------------------------------------------------------------------------------
# TRAINING
# ----------------------------------------------------------------------------------------------------------

def with_blocks(model, x_t, t, c) -> tuple:
    """model(x_t, t, c) and the outputs of every down block, the mid block and every up block (official KD blocks)."""
    feats, u = [], model.unet
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
             for b in [*u.down_blocks, u.mid_block, *u.up_blocks]]
    eps = model(x_t, t, c)
    for h in hooks:
        h.remove()
    return eps, feats


def noised(x0, vp):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at uniform t (the official noise_scheduler.add_noise)."""
    t, noise = torch.randint(vp.T, (len(x0),), device=x0.device), torch.randn_like(x0)
    return vp.q_sample(x0, t, noise), t, noise


def train(args: Args, out, teacher, student, x_keep, y_keep, x_concept, dev) -> dict:
    """The official schedule (BilevelUnetFineTuner.train): one student, two AdamW optimisers; every iteration a
    lower step on L_ft, every K-th also an upper step on L_CU. The paper's penalty form min_theta max_vartheta
    L_CU(theta) + lam (L_ft(theta) - L_ft(vartheta)) has the theta-gradient grad L_CU + lam grad L_ft: alternating
    descent with a fixed balance, set in the official code by the lr ratio and K. Resumable; writes the model."""
    vp, null = C.VP(), teacher.tok["null"]
    adamw = lambda lr: torch.optim.AdamW(student.parameters(), lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt_low, opt_up = adamw(args.lr), adamw(args.lr * args.lr_up_mult)
    ema, scaler = C.EMA(student, args.ema), C.grad_scaler(dev, args.amp)
    vec = lambda: torch.nn.utils.parameters_to_vector(student.parameters())   # for |upper step| / |lower step|
    log, c_star = {"l_ft": [], "l_cu": [], "update_ratio": []}, torch.full((args.batch_size,), args.forget, device=dev)
    resume = C.Resume(out / "resume.pt", asdict(args), args.save_every, args.track and out / "tb", student=student,
                      ema=ema, opt_low=opt_low, opt_up=opt_up, scaler=scaler, log=log)
    start = resume.load()
    for step in tqdm(range(start, args.steps), desc=args.schedule, total=args.steps, initial=start):
        upper = args.schedule == "bilevel" and (step + 1) % args.upper_every == 0 and step + 1 < args.steps  # ends low
        idx = torch.randint(len(x_keep), (args.batch_size,))
        c = torch.where(torch.rand(len(idx)) < args.p_null, null, y_keep[idx]).to(dev)   # label dropout
        opt_low.param_groups[0]["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)  # constant with warm-up
        x_t, t, noise = noised(x_keep[idx].to(dev), vp)
        theta = [vec()] if upper else []
        with C.autocast(dev, args.amp):
            with torch.no_grad():
                eps_t, feats_t = with_blocks(teacher, x_t, t, c)
            eps_s, feats_s = with_blocks(student, x_t, t, c)
            l_ft = lower_loss(eps_s, eps_t, noise, feats_s, feats_t, args.w_diff, args.w_out, args.w_feat)
        opt_low.zero_grad(set_to_none=True)
        scaler.scale(l_ft).backward()
        scaler.step(opt_low)
        log["l_ft"].append(l_ft.item())
        if upper:   # the official upper scheduler warms up over its own steps: n_up counts upper steps
            n_up, theta = (step + 1) // args.upper_every, theta + [vec()]
            opt_up.param_groups[0]["lr"] = args.lr * args.lr_up_mult * min(1.0, n_up / args.warmup)
            x_t, t, _ = noised(x_concept[torch.randint(len(x_concept), (args.batch_size,))].to(dev), vp)
            with C.autocast(dev, args.amp):
                l_cu = upper_loss(student, teacher, x_t, t, c_star, null, args.eta)
            opt_up.zero_grad(set_to_none=True)
            scaler.scale(l_cu).backward()
            scaler.step(opt_up)
            theta.append(vec())
            log["l_cu"].append(l_cu.item())
            log["update_ratio"].append(((theta[2] - theta[1]).norm() / (theta[1] - theta[0]).norm()).item())
        scaler.update()
        ema.decay = min(args.ema, (1 + step) / (10 + step))   # warm-up of diffusers' EMAModel.get_decay
        ema.update(student)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            up = f"l_cu {np.mean(log['l_cu'][-10:]):.4f}  |upper|/|lower| {np.mean(log['update_ratio'][-10:]):.2f}" \
                if log["l_cu"] else ""
            tqdm.write(f"step {step + 1:>6}  l_ft {np.mean(log['l_ft'][-100:]):.4f}  {up}")
        resume.save(step + 1)
    if args.ema > 0:
        student.load_state_dict(ema.state_dict())
    if args.schedule == "two-stage":
        log["l_esd"] = esd(args, student, dev)
    C.atomic_save({"config": student.config, "plan": student.plan, "step": args.steps, "model": student.state_dict()},
                  out / "model.safetensors")
    resume.finish()
    return log | {"clock": resume.clock()}   # seconds over every call, when resumed


@torch.no_grad()
def esd_partial_sample(model, vp, c, steps: int = 50, guidance: float = 3.0):
    """ESD's x_t: DDIM with guidance 3 from noise, stopped after a random number k in [1, steps-1] of steps."""
    ts, k = np.linspace(0, vp.T - 1, steps).round().astype(int)[::-1], int(np.random.randint(1, steps))
    x = torch.randn(len(c), model.info.channels, model.info.size, model.info.size, device=c.device)
    eps = C.guided(model, c, guidance, model.tok["null"])
    for i in range(k):
        e = eps(x, float(ts[i]))
        x0 = vp.eps_to_x0(x, torch.full((len(x),), int(ts[i]), device=c.device), e).clamp(-1, 1)
        ab = vp.alpha_bar[ts[i + 1]].item()
        x = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * e
    return x, torch.full((len(c),), int(ts[k]), device=c.device)


def esd(args: Args, student, dev, steps: int | None = None) -> list:
    """Stage 2 of the two-stage baseline (official baselines/erasing/esd_diffusers.py, 'xattn'): only the attn2
    weights move (Adam), towards the negative-guidance target of a frozen copy of the fine-tuned student, at x_t
    from the edited student's own partial samples. The bilevel run's budget: N / K steps at the upper lr."""
    vp, frozen = C.VP(), copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.Adam([p for n, p in student.named_parameters() if ".attn2." in n], lr=args.lr * args.lr_up_mult)
    c, log = torch.full((args.esd_batch,), args.forget, device=dev), []
    for _ in tqdm(range(steps or max(1, args.steps // args.upper_every)), desc="ESD (two-stage)"):
        x_t, t = esd_partial_sample(student, vp, c)
        student.train()
        loss = upper_loss(student, frozen, x_t, t, c, student.tok["null"], args.eta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
    return log


# ----------------------------------------------------------------------------------------------------------
# EVALUATION
# ----------------------------------------------------------------------------------------------------------

def timed_samples(model, args: Args, c) -> tuple:
    """Samples (--sampler) for tokens c, and images per wall-clock and per CPU second (robust to other jobs)."""
    w0, p0 = time.time(), time.process_time()
    x = C.sample(model, C.VP(), c.to(next(model.parameters()).device), args.sampler, args.sample_steps, seed=args.seed,
                 amp=args.amp)
    return x, len(c) / (time.time() - w0), len(c) / (time.process_time() - p0)


def evaluate(args: Args, out, teacher, student, clf, log: dict, seconds: float, cpu_seconds: float) -> dict:
    """samples.pt / .png of the student, its figures as E.evaluate_model computes them (the teacher timed on the
    same batch), the teacher's cached ones as base_*, the cost of both, the CP score against distill-only."""
    info, f, g, dev = student.info, args.forget, min(10, args.n_per_class), next(clf.parameters()).device
    c = C.class_tokens(info.num_classes, args.n_per_class)
    student.eval().requires_grad_(False)
    (xt, ips_t, ipc_t), (x, ips_s, ipc_s) = timed_samples(teacher, args, c), timed_samples(student, args, c)
    s = C.sample_record(x, c, args.sampler, args.sample_steps, student.tok["null"])
    C.save_samples(out, s)
    m = E.judge(s, clf, *C.load_data(args.dataset, args.data_root, "train"), [f])
    if args.n_nll > 0:
        m.update(E.class_nll(student, *C.load_data(args.dataset, args.data_root, "test"), [f], args.n_nll, args.nll_tol))
    mb = E.evaluate_base(args.base or C.base_path(args.dataset), clf, args, [f])[0]
    p_concept = lambda x: torch.softmax(clf(x[c == f].to(dev)), 1)[:, f].tolist()   # the CLIP score's analogue
    pc, pc_t = p_concept(x), p_concept(xt)
    macs_t, macs_s, n_t, n_s = count_macs(teacher)[0], count_macs(student)[0], C.n_params(teacher), C.n_params(student)
    keys = ("forget_rate", "retain_acc", "fid_retain", "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd", "is")
    res = {**{k: m.get(k) for k in keys}, **{f"base_{k}": mb.get(k) for k in keys}, "cp_score": None}
    res.update(seconds=seconds, cpu_seconds=cpu_seconds, nfe=s["nfe"], params=n_s, base_seconds=None,
               base_nfe=s["nfe"], base_params=n_t, class_acc=m["class_acc"], schedule=args.schedule, keep=args.keep,
               params_teacher=n_t, params_student=n_s, params_ratio=n_s / n_t, macs_teacher=macs_t,
               macs_student=macs_s, macs_ratio=macs_s / macs_t, images_per_s_teacher=ips_t, images_per_s_student=ips_s,
               speedup=ips_s / ips_t, speedup_cpu=ipc_s / ipc_t, p_concept=pc, p_concept_mean=float(np.mean(pc)),
               base_p_concept_mean=float(np.mean(pc_t)), l_ft_final=float(np.mean(log["l_ft"][-50:])),
               update_ratio=float(np.mean(log["update_ratio"])) if log["update_ratio"] else None)
    ref = C.run_dir("bilevel_prune", args.dataset, f"ref-s{args.seed}") / "metrics.json"   # the CP reference
    r = json.loads(ref.read_text()) if ref.exists() and args.schedule != "distill-only" else {}
    if len(r.get("p_concept") or []) == len(pc):   # the same sampling seeds: same n_per_class and seed
        res.update(cp_score=float(np.mean(np.array(pc) < np.array(r["p_concept"]))), cp_reference=str(ref))
    grid = [z.view(info.num_classes, -1, *z.shape[1:])[:, :g].flatten(0, 1) for z in (xt, x)]
    C.save_grid(torch.cat(grid), out / "samples.png", nrow=g, highlight_rows=(f, info.num_classes + f))
    print(f"\nsamples: {out / 'samples.png'} (teacher rows 0-{info.num_classes - 1}, student below; class {f} "
          f"framed){'' if res['cp_score'] is not None else f'; no CP score: no reference at {ref}'}")
    cols = ["forget_rate", "retain_acc", "fid_retain", "p_concept_mean", "cp_score", "params", "MACs", "img/s"]
    print(E.table({"teacher": {**{k[5:]: v for k, v in res.items() if k[:5] == "base_"}, "MACs": macs_t, "img/s": ips_t},
                   f"student ({args.schedule})": {**res, "MACs": macs_s, "img/s": ips_s}}, cols))
    return res


def main(args: Args):
    C.check_class(C.data_info(args.dataset), args.forget, "--forget class")
    if args.schedule not in ("bilevel", "two-stage", "distill-only"):
        raise C.UsageError(f"unknown --schedule {args.schedule!r}: use bilevel, two-stage or distill-only")
    if min(args.steps, args.upper_every, args.batch_size, args.esd_batch, args.n_per_class) < 1 or not 0 < args.keep <= 1:
        raise C.UsageError("--steps, --upper-every, --batch-size, --esd-batch, --n-per-class must be positive, --keep "
                           "a share of the teacher's MACs in (0, 1]")
    dev = C.pick_device(args.device)
    teacher = C.base_model(args, dev)[0].eval().requires_grad_(False)
    clf = E.load_judge(args, dev)
    C.seed_everything(args.seed)
    plan = prune_plan(teacher, args.keep)          # a UsageError for an unreachable --keep, before any work
    student = apply_plan(teacher, plan).train().requires_grad_(True)
    out = C.start_run("bilevel_prune", args)
    x, y = C.load_data(args.dataset, args.data_root, "train")
    x_keep, y_keep, x_concept = x[y != args.forget], y[y != args.forget], x[y == args.forget]
    print(f"student: {count_macs(student)[0] / count_macs(teacher)[0]:.1%} of the teacher's MACs; units kept per layer "
          f"{list(map(len, plan.values()))}")
    log = train(args, out, teacher, student, x_keep, y_keep, x_concept, dev)
    seconds, cpu_seconds = log["clock"]["seconds"], log["clock"]["cpu_seconds"]
    metrics = evaluate(args, out, teacher, student, clf, log, seconds, cpu_seconds)
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
