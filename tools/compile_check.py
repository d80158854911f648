"""Compile every Triton kernel of orz_fast ahead of time for GPUs, on a machine without one.

    python tools/compile_check.py [--targets 80,90] [--only SUBSTRING] [--json PATH]

The real launchers (``orz_fast.ops`` with ``backend="triton"`` and ``orz_fast/kernels/*.py``) run on
shape-only tensors (the meta device: shapes, dtypes, strides and autograd, no memory; the launchers'
device check is told to take them for CUDA tensors), at the shapes an ORZ run gives them
(``SCENARIOS``). Every ``kernel[grid](...)`` launch is intercepted instead of run, and Triton's own
argument binder turns what the launcher passed into the signature, the constexprs and the
specialisation attributes (integer divisibility, pointer alignment from the storage offset) that a
GPU launch would compile. Each distinct specialisation is then compiled by ``triton.compile`` for
each target (``sm_80``: A100; ``sm_90``: H100/H200, which Triton builds as sm_90a) with Triton's
bundled ptxas, in a fresh cache so ptxas really runs and reports.

Fails (exit 1) on a compile error; on a kernel over a target's limits (``LIMITS``: shared memory
per block, 255 registers per thread, 64K registers per block) or one that spills registers to
local memory (ptxas spills when a kernel needs more registers than it may have); on a float
min/max without NaN propagation in the kernels that promise it (``NAN_PROPAGATING``: ``max.f32``
returns the other operand for a NaN); and on a ``@triton.jit`` function in ``orz_fast/kernels``
that no scenario launches and no launched kernel calls. Prints registers, spills and shared
memory per kernel, specialisation and target.

Adding a specialisation (a new argument, a new dtype): add a line to ``SCENARIOS`` that calls the
public op or the launcher the way the trainer or an integration does.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# Compiled kernels, not the interpreter; and a fresh cache, so that ptxas runs and reports.
os.environ.pop("TRITON_INTERPRET", None)
_CACHE = tempfile.TemporaryDirectory(prefix="orz_fast_compile_check_")  # removed at exit
os.environ["TRITON_CACHE_DIR"] = _CACHE.name
# Triton 3.9 warns that its FMA-fusion default changes in 3.10; the run prints which one it compiled with
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import orz_fast.kernels  # noqa: E402
import orz_fast.kernels.utils  # noqa: E402
from orz_fast import ops  # noqa: E402
from orz_fast.kernels.paged_attention import paged_decode_triton  # noqa: E402

# ----------------------------------------------------------------------------- targets and limits


@dataclass(frozen=True)
class Limits:
    """Per-block resources of one compute capability (CUDA C Programming Guide, technical specifications)."""

    name: str
    shared_bytes: int
    """Most shared memory one block may use (opt-in maximum: 163 KiB on sm_80, 227 KiB on sm_90)."""
    registers_per_thread: int = 255
    registers_per_block: int = 65536


LIMITS = {80: Limits("sm_80", 163 * 1024), 90: Limits("sm_90", 227 * 1024)}

NAN_PROPAGATING = ("_ppo_policy_loss_fwd_kernel", "_ppo_value_loss_fwd_kernel")
"""Kernels whose float min/max must propagate NaN (``max.NaN.f32``), as the torch path does."""

# ----------------------------------------------------------------------------- ORZ-shaped scenarios

ORZ_LOGPROB_TOKENS = 16_384
ORZ_HIDDEN = 3_584
ORZ_VOCAB = 152_064
ORZ_TP = (1, 2, 8)
ORZ_STREAM_TOKENS = 16 * 2**20
ORZ_SEGMENTS = 8_192


def _shaped(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A shape-only (meta) tensor standing for a CUDA tensor (see ``record_launches``)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def _linear(
    dtype: torch.dtype, tp: int, *, fused: bool, entropy: bool, grad: bool, padded: tuple[int, int] | None = None
) -> None:
    """``linear_logprobs`` / ``linear_ppo_loss`` on one rank's LM-head shard, forward (+ backward). ``padded``:
    (shard rows, real rows) of the last TP rank of a padded vocabulary, whose real rows end inside its shard."""
    T, H, V = ORZ_LOGPROB_TOKENS, ORZ_HIDDEN, ORZ_VOCAB // tp
    vocab_size = None
    if padded is not None:
        V, vocab_size = padded
    hidden = _shaped(T, H, dtype=dtype).requires_grad_(grad)
    weight = _shaped(V, H, dtype=dtype).requires_grad_(grad)
    targets = _shaped(T, dtype=torch.int64)
    kw = {"return_entropy": entropy, "vocab_size": vocab_size, "backend": "triton"}
    if fused:
        old, adv, mask = _shaped(T), _shaped(T), _shaped(T, dtype=torch.bool)
        out = ops.linear_ppo_loss(hidden, weight, targets, old, adv, mask, **kw)[0]
    else:
        out = ops.linear_logprobs(hidden, weight, targets, **kw)
        out = (out[0] + out[1]).sum() if entropy else out.sum()
    if grad:
        out.backward()


def _gae(index_dtype: torch.dtype, dtype: torch.dtype) -> None:
    T, N = ORZ_STREAM_TOKENS, ORZ_SEGMENTS
    ops.gae(
        _shaped(T, dtype=dtype), _shaped(T, dtype=dtype), _shaped(N + 1, dtype=index_dtype), 1.0, 1.0, backend="triton"
    )


def _loss(fn: Callable, dtype: torch.dtype, mask_dtype: torch.dtype, grad: bool) -> None:
    T = ORZ_STREAM_TOKENS
    x = _shaped(T, dtype=dtype).requires_grad_(grad)
    loss = fn(x, _shaped(T, dtype=dtype), _shaped(T, dtype=dtype), _shaped(T, dtype=mask_dtype), backend="triton")[0]
    if grad:
        loss.backward()


def _policy_loss_vs_rollout(tis: bool) -> None:
    """The trainer's unfused policy loss with the rollout's log-probs: the gap statistics, and ``tis``'s weights."""
    T = ORZ_STREAM_TOKENS
    logp = _shaped(T).requires_grad_()
    rollout, mask = _shaped(T), _shaped(T, dtype=torch.bool)
    kw = dict(rollout_logprobs=rollout, tis_cap=2.0 if tis else None, backend="triton")
    ops.ppo_policy_loss(logp, _shaped(T), _shaped(T), mask, **kw)[0].backward()


