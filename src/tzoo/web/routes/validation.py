"""The validation suite on the web: submit a catalogue model or an uploaded ``model.py``
(when the server allows uploads), follow the queued run, and read the report at its
permanent link. Thin: ``service.validation_jobs`` queues, runs and stores."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, PlainTextResponse
from sqlalchemy.orm import Session

from tzoo.runtime.catalogue import catalogue
from tzoo.service.model_loading import web_model_name
from tzoo.service.validation_jobs import (
    VALIDATION_KIND,
    NoSuchValidationJobError,
    UploadsDisabledError,
    UploadTooLargeError,
    ValidationJobs,
    ValidationRequestError,
    no_such_job,
    stored_report,
)
from tzoo.store.artefacts import list_artefacts
from tzoo.store.models import Artefact, User
from tzoo.validation.registry import registered
from tzoo.validation.report import ValidationReport
from tzoo.validation.runner import parse_tiers
from tzoo.web.access import visible_artefact
from tzoo.web.deps import ClientKeyDep, CsrfCheckDep, CurrentUserDep, SessionDep
from tzoo.web.middleware import SELF_CONTAINED_POLICY

router = APIRouter(prefix="/api/validations", tags=["validation"])
pages = APIRouter(tags=["pages"], include_in_schema=False)

NO_REPORT = "No validation report at this link."
_TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {
        "description": "TZOO_VALIDATIONS_PER_ACCOUNT runs of yours are queued or running "
        "(Retry-After says when to try again)"
    }
}
Visibility = Literal["public", "unlisted", "private"]


def _jobs(request: Request) -> ValidationJobs:
    jobs: ValidationJobs = request.app.state.validation_jobs
    return jobs


def _parse_tiers(text: str) -> tuple[int, ...]:
    try:
        return parse_tiers(text)
    except ValueError as error:
        raise HTTPException(422, f"Bad tiers {text!r}: {error}") from None


async def _read(upload: UploadFile | None, limit: int) -> bytes | None:
    """The upload's bytes (None when no file was chosen); 413 past ``limit`` bytes without
    reading the rest."""
    if upload is None or not upload.filename:
        return None
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(
            413,
            f"{upload.filename} is larger than {limit // 1024} KiB (TZOO_VALIDATION_MAX_UPLOAD_KB).",
        )
    return data


@router.post(
    "", status_code=202, responses={403: {}, 404: {}, 413: {}, 422: {}, **_TOO_MANY, 503: {}}
)
async def submit(
    request: Request,
    response: Response,
    user: CurrentUserDep,
    client: ClientKeyDep,
    _csrf: CsrfCheckDep,
    model_name: Annotated[str | None, Form(max_length=1024)] = None,
    tiers: Annotated[str, Form(max_length=20)] = "1,2",
    checks: Annotated[str | None, Form(max_length=2000)] = None,
    visibility: Annotated[Visibility, Form()] = "public",
    model_file: Annotated[UploadFile | None, File()] = None,
    config_file: Annotated[UploadFile | None, File()] = None,
) -> dict[str, Any]:
    """Queue a validation of a catalogue model (``model_name``) or of an uploaded
    ``model_file`` with its ``config_file``: the checks of ``tiers`` (e.g. ``1,2``), or
    only those named in ``checks``; 202 with the job (poll its ``Location``). 429 with
    Retry-After when you have TZOO_VALIDATIONS_PER_ACCOUNT runs queued or running."""
    settings = request.app.state.settings
    if visibility == "private" and user is None:
        raise HTTPException(401, "Log in to keep a report private.")
    limit = settings.validation_max_upload_kb * 1024
    code = await _read(model_file, limit)
    config = await _read(config_file, limit)
    name = (model_name or "").strip() or None
    if name is not None:
        # A catalogue model or hub id; never a server path (the worker would load it).
        name = web_model_name(name, request.app.state.settings, request.app.state.manager)
    try:
        job = _jobs(request).submit(
            model_name=name,
            model_code=code,
            config=config,
            tiers=_parse_tiers(tiers),
            checks=None
            if not (checks or "").strip()
            else tuple(c.strip() for c in (checks or "").split(",") if c.strip()),
            owner=user.username if user else None,
            visibility=visibility,
            client=client,
        )
    except UploadsDisabledError as error:
        raise HTTPException(403, str(error)) from None
    except UploadTooLargeError as error:
        raise HTTPException(413, str(error)) from None
    except ValidationRequestError as error:
        raise HTTPException(422, str(error)) from None
    response.headers["Location"] = f"/api/validations/jobs/{job.id}"
    return _jobs(request).status(job)


@router.get("/jobs/{job_id}", responses={404: {}})
def job_status(job_id: str, request: Request, user: CurrentUserDep) -> dict[str, Any]:
    """A job: state (queued, running, done, failed), its place in the queue, the check
    running and how many are done, and when done the report's ``slug`` and ``url``. The
    job of a private report is its owner's: anyone else gets the 404 of an unknown id."""
    jobs = _jobs(request)
    try:
        job = jobs.get(job_id)
        if not job.visible_to(user.username if user else None):
            raise no_such_job(job_id)
    except NoSuchValidationJobError as error:
        raise HTTPException(404, str(error)) from None
    status = jobs.status(job)
    status["url"] = f"/validations/{status['slug']}" if status["slug"] else None
    return status


