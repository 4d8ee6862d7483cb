"""QK-clip's cost and effect on the CPU.

    .venv/bin/python bench/qk_clip.py               # overhead of the capture per attention path (~1 minute)
    .venv/bin/python bench/qk_clip.py --quickstart  # + the quickstart run twice: unclipped, then clipped at
                                                    # half its largest logit (~5 minutes on 2 cores)

Overhead: the forward pass of a model (training mode) with and without the logit capture, median of
`--repeats` timed passes after a warm-up, for each path the clip reads logits from: megatron-core's local
DotProductAttention (the softmax's input, no extra matmul), megatron-core with an SDPA core attention (the
launcher's MLA path: QKᵀ recomputed chunk by chunk), Hugging Face LLaMA eager and SDPA (recomputed). Memory:
the largest tensor the capture's own calls create (watched by a TorchFunctionMode), next to the size of one
layer's full QKᵀ in fp32, which the chunking avoids. The clip after the step (one [heads] all-reduce, a
row rescale of the q/k weights) is timed separately on the optimizer step.

Quickstart (`python -m launch.pretrain` defaults, as scripts/pretrain.sh runs them: llama_tiny, TEON,
DeepSpeed ZeRO-1, 2 data-parallel ranks, 200 steps, the embedded corpus): --qk-clip-log, then --qk-clip at
half of that run's largest logged maximum; records every step's maximum and whether it stays within 1.2 τ
from step 3 on. Writes bench/results/qk_clip_cpu.{json,md}. Measurements, not tests: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import teonspeed  # noqa: E402
from gpu_report import environment, environment_line, write_result  # noqa: E402  (bench/)


class LargestTensor(TorchFunctionMode):
    """The largest tensor (bytes) any torch call returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.bytes = max(self.bytes, out.numel() * out.element_size())
        return out


@contextlib.contextmanager
def capture_watched():
    """LargestTensor active inside the capture's calls only (not the model's own tensors)."""
    from teonspeed.qk_clip import capture, hf_layers

    watch = LargestTensor()
    originals = {
        (m, name): getattr(m, name)
        for m, name in (
            (capture, "head_max_logits"),
            (capture, "head_max_of_scores"),
            (hf_layers, "head_max_logits"),
        )
    }

    def watched(fn):
        def call(*args, **kwargs):
            with watch:
                return fn(*args, **kwargs)

        return call

    for (m, name), fn in originals.items():
        setattr(m, name, watched(fn))
    try:
        yield watch
    finally:
        for (m, name), fn in originals.items():
            setattr(m, name, fn)


# -- models, one per capture path --------------------------------------------------------------------------
def hf_llama(impl: str, hidden: int, heads: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=4096,
    )
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return model, lambda tokens: model(tokens)


def megatron_gpt(core: str, hidden: int, heads: int, layers: int, seq: int):
    """megatron-core GPT with the local spec (GQA, 2 heads per group); core="sdpa" swaps in the launcher's
    SDPA core attention (written for MLA, which has no GQA: every head its own group there)."""
    import megatron_models as mm
    from launch.model import SDPACoreAttention
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    groups = heads if core == "sdpa" else heads // 2
    config = mm.tiny_config(num_layers=layers, hidden=hidden, heads=heads, groups=groups, ffn=hidden * 8 // 3)
    spec = get_gpt_layer_local_spec()
    if core == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    mm.cpu_shims.megatron_seed(0)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=1024,
        max_sequence_length=seq,
        position_embedding_type="rope",
    )

    def forward(tokens):
        positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
        return model(tokens, positions, None)

    return model, forward


