"""The command line of the photo search: ``zsbir index build|update``, ``zsbir search``,
``zsbir serve`` (added to :data:`zsbir.cli.main`). Heavy imports happen inside the
commands, so ``zsbir --help`` stays fast."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["index", "search", "serve"]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N or auto.")
workers_option = click.option("--workers", default=-1, show_default=True,
                              help="Image-decoding worker processes (-1: automatic).")
ray_option = click.option(
    "--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
    help="Embed in Ray actor pools (the ray extra): --ray alone starts a local Ray instance; "
         "--ray ADDRESS joins a cluster (e.g. ray://head:10001 or auto). The photo folder "
         "must be at the same path on every node.")
ray_actors_option = click.option(
    "--ray-actors", type=click.IntRange(min=1), default=None,
    help="Embedding actors (default: one per GPU of the cluster, else one per CPU).")
batch_option = click.option("--batch-size", default=64, show_default=True,
                            type=click.IntRange(min=1), help="Photos per embedded batch.")


@click.group()
def index() -> None:
    """Build or update a photo index (a self-contained directory) for sketch search."""


def _print_summary(s: Any, index_dir: str) -> None:
    from zsbir.progress import format_seconds
    from zsbir.search.scan import shown

    for note in s.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for path, reason in s.skipped:
        err_console.print(f"[yellow]skipped[/] {escape(shown(path))}: {escape(shown(reason))}",
                          highlight=False)
    if s.stale_lock:
        err_console.print(f"[yellow]note:[/] removed a stale write lock of pid "
                          f"{s.stale_lock.get('pid')} (no longer running)", highlight=False)
    what = "resumed: " if s.resumed else ""
    console.print(
        f"{what}{s.embedded} photos embedded ({s.new} new, {s.changed} changed), "
        f"{s.unchanged} unchanged, {s.removed} removed, {len(s.skipped)} skipped; "
        f"{s.total} photos in {escape(shown(index_dir))} "
        f"({format_seconds(s.seconds)}, {s.photos_per_s:.1f} photos/s)", highlight=False)
    if s.recall_at_10 is not None:
        what = getattr(s, "search_param", None) or f"IVF search: nprobe {s.nprobe}"
        console.print(f"{what}, recall@10 against exact search {s.recall_at_10:.3f}",
                      highlight=False)


@index.command("build")
@click.argument("run_dir", type=click.Path())
@click.argument("photo_dir", type=click.Path())
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--hasher", help="Which of the run's hashers encodes the photos (its tag, e.g. "
                               "itq64 for binary codes); default: the run's first.")
@click.option("--ann", type=click.Choice(["flat", "ivf", "hnsw"]), default="flat",
              show_default=True,
              help="flat: exact search; ivf: inverted lists (for more than ~100,000 photos; "
                   "its recall@10 against exact search is measured and reported); hnsw: a "
                   "graph index (--backend milvus, real-valued codes; recall reported too).")
@click.option("--backend", default="faiss", show_default=True,
              help="Where the search structure lives: faiss (photos.faiss in INDEX_DIR) or "
                   "milvus (a Milvus collection; the milvus extra). See `zsbir list "
                   "index_backends`.")
@click.option("--uri", default="", help="--backend milvus: http://HOST:19530 (a server or "
                                        "cluster) or a local file for milvus-lite (default: "
                                        "INDEX_DIR/milvus.db).")
@click.option("--token", default="", help="--backend milvus: the server's token (default: "
                                          "$ZSBIR_MILVUS_TOKEN; never stored).")
@click.option("--collection", default="", help="--backend milvus: the collection name "
                                               "(default: from INDEX_DIR).")
@click.option("--name", help="A name shown by `zsbir serve` (default: INDEX_DIR's name).")
@click.option("--shard", metavar="I/N",
              help="Index only shard I of N of the sorted photo list (0-based), e.g. on N "
                   "machines; join the N shard indexes with `zsbir index merge`.")
@click.option("--follow-outside-links", is_flag=True,
              help="Also index the files that symbolic links lead to outside PHOTO_DIR "
                   "(refused by default: `zsbir serve` serves every indexed file). "
                   "Updates keep this setting.")
@click.option("--outputs", "outputs", metavar="NAME[,NAME]",
              help="Model outputs to store per photo besides those the run's [pair_scorer] "
                   "and [[rerankers]] read (stored by default), e.g. tokens: what `zsbir "
                   "search --pair-scorer` re-scores with.")
@click.option("--output-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="How stored outputs are kept (float16: half the size).")
@ray_option
@ray_actors_option
@device_option
@batch_option
@workers_option
def index_build(run_dir: str, photo_dir: str, index_dir: str, hasher: str | None, ann: str,
                backend: str, uri: str, token: str, collection: str, name: str | None,
                shard: str | None, follow_outside_links: bool, outputs: str | None,
                output_dtype: str, ray_address: str | None, ray_actors: int | None,
                device: str, batch_size: int, workers: int) -> None:
    """Embed every photo under PHOTO_DIR with RUN_DIR's trained model into INDEX_DIR.

    INDEX_DIR receives a copy of the model, so searching needs nothing else. Run again on
    an interrupted or failed build, it resumes.
    """
    from zsbir.engine.distributed import ShardError, parse_shard
    from zsbir.progress import console_output
    from zsbir.search.backends import make_backend
    from zsbir.search.store import build_index

    try:
        part = parse_shard(shard) if shard else None
    except ShardError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from exc
    names = [n.strip() for n in (outputs or "").split(",") if n.strip()]
    if outputs is not None and not names:
        raise click.BadParameter("give output names, e.g. tokens", param_hint="--outputs")
    options = {"uri": uri, "token": token, "collection": collection}
    if backend != "milvus" and any(options.values()):
        raise click.BadParameter("--uri, --token and --collection are options of "
                                 "--backend milvus", param_hint="--backend")
    chosen = make_backend(backend, **(options if backend == "milvus" else {}))
    _structure_threads()
    with console_output(console):
        s = build_index(run_dir, photo_dir, index_dir, hasher=hasher, ann=ann,  # type: ignore
                        name=name, device=device, batch_size=batch_size, workers=workers,
                        shard=part, follow_outside_links=follow_outside_links,
                        outputs=names, output_dtype=output_dtype, backend=chosen,
                        ray=_ray_options(ray_address, ray_actors, device))
    _print_summary(s, index_dir)


@index.command("merge")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
def index_merge(index_dir: str, shard_dirs: tuple[str, ...]) -> None:
    """Join the shard indexes SHARD_DIRS (`zsbir index build --shard I/N`) into INDEX_DIR,
    copying their embeddings (nothing is embedded again)."""
    from zsbir.progress import console_output
    from zsbir.search.store import merge_indexes

    _structure_threads()
    with console_output(console):
        s = merge_indexes(list(shard_dirs), index_dir)
    _print_summary(s, index_dir)


def _structure_threads() -> None:
    """The thread plan (:mod:`zsbir.engine.threads`) for what ``zsbir index`` computes
    outside the embedding (which applies its own and returns to this one): the faiss
    structure, ITQ, the recall check, with the CPUs the process may use (cgroup quota,
    affinity) instead of faiss's and torch's default of every core. No lease: the
    embedding holds one while it runs."""
    from zsbir.engine.threads import use_threads

    use_threads("evaluate", lease=False)


def _ray_options(address: str | None, actors: int | None, device: str) -> Any:
    if address is None:
        if actors is not None:
            raise click.BadParameter("--ray-actors needs --ray", param_hint="--ray-actors")
        return None
    from zsbir.search.ray_embed import RayOptions, require_ray

    require_ray()  # the extra, checked before anything is written
    return RayOptions(address=None if address == "local" else address, actors=actors,
                      device=device)


@index.command("update")
@click.argument("index_dir", type=click.Path(file_okay=False))
@ray_option
@ray_actors_option
@device_option
@batch_option
@workers_option
def index_update(index_dir: str, ray_address: str | None, ray_actors: int | None,
                 device: str, batch_size: int, workers: int) -> None:
    """Embed new and changed photos of INDEX_DIR's folder; drop deleted ones."""
    from zsbir.progress import console_output
    from zsbir.search.store import update_index

    ray = _ray_options(ray_address, ray_actors, device)
    _structure_threads()
    with console_output(console):
        s = update_index(index_dir, device=device, batch_size=batch_size, workers=workers,
                         ray=ray)
    _print_summary(s, index_dir)


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("sketches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1),
              help="Results per sketch.")
