"""Importing orz_fast has no side effect on the process (DESIGN.md: other frameworks import it inside
their own workers).

Each check runs in a fresh interpreter with an environment that does not switch Triton's
interpreter on. ``torch.cuda``'s entry points are wrapped before orz_fast is imported, so a call
is seen on this CPU machine too, where it would initialise nothing: on a GPU machine
``torch.cuda.is_available()`` initialises the CUDA driver (a forked child can then no longer use
CUDA, and ``CUDA_VISIBLE_DEVICES`` is frozen).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CUDA_ENTRY_POINTS = (
    "is_available",
    "device_count",
    "init",
    "_lazy_init",
    "current_device",
    "set_device",
    "get_device_name",
    "get_device_properties",
    "get_device_capability",
    "mem_get_info",
    "synchronize",
)

WRAP_CUDA = f"""
import torch

cuda_calls = []


def _wrap(name):
    real = getattr(torch.cuda, name)

    def wrapped(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        cuda_calls.append(f"torch.cuda.{{name}} from {{caller}}")
        return real(*args, **kwargs)

    setattr(torch.cuda, name, wrapped)


for _name in {CUDA_ENTRY_POINTS!r}:
    _wrap(_name)
"""


def run_probe(*parts: str) -> dict:
    """Run the code ``parts`` (each dedented) in a fresh interpreter; returns the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "\n".join(["import json, os, sys", *(textwrap.dedent(p) for p in parts)])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_sets_nothing_and_touches_no_cuda():
    out = run_probe(
        """
        before = dict(os.environ)
        import orz_fast
        bare = {"torch": "torch" in sys.modules, "triton": "triton" in sys.modules, "env": dict(os.environ) != before}
        """,
        WRAP_CUDA,
        """
        import triton
        before = dict(os.environ)
        import orz_fast.ops
        import orz_fast.integrations
        import orz_fast.integrations.openrlhf
        import orz_fast.integrations.trl
        import orz_fast.integrations.verl
        after = dict(os.environ)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        print(json.dumps({"bare": bare, "changed": changed, "cuda_calls": cuda_calls,
                          "initialized": torch.cuda.is_initialized()}))
        """,
    )
    assert out["bare"] == {"torch": False, "triton": False, "env": False}, "import orz_fast alone must stay bare"
    assert out["changed"] == [], f"importing orz_fast.ops / integrations changed these variables: {out['changed']}"
    assert out["cuda_calls"] == []
    assert out["initialized"] is False


def test_no_orz_fast_module_writes_the_environment_or_calls_cuda_at_import():
    """Every module of the package; a write or call is charged to orz_fast when an orz_fast frame makes it
    (megatron-core's own import sets TORCHINDUCTOR_CACHE_DIR, for one: that is not orz_fast's doing)."""
    out = run_probe(
        WRAP_CUDA,
        """
        import importlib, pkgutil

        env_writes = []
        environ_type = type(os.environ)


        def writer():
            # the first frame outside the mapping machinery (os.environ.setdefault/update/pop go through it)
            frame = sys._getframe(2)
            while frame.f_globals.get("__name__") in ("os", "_collections_abc"):
                frame = frame.f_back
            return frame.f_globals.get("__name__", "?")


        class RecordingEnviron(environ_type):
            def __setitem__(self, key, value):
                env_writes.append(f"{key} from {writer()}")
                super().__setitem__(key, value)

            def __delitem__(self, key):
                env_writes.append(f"del {key} from {writer()}")
                super().__delitem__(key)


        os.environ.__class__ = RecordingEnviron
        import orz_fast

        skipped = []
        for info in pkgutil.walk_packages(orz_fast.__path__, "orz_fast."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:  # an optional framework (verl for verl_plugin)
                if exc.name.split(".")[0] == "orz_fast":
                    raise
                skipped.append(info.name)
        ours = lambda calls: [c for c in calls if c.split(" from ")[-1].startswith("orz_fast")]
        print(json.dumps({"env": ours(env_writes), "cuda": ours(cuda_calls), "skipped": skipped,
                          "initialized": torch.cuda.is_initialized()}))
        """,
    )
    assert out["env"] == [] and out["cuda"] == [] and out["initialized"] is False, out
    assert set(out["skipped"]) <= {"orz_fast.integrations.verl_plugin"}


def test_kernels_are_compiled_unless_the_caller_asks_for_the_interpreter():
    """orz_fast leaves Triton's mode to the caller: compiled by default, interpreted under TRITON_INTERPRET=1
    (what tests/conftest.py sets on CPU machines)."""
    probe = """
        import orz_fast.ops
        from orz_fast.kernels import gae, utils
        print(json.dumps({"interpreted": utils.is_interpreted(gae._gae_fwd_kernel), "flag": utils.INTERPRETED,
                          "env": os.environ.get("TRITON_INTERPRET")}))
        """
    assert run_probe(probe) == {"interpreted": False, "flag": False, "env": None}
    interpreted = run_probe("os.environ['TRITON_INTERPRET'] = '1'", probe)
    assert interpreted == {"interpreted": True, "flag": True, "env": "1"}


def test_use_interpreter_refuses_after_triton_was_imported_compiled():
    """Triton decorates its own tl.* helpers when it is imported, so the switch must come first."""
    out = run_probe(
        """
        import triton
        from orz_fast.kernels import use_interpreter
        try:
            use_interpreter()
            print(json.dumps({"error": None}))
        except RuntimeError as exc:
            print(json.dumps({"error": str(exc)}))
        """
    )
    assert out["error"] is not None and "TRITON_INTERPRET=1 in the environment" in out["error"]


@pytest.mark.parametrize("backend", [None, "triton", "torch"])
def test_cpu_tensors_with_compiled_kernels(backend):
    """Compiled kernels (no interpreter) and CPU tensors: backend=None and "torch" take the torch path;
    "triton" is a ValueError that says what to do, raised before any work."""
    out = run_probe(
        f"""
        import torch
        from orz_fast import ops
        from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref
        x, mask = torch.randn(64), torch.ones(64, dtype=torch.bool)
        ref = ppo_policy_loss_ref(x, x - 0.1, x, mask, 0.2, 0.2)[0].item()
        try:
            loss, _ = ops.ppo_policy_loss(x, x - 0.1, x, mask, backend={backend!r})
            adv, _ = ops.gae(x, x, torch.tensor([0, 30, 64]), backend={backend!r})
            print(json.dumps({{"loss": loss.item(), "ref": ref, "error": None}}))
        except ValueError as exc:
            print(json.dumps({{"loss": None, "ref": ref, "error": str(exc)}}))
        """
    )
    if backend == "triton":
        assert out["loss"] is None
        assert "compiled for CUDA GPUs" in out["error"] and "['cpu']" in out["error"]
        assert "TRITON_INTERPRET=1" in out["error"]
    else:
        assert out["error"] is None and out["loss"] == out["ref"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the worker's /proc/<pid>/maps")
def test_reward_workers_do_not_load_torch():
    """A verifier worker (``python -m orz_fast.reward._worker``) imports orz_fast and sympy/math-verify only:
    after real checks of both kinds, no torch library is mapped into it."""
    from orz_fast.reward import VerifierPool

    with VerifierPool(workers=1, timeout=60.0) as pool:
        assert pool.run([("math", "$\\frac{1}{2}$", "$0.5$"), ("orz", "\\frac{1}{2}", "0.5")]) == [True, True]
        (pid,) = pool.alive_pids()
        maps = Path(f"/proc/{pid}/maps").read_text()
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if "torch" in line.split()[-1]})
    assert loaded == [], f"a reward worker mapped torch's files: {loaded[:5]}"
