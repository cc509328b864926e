"""The ``tzoo`` command. Heavy imports happen inside commands so ``tzoo --help`` is instant."""

from __future__ import annotations

import string
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tzoo.config import Settings
    from tzoo.runtime.manager import ModelManager

app = typer.Typer(
    help="Transformer Zoo: look inside transformer language models.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="List, load and convert models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
lens_app = typer.Typer(help="Train tuned lenses.", no_args_is_help=True)
app.add_typer(lens_app, name="lens")
console = Console()
err_console = Console(stderr=True)

# Exit codes, one per kind of failure, so scripts can tell them apart.
EXIT_CODES = {
    "UnknownModelError": 2,
    "ModelTooLargeError": 3,
    "ModelLoadError": 4,
    "ModelUnavailableError": 5,
    "DeviceError": 6,
    "InputTooLongError": 7,
}


def _write_stderr(message: object) -> None:
    sys.stderr.write(str(message))


@app.callback()
def _configure_logging() -> None:
    """Log to whatever stderr is current: loguru's default handler keeps the stream it saw
    at import, which breaks when a caller (a test runner, a notebook) swaps stderr."""
    import os

    from loguru import logger

    logger.remove()
    level = os.environ.get("TZOO_LOG_LEVEL", "WARNING").upper()
    logger.add(_write_stderr, level=level, diagnose=False)


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from tzoo.config import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err_console.print(f"[red]Invalid settings:[/red] {exc.errors()[0]['msg']}")
        raise typer.Exit(1) from None


@contextmanager
def _model_errors() -> Iterator[None]:
    """Turn runtime errors into a sentence and an exit code instead of a traceback."""
    from tzoo.runtime.errors import ModelError

    try:
        yield
    except ModelError as exc:
        err_console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(exit_code_for(exc)) from None


def exit_code_for(exc: Exception) -> int:
    """The code of the most specific error class we have one for (1 otherwise)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return 1


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default from TZOO_HOST).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from TZOO_PORT).")] = None,
    preload: Annotated[
        list[str] | None,
        typer.Option("--preload", help="Model to load at start-up; repeat for several."),
    ] = None,
) -> None:
    """Start the web server (pages, REST API, docs at /docs)."""
    import uvicorn

    from tzoo.web.app import create_app

    settings = _settings(host=host, port=port, preload=preload or None)
    from loguru import logger

    logger.remove()
    # No variable dumps in tracebacks: they could print secrets or user text into logs.
    logger.add(_write_stderr, level=settings.log_level, backtrace=False, diagnose=False)
    console.print(f"Transformer Zoo on http://{settings.host}:{settings.port}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default; we believe only the
        # proxies the operator names (TZOO_FORWARDED_ALLOW_IPS).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or [],
    )


@models_app.command("list")
def models_list() -> None:
    """Show the catalogue: every model, whether it is installed, and its size in memory."""
    from tzoo.runtime.manager import ModelManager

    manager = ModelManager(_settings())
    table = Table("name", "architecture", "size", "available", "description")
    for row in manager.status():
        available = "yes" if row.available else f"no: {row.unavailable_reason}"
        table.add_row(row.name, row.architecture, _mib(row.size_bytes), available, row.description)
    console.print(table)


def _progress_printer() -> Callable[[str], None]:
    return lambda message: console.print(f"[dim]…[/dim] {message}")


@models_app.command("load")
def models_load(
    name: Annotated[str, typer.Argument(help="Catalogue name, local directory or hub id.")],
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, float16 or bfloat16.")] = None,
) -> None:
    """Load a model once to check it works, and print what it is."""
    import time

    from tzoo.runtime.manager import ModelManager

    manager: ModelManager = ModelManager(_settings())
    started = time.perf_counter()
    with _model_errors(), console.status(f"Loading {name}…"):
        handle = manager.get(name, device=device, dtype=dtype, progress=_progress_printer())
    table = Table(
        "field", "value", title=f"{handle.name} loaded in {time.perf_counter() - started:.1f} s"
    )
    for key, value in handle.summary().items():
        table.add_row(key, _mib(value) if key == "size_bytes" else str(value))
    console.print(table)


@models_app.command("convert")
def models_convert(
    name: Annotated[str, typer.Argument(help="A GGUF model: catalogue name or local directory.")],
) -> None:
    """Convert a GGUF model once into the safetensors cache so later loads are fast."""
    from tzoo.runtime.catalogue import resolve
    from tzoo.runtime.gguf_cache import cache_dir_for, ensure_converted
    from tzoo.runtime.sources import LocalDirSource

    settings = _settings()
    with _model_errors():
        spec = resolve(name)
        source = spec.source
        gguf = source._gguf_file() if isinstance(source, LocalDirSource) else None
        if gguf is None:
            err_console.print(
                f"[red]Error:[/red] {name!r} is not a GGUF model; nothing to convert."
            )
            raise typer.Exit(4)
        assert isinstance(source, LocalDirSource)
        target = cache_dir_for(settings.cache_dir, source.cache_name)
        with console.status(f"Converting {name}…"):
            ensure_converted(gguf, target, progress=_progress_printer())
    console.print(f"Converted: {target}")


@app.command()
def attention(
    text: Annotated[str, typer.Argument(help="The text to look at.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Catalogue name, local directory or hub id.")
    ] = "minilm-l6",
    pair: Annotated[
        str | None,
        typer.Option(help="Sentence B, or the decoder text of an encoder-decoder model."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the views as one offline HTML file here.")
    ] = None,
    share: Annotated[
        bool, typer.Option("--share", help="Store it in the database and print its permanent URL.")
    ] = False,
    visibility: Annotated[str, typer.Option(help="public, unlisted (with --share).")] = "public",
    view: Annotated[
        str, typer.Option(help="head, model or neuron: the view the link opens.")
    ] = "head",
) -> None:
    """Compute a model's attention for TEXT: a summary here, an HTML file, or a share link."""
    from tzoo.analyses.attention import EmptyInputError, InputTooLongError

    settings = _settings()
    if visibility not in ("public", "unlisted"):
        err_console.print("[red]Error:[/red] --visibility must be public or unlisted from the CLI.")
        raise typer.Exit(2)
    if view not in ("head", "model", "neuron"):
        err_console.print("[red]Error:[/red] --view must be head, model or neuron.")
        raise typer.Exit(2)
    try:
        with _model_errors(), console.status(f"Computing attention with {model}…"):
            result = _attention_result(settings, model, text, pair)
            url = _share(settings, model, text, pair, visibility, view) if share else None
    except (InputTooLongError, EmptyInputError) as exc:
        err_console.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(7) from None
    _print_attention_summary(result)
    if out is not None:
        out.write_text(_standalone_html(result), encoding="utf-8")
        console.print(f"Wrote {out} ({out.stat().st_size / 1024:,.0f} KiB, works offline)")
    if url:
        console.print(f"Shared: {url}")


def _attention_result(settings: Settings, model: str, text: str, pair: str | None) -> Any:
    from tzoo.analyses.attention import attention as compute
    from tzoo.runtime.manager import ModelManager

    with ModelManager(settings).use(model, exclusive=True, progress=_progress_printer()) as handle:
        return compute(handle, text, pair, max_tokens=settings.attention_max_tokens)


def _standalone_html(result: Any) -> str:
    from tzoo.analyses.attention_record import attention_meta, attention_parts
    from tzoo.service.visualizations import view_arrays
    from tzoo.web.standalone import render_standalone_html

    attention, neurons, position_bias = view_arrays(attention_parts(result))
    return render_standalone_html(
        attention_meta(result),
        attention,
        neurons,
        position_bias=position_bias,
        title=f"Attention — {result.model_name}",
    )


def _share(
    settings: Settings, model: str, text: str, pair: str | None, visibility: str, view: str
) -> str:
    from tzoo.runtime.manager import ModelManager
    from tzoo.service.result_cache import make_result_cache
    from tzoo.service.visualizations import VisualizationRequest, create_visualization
    from tzoo.store.db import create_engine_for, run_migrations, session_factory

    engine = create_engine_for(settings.sqlalchemy_url)
    try:
        run_migrations(engine)
        request = VisualizationRequest(model, text, pair, view, visibility)  # type: ignore[arg-type]
        with session_factory(engine)() as session:
            artefact = create_visualization(
                session, ModelManager(settings), make_result_cache(settings), settings, request
            )
            return f"{settings.base_url}/viz/{artefact.slug}#view={view}"
    finally:
        engine.dispose()


def _print_attention_summary(result: Any) -> None:
    for name, stack in result.stacks.items():
        n_layers, n_heads, n_q, n_k = stack.attentions.shape
        table = Table(
            "statistic",
            "strongest head",
            "value",
            title=f"{name}: {n_layers} layers x {n_heads} heads, {n_q}x{n_k} tokens",
        )
        for stat, values in stack.head_stats.items():
            import numpy as np

            if np.all(np.isnan(values)):
                continue
            layer, head = np.unravel_index(np.nanargmax(values), values.shape)
            table.add_row(stat, f"L{layer}H{head}", f"{values[layer, head]:.3f}")
        console.print(table)


@lens_app.command("train")
def lens_train(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Catalogue name, local directory or hub id.")
    ] = "smollm2-135m",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    docs: Annotated[int, typer.Option(min=2, help="Documents to sample from the model.")] = 64,
    tokens_per_doc: Annotated[
        int, typer.Option("--tokens-per-doc", min=1, help="Tokens sampled per document.")
    ] = 128,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per training window.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 2,
    lr: Annotated[float, typer.Option(min=0, help="Peak Adam learning rate.")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed of the corpus, split and window order.")] = 0,
    heldout: Annotated[
        float, typer.Option(min=0.01, max=0.5, help="Fraction of the corpus held out.")
    ] = 0.1,
    shipped: Annotated[
        bool, typer.Option(help="Add the texts shipped with tzoo to the sampled corpus.")
    ] = True,
    bf16: Annotated[
        bool,
        typer.Option(help="Train the readout in bfloat16: about 2x faster on CPUs with bf16."),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Save the lens here (default TZOO_TUNED_LENS_DIR/MODEL).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 50,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in OUT/checkpoints.")
    ] = False,
) -> None:
    """Train a tuned lens on text sampled from the model, save it, and print held-out KL
    per layer against the logit lens. Exit 0 only when the tuned lens is better at every
    layer."""
    from tzoo.analyses.lens import Readout
    from tzoo.analyses.tuned_lens import default_lens_dir
    from tzoo.runtime.manager import ModelManager

    settings = _settings()
    try:
        with (
            _model_errors(),
            ModelManager(settings).use(model, exclusive=True, progress=_progress_printer()) as h,
        ):
            Readout.of(h)  # a decoder with an unembedding, before any sampling
            directory = out or default_lens_dir(h.name, settings)
            train, heldout_docs = _lens_corpus(h, docs, tokens_per_doc, seed, heldout, shipped)
            lens = _train_lens_with_bar(
                h,
                train,
                steps=steps,
                lr=lr,
                seq_len=seq_len,
                batch_size=batch_size,
                seed=seed,
                bf16=bf16,
                checkpoint_dir=directory / "checkpoints",
                checkpoint_every=checkpoint_every,
                resume=resume,
            )
            with console.status("Evaluating on the held-out text…"):
                rows = _heldout_rows(h, lens, heldout_docs, seq_len, batch_size)
            lens.training_stats["heldout"] = rows
            lens.save(directory)
    except ValueError as exc:
        err_console.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1) from None
    _print_lens_table(rows, len(heldout_docs))
    console.print(f"Saved the tuned lens to {directory}")
    worse = [str(row["layer"]) for row in rows if not row["improved"]]
    if worse:
        err_console.print(
            f"[red]The tuned lens did not lower held-out KL at layer(s) {', '.join(worse)};[/red]"
            " train longer (--steps) or on more text (--docs)."
        )
        raise typer.Exit(1)


