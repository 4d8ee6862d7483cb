"""Muon, TEON and HTMuon (single process) against oracles: DeepSpeed's Muon, torch's AdamW, exact
SVD, a hand-computed TEON step, and Megatron's own QKV split."""

import copy
import math

import pytest
import torch

import teonspeed
from teonspeed.fused import LAYOUT_ATTR, qkv_layout, split
from support import tolerance as tol
from tiny_models import TinyLlama


def model_with_grads(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLlama(**kw)
    set_grads(model, seed)
    return model


def set_grads(model, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def run(opt_cls, model, steps=3, **options):
    opt = opt_cls(model.named_parameters(), **options)
    for s in range(steps):
        set_grads(model, s)
        opt.step()
    return opt


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- external oracle: DeepSpeed 0.19.8's Muon ------------------------------------------------------


@pytest.fixture
def ds_muon(monkeypatch):
    """DeepSpeed's Keller-Jordan Muon, forced to fp32 so it can be compared to rounding."""
    from deepspeed.runtime.zero.muon import original_muon

    monkeypatch.setattr(original_muon, "ns_compute_dtype", lambda method="gram": torch.float32)
    return original_muon


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_ns5_equals_deepspeeds_newton_schulz(ds_muon, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = teonspeed.orthogonalize(x, "ns5", compute_dtype=torch.float32)  # the oracle is forced to fp32 too
    # the same iteration evaluated in another order: each side's own fp32 rounding (√2 of one)
    bound = 2**0.5 * tol.ns_error_rms(0.0, "ns5", 5, torch.float32, x)
    assert tol.rel(ours, ds_muon.zeropower_via_newtonschulz5(x, 5)) <= bound


def test_ns5_in_bf16_matches_deepspeeds_bf16_iteration():
    from deepspeed.runtime.zero.muon import original_muon

    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    ours = teonspeed.orthogonalize(x, "ns5", compute_dtype=torch.bfloat16).float()
    theirs = original_muon.zeropower_via_newtonschulz5(x, 5).float()
    exact_fp32 = teonspeed.orthogonalize(x, "ns5", compute_dtype=torch.float32)
    # each is the fp32 iteration with bf16 rounding: the input cast (u_bf16 per entry) and 3 products per step
    # rounded to bf16, grown by this input's spectrum (tol.ns_error_rms); the fp32 result's own rounding is
    # 2⁻¹⁶ times smaller
    bound = tol.ns_error_rms(tol.u(torch.bfloat16), "ns5", 5, torch.bfloat16, x)
    assert tol.rel(ours, exact_fp32) <= bound and tol.rel(theirs, exact_fp32) <= bound
    assert tol.rel(ours, theirs) <= 2 * bound


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_muon_step_equals_deepspeeds_muon_update(ds_muon, shape):
    lr, wd, beta = 0.05, 0.1, 0.95
    w = torch.nn.Parameter(torch.randn(*shape))
    w_ref = w.detach().clone()
    momentum_ref = torch.zeros_like(w_ref)
    # the oracle is forced to fp32, ours too
    opt = teonspeed.Muon(
        [("decoder.layers.0.mlp.linear_fc2.weight", w)],
        lr=lr,
        weight_decay=wd,
        momentum=beta,
        ns_dtype="fp32",
    )
    bound = 0.0
    for s in range(3):
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(s))
        w.grad = grad.clone()
        opt.step()
        update = ds_muon.muon_update(
            grad.clone(), momentum_ref, beta=beta, ns_steps=5, nesterov=True, ns_method="standard"
        )
        w_ref = w_ref * (1 - lr * wd) - lr * update
        # this step's update: both sides' iteration rounding on the direction they orthogonalized (the
        # Nesterov momentum), grown by its spectrum; the decay and subtraction round twice (2u·|w|)
        direction = grad.lerp(momentum_ref, beta)
        bound = (
            bound * (1 - lr * wd)
            + lr * float(update.norm()) * 2**0.5 * tol.ns_error_rms(0.0, "ns5", 5, torch.float32, direction)
            + 2 * tol.LAMBDA * tol.u() * float(w_ref.norm())
        )
    assert float((w.detach() - w_ref).norm()) <= bound


# -- routing and the AdamW part ---------------------------------------------------------------------


def test_adamw_part_equals_torch_adamw():
    model = model_with_grads()
    ref = copy.deepcopy(model)
    adamw_names = [n for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n or "lm_head" in n]
    run(teonspeed.TEON, model, adamw_lr=1e-2, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.1)
    ref_params = dict(ref.named_parameters())
    torch_opt = torch.optim.AdamW(
        [ref_params[n] for n in adamw_names],
        lr=1e-2,
        betas=(0.8, 0.9),
        eps=1e-6,
        weight_decay=0.1,
        foreach=False,
    )
    for s in range(3):
        set_grads(ref, s)
        torch_opt.step()
    got = dict(model.named_parameters())
    # the same elementwise AdamW, its ~10 rounded operations per step (2 moments, 2 bias corrections, √, +ε,
    # ÷, ×lr, decay, −) ordered differently: ≤ 2·10·u of the step lr·|m̂/(√v̂+ε)| ≤ lr·4 (β₁/√β₂ = 0.84
    # bounds the ratio's growth) and ≤ 2·2·u of |w| (decay and subtraction), over 3 steps
    for n in adamw_names:
        torch.testing.assert_close(
            got[n], ref_params[n], rtol=3 * 4 * tol.u(), atol=3 * 20 * tol.u() * 1e-2 * 4
        )


def test_matrices_get_orthogonalized_updates():
    model = model_with_grads()
    before = params_of(model)
    opt = teonspeed.Muon(
        model.named_parameters(), lr=1.0, orthogonalizer="svd", lr_scale="none", momentum=0.0
    )
    opt.step()
    delta = before["layers.2.self_attn.o_proj.weight"] - model.layers[2].self_attn.o_proj.weight.detach()
    # the fp64 polar factor O, cast to fp32 (u|O|), applied as w − O and recovered as before − after: two fp32
    # roundings of |w| + |O| each, E; then δᵀδ − I = OᵀE + EᵀO + EᵀE plus the fp32 product's own rounding
    w = before["layers.2.self_attn.o_proj.weight"]
    e = 3 * tol.u() * (float(w.norm()) + 4.0)  # ‖E‖_F, ‖O‖_F = √16
    torch.testing.assert_close(
        delta.T @ delta, torch.eye(16), rtol=0, atol=2 * e + e**2 + tol.sums(torch.float32, 16)
    )


# -- TEON ---------------------------------------------------------------------------------------------


def test_teon_hand_computed_two_block_step():
    """Z = [G1 | G2] has orthogonal rows, so its polar factor is Z with each row normalised."""
    g1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    g2 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    w1, w2 = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = teonspeed.TEON(
        [("model.layers.0.self_attn.q_proj.weight", w1), ("model.layers.1.self_attn.q_proj.weight", w2)],
        lr=0.1,
        orthogonalizer="svd",
        teon_mode=1,
    )
    assert opt.plan.teon_groups and opt.plan.teon_groups[0].stacked_shape == (2, 4)
    w1.grad, w2.grad = g1.clone(), g2.clone()
    opt.step()
    r = 1 / math.sqrt(2)
    # the fp64 SVD of a 2×4 stack, cast to fp32, times lr and subtracted from 1: three fp32 roundings of ≤ 1
    exact = dict(rtol=0, atol=3 * tol.u() + tol.sums(torch.float64, 4))
    torch.testing.assert_close(
        w1.detach(), torch.ones(2, 2) - 0.1 * torch.tensor([[1.0, 0.0], [0.0, r]]), **exact
    )
    torch.testing.assert_close(
        w2.detach(), torch.ones(2, 2) - 0.1 * torch.tensor([[0.0, 0.0], [0.0, r]]), **exact
    )


@pytest.mark.parametrize("teon_mode, dim", [(1, 1), (2, 0)])  # mode 1: along the input dim; 2: the output dim
def test_teon_update_is_the_split_polar_factor_of_the_stack(teon_mode, dim):
    model = model_with_grads()
    before = params_of(model)
    directions = {n: p.grad.clone() for n, p in model.named_parameters()}
    teonspeed.TEON(
        model.named_parameters(), lr=1.0, orthogonalizer="svd", momentum=0.0, teon_mode=teon_mode
    ).step()
    q0, q1 = (f"layers.{i}.self_attn.k_proj.weight" for i in (0, 1))
    polar = teonspeed.orthogonalize(
        torch.cat([directions[q0], directions[q1]], dim=dim).double(), "svd"
    ).float()
    first, second = polar.chunk(2, dim=dim)
    scale = math.sqrt(8 / 16)  # fan_ratio √(m/n) of the single layer, TEON's default
    # the same fp64 SVD of the same stack; the update is cast to fp32, scaled, subtracted from w and recovered
    # as before − after: ≤ 4 fp32 roundings of |w| + |update| per entry
    after = dict(model.named_parameters())
    for name, part in ((q0, first), (q1, second)):
        atol = 4 * tol.u() * float(before[name].abs().max() + scale * part.abs().max())
        torch.testing.assert_close(before[name] - after[name], scale * part, rtol=0, atol=atol)


@pytest.mark.parametrize("orthogonalizer", ["ns5", "polar_express", "svd"])
def test_teon_with_k1_is_exactly_muon(orthogonalizer):
    a, b = model_with_grads(), model_with_grads()
    run(teonspeed.TEON, a, teon_k=1, orthogonalizer=orthogonalizer, lr_scale="spectral")
    run(teonspeed.Muon, b, orthogonalizer=orthogonalizer)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_fused_qkv_is_split_orthogonalized_per_part_and_refused():
    heads, groups, hd, hidden = 4, 2, 4, 16
    w = torch.nn.Parameter(torch.zeros((heads + 2 * groups) * hd, hidden))
    setattr(w, LAYOUT_ATTR, qkv_layout(heads, groups, hd))
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    parts = split(w.grad, qkv_layout(heads, groups, hd))
    teonspeed.Muon(
        [("decoder.layers.0.self_attention.linear_qkv.weight", w)],
        lr=1.0,
        orthogonalizer="svd",
        momentum=0.0,
        lr_scale="none",
    ).step()
    got = split(-w.detach(), qkv_layout(heads, groups, hd))
    # the same fp64 SVD of the same rows, both cast to fp32; the step subtracts it from 0 (exact)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(
            got[name],
            teonspeed.orthogonalize(parts[name], "svd"),
            rtol=0,
            atol=tol.u() + tol.sums(torch.float64, 16),
        )


# -- HTMuon ---------------------------------------------------------------------------------------------


def test_htmuon_update_is_u_sigma_p_vt_of_the_nesterov_momentum():
    w = torch.nn.Parameter(torch.zeros(12, 20))
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(4))
    w.grad = g.clone()
    teonspeed.HTMuon([("layers.0.mlp.down_proj.weight", w)], lr=1.0, ht_power=0.25, lr_scale="none").step()
    beta = 0.95
    nesterov = (1 - beta) * g + beta * ((1 - beta) * g)
    U, S, Vh = torch.linalg.svd(nesterov.double(), full_matrices=False)
    # HTMuon's SVD runs in fp32 (as the authors'): backward error ≈ √20·u·‖X‖ (probabilistic), and
    # X ↦ U Σᵖ Vᵀ grows a perturbation by at most σ_min^(p−1) (its divided differences: p·σ^(p−1) and
    # (σᵢᵖ + σⱼᵖ)/(σᵢ + σⱼ))
    grow = float(S.min()) ** (0.25 - 1)
    bound = (
        tol.sums(torch.float32, 20) * float(nesterov.norm()) * grow
        + tol.u() * float(S.max()) ** 0.25 * 12**0.5
    )
    assert float((-w.detach().double() - U @ torch.diag(S**0.25) @ Vh).norm()) <= bound


