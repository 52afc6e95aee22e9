"""srs_me.py: the null-space basis (and its rotation onto the concept), exact invariance of every
protected token under every subset of shifts (regular ones too when named by --protect), exact
restoration, optimisation decoupling, the momentum stopping rule, the loss functions and the
training step copied alone, the regulariser's weight set from its gradient share, a short erase on
the CI base that lowers the concept's accuracy, and the command line (scene, the run folder's files,
saved shifts combined at load time, bad input)."""
import contextlib
import itertools
import json

import numpy as np
import pytest
import torch
from torch.func import functional_call
from conftest import hparams, isolated, run_here, run_script

import common as C
import eval as E
import srs_me as S

ERASABLE = [0, 1, 2, 3, 4, 5]


def _random_shifts(model, beta=1.0, seed=0, kept=ERASABLE):
    """Large random shifts (||dW|| comparable to ||W||) built the method's way: P (beta B_k)."""
    g = torch.Generator().manual_seed(seed)
    emb = model.token_emb.weight.detach()
    out = {}
    for k in ERASABLE:
        B = S.null_space_basis(emb[S.protected_tokens(model, k, kept)], 64)
        out[k] = {n: S.shift(torch.randn(w.shape[0], len(B), generator=g) * w.abs().mean() * 8,
                             B, beta)
                  for n, w in S.kv_weights(model).items()}
    return out


def _inputs(model, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g).float()


def test_basis_spans_the_null_space_of_the_protected_embeddings(digits_base):
    _, model = digits_base
    emb = model.token_emb.weight.detach()
    for k in ERASABLE:
        prot = S.protected_tokens(model, k, ERASABLE)
        assert k not in prot and not set(prot) & {6, 7, 8, 9}   # regular ones are never protected
        assert {model.tok["bos"], model.tok["null"], model.tok["watermark"]} <= set(prot)
        e_m = emb[prot]
        B = S.null_space_basis(e_m, 64)
        # independent rank: numpy's SVD-based matrix_rank in float64
        assert len(B) == emb.shape[1] - np.linalg.matrix_rank(e_m.double().numpy()) == 64 - 8
        assert (e_m @ B.T).abs().max() < 1e-5 * e_m.norm(dim=1).max()
        assert torch.allclose(B @ B.T, torch.eye(len(B)), atol=1e-5)
        # the erased concept itself keeps most of its embedding in the space the shift can act on
        assert (B @ emb[k]).norm() > 0.5 * emb[k].norm()
        # rotated onto the concept: the same space, and e_k has a component along row 0 only
        Bk = S.null_space_basis(e_m, 64, emb[k])
        assert torch.allclose(Bk.T @ Bk, B.T @ B, atol=1e-5)
        assert torch.allclose(Bk @ Bk.T, torch.eye(56), atol=1e-5)
        u = Bk @ emb[k]
        assert u[0].abs() == pytest.approx((B @ emb[k]).norm().item(), rel=1e-4)
        assert u[1:].abs().max() < 1e-5 * u[0].abs()
    assert S.null_space_basis(emb[[0, 1]], max_base=5).shape == (5, 64)
    with pytest.raises(ValueError, match="protect fewer"):
        S.null_space_basis(torch.randn(70, 64), 64)


