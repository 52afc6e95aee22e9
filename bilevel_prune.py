"""Bilevel pruning: prune the UNet, then fine-tune it and suppress a concept in one bilevel loop.

Paper: Shirkavand, Yu, Gao, Somepalli, Goldstein, Huang, "Efficient Fine-Tuning and Concept Suppression for
Pruned Diffusion Models", CVPR 2025, arXiv 2412.15341; official code rezashkv/unlearn-ft.

A pruned diffusion model must be fine-tuned (distilled from its unpruned teacher) to recover its quality, and
distillation also hands down concepts one would rather drop. Instead of fine-tuning first and erasing after
(two stages), the paper solves  min_theta L_CU(theta)  s.t.  theta in argmin L_ft : the fine-tuning loss
(denoising + output and block-feature distillation) is the lower level, an ESD-style negative-guidance loss on
the concept is the upper level. Here the concept is a class, and the pruning is structured (ResNet inner
groups, attention heads, feed-forward groups), so the student is a genuinely smaller, faster network.

    python bilevel_prune.py                                  # digits, forget class 0, keep ~55% of the MACs
    python bilevel_prune.py --keep 0.8                       # the paper's larger budget
    python bilevel_prune.py --schedule two-stage             # baseline: fine-tune, then ESD on cross-attention
    python bilevel_prune.py --schedule distill-only --tag ref   # no suppression; reference for the CP score
    python bilevel_prune.py --dataset mnist --forget 3 --device cuda --steps 20000 --lr 1e-4

The student is saved as {"plan", "model", "config", ...} in model.pt (load it with `load_student`; common's
load_checkpoint refuses it, its shapes differ from the base).
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common as C
import eval as E


@dataclass
class Args:
    dataset: str = "digits"
    """digits | mnist | fashion | cifar10"""
    forget: int = 0
    """the class (concept c*) to suppress"""
    keep: float = 0.55
    """share of the teacher's multiply-accumulates the student keeps (the paper's budgets: 0.55 and 0.8)"""
    schedule: str = "bilevel"
    """bilevel | two-stage (fine-tune, then ESD) | distill-only (no suppression: the CP-score reference)"""
    steps: int = 1100
    """lower-level (fine-tuning) steps N; the paper runs 20k on SD (digits: about 6 CPU minutes)"""
    batch_size: int = 64
    """batch of both levels (the paper's global batch)"""
    lr: float = 5e-4
    """lower-level AdamW lr (paper 1e-6 for SD; a 1M-parameter student after 55% pruning needs far more)"""
    lr_up_mult: float = 5.0
    """upper-level lr = lr_up_mult x lr (the official code: 5e-6 vs 1e-6)"""
    upper_every: int = 20
    """K: one upper (unlearning) step every K lower steps (the paper's 20; the official code runs 10, which on
    digits costs retain accuracy: 70% vs the teacher's 91% after 900 steps, forget rate 3%)"""
    warmup: int = 25
    """linear warm-up steps of both optimisers (official 250 of 20k steps)"""
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
    reference: str = ""
    """metrics.json of a distilled-only run for the CP score; empty = runs/bilevel_prune-<data>-ref-s<seed>"""
    n_per_class: int = 100
    """samples per class for the evaluation"""
    sample_steps: int = 50
    """DDIM steps for evaluation samples"""
    data_root: str = "data"
    """where torchvision datasets live"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    seed: int = 0
    """seed for pruning ties, batches, noise and evaluation samples"""
    tag: str = ""
    """run name suffix: runs/bilevel_prune-<dataset>-<tag>/ (default <schedule>-s<seed>)"""


# ----------------------------------------------------------------------------------------------------------
# PRUNING: units, their magnitude, their measured cost, and the physical slicing
# ----------------------------------------------------------------------------------------------------------

def prunable_units(unet) -> dict:
    """name -> (kind, number of units). Only the insides of blocks: ResNet inner width in GroupNorm groups,
    attention heads (self and cross), GEGLU feed-forward hidden width in 32 groups (the official
    ff_gate_width). Block inputs/outputs, skips, shortcuts, resamplers, conv_in/out stay whole (spec 5.2)."""
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
    w = dim // n
    return torch.cat([torch.arange(u * w, (u + 1) * w) for u in keep])


def unit_magnitude(kind: str, m, n: int) -> torch.Tensor:
    """Option B of spec 5.2: the L2 norm of each unit's producing weights (conv1 filters of a GroupNorm group;
    q/k/v rows of a head; both GEGLU halves of a feed-forward group)."""
    if kind == "resnet":
        w = m.conv1.weight.flatten(1)
    elif kind == "attn":
        w = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight], 1)
    else:
        h = m.net[2].in_features
        w = torch.cat([m.net[0].proj.weight[:h], m.net[0].proj.weight[h:]], 1)
    return torch.stack([w.detach()[unit_slices(kind, m, n, [u])].norm() for u in range(n)])


@torch.no_grad()
def count_macs(model) -> tuple[int, dict]:
    """Multiply-accumulates of one image's forward pass, counted by forward hooks on the layers that ran:
    conv (out elements x in/groups x kh x kw), linear (out elements x in), and the two attention matmuls
    (Lq x Lk x inner for QK^T and again for AV). Returns (total, per-module-name)."""
    from diffusers.models.attention_processor import Attention
    per, hooks = {}, []

    def hook(name):
        def f(m, args, kwargs, out):
            if isinstance(m, nn.Conv2d):
                per[name] = out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                per[name] = out[0].numel() * m.in_features
            else:
                lq = args[0].shape[1]
                ctx = kwargs.get("encoder_hidden_states")
                per[name] = 2 * lq * (lq if ctx is None else ctx.shape[1]) * m.to_q.out_features
        return f
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
            hooks.append(m.register_forward_hook(hook(name), with_kwargs=True))
    info, dev = model.info, next(model.parameters()).device
    try:
        model(torch.zeros(1, info.channels, info.size, info.size, device=dev), 500.0, torch.zeros(1, dtype=torch.long, device=dev))
    finally:
        for h in hooks:
            h.remove()
    return sum(per.values()), per


def unit_cost(kind: str, name: str, m, n: int, macs: dict, measure: str) -> float:
    """What removing one unit of module m saves: measured MACs of the sliced layers, or parameters, / n."""
    p = "unet." + name + "."
    if kind == "resnet":
        layers = [m.conv1, m.time_emb_proj, m.conv2]
        ln = ["conv1", "time_emb_proj", "conv2"]
        extra = 2 * m.norm2.num_channels    # norm2's affine parameters
    elif kind == "attn":
        layers, ln, extra = [m.to_q, m.to_k, m.to_v, m.to_out[0]], ["to_q", "to_k", "to_v", "to_out.0"], 0
    else:
        layers, ln, extra = [m.net[0].proj, m.net[2]], ["net.0.proj", "net.2"], 0
    if measure == "macs":
        return (sum(macs[p + k] for k in ln) + (macs["unet." + name] if kind == "attn" else 0)) / n
    biases = sum(l.bias.numel() for l in layers[:-1] if l.bias is not None)  # the last layer's bias stays whole
    return (sum(l.weight.numel() for l in layers) + biases + extra) / n


def prune_plan(model, keep: float, measure: str = "macs") -> dict:
    """Greedy global magnitude pruning (spec 5.2, option B): rank every unit by its magnitude relative to the
    mean of its layer, drop the weakest (at least one unit stays per layer) until the student's MACs (or
    parameters) are at most `keep` x the teacher's. Returns {module name: sorted kept unit indices}."""
    units = prunable_units(model.unet)
    total, macs = count_macs(model)
    if measure == "params":
        total = C.n_params(model)
    cand, kept = [], {}
    for name, (kind, n) in units.items():
        m = model.unet.get_submodule(name)
        mag = unit_magnitude(kind, m, n)
        cost = unit_cost(kind, name, m, n, macs, measure)
        cand += [(float(mag[u] / mag.mean()), name, u, cost) for u in range(n)]
        kept[name] = set(range(n))
    full, budget = total, keep * total
    for score, name, u, cost in sorted(cand):
        if total <= budget:
            break
        if len(kept[name]) > 1:
            kept[name].discard(u)
            total -= cost
    if total > budget + 1e-6:
        raise C.UsageError(f"--keep {keep} is out of reach: pruning inside blocks keeps at least "
                           f"{total / full:.2f} of the teacher's {measure}; use a larger --keep")
    return {name: sorted(k) for name, k in kept.items()}


