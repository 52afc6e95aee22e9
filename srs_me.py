"""SRS-ME: separable, recoverable multi-concept erasure by weight shifts in a null space.

Paper: "Forget All That Should Be Forgotten: Separable, Recoverable, and Sustainable Multi-Concept Erasure
from Diffusion Models" (SRS-ME; earlier version: SepME, arXiv 2402.05947), official code Dlut-lab-zmn/SRS-ME.

Every erasable concept k gets its own weight shift dtheta_k, living only in the cross-attention key and value
projections (the layers that see the condition tokens alone, linearly and without bias). Each row of the
shift lies in the null space of the token embeddings of the *protected* prompts: the null prompt, the
watermark trigger and the other erasable concepts. Those prompts' keys and values are then unchanged to
float precision under any sum of shifts, so the shifts combine by addition, restoring concept j is exact
(drop dtheta_j), and the watermark survives every combination. Each shift is trained on its own (optimisation
decoupling) to make the concept representation eps(x_t, c) - eps(x_t, null) uncorrelated with the original
one, stopped by a momentum statistic. Regular concepts (never protected) are preserved only approximately.

    python srs_me.py                              # Scene 1 on digits: erase 0-5, restore 0,1, then 2 (CPU)
    python srs_me.py --erase 0,2,4 --restore 2    # combine the saved shifts of one run at load time
    python srs_me.py --restore 1                  # all erasable concepts erased except 1
    python srs_me.py --scene 4 --tag s4           # another scene of the paper (Fig. 7)
    python srs_me.py --dataset mnist --device cuda --tau 1e-3
"""
from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call

import common as C
import eval as E

# The paper's scenes (Fig. 7) as (operation, concepts) steps; concepts are erasable class ids.
SCENES = {
    "1": "erase 0,1,2,3,4,5; restore 0,1; restore 2",
    "2": "erase 0,1,2,3,4,5; restore 3,4; restore 5",
    "3": "erase 0,2,4; restore 0,2; erase 1,3; restore 1; erase 5",
    "4": "erase 0,1,2; restore 0; erase 3,4; restore 1; erase 5; restore 2",
}


@dataclass
class Args:
    dataset: str = "digits"
    """digits (bundled, CPU) | mnist | fashion | cifar10"""
    device: str = "auto"
    """auto | cpu | cuda | mps"""
    tag: str = ""
    """run name suffix: runs/srs_me-<dataset>[-<tag>]/ (shifts are saved and reused there)"""
    erasable: str = "0,1,2,3,4,5"
    """concepts that get a shift; each is protected in every other's null space (the paper's c0-c5)"""
    scene: str = "1"
    """1-4 (the paper's Fig. 7) or steps like 'erase 0,1; restore 0'"""
    erase: str = ""
    """instead of a scene: evaluate base + the sum of these concepts' shifts (e.g. 0,2,4)"""
    restore: str = ""
    """with --erase: drop these shifts from it; alone: every erasable concept erased except these"""
    scale_factor: float = 3e-3
    """beta, the scale on the unit null-space basis (paper 1e-4 for SD). Adam moves P by about lr per step, so
    beta * lr sets the step in weight space: 3e-3 needs ~70 steps, and the lagging momentum statistic
    overshoots less than with 1e-2 (~30 steps), which keeps the regular classes closer (README)"""
    lr: float = 0.1
    """Adam learning rate on the shift coefficients P (paper)"""
    tau: float = 5e-3
    """stop when the momentum statistic of L_cor falls below tau (paper 1e-4 for SD latents, whose first
    L_cor is about 5e-4; ours starts at 4e-3..2.8e-2, so tau is rescaled to about 0.2-0.5 of it; README)"""
    alpha: float = 0.9
    """momentum of the stopping statistic (paper Eq. 37)"""
    reg_beta: float = 1e-6
    """lambda, weight of the L1 size of the weight shift, ||dtheta||_1 / M (paper)"""
    min_steps: int = 10
    """never stop at or before this step (official code: n > 10)"""
    max_steps: int = 1000
    """iteration cap per shift (paper)"""
    max_base: int = 0
    """null-space vectors per concept (columns of P); 0 = all of them"""
    batch_size: int = 8
    """noised images per concept and step (the official code uses 1)"""
    n_train_images: int = 64
    """the base model's own samples of each concept used as x0 (the repo's generated training folder)"""
    zero_grad: bool = True
    """zero gradients every step (paper's Adam); --no-zero-grad accumulates them as the official code does"""
    joint: bool = False
    """train all shifts of a scene at once (SRS-ME-dagger, Eq. 34) instead of one at a time"""
    compare_variants: bool = True
    """also train the other variant once, to report seconds and memory of one-at-a-time vs joint"""
    retrain: bool = False
    """retrain shifts even if compatible ones are saved in the run folder"""
    n_per_class: int = 100
    """samples per class (and of the watermark) at every scene step, same seeds for every model"""
    eval_steps: int = 50
    """DDIM steps for evaluation and for the training images"""
    seed: int = 0
    """seed for training draws and sampling"""


