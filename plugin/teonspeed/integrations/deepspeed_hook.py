"""Register teonspeed's DeepSpeed config types when DeepSpeed is imported, without importing it ourselves.

`import teonspeed` must stay cheap and silent (DeepSpeed prints its accelerator choice at import and takes
about a second), yet `"optimizer": {"type": "TEON"}` must work whether the user imports DeepSpeed before or
after teonspeed. So: if DeepSpeed is already imported, patch it now; otherwise a meta-path finder waits for
the first `import deepspeed` and patches DeepSpeed right after its package module has run.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings


def register() -> None:
    """Apply the DeepSpeed patch (idempotent); refuses DeepSpeed versions it was not written for."""
    from ..patches import deepspeed_0_19

    deepspeed_0_19.apply()


def _apply() -> None:
    from ..patches import deepspeed_0_19

    try:
        deepspeed_0_19.apply()
    except deepspeed_0_19.UnsupportedVersion as err:  # only `teonspeed.deepspeed.register()` raises it
        warnings.warn(str(err), RuntimeWarning, stacklevel=3)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets the other finders locate `deepspeed` and wraps the loader so that
    the patch runs once the package has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "deepspeed":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module):
            run_package(module)
            uninstall()
            _apply()

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _PatchAfterImport()


def install() -> None:
    """Patch DeepSpeed now if it is imported, else as soon as it is (idempotent)."""
    if "deepspeed" in sys.modules:
        _apply()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