def _lens_corpus(
    handle: Any, docs: int, tokens_per_doc: int, seed: int, heldout: float, shipped: bool
) -> tuple[list[str], list[str]]:
    from tzoo.analyses.corpus import build_corpus, shipped_corpus, split_corpus

    if handle.architecture != "decoder":  # an encoder cannot sample text: the shipped texts
        if not shipped:
            raise _bad_input(
                f"{handle.name} is an encoder and cannot sample a corpus; keep --shipped."
            )
        console.print(f"{handle.name} is an encoder: training on the texts shipped with tzoo.")
        return split_corpus(shipped_corpus(), heldout, seed)
    with console.status(f"Sampling {docs} documents from {handle.name} (seed {seed})…") as s:
        corpus = build_corpus(
            handle,
            n_docs=docs,
            tokens_per_doc=tokens_per_doc,
            seed=seed,
            progress=lambda done, total: s.update(f"Sampled {done}/{total} documents…"),
        )
    if shipped:
        corpus += shipped_corpus()
    return split_corpus(corpus, heldout, seed)


@contextmanager
def _training_bar(fields: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A rich bar for a training loop: steps done of the total, ``fields`` (a format string
    over the names given to the update function), time elapsed and left. Yields
    ``update(step, total=None, **values)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    names = [name for _, name, _, _ in string.Formatter().parse(fields) if name]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields.replace("{", "{task.fields[").replace("}", "]}")),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        blank: dict[str, Any] = dict.fromkeys(names, "…")
        task = bar.add_task("Training", total=total, **blank)

        def update(step: int, total: int | None = None, **values: Any) -> None:
            if total:
                values["total"] = total
            bar.update(task, completed=step, **values)

        yield update