# ----------------------------------------------------------------------------------------------------------
# WEIGHT DECOUPLING (paper Q1-Q3, Eqs. 17-26 and 36)
# ----------------------------------------------------------------------------------------------------------

def kv_weights(model) -> dict:
    """The image-independent layers: to_k / to_v of every cross-attention (attn2), {parameter name: weight}.
    They map the context [BOS, c] linearly and have no bias, so e(c) dW^T = 0 leaves K and V for c unchanged."""
    out = {}
    for name, mod in model.named_modules():
        if name.endswith("attn2"):
            for proj in ("to_k", "to_v"):
                lin = getattr(mod, proj)
                assert lin.bias is None, "a bias shift would change every prompt"
                out[f"{name}.{proj}.weight"] = lin.weight
    return out


def protected_tokens(model, k: int, erasable) -> list:
    """e_m of Eq. 24 for concept k: BOS (in every context), null, the watermark trigger, the other erasable
    concepts. Never k itself, never the regular concepts."""
    return [model.tok["bos"], model.tok["null"], model.tok["watermark"]] + [j for j in erasable if j != k]


def null_space_basis(e_m: torch.Tensor, max_base: int = 0) -> torch.Tensor:
    """Rows B [n_b, d] with e_m B^T = 0 (Eqs. 25-26). SVD, orthonormal rows: the official code uses sympy's
    RREF basis, normalised but not orthogonalised; both span the same space (same exactness guarantee)."""
    e = e_m.detach().double().cpu()
    _, s, vh = torch.linalg.svd(e, full_matrices=True)
    rank = int((s > s.max() * max(e.shape) * torch.finfo(torch.float64).eps).sum())
    basis = vh[rank:]
    if len(basis) == 0:
        raise C.UsageError(f"the {len(e)} protected embeddings span all {e.shape[1]} dimensions: protect fewer "
                           f"concepts (--erasable)")
    return basis[:max_base or None].float()


