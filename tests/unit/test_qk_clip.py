"""QK-clip's math and its Hugging Face path, in one process: the chunked per-head maximum against the full
logits (a float64 oracle), the row factors and the partition-cut rescale against the whole-matrix one, a
LLaMA (GQA) whose clipped heads come out at exactly τ and the rest untouched, a run kept near τ, options
refused with their fix, and a checkpoint that resumes exactly with nothing extra saved."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import teonspeed
from teonspeed.config import make_config
from teonspeed.qk_clip import group_eta, row_scale, scale_flat_rows, scale_rows
from teonspeed.qk_clip.logits import head_max_logits, head_max_of_scores
from teonspeed.qk_clip.rescale import FULL, K, NONE, Q, RowPart

transformers = pytest.importorskip("transformers")


# -- the per-head maximum ------------------------------------------------------------------------------
def _oracle(q, k, scale, causal=False, allowed=None, blocked=None):
    """The full logits in float64, masked as the attention masks them, max per query head."""
    group = q.size(1) // k.size(1)
    s = torch.matmul(q.double(), k.double().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf) if allowed.dtype == torch.bool else s + allowed.double()
    if blocked is not None:
        s = s.masked_fill(blocked, -math.inf)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return s.amax(dim=(0, 2, 3))


def _bound(q, k, scale):
    """Rounding of an fp32 dot product of length d: at most d·u·Σ|q_i k_i| (u = 2⁻²⁴), doubled for the
    scaling and the fp32 accumulation order; over every head and position."""
    group = q.size(1) // k.size(1)
    mags = torch.matmul(q.abs().double(), k.abs().double().repeat_interleave(group, dim=1).transpose(-1, -2))
    return 2 * q.size(-1) * 2**-24 * float(mags.max()) * scale


@pytest.mark.parametrize("mask", ["causal", "allowed", "additive", "blocked"])
def test_head_max_logits_equals_the_full_logits_in_chunks(mask):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=g) * 3, torch.randn(2, 2, 10, 8, generator=g) * 3  # GQA 4/2
    pad = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    pad[1, :, :, 7:] = False  # the second sequence's last 3 keys are padding
    kw = {
        "causal": dict(causal=True),
        "allowed": dict(allowed=pad),
        "blocked": dict(blocked=~pad),
        "additive": dict(allowed=torch.zeros(pad.shape).masked_fill(~pad, torch.finfo(torch.float32).min)),
    }[mask]
    scale = 8**-0.5
    got = head_max_logits(q, k, scale, causal=kw.pop("causal", False), chunk_elements=2 * 4 * 10 * 3, **kw)
    want = _oracle(q, k, scale, causal=mask == "causal", **kw)
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got.double(), want, rtol=0, atol=_bound(q, k, scale))
    scores = torch.matmul(q, k.repeat_interleave(2, dim=1).transpose(-1, -2))  # scaled inside, as Megatron's
    from_scores = head_max_of_scores(scores, scale, causal=mask == "causal", chunk_elements=240, **kw)
    assert torch.allclose(from_scores.double(), want, rtol=0, atol=_bound(q, k, scale))


class _Largest(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


def test_the_capture_never_materialises_more_than_a_chunk_of_logits():
    q, k = torch.randn(1, 4, 256, 8), torch.randn(1, 4, 256, 8)
    with _Largest() as watch:
        head_max_logits(q, k, 0.35, causal=True, chunk_elements=4 * 256 * 16)
    assert watch.largest <= 4 * 256 * 16 < 4 * 256 * 256  # 16 query rows at a time, not all 256


# -- the row factors -------------------------------------------------------------------------------------
def test_eta_is_threshold_over_the_groups_largest_logit_where_it_exceeds_it():
    head_max = torch.tensor([3.0, 1.0, 0.5, -math.inf, 8.0, 2.0])
    eta = group_eta(head_max, heads_per_group=2, threshold=2.0)  # groups (3, 1), (0.5, -inf), (8, 2)
    assert eta.dtype == torch.float32 and eta.tolist() == [torch.tensor(2 / 3).item(), 1.0, 0.25]  # fp32 2/3
    scale = row_scale(eta, (RowPart(2, Q), RowPart(1, K), RowPart(1, NONE)), alpha=0.25)
    rows = [[e**0.25] * 2 + [e**0.75, 1.0] for e in eta.tolist()]
    assert scale.tolist() == pytest.approx(sum(rows, []), rel=1e-7)
    assert row_scale(eta, (RowPart(1, FULL),), 0.5).tolist() == eta.tolist()


def test_a_partition_cut_anywhere_is_rescaled_as_the_whole_matrix():
    w = torch.randn(5, 7)
    scale = torch.rand(5) + 0.5
    whole = w.clone()
    scale_rows(whole, scale)
    flat = w.reshape(-1)
    for first in range(35):
        for size in range(1, 36 - first):
            piece = flat[first : first + size].clone()
            scale_flat_rows(piece, first, 7, scale)
            assert torch.equal(piece, whole.reshape(-1)[first : first + size]), (first, size)


# -- Hugging Face LLaMA (GQA): capture, rows, a run -------------------------------------------------------
def tiny_llama(impl="sdpa", seed=0, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_bias=bias,
    )
    config._attn_implementation = impl
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _tokens(seed=0, batch=3, seq=12):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _attention_inputs(model, tokens):
    """What each attention module received (module, hidden states, RoPE tables), in an unrecorded forward."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(
            (
                module,
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                kwargs["position_embeddings"],
            )
        )

    handles = [
        layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers
    ]
    training = model.training
    model.eval()  # (not recorded by the clip)
    with torch.no_grad():
        model(tokens)
    model.train(training)
    for h in handles:
        h.remove()
    return seen