def _train_lens_with_bar(handle: Any, train: list[str], *, bf16: bool, **options: Any) -> Any:
    import torch

    from tzoo.analyses.tuned_lens import train_tuned_lens

    with _training_bar("KL {loss}", total=options["steps"]) as update:

        def progress(step: int, total: int, loss: float) -> None:
            update(step, loss=f"{loss:.3f}")

        return train_tuned_lens(
            handle,
            train,
            readout_dtype=torch.bfloat16 if bf16 else None,
            progress=progress,
            **options,
        )


def _heldout_rows(
    handle: Any, lens: Any, heldout: list[str], seq_len: int, batch_size: int
) -> list[dict[str, Any]]:
    from tzoo.analyses.tuned_lens import evaluate_kl, kl_table

    logit = evaluate_kl(handle, None, heldout, seq_len=seq_len, batch_size=batch_size)
    tuned = evaluate_kl(handle, lens, heldout, seq_len=seq_len, batch_size=batch_size)
    return kl_table(logit, tuned)


def _print_lens_table(rows: list[dict[str, Any]], n_docs: int) -> None:
    table = Table(
        "layer",
        "logit lens",
        "tuned lens",
        "improved",
        title=f"Held-out KL to the final distribution (nats, {n_docs} documents)",
        caption="layer 0: the embeddings; layer l: the residual stream after l blocks",
    )
    for row in rows:
        mark = "[green]yes[/green]" if row["improved"] else "[red]no[/red]"
        table.add_row(str(row["layer"]), f"{row['logit_kl']:.3f}", f"{row['tuned_kl']:.3f}", mark)
    console.print(table)