def test_htmuon_power_zero_is_muon_with_exact_polar():
    a, b = model_with_grads(), model_with_grads()
    run(teonspeed.HTMuon, a, ht_power=0.0)
    run(teonspeed.Muon, b, orthogonalizer="svd")
    # p = 0 gives U Vᵀ from an fp32 SVD, Muon's from an fp64 one: the polar factor moves by ≤ ‖δX‖_F/σ_min
    # (Li's bound), LAPACK's backward error ‖δX‖ ≈ √n·u·‖X‖ (tol.sums), for each direction the optimizer
    # saw; each step moves the weight by lr·√max(1, m/n) times that, and rounds it by u·|w| (twice)
    directions = nesterov_directions()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        bound = 2 * 3 * tol.LAMBDA * tol.u() * float(pb.norm())
        if pb.ndim == 2 and "embed" not in n and "lm_head" not in n:
            scale = max(1.0, pb.shape[0] / pb.shape[1]) ** 0.5
            bound += sum(
                0.02
                * scale
                * tol.sums(torch.float32, max(d.shape))
                * float(d.norm())
                / float(torch.linalg.svdvals(d).min())
                for d in directions[n]
            )
        assert float((pa - pb).norm()) <= bound, (n, float((pa - pb).norm()), bound)


def nesterov_directions(steps=3, beta=0.95):
    """name -> the Nesterov momentum direction each step orthogonalizes, for model_with_grads() fed by
    run(): M ← βM + (1−β)G, D = (1−β)G + βM (the optimizer's rule, computed in fp64)."""
    model = model_with_grads()
    momentum, out = {}, {}
    for s in range(steps):
        set_grads(model, s)
        for n, p in model.named_parameters():
            g = p.grad.double()
            momentum[n] = beta * momentum.get(n, torch.zeros_like(g)) + (1 - beta) * g
            out.setdefault(n, []).append((1 - beta) * g + beta * momentum[n])
    return out


