"""`bench/convergence.py --gpu`: LLaMA-60M on one GPU, AdamW vs Muon vs TEON (both unfoldings) vs HTMuon.

    python3 bench/convergence.py --gpu                      # every arm, one after another
    python3 bench/convergence.py --gpu --arm teon_mode2     # one arm: fits one 10-minute command on an H100

Single process, no DeepSpeed or Megatron (the GPU image has PyTorch and `tokenizers`, nothing else this
needs): a plain-PyTorch LLaMA with Hugging Face names (configs/models/llama_60m.yaml: hidden 512, FFN
1376, 8 heads, 8 layers, RMSNorm, SwiGLU, RoPE, untied head, vocab 32000) and teonspeed's optimizers on
`model.named_parameters()`. Data: bench/gpu_corpus.py (≥ 100M tokens of the machine's own Python
installation text). Protocol as the HTMuon authors' 60M runs: sequence 256, cosine with 10% warmup to
0.1×, wd 0.1, grad-clip 1.0, bf16 autocast; lrs AdamW 1e-3, Muon 0.01, HTMuon 0.03 (their ratio), TEON
0.01·√2 (a stacked member's step is 1/√K of Muon's at the same lr). Each arm stops at its step budget or
at `--time-limit` seconds of training, whichever is first, and says which. Results:
bench/results/convergence_gpu.{json,md}, with the GPU's name.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LlamaShape:
    vocab: int = 32000
    hidden: int = 512
    ffn: int = 1376
    heads: int = 8
    layers: int = 8
    seq: int = 256


LLAMA_60M = LlamaShape()


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding on (batch, heads, seq, head_dim), rotating the two halves (LLaMA's form)."""
    s, d = x.size(-2), x.size(-1)
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(torch.nn.Module):
    def __init__(self, c: LlamaShape):
        super().__init__()
        d = c.hidden
        self.heads = c.heads
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.self_attn = torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, torch.nn.Linear(d, d, bias=False))
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = torch.nn.Linear(d, c.ffn, bias=False)
        self.mlp.up_proj = torch.nn.Linear(d, c.ffn, bias=False)
        self.mlp.down_proj = torch.nn.Linear(c.ffn, d, bias=False)

    def forward(self, h):
        b, s, d = h.shape
        a = self.self_attn
        x = self.input_layernorm(h)
        q, k, v = (
            proj(x).view(b, s, self.heads, -1).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj)
        )
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        h = h + a.o_proj(y.transpose(1, 2).reshape(b, s, d))
        x = self.post_attention_layernorm(h)
        return h + self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class Llama(torch.nn.Module):
    def __init__(self, c: LlamaShape):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c.vocab, c.hidden)
        self.layers = torch.nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = torch.nn.Linear(c.hidden, c.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, tokens, labels):
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = block(h)
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))


@dataclass
class Arm:
    name: str
    optimizer: str  # adamw | muon | teon | htmuon
    lr: float
    options: Dict = field(default_factory=dict)


GPU_ARMS = [
    Arm("adamw", "adamw", 1e-3),
    Arm("muon", "muon", 0.01),
    Arm("teon_mode1", "teon", 0.01 * math.sqrt(2), {"teon_mode": 1}),
    Arm("teon_mode2", "teon", 0.01 * math.sqrt(2), {"teon_mode": 2}),
    Arm("htmuon", "htmuon", 0.03),
]


@dataclass
class Preset:
    shape: LlamaShape = field(default_factory=LlamaShape)
    batch: int = 512  # sequences per step: 131k tokens at seq 256 (the HTMuon authors' 60M batch)
    micro_batch: int = 128
    steps: int = 600  # 79M tokens
    eval_every: int = 100
    eval_batches: int = 16
    weight_decay: float = 0.1
    adamw_lr: float = 1e-3  # embeddings, head and norms of the matrix optimizers
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    time_limit: float = 480.0  # seconds of training per arm: one arm fits a 10-minute command
    min_tokens: int = 100_000_000


TINY_PRESET = Preset(
    shape=LlamaShape(vocab=512, hidden=32, ffn=64, heads=2, layers=2, seq=32),
    batch=4,
    micro_batch=2,
    steps=4,
    eval_every=2,
    eval_batches=2,
    time_limit=60.0,
    min_tokens=20_000,
)


def import_teonspeed():
    """teonspeed, installed or straight from this checkout's plugin/teonspeed (the GPU image has no
    install of it)."""
    try:
        import teonspeed

        return teonspeed
    except ImportError:
        sys.path.insert(0, str(REPO / "plugin"))
        import teonspeed

        return teonspeed


class Windows:
    """Random windows of seq + 1 tokens of a uint16 token file (seeded), or fixed ones for validation."""

    def __init__(self, path: Path, seq: int, seed: int):
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq = seq
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int, device, starts: Optional[torch.Tensor] = None):
        if starts is None:
            starts = torch.randint(0, len(self.data) - self.seq - 1, (n,), generator=self.gen)
        rows = np.stack([self.data[s : s + self.seq + 1] for s in starts.tolist()]).astype(np.int64)
        t = torch.from_numpy(rows).to(device, non_blocking=True)
        return t[:, :-1], t[:, 1:]

    def fixed_starts(self, count: int) -> torch.Tensor:
        span = len(self.data) - self.seq - 1
        return torch.linspace(0, span - 1, count).long()