@app.command()
def doctor() -> None:
    """Say which device is used, which models are present, and where data and cache live."""
    import platform

    import torch
    import transformers

    from tzoo.runtime.devices import detect_device, resolve_device
    from tzoo.runtime.manager import ModelManager

    settings = _settings()
    table = Table("check", "value", title="Transformer Zoo doctor")
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("device (detected)", detect_device())
    with _model_errors():
        table.add_row("device (in use)", resolve_device(settings.device))
    table.add_row("data dir", str(settings.data_dir))
    table.add_row("cache dir", str(settings.cache_dir))
    table.add_row("database", _mask_password(settings.sqlalchemy_url))
    table.add_row("redis", _mask_password(settings.redis_url) if settings.redis_url else "off")
    table.add_row("memory budget", _mib(settings.memory_budget_bytes))
    console.print(table)
    models_table = Table("model", "present", "size")
    for row in ModelManager(settings).status():
        present = "yes" if row.available else f"no: {row.unavailable_reason}"
        models_table.add_row(row.name, present, _mib(row.size_bytes))
    console.print(models_table)


def _mask_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# -- users ------------------------------------------------------------------------------------

users_app = typer.Typer(
    help="Accounts on this server's store, and the operator (admin) role.", no_args_is_help=True
)
app.add_typer(users_app, name="users")


