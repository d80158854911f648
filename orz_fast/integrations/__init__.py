"""orz_fast as a drop-in backend inside other RL frameworks, one module per framework.

- ``orz_fast.integrations.verl``: veRL's GAE, vanilla PPO policy loss and value loss (same
  signatures, padded ``[B, T]`` tensors) on ``orz_fast.ops``; ``register()`` puts them in veRL's
  registries, and ``VERL_USE_EXTERNAL_MODULES=orz_fast.integrations.verl_plugin`` does so in
  every veRL process.
- ``orz_fast.integrations.openrlhf``: ``PolicyLoss`` and ``ValueLoss`` modules call-compatible with
  ``openrlhf.models.loss``.
- ``orz_fast.integrations.trl``: ``patch(trainer)`` makes a TRL ``GRPOTrainer`` score completions
  with ``orz_fast.ops.linear_logprobs`` from the backbone's hidden states.

Each module imports its framework only where it must (registration, TRL's output type), so the
loss and advantage functions work without the framework installed.
"""
