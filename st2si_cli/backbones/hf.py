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


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (transformers' run to several)."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[0] if lines else type(error).__name__


def check_model_type(folder: Path) -> None:
    """A folder whose config.json names no model_type, or one this transformers does not implement, is
    refused in one line naming the folder and the model_type (transformers would explain in four)."""
    import json

    from st2si_cli.errors import St2siError

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise St2siError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise St2siError(f"{path}: expected a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise St2siError(
            f"{folder}: config.json names no model_type, so transformers cannot tell the architecture"
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise St2siError(
            f"{folder}: model_type {model_type!r} in config.json is not an architecture transformers "
            f"{transformers.__version__} knows (a newer one, or a typo)"
        )
