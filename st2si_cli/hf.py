"""Keep transformers' and DeepSpeed's own console chatter off our stderr, and their remote code out."""

from __future__ import annotations

import os
from pathlib import Path


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


def refuse_custom_code(folder: Path) -> None:
    """st2si never runs code that comes with a model: a folder whose config asks for it is refused."""
    import json

    from st2si_cli.errors import St2siError

    for fname in (
        "config.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        path = Path(folder) / fname
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise St2siError(f"{path}: not readable JSON ({e})") from None
        if isinstance(config, dict) and config.get("auto_map"):
            raise St2siError(
                f"{path}: asks for custom modelling code (auto_map); st2si never runs code shipped with "
                "a model, so it only takes architectures that transformers implements itself"
            )