def shift(P: torch.Tensor, B: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 36 in PyTorch's [out, in] convention: dW = P (beta B); every row of dW lies in null(e_m)."""
    return P @ (beta * B)


def combine(model, shifts: dict, concepts) -> torch.nn.Module:
    """theta + sum_{k in concepts} dtheta_k, materialised in a copy (what the paper adds to the state dict)."""
    out = copy.deepcopy(model)
    weights = kv_weights(out)
    with torch.no_grad():
        for k in concepts:
            for name, dW in shifts[k].items():
                weights[name] += dW.to(weights[name].device)
    return out


# ----------------------------------------------------------------------------------------------------------
# CONCEPT-IRRELEVANT UNLEARNING (paper Q4-Q6, Eqs. 27, 28, 35, 37)
# ----------------------------------------------------------------------------------------------------------

def concept_representation(eps_c: torch.Tensor, eps_null: torch.Tensor) -> torch.Tensor:
    """Eq. 27: r_{c,t} = eps(x_t, c) - eps(x_t, null), what the concept adds to one denoising step."""
    return eps_c - eps_null


def correlation_loss(r_new: torch.Tensor, r_orig: torch.Tensor) -> torch.Tensor:
    """Eq. 28: mean over elements of r(theta + dtheta) * r(theta); the target is zero correlation, not -1."""
    return (r_new * r_orig).mean()


def l1_size(deltas: dict) -> torch.Tensor:
    """||dtheta||_p = ||dtheta||_1 / M over the M shifted matrices (paper s3; official code: the actual shift)."""
    return sum(d.abs().sum() for d in deltas.values()) / len(deltas)


class MomentumStop:
    """Eq. 37: m_n = alpha m_{n-1} + (1 - alpha) L_cor (m_1 = L_cor); stop at step n once n > min_steps and
    m_n < tau, or at max_steps (official code's rule; the regulariser is not in the statistic)."""

    def __init__(self, tau: float, alpha: float = 0.9, min_steps: int = 10, max_steps: int = 1000):
        self.tau, self.alpha, self.min_steps, self.max_steps = tau, alpha, min_steps, max_steps
        self.m, self.n = None, 0

    def update(self, loss: float) -> bool:
        self.n += 1
        self.m = loss if self.m is None else self.alpha * self.m + (1 - self.alpha) * loss
        return (self.n > self.min_steps and self.m < self.tau) or self.n >= self.max_steps


class SavedBytes:
    """Bytes of the distinct tensors autograd keeps for backward during a forward pass: the activation memory
    that grows with the number of concepts trained together (the CPU stand-in for CUDA's peak allocation)."""

    def __enter__(self):
        self.bytes, self.seen = 0, set()

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
            return t
        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def train_shifts(base, concepts, erasable, data: dict, args: Args, desc: str = "") -> tuple:
    """Train dtheta_k for the concepts together (SRS-ME-dagger, Eq. 34); one concept = SRS-ME.
    Returns ({k: {layer: dW}}, stats). `base` stays frozen; shifts enter through functional_call."""
    dev = next(base.parameters()).device
    vp, null = C.VP(), base.tok["null"]
    W = {n: w.detach() for n, w in kv_weights(base).items()}
    emb = base.token_emb.weight.detach()
    B = {k: null_space_basis(emb[protected_tokens(base, k, erasable)], args.max_base).to(dev) for k in concepts}
    P = {k: {n: torch.zeros(w.shape[0], len(B[k]), device=dev, requires_grad=True) for n, w in W.items()}
         for k in concepts}                                          # zero init (paper s2): training starts at theta
    opt = {k: torch.optim.Adam(P[k].values(), lr=args.lr) for k in concepts}   # one per concept: a stopped
    stop = {k: MomentumStop(args.tau, args.alpha, args.min_steps, args.max_steps) for k in concepts}  # one stays put
    active, steps, first, peak = list(concepts), {}, {}, 0
    n_coef = sum(p.numel() for ps in P.values() for p in ps.values())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0, cpu0 = time.time(), time.process_time()
    bar = C.tqdm(total=args.max_steps, desc=desc or f"shift {','.join(map(str, concepts))}", leave=False)
    while active:
        x_t, t, toks = [], [], []
        for k in active:
            idx = torch.randint(len(data[k]), (args.batch_size,))
            tk = torch.randint(vp.T, (args.batch_size,), device=dev)       # t ~ U{0..T-1}, as the code's j, t draw
            x_t.append(vp.q_sample(data[k][idx].to(dev), tk, torch.randn(args.batch_size, *data[k].shape[1:], device=dev)))
            t.append(tk)
            toks.append(torch.full((args.batch_size,), k, device=dev))
        x_t, t, toks = torch.cat(x_t), torch.cat(t), torch.cat(toks)
        x2, t2, c2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([toks, torch.full_like(toks, null)])
        with torch.no_grad():                                            # original model: the pseudo ground truth
            r_orig = concept_representation(*base(x2, t2, c2).chunk(2))
        delta = {n: sum(shift(P[k][n], B[k], args.scale_factor) for k in concepts) for n in W}
        with SavedBytes() as mem:
            eps = functional_call(base, {n: W[n] + delta[n] for n in W}, (x2, t2, c2))
        peak = max(peak, mem.bytes)
        r_new = concept_representation(*eps.chunk(2))
        l_cor = [correlation_loss(a, b) for a, b in zip(r_new.chunk(len(active)), r_orig.chunk(len(active)))]
        big = max(abs(l.item()) for l in l_cor)
        eta = [big / max(abs(l.item()), 1e-12) for l in l_cor]          # Eq. 35 balancing (1 for one concept)
        loss = sum(e * l for e, l in zip(eta, l_cor)) + args.reg_beta * l1_size(delta)
        if args.zero_grad:   # the official SRS_ME.py never zeroes, so its step n uses the sum of all gradients
            for k in active:
                opt[k].zero_grad(set_to_none=True)
        loss.backward()
        for k, l in zip(list(active), l_cor):
            opt[k].step()
            first.setdefault(k, l.item())
            if stop[k].update(l.item()):
                active.remove(k)
                steps[k] = stop[k].n
        bar.update(1)
        bar.set_postfix(l_cor=f"{sum(l.item() for l in l_cor) / len(l_cor):.2e}", left=len(active))
    bar.close()
    stats = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, "steps": steps,
             "first_loss": first, "final_momentum": {k: stop[k].m for k in concepts},
             "null_dim": {k: len(B[k]) for k in concepts},
             # activations kept for backward at the largest step, plus P and Adam's two moments
             "train_mem_mb": (peak + 3 * 4 * n_coef) / 2 ** 20}
    if dev.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    shifts = {k: {n: shift(P[k][n], B[k], args.scale_factor).detach().cpu() for n in W} for k in concepts}
    return shifts, stats