PATHS = {
    "megatron DotProductAttention (softmax input)": lambda h, n, l, s: megatron_gpt("local", h, n, l, s),
    "megatron SDPA core attention (recomputed)": lambda h, n, l, s: megatron_gpt("sdpa", h, n, l, s),
    "Hugging Face LLaMA eager (recomputed)": lambda h, n, l, s: hf_llama("eager", h, n, l),
    "Hugging Face LLaMA SDPA (recomputed)": lambda h, n, l, s: hf_llama("sdpa", h, n, l),
}


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_flops(fn: Callable[[], None]) -> int:
    """The forward's matmul/attention FLOPs (torch's FlopCounterMode): machine-independent extra work."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def overhead(sizes: List[Dict[str, int]], repeats: int, log) -> List[dict]:
    """Paired: each repeat times the forward without, then with the capture (attached, timed, detached), so
    a load change on the shared machine hits both; the overhead is the median of the paired ratios."""
    rows = []
    for size in sizes:
        h, n, layers, s, b = size["hidden"], size["heads"], size["layers"], size["seq"], size["batch"]
        tokens = torch.randint(0, 1024, (b, s), generator=torch.Generator().manual_seed(0))
        for label, build in PATHS.items():
            model, forward = build(h, n, layers, s)
            model.train()  # the capture records training forwards only

            def run():
                with torch.no_grad():
                    forward(tokens)

            run()  # warm-up
            base, captured = [], []
            for _ in range(repeats):
                base.append(timed(run))
                clip = teonspeed.qk_clip.attach(model, threshold=100.0)
                captured.append(timed(run))
                clip.detach()
            flops = matmul_flops(run)
            clip = teonspeed.qk_clip.attach(model, threshold=100.0)
            with capture_watched() as watch:
                run()
            flops_captured = matmul_flops(run)
            clip.detach()
            ratio = statistics.median(c / b_ - 1 for b_, c in zip(base, captured))
            rows.append(
                {
                    "path": label,
                    **size,
                    "forward_ms": statistics.median(base) * 1e3,
                    "with_capture_ms": statistics.median(captured) * 1e3,
                    "overhead_pct": 100 * ratio,
                    "extra_flops_pct": 100 * (flops_captured / flops - 1),
                    "largest_tensor_bytes": watch.bytes,
                    "full_qk_bytes": b * n * s * s * 4,
                }
            )
            r = rows[-1]
            log(
                f"  {label:48s} h{h} s{s} b{b}: {r['forward_ms']:8.1f} -> {r['with_capture_ms']:8.1f} ms "
                f"({r['overhead_pct']:+.1f}%, matmul FLOPs {r['extra_flops_pct']:+.1f}%)"
            )
    return rows


def clip_step_cost(repeats: int) -> dict:
    """The clip after a step: Muon's step on the quickstart-sized LLaMA with and without qk_clip."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = {}
    for tau in (None, 0.999):  # every head clipped (its recorded max is 1.0) by a factor close to 1
        config = LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        opt = teonspeed.Muon(model, lr=0.0, adamw_lr=0.0, qk_clip=tau)
        tokens = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
        model(tokens, labels=tokens).loss.backward()

        def step():
            if opt.qk_clip is not None:  # a recorded forward for the clip to read
                for layer in opt.qk_clip.layers:
                    layer.source.value = torch.full((layer.num_heads,), 1.0)
            opt.step()

        step()
        rows["step_ms" if tau is None else "step_with_clip_ms"] = (
            statistics.median(timed(step) for _ in range(repeats)) * 1e3
        )
    return rows


# -- the quickstart ------------------------------------------------------------------------------------------
def _rank_main(rank, world_size, argv):
    from launch import pretrain

    return pretrain.main(argv)


def quickstart(runs_dir: Path, log) -> dict:
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    from support.harness import run_ranks
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()  # what launch.pretrain does under --device cpu, once here for the forked ranks
    from launch import pretrain, train  # noqa: F401  (imported once; the ranks are forked from here)

    common = ["--runs-dir", str(runs_dir), "--progress", "off", "--no-plot", "--overwrite"]
    log("  quickstart, --qk-clip-log ...")
    free = run_ranks(_rank_main, 2, common + ["--name", "qk_log", "--qk-clip-log"], timeout=3600)[0]
    tau = max(free["max_attn_logits"]) / 2
    log(f"  quickstart, --qk-clip {tau:.6g} ...")
    clipped = run_ranks(_rank_main, 2, common + ["--name", "qk_clip", "--qk-clip", repr(tau)], timeout=3600)[
        0
    ]
    after = clipped["max_attn_logits"][2:]
    return {
        "tau": tau,
        "unclipped_max": max(free["max_attn_logits"]),
        "clipped_max_from_step_3": max(after),
        "ratio_from_step_3": max(after) / tau,
        "within_1_2_tau": max(after) <= 1.2 * tau,
        "unclipped": free["max_attn_logits"],
        "clipped": clipped["max_attn_logits"],
        "final_val_unclipped": free["vals"][-1][1],
        "final_val_clipped": clipped["vals"][-1][1],
    }