def test_htmuon_interval_alternates_heavy_tail_and_muon():
    a = model_with_grads()
    opt = teonspeed.HTMuon(a.named_parameters(), ht_interval=2)
    calls = []
    original = opt.transform
    opt.transform = lambda x, step: calls.append(step) or original(x, step)
    for s in range(3):
        set_grads(a, s)
        opt.step()
    assert sorted(set(calls)) == [0, 1, 2]
    w = torch.nn.Parameter(torch.zeros(6, 8))
    w.grad = torch.randn(6, 8)
    ht = teonspeed.HTMuon([("layers.0.mlp.down_proj.weight", w)], ht_interval=2, lr=1.0, lr_scale="none")
    ht.step()
    first = -w.detach().clone()
    # step 0: heavy-tailed, σᵖ of a Gaussian 6×8's spread-out σ (a factor ≥ 2 apart): far from 1, by more than
    # 1e-2 ≫ any rounding of a 6×8 SVD (√8·u)
    assert not torch.allclose(torch.linalg.svdvals(first), torch.ones(6), atol=1e-2)
    w.grad = torch.randn(6, 8)
    before = w.detach().clone()
    ht.step()
    s = torch.linalg.svdvals(before - w.detach())
    assert 0.4 < s.min() and s.max() < 1.25  # step 1: ns5 orthogonalization


