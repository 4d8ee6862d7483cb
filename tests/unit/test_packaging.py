"""How the package installs and imports: the src layout, what `import teonspeed` costs, what ships."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_folder_named_teonspeed_beside_the_script_does_not_shadow_the_package(tmp_path):
    # what a user has after `git clone ... teonspeed` next to their training script
    clone = tmp_path / "teonspeed"
    (clone / "plugin").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    proc = _python("import teonspeed; print(teonspeed.TEON.__name__, teonspeed.__file__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    name, path = proc.stdout.split()
    assert name == "TEON" and not path.startswith(str(clone))


def test_import_teonspeed_is_silent_and_imports_neither_deepspeed_nor_megatron(tmp_path):
    proc = _python(
        "import sys, teonspeed\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'megatron')))",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    assert proc.stderr == ""


def test_deepspeed_types_are_registered_whichever_is_imported_first(tmp_path):
    check = (
        "from deepspeed.runtime.engine import DeepSpeedEngine\n"
        "class Engine: optimizer_name = lambda self: 'TEON'\n"
        "print(DeepSpeedEngine._is_supported_optimizer(Engine(), 'TEON'))"
    )
    for order in ("import teonspeed, deepspeed", "import deepspeed, teonspeed"):
        proc = _python(f"{order}\n{check}", tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == "True", (order, proc.stdout)


def test_megatron_entry_loads_on_first_use(tmp_path):
    proc = _python("import teonspeed\nprint(teonspeed.megatron.get_megatron_optimizer.__name__)", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "get_megatron_optimizer"


def test_no_test_helper_ships_with_the_package():
    from setuptools import find_packages

    packages = find_packages(str(REPO / "plugin"))
    assert packages and all(p == "teonspeed" or p.startswith("teonspeed.") for p in packages), packages
    assert not any("testing" in p or "support" in p for p in packages), packages
    assert (REPO / "patches").resolve() == (REPO / "plugin" / "teonspeed" / "patches").resolve()