def test_protected_tokens_are_exact_under_every_subset_and_restoring_is_exact(digits_base):
    _, model = digits_base
    shifts = _random_shifts(model)
    tok = model.tok
    cs = torch.tensor([tok["null"], tok["bos"], tok["watermark"], *range(10)]).repeat_interleave(3)
    x, t = _inputs(model, len(cs))
    ref = model(x, t, cs)
    W = {n: w.detach() for n, w in S.kv_weights(model).items()}
    moved = []
    for r in range(1, 7):
        for subset in itertools.combinations(ERASABLE, r):
            params = {n: W[n] + sum(shifts[k][n] for k in subset) for n in W}
            d = (functional_call(model, params, (x, t, cs)) - ref).abs().flatten(1).max(1).values
            changed = torch.isin(cs, torch.tensor([*subset, 6, 7, 8, 9]))
            assert d[~changed].max() < 1e-5, (subset, d)
            # shifted and regular concepts do change: the test has teeth
            moved.append(d[changed].min().item())
    assert min(moved) > 1e-3
    # the same shift with rows NOT in the null space changes the null prompt: the basis protects it
    free = {n: S.shift(torch.randn(w.shape[0], 64), torch.eye(64), 0.1) for n, w in W.items()}
    null = cs == tok["null"]
    freed = S.combine(model, {9: free}, [9])(x[null], t[null], cs[null])
    assert (freed - ref[null]).abs().max() > 1e-3
    # restoring: erase all, then drop concept 2's shift; its samples equal the base's (same seeds)
    c2 = torch.full((6,), 2)
    base2 = C.sample(model, C.VP(), c2, steps=10, seed=3)
    erased = C.sample(S.combine(model, shifts, ERASABLE), C.VP(), c2, steps=10, seed=3)
    assert (erased - base2).abs().max() > 0.1
    restored = S.combine(model, shifts, [0, 1, 3, 4, 5])
    assert (C.sample(restored, C.VP(), c2, steps=10, seed=3) - base2).abs().max() < 1e-5


def test_protect_keeps_the_named_regular_concepts_exact(digits_base):
    """--protect puts regular concepts into every e_m: exact under all six shifts, which move them
    otherwise."""
    _, model = digits_base
    cs = torch.arange(6, 10).repeat_interleave(3)
    x, t = _inputs(model, len(cs))
    ref = model(x, t, cs)
    for kept, exact in ((ERASABLE, False), (ERASABLE + [6, 7, 8, 9], True)):
        prot = S.protected_tokens(model, 0, kept)
        assert prot[-1] == kept[-1] and 0 not in prot
        edited = S.combine(model, _random_shifts(model, kept=kept), ERASABLE)
        d = (edited(x, t, cs) - ref).abs().max().item()
        assert d < 1e-5 if exact else d > 1e-3, (kept, d)


def test_optimisation_decoupling_other_shifts_get_no_gradient(digits_base):
    """Q7 of the paper: L_cor(c_i) does not depend on P_j (j != i), so shifts can be trained one at
    a time."""
    _, model = digits_base
    emb = model.token_emb.weight.detach()
    W = {n: w.detach() for n, w in S.kv_weights(model).items()}
    B = {k: S.null_space_basis(emb[S.protected_tokens(model, k, ERASABLE)], 64) for k in (0, 1)}
    P = {k: {n: (torch.randn(w.shape[0], len(B[k])) * 0.1).requires_grad_(True)
             for n, w in W.items()}
         for k in (0, 1)}
    x, t = _inputs(model, 8)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    c2 = torch.cat([torch.full((8,), 0), torch.full((8,), model.tok["null"])])
    params = {n: W[n] + sum(S.shift(P[k][n], B[k], 1.0) for k in (0, 1)) for n in W}
    r_new = S.concept_representation(*functional_call(model, params, (x2, t2, c2)).chunk(2))
    with torch.no_grad():
        r_orig = S.concept_representation(*model(x2, t2, c2).chunk(2))
    loss = S.correlation_loss(r_new, r_orig)
    grads = torch.autograd.grad(loss, [*P[0].values(), *P[1].values()])
    own = torch.cat([g.flatten() for g in grads[:len(W)]]).norm()
    other = torch.cat([g.flatten() for g in grads[len(W):]]).norm()
    assert own > 1e-6 and other < 1e-6 * own


def _stop_step(losses, tau, min_steps=10, max_steps=1000):
    """(step, statistic) at which the momentum rule stops on this sequence of L_cor values."""
    m = None
    for n, loss in enumerate(losses, 1):
        m = S.momentum_statistic(m, loss, 0.9)
        if S.stop_rule(n, m, tau, min_steps, max_steps):
            return n, m


def test_momentum_stop_crosses_tau_and_never_before_step_10():
    assert _stop_step([0.0] * 12, tau=0.1)[0] == 11       # below tau from step 1: n = 11 > 10
    # m = 0.9^j after j zeros: 0.109 (j = 21), 0.098 (j = 22)
    n, m = _stop_step([1.0] * 20 + [0.0] * 40, tau=0.1)
    assert n == 20 + 22 and m == pytest.approx(0.9 ** 22)
    assert _stop_step([1.0] * 30, tau=0.1, max_steps=30)[0] == 30