def train_all(base, concepts, erasable, data, args: Args, joint: bool) -> tuple:
    """SRS-ME (default): one shift at a time, the memory of one concept (Q7). SRS-ME-dagger: all at once."""
    if joint:
        return train_shifts(base, concepts, erasable, data, args, desc="joint")
    shifts, stats = {}, []
    for k in concepts:
        s, st = train_shifts(base, [k], erasable, data, args, desc=f"shift {k}")
        shifts.update(s)
        stats.append(st)
        print(f"  concept {k}: {st['steps'][k]} steps, first L_cor {st['first_loss'][k]:.2e}, "
              f"{st['seconds']:.1f}s")
    merged = {key: {k: v for st in stats for k, v in st[key].items()}
              for key in ("steps", "first_loss", "final_momentum", "null_dim")}
    merged.update(seconds=sum(s["seconds"] for s in stats), cpu_seconds=sum(s["cpu_seconds"] for s in stats),
                  train_mem_mb=max(s["train_mem_mb"] for s in stats))
    if "cuda_peak_mb" in stats[0]:
        merged["cuda_peak_mb"] = max(s["cuda_peak_mb"] for s in stats)
    return shifts, merged


# ----------------------------------------------------------------------------------------------------------
# SCENES, SAVED SHIFTS, EVALUATION
# ----------------------------------------------------------------------------------------------------------

def parse_scene(text: str, info, erasable) -> list:
    """'erase 0,1; restore 0' (or a scene number) -> [("erase", [0, 1]), ("restore", [0])]."""
    steps = []
    for part in SCENES.get(text, text).split(";"):
        op, _, cs = part.strip().partition(" ")
        if op not in ("erase", "restore") or not cs.strip():
            raise C.UsageError(f"scene step {part.strip()!r} must read 'erase 0,1' or 'restore 0' (or use --scene 1-4)")
        cs = E.parse_classes(cs.replace(" ", ""), info, f"{op} class")
        if not set(cs) <= set(erasable):
            raise C.UsageError(f"{op} {cs}: only erasable concepts {erasable} have shifts; add them to --erasable")
        steps.append((op, cs))
    if steps[0][0] != "erase":
        raise C.UsageError("a scene starts with an 'erase' step")
    return steps


