"""Mistakes refused in one line, naming the parameter or option, before anything changes.

- a sparse gradient, or one whose shape / dtype / device is not its parameter's (set through `.data`):
  the step refuses before the first write, so weights, momentum buffers and AdamW state are bit-identical
  and the next good step equals that of an optimizer that never saw the bad one;
- teon_k larger than the model's blocks (no TEON stack would form): refused unless
  teon_per_layer_fallback=True;
- load_state_dict of another model: the refusal names the parameters that differ.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

import teonspeed
from tiny_models import TinyLlama

OPTIMIZERS = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def snapshot(model, opt):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
    }
    return weights, state


def assert_identical(a, b):
    (wa, sa), (wb, sb) = a, b
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
        assert sa[n].keys() == sb[n].keys(), n
        for k, v in sa[n].items():
            assert torch.equal(v, sb[n][k]) if torch.is_tensor(v) else v == sb[n][k], (n, k)


BAD_GRADIENTS = {
    # set through .data: torch checks `p.grad = g` but not `p.grad.data = g`
    "shape": lambda p: torch.zeros(3, 3),
    "dtype": lambda p: torch.zeros(p.shape, dtype=torch.float64),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("what", sorted(BAD_GRADIENTS))
def test_a_bad_gradient_on_a_late_parameter_changes_nothing(optimizer, what):
    model = TinyLlama(layers=2)
    opt = OPTIMIZERS[optimizer](model.named_parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    fresh_model = copy.deepcopy(model)
    fresh = OPTIMIZERS[optimizer](fresh_model.named_parameters(), lr=0.02, adamw_lr=1e-3, weight_decay=0.1)
    for m, o in ((model, opt), (fresh_model, fresh)):
        set_grads(m, 0)
        o.step()
    before = snapshot(model, opt)
    set_grads(model, 1)
    late = model.layers[1].mlp.down_proj.weight  # stepped after most matrices and every AdamW parameter
    late.grad.data = BAD_GRADIENTS[what](late)
    with pytest.raises(ValueError, match=f"'layers.1.mlp.down_proj.weight' has {what}") as err:
        opt.step()
    assert "\n" not in str(err.value)
    assert_identical(snapshot(model, opt), before)
    for m, o in ((model, opt), (fresh_model, fresh)):  # the next good step: as if the bad one never happened
        set_grads(m, 2)
        o.step()
    assert_identical(snapshot(model, opt), snapshot(fresh_model, fresh))


def test_a_sparse_gradient_is_refused_naming_the_parameter():
    model = TinyLlama(layers=2)
    model.embed_tokens = torch.nn.Embedding(model.vocab, 16, sparse=True)
    opt = teonspeed.TEON(model.named_parameters(), lr=0.02)
    tokens = torch.randint(0, model.vocab, (2, 5))
    model(tokens, tokens).backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="'embed_tokens.weight' has a sparse gradient.*sparse=False") as err:
        opt.step()
    assert "\n" not in str(err.value)
    assert_identical(snapshot(model, opt), before)


def test_a_gradient_on_another_device_is_named():
    # torch refuses `p.grad = g` across devices and `.data` across device types: the check is pure
    # metadata, so stand-ins with the attributes it reads show the rule.
    from teonspeed.optim.checks import gradient_problem

    p = SimpleNamespace(shape=torch.Size([2, 2]), dtype=torch.float32, device=torch.device("cuda", 0))
    p.grad = SimpleNamespace(
        layout=torch.strided, shape=p.shape, dtype=p.dtype, device=torch.device("cuda", 1)
    )
    assert "'w' has device cuda:1, the parameter cuda:0" in gradient_problem([("w", p)])
    p.grad.device = p.device
    assert gradient_problem([("w", p)]) is None


# -- teon_k against the blocks --------------------------------------------------------------------


def test_teon_k_larger_than_the_blocks_is_refused_with_the_fix():
    model = TinyLlama(layers=4)
    with pytest.raises(
        ValueError,
        match=r"teon_k=8 forms no TEON stack: the model has 4 block\(s\) with .*"
        r"teon_per_layer_fallback=True",
    ) as err:
        teonspeed.TEON(model, teon_k=8)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="teon_k=8 forms no TEON stack"):
        teonspeed.plan(model, "teon", teon_k=8)
    with pytest.raises(ValueError, match="teon_k=2 forms no TEON stack"):  # TEON's default on one block
        teonspeed.TEON(TinyLlama(layers=1))


def test_the_per_layer_fallback_is_an_explicit_option():
    model = TinyLlama(layers=4)
    opt = teonspeed.TEON(model, teon_k=8, teon_per_layer_fallback=True)
    assert not any(g.is_teon for g in opt.grouping.groups)
    assert "falls back to Muon" in str(opt.plan)
    # k = the blocks: one stack
    assert any(g.is_teon for g in teonspeed.TEON(model, teon_k=4).grouping.groups)
    teonspeed.TEON(TinyLlama(layers=3), teon_k=2)  # an odd last layer still falls back, as documented


# -- load_state_dict names what differs ------------------------------------------------------------


def stepped(model, **options):
    opt = teonspeed.TEON(model, lr=0.02, **options)
    set_grads(model, 0)
    opt.step()
    return opt


def test_a_state_of_a_model_with_other_layers_names_the_parameters_not_the_parallel_sizes():
    saved = stepped(TinyLlama(layers=4)).state_dict()
    opt = stepped(TinyLlama(layers=2))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"the checkpoint has 'layers\.2\..*which this model lacks") as err:
        opt.load_state_dict(saved)
    text = str(err.value)
    assert "\n" not in text and "TP" not in text and "loading into" not in text  # the sizes are equal
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(
        torch.equal(v, before["state"][i][k])
        for i, s in after["state"].items()
        for k, v in s.items()
        if torch.is_tensor(v)
    )


def test_a_state_with_another_shape_names_that_parameter():
    saved = stepped(TinyLlama(layers=2, ffn=24)).state_dict()
    opt = stepped(TinyLlama(layers=2, ffn=32))
    with pytest.raises(
        ValueError,
        match=r"another shape of 'layers\.0\.mlp\.gate_proj\.weight': local shape "
        r"\[24, 16\] in the checkpoint, \[32, 16\] here",
    ):
        opt.load_state_dict(saved)


def test_a_state_with_parameters_moved_between_groups_names_them():
    model = TinyLlama(layers=2)
    saved = stepped(model).state_dict()
    frozen = TinyLlama(layers=2)
    frozen.layers[1].norm.weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"the checkpoint has 'layers\.1\.norm\.weight', which this model lacks"
    ):
        stepped(frozen).load_state_dict(saved)


def test_a_distributed_optimizer_bucket_of_other_parameters_names_them():
    from teonspeed.integrations.megatron_distributed import _check_same_layout

    fc1, fc1_next = "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc1.weight"
    entries = [["decoder.layers.0.mlp.linear_fc2.weight", 0, [32, 48]], [fc1, 1536, [96, 32]]]
    current = {"rank": 0, "world_size": 2, "buckets": [[2, 2048, entries, 0, False]]}
    other = dict(current, buckets=[[2, 2048, entries[:1] + [[fc1_next, 1536, [96, 32]]], 0, False]])
    with pytest.raises(
        ValueError,
        match=r"bucket 0 differs in its parameters and offsets: the checkpoint has "
        r"'decoder\.layers\.1\.mlp\.linear_fc1\.weight', which this model lacks",
    ):
        _check_same_layout(other, current)
    moved = dict(current, buckets=[[2, 2048, entries[:1] + [[entries[1][0], 1600, [96, 32]]], 0, False]])
    with pytest.raises(ValueError, match=r"'decoder\.layers\.0\.mlp\.linear_fc1\.weight' at offset 1600"):
        _check_same_layout(moved, current)