def _sliced(layer, out_idx=None, in_idx=None):
    """A new Conv2d / Linear / GroupNorm holding only the given output (and input) channels of `layer`."""
    w = layer.weight.detach()
    w = w if out_idx is None else w[out_idx]
    w = w if in_idx is None else w[:, in_idx]
    b = None if layer.bias is None else layer.bias.detach()
    b = b if (b is None or out_idx is None) else b[out_idx]
    if isinstance(layer, nn.GroupNorm):
        new = nn.GroupNorm(len(w) // (layer.num_channels // layer.num_groups), len(w), layer.eps, layer.affine)
    elif isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding, bias=b is not None)
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
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
            m.heads, m.inner_dim = len(keep), len(idx)
            m.inner_kv_dim = len(idx)
        else:                  # GEGLU: the hidden half and its gate half, then the output projection's columns
            h = m.net[2].in_features
            m.net[0].proj = _sliced(m.net[0].proj, torch.cat([idx, idx + h]))
            m.net[2] = _sliced(m.net[2], None, idx)
    student.plan = plan
    return student


def save_student(path, student, step: int, **extra):
    """Atomic save of a pruned student: its plan (which units survive) and its state dict."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": student.config, "plan": student.plan, "step": step, "model": student.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_student(path, device="cpu"):
    """Rebuild the pruned architecture from the saved plan, then load its weights."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if "plan" not in ck:
        raise C.UsageError(f"{path} holds no pruning plan: it is not a bilevel_prune student")
    student = apply_plan(C.CondUNet(ck["config"]["dataset"]), ck["plan"])
    student.load_state_dict(ck["model"])
    return student.to(device)