@torch.no_grad()
def _llama_logit_oracle(model, tokens, inputs=None):
    """Per layer, the per-head max of the causal logits in float64 (and its rounding bound), from the
    attention module's input and current weights, computed without teonspeed."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = []
    for m, hidden, (cos, sin) in inputs or _attention_inputs(model, tokens):
        shape = (*hidden.shape[:-1], -1, m.head_dim)
        q = m.q_proj(hidden).view(shape).transpose(1, 2)
        k = m.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((_oracle(q, k, m.scaling, causal=True), _bound(q, k, m.scaling)))
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama_capture_equals_the_attentions_logits(impl):
    model = tiny_llama(impl)
    opt = teonspeed.Muon(model, lr=0.0, adamw_lr=0.0, qk_clip_log=True)  # the weights the oracle sees
    tokens = _tokens()
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    for got, (want, bound) in zip(opt.qk_clip.head_max, _llama_logit_oracle(model, tokens)):
        assert torch.allclose(got.double(), want, rtol=0, atol=bound)
    assert float(opt.qk_clip.max_logit) == max(float(h.max()) for h in opt.qk_clip.head_max)
    assert not opt.qk_clip.fresh
    model.eval()  # evaluation forwards are not recorded
    model(tokens)
    assert not opt.qk_clip.fresh
    model.train()
    model(tokens)
    assert opt.qk_clip.fresh


@pytest.mark.parametrize("bias", [False, True])
def test_hf_gqa_clip_brings_each_clipped_group_to_tau_and_leaves_the_rest(bias):
    """lr = 0: the step changes nothing, so the clip alone acts. Every logit of a group scales by its η, so
    the group's largest becomes τ; heads of unclipped groups, the value rows and the MLP are untouched."""
    model = tiny_llama(bias=bias)
    if bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.3)
                layer.self_attn.k_proj.bias.normal_(0, 0.3)
    tokens = _tokens()
    inputs = _attention_inputs(model, tokens)  # the layers after a clipped one see other inputs: hold them
    before = [h for h, _ in _llama_logit_oracle(model, tokens, inputs)]
    group_max = torch.stack([h.view(2, 2).amax(1) for h in before])  # [layer, group]
    tau = float(group_max.flatten().sort().values[1:3].mean())  # between the 2nd and 3rd largest of 4 groups
    assert (group_max > tau).any() and (group_max < tau).any()
    v_before = [layer.self_attn.v_proj.weight.clone() for layer in model.model.layers]
    opt = teonspeed.Muon(model, lr=0.0, adamw_lr=0.0, qk_clip=tau)
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    after = [h for h, _ in _llama_logit_oracle(model, tokens, inputs)]
    for layer, (b, a) in enumerate(zip(before, after)):
        eta = torch.where(group_max[layer] > tau, tau / group_max[layer], torch.ones(2, dtype=torch.float64))
        # fp32 weights rescaled and logits recomputed: a few ulps of the logits (2⁻²⁰ relative covers d = 8)
        assert torch.allclose(a, b * eta.repeat_interleave(2), rtol=2**-20, atol=0), layer
        capped = torch.minimum(group_max[layer], torch.tensor(tau).double())
        assert torch.allclose(a.view(2, 2).amax(1), capped, rtol=2**-20, atol=0)
        assert torch.equal(model.model.layers[layer].self_attn.v_proj.weight, v_before[layer])


def _run(model, steps, tau=None, log=False, lr=0.05):
    opt = teonspeed.Muon(model, lr=lr, adamw_lr=3e-3, qk_clip=tau, qk_clip_log=log)
    tokens = _tokens(seed=1, batch=4, seq=16)
    maxima = []
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
        maxima.append(float(opt.qk_clip.max_logit))
    return maxima