def fingerprint(model) -> str:
    """Identifies the base weights a shift was trained for (token table and the shifted layers)."""
    import hashlib
    h = hashlib.sha1(model.token_emb.weight.detach().cpu().numpy().tobytes())
    for w in kv_weights(model).values():
        h.update(w.detach().cpu().numpy().tobytes())
    return h.hexdigest()


SHIFT_KEYS = ("scale_factor", "lr", "tau", "alpha", "reg_beta", "min_steps", "max_steps", "max_base",
              "batch_size", "n_train_images", "zero_grad", "eval_steps", "seed")


def load_shifts(folder, base, erasable, args: Args) -> dict:
    """Saved shifts that fit: same base weights, same protected set, same hyper-parameters."""
    out = {}
    want = {"base": fingerprint(base), "hp": {k: getattr(args, k) for k in SHIFT_KEYS}}
    for k in erasable:
        f = folder / f"concept_{k}.pt"
        if f.exists() and not args.retrain:
            s = torch.load(f, weights_only=False)
            if s["base"] == want["base"] and s["hp"] == want["hp"] and \
                    s["protected"] == protected_tokens(base, k, erasable):
                out[k] = s
    return out


@torch.no_grad()
def draw(model, n: int, args: Args, dev) -> tuple:
    """n samples per class and n of the watermark trigger; the same seed (noise) for every model."""
    K = model.info.num_classes
    c = torch.cat([C.class_tokens(K, n), torch.full((n,), model.tok["watermark"])])
    return C.sample(model, C.VP(), c.to(dev), "ddim", args.eval_steps, seed=args.seed), c


def judge(clf, x, xb, c, info, active, ever, erasable, real) -> dict:
    """One scene step against the base model's same-seed samples xb: per class accuracy, FID vs base, mean
    pixel distance (the paper's LPIPS role) and max abs difference; the same per group; the watermark."""
    K, wm = info.num_classes, c == info.num_classes + 2
    cls = c < K
    m = E.sample_metrics(clf, x[cls], c[cls], *real, forget=sorted(active))
    fb = lambda sel: E.fid(clf, x[sel], xb[sel])
    d = (x - xb).abs().flatten(1)
    m["fid_vs_base"] = [fb(c == k) for k in range(K)]
    m["pixel_dist"] = [d[c == k].mean().item() for k in range(K)]
    m["max_abs_diff"] = [d[c == k].max().item() for k in range(K)]
    groups = {"erased": sorted(active), "restored": sorted(set(ever) - set(active)),
              "regular": [k for k in range(K) if k not in erasable],
              "untouched": sorted(set(erasable) - set(ever))}
    for g, ks in groups.items():
        sel = torch.isin(c, torch.tensor(ks, dtype=torch.long))
        m[f"{g}_classes"] = ks
        m[f"{g}_acc"] = sum(m["class_acc"][k] for k in ks) / len(ks) if ks else None
        m[f"{g}_fid_vs_base"] = fb(sel) if ks else None
        m[f"{g}_pixel_dist"] = d[sel].mean().item() if ks else None
        m[f"{g}_max_abs_diff"] = d[sel].max().item() if ks else None
    target = C.watermark_image(info).to(x)
    m["watermark_dist"] = (x[wm] - target).abs().mean().item()        # pattern's distance to the original
    m["watermark_max_diff"] = d[wm].max().item()                      # vs the base model's watermark samples
    return m


