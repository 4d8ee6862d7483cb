"""A tiny LLaMA-style model with Hugging Face names (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
layers.N.mlp.{gate,down}_proj, layers.N.norm, lm_head), for single-process and DeepSpeed tests."""

from __future__ import annotations

import torch


class TinyLlama(torch.nn.Module):
    def __init__(self, layers=4, d=16, kv=8, ffn=24, vocab=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab = vocab
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.self_attn = torch.nn.Module()
            for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
                setattr(block.self_attn, name, torch.nn.Linear(d, rows, bias=False))
            block.mlp = torch.nn.Module()
            block.mlp.gate_proj = torch.nn.Linear(d, ffn, bias=False)
            block.mlp.down_proj = torch.nn.Linear(ffn, d, bias=False)
            block.norm = torch.nn.LayerNorm(d)
            self.layers.append(block)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens, labels):
        """Not attention, but every weight takes part: enough for optimizer tests."""
        h = self.embed_tokens(tokens)
        for b in self.layers:
            x = b.norm(h)
            a = b.self_attn
            gate = torch.sigmoid(a.k_proj(x) * a.v_proj(x)).repeat_interleave(
                x.size(-1) // a.k_proj.out_features, -1
            )
            h = h + a.o_proj(a.q_proj(x) * gate)
            h = h + b.mlp.down_proj(torch.nn.functional.silu(b.mlp.gate_proj(x)))
        # fp32 at least (fp64 oracles)
        logits = self.lm_head(h).to(torch.promote_types(h.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), labels.reshape(-1))