def test_a_run_whose_logits_exceed_tau_without_the_clip_stays_near_tau_with_it():
    """The clip uses the step's forward logits (before its update), so the next forward can exceed τ by one
    step's growth: at lr 0.02 on this model a step grows the largest logit by under 10%."""
    free = _run(tiny_llama(), 40, log=True, lr=0.02)
    tau = max(free) / 2
    assert max(free[20:]) > 1.5 * tau  # without the clip the logits grow well past τ
    clipped = _run(tiny_llama(), 40, tau=tau, lr=0.02)
    first = next(i for i, m in enumerate(free) if m > tau)
    assert clipped[: first + 1] == free[: first + 1]  # below τ the factor is exactly 1: nothing changes
    assert max(clipped[first + 2 :]) <= 1.2 * tau, clipped  # the bound, from the second step after
    assert min(clipped[first + 2 :]) >= 0.8 * tau  # held near τ, not collapsed


def test_a_skipped_step_is_not_clipped_and_the_next_one_is_clipped_once():
    model = tiny_llama()
    opt = teonspeed.Muon(model, lr=0.0, adamw_lr=0.0, qk_clip=1e-3)  # every head far above τ
    tokens = _tokens()
    model(tokens, labels=tokens).loss.backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the skip promise holds
    opt.zero_grad()
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    eta = 1e-3 / opt.qk_clip.head_max[0].view(2, 2).amax(1)  # this forward's η per group
    want = before["model.layers.0.self_attn.q_proj.weight"].view(2, -1) * eta.sqrt().unsqueeze(1)
    # one rescale, by this step's η: pow(η, 0.5) against sqrt(η) one ulp apart, the product one more (2⁻²²),
    # doubled for the fp32 η recomputed here
    assert torch.allclose(q.view(2, -1), want, rtol=2**-21, atol=0)
    clipped = q.clone()
    opt.step()  # a step() without a forward since: nothing recorded, nothing rescaled again
    assert torch.equal(q, clipped) and not opt.qk_clip.fresh


# -- options and refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,match",
    [
        ({"qk_clip": 0.0}, r"option 'qk_clip' must be None \(off\) or a finite number > 0"),
        ({"qk_clip": float("inf")}, r"option 'qk_clip' must be None \(off\) or a finite number > 0"),
        ({"qk_clip": True}, r"option 'qk_clip' must be None \(off\) or a finite number > 0"),
        ({"qk_clip_alpha": 1.5}, r"option 'qk_clip_alpha' must be a number in \[0, 1\]"),
        ({"qk_clip_log": "yes"}, r"option 'qk_clip_log' must be true or false"),
        (
            {"qk_clip": 50.0, "qk_clip_log": True},
            r"option 'qk_clip_log' logs the max logit without clipping; unset",
        ),
    ],
)
def test_bad_qk_clip_options_are_refused_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        make_config("muon", options)


def test_qk_clip_without_the_model_is_refused_before_the_first_step_changes_anything():
    model = tiny_llama()
    opt = teonspeed.Muon(model.named_parameters(), lr=0.02, qk_clip=1.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model(_tokens(), labels=_tokens()).loss.backward()
    with pytest.raises(
        ValueError, match=r"'qk_clip'/'qk_clip_log' needs the model .* teonspeed.qk_clip.attach"
    ):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    teonspeed.qk_clip.attach(model, opt)  # the explicit way
    model(_tokens(), labels=_tokens()).loss.backward()
    opt.step()
    assert opt.qk_clip.max_logit is not None
    with pytest.raises(ValueError, match="already attached"):
        teonspeed.qk_clip.attach(model, opt)


def test_attention_that_undoes_the_rescale_or_hides_its_logits_is_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    with pytest.raises(ValueError, match=r"q_norm/k_norm normalise every query and key head"):
        teonspeed.Muon(qwen, qk_clip=10.0)
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        ValueError, match=r"attn_implementation 'flash_attention_2' does not expose its logits"
    ):
        teonspeed.Muon(model, qk_clip=10.0)
    with pytest.raises(ValueError, match="found no attention layer"):
        teonspeed.Muon(torch.nn.Sequential(torch.nn.Linear(4, 4)), qk_clip=10.0)


# -- checkpoints: nothing extra to save -----------------------------------------------------------------
def test_a_clipped_run_resumes_exactly_from_model_and_optimizer_state():
    def fresh():
        model = tiny_llama()
        return model, teonspeed.TEON(model, lr=0.05, adamw_lr=3e-3, qk_clip=0.2)

    def steps(model, opt, n, start):
        for i in range(start, start + n):
            tokens = _tokens(seed=i, batch=2)
            model(tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()

    model, opt = fresh()
    steps(model, opt, 4, 0)
    half_model, half_opt = fresh()
    steps(half_model, half_opt, 2, 0)
    saved = (dict(half_model.state_dict()), half_opt.state_dict())
    assert not any("qk" in str(k) for k in saved[1]) and not any("qk" in k for k in saved[0])
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    steps(resumed, resumed_opt, 2, 2)
    assert all(torch.equal(p, dict(resumed.named_parameters())[n]) for n, p in model.named_parameters())
