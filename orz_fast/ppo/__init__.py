"""PPO: run checkpoints, experience making, advantages and the actor / critic update steps."""