def markdown(result: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    lines = [
        "# QK-clip on the CPU",
        "",
        environment_line(result["environment"]) + f"; load average {load} "
        "(a shared machine: timings are medians of paired with/without runs)",
        "",
        "## Capture overhead (forward pass, training mode)",
        "",
        "| path | hidden / heads / layers | seq x batch | forward ms | with capture ms | "
        "time overhead | extra matmul FLOPs | largest capture tensor | one layer's full QKᵀ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["overhead"]:
        mib = 2**20
        lines.append(
            f"| {r['path']} | {r['hidden']} / {r['heads']} / {r['layers']} | {r['seq']} x "
            f"{r['batch']} | {r['forward_ms']:.1f} | {r['with_capture_ms']:.1f} | "
            f"{r['overhead_pct']:+.1f}% | {r['extra_flops_pct']:+.1f}% | "
            f"{r['largest_tensor_bytes'] / mib:.2f} MiB | {r['full_qk_bytes'] / mib:.2f} MiB |"
        )
    c = result["clip_step"]
    lines += [
        "",
        "## The clip after the step",
        "",
        f"Muon step of a 4-layer LLaMA (hidden 64): {c['step_ms']:.2f} ms; with qk_clip rescaling "
        f"every head: {c['step_with_clip_ms']:.2f} ms. Collectives: one all-reduce (MAX) of one fp32 "
        f"per local query head over data x context parallel ranks (none in one process); host reads: "
        f"none.",
    ]
    q = result.get("quickstart")
    if q:
        lines += [
            "",
            "## Quickstart (`python -m launch.pretrain` defaults, 200 steps)",
            "",
            f"Measured on: {environment_line(q['environment'])}" if q.get("environment") else "",
            "",
            f"Unclipped (--qk-clip-log): largest logit {q['unclipped_max']:.4f}; clipped at τ = half "
            f"of it ({q['tau']:.4f}): largest from step 3 on {q['clipped_max_from_step_3']:.4f} = "
            f"{q['ratio_from_step_3']:.3f} τ ({'within' if q['within_1_2_tau'] else 'NOT within'} "
            f"1.2 τ). Final validation loss {q['final_val_unclipped']:.4f} unclipped, "
            f"{q['final_val_clipped']:.4f} clipped.",
            "",
            "| step | unclipped | clipped | clipped / τ |",
            "|---|---|---|---|",
        ]
        for i, (a, b) in enumerate(zip(q["unclipped"], q["clipped"])):
            if i < 5 or (i + 1) % 20 == 0:
                lines.append(f"| {i + 1} | {a:.4f} | {b:.4f} | {b / q['tau']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart", action="store_true", help="also run the quickstart twice (~5 minutes)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_qk_clip"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread, as the launcher's ranks run (and the quickstart's forks need)
    import warnings

    warnings.filterwarnings("ignore")
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    sys.path.insert(0, str(REPO / "tests"))
    from support.harness import run_ranks

    def log(*a):
        print(*a, flush=True)

    sizes = [
        dict(hidden=64, heads=4, layers=4, seq=64, batch=16),  # the quickstart model and micro-batch
        dict(hidden=512, heads=8, layers=2, seq=1024, batch=2),
    ]
    log("capture overhead:")
    # Megatron's models need its parallel state: measure inside a one-rank world.
    rows = run_ranks(_overhead_rank, 1, sizes, args.repeats, timeout=3600)[0]
    result = {
        "environment": environment(),
        "load_average": os.getloadavg(),
        "overhead": rows,
        "clip_step": clip_step_cost(args.repeats * 4),
    }
    if args.quickstart:
        result["quickstart"] = dict(quickstart(Path(args.runs_dir), log), environment=result["environment"])
    else:  # keep the last quickstart measurement (it names its own machine and commit)
        previous = RESULTS / "qk_clip_cpu.json"
        if previous.is_file():
            result["quickstart"] = json.loads(previous.read_text()).get("quickstart")
    for path in write_result("qk_clip_cpu", result, markdown(result)):
        log(f"wrote {path}")


def _overhead_rank(rank, world_size, sizes, repeats):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    return overhead(sizes, repeats, lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    main()
