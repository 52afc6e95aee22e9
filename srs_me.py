"""SRS-ME: separable, recoverable multi-concept erasure by weight shifts in a null space.

Paper: "Forget All That Should Be Forgotten: Separable, Recoverable, and Sustainable Multi-Concept Erasure
from Diffusion Models" (SRS-ME; earlier version: SepME, arXiv 2402.05947), official code Dlut-lab-zmn/SRS-ME.

Each erasable concept k gets its own shift of the cross-attention key/value projections (they see the condition
tokens alone, linearly, without bias), every row in the null space of the embeddings e_m of the protected
prompts (null, watermark trigger, the other erasable concepts):

    dW_k = P_k (beta B_k),  e_m(k) B_k^T = 0                               (Eqs. 25-26, 36)
    r_c(theta) = eps_theta(x_t, c) - eps_theta(x_t, null)                   (Eq. 27)
    min_P mean(r_k(theta + dW_k) * r_k(theta)) + lambda ||dW_k||_1 / M      (Eq. 28), stop by Eq. 37

Protected prompts keep their keys and values under any sum of shifts: erasing S is theta + sum_{k in S} dW_k,
restoring j drops dW_j exactly, the watermark survives every combination, the shifts train one at a time
(optimisation decoupling); regular concepts (unprotected) are kept only approximately. `load_model(run folder)`
reads back base + the erased shifts (shifts/ and model.safetensors).

    python srs_me.py                              # Scene 1 on digits: erase 0-5, restore 0,1, then 2 (CPU)
    python srs_me.py --erase 3                    # erase one concept (the other erasable ones stay protected)
    python srs_me.py --erase 0,2,4 --restore 2    # combine the run folder's saved shifts, no retraining
    python srs_me.py --scene 4 --tag s4           # another scene of the paper (Fig. 7)
    python srs_me.py --dataset mnist --device cuda --amp
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

import common as C
import eval as E

# The paper's scenes (Fig. 7) as (operation, concepts) steps; concepts are erasable class ids.
SCENES = {"1": "erase 0,1,2,3,4,5; restore 0,1; restore 2", "2": "erase 0,1,2,3,4,5; restore 3,4; restore 5",
          "3": "erase 0,2,4; restore 0,2; erase 1,3; restore 1; erase 5",
          "4": "erase 0,1,2; restore 0; erase 3,4; restore 1; erase 5; restore 2"}


@dataclass
class Args(C.RunArgs):
    erasable: str = "0,1,2,3,4,5"
    """concepts that get a shift; each is protected in every other's null space (the paper's c0-c5)"""
    scene: str = "1"
    """1-4 (the paper's Fig. 7) or steps like 'erase 0,1; restore 0'"""
    protect: str = ""
    """regular concepts to keep exact too, in every null space (official --em_indexes; the paper protects none)"""
    erase: str = ""
    """instead of a scene: evaluate base + the sum of these concepts' shifts (e.g. 0,2,4)"""
    restore: str = ""
    """with --erase: drop these shifts from it; alone: every erasable concept erased except these"""
    scale_factor: float = 1e-2
    """beta, the scale on the unit null-space basis (paper 1e-4 for SD); beta * lr sets Adam's step in weight space"""
    lr: float = 0.1
    """Adam learning rate on the shift coefficients P (paper)"""
    tau: float = -0.1
    """stop once the momentum statistic of L_cor(theta + dW) / L_cor(theta) is below tau (paper: L_cor < 1e-4, near
    0; digits' null token draws each digit ~10% of the time, and only past 0 does the concept fall below that)"""
    alpha: float = 0.9
    """momentum of the stopping statistic (paper Eq. 37)"""
    reg_share: float = 1.0
    """lambda of the L1 size term, set at the first non-zero shift so that its gradient is this share of L_cor's
    (norms); the share kept over training is logged (paper: lambda 1e-6 for SD)"""
    min_steps: int = 10
    """never stop at or before this step (official code: n > 10)"""
    max_steps: int = 1000
    """iteration cap per shift (paper)"""
    max_base: int = 1024
    """at most this many null-space vectors per concept (columns of P); digits has 64 - 8 = 56, all kept"""
    batch_size: int = 16
    """noised images per concept and step, t stratified over them (the official code uses 1)"""
    n_train_images: int = 64
    """the base model's own samples of each concept used as x0 (the repo's generated training folder)"""
    zero_grad: bool = True
    """zero gradients every step (paper's Adam); --no-zero-grad accumulates them as the official code does"""
    joint: bool = False
    """train all shifts of a scene at once (SRS-ME-dagger, Eq. 34) instead of one at a time"""
    compare_variants: bool = True
    """after training, train the other variant once too, to report seconds and memory of both"""


# ----------------------------------------------------------------------------------------------------------
# THE METHOD'S MATH: weight decoupling (Q1-Q3, Eqs. 17-26, 36), concept-irrelevant unlearning (Q4-Q6, Eqs. 27-37)
# ----------------------------------------------------------------------------------------------------------

def null_space_basis(e_m: torch.Tensor, max_base: int, e_k=None) -> torch.Tensor:
    """Rows B [n_b, d] with e_m B^T = 0 (Eqs. 25-26), at most max_base, orthonormal (SVD). Given concept k's
    embedding e_k, row 0 is its projection into the null space, the rest orthogonal to it: L_cor's gradient on P is
    then in column 0 alone, Adam moves dW along e_k only (in another basis it spreads dW over all null directions,
    moving regular concepts without erasing k). Official SRSME_Solution.py: sympy's RREF basis, same span."""
    e = e_m.detach().double().cpu()
    _, s, vh = torch.linalg.svd(e, full_matrices=True)
    rank = int((s > s.max() * max(e.shape) * torch.finfo(torch.float64).eps).sum())
    if rank >= e.shape[1]:
        raise ValueError(f"the {len(e)} protected embeddings span all {e.shape[1]} dimensions: protect fewer "
                         f"concepts (--erasable, --protect)")
    B = vh[rank:]
    if e_k is not None:   # QR of [B e_k | I]: Q's first column is B e_k / |B e_k|
        u = B @ e_k.detach().double().cpu()
        B = torch.linalg.qr(torch.cat([u[:, None], torch.eye(len(u), dtype=u.dtype)], 1))[0].T @ B
    return B[:max_base].float()


def shift(P: torch.Tensor, B: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 36 in PyTorch's [out, in] convention: dW = P (beta B); every row of dW lies in null(e_m)."""
    return P @ (beta * B)


def concept_representation(eps_c: torch.Tensor, eps_null: torch.Tensor) -> torch.Tensor:
    """Eq. 27: r_{c,t} = eps(x_t, c) - eps(x_t, null), what the concept adds to one denoising step."""
    return eps_c - eps_null


def correlation_loss(r_new: torch.Tensor, r_orig: torch.Tensor) -> torch.Tensor:
    """Eq. 28: mean over elements of r(theta + dtheta) * r(theta); the target is zero correlation, not -1."""
    return (r_new * r_orig).mean()


def relative_correlation(r_new: torch.Tensor, r_orig: torch.Tensor) -> torch.Tensor:
    """L_cor(theta + dtheta) / L_cor(theta) on the same noised images (Eq. 28 relative to its start, 1 for every
    concept; free of the batch-to-batch swings of |r|): the statistic our stopping rule watches."""
    return correlation_loss(r_new, r_orig) / correlation_loss(r_orig, r_orig)


def stratified_t(n_groups: int, n: int, T: int, device) -> torch.Tensor:
    """Per group of n images, one t in each of n equal slices of {0..T-1} (official SRS_ME.py: t ~ U{0..T-1})."""
    u = torch.arange(n_groups * n, device=device) % n + torch.rand(n_groups * n, device=device)
    return (u * T / n).long()


def l1_size(deltas: dict) -> torch.Tensor:
    """||dtheta||_p = ||dtheta||_1 / M over the M shifted matrices (paper's s3; official SRS_ME.py: of P beta B)."""
    return sum(d.abs().sum() for d in deltas.values()) / len(deltas)


def momentum_statistic(m_prev, l_cor, alpha: float):
    """Eq. 37: m_n = alpha m_{n-1} + (1 - alpha) L_cor, starting at m_1 = L_cor (official SRS_ME.py)."""
    return l_cor if m_prev is None else alpha * m_prev + (1 - alpha) * l_cor


def balancing_weights(l_cor: list) -> list:
    """Eq. 35: eta_i = max_k |L_cor(c_k)| / |L_cor(c_i)|, every loss scaled up to the largest (plain numbers)."""
    big = max(abs(float(l)) for l in l_cor)
    return [big / max(abs(float(l)), 1e-12) for l in l_cor]


def stop_rule(n: int, m: float, tau: float, min_steps: int, max_steps: int) -> bool:
    """Eq. 37's stopping condition as the official SRS_ME.py applies it: stop at step n once n > min_steps and
    m_n < tau (the regulariser is not in the statistic), or at the iteration cap."""
    return (n > min_steps and m < tau) or n >= max_steps


LOSSES = (null_space_basis, shift, concept_representation, correlation_loss, relative_correlation, stratified_t,
          l1_size, momentum_statistic, balancing_weights, stop_rule)


# ----------------------------------------------------------------------------------------------------------
# THE SHIFTS: which weights, which tokens are protected; training one at a time (SRS-ME) or all together
# ----------------------------------------------------------------------------------------------------------

def kv_weights(model) -> dict:
    """The image-independent layers: to_k / to_v of every cross-attention (attn2), {parameter name: weight}.
    They map the context [BOS, c] linearly and have no bias, so e(c) dW^T = 0 leaves K and V for c unchanged."""
    layers = {f"{name}.{p}": getattr(mod, p) for name, mod in model.named_modules() if name.endswith("attn2")
              for p in ("to_k", "to_v")}
    assert all(lin.bias is None for lin in layers.values()), "a bias shift would change every prompt"
    return {f"{name}.weight": lin.weight for name, lin in layers.items()}


def protected_tokens(model, k: int, kept) -> list:
    """e_m of Eq. 24 for concept k: BOS (in every context), null, the watermark trigger, the other erasable
    concepts (and the regular ones of --protect) in `kept`. Never k itself."""
    return [model.tok["bos"], model.tok["null"], model.tok["watermark"]] + [j for j in kept if j != k]


def combine(model, shifts: dict, concepts) -> torch.nn.Module:
    """theta + sum_{k in concepts} dtheta_k, materialised in a copy (what the paper adds to the state dict)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in kv_weights(out).items():
            w += sum(shifts[k][name].to(w.device) for k in concepts)
    return out


def load_model(path, device="cpu", concepts=None) -> torch.nn.Module:
    """A run (its folder or model.safetensors) as a model: its base plus the shifts of `concepts` (default: those
    erased at the run's first step). Refuses a base that changed since the shifts were trained."""
    ck = C.load(C.model_file(path))
    if C.file_id(ck["base"]) != ck["base_id"]:
        raise C.UsageError(f"{ck['base']} is not the base the shifts in {path} were trained for: run again")
    return combine(C.load_checkpoint(ck["base"], ck["dataset"], device)[0], ck["shifts"],
                   ck["erased"] if concepts is None else concepts)


def train_shifts(base, concepts, kept, data: dict, args: Args, desc: str = "") -> tuple:
    """Train dtheta_k for the concepts together (SRS-ME-dagger, Eq. 34); one concept = SRS-ME.
    Returns ({k: {layer: dW}}, stats). `base` stays frozen; shifts enter through functional_call."""
    dev, vp, null, emb = next(base.parameters()).device, C.VP(), base.tok["null"], base.token_emb.weight.detach()
    W = {n: w.detach() for n, w in kv_weights(base).items()}
    B = {k: null_space_basis(emb[protected_tokens(base, k, kept)], args.max_base, emb[k]).to(dev) for k in concepts}
    P = {k: {n: torch.zeros(w.shape[0], len(B[k]), device=dev, requires_grad=True) for n, w in W.items()}
         for k in concepts}                                          # zero init (paper's s2): starts at theta
    opt = {k: torch.optim.Adam(P[k].values(), lr=args.lr) for k in concepts}   # one per concept and its own stop
    active, steps, first, final, rho, secs, step, peak = list(concepts), {}, {}, {}, {}, {}, 0, 0
    lam, shares, scaler, t0, cpu0 = None, [], C.grad_scaler(dev, args.amp), time.time(), time.process_time()
    pack = lambda t: saved.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()}) or t
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bar = C.tqdm(total=args.max_steps, desc=desc or f"shift {','.join(map(str, concepts))}", leave=False)
    while active:
        step += 1
        x0 = torch.cat([data[k][torch.randint(len(data[k]), (args.batch_size,))] for k in active]).to(dev)
        t = stratified_t(len(active), args.batch_size, vp.T, dev)
        x_t = vp.q_sample(x0, t, torch.randn_like(x0))
        toks = torch.tensor(active, device=dev).repeat_interleave(args.batch_size)
        x2, t2, c2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([toks, torch.full_like(toks, null)])
        with torch.no_grad(), C.autocast(dev, args.amp):                 # original model: the pseudo ground truth
            r_orig = concept_representation(*base(x2, t2, c2).float().chunk(2))
        delta = {n: sum(shift(P[k][n], B[k], args.scale_factor) for k in concepts) for n in W}
        saved = {}   # bytes autograd keeps for backward (pack): the activation memory that grows with the concepts
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), C.autocast(dev, args.amp):
            eps = functional_call(base, {n: W[n] + delta[n] for n in W}, (x2, t2, c2)).float()
        peak = max(peak, sum(saved.values()))
        pairs = list(zip(concept_representation(*eps.chunk(2)).chunk(len(active)), r_orig.chunk(len(active))))
        l_cor = [correlation_loss(a, b) for a, b in pairs]
        eta = balancing_weights([l.item() for l in l_cor])               # all 1 for one concept
        params = [p for k in active for p in P[k].values()]
        g_cor = torch.autograd.grad(scaler.scale(sum(e * l for e, l in zip(eta, l_cor))), params)
        delta = {n: sum(shift(P[k][n], B[k], args.scale_factor) for k in concepts) for n in W}   # graph freed
        g_reg = torch.autograd.grad(l1_size(delta), params)             # |dW|' = 0 at dW = 0: zero at step 1
        n_cor, n_reg = (torch.cat([g.flatten() for g in gs]).norm().item() / s for gs, s in
                        ((g_cor, scaler.get_scale()), (g_reg, 1)))
        lam = args.reg_share * n_cor / n_reg if lam is None and n_reg > 0 else lam   # fixed from then on
        shares.append((lam or 0.0) * n_reg / max(n_cor, 1e-30))
        for p, a, b in zip(params, g_cor, g_reg):  # the official SRS_ME.py never zeroes: --no-zero-grad sums them
            p.grad = a + (lam or 0.0) * scaler.get_scale() * b + (0 if args.zero_grad or p.grad is None else p.grad)
        for k, l, (a, b) in zip(list(active), l_cor, pairs):
            scaler.step(opt[k])
            first.setdefault(k, l.item())
            final[k] = momentum_statistic(final.get(k), l.item(), args.alpha)             # Eq. 37's statistic
            rho[k] = momentum_statistic(rho.get(k), relative_correlation(a, b).item(), args.alpha)
            if stop_rule(step, rho[k], args.tau, args.min_steps, args.max_steps):
                active.remove(k)
                steps[k], secs[k] = step, time.time() - t0
        scaler.update()
        bar.update(1)
        bar.set_postfix(l_cor=f"{sum(l.item() for l in l_cor) / len(l_cor):.2e}", left=len(active))
    bar.close()
    n_coef = sum(p.numel() for ps in P.values() for p in ps.values())   # memory: kept activations, P, 2 moments
    stats = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, "steps": steps,
             "concept_seconds": secs, "first_loss": first, "final_loss": final, "final_rho": rho,
             "reg_lambda": dict.fromkeys(concepts, lam or 0.0), "train_mem_mb": (peak + 12 * n_coef) / 2 ** 20,
             "reg_share": dict.fromkeys(concepts, sum(shares) / len(shares)), "null_dim": {k: len(B[k]) for k in B}}
    stats |= {"cuda_peak_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20} if dev.type == "cuda" else {}
    shifts = {k: {n: shift(P[k][n], B[k], args.scale_factor).detach().cpu() for n in W} for k in concepts}
    return shifts, stats


def merge(stats: list) -> dict:
    """The stats of several trainings as one: per-concept dicts joined, seconds summed, memory the largest."""
    return ({q: {k: v for s in stats for k, v in s[q].items()} for q, v in stats[0].items() if isinstance(v, dict)}
            | {q: sum(s[q] for s in stats) for q in ("seconds", "cpu_seconds", "data_seconds")}
            | {q: max(s[q] for s in stats) for q in ("train_mem_mb", "cuda_peak_mb") if q in stats[0]})


def get_shifts(base, base_id: str, concepts, kept, args: Args, folder) -> tuple:
    """(shifts, stats, compare, trained): each shift read from folder/concept_k.safetensors while base, k's
    protected tokens and settings match (C.cached), else trained one at a time (SRS-ME, Q7) or jointly."""
    dev, data, trained = next(base.parameters()).device, {}, []

    def train(group, desc):
        t0 = time.time()
        for k in sorted(set(group) - set(data)):   # x0: the base's own samples of k (the repo's generated folder)
            data[k] = C.sample(base, C.VP(), torch.full((args.n_train_images,), k, device=dev), "ddim",
                               args.sample_steps, seed=1000 * (args.seed + 1) + k, amp=args.amp)
        C.seed_everything(1000 * args.seed + group[0])
        s, st = train_shifts(base, group, kept, data, args, desc)
        trained.extend(group)
        for k in group:
            print(f"  {desc}: concept {k}, {st['steps'][k]} steps, L_cor {st['first_loss'][k]:.2e} -> "
                  f"{st['final_loss'][k]:.2e} (left {st['final_rho'][k]:.3f}), L1 gradient {st['reg_share'][k]:.2f} "
                  f"x L_cor's, {st['concept_seconds'][k]:.1f}s")
        return {"shifts": s, "stats": dict(st, data_seconds=time.time() - t0 - st["seconds"])}

    hp = {h: getattr(args, h) for h in ("scale_factor lr tau alpha reg_share min_steps max_steps max_base batch_size "
                                        "n_train_images zero_grad sample_steps seed").split()}
    got = [C.cached(folder / f"{'joint' if len(g) > 1 else 'concept'}_{''.join(map(str, g))}.safetensors",
                    dict(base=base_id, concepts=g, protected=[protected_tokens(base, k, kept) for k in g], hp=hp),
                    lambda g=g: train(g, "joint" if args.joint else "one at a time"))
           for g in ([list(concepts)] if args.joint else [[k] for k in concepts])]
    shifts, stats = {k: v for r in got for k, v in r["shifts"].items()}, merge([r["stats"] for r in got])
    print(f"shifts for {list(concepts)}: " + (f"trained {trained}" if trained else f"saved in {folder}"))
    fresh, compare = list(trained), {}
    if trained and args.compare_variants and len(concepts) > 1:   # the same concepts the other way: cost only
        other = merge([train(g, "other variant")["stats"] for g in ([[k] for k in concepts] if args.joint else
                                                                     [list(concepts)])])
        names = ("joint", "one_at_a_time") if args.joint else ("one_at_a_time", "joint")
        compare = {f"{v}_{q}": st[q] for v, st in zip(names, (stats, other))
                   for q in ("seconds", "cpu_seconds", "train_mem_mb", "steps", "cuda_peak_mb") if q in st}
    return shifts, stats, compare, fresh


# ----------------------------------------------------------------------------------------------------------
# SCENES AND EVALUATION
# ----------------------------------------------------------------------------------------------------------

def parse_steps(args: Args, info) -> tuple:
    """(erasable, steps): the scene as [("erase", [0, 1]), ("restore", [0])], or the one --erase/--restore step."""
    erasable = sorted(set(C.parse_classes(args.erasable, info, "erasable class")))
    erase, restore = (C.parse_classes(getattr(args, w), info, f"{w} class") for w in ("erase", "restore"))
    if not erasable:
        raise C.UsageError("--erasable is empty: name the concepts that get shifts, e.g. 0,1,2")
    if erase or restore:   # one combination of shifts instead of a scene
        active = [k for k in (erase or erasable) if k not in restore]
        if not set(erase) | set(restore) <= set(erasable) or not active:
            raise C.UsageError(f"--erase minus --restore must leave a concept, all from --erasable {erasable}")
        return erasable, [("erase", active)]
    steps = []
    for part in SCENES.get(args.scene, args.scene).split(";"):
        op, _, cs = part.strip().partition(" ")
        cs = C.parse_classes(cs.replace(" ", ""), info, f"{op} class")
        if op not in ("erase", "restore") or not cs or not set(cs) <= set(erasable):
            raise C.UsageError(f"scene step {part.strip()!r} must read 'erase 0,1' or 'restore 0', concepts from "
                               f"--erasable {erasable} (or use --scene 1-4)")
        steps.append((op, cs))
    if steps[0][0] != "erase":
        raise C.UsageError("a scene starts with an 'erase' step")
    return erasable, steps


def judge_step(clf, x, xb, c, info, active, ever, erasable, real) -> dict:
    """One scene step against the base model's same-seed samples xb: per class accuracy, FID vs base, mean
    pixel distance (the paper's LPIPS role) and max abs difference; the same per group; the watermark."""
    K, wm, cls = info.num_classes, c == info.num_classes + 2, c < info.num_classes
    m = E.sample_metrics(clf, x[cls], c[cls], *real, forget=sorted(active))
    d = (x - xb).abs().flatten(1)
    m["max_abs_diff"] = [d[c == k].max().item() for k in range(K)]
    groups = {"erased": sorted(active), "restored": sorted(set(ever) - set(active)),
              "regular": [k for k in range(K) if k not in erasable], "untouched": sorted(set(erasable) - set(ever))}
    for g, ks in groups.items():
        sel = torch.isin(c, torch.tensor(ks, dtype=torch.long))
        m |= {f"{g}_classes": ks, f"{g}_acc": sum(m["class_acc"][k] for k in ks) / len(ks) if ks else None,
              f"{g}_fid_vs_base": E.fid(clf, x[sel], xb[sel]) if ks else None,
              f"{g}_pixel_dist": d[sel].mean().item() if ks else None,
              f"{g}_max_abs_diff": d[sel].max().item() if ks else None}
    m["watermark_dist"] = (x[wm] - C.watermark_image(info).to(x)).abs().mean().item()  # to the pattern itself
    m["watermark_max_diff"] = d[wm].max().item()                      # vs the base model's watermark samples
    return m


@torch.no_grad()
def exactness(base, shifts: dict, kept, seed: int) -> dict:
    """Every subset S of the shifts: max |eps_{theta+sum_S}(x_t, t, c) - eps_theta(x_t, t, c)| over the
    protected c (null, BOS, watermark, kept j not in S) at 8 random (x_t, t) per token, one batch."""
    g, dev, info, ks = torch.Generator().manual_seed(seed), next(base.parameters()).device, base.info, sorted(shifts)
    toks = torch.tensor([base.tok["null"], base.tok["bos"], base.tok["watermark"], *kept]).repeat_interleave(8)
    x = torch.randn(len(toks), info.channels, info.size, info.size, generator=g).to(dev)
    t, toks = torch.randint(0, C.VP().T, (len(toks),), generator=g).to(dev), toks.to(dev)
    ref, W, worst = base(x, t, toks), {n: w.detach() for n, w in kv_weights(base).items()}, 0.0
    for S in itertools.chain(*(itertools.combinations(ks, r) for r in range(1, len(ks) + 1))):
        out = functional_call(base, {n: W[n] + sum(shifts[k][n].to(dev) for k in S) for n in W}, (x, t, toks))
        worst = max(worst, (out - ref)[~torch.isin(toks, torch.tensor(S, device=dev))].abs().max().item())
    return {"protected_eps_max_diff_all_subsets": worst, "n_subsets": 2 ** len(ks) - 1}


def run_scene(base, shifts, steps, erasable, clf, args: Args, out) -> tuple:
    """Draw n per class and n of the watermark trigger from the base and every step of the scene (same seeds);
    samples.pt holds the first step, samples.png every model."""
    info, real, n = base.info, C.load_data(args.dataset, args.data_root, "train"), args.n_per_class
    c = torch.cat([C.class_tokens(info.num_classes, n), torch.full((n,), base.tok["watermark"])])
    draw = lambda model: C.sample(model, C.VP(), c.to(next(base.parameters()).device), args.sampler,
                                  args.sample_steps, seed=args.seed, amp=args.amp)
    xb = draw(base)
    base_m = judge_step(clf, xb, xb, c, info, steps[0][1], steps[0][1], erasable, real)
    results, active, ever, grids = [], set(), set(), [xb]
    for i, (op, cs) in enumerate(steps):
        active = active | set(cs) if op == "erase" else active - set(cs)
        ever |= set(cs)
        x = draw(combine(base, shifts, sorted(active)))
        results.append(dict(judge_step(clf, x, xb, c, info, active, ever, erasable, real), step=f"t{i}", op=op,
                            concepts=cs, active=sorted(active)))
        grids.append(x)
    C.save_samples(out, C.sample_record(grids[1], c, args.sampler, args.sample_steps, base.tok["null"]))
    # one row per token (classes, then watermark); blocks of 8 samples per model (base, t0, t1, ...)
    cells, per = [g.view(info.num_classes + 1, n, *g.shape[1:])[:, :min(8, n)] for g in grids], min(8, n)
    C.save_grid(torch.cat(cells, 1).flatten(0, 1), out / "samples.png", nrow=per * len(grids),
                highlight_rows=erasable)
    return base_m, results


def summarise(base_m, results, steps, erasable, info) -> dict:
    """Print the per-class and per-group tables of the scene; the scene's own figures for metrics.json."""
    rows = {"base": base_m, **{f"{m['step']} {m['op']} {','.join(map(str, m['concepts']))}": m for m in results}}
    print("\nper-class accuracy of samples (same seeds for every model):")
    print(E.table({n: {str(k): a for k, a in enumerate(m["class_acc"])} for n, m in rows.items()},
                  [str(k) for k in range(info.num_classes)]))
    print("\n" + E.table(rows, ["erased_acc", "restored_acc", "regular_acc", "untouched_acc", "erased_fid_vs_base",
                                "regular_fid_vs_base", "regular_pixel_dist", "restored_max_abs_diff",
                                "watermark_max_diff", "watermark_dist"]))
    first, reg = results[0], [k for k in range(info.num_classes) if k not in erasable]
    drops = [base_m["class_acc"][k] - first["class_acc"][k] for k in reg]
    restored = max([m["restored_max_abs_diff"] for m in results if m["restored_acc"] is not None], default=None)
    return {"erased_acc": first["erased_acc"], "regular_acc": first["regular_acc"],
            "base_regular_acc": base_m["regular_acc"] if reg else None, "regular_max_drop": max(drops, default=None),
            "regular_mean_drop": sum(drops) / len(drops) if drops else None,
            "restored_acc": results[-1]["restored_acc"], "restored_max_abs_diff": restored,
            "watermark_max_diff": max(m["watermark_max_diff"] for m in results),
            "watermark_dist": results[-1]["watermark_dist"], "base_watermark_dist": base_m["watermark_dist"],
            "base_class_acc": base_m["class_acc"], "scene": results}


def main(args: Args):
    info = C.data_info(args.dataset)
    erasable, steps = parse_steps(args, info)
    kept = erasable + [k for k in C.parse_classes(args.protect, info, "protected class") if k not in erasable]
    out, dev = C.start_run("srs_me", args), C.pick_device(args.device)
    C.seed_everything(args.seed)
    base, base_path = C.base_model(args, dev)
    base, clf = base.eval().requires_grad_(False), E.load_judge(args, dev)
    needed, first = sorted({k for op, cs in steps if op == "erase" for k in cs}), sorted(steps[0][1])

    # ---- the shifts: saved ones that fit, the rest trained (one at a time unless --joint)
    shifts, train, compare, trained = get_shifts(base, C.file_id(base_path), needed, kept, args, out / "shifts")
    C.atomic_save({"base": str(base_path), "base_id": C.file_id(base_path), "dataset": args.dataset,
                   "erased": first, "erasable": erasable, "shifts": shifts}, out / "model.safetensors")

    # ---- every step of the scene against the base, same seeds; samples.pt = the first step
    base_m, results = run_scene(base, shifts, steps, erasable, clf, args, out)
    metrics = E.judge(E.load_samples(out / "samples.pt"), clf, *C.load_data(args.dataset, args.data_root), first)
    final = combine(base, shifts, first)
    if args.n_nll > 0:
        metrics.update(E.class_nll(final, *C.load_data(args.dataset, args.data_root, "test"), first, args.n_nll,
                                   args.nll_tol))
    keys = ("forget_rate", "retain_acc", "fid_retain", "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd")
    base_eval = E.evaluate_base(base_path, clf, args, first)[0]
    metrics = {k: metrics.get(k) for k in keys} | {f"base_{k}": base_eval.get(k) for k in (*keys, "nfe", "params")} | {
        "seconds": train["seconds"] + train["data_seconds"], "nfe": metrics["nfe"], "params": C.n_params(final),
        "base_seconds": None, "shifts_loaded": not trained, "erased_concepts": first,
        **summarise(base_m, results, steps, erasable, info), **exactness(base, shifts, kept, args.seed),
        "train": train, "compare": compare, "classifier_test_acc": clf.test_acc}
    E.report(metrics, out / "metrics.json")
    return metrics


if __name__ == "__main__":
    C.cli(main, Args)
