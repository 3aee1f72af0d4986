"""The ``fgh`` command line: each command parses options, calls one library function, prints.

Results go to stdout (a table, or JSON with ``--json``); progress and logs go to stderr. A
:class:`~fgh_deploy.errors.FghError` becomes one line on stderr and a non-zero exit code; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import FghError

app = typer.Typer(
    name="fgh",
    help="Fine-grained image hashing: train, export, encode, query.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
BitsOption = Annotated[int, typer.Option("--bits", "-b", min=1, help="Code length in bits.")]
InputSizeOption = Annotated[int, typer.Option("--input-size", min=32, help="Square input size in pixels.")]


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"fgh {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
def models(
    bits: BitsOption = 48,
    input_size: InputSizeOption = 224,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    backbone: Annotated[list[str] | None, typer.Option("--backbone", help="Only these backbones.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the hashing models × backbones with parameters and GMACs at the input size."""
    from .summary import summarize_all

    try:
        rows = summarize_all(bits, input_size, model, backbone)
    except ValueError as exc:
        raise FghError(str(exc)) from exc
    if as_json:
        _print_json({"schema_version": 1, "models": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"fgh models at {bits} bits, {input_size}×{input_size} input")
    table.add_column("model", no_wrap=True)
    table.add_column("backbone", no_wrap=True)
    for column in ("params (M)", "deployed params (M)", "GMACs"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.model, r.backbone, f"{r.params / 1e6:.1f}", f"{r.inference_params / 1e6:.1f}", f"{r.gmacs:.2f}")
    out.print(table)
    seen: dict[str, str] = {r.model: f"{r.summary}. {r.paper}" for r in rows}
    for name, text in seen.items():
        out.print(f"  {name:8s} {text}", soft_wrap=True)
    err.print("Build one in Python: fgh_deploy.build_model(name, bits, backbone=..., pretrained=True)", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="fgh")
    except FghError as exc:
        err.print(f"fgh: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("fgh: interrupted")
        sys.exit(130)