def make_optimizer(arm: Arm, model, preset: Preset):
    if arm.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": preset.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=arm.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
    ts = import_teonspeed()
    cls = {"muon": ts.Muon, "teon": ts.TEON, "htmuon": ts.HTMuon}[arm.optimizer]
    # torch's Newton–Schulz, not the Triton kernels: this compares optimizers, and the kernels have their
    # own GPU check (bench/kernel.py); a kernel fault must not cost a 10-minute convergence run.
    return cls(
        model.named_parameters(),
        lr=arm.lr,
        weight_decay=preset.weight_decay,
        adamw_lr=preset.adamw_lr,
        adamw_betas=(0.9, 0.95),
        adamw_weight_decay=preset.weight_decay,
        ns_backend="torch",
        **arm.options,
    )


def lr_factor(step: int, preset: Preset) -> float:
    warm = max(1, int(preset.warmup_frac * preset.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, preset.steps - warm)
    return preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_arm(arm: Arm, corpus: Path, preset: Preset, device: str, seed: int = 1234, log=print) -> Dict:
    torch.manual_seed(seed)
    model = Llama(preset.shape).to(device)
    opt = make_optimizer(arm, model, preset)
    base = [g["lr"] for g in opt.param_groups]
    train = Windows(corpus / "train.bin", preset.shape.seq, seed)
    valid = Windows(corpus / "valid.bin", preset.shape.seq, seed)
    val_starts = valid.fixed_starts(preset.eval_batches * preset.micro_batch).split(preset.micro_batch)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        with autocast:
            losses = [model(*valid.batch(0, device, starts)).item() for starts in val_starts]
        model.train()
        return sum(losses) / len(losses)

    accum = preset.batch // preset.micro_batch
    vals, losses, stopped = [[0, evaluate()]], [], "step budget"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    step = 0
    for step in range(preset.steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, preset)
        total = 0.0
        for _ in range(accum):
            with autocast:
                loss = model(*train.batch(preset.micro_batch, device)) / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % preset.eval_every == 0 or step + 1 == preset.steps:
            losses.append([step + 1, float(total)])
            vals.append([step + 1, evaluate()])
            log(
                f"  {arm.name} step {step + 1}: train {losses[-1][1]:.4f} val {vals[-1][1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
        if time.perf_counter() - start > preset.time_limit:
            stopped = f"time limit {preset.time_limit:.0f} s"
            if vals[-1][0] != step + 1:
                vals.append([step + 1, evaluate()])
            break
    sync()
    seconds = time.perf_counter() - start
    steps_done = step + 1
    return {
        **asdict(arm),
        "seed": seed,
        "val_curve": vals,
        "train_curve": losses,
        "steps": steps_done,
        "tokens": steps_done * preset.batch * preset.shape.seq,
        "seconds": round(seconds, 1),
        "stopped_by": stopped,
        "tokens_per_s": round(steps_done * preset.batch * preset.shape.seq / seconds),
    }


def device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or 'x86_64'})"
    )


def run_gpu_preset(
    arm_names: List[str],
    out_dir: Path,
    corpus_dir: Path,
    preset: Preset = Preset(),
    device: Optional[str] = None,
    stem: str = "convergence_gpu",
    log=print,
) -> Dict:
    """Train the named arms (all when empty); merge into out_dir/<stem>.json (one arm per command adds its
    row to the earlier ones of the same GPU) and rewrite <stem>.md."""
    from gpu_corpus import build_corpus

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = build_corpus(corpus_dir, preset.min_tokens, vocab=preset.shape.vocab, log=log)
    arms = [a for a in GPU_ARMS if not arm_names or a.name in arm_names]
    unknown = set(arm_names) - {a.name for a in GPU_ARMS}
    if unknown:
        raise SystemExit(f"--arm {sorted(unknown)}: choose from {[a.name for a in GPU_ARMS]}")
    path = out_dir / f"{stem}.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if results.get("device") not in (None, device_name(device)):
        results = {"runs": {}}  # another machine's numbers are not comparable: start over
    results.update(
        device=device_name(device),
        torch=torch.__version__,
        corpus=meta,
        preset={k: v for k, v in asdict(preset).items()},
    )
    for arm in arms:
        log(f"[gpu] {arm.name} ({arm.optimizer}, lr {arm.lr:g}) on {results['device']}")
        results["runs"][arm.name] = train_arm(arm, corpus_dir, preset, device, log=log)
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        (out_dir / f"{stem}.md").write_text(summarize_gpu(results))
    return results


def summarize_gpu(results: Dict) -> str:
    c, p = results["corpus"], results["preset"]
    lines = [
        f"# Convergence, GPU preset ({results['device']}, torch {results['torch']})\n",
        f"LLaMA {p['shape']['hidden']}/{p['shape']['ffn']}/{p['shape']['heads']}/{p['shape']['layers']} "
        f"(hidden/FFN/heads/layers), vocab {p['shape']['vocab']}, seq {p['shape']['seq']}, "
        f"batch {p['batch']} "
        f"sequences; corpus: {c['train_tokens'] / 1e6:.1f}M train tokens from the machine's Python "
        f"installation (digest {c['digest']}).\n",
        "| arm | lr | steps (stopped by) | tokens | final val loss | perplexity | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        final = r["val_curve"][-1][1]
        lines.append(
            f"| {name} | {r['lr']:.4g} | {r['steps']} ({r['stopped_by']}) | {r['tokens'] / 1e6:.1f}M | "
            f"{final:.4f} | {math.exp(final):.2f} | {r['tokens_per_s']:,} |"
        )
    return "\n".join(lines) + "\n"