ORZ_DECODE_SEQS = 256
ORZ_KV_BLOCKS = 16_384
ORZ_BLOCK_SIZE = 16
ORZ_MAX_BLOCKS = 512
ORZ_ATTENTION_SHAPES = {
    # name: (query heads, K/V heads, head dim) of the Qwen2.5 models, per TP rank at the listed TP sizes
    "qwen2.5-0.5b": (14, 2, 64),
    "qwen2.5-1.5b": (12, 2, 128),
    "qwen2.5-7b": (28, 4, 128),
    "qwen2.5-32b": (40, 8, 128),
    "qwen2.5-72b": (64, 8, 128),
}


def _paged_decode(dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, tp: int) -> None:
    """The rollout's decode attention on one layer of this rank's paged KV cache (the engine's layout: the cache
    of all layers is one tensor, a layer's K and V are views into it)."""
    B, N, S, M = ORZ_DECODE_SEQS, ORZ_KV_BLOCKS, ORZ_BLOCK_SIZE, ORZ_MAX_BLOCKS
    hq, hkv = q_heads // tp, kv_heads // tp
    cache = _shaped(2, 2, N, S, hkv, head_dim, dtype=dtype)
    q = _shaped(B, hq, head_dim, dtype=dtype)
    tables, lens = _shaped(B, M, dtype=torch.int32), _shaped(B, dtype=torch.int32)
    paged_decode_triton(q, cache[1, 0], cache[1, 1], tables, lens)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, call) of every way an ORZ run or an integration launches the kernels. The TP shards all get
    vocab_start 0 here (tp_group None): each rank's offset is a multiple of 16 at these sizes, which is
    the same specialisation."""
    for tp in ORZ_TP:
        for dtype in (torch.bfloat16, torch.float32):
            d = _name(dtype)
            for entropy in (False, True):
                yield (
                    f"linear_logprobs tp{tp} {d} entropy={entropy}",
                    partial(_linear, dtype, tp, fused=False, entropy=entropy, grad=True),
                )
                yield (
                    f"linear_ppo_loss tp{tp} {d} entropy={entropy}",
                    partial(_linear, dtype, tp, fused=True, entropy=entropy, grad=True),
                )
            yield (
                f"linear_logprobs tp{tp} {d} no grad",
                partial(_linear, dtype, tp, fused=False, entropy=False, grad=False),
            )
    # Padded vocabularies (128 x TP multiple) at TP 8, last rank: Qwen2.5's config vocabulary 152,064 pads to
    # 152,576 (shards of 19,072 rows, 18,560 real on the last); its tokenizer's 151,665 would leave 18,161 real
    # rows, a width that is no multiple of 16 over an aligned row stride.
    for real in (18_560, 18_161):
        for fused in (False, True):
            op = "linear_ppo_loss" if fused else "linear_logprobs"
            yield (
                f"{op} tp8 padded vocab ({real} of 19072 rows) bfloat16",
                partial(_linear, torch.bfloat16, 8, fused=fused, entropy=True, grad=True, padded=(19_072, real)),
            )
    # the rollout's decode attention: bf16 (training runs) and fp32 caches, every Qwen2.5 head layout per TP rank
    for model, (hq, hkv, d) in ORZ_ATTENTION_SHAPES.items():
        for tp in (1, 2):
            if hkv % tp == 0:
                yield (
                    f"paged_decode {model} tp{tp} bfloat16",
                    partial(_paged_decode, torch.bfloat16, hq, hkv, d, tp),
                )
    yield "paged_decode qwen2.5-7b tp1 float32", partial(_paged_decode, torch.float32, 28, 4, 128, 1)
    # the trainer: int32 offsets, fp32 values; veRL's adapter: int64 offsets
    for index_dtype in (torch.int32, torch.int64):
        for dtype in (torch.float32, torch.bfloat16):
            yield f"gae {_name(index_dtype)} {_name(dtype)}", partial(_gae, index_dtype, dtype)
    for name, fn in (("ppo_policy_loss", ops.ppo_policy_loss), ("ppo_value_loss", ops.ppo_value_loss)):
        for dtype in (torch.float32, torch.bfloat16):
            for mask_dtype in (torch.bool, torch.float32):
                for grad in (True, False):
                    yield (
                        f"{name} {_name(dtype)} mask={_name(mask_dtype)} grad={grad}",
                        partial(_loss, fn, dtype, mask_dtype, grad),
                    )
    for tis in (False, True):
        yield f"ppo_policy_loss float32 with rollout log-probs tis={tis}", partial(_policy_loss_vs_rollout, tis)


SCENARIOS = dict(scenarios())

# ----------------------------------------------------------------------------- recording launches


class _Pointer:
    """What Triton's binder reads of a tensor argument: its dtype and an address with the tensor's
    alignment (allocations are 512-byte aligned, so the alignment is that of the storage offset)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = 512 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    scenarios: list[str] = field(default_factory=list)