@click.option("--class", "label", help="Only photos of this class (their folder's name).")
@click.option("--rerank", metavar="NAME[:KEY=VALUE,...]",
              help="Rerank with a registered reranker (zsbir list rerankers; real-valued "
                   "indexes only), e.g. alpha_qe or seen_gate:gamma=0.3,tau=0.5; a bare "
                   "NAME takes the run's [[rerankers]] table of that name, else defaults.")
@click.option("--pair-scorer", "pair_scorer", metavar="NAME",
              help="Re-score the top --top-k photos with a registered pair scorer (zsbir "
                   "list pair_scorers; the run's [pair_scorer] keeps its parameters) from "
                   "the outputs the index stores.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1),
              help="How many of the ranking's first photos the pair scorer re-scores "
                   "(default: the run's [pair_scorer] top_k, else 100); alone: the run's "
                   "pair scorer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@device_option
def search(index_dir: str, sketches: tuple[str, ...], top: int, label: str | None,
           rerank: str | None, pair_scorer: str | None, top_k: int | None, as_json: bool,
           device: str) -> None:
    """Rank the photos of INDEX_DIR for each SKETCH image."""
    from PIL import Image

    from zsbir.engine.threads import use_threads
    from zsbir.search.api import Index
    from zsbir.search.files import disk_errors
    from zsbir.search.scan import shown

    # one search at a time: the whole CPU share, divided among the zsbir processes computing
    # now; a short search takes no lease (zsbir.engine.threads)
    use_threads("evaluate", lease=False)
    with disk_errors(index_dir), warnings.catch_warnings():
        # Pillow's multi-line DecompressionBombWarning: the pixel limit gives one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        idx = Index.open(index_dir, device)
        try:
            queries = []
            for s in sketches:  # every unreadable sketch is reported before any search runs
                queries.append(idx.query_image(s))
            results = idx.search_many(queries, top, label, rerank, pair_scorer, top_k)
        finally:
            idx.close()
    paired = pair_scorer is not None or top_k is not None
    if as_json:
        click.echo(json.dumps({"index": idx.name, "score": idx.score_name,
                               "queries": [{"query": s, "results": [r.to_dict() for r in rs]}
                                           for s, rs in zip(sketches, results)]}, indent=2))
        return
    rows = [(s, str(r.rank), shown(r.path), shown(r.label or ""), str(r.score) if idx.binary
             else f"{r.score:.4f}", *(("" if r.pair_score is None else f"{r.pair_score:.4f}",)
                                      if paired else ()))
            for s, rs in zip(sketches, results) for r in rs]
    columns = ("query", "rank", "photo", "class", idx.score_name,
               *(("pair score",) if paired else ()))
    if not console.is_terminal:
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join(r))
        return
    table = Table(*columns, title=f"{idx.name}: {len(idx)} photos")
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    console.print(table)


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the photos to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-upload-mb", default=4.0, show_default=True,
              type=click.FloatRange(min=0.01), help="Largest sketch upload accepted.")
