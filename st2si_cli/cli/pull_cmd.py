"""`st2si zoo pull`: build or fetch a backbone into the zoo."""

from __future__ import annotations

import typer

from st2si_cli.cli.options import check_new_name, json_option, open_zoo
from st2si_cli.cli.output import err, human_size, print_json


def pull_cmd(
    ref: str = typer.Argument(
        ...,
        help="smollm2-135m (offline default), tiny-opt, tiny-llama, a hub id, a .gguf file or an HF folder.",
    ),
    name: str | None = typer.Option(None, "--name", help="Name in the zoo.", callback=check_new_name),
    json_out: bool = json_option(),
) -> None:
    """Build or download a backbone and store it in the zoo."""
    from st2si_cli.backbones.hf import quiet_transformers
    from st2si_cli.backbones.pull import pull

    quiet_transformers()
    err.print(f"Pulling {ref} ...", markup=False)
    art = pull(open_zoo(), ref, name)
    if json_out:
        print_json(art.to_dict())
    else:
        err.print(f"Stored backbone {art.name} ({art.short_id}, {human_size(art.size)})", markup=False)