def _report(session: Session, slug: str, user: User | None) -> tuple[Artefact, ValidationReport]:
    artefact = visible_artefact(session, slug, user) if len(slug) <= 64 else None
    if artefact is None or artefact.kind != VALIDATION_KIND:
        raise HTTPException(404, NO_REPORT)
    return artefact, stored_report(artefact)


@router.get("/{slug}", responses={404: {}})
def read_report(
    slug: str,
    session: SessionDep,
    user: CurrentUserDep,
    format: Annotated[Literal["json", "markdown", "html"], Query()] = "json",
) -> Any:
    """A stored report: JSON (``results``: name, tier, status, value, threshold, message,
    details), or ``format=markdown`` / ``format=html``."""
    _, report = _report(session, slug, user)
    if format == "markdown":
        return PlainTextResponse(report.to_markdown(), media_type="text/markdown")
    if format == "html":
        # Its styles are inline: a policy of its own (scripts stay forbidden).
        return HTMLResponse(
            report.to_html(), headers={"Content-Security-Policy": SELF_CONTAINED_POLICY}
        )
    return report.to_dict()


@pages.get("/validate", response_class=HTMLResponse)
def validate_page(request: Request, session: SessionDep) -> HTMLResponse:
    settings = request.app.state.settings
    recent = list_artefacts(session, kind=VALIDATION_KIND, limit=20)
    context = {
        "models": [spec.name for spec in catalogue()],
        "uploads": settings.validation_uploads,
        "max_upload_kb": settings.validation_max_upload_kb,
        "checks": [
            {"tier": s.tier, "name": s.name, "description": s.description} for s in registered()
        ],
        "recent": [
            {
                "slug": a.slug,
                "model": a.input_text,
                "created_at": a.created_at.isoformat(timespec="seconds"),
            }
            for a in recent
        ],
    }
    return request.app.state.templates.TemplateResponse(
        request, "validation/form.html", {"page": context}
    )


@pages.get("/validations/{slug}", response_class=HTMLResponse)
def report_page(
    slug: str, request: Request, session: SessionDep, user: CurrentUserDep
) -> HTMLResponse:
    artefact, report = _report(session, slug, user)
    context = {
        "slug": slug,
        "model": report.model,
        "summary": report.summary(),
        "ok": report.ok,
        "results": [r.to_dict() for r in report.results],
        "environment": report.environment,
        "created_at": artefact.created_at.isoformat(timespec="seconds"),
    }
    return request.app.state.templates.TemplateResponse(
        request, "validation/report.html", {"report": context}
    )
