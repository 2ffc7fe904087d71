"""`attnsparse info`: architecture, heads, context and whether the backend supports the model."""

from __future__ import annotations

import json

import typer

from attnsparse.cli._common import device_option, dtype_option, run_or_exit
from attnsparse.errors import AttnsparseError


def info_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Architecture, heads, context and whether the attnsparse backend supports the model."""
    from attnsparse.core.devices import model_device, model_dtype, placement
    from attnsparse.core.models import check_backend_support, describe, load_model

    def body() -> dict[str, object]:
        loaded = load_model(model, dtype, probe=False, device=device)
        facts = describe(loaded.model)
        try:
            check_backend_support(loaded.model)
            facts["backend_supported"] = True
        except AttnsparseError as error:
            facts["backend_supported"] = False
            facts["backend_error"] = str(error)
        facts |= placement(model_device(loaded.model), model_dtype(loaded.model))
        facts["source"] = loaded.source
        facts["load_seconds"] = round(loaded.load_seconds, 2)
        return facts

    facts = run_or_exit(body)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")