@contextmanager
def _store_session() -> Iterator[Any]:
    from tzoo.store.db import create_engine_for, run_migrations, session_factory

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine_for(settings.sqlalchemy_url)
    try:
        run_migrations(engine)
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _read_new_password(password_stdin: bool) -> str:
    from tzoo.web.security import PasswordRuleError, check_new_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        check_new_password(password)
    except PasswordRuleError as exc:
        raise _bad_input(str(exc)) from None
    return password


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="3 to 40 letters, digits, '_' or '-'.")],
    admin: Annotated[
        bool, typer.Option("--admin", help="Make the account an operator (load/unload models).")
    ] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create an account (the web's sign-up never makes an operator; this can)."""
    from tzoo.store.accounts import AccountError, create_user
    from tzoo.web.security import hash_password

    password = _read_new_password(password_stdin)
    with _store_session() as session:
        try:
            user = create_user(
                session, username=username, password_hash=hash_password(password), is_admin=admin
            )
        except AccountError as exc:
            raise _bad_input(str(exc)) from None
        role = "an operator" if user.is_admin else "a user"
        console.print(f"Created {user.username!r}, {role}.")


@users_app.command("admin")
def users_admin(
    username: str,
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the role back.")] = False,
) -> None:
    """Grant (or, with --revoke, take back) the operator role of an existing account."""
    from tzoo.store.accounts import get_user, set_admin

    with _store_session() as session:
        user = get_user(session, username)
        if user is None:
            raise _bad_input(f"No account {username!r}; `tzoo users list` shows them.")
        set_admin(session, user, not revoke)
        state = "no longer an operator" if revoke else "an operator"
        console.print(f"{user.username!r} is {state}.")


@users_app.command("list")
def users_list() -> None:
    """Every account, with its role and when it was made."""
    from tzoo.store.accounts import list_users

    with _store_session() as session:
        table = Table("username", "role", "created")
        for user in list_users(session):
            role = "operator" if user.is_admin else "user"
            table.add_row(user.username, role, user.created_at.strftime("%Y-%m-%d %H:%M"))
        console.print(table)


# -- transcoders ------------------------------------------------------------------------------

transcoders_app = typer.Typer(
    help="Train and list transcoders (saved in circuit-tracer's format).", no_args_is_help=True
)
app.add_typer(transcoders_app, name="transcoders")
EXIT_BAD_INPUT = 2  # a usage error, as click reports its own


@transcoders_app.command("train")
def transcoders_train(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Catalogue name, local directory or hub id.")
    ] = "smollm2-135m",
    layers: Annotated[
        str, typer.Option(help="Model layers to replace: numbers and ranges, e.g. 0-3,7.")
    ] = "0-1",
    features: Annotated[int, typer.Option(min=1, help="Features per layer.")] = 2048,
    tokens: Annotated[int, typer.Option(min=1, help="Training tokens.")] = 100_000,
    kind: Annotated[
        str, typer.Option(help="plt (per layer), skip (plus a linear skip) or clt (cross-layer).")
    ] = "plt",
    activation: Annotated[str, typer.Option(help="jumprelu or topk.")] = "jumprelu",
    top_k: Annotated[int, typer.Option(min=1, help="Active features per token (topk).")] = 32,
    sparsity: Annotated[
        float, typer.Option(min=0, help="Final lambda of the tanh sparsity penalty (jumprelu).")
    ] = 3.0,
    lr: Annotated[float, typer.Option(min=0, help="Adam learning rate before its decay.")] = 2e-3,
    batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per optimizer step.")] = 1024,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per window of text.")] = 128,
    docs: Annotated[int, typer.Option(min=2, help="Documents to sample from the model.")] = 64,
    tokens_per_doc: Annotated[
        int, typer.Option("--tokens-per-doc", min=1, help="Tokens sampled per document.")
    ] = 128,
    heldout: Annotated[
        float, typer.Option(min=0.01, max=0.5, help="Fraction of the corpus held out.")
    ] = 0.1,
    shipped: Annotated[
        bool, typer.Option(help="Add the texts shipped with tzoo to the sampled corpus.")
    ] = True,
    seed: Annotated[
        int, typer.Option(help="Seed of the corpus, split, initialisation and batches.")
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Save here (default TZOO_TRANSCODERS_DIR/MODEL/KIND-ACT-NF-LAYERS)."),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 50,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in OUT/checkpoints.")
    ] = False,
) -> None:
    """Train transcoders on a model's MLPs over text sampled from it, save them, and print
    per layer the held-out explained variance, L0 and dead features, and the replacement
    model's next-token agreement with the real model."""
    from tzoo.circuits.io import default_transcoders_dir, save_transcoders
    from tzoo.circuits.training import evaluate_transcoders
    from tzoo.runtime.manager import ModelManager

    picked = _parse_layers(layers)
    if kind not in ("plt", "skip", "clt") or activation not in ("jumprelu", "topk"):
        raise _bad_input("--kind must be plt, skip or clt, and --activation jumprelu or topk.")
    if kind == "clt" and picked != tuple(range(picked[0], picked[-1] + 1)):
        raise _bad_input("A cross-layer transcoder needs consecutive layers, e.g. 0-3.")
    settings = _settings()
    try:
        with (
            _model_errors(),
            ModelManager(settings).use(model, exclusive=True, progress=_progress_printer()) as h,
        ):
            config = _transcoder_config(h, picked, kind, activation, features, top_k)
            directory = out or default_transcoders_dir(config, settings)
            train, heldout_docs = _lens_corpus(h, docs, tokens_per_doc, seed, heldout, shipped)
            transcoders = _train_transcoders_with_bar(
                h,
                config,
                train,
                tokens=tokens,
                batch_tokens=batch_tokens,
                seq_len=seq_len,
                lr=lr,
                sparsity=sparsity,
                seed=seed,
                checkpoint_dir=directory / "checkpoints",
                checkpoint_every=checkpoint_every,
                resume=resume,
            )
            with console.status("Evaluating on the held-out text…"):
                evaluation = evaluate_transcoders(h, transcoders, heldout_docs, seq_len=seq_len)
            transcoders.config.training["evaluation"] = evaluation.to_dict()
            save_transcoders(transcoders.cpu(), directory)
    except ValueError as exc:
        err_console.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1) from None
    _print_transcoder_table(h.name, evaluation, transcoders.config.training)
    console.print(f"Saved the transcoders to {directory}")