def record_launches(names: list[str]) -> tuple[dict[tuple, Launch], dict[str, str]]:
    """Run the scenarios with ``JITFunction.run`` intercepted. Returns the distinct launches (keyed by
    kernel and specialisation) and, per failed scenario, its error."""
    launches: dict[tuple, Launch] = {}
    errors: dict[str, str] = {}
    current: list[str] = []
    probe = make_backend(GPUTarget("cuda", 90, 32))

    def run(kernel, *args, grid, warmup, **kwargs):
        args = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
        _, specialization, _ = _binder(kernel, probe)(*args, **kwargs)
        key = (kernel.fn.__qualname__, repr(specialization), repr(sorted(kwargs.items())))
        launch = launches.setdefault(key, Launch(kernel, args, dict(kwargs)))
        if current[0] not in launch.scenarios:
            launch.scenarios.append(current[0])

    def device_problem(tensors, *, interpreted):
        # meta tensors stand for CUDA tensors here: a CPU-only torch aborts on autograd over fake CUDA tensors
        devices = sorted({t.device.type for t in tensors})
        return None if devices == ["meta"] and not interpreted else f"expected meta tensors, got {devices}"

    original_run, original_check = JITFunction.run, orz_fast.kernels.utils.triton_device_problem
    JITFunction.run, orz_fast.kernels.utils.triton_device_problem = run, device_problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                current[:] = [name]
                try:
                    SCENARIOS[name]()
                except Exception as exc:  # reported per scenario; the check fails
                    errors[name] = f"{type(exc).__name__}: {exc}"
    finally:
        JITFunction.run, orz_fast.kernels.utils.triton_device_problem = original_run, original_check
    return launches, errors


