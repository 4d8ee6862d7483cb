"""QK-clip as a GPU runs it, checked on the CPU with the `meta` stand-in device (support/device_standin.py):
the capture and the clip create every tensor on the device, hand collectives device tensors only, and
read nothing on the host (the step keeps its one host read); the clip adds one all-reduce under data
parallelism and none where no other rank holds the same heads."""

import pytest
import torch

import megatron_models as mm
import teonspeed
from support.device_standin import DeviceRecorder, set_standin_grads, to_standin
from support.harness import run_ranks
from teonspeed.qk_clip import group_eta, row_scale, scale_flat_rows, scale_rows
from teonspeed.qk_clip.logits import head_max_logits, head_max_of_scores
from teonspeed.qk_clip.rescale import K, NONE, Q, RowPart


def test_the_capture_and_the_rescale_stay_on_the_device_and_read_nothing():
    meta = dict(device="meta")
    q, k = torch.empty(2, 4, 64, 8, **meta), torch.empty(2, 2, 64, 8, **meta)
    scores = torch.empty(2, 4, 64, 64, **meta)
    pad = torch.empty(2, 1, 64, 64, dtype=torch.bool, **meta)
    weight, flat = torch.empty(24, 8, **meta), torch.empty(50, **meta)
    with DeviceRecorder() as rec:
        maxima = [
            head_max_logits(q, k, 0.35, causal=True, chunk_elements=2048),
            head_max_logits(q, k, 0.35, causal=False, allowed=pad, chunk_elements=2048),
            head_max_of_scores(scores, 2.0, causal=True, chunk_elements=2048),
            head_max_of_scores(scores, 2.0, causal=False, blocked=pad, chunk_elements=2048),
        ]
        eta = group_eta(maxima[0], 2, 100.0)
        scale = row_scale(eta, (RowPart(8, Q), RowPart(2, K), RowPart(2, NONE)), 0.5)
        scale_rows(weight, scale)
        scale_flat_rows(flat, 13, 8, scale)
    assert rec.host_reads == [] and all(m.device.type == "meta" for m in maxima)


def clipped_steps(rank, world_size, tp=1, steps=2):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = to_standin(mm.tiny_gpt(mm.tiny_config(num_layers=2, tp=tp)))
    opt = teonspeed.Muon(model, lr=0.02, adamw_lr=1e-3, qk_clip=1.0, parallel_mode="distributed")
    reads, collectives = [], []
    for _ in range(steps):
        set_standin_grads(model.parameters())
        with DeviceRecorder() as rec:
            for layer in opt.qk_clip.layers:  # what the forward's capture leaves: maxima on the device
                layer.source.observe(torch.empty(layer.num_heads, device="meta"))
            opt.step()
        reads.append(len(rec.host_reads))
        collectives.append(list(rec.collectives))
    assert opt.qk_clip.max_logit.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())
    return reads, collectives


@pytest.mark.parametrize("tp,clip_reduces", [(1, True), (2, False)], ids=["DP2", "TP2"])
def test_the_clip_adds_no_host_read_and_one_all_reduce_per_step_under_data_parallelism(tp, clip_reduces):
    for reads, collectives in run_ranks(clipped_steps, 2, tp=tp, timeout=60):
        assert reads == [1, 1]  # the step's own flag + digest read, nothing more
        for step in collectives:
            assert step.count("all_reduce") == 1 + clip_reduces, step  # the step check (+ the maxima over DP)
            if clip_reduces:
                assert step[-1] == "all_reduce"  # after the step's exchanges: the clip runs after the update