def _bad_input(message: str) -> typer.Exit:
    """Print ``message``; the exit to raise for a bad argument."""
    err_console.print(f"[red]Error:[/red] {message}")
    return typer.Exit(EXIT_BAD_INPUT)


def _parse_layers(spec: str) -> tuple[int, ...]:
    """``"0-3,7"`` -> ``(0, 1, 2, 3, 7)``; a bad spec exits with a sentence."""
    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise _bad_input(f"Bad --layers {spec!r}: use numbers and ranges such as 0-3,7.")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise _bad_input(f"Bad --layers {spec!r}: the range {part} runs backwards.")
        layers.update(range(low, high + 1))
    return tuple(sorted(layers))


def _transcoder_config(
    handle: Any, layers: tuple[int, ...], kind: str, activation: str, features: int, top_k: int
) -> Any:
    from tzoo.circuits.transcoders import TranscoderConfig, TranscoderConfigError

    if handle.architecture not in ("decoder", "encoder"):
        raise _bad_input(
            f"Transcoders are trained on decoder-only or encoder-only models; {handle.name} is "
            f"an {handle.architecture}."
        )
    if layers[-1] >= handle.n_layers:
        raise _bad_input(
            f"{handle.name} has {handle.n_layers} layers (0-{handle.n_layers - 1}); "
            f"--layers asks for {', '.join(map(str, layers))}."
        )
    try:
        return TranscoderConfig(
            model_name=handle.name,
            kind=kind,  # type: ignore[arg-type]
            d_model=handle.d_model,
            n_features=features,
            layers=layers,
            n_model_layers=handle.n_layers,
            activation=activation,  # type: ignore[arg-type]
            top_k=top_k,
            stack="decoder" if handle.architecture == "decoder" else "encoder",
        )
    except TranscoderConfigError as exc:
        raise _bad_input(str(exc)) from None


def _train_transcoders_with_bar(handle: Any, config: Any, train: list[str], **options: Any) -> Any:
    from tzoo.circuits.training import StepStats, train_transcoders

    with _training_bar("loss {loss}  L0 {l0}  dead {dead}") as update:

        def progress(stats: StepStats) -> None:
            update(
                stats.step,
                total=stats.steps,
                loss=f"{stats.loss:.2f}",
                l0=f"{stats.mean_l0:.1f}",
                dead=f"{stats.mean_dead_fraction:.1%}",
            )

        return train_transcoders(handle, config, train, progress=progress, **options)


def _print_transcoder_table(model: str, evaluation: Any, training: dict[str, Any]) -> None:
    table = Table(
        "layer",
        "explained variance",
        "L0",
        "dead",
        "next-token agreement",
        "KL (nats)",
        title=f"Transcoders for {model} on held-out text ({evaluation.n_tokens:,} tokens)",
        caption=f"dead: features silent for the last {training['dead_after_tokens']:,} training "
        "tokens; agreement and KL(real || replacement): every covered MLP replaced at once",
    )
    for row, dead_fraction in zip(evaluation.layers, training["dead_fraction"], strict=True):
        table.add_row(
            str(row.layer), f"{row.explained_variance:.3f}", f"{row.l0:.1f}", f"{dead_fraction:.1%}"
        )
    table.add_row(
        "all",
        "",
        "",
        "",
        "n/a"
        if evaluation.next_token_agreement is None
        else f"{evaluation.next_token_agreement:.1%}",
        "n/a" if evaluation.kl is None else f"{evaluation.kl:.4f}",
        style="bold",
    )
    console.print(table)


@transcoders_app.command("list")
def transcoders_list(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to look (default TZOO_TRANSCODERS_DIR)."),
    ] = None,
) -> None:
    """Show the saved transcoder sets: model, kind, layers, size and how well they did."""
    from tzoo.circuits.io import list_saved_transcoders, transcoders_root

    root = directory or transcoders_root(_settings())
    saved = list_saved_transcoders(root)
    if not saved:
        console.print(
            f"No transcoders in {root}; train some with `tzoo transcoders train --model NAME`."
        )
        return
    table = Table(
        "set",
        "model",
        "kind",
        "layers",
        "features",
        "tokens",
        "expl. var.",
        "agreement",
        title=f"Transcoders in {root}",
    )
    for entry in saved:
        where = entry.path.relative_to(root) if entry.path.is_relative_to(root) else entry.path
        table.add_row(
            str(where),
            entry.model_name,
            f"{entry.kind} {entry.activation}",
            ",".join(map(str, entry.layers)),
            "?" if entry.n_features is None else str(entry.n_features),
            "" if entry.tokens is None else f"{entry.tokens:,}",
            "" if entry.explained_variance is None else f"{entry.explained_variance:.3f}",
            "" if entry.next_token_agreement is None else f"{entry.next_token_agreement:.1%}",
        )
    console.print(table)


