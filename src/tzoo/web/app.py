"""The app factory: settings in, a FastAPI app out. Nothing heavy happens at import time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from tzoo import __version__
from tzoo.config import Settings, get_settings
from tzoo.runtime.manager import ModelManager
from tzoo.service.circuit_answers import ExplanationJobs
from tzoo.service.lens_jobs import JobQueue
from tzoo.service.metrics import ServiceMetrics
from tzoo.service.model_groups import ModelGroups
from tzoo.service.model_loading import ModelLoader
from tzoo.service.quotas import make_quotas
from tzoo.service.rate_limit import RateLimitedError, RateLimiter
from tzoo.service.result_cache import make_result_cache
from tzoo.service.validation_jobs import ValidationJobs
from tzoo.service.wheel import SessionStore
from tzoo.store.db import create_engine_for, run_migrations, session_factory
from tzoo.web.deps import template_context
from tzoo.web.errors import install_error_handlers
from tzoo.web.middleware import GuardedFastAPI, csp_context
from tzoo.web.openapi import document_errors
from tzoo.web.preload import Preloader
from tzoo.web.routes import annotations as annotation_routes
from tzoo.web.routes import (
    auth,
    circuits,
    docs,
    features,
    health,
    lens_pages,
    lens_service,
    models,
    pages,
    validation,
    visualizations,
    wheel,
)
from tzoo.web.security import CsrfCookieMiddleware, LoginLimiter

WEB_DIR = Path(str(files("tzoo.web")))


def create_app(settings: Settings | None = None, *, manager: ModelManager | None = None) -> FastAPI:
    """Build the app: database (migrated on start), model manager, routers, static files."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    manager = manager or ModelManager(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        run_migrations(app.state.engine)
        app.state.preloader.start()
        cleanup = asyncio.create_task(app.state.wheel_sessions.run_cleanup_loop())
        await app.state.lens_queue.start()
        yield
        await app.state.lens_queue.stop()
        # Queued explanations would otherwise run after the models are unloaded.
        app.state.explanation_jobs.shutdown()
        app.state.validation_jobs.shutdown()
        app.state.model_loader.shutdown()
        cleanup.cancel()
        with suppress(asyncio.CancelledError):
            await cleanup
        manager.unload_all()
        app.state.engine.dispose()

    app = GuardedFastAPI(
        title="Transformer Zoo",
        version=__version__,
        description="Look inside transformer language models: attention, next-token "
        "distributions, lenses, circuits and validation, at permanent links.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load Swagger UI/ReDoc from a CDN; see routes/docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.manager = manager
    app.state.engine = create_engine_for(settings.sqlalchemy_url)
    app.state.session_factory = session_factory(app.state.engine)
    # A malformed groups file stops the start here, with the file and the fault named.
    app.state.model_groups = groups = ModelGroups(settings, manager)
    preload = list(settings.preload)
    if not settings.lazy_load_model and groups.current is not None:
        model = groups.resolve(None).model
        preload += [] if model in preload else [model]
    app.state.preloader = Preloader(manager, preload)
    # Web model loads run here, never on request threads (see service/model_loading).
    app.state.model_loader = ModelLoader.from_settings(settings, manager)
    app.state.metrics = ServiceMetrics()
    app.state.lens_queue = JobQueue(
        settings,
        manager,
        groups,
        app.state.metrics,
        describe_error=lens_service.describe_error,
    )
    app.state.explanation_jobs = ExplanationJobs(
        settings, manager, app.state.session_factory, describe_error=circuits.describe_job_error
    )
    app.state.validation_jobs = ValidationJobs(settings, app.state.session_factory)
    # Per-client limits (lens rate, logins, sign-ups, visualizations): Redis when set.
    app.state.quotas = make_quotas(settings)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, quotas=app.state.quotas)
    app.state.result_cache = make_result_cache(settings)
    app.state.wheel_sessions = SessionStore(settings, manager)
    app.state.templates = Jinja2Templates(
        directory=WEB_DIR / "templates", context_processors=[template_context, csp_context]
    )
    app.state.login_limiter = LoginLimiter.from_settings(settings, app.state.quotas)

    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    # Attention layers are float16 matrices, half zeros for causal models: gzip halves them.
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    # Sends the anonymous CSRF cookie minted while a page rendered (see web/security.py).
    app.add_middleware(CsrfCookieMiddleware, settings=settings)
    install_error_handlers(app)
    app.add_exception_handler(RateLimitedError, lens_service.rate_limit_response)
    app.mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static")
    # annotation_routes: the name `annotations` is taken by `from __future__ import annotations`.
    for module in (
        health,
        models,
        docs,
        pages,
        auth,
        annotation_routes,
        visualizations,
        wheel,
        circuits,
        features,
        validation,
    ):
        app.include_router(module.router)
    for extra in (
        visualizations.pages,
        wheel.replays,
        wheel.pages,
        lens_service.router,
        lens_service.sockets,
        lens_pages.router,
        circuits.pages,
        features.pages,
        validation.pages,
    ):
        app.include_router(extra)
    document_errors(app)
    return app
