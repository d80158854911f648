"""vLLM rollout backend: one colocated ``vllm.LLM`` per trainer rank, fed the policy's weights over CUDA IPC.

Life of one PPO step with ``rollout.engine = "vllm"``::

    engine.update_weights(policy)   # wakes the weights (KV cache stays asleep), pushes every bucket
    engine.wake_up(("kv_cache",))   # then the KV cache
    outs = engine.generate(prompts, params)
    engine.sleep()                  # frees the GPU memory for training

The engine is built with ``load_format="dummy"`` (no checkpoint read: the trainer pushes the
weights) and vLLM's sleep mode. :meth:`VllmEngine.update_weights` streams the policy through
:mod:`orz_fast.rollout.weight_sync` in Hugging Face names; vLLM's worker process runs
:class:`VllmWorkerExtension.load_ipc_bucket` (vLLM's ``worker_extension_cls``) on each bucket,
which hands the tensors to the model's own ``load_weights`` (fusing QKV / gate-up and
resharding to the engine's tensor-parallel size).

Sampling semantics follow :class:`~orz_fast.rollout.NativeEngine`: stop strings are kept in the
text, stop token ids are the only token stops (no implicit EOS: the trainer passes it), sample
``j`` of a request is seeded ``seed + j``, and log-probs are ``log_softmax(logits / T)`` of the
sampled token (vLLM's ``processed_logprobs``; with top-p / top-k truncation vLLM renormalises them
over the kept tokens, where the native engine does not).

Importing this module does not import vLLM; building a :class:`VllmEngine` without it raises
ImportError.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

from orz_fast.models.decoder import PolicyModel
from orz_fast.rollout.sampling import Completion, SamplingParams, params_per_prompt
from orz_fast.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    IpcBucketSender,
    iter_hf_tensors,
    load_ipc_bucket,
    pack_buckets,
)

_TAGS = ("weights", "kv_cache")


class VllmWorkerExtension:
    """Mixed into vLLM's GPU worker class (``worker_extension_cls``); called through ``LLM.collective_rpc``."""

    def load_ipc_bucket(self, payload: bytes) -> int:
        """Load one bucket pushed by ``IpcBucketSender`` into the engine's model; returns its tensor count."""
        return load_ipc_bucket(payload, self.model_runner.model.load_weights)


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
    """A :class:`Completion` from one ``vllm.CompletionOutput`` (requested with ``logprobs=0``)."""
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with finish_reason={output.finish_reason!r}")
    token_ids = list(output.token_ids)
    if output.logprobs is None or len(output.logprobs) != len(token_ids):
        got = None if output.logprobs is None else len(output.logprobs)
        raise RuntimeError(f"vLLM returned {got} log-prob entries for {len(token_ids)} tokens")
    logprobs = [float(step[t].logprob) for t, step in zip(token_ids, output.logprobs, strict=True)]
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
        tokenizer: tokenizer name or path when not in ``model_path``.
        skip_tokenizer_init: run without a tokenizer (token ids only: no stop strings, no text).
        device: the GPU this engine shares with the calling trainer rank (default: the current
            CUDA device). With ``tensor_parallel_size == 1`` vLLM's worker is pinned to it; with
            more, the caller's ``CUDA_VISIBLE_DEVICES`` decides, and the trainer rank's GPU must
            be visible to every worker (each opens the pushed buckets there, over peer access).
        tensor_parallel_size: vLLM's own TP size (its ``load_weights`` reshards the full tensors).
        kv_cache_bytes: KV cache bytes per GPU (``orz_fast.rollout.kv_budget.kv_cache_bytes``), given to
            vLLM as ``kv_cache_memory_bytes`` (vLLM then ignores ``gpu_memory_utilization``).
        dtype: vLLM's compute dtype.
        load_format: ``"dummy"`` when the weights come from :meth:`update_weights`; ``"auto"`` to read them.
        max_model_len: context limit (default: the model config's).
        seed: vLLM's engine seed (for requests without one).
        sleep_level: 1 keeps a CPU copy of the weights while asleep; 2 discards them (the trainer
            pushes new ones after every update, so 2 saves host memory and copies).
        enforce_eager: skip CUDA-graph capture.
        **llm_kwargs: further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        device: torch.device | str | int | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_bytes: int,
        dtype: str = "bfloat16",
        load_format: str = "dummy",
        max_model_len: int | None = None,
        seed: int = 0,
        sleep_level: Literal[1, 2] = 2,
        enforce_eager: bool = False,
        **llm_kwargs,
    ) -> None:
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"VllmEngine needs vLLM ({e}); install it with: pip install orz_fast[vllm]") from e
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        if not torch.cuda.is_available():
            raise RuntimeError("VllmEngine runs on CUDA GPUs; none is available (use rollout.engine=native)")
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        place = _visible_device(device) if tensor_parallel_size == 1 else contextlib.nullcontext()
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
                enable_sleep_mode=True,
                enforce_eager=enforce_eager,
                worker_extension_cls=f"{__name__}.{VllmWorkerExtension.__qualname__}",
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self._vllm_sampling_params = vllm.SamplingParams
        self.has_tokenizer = not skip_tokenizer_init
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()
        """Parts (``weights``, ``kv_cache``) released by :meth:`sleep` and not woken since."""
        self.weights_valid = load_format != "dummy"
        """False while the weights are vLLM's dummy ones or were discarded by a level-2 sleep."""
        self.last_push: dict[str, int] = {}
        """Counters of the last :meth:`update_weights`: buckets, bytes."""

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Release the KV cache and the weights (level 1: to CPU memory; level 2: discarded)."""
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
        cache stays asleep, so the push has that memory. The prefix cache is reset (its
        entries were computed with the old weights).

        Args:
            model: this rank's policy shard, on this engine's GPU.
            bucket_bytes: bucket size; memory on the sending side is one bucket plus one full tensor.
        """
        if not isinstance(model, PolicyModel):
            raise TypeError(f"update_weights needs an orz_fast PolicyModel, got {type(model).__name__}")
        self.wake_up(("weights",))
        sender = IpcBucketSender(lambda payload: self.llm.collective_rpc("load_ipc_bucket", args=(payload,)))
        buckets = sender.send_all(pack_buckets(iter_hf_tensors(model), bucket_bytes))
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
            raise RuntimeError("the engine holds no policy weights (dummy or discarded by sleep); call update_weights")
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