# -- circuits -----------------------------------------------------------------------------------

circuits_app = typer.Typer(
    help="Attribution graphs and the circuit agent on saved transcoders.", no_args_is_help=True
)
app.add_typer(circuits_app, name="circuits")


def _pick_transcoders(handle: Any, directory: Path | None) -> Any:
    """The set in ``directory``, or the first saved set for ``handle``'s model."""
    from tzoo.circuits.io import list_saved_transcoders, load_transcoders, transcoders_root
    from tzoo.circuits.transcoders import HUB_IDS

    if directory is None:
        names = {handle.name, HUB_IDS.get(handle.name)}
        saved = [
            s
            for s in list_saved_transcoders(transcoders_root(_settings()))
            if s.model_name in names
        ]
        if not saved:
            raise _bad_input(
                f"No transcoders saved for {handle.name}; train some with "
                f"`tzoo transcoders train --model {handle.name}`, or pass --transcoders DIR."
            )
        directory = saved[0].path
    return load_transcoders(directory, handle=handle)


TranscodersOption = Annotated[
    Path | None,
    typer.Option("--transcoders", "-t", help="A saved set (default: the model's first one)."),
]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Catalogue name, local directory or hub id.")
]


@circuits_app.command("explain")
def circuits_explain(
    prompt: Annotated[str, typer.Argument(help="The text the model reads.")],
    target: Annotated[str, typer.Option(help="One token to explain, e.g. ' Paris'.")],
    model: ModelOption = "smollm2-135m",
    transcoders: TranscodersOption = None,
    position: Annotated[
        int | None,
        typer.Option(help="Where the target is predicted (default: last token, or the mask)."),
    ] = None,
    paths: Annotated[int, typer.Option(min=1, max=50, help="How many paths to show.")] = 5,
    labels: Annotated[bool, typer.Option(help="Label the features on the paths.")] = True,
) -> None:
    """The strongest paths in the attribution graph into TARGET's logit, with labels."""
    from tzoo.circuits.agent import explain_circuit
    from tzoo.circuits.labels import explainer_from_settings
    from tzoo.runtime.manager import ModelManager

    settings = _settings()
    manager = ModelManager(settings)
    try:
        with (
            _model_errors(),
            manager.use(model, exclusive=True, progress=_progress_printer()) as h,
        ):
            chosen = _pick_transcoders(h, transcoders)
            # One manager: a labeller that is the traced model is not loaded twice.
            explainer = explainer_from_settings(settings, manager) if labels else None
            with console.status("Tracing…") as status:

                def progress(stage: str, done: int, total: int) -> None:
                    status.update(f"Tracing: {stage} {done}/{total}")

                answer = explain_circuit(
                    h,
                    chosen,
                    prompt,
                    target,
                    target_position=position,
                    n_paths=paths,
                    label=labels,
                    explainer=explainer,
                    progress=progress,
                )
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    console.print(
        f"{answer.target_text!r} at position {answer.target_position}: probability "
        f"{answer.target_probability:.3f}"
    )
    for rank, path in enumerate(answer.paths, start=1):
        sign = "+" if path.sign > 0 else "-"
        console.print(f"{rank}. [{sign}] {path.strength:.4f}  {path.describe()}", markup=False)


