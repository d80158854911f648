"""The engine side of a weight push: mixed into vLLM's worker (``worker_extension_cls``), over RPC.

A push is three calls, on every vLLM worker:

1. :meth:`VllmWorkerExtension.orz_begin_weight_update` -- vLLM's layerwise reload begins: every
   layer goes back to its checkpoint-format parameters (on CPU vLLM repacks each Linear after
   loading and leaves an empty ``weight``, so a plain ``load_weights`` cannot work; on GPU
   quantised or repacked layers are the same case);
2. :meth:`VllmWorkerExtension.orz_load_bucket` per bucket -- the bucket's Hugging Face tensors go
   through the model's own ``load_weights`` (fusing QKV / gate-up, resharding to vLLM's TP); a
   layer is processed (repacked) as soon as all its tensors arrived, so the tensors given to it
   must outlive the bucket (CUDA IPC: torch keeps a shared block alive while the receiver holds
   a view; shared-memory file: copied out, since the sender reuses the file);
3. :meth:`VllmWorkerExtension.orz_finish_weight_update` -- the reload is finalised and the
   parameters no bucket loaded are returned (the sender raises on any).

vLLM imports this module in its worker processes only; nothing here runs in the trainer.
"""

from __future__ import annotations

import torch

from orz_fast.rollout.shm_transport import ShmBucketReceiver
from orz_fast.rollout.weight_sync import load_ipc_bucket


class VllmWorkerExtension:
    """Methods vLLM adds to its worker class; ``self.model_runner`` is the worker's model runner."""

    def orz_begin_weight_update(self) -> None:
        """Start vLLM's layerwise reload of the served model (checkpoint-format parameters, deferred processing)."""
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        model = self.model_runner.model
        self._orz_expected = [name for name, _ in model.named_parameters()]
        self._orz_loaded: set[str] = set()
        self._orz_receiver = ShmBucketReceiver()
        initialize_layerwise_reload(model)

    def orz_load_bucket(self, message: dict | bytes) -> int:
        """Load one pushed bucket (a shared-memory message on CPU, CUDA-IPC bytes on GPU); returns its tensor count."""
        if not hasattr(self, "_orz_loaded"):
            raise RuntimeError("orz_load_bucket before orz_begin_weight_update")
        load = self.model_runner.model.load_weights
        if isinstance(message, bytes):

            def load_all(weights):
                self._orz_loaded.update(load(weights))
                self._orz_load_tied_head(weights)

            return load_ipc_bucket(message, load_all)
        if not ShmBucketReceiver.is_message(message):
            raise ValueError(f"not a weight-bucket message: {type(message).__name__}")
        # vLLM's layerwise reload keeps the tensors it is given until their whole layer has arrived, which may be
        # in a later bucket, and the sender reuses the shared file for that bucket: keep copies, not views.
        weights = [(name, view.clone()) for name, view in self._orz_receiver.open(message)]
        with torch.no_grad():
            self._orz_loaded.update(load(weights))
            self._orz_load_tied_head(weights)
        return len(weights)

    def _orz_load_tied_head(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """A tied LM head is its own layer to the reload: on CPU vLLM packs a separate GEMM copy of it, which
        the model's ``load_weights`` (skipping ``lm_head.weight`` when tied) never refreshes; load the
        embedding into it too (on GPU it writes the same storage again)."""
        model = self.model_runner.model
        if not getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False):
            return
        head = getattr(model, "lm_head", None)
        for name, tensor in weights:
            if name == "model.embed_tokens.weight" and head is not None:
                head.weight.weight_loader(head.weight, tensor)
                self._orz_loaded.add("lm_head.weight")

    def orz_finish_weight_update(self) -> list[str]:
        """Finalise the reload; returns the served model's parameters that no bucket loaded (sorted)."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.model, self.model_runner.model_config)
        self._orz_receiver.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        loaded = self.__dict__.pop("_orz_loaded")
        return sorted(name for name in self.__dict__.pop("_orz_expected") if name not in loaded)
