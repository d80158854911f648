"""Download the wheels ``make gpu-check`` installs on a GPU machine without network: ``make gpu-wheels``.

    python tools/gpu_wheels.py [--dest .gpu-wheels] [--plan]

The GPU machine's image (``GPU_IMAGE_PACKAGES``: Python 3.12, torch 2.11, Triton 3.6,
transformers 5.17, ...) lacks some of orz_fast's runtime requirements. ``needed()`` walks
orz_fast's requirements (as installed here, extras left out) and theirs, and keeps each package
the image does not have, at the version installed here (the one the test suite ran with); the
log-prob benchmark's optional Liger-Kernel baseline is added (``OPTIONAL``). ``pip download
--no-deps`` fetches one wheel of each for CPython 3.12 on manylinux x86-64 into ``--dest``
(emptied first: two versions of one package would stop the install), with a ``manifest.json``.

Everything that travels to the GPU machine (the git tree and the wheels) must stay within
``TRAVEL_LIMIT_BYTES``; the wheels alone within ``WHEELS_BUDGET_BYTES``. Both are checked.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".gpu-wheels"
TRAVEL_LIMIT_BYTES = 64 * 2**20
"""What travels with the tree to the GPU machine, carried paths included."""
WHEELS_BUDGET_BYTES = 24 * 2**20
"""The wheels' share of it."""

TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
"""The GPU machine's Python, for requirement markers."""
PIP_PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        arg
        for tag in (
            "manylinux_2_28",
            "manylinux_2_27",
            "manylinux_2_24",
            "manylinux_2_17",
            "manylinux2014",
            "manylinux1",
        )
        for arg in ("--platform", f"{tag}_x86_64")
    ),
]

GPU_IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
"""Python packages the GPU machine's image already holds (torch 2.11, triton 3.6, transformers 5.17)."""

OPTIONAL = {"liger-kernel": "0.8.5"}
"""Carried though orz_fast does not need them: the log-prob benchmark compares against Liger-Kernel."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(root: str = "orz_fast") -> dict[str, str]:
    """{package: version installed here} for every runtime requirement of ``root`` (transitively) that
    the GPU image lacks. Raises ``RuntimeError`` naming a requirement that is not installed here."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            dep = canonical(req.name)
            if dep in GPU_IMAGE_PACKAGES or dep in found:
                continue
            try:
                found[dep] = metadata.version(dep)
            except metadata.PackageNotFoundError as exc:
                raise RuntimeError(f"{name} requires {text!r}, which is not installed here (make install)") from exc
            todo.append(dep)
    return dict(sorted(found.items()))


def travelling_tree_bytes() -> int | None:
    """Bytes of the files that travel with the tree (tracked, and untracked but not ignored); None outside git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (REPO / p for p in out.decode().split("\0") if p)
    return sum(p.stat().st_size for p in paths if p.is_file())


def download(packages: dict[str, str], dest: Path) -> dict[str, dict]:
    """``pip download`` one wheel of each package for the GPU machine into ``dest`` (emptied first)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    specs = [f"{name}=={version}" for name, version in packages.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *PIP_PLATFORM_ARGS]
    proc = subprocess.run([*cmd, "-d", str(dest), *specs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download failed for {specs}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    wheels: dict[str, dict] = {}
    for path in sorted(dest.glob("*.whl")):
        name = canonical(path.name.split("-")[0])
        if name in wheels:
            raise RuntimeError(f"two wheels of {name} in {dest}: {wheels[name]['file']} and {path.name}")
        wheels[name] = {"file": path.name, "bytes": path.stat().st_size}
    missing = sorted(set(packages) - set(wheels))
    if missing:
        raise RuntimeError(f"no wheel downloaded for {missing} (files: {sorted(wheels)})")
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="wheel directory (default .gpu-wheels)")
    parser.add_argument("--plan", action="store_true", help="only list the packages and versions")
    args = parser.parse_args(argv)
    required = needed()
    packages = {**required, **OPTIONAL}
    for name, version in packages.items():
        why = "optional benchmark baseline" if name in OPTIONAL else "missing on the GPU image"
        print(f"{name}=={version}  ({why})")
    if args.plan:
        return 0
    wheels = download(packages, args.dest)
    total = sum(w["bytes"] for w in wheels.values())
    tree = travelling_tree_bytes()
    manifest = {
        "python": TARGET_ENV["python_version"],
        "required": sorted(required),
        "optional": sorted(OPTIONAL),
        "wheels": wheels,
        "bytes": total,
        "tree_bytes": tree,
    }
    (args.dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"\n{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    problems = []
    if total > WHEELS_BUDGET_BYTES:
        problems.append(f"the wheels take {total / 2**20:.1f} MiB > {WHEELS_BUDGET_BYTES / 2**20:.0f} MiB")
    if tree is not None:
        travelling = tree + total
        print(f"travelling with the tree: {travelling / 2**20:.1f} MiB of {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB")
        if travelling > TRAVEL_LIMIT_BYTES:
            problems.append(f"tree + wheels {travelling / 2**20:.1f} MiB > {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