@circuits_app.command("graph")
def circuits_graph(
    prompt: Annotated[str, typer.Argument(help="The text the model reads.")],
    out: Annotated[Path, typer.Option(help="Folder for SLUG.json and graph-metadata.json.")],
    slug: Annotated[str, typer.Option(help="The graph's name in the folder.")] = "graph",
    model: ModelOption = "smollm2-135m",
    transcoders: TranscodersOption = None,
    position: Annotated[
        int | None,
        typer.Option(help="Where the logits are read (default: last token, or the mask)."),
    ] = None,
    node_threshold: Annotated[
        float, typer.Option(min=0, max=1, help="Keep nodes up to this share of influence.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(min=0, max=1, help="Keep edges up to this share of influence.")
    ] = 0.98,
    max_feature_nodes: Annotated[
        int, typer.Option(min=1, help="At most this many feature nodes (the most influential).")
    ] = 4096,
) -> None:
    """Compute an attribution graph and write it as circuit-tracer's graph JSON (its
    front end and ours read it)."""
    from tzoo.circuits.attribution import attribute, graph_scores
    from tzoo.circuits.graph_json import write_graph_json
    from tzoo.runtime.manager import ModelManager

    settings = _settings()
    try:
        with (
            _model_errors(),
            ModelManager(settings).use(model, exclusive=True, progress=_progress_printer()) as h,
        ):
            chosen = _pick_transcoders(h, transcoders)
            with console.status("Attributing…") as status:
                graph = attribute(
                    h,
                    chosen,
                    prompt,
                    target_position=position,
                    max_feature_nodes=max_feature_nodes,
                    progress=lambda done, total: status.update(f"Attributing: {done}/{total}"),
                )
            path = write_graph_json(
                graph, out, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold
            )
    except (ValueError, FileNotFoundError) as exc:
        raise _bad_input(str(exc)) from None
    scores = graph_scores(graph)
    console.print(
        f"{graph.n_features} feature nodes, replacement score {scores.replacement:.3f}, "
        f"completeness {scores.completeness:.3f}; wrote {path}"
    )


EXIT_CHECKS_FAILED = 1


@app.command()
def validate(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A model.py (path or URL), a catalogue name, a local model directory or a hub id."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="The model's config.json (path or URL) for a model.py."),
    ] = None,
    tiers: Annotated[str, typer.Option(help="Tiers to run, e.g. 1,2 or 1-4.")] = "1,2",
    checks: Annotated[
        str | None, typer.Option(help="Only these checks, comma-separated (see --list).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write the report here: .html, .md or .json by the suffix."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every input the checks draw.")] = 0,
    output_dir: Annotated[
        Path | None, typer.Option(help="Where tier 3 writes its CSV and configs.")
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Allow fetching and running a model.py from a URL (it runs with your rights).",
        ),
    ] = False,
    list_checks: Annotated[
        bool, typer.Option("--list", help="List the checks by tier and exit.")
    ] = False,
) -> None:
    """Validate a transformer in tiers (1: shapes, batches, padding, causality, precision,
    gradients, init, memory, latency, save/load; 2: attention, Integrated Gradients,
    robustness; 3: overfitting, fine-tuning, search, benchmarks; 4: TorchScript, ONNX and
    torch.export parity). Exits 1 when a check fails, 2 on bad input."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tzoo.validation import (
        ModelCodeError,
        UntrustedCodeError,
        ValidationOptions,
        registered,
    )
    from tzoo.validation import validate as run_validation

    if list_checks:
        table = Table("tier", "check", "what it checks", title="Validation checks")
        for spec in registered():
            table.add_row(str(spec.tier), spec.name, spec.description)
        console.print(table)
        return
    if model is None:
        raise _bad_input("Name a model: a model.py, a catalogue name or a model directory.")
    chosen = _parse_tiers(tiers)
    if report is not None and report.suffix.lower() not in (".html", ".htm", ".md", ".json"):
        raise _bad_input(f"--report {report}: use a .html, .md or .json file.")
    options = ValidationOptions(output_dir=output_dir)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with _model_errors(), Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("Validating", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"Validating: {what}")

            result = run_validation(
                model,
                config,
                chosen,
                checks=None
                if checks is None
                else [c.strip() for c in checks.split(",") if c.strip()],
                seed=seed,
                options=options,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
    except UntrustedCodeError as exc:
        raise _bad_input(str(exc)) from None
    except (ModelCodeError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    _print_validation(result)
    if report is not None:
        suffix = report.suffix.lower()
        text = (
            result.to_json()
            if suffix == ".json"
            else result.to_markdown()
            if suffix == ".md"
            else result.to_html()
        )
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text, encoding="utf-8")
        console.print(f"Wrote the report to {report}")
    if result.failed:
        raise typer.Exit(EXIT_CHECKS_FAILED)


def _parse_tiers(spec: str) -> tuple[int, ...]:
    """The tiers of ``--tiers``; a bad spec exits with a sentence."""
    from tzoo.validation.runner import parse_tiers

    try:
        return parse_tiers(spec)
    except ValueError as error:
        raise _bad_input(f"Bad --tiers {spec!r}: {error}") from None


def _print_validation(result: Any) -> None:
    styles = {"pass": "green", "warn": "yellow", "fail": "red", "error": "red", "skip": "dim"}
    table = Table(
        "tier", "check", "status", "value", "threshold", "message", title=result.summary()
    )
    for row in result.results:
        table.add_row(
            str(row.tier),
            row.name,
            f"[{styles[row.status]}]{row.status}[/]",
            _cell(row.value),
            _cell(row.threshold),
            row.message,
        )
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
