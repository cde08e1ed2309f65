"""Keep transformers' and DeepSpeed's own console chatter off our stderr."""

from __future__ import annotations

import os


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser draws its own tqdm bar
    try:
        import torch

        if not torch.cuda.is_available():
            # transformers probes DeepSpeed when it is installed; on a CPU-only machine that probe
            # logs a warning on every save unless the accelerator is named.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