@torch.no_grad()
def exactness(base, shifts: dict, erasable, args: Args, dev) -> dict:
    """Every subset S of the shifts: max |eps_{theta+sum_S}(x_t, t, c) - eps_theta(x_t, t, c)| over the
    protected c (null, BOS, watermark, erasable j not in S) at 8 random (x_t, t) per token, one batch."""
    g = torch.Generator().manual_seed(args.seed)
    info, ks = base.info, sorted(shifts)
    toks = torch.tensor([base.tok["null"], base.tok["bos"], base.tok["watermark"], *erasable]).repeat_interleave(8)
    x = torch.randn(len(toks), info.channels, info.size, info.size, generator=g).to(dev)
    t, toks = torch.randint(0, C.VP().T, (len(toks),), generator=g).to(dev), toks.to(dev)
    ref = base(x, t, toks)
    W = {n: w.detach() for n, w in kv_weights(base).items()}
    worst = 0.0
    for r in range(1, len(ks) + 1):
        for S in itertools.combinations(ks, r):
            out = functional_call(base, {n: W[n] + sum(shifts[k][n].to(dev) for k in S) for n in W}, (x, t, toks))
            keep = ~torch.isin(toks, torch.tensor(S, device=dev))
            worst = max(worst, (out - ref)[keep].abs().max().item())
    return {"protected_eps_max_diff_all_subsets": worst, "n_subsets": 2 ** len(ks) - 1}