# ----------------------------------------------------------------------------------------------------------
# LOSSES
# ----------------------------------------------------------------------------------------------------------

@contextmanager
def block_outputs(model):
    """Collect the outputs of every down block, the mid block and every up block (the official KD blocks)."""
    outs, u = [], model.unet
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in [*u.down_blocks, u.mid_block, *u.up_blocks]]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def noised(x0, vp):
    t = torch.randint(vp.T, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    return vp.q_sample(x0, t, noise), t, noise


def lower_loss(student, teacher, x0, c, vp, a: Args):
    """L_ft (spec 2.1, official UnetFineTuner.step): w_diff MSE(S, eps) + w_out MSE(S, T) + w_feat mean_b MSE(S_b, T_b),
    the teacher frozen and run on the same x_t, t, c. Min-SNR weighting is left out: the eps-prediction base
    was pretrained with the plain eps-MSE (spec 5.1 allows dropping it)."""
    x_t, t, noise = noised(x0, vp)
    with torch.no_grad(), block_outputs(teacher) as feats_t:
        eps_t = teacher(x_t, t, c)
    with block_outputs(student) as feats_s:
        eps_s = student(x_t, t, c)
    l_diff, l_out = F.mse_loss(eps_s, noise), F.mse_loss(eps_s, eps_t)
    l_feat = torch.stack([F.mse_loss(s, f) for s, f in zip(feats_s, feats_t)]).mean()
    return a.w_diff * l_diff + a.w_out * l_out + a.w_feat * l_feat


def negative_guidance_target(teacher, x_t, t, c, eta: float):
    """T(x_t, t, null) - eta (T(x_t, t, c*) - T(x_t, t, null)): ESD's negative guidance, from the unpruned teacher."""
    with torch.no_grad():
        null = torch.full_like(c, teacher.tok["null"])
        e_c, e_null = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, null])).chunk(2)
    return e_null - eta * (e_c - e_null)


def upper_loss(student, teacher, x0, c, vp, eta: float):
    """L_CU (spec 2.2, official BilevelUnetFineTuner.upper_step): MSE(S(x_t, t, c*), negative-guidance target)
    on noised real images of the concept at uniform t."""
    x_t, t, _ = noised(x0, vp)
    return F.mse_loss(student(x_t, t, c), negative_guidance_target(teacher, x_t, t, c, eta))


@torch.no_grad()
def esd_partial_sample(model, vp, c, steps: int = 50, guidance: float = 3.0):
    """ESD's x_t: DDIM with guidance 3 from noise, stopped after a random number k in [1, steps-1] of steps."""
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


# ----------------------------------------------------------------------------------------------------------
# TRAINING
# ----------------------------------------------------------------------------------------------------------

def check_args(a: Args) -> C.DataInfo:
    info = C.data_info(a.dataset)
    C.check_class(info, a.forget, "--forget class")
    if a.schedule not in ("bilevel", "two-stage", "distill-only"):
        raise C.UsageError(f"unknown --schedule {a.schedule!r}: use bilevel, two-stage or distill-only")
    if not 0 < a.keep <= 1:
        raise C.UsageError(f"--keep {a.keep} must be a share of the teacher's MACs in (0, 1], e.g. 0.55")
    if a.steps < 1 or a.upper_every < 1 or a.batch_size < 1 or a.esd_batch < 1:
        raise C.UsageError("--steps, --upper-every, --batch-size and --esd-batch must be positive")
    if a.reference and not os.path.exists(a.reference):
        raise C.UsageError(f"no reference metrics at {a.reference}: run --schedule distill-only first or drop --reference")
    return info