@click.option("--timeout-s", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Longest a search or photo may take, waiting included (503 beyond); "
                   "also the limit for receiving a request body (408).")
@click.option("--max-concurrent", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Searches, thumbnails and photo reads decoded at once (bounds memory).")
@click.option("--pair-scorer", "pair_scorer", metavar="NAME",
              help="Re-score every search's top --top-k photos with this pair scorer (as "
                   "`zsbir search --pair-scorer`).")
@click.option("--top-k", "top_k", type=click.IntRange(min=1),
              help="How many photos the pair scorer re-scores (as `zsbir search`).")
@device_option
def serve(index_dir: str, host: str, port: int, max_upload_mb: float, timeout_s: float,
          max_concurrent: int, pair_scorer: str | None, top_k: int | None,
          device: str) -> None:
    """Serve a sketch-search page (drawing canvas + results) for INDEX_DIR."""
    try:
        import uvicorn  # noqa: F401  (the serve extra)

        from zsbir.search.server import create_app, run_server
    except ImportError as exc:
        raise click.ClickException(f"`zsbir serve` needs the serve extra "
                                   f"(pip install 'zsbir[serve]'): {exc}") from exc
    from zsbir.engine.threads import use_threads

    # the model and the search run one request at a time (Index's lock): all the CPU share
    # for each; a server mostly waits, so it takes no lease (zsbir.engine.threads)
    use_threads("evaluate", lease=False)
    app = create_app(index_dir, device=device, max_upload_bytes=int(max_upload_mb * 2**20),
                     max_concurrent=max_concurrent, timeout_s=timeout_s,
                     body_timeout_s=timeout_s, pair_scorer=pair_scorer, top_k=top_k)
    console.print(f"serving {escape(index_dir)} on http://{host}:{port}/ (Ctrl-C stops)",
                  highlight=False)
    run_server(app, host=host, port=port)
    sys.exit(0)