_BINDERS: dict[tuple[int, int], Callable] = {}


def _binder(kernel: JITFunction, backend) -> Callable:
    key = (id(kernel), id(backend))
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    return _BINDERS[key]


# ----------------------------------------------------------------------------- compiling


@dataclass
class Compiled:
    kernel: str
    target: str
    specialization: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    scenarios: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_FLOAT_MIN_MAX = re.compile(r"\b(?:max|min)(?:\.[A-Za-z0-9]+)*\.f(?:16|32|64)\b")


def _describe(kernel: JITFunction, constexprs: dict, signature: dict, attrs: dict) -> str:
    """Constexprs, argument types, and which arguments are specialised as multiples of 16."""
    names = kernel.arg_names
    consts = ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items()))
    types = ",".join(t for t in signature.values() if t != "constexpr")
    div16 = [names[k[0]] for k, v in sorted(attrs.items()) if v]
    return f"{consts} | {types} | div16: {','.join(div16) or '-'}"


def compile_launch(launch: Launch, capability: int) -> Compiled:
    """Compile one recorded launch for ``capability`` with Triton's compiler and bundled ptxas."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    bound, specialization, options = _binder(kernel, backend)(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, dict(launch.kwargs), bound, specialization, options
    )
    limits = LIMITS[capability]
    result = Compiled(
        kernel=kernel.fn.__qualname__,
        target=limits.name,
        specialization=_describe(kernel, constexprs, signature, attrs),
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        scenarios=list(launch.scenarios),
    )
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton, captured below
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as exc:
        result.problems.append(f"compile error: {type(exc).__name__}: {str(exc).strip()[-2000:]}")
        return result
    finally:
        result.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs, frame = _PTXAS_REGS.search(text), _PTXAS_FRAME.search(text)
    if regs is None or frame is None:
        result.problems.append(f"no ptxas resource report in the compile log: {text.strip()[-500:]!r}")
        return result
    result.registers = int(regs.group(1))
    result.stack_bytes, result.spill_stores, result.spill_loads = map(int, frame.groups())
    result.shared_bytes = int(compiled.metadata.shared)
    threads = 32 * result.num_warps
    if result.shared_bytes > limits.shared_bytes:
        result.problems.append(f"shared memory {result.shared_bytes} B > {limits.shared_bytes} B per block")
    if result.registers > limits.registers_per_thread:
        result.problems.append(f"{result.registers} registers per thread > {limits.registers_per_thread}")
    if result.registers * threads > limits.registers_per_block:
        result.problems.append(
            f"{result.registers} registers x {threads} threads > {limits.registers_per_block} per block"
        )
    if result.spill_stores or result.spill_loads:
        result.problems.append(f"spills {result.spill_stores} B stored / {result.spill_loads} B loaded")
    if result.kernel in NAN_PROPAGATING:
        dropping = sorted({op for op in _FLOAT_MIN_MAX.findall(compiled.asm["ptx"]) if ".NaN" not in op})
        if dropping:
            result.problems.append(f"float min/max that drop NaN in its PTX: {dropping}")
    return result


def _fp_fusion() -> bool:
    """Whether Triton fuses multiply-adds (on by default in 3.9: GPU results then differ from the interpreter's
    in the last bits)."""
    return bool(make_backend(GPUTarget("cuda", 90, 32)).parse_options({}).enable_fp_fusion)


# ----------------------------------------------------------------------------- coverage


def jit_functions() -> dict[str, JITFunction]:
    """Every ``@triton.jit`` function defined in ``orz_fast/kernels``, by qualified name."""
    found = {}
    for info in pkgutil.iter_modules(orz_fast.kernels.__path__, "orz_fast.kernels."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{value.fn.__qualname__}"] = value
    return found


def _called(fn: JITFunction) -> set[int]:
    """ids of the ``@triton.jit`` functions that ``fn``'s source names (called or passed as combine_fn)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    scope = fn.fn.__globals__
    out = set()
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.Name):
            value = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            value = getattr(scope.get(node.value.id), node.attr, None)
        if isinstance(value, JITFunction) and value is not fn:
            out.add(id(value))
    return out


