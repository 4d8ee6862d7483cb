"""Model configs (configs/models/*.yaml) and layouts (configs/models/layouts/*.yaml): reading them and
refusing unknown keys, without importing megatron-core (12 s) so a typo fails in a second.

A model config has `model` (GPTModel's arguments) and `transformer` (megatron.core TransformerConfig
fields); a layout names a model config in `model:` and may add `model_overrides`.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "configs" / "models"
LAYOUTS_DIR = MODELS_DIR / "layouts"

MODEL_KEYS = {
    "vocab_size",
    "seq_length",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "activation",
    "rotary_base",
}
REQUIRED_MODEL_KEYS = (
    "vocab_size",
    "seq_length",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "activation",
)
TOP_KEYS = {"name", "description", "model", "transformer"}
LAYOUT_KEYS = {
    "name",
    "description",
    "model",
    "model_overrides",
    "cluster",
    "parallel",
    "training",
    "memory_estimate",
}
# Fields of TransformerConfig that the launcher sets itself (from flags, or because the device needs them).
SET_BY_LAUNCHER = {
    "tensor_model_parallel_size": "--tp",
    "pipeline_model_parallel_size": "--pp",
    "expert_model_parallel_size": "--ep",
    "activation_func": "model.activation",
    "params_dtype": None,
    "pipeline_dtype": None,
    "use_cpu_initialization": None,
    "gradient_accumulation_fusion": None,
    "masked_softmax_fusion": None,
    "bias_activation_fusion": None,
    "bias_dropout_fusion": None,
    "apply_rope_fusion": None,
    "batch_p2p_comm": None,
}


class ConfigError(SystemExit):
    """A bad option or config, found before any process group, file or heavy import."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def unknown_keys(kind: str, keys: Iterable[str], known: Iterable[str], where: str, fix: str) -> None:
    """Refuse keys outside `known`, suggesting the closest valid one."""
    known = sorted(known)
    bad = sorted(set(keys) - set(known))
    if not bad:
        return
    hints = []
    for key in bad:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}: unknown {kind} key(s) {', '.join(hints)}; {fix}")


def read_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def known_configs() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml")) + sorted(
        p.stem for p in LAYOUTS_DIR.glob("*.yaml")
    )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or a name under configs/models/ (with or without .yaml), or under configs/models/layouts/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for base in (MODELS_DIR, LAYOUTS_DIR):
        for candidate in (base / str(name_or_path), base / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"--model-config {name_or_path}: no such config; known: {', '.join(known_configs())}")


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def is_layout(raw: dict) -> bool:
    return isinstance(raw.get("model"), str)


def load_model_config(name_or_path: str | Path) -> dict:
    """{name, description, model: {...}, transformer: {...}} of a model config. A layout config resolves to
    the model it names plus its `model_overrides`."""
    raw = read_yaml(resolve_config_path(name_or_path))
    if is_layout(raw):
        return merge(load_model_config(raw["model"]), raw.get("model_overrides") or {})
    for key in ("name", "model", "transformer"):
        if key not in raw:
            raise ConfigError(f"--model-config {name_or_path}: a model config needs {key!r}")
    return raw


@functools.lru_cache(maxsize=None)
def transformer_fields(mla: bool) -> frozenset:
    """The init fields of megatron.core's TransformerConfig (MLATransformerConfig if `mla`), read from its
    source with `ast` rather than by importing megatron-core (12 s on a busy machine)."""
    spec = importlib.util.find_spec("megatron")
    root = Path(list(spec.submodule_search_locations)[0]) / "core"
    classes = {}
    for rel in ("model_parallel_config.py", "transformer/transformer_config.py"):
        tree = ast.parse((root / rel).read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                names = [
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name)
                    and not (
                        isinstance(s.annotation, ast.Subscript)
                        and getattr(s.annotation.value, "id", "") == "ClassVar"
                    )
                ]
                classes[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], names)

    def fields(name: str) -> set:
        bases, own = classes[name]
        return set(own).union(*(fields(b) for b in bases if b in classes))

    return frozenset(fields("MLATransformerConfig" if mla else "TransformerConfig"))


def model_sections(name_or_path: str) -> tuple[dict, dict, Path]:
    """(TransformerConfig fields, GPTModel fields, path) of --model-config, every key checked."""
    path = resolve_config_path(name_or_path)
    raw = read_yaml(path)
    top = LAYOUT_KEYS if is_layout(raw) else TOP_KEYS
    unknown_keys("top-level", raw, top, f"--model-config {path}", f"the valid ones are {sorted(top)}")
    cfg = load_model_config(name_or_path)
    transformer, model = dict(cfg.get("transformer") or {}), dict(cfg.get("model") or {})
    unknown_keys(
        "model",
        model,
        MODEL_KEYS,
        f"--model-config {path} section 'model'",
        f"the valid ones are {sorted(MODEL_KEYS)}",
    )
    mla = bool(transformer.get("multi_latent_attention"))
    cls = "MLATransformerConfig" if mla else "TransformerConfig"
    unknown_keys(
        "transformer",
        transformer,
        transformer_fields(mla) - set(SET_BY_LAUNCHER),
        f"--model-config {path} section 'transformer'",
        f"it takes the fields of megatron.core {cls}"
        + ("" if mla else " (set multi_latent_attention: true for the MLA fields)"),
    )
    for key in sorted(set(transformer) & set(SET_BY_LAUNCHER)):
        raise ConfigError(
            f"--model-config {path}: transformer.{key} is set by the launcher"
            + (f" (use {SET_BY_LAUNCHER[key]})" if SET_BY_LAUNCHER[key] else "")
            + "; remove it"
        )
    for key in REQUIRED_MODEL_KEYS:
        if key not in model:
            raise ConfigError(f"--model-config {path}: section 'model' needs {key!r}")
    return transformer, model, path
