"""Muon, TEON and HTMuon (single process) against oracles: DeepSpeed's Muon, torch's AdamW, exact
SVD, a hand-computed TEON step, and Megatron's own QKV split."""
import copy
import math

import pytest
import torch

import teonspeed
from teonspeed.fused import LAYOUT_ATTR, qkv_layout, split
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
    torch.testing.assert_close(teonspeed.orthogonalize(x, "ns5"), ds_muon.zeropower_via_newtonschulz5(x, 5),
                               rtol=1e-5, atol=1e-6)


def test_ns5_in_bf16_matches_deepspeeds_bf16_iteration():
    from deepspeed.runtime.zero.muon import original_muon
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    ours = teonspeed.orthogonalize(x, "ns5", compute_dtype=torch.bfloat16).float()
    theirs = original_muon.zeropower_via_newtonschulz5(x, 5).float()
    exact_fp32 = teonspeed.orthogonalize(x, "ns5", compute_dtype=torch.float32)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # bf16 rounding compounds over 5 iterations: both land a few % from the fp32 result, ours no further.
    assert rel(ours, theirs) < 6e-2
    assert rel(ours, exact_fp32) <= 1.5 * rel(theirs, exact_fp32) + 1e-3


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_muon_step_equals_deepspeeds_muon_update(ds_muon, shape):
    lr, wd, beta = 0.05, 0.1, 0.95
    w = torch.nn.Parameter(torch.randn(*shape))
    w_ref = w.detach().clone()
    momentum_ref = torch.zeros_like(w_ref)
    opt = teonspeed.Muon([("decoder.layers.0.mlp.linear_fc2.weight", w)], lr=lr, weight_decay=wd, momentum=beta)
    for s in range(3):
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(s))
        w.grad = grad.clone()
        opt.step()
        update = ds_muon.muon_update(grad.clone(), momentum_ref, beta=beta, ns_steps=5, nesterov=True,
                                     ns_method="standard")
        w_ref = w_ref * (1 - lr * wd) - lr * update
    torch.testing.assert_close(w.detach(), w_ref, rtol=1e-5, atol=1e-6)


# -- routing and the AdamW part ---------------------------------------------------------------------

def test_adamw_part_equals_torch_adamw():
    model = model_with_grads()
    ref = copy.deepcopy(model)
    adamw_names = [n for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n or "lm_head" in n]
    run(teonspeed.TEON, model, adamw_lr=1e-2, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.1)
    ref_params = dict(ref.named_parameters())
    torch_opt = torch.optim.AdamW([ref_params[n] for n in adamw_names], lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                                  weight_decay=0.1, foreach=False)
    for s in range(3):
        set_grads(ref, s)
        torch_opt.step()
    got = dict(model.named_parameters())
    for n in adamw_names:
        torch.testing.assert_close(got[n], ref_params[n], rtol=1e-6, atol=1e-7)


def test_matrices_get_orthogonalized_updates():
    model = model_with_grads()
    before = params_of(model)
    opt = teonspeed.Muon(model.named_parameters(), lr=1.0, orthogonalizer="svd", lr_scale="none", momentum=0.0)
    opt.step()
    delta = before["layers.2.self_attn.o_proj.weight"] - model.layers[2].self_attn.o_proj.weight.detach()
    torch.testing.assert_close(delta.T @ delta, torch.eye(16), rtol=0, atol=1e-5)


# -- TEON ---------------------------------------------------------------------------------------------

def test_teon_hand_computed_two_block_step():
    """Z = [G1 | G2] has orthogonal rows, so its polar factor is Z with each row normalised."""
    g1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    g2 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    w1, w2 = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = teonspeed.TEON([("model.layers.0.self_attn.q_proj.weight", w1), ("model.layers.1.self_attn.q_proj.weight", w2)],
                         lr=0.1, orthogonalizer="svd", teon_mode=1)
    assert opt.plan.teon_groups and opt.plan.teon_groups[0].stacked_shape == (2, 4)
    w1.grad, w2.grad = g1.clone(), g2.clone()
    opt.step()
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(w1.detach(), torch.ones(2, 2) - 0.1 * torch.tensor([[1.0, 0.0], [0.0, r]]))
    torch.testing.assert_close(w2.detach(), torch.ones(2, 2) - 0.1 * torch.tensor([[0.0, 0.0], [0.0, r]]))


@pytest.mark.parametrize("teon_mode, dim", [(1, 1), (2, 0)])  # mode 1: along the input dim; 2: the output dim
def test_teon_update_is_the_split_polar_factor_of_the_stack(teon_mode, dim):
    model = model_with_grads()
    before = params_of(model)
    directions = {n: p.grad.clone() for n, p in model.named_parameters()}
    teonspeed.TEON(model.named_parameters(), lr=1.0, orthogonalizer="svd", momentum=0.0, teon_mode=teon_mode).step()
    q0, q1 = (f"layers.{i}.self_attn.k_proj.weight" for i in (0, 1))
    polar = teonspeed.orthogonalize(torch.cat([directions[q0], directions[q1]], dim=dim).double(), "svd").float()
    first, second = polar.chunk(2, dim=dim)
    scale = math.sqrt(8 / 16)  # fan_ratio √(m/n) of the single layer, TEON's default
    torch.testing.assert_close(before[q0] - dict(model.named_parameters())[q0], scale * first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before[q1] - dict(model.named_parameters())[q1], scale * second, atol=1e-5, rtol=1e-5)


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
    teonspeed.Muon([("decoder.layers.0.self_attention.linear_qkv.weight", w)], lr=1.0, orthogonalizer="svd",
                   momentum=0.0, lr_scale="none").step()
    got = split(-w.detach(), qkv_layout(heads, groups, hd))
    for name in ("q", "k", "v"):
        torch.testing.assert_close(got[name], teonspeed.orthogonalize(parts[name], "svd"), atol=1e-6, rtol=1e-5)


# -- HTMuon ---------------------------------------------------------------------------------------------

def test_htmuon_update_is_u_sigma_p_vt_of_the_nesterov_momentum():
    w = torch.nn.Parameter(torch.zeros(12, 20))
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(4))
    w.grad = g.clone()
    teonspeed.HTMuon([("layers.0.mlp.down_proj.weight", w)], lr=1.0, ht_power=0.25, lr_scale="none").step()
    beta = 0.95
    nesterov = (1 - beta) * g + beta * ((1 - beta) * g)
    U, S, Vh = torch.linalg.svd(nesterov.double(), full_matrices=False)
    torch.testing.assert_close(-w.detach().double(), U @ torch.diag(S**0.25) @ Vh, atol=1e-5, rtol=1e-5)


def test_htmuon_power_zero_is_muon_with_exact_polar():
    a, b = model_with_grads(), model_with_grads()
    run(teonspeed.HTMuon, a, ht_power=0.0)
    run(teonspeed.Muon, b, orthogonalizer="svd")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)


def test_htmuon_interval_alternates_heavy_tail_and_muon():
    a, b = model_with_grads(), model_with_grads()
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
    assert not torch.allclose(torch.linalg.svdvals(first), torch.ones(6), atol=1e-2)  # step 0: heavy-tailed
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
