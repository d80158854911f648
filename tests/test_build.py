"""A non-editable install (``pip install .``) ships the C++ extension and the kernels package."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_extension_and_kernels(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("orz_fast-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert any(n.startswith("orz_fast/_C") and n.endswith(".so") for n in names), names
    assert "orz_fast/kernels/__init__.py" in names
    assert "orz_fast/rollout/sampling.py" in names and "orz_fast/ppo/checkpointing.py" in names
    probe = (
        "import orz_fast._C as C, orz_fast.kernels as K, orz_fast.packing as P; "
        "print(C.__file__); print(K.__file__); print(P.pack_by_token_budget([3, 2, 2], 4))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    so_path, kernels_path, bins = run.stdout.splitlines()
    assert so_path.startswith(str(site)) and kernels_path.startswith(str(site))
    assert bins == "[[0], [1, 2]]"


def test_repo_root_shadows_no_installed_package():
    """``python -m ...`` from a clone puts the clone's root first on sys.path: a top-level package there
    (the Triton kernels once lived in ``kernels/``) would hide an installed one of the same name, such as
    Hugging Face's ``kernels``, which transformers imports."""
    top_level = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert top_level == ["orz_fast"], top_level
    run = subprocess.run(
        [sys.executable, "-c", "from transformers import Qwen2ForCausalLM"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