def not_launched(launched: list[JITFunction]) -> list[str]:
    """``@triton.jit`` functions of orz_fast/kernels neither launched nor reachable from a launched kernel."""
    defined = jit_functions()
    by_id = {id(f): f for f in defined.values()}
    reached, todo = set(), [id(k) for k in launched]
    while todo:
        i = todo.pop()
        if i in reached:
            continue
        reached.add(i)
        if i in by_id:
            todo.extend(_called(by_id[i]))
    return sorted(name for name, f in defined.items() if id(f) not in reached)


# ----------------------------------------------------------------------------- report


def print_table(results: list[Compiled]) -> None:
    results = sorted(results, key=lambda r: (r.kernel, r.specialization, r.target))
    header = (
        f"{'kernel':32} {'target':6} {'warps':>5} {'regs':>4} {'spill B':>7} {'smem B':>7} {'s':>5}  specialisation"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        spill = "-" if r.spill_stores is None else str(r.spill_stores + r.spill_loads)
        regs = "-" if r.registers is None else str(r.registers)
        smem = "-" if r.shared_bytes is None else str(r.shared_bytes)
        row = f"{r.kernel:32} {r.target:6} {r.num_warps:>5} {regs:>4} {spill:>7} {smem:>7} {r.seconds:5.2f}"
        print(f"{row}  {r.specialization}")
        for problem in r.problems:
            print(f"    FAIL: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--only", default=None, help="run only the scenarios whose name contains this")
    parser.add_argument("--max-registers", type=int, default=None, help="a stricter registers-per-thread budget")
    parser.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.targets.split(",")]
    unknown = [c for c in capabilities if c not in LIMITS]
    if unknown:
        parser.error(f"--targets: no limits known for {unknown}; known: {sorted(LIMITS)}")
    if args.max_registers is not None:
        for c in capabilities:
            LIMITS[c] = Limits(LIMITS[c].name, LIMITS[c].shared_bytes, registers_per_thread=args.max_registers)
    names = [n for n in SCENARIOS if args.only is None or args.only in n]
    if not names:
        parser.error(f"--only {args.only!r} matches no scenario; scenarios: {list(SCENARIOS)}")

    start = time.perf_counter()
    launches, errors = record_launches(names)
    results = [compile_launch(launch, c) for launch in launches.values() for c in capabilities]
    missing = not_launched([launch.kernel for launch in launches.values()])
    elapsed = time.perf_counter() - start

    print(
        f"Triton {triton.__version__}, torch {torch.__version__}; {len(names)} scenarios, {len(launches)} kernel "
        f"specialisations x {len(capabilities)} targets; FMA fusion {'on' if _fp_fusion() else 'off'}\n"
    )
    print_table(results)
    failed = [r for r in results if r.problems]
    for name, error in errors.items():
        print(f"FAIL: scenario {name!r} raised {error}")
    for name in missing:
        print(f"FAIL: no scenario launches {name} (and no launched kernel calls it)")
    if args.json is not None:
        payload = {
            "triton": triton.__version__,
            "seconds": elapsed,
            "results": [vars(r) for r in results],
            "scenario_errors": errors,
            "not_launched": missing,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    ok = not failed and not errors and not missing
    verdict = (
        "OK"
        if ok
        else f"FAILED ({len(failed)} compiles over a limit or broken, {len(errors)} scenarios raised, "
        f"{len(missing)} jit functions never launched)"
    )
    print(f"\n{verdict}: {len(results)} compiles in {elapsed:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