def test_teon_stacking_composes_with_htmuon():
    model = model_with_grads()
    opt = teonspeed.HTMuon(model.named_parameters(), teon_k=2, teon_types=("q", "k", "v"))
    assert len(opt.plan.teon_groups) == 6
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- state, closure, bad input --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [teonspeed.Muon, teonspeed.TEON, teonspeed.HTMuon])
def test_state_dict_round_trip_resumes_identically(cls):
    a = model_with_grads()
    opt_a = run(cls, a, steps=2)
    b = copy.deepcopy(a)
    opt_b = cls(b.named_parameters())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for s in range(2, 4):
        set_grads(a, s)
        set_grads(b, s)
        opt_a.step()
        opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_step_with_closure_returns_the_loss():
    model = TinyLlama()
    opt = teonspeed.TEON(model)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(tokens, tokens.roll(-1, dims=1))
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    for _ in range(10):
        last = opt.step(closure)
    assert last < first


def test_unknown_option_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match="'teon_kk' \\(did you mean 'teon_k'\\?\\).*valid options are"):
        teonspeed.TEON(TinyLlama().named_parameters(), teon_kk=2)
    with pytest.raises(ValueError, match="'ns_steps'"):
        teonspeed.Muon(TinyLlama().named_parameters(), ns_steps=0)
    with pytest.raises(ValueError, match="teon_k.*Muon"):
        teonspeed.Muon(TinyLlama().named_parameters(), teon_k=2)


def test_mismatched_teon_shapes_are_rejected_before_any_state():
    model = TinyLlama()
    model.layers[1].self_attn.q_proj = torch.nn.Linear(16, 12, bias=False)
    with pytest.raises(ValueError, match="different shapes"):
        teonspeed.TEON(model.named_parameters())


@pytest.mark.parametrize("cls", [teonspeed.Muon, teonspeed.TEON, teonspeed.HTMuon])
def test_nonfinite_gradient_skips_the_step_and_keeps_weights_and_state(cls):
    model = model_with_grads()
    opt = run(cls, model, steps=1)
    weights = params_of(model)
    state = copy.deepcopy(opt.state_dict())
    set_grads(model, 7)
    model.layers[1].self_attn.v_proj.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="layers.1.self_attn.v_proj.weight.*skipped"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        for key, t in v.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(t))
