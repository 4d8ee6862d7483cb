"""DeepSpeed MoE (deepspeed.moe.layer.MoE, ep_size=2 on 4 gloo ranks) under ZeRO-1/2: the param group
marked moe=True is partitioned over the expert-data-parallel group, so teonspeed plans it on the expert
topology; the result equals ZeRO stage 0 (whole parameters, no partitions) on every rank."""

import copy

import pytest
import torch

import ds_helpers as h
from support import tolerance as tol
from support.harness import RankError, run_ranks

WORLD, EP, STEPS = 4, 2, 2


class GatedExpert(torch.nn.Module):
    """A gated MLP whose gate and up matrices are one 3-D weight (a grouped-GEMM layout: teonspeed
    orthogonalizes each slice), and a 2-D down projection."""

    def __init__(self, d, ffn):
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.randn(2, ffn, d) * 0.2)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(x @ self.gate_up[0].T) * (x @ self.gate_up[1].T))


class TinyMoELM(torch.nn.Module):
    """Two blocks of norm → DeepSpeed MoE (4 gated experts, top-1) → o_proj."""

    def __init__(self, d=16, ffns=(24, 12)):
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(h.VOCAB, d)
        self.layers = torch.nn.ModuleList()
        for ffn in ffns:  # unequal blocks: the expert-DP partition boundary cuts a 3-D weight's slice
            block = torch.nn.Module()
            block.norm = torch.nn.LayerNorm(d)
            block.moe = MoE(
                hidden_size=d,
                expert=GatedExpert(d, ffn),
                num_experts=4,
                ep_size=EP,
                k=1,
                min_capacity=0,
                drop_tokens=False,
            )
            block.o_proj = torch.nn.Linear(d, d, bias=False)
            self.layers.append(block)
        self.lm_head = torch.nn.Linear(d, h.VOCAB, bias=False)

    def forward(self, tokens, labels):
        x, aux = self.embed_tokens(tokens), 0.0
        for b in self.layers:
            y, l_aux, _ = b.moe(b.norm(x))
            x, aux = x + b.o_proj(y), aux + l_aux
        logits = self.lm_head(x).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, h.VOCAB), labels.reshape(-1)) + 0.01 * aux


def train(rank, world_size, stage, mode="distributed"):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    model = TinyMoELM()
    with torch.no_grad():  # DeepSpeed copies one expert module: give each global expert its own weights
        for name, p in model.named_parameters():
            if not getattr(p, "allreduce", True):
                local = int(name.split("deepspeed_experts.")[1].split(".")[0])
                expert = (
                    dist.get_rank() % EP * 2 + local
                )  # DeepSpeed's expert-parallel groups: adjacent ranks
                p.copy_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * expert + len(name)))
                    * 0.2
                )
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=copy.deepcopy(
            h.ds_config("TEON", stage=stage, params={"parallel_mode": mode, "teon_per_layer_fallback": True})
        ),
    )  # no q/k/v here: no TEON stack
    # the stages reduce the 4 ranks' gradients in other orders (all-reduce, reduce-scatter): sums of 4 terms
    budget = tol.RoundingBudget(engine.basic_optimizer, eps_in=tol.sums(torch.float32, WORLD))
    for step in range(STEPS):
        tokens, labels = h.batch(step, dist.get_rank())
        engine.backward(engine(tokens, labels))
        engine.step()
    opt = engine.basic_optimizer
    # (expert partition?, work-group size) of every planned ZeRO partition that orthogonalizes something
    plans = list(zip(opt.partitions.values(), opt.zero_plans))  # each flat partition and its plan
    planned = sorted(
        {
            (all(opt.parallel.spec(e.name).is_expert for e in fp.entries), plan.work_size)
            for fp, plan in plans
            if plan.jobs
        }
    )
    expert_jobs = [
        j for fp, plan in plans if opt.parallel.spec(fp.entries[0].name).is_expert for j in plan.jobs
    ]
    slices = {(j.cut, any(u.expert_index is not None for u in j.units)) for j in expert_jobs}
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return weights, planned, slices, budget.weights(0.02)


@pytest.fixture(scope="module")
def zero0():
    """ZeRO-0, checked against every rank computing every matrix itself (no exchange at all)."""
    owner_compute = run_ranks(train, WORLD, 0, timeout=120)
    replicated = run_ranks(train, WORLD, 0, mode="replicated", timeout=120)
    for a, b in zip(owner_compute, replicated):  # the same gradients: the iterations' rounding only
        assert tol.distance(a[0], b[0]) <= a[3], (tol.distance(a[0], b[0]), a[3])
    return owner_compute


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_moe_zero_1_2_equal_zero_0(zero0, stage):
    got = run_ranks(train, WORLD, stage, timeout=120)
    for rank in range(WORLD):
        # the experts' partitions over expert-DP (2 ranks), the dense ones over DP (4 ranks)
        assert got[rank][1] == [(False, WORLD), (True, WORLD // EP)], got[rank][1]
        assert (True, True) in got[rank][2]  # an expert job holding a 3-D weight's slice is cut and exchanged
        params, ref = got[rank][0], zero0[rank][0]
        assert any("deepspeed_experts.1." in n for n in params)
        # the gradients' reduction order and the iterations' rounding (tol.RoundingBudget; each step's
        # gradients also see the previous steps' weight differences, of the budget's own size, which the
        # per-step sums(4) of a gradient reduction exceeds while the budget stays far below the weights)
        assert tol.distance(params, ref) <= zero0[rank][3], (rank, tol.distance(params, ref), zero0[rank][3])
    # expert-DP replicas (ranks r and r + EP hold the same experts) stayed identical; EP peers did not
    for name, p in got[0][0].items():
        assert torch.equal(p, got[EP][0][name]), name
        assert ("deepspeed_experts" in name) != torch.equal(p, got[1][0][name]), name


def _attach_mixed_partition(rank, world_size):
    import torch.distributed as dist

    import teonspeed
    from teonspeed.parallel.context import ParallelContext
    from teonspeed.parallel.flat import FlatEntry, FlatPartition
    from teonspeed.parallel.shard_spec import ShardSpec

    named = [
        ("layers.0.o_proj.weight", torch.nn.Parameter(torch.zeros(4, 4))),
        ("layers.0.experts.0.weight", torch.nn.Parameter(torch.zeros(4, 4))),
    ]
    ctx = ParallelContext(
        specs={named[0][0]: ShardSpec(), named[1][0]: ShardSpec(is_expert=True)},
        dp_group=dist.group.WORLD,
        expert_dp_group=dist.group.WORLD,
    )
    opt = teonspeed.Muon(named, parallel=ctx, lr=0.02)
    entries = [FlatEntry(named[0][0], 0, (4, 4)), FlatEntry(named[1][0], 16, (4, 4))]
    opt.attach_flat_partitions({0: FlatPartition(entries, 16, dist.group.WORLD, rank, world_size)})


def test_a_zero_partition_mixing_dense_and_expert_weights_is_refused():
    """DeepSpeed and Megatron never build one (DeepSpeed asserts a moe=True group holds only expert
    parameters, Megatron keeps separate expert buffers); a hand-made layout that does is refused at attach,
    naming one weight of each kind and the fix."""
    with pytest.raises(
        RankError,
        match=r"holds dense weights \('layers.0.o_proj.weight'\) and expert-parallel "
        r"weights \('layers.0.experts.0.weight'\)(.|\n)*own param group",
    ):
        run_ranks(_attach_mixed_partition, 2, timeout=60)
