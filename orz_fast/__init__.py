"""orz_fast: a fast Open-Reasoner-Zero PPO trainer for reasoning LLMs.

Importing orz_fast (or ``orz_fast.ops``, ``orz_fast.integrations.*``) has no side effect on the
process: it sets no environment variable, imports no torch here and initialises no CUDA
context, so frameworks can import it inside their own workers. Whether Triton kernels run
compiled or in Triton's interpreter is decided by ``TRITON_INTERPRET`` as the caller left it
when ``orz_fast.kernels`` is first imported (the test suites set it on CPU machines).
"""

__version__ = "0.1.0"
