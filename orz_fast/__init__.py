"""orz_fast: a fast Open-Reasoner-Zero PPO trainer for reasoning LLMs."""

__version__ = "0.1.0"