def test_loss_functions_copied_alone_give_the_same_results():
    """Each function of LOSSES, compiled from its source in a namespace holding only torch and math,
    computes what the original does (and what the equations say) on tiny tensors."""
    ns = isolated(S.LOSSES)
    g = torch.Generator().manual_seed(0)
    e_m, P = torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g)
    B = S.null_space_basis(e_m, 3)
    assert torch.equal(ns["null_space_basis"](e_m, 3), B) and (e_m @ B.T).abs().max() < 1e-5
    e_k = torch.randn(6, generator=g)
    assert torch.equal(ns["null_space_basis"](e_m, 3, e_k), S.null_space_basis(e_m, 3, e_k))
    with pytest.raises(ValueError, match="protect fewer"):
        ns["null_space_basis"](torch.randn(7, 6, generator=g), 6)
    assert torch.equal(ns["shift"](P, B, 0.1), S.shift(P, B, 0.1))
    assert torch.allclose(S.shift(P, B, 0.1), 0.1 * P @ B)
    a, b, c = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    r = S.concept_representation(a, b)
    assert torch.equal(ns["concept_representation"](a, b), r) and torch.equal(r, a - b)
    assert torch.equal(ns["correlation_loss"](r, c), S.correlation_loss(r, c))
    expected = (r * c).sum().item() / r.numel()
    assert S.correlation_loss(r, c).item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(ns["relative_correlation"](r, c), S.relative_correlation(r, c))
    expected = (r * c).sum().item() / (c * c).sum().item()
    assert S.relative_correlation(r, c).item() == pytest.approx(expected, rel=1e-5)
    assert S.relative_correlation(c, c).item() == pytest.approx(1.0)
    assert S.relative_correlation(-c, c).item() < 0
    torch.manual_seed(0)
    t = S.stratified_t(2, 8, 1000, "cpu")
    torch.manual_seed(0)
    assert torch.equal(ns["stratified_t"](2, 8, 1000, "cpu"), t)
    assert (t.view(2, 8) // 125 == torch.arange(8)).all()    # one t in each eighth, per group
    d = {"k": torch.tensor([[1.0, -2.0]]), "v": torch.tensor([[-3.0, 0.5]])}
    assert ns["l1_size"](d).item() == S.l1_size(d).item() == pytest.approx(6.5 / 2)
    for m_prev in (None, 0.5):
        assert ns["momentum_statistic"](m_prev, 0.2, 0.9) == \
            S.momentum_statistic(m_prev, 0.2, 0.9)
    assert S.momentum_statistic(0.5, 0.2, 0.9) == pytest.approx(0.47)
    assert ns["balancing_weights"]([0.1, -0.4]) == S.balancing_weights([0.1, -0.4]) \
        == pytest.approx([4.0, 1.0])
    for n, m in ((5, 0.0), (11, 0.0), (11, 0.2), (30, 0.2)):
        assert ns["stop_rule"](n, m, 0.1, 10, 30) == S.stop_rule(n, m, 0.1, 10, 30)
    cases = ((5, 0.0), (11, 0.0), (11, 0.2), (30, 0.2))
    assert [S.stop_rule(n, m, 0.1, 10, 30) for n, m in cases] == [False, True, False, True]


def test_step_copied_alone_gives_the_same_update(digits_base):
    """shift_step compiled from its source in a namespace holding only torch, math, LOSSES and
    SRSMEHparams moves the shifts of two concepts trained together exactly as the original does:
    two steps, lambda fixed at the second (the first shift is zero), --no-zero-grad summing the
    gradients."""
    _, model = digits_base
    model = model.eval().requires_grad_(False)
    hp_class = hparams(S)
    ns = isolated([*S.LOSSES, *S.STEPS], extra={hp_class.__name__: hp_class})
    hp = hp_class(batch_size=4, zero_grad=False)
    emb = model.token_emb.weight.detach()
    W = {n: w.detach() for n, w in S.kv_weights(model).items()}
    concepts = [0, 1]
    B = {k: S.null_space_basis(emb[S.protected_tokens(model, k, ERASABLE)], 64, emb[k])
         for k in concepts}
    g = torch.Generator().manual_seed(0)
    data = {k: torch.randn(8, 1, 8, 8, generator=g) for k in concepts}
    got = {}
    for name, step in (("copy", ns["shift_step"]), ("original", S.shift_step)):
        P = {k: {n: torch.zeros(w.shape[0], len(B[k]), requires_grad=True) for n, w in W.items()}
             for k in concepts}
        opt = {k: torch.optim.Adam(P[k].values(), lr=hp.lr) for k in concepts}
        torch.manual_seed(1)
        lam, logs = None, []
        for _ in range(2):
            batch = S.concept_batch(data, concepts, hp, C.VP(), model.tok["null"], "cpu")
            log = step(model, W, P, B, opt, concepts, batch, lam, hp, contextlib.nullcontext(),
                       C.grad_scaler("cpu", False))
            lam = log["lam"]
            logs.append(log)
        got[name] = (P, logs)
    (P_copy, logs_copy), (P_orig, logs_orig) = got["copy"], got["original"]
    assert logs_copy == logs_orig
    assert logs_orig[0]["lam"] is None and logs_orig[1]["lam"] > 0
    for k in concepts:
        for n in W:
            assert torch.equal(P_copy[k][n], P_orig[k][n])
            assert P_orig[k][n].abs().max() > 0                 # the step moved every shift
    assert S.l1_size({n: S.shift(P_orig[0][n], B[0], hp.scale_factor) for n in W}) > 0


def test_regulariser_weight_is_set_from_its_gradient_share(digits_base):
    """lambda is fixed at the first step with a non-zero shift so that the L1 gradient is reg_share
    times the correlation gradient (norms); the share kept is logged; reg_share 0 means no
    regulariser."""
    _, model = digits_base
    model = model.eval().requires_grad_(False)
    data = {0: C.sample(model, C.VP(), torch.full((8,), 0), steps=4, seed=11)}
    got = {}
    for share in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        args = C.make_args(S.Args, max_steps=8, reg_share=share, batch_size=4)
        got[share] = S.train_shifts(model, [0], ERASABLE, data, args, contextlib.nullcontext(),
                                    C.grad_scaler("cpu", False))
    assert got[0.0][1]["reg_lambda"][0] == 0.0 and got[0.0][1]["reg_share"][0] == 0.0
    # the same first two steps: lambda scales with the share; the logged share is near it (mean over
    # 8 steps, step 1 without a shift counts 0)
    assert got[3.0][1]["reg_lambda"][0] == pytest.approx(3 * got[1.0][1]["reg_lambda"][0], rel=1e-4)
    for share in (1.0, 3.0):
        assert 0.3 * share < got[share][1]["reg_share"][0] * 8 / 7 < 3 * share
    # the regulariser shrinks the shift
    size = {share: S.l1_size(got[share][0][0]).item() for share in got}
    assert size[3.0] < size[1.0] < size[0.0]


def test_short_erase_lowers_the_concepts_accuracy(digits_base, digits_classifier):
    _, model = digits_base
    model = model.eval().requires_grad_(False)
    args = C.make_args(S.Args, max_steps=60, tau=0.0, lr=0.8, batch_size=8, n_train_images=32,
                       sample_steps=20)
    torch.manual_seed(0)
    data = {0: C.sample(model, C.VP(), torch.full((32,), 0), steps=20, seed=11)}
    shifts, stats = S.train_shifts(model, [0], ERASABLE, data, args, contextlib.nullcontext(),
                                   C.grad_scaler("cpu", False))
    assert stats["first_loss"][0] > 0 and 10 < stats["steps"][0] < 60
    assert stats["final_rho"][0] < args.tau
    edited = S.combine(model, shifts, [0])
    c = torch.cat([torch.full((40,), 0), torch.full((40,), 6), torch.full((40,), 1)])
    xb, xe = (C.sample(m, C.VP(), c, steps=20, seed=5) for m in (model, edited))
    acc = lambda x, k: (E.predict(digits_classifier, x[c == k]) == k).float().mean().item()
    assert acc(xb, 0) > 0.7 and acc(xe, 0) < 0.3              # the concept is gone
    assert acc(xe, 6) > acc(xb, 6) - 0.25                      # a regular concept mostly stays
    assert (xe[c == 1] - xb[c == 1]).abs().max() < 1e-5        # a protected concept is untouched


def test_cli_scene_saved_shifts_and_combination(digits_base, digits_classifier, runs_dir, capsys):
    small = ["--tag", "ci", "--n-per-class", "6", "--sample-steps", "8", "--n-train-images", "16",
             "--max-steps", "15", "--batch-size", "8", "--erasable", "0,1,2", "--n-nll", "2",
             "--nll-tol", "1e-3", "--protect", "6", "--compare-variants", "--check-subsets"]
    r = run_script("srs_me.py", *small, "--scene", "erase 0,1,2; restore 1")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    out = runs_dir / "srs_me-digits-ci"
    assert all((out / f).exists() for f in ("args.json", "metrics.json", "samples.png",
                                            "samples.pt", "model.safetensors"))
    assert sorted(p.name for p in (out / "shifts").iterdir()) == \
        [f"concept_{k}.safetensors" for k in range(3)]
    assert m["restored_max_abs_diff"] < 1e-4 and m["scene"][1]["restored_classes"] == [1]
    assert m["watermark_max_diff"] < 1e-4 and m["protected_eps_max_diff"] < 1e-5
    assert m["n_subsets"] == 7 and m["shifts_loaded"] is False
    # --protect 6: exact
    assert m["scene"][0]["max_abs_diff"][6] < 1e-4 < m["scene"][0]["max_abs_diff"][7]
    for k in ("forget_rate", "retain_acc", "fid_retain", "seconds", "nfe", "params",
              "nll_forget_bpd", "nll_kept_bpd", "nll_forget_null_bpd", "base_forget_rate",
              "base_retain_acc", "base_fid_retain", "base_nll_forget_bpd"):
        assert m[k] is not None, k
    cmp = m["compare"]       # joint training keeps 3 concepts' activations at once
    assert cmp["joint_train_mem_mb"] > 2 * cmp["one_at_a_time_train_mem_mb"]
    # samples.pt: the first step (0, 1, 2 erased), 6 per class and 6 watermark samples, judged as
    # metrics.json
    s = E.load_samples(out / "samples.pt")
    assert s["c"].tolist() == [k for k in range(10) for _ in range(6)] + [12] * 6 and s["nfe"] == 8
    j = E.judge(s, digits_classifier, *C.load_data("digits"), [0, 1, 2])
    assert (j["forget_rate"], j["retain_acc"]) == (m["forget_rate"], m["retain_acc"])
    assert j["class_acc"] == m["scene"][0]["class_acc"]
    # the model loads again as base + the erased shifts and draws the same samples
    model = S.load_model(out / "model.safetensors")
    assert (C.sample(model, C.VP(), s["c"], "ddim", 8, seed=0) - s["x"]).abs().max() < 1e-4
    # the saved shifts are combined at load time, nothing is retrained
    r = run_script("srs_me.py", *small, "--erase", "0,2", "--restore", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert m2["shifts_loaded"] is True and m2["scene"][0]["active"] == [0]
    assert m2["erased_concepts"] == [0]
    assert m2["scene"][0]["untouched_max_abs_diff"] < 1e-4     # 1 and 2 are protected from shift 0
    assert m2["seconds"] > 0
    assert json.loads((out / "metrics.json").read_text())["erased_concepts"] == [0]
    r = run_here(S, [*small, "--erase", "7"], capsys)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "erasable" in r.stderr
    assert r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("argv, message", [
    (["--erase", "0,0"], "erase class list '0,0' names 0 more than once"),
    (["--erase", "0,2", "--restore", "3"], "--restore 3: restores only concepts of --erase 0,2"),
    (["--erasable", "1,1,2"], "names 1 more than once"),
])
def test_an_ambiguous_combination_is_refused(argv, message, runs_dir, capsys):
    before = sorted(runs_dir.rglob("*"))
    r = run_here(S, argv, capsys)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before


def test_restore_alone_says_what_it_erases(capsys):
    info = C.data_info("digits")
    erasable, steps = S.parse_steps(C.make_args(S.Args, restore="3"), info)
    assert steps == [("erase", [k for k in erasable if k != 3])]
    out = capsys.readouterr().out
    assert f"erasing {steps[0][1]}" in out and "but --restore 3" in out
