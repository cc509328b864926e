"""The ``tzoo`` command. Heavy imports happen inside commands so ``tzoo --help`` is instant."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
console = Console()
err_console = Console(stderr=True)

# Exit codes, one per kind of failure, so scripts can tell them apart.
EXIT_CODES = {
    "UnknownModelError": 2,
    "ModelTooLargeError": 3,
    "ModelLoadError": 4,
    "ModelUnavailableError": 5,
    "DeviceError": 6,
}


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
    logger.add(sys.stderr, level=settings.log_level, backtrace=False, diagnose=False)
    console.print(f"Transformer Zoo on http://{settings.host}:{settings.port}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