def train(a: Args, teacher, student, x_keep, y_keep, x_concept, dev):
    """The official schedule (BilevelUnetFineTuner.train): one set of student weights, two AdamW optimisers.
    Every iteration a lower step on L_ft; every K-th iteration also an upper step on L_CU with its own AdamW
    at lr_up_mult x lr. The paper writes the problem as min_theta max_vartheta L_CU(theta) + lam (L_ft(theta)
    - L_ft(vartheta)) with lam = 100 and K = 20 inner vartheta steps; L_ft(vartheta) does not depend on theta,
    so the theta-gradient is grad L_CU + lam grad L_ft: in effect alternating descent on the two losses
    with a fixed balance. The code replaces lam by the lr ratio (5x) and the frequency (K = 10); we follow it."""
    vp, tok = C.VP(), teacher.tok
    params = list(student.parameters())
    opt_low = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt_up = torch.optim.AdamW(params, lr=a.lr * a.lr_up_mult, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    c_star = torch.full((a.batch_size,), a.forget, device=dev)
    log, n_up = [], 0
    bar = tqdm(range(a.steps), desc=f"{a.schedule} (keep {a.keep:.2f})")
    for step in bar:
        idx = torch.randint(len(x_keep), (a.batch_size,))
        c = y_keep[idx].clone()
        c[torch.rand(len(c)) < a.p_null] = tok["null"]
        for g in opt_low.param_groups:   # constant with warm-up, as the official scheduler
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        l_ft = lower_loss(student, teacher, x_keep[idx].to(dev), c.to(dev), vp, a)
        opt_low.zero_grad(set_to_none=True)
        l_ft.backward()
        opt_low.step()
        rec = {"step": step + 1, "l_ft": l_ft.item()}
        if a.schedule == "bilevel" and (step + 1) % a.upper_every == 0:
            n_up += 1
            for g in opt_up.param_groups:
                g["lr"] = a.lr * a.lr_up_mult * min(1.0, n_up / max(1, a.warmup // a.upper_every))
            x0 = x_concept[torch.randint(len(x_concept), (a.batch_size,))].to(dev)
            l_cu = upper_loss(student, teacher, x0, c_star, vp, a.eta)
            opt_up.zero_grad(set_to_none=True)
            l_cu.backward()
            opt_up.step()
            rec["l_cu"] = l_cu.item()
        log.append(rec)
        if (step + 1) % 50 == 0:
            l_cus = [r["l_cu"] for r in log[-100:] if "l_cu" in r]
            bar.set_postfix(l_ft=f"{np.mean([r['l_ft'] for r in log[-50:]]):.4f}",
                            l_cu=f"{np.mean(l_cus):.4f}" if l_cus else "-")
    if a.schedule == "two-stage":
        log += esd(a, student, dev)
    return log


def esd(a: Args, student, dev, steps: int | None = None):
    """Stage 2 of the two-stage baseline (the official ESD trainer, 'xattn'): only cross-attention (attn2)
    weights move, Adam, target eps(null) - eta (eps(c*) - eps(null)) from a frozen copy of the fine-tuned
    student, x_t from the edited student's own partial samples. Same budget as the bilevel run: N / K steps
    at the upper lr."""
    vp, frozen = C.VP(), copy.deepcopy(student).eval().requires_grad_(False)
    params = [p for n, p in student.named_parameters() if ".attn2." in n]
    opt = torch.optim.Adam(params, lr=a.lr * a.lr_up_mult)
    c = torch.full((a.esd_batch,), a.forget, device=dev)
    log = []
    for step in tqdm(range(steps or max(1, a.steps // a.upper_every)), desc="ESD (two-stage)"):
        x_t, t = esd_partial_sample(student, vp, c)
        student.train()
        loss = F.mse_loss(student(x_t, t, c), negative_guidance_target(frozen, x_t, t, c, a.eta))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"esd_step": step + 1, "l_cu": loss.item()})
    return log


# ----------------------------------------------------------------------------------------------------------
# EVALUATION
# ----------------------------------------------------------------------------------------------------------

def evaluate(model, clf, a: Args):
    """E.evaluate_model plus the CPU time of this process (a sampling-speed figure robust to other processes)."""
    p0 = time.process_time()
    m, x, c = E.evaluate_model(model, clf, [a.forget], a.n_per_class, "ddim", a.sample_steps, 1.0, a.seed, a.data_root)
    m["images_per_cpu_s"] = len(x) / (time.process_time() - p0)
    return m, x, c


def p_concept(clf, x, c, k: int) -> list:
    with torch.no_grad():
        return F.softmax(clf(x[c == k].to(next(clf.parameters()).device)), 1)[:, k].cpu().tolist()


def main(a: Args):
    info = check_args(a)
    dev = C.pick_device(a.device)
    tag = a.tag or f"{a.schedule}-s{a.seed}"
    out = C.run_dir("bilevel_prune", a.dataset, tag)
    ref_path = a.reference or str(C.run_dir("bilevel_prune", a.dataset, f"ref-s{a.seed}") / "metrics.json")
    teacher = C.load_base(a.dataset, dev, root=a.data_root).eval().requires_grad_(False)
    clf = E.load_classifier(a.dataset, a.data_root, dev)
    C.seed_everything(a.seed)
    plan = prune_plan(teacher, a.keep)          # raises a UsageError for an unreachable --keep, before any work
    student = apply_plan(teacher, plan).train().requires_grad_(True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(a), indent=2) + "\n")
    x, y = C.load_data(a.dataset, a.data_root, "train")
    x_keep, y_keep, x_concept = x[y != a.forget], y[y != a.forget], x[y == a.forget]
    macs_t, macs_s = count_macs(teacher)[0], count_macs(student)[0]
    print(f"teacher {C.n_params(teacher) / 1e6:.3f}M params {macs_t / 1e6:.2f}M MACs -> student "
          f"{C.n_params(student) / 1e6:.3f}M params {macs_s / 1e6:.2f}M MACs ({macs_s / macs_t:.1%}); "
          f"kept units per layer: {[len(v) for v in plan.values()]}")

    t0, p0 = time.time(), time.process_time()
    log = train(a, teacher, student, x_keep, y_keep, x_concept, dev)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - p0
    student.eval().requires_grad_(False)
    save_student(out / "model.pt", student, a.steps, seconds=seconds)

    m_base, xb, cb = evaluate(teacher, clf, a)
    m, xs, cs = evaluate(student, clf, a)
    pc = p_concept(clf, xs, cs, a.forget)
    res = {k: m[k] for k in ("forget_rate", "retain_acc", "fid_retain", "is", "class_acc")}
    res.update({f"base_{k}": m_base[k] for k in ("forget_rate", "retain_acc", "fid_retain", "is")})
    res.update(seconds=seconds, cpu_seconds=cpu_seconds, schedule=a.schedule, keep=a.keep,
               params_teacher=C.n_params(teacher), params_student=C.n_params(student),
               params_ratio=C.n_params(student) / C.n_params(teacher), macs_teacher=macs_t, macs_student=macs_s,
               macs_ratio=macs_s / macs_t, images_per_s_teacher=m_base["images_per_s"],
               images_per_s_student=m["images_per_s"], speedup=m["images_per_s"] / m_base["images_per_s"],
               speedup_cpu=m["images_per_cpu_s"] / m_base["images_per_cpu_s"], p_concept_mean=float(np.mean(pc)),
               base_p_concept_mean=float(np.mean(p_concept(clf, xb, cb, a.forget))),
               l_ft_final=float(np.mean([r["l_ft"] for r in log if "l_ft" in r][-50:])),
               cp_score=None, p_concept=pc)
    if os.path.exists(ref_path) and a.schedule != "distill-only":
        ref = json.loads(open(ref_path).read())
        if ref.get("p_concept") and len(ref["p_concept"]) == len(pc):   # same seeds: same n_per_class and seed
            res["cp_score"] = float(np.mean(np.array(pc) < np.array(ref["p_concept"])))
            res["cp_reference"] = ref_path
    C.save_grid(torch.cat([xb, xs]).view(2, info.num_classes, a.n_per_class, *xs.shape[1:])[:, :, :10].flatten(0, 2),
                out / "samples.png", nrow=10, highlight_rows=(a.forget, info.num_classes + a.forget))
    print(f"\nsamples: {out / 'samples.png'} (teacher rows 0-{info.num_classes - 1}, student below; "
          f"class {a.forget} framed){'' if res['cp_score'] is not None else f'; no CP score: no reference at {ref_path}'}")
    rows = {"teacher": {**{k[5:]: v for k, v in res.items() if k.startswith("base_")},
                        "params": res["params_teacher"], "MACs": macs_t, "img/s": res["images_per_s_teacher"]},
            f"student ({a.schedule})": {**res, "params": res["params_student"], "MACs": macs_s,
                                        "img/s": res["images_per_s_student"]}}
    print(E.table(rows, ["forget_rate", "retain_acc", "fid_retain", "p_concept_mean", "cp_score", "params", "MACs", "img/s"]))
    E.report(res, out / "metrics.json")
    return res


if __name__ == "__main__":
    C.cli(main, Args)
