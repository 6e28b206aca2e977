"""``zsbir export RUN_DIR --format onnx|torchscript`` (added to :data:`zsbir.cli.main`);
heavy imports happen inside the command, so ``zsbir --help`` stays fast.

Errors are one ``error:`` line: exit 1 for a run directory without ``final.pt``, a
missing package (``onnx``, ``onnxruntime``: the ``export`` extra) or an exported model
that differs from the torch model; exit 2 for a wrong command line (an unknown format).
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from zsbir.export import FORMATS, ExportError

__all__ = ["export"]


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(FORMATS)),
              help="onnx (needs the export extra: onnx, onnxruntime) or torchscript.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Directory to write into (default RUN_DIR/export/FORMAT).")
@click.option("--normalize", is_flag=True,
              help="Append the L2 normalization (default: the raw embedding zsbir ranks "
                   "and hashes).")
def export(run_dir: str, fmt: str, output: str | None, normalize: bool) -> None:
    """Export RUN_DIR's embedding model (sketches and photos -> embeddings) with its input
    configuration (model.json) and model card (MODEL_CARD.md); the batch size is dynamic.

    The exported model is checked against the torch model (two batch sizes, both domains)
    before it is written."""
    from zsbir.export.embedding import export_run

    try:
        done = export_run(run_dir, fmt, output, normalize)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    info = done.info
    domain = " + domain bit" if info["domain_input"] else ""
    Console(soft_wrap=True).print(
        f"{escape(str(done.model))}: images{domain} -> {info['embed_dim']}-d embedding "
        f"(batch dynamic; largest difference to torch {info['checked']['max_abs_diff']:.2g}); "
        f"{escape(str(done.info_file))}, {escape(str(done.card))}", highlight=False)