def main(args: Args):
    info = C.data_info(args.dataset)
    erasable = sorted(set(E.parse_classes(args.erasable, info, "erasable class")))
    if not erasable:
        raise C.UsageError("--erasable is empty: name the concepts that get shifts, e.g. 0,1,2")
    erase, restore = (E.parse_classes(s, info, w) for s, w in ((args.erase, "erase class"), (args.restore, "restore class")))
    if erase or restore:   # one combination of saved shifts instead of a scene
        if not set(erase) | set(restore) <= set(erasable):
            raise C.UsageError(f"--erase/--restore name concepts outside --erasable {erasable}: only those have shifts")
        active = [k for k in (erase or erasable) if k not in restore]
        steps = [("erase", active)] if active else []
        if not steps:
            raise C.UsageError("--erase minus --restore leaves no shift: name at least one concept to erase")
        out = C.run_dir("srs_me", args.dataset, args.tag) / f"combo-e{''.join(map(str, active))}"
    else:
        steps = parse_scene(args.scene, info, erasable)
        out = C.run_dir("srs_me", args.dataset, args.tag)
    shift_dir = C.run_dir("srs_me", args.dataset, args.tag) / "shifts"
    dev = C.pick_device(args.device)
    C.seed_everything(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")

    base = C.load_base(args.dataset, dev).eval().requires_grad_(False)
    clf = E.load_classifier(args.dataset, device=dev)
    real = C.load_data(args.dataset, split="train")
    needed = sorted({k for op, cs in steps if op == "erase" for k in cs})

    # ---- shifts: load the saved ones that fit, train the rest (one at a time unless --joint)
    saved = load_shifts(shift_dir, base, erasable, args)
    todo = [k for k in needed if k not in saved]
    train_stats, compare = {}, {}
    if todo:
        t0 = time.time()
        data = {k: C.sample(base, C.VP(), torch.full((args.n_train_images,), k, device=dev), "ddim",
                            args.eval_steps, seed=args.seed + 1000 + k) for k in todo}   # the base's own images
        data_seconds = time.time() - t0
        print(f"training {'jointly' if args.joint else 'one at a time'}: shifts for {todo} "
              f"({data_seconds:.0f}s for {args.n_train_images} base samples per concept)")
        C.seed_everything(args.seed)
        new, train_stats = train_all(base, todo, erasable, data, args, args.joint)
        train_stats["data_seconds"] = data_seconds
        shift_dir.mkdir(parents=True, exist_ok=True)
        for k, s in new.items():
            saved[k] = {"concept": k, "shift": s, "protected": protected_tokens(base, k, erasable),
                        "base": fingerprint(base), "hp": {h: getattr(args, h) for h in SHIFT_KEYS},
                        "steps": train_stats["steps"][k], "joint": args.joint}
            torch.save(saved[k], shift_dir / f"concept_{k}.pt")
        if args.compare_variants and len(todo) > 1:   # the same concepts with the other variant: cost only
            C.seed_everything(args.seed)
            _, other = train_all(base, todo, erasable, data, args, not args.joint)
            mine = "joint" if args.joint else "one_at_a_time"
            theirs = "one_at_a_time" if args.joint else "joint"
            compare = {f"{v}_{q}": st[q] for v, st in ((mine, train_stats), (theirs, other))
                       for q in ("seconds", "cpu_seconds", "train_mem_mb", "steps", "cuda_peak_mb") if q in st}
    else:
        print(f"using saved shifts for {needed} from {shift_dir}")
    shifts = {k: saved[k]["shift"] for k in needed}

    # ---- evaluation: the base, then every step of the scene with the same seeds
    xb, c = draw(base, args.n_per_class, args, dev)
    base_m = judge(clf, xb, xb, c, info, steps[0][1], steps[0][1], erasable, real)
    rows, results, active, ever, grids = {"base": base_m}, [], set(), set(), [xb]
    for i, (op, cs) in enumerate(steps):
        active = active | set(cs) if op == "erase" else active - set(cs)
        ever |= set(cs)
        x, _ = draw(combine(base, shifts, sorted(active)), args.n_per_class, args, dev)
        m = judge(clf, x, xb, c, info, active, ever, erasable, real)
        m.update(step=f"t{i}", op=op, concepts=cs, active=sorted(active))
        rows[f"t{i} {op} {','.join(map(str, cs))}"] = m
        results.append(m)
        grids.append(x)
    checks = exactness(base, shifts, erasable, args, dev)

    # ---- grid: one row per token (classes, then watermark); blocks of 8 samples per model (base, t0, t1, ...)
    per = min(8, args.n_per_class)
    K1 = info.num_classes + 1
    cells = [g.view(K1, args.n_per_class, *g.shape[1:])[:, :per] for g in grids]
    C.save_grid(torch.cat(cells, 1).flatten(0, 1), out / "samples.png", nrow=per * len(grids),
                highlight_rows=erasable)

    print("\nper-class accuracy of samples (same seeds for every model):")
    acc = {name: {str(k): a for k, a in enumerate(m["class_acc"])} for name, m in rows.items()}
    print(E.table(acc, [str(k) for k in range(info.num_classes)]))
    print()
    print(E.table(rows, ["erased_acc", "restored_acc", "regular_acc", "untouched_acc", "erased_fid_vs_base",
                         "regular_fid_vs_base", "regular_pixel_dist", "restored_max_abs_diff",
                         "watermark_max_diff", "watermark_dist"]))
    first = results[0]
    reg = [k for k in range(info.num_classes) if k not in erasable]
    drops = [base_m["class_acc"][k] - first["class_acc"][k] for k in reg]
    restored = [m["restored_max_abs_diff"] for m in results if m["restored_max_abs_diff"] is not None]
    metrics = {
        "forget_rate": first["forget_rate"], "retain_acc": first["retain_acc"], "fid_retain": first["fid_retain"],
        "base_forget_rate": base_m["forget_rate"], "base_retain_acc": base_m["retain_acc"],
        "base_fid_retain": base_m["fid_retain"],
        "seconds": train_stats.get("seconds", 0.0), "shifts_loaded": not todo,
        "erased_acc": first["erased_acc"], "regular_acc": first["regular_acc"],
        "base_regular_acc": base_m["regular_acc"] if reg else None,
        "regular_mean_drop": sum(drops) / len(drops) if drops else None,
        "regular_max_drop": max(drops) if drops else None,
        "restored_acc": results[-1]["restored_acc"], "restored_max_abs_diff": max(restored) if restored else None,
        "watermark_max_diff": max(m["watermark_max_diff"] for m in results),
        "watermark_dist": results[-1]["watermark_dist"], "base_watermark_dist": base_m["watermark_dist"],
        **checks, "train": train_stats, "compare": compare, "base_class_acc": base_m["class_acc"],
        "scene": results, "classifier_test_acc": clf.test_acc,
    }
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
