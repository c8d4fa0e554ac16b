"""The built wheel holds every subpackage and the console script, and imports from where it was installed
(an editable install hides a subpackage that `find_packages` leaves out)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_every_subpackage_and_the_console_script(tmp_path):
    # Built from a copy: setuptools reuses an in-tree build/ folder, whose stale files could fill a gap.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "protein_llava", source / "protein_llava", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("protein_llava-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "protein_llava").rglob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    presets = {str(p.relative_to(ROOT)) for p in (ROOT / "protein_llava" / "model" / "presets").glob("*.json")}
    assert presets and presets <= names, f"presets missing from the wheel: {sorted(presets - names)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "protein-llava = protein_llava.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--target", str(target), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    modules = sorted({".".join(Path(n).with_suffix("").parts).removesuffix(".__init__") for n in sources})
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), (name, module.__file__)\n"
        "from protein_llava.model.configuration import PRESET_NAMES, ProteinLLMConfig\n"
        f"assert sorted(PRESET_NAMES) == {sorted(Path(p).stem for p in presets)!r}, PRESET_NAMES\n"
        "for preset in PRESET_NAMES:\n"
        "    ProteinLLMConfig.from_preset(preset)\n"
        "print(len(sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr[-3000:]
