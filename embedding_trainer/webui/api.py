"""The HTTP API under ``/embtrain/v1/``: start, watch and stop training runs, fetch previews, read the config schema.

Request bodies are parsed here and validated by ``TrainConfig`` itself (not by pydantic models), so unknown keys and
wrong types get the same field-naming errors as the CLI and the tab, and the routes work on the WebUI's pinned
fastapi 0.94 (pydantic 1) as well as on current releases. Every response is a ``JSONResponse`` built here (or a
file), so the WebUI's API exception handlers never reshape them.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, DatasetError, EmbeddingFileError
from .run_manager import RunActiveError, RunManager, RunNotActiveError, RunNotFoundError
from .run_options import PreviewOptions, config_schema

PREFIX = "/embtrain/v1"


def register_routes(
    app: FastAPI, manager: RunManager, auth_dependency: Callable[..., Any] | None = None, *, prefix: str = PREFIX
) -> list[tuple[str, str]]:
    """Add the ``/embtrain/v1`` routes for ``manager`` to ``app``; ``auth_dependency`` guards every one of them.

    Returns the ``(method, path)`` pairs added. Routes go straight onto ``app`` (``app.add_api_route``), so they
    can be added after the server has started, as the WebUI's ``on_app_started`` callback does.

    Routes (all JSON unless noted):

    - ``POST {prefix}/runs``: body = ``TrainConfig`` fields and the optional ``preview_*`` run options ->
      ``{"id", ...}``; 422 ``{"detail": [{"field", "message"}]}`` for an invalid body; 409
      ``{"detail", "active_id"}`` while a run is active.
    - ``GET {prefix}/runs`` -> ``{"runs": [...newest first], "active_id"}``.
    - ``GET {prefix}/runs/{id}`` -> the run's status with ``loss_history``, preview URLs and their steps; 404 for
      unknown ids.
    - ``POST {prefix}/runs/{id}/stop`` and ``POST {prefix}/stop`` (the active run); 404 unknown, 409 not active.
    - ``GET {prefix}/runs/{id}/previews/{n}`` -> the n-th preview image file.
    - ``GET {prefix}/config-schema`` -> every config field with type, default, help, choices and limits.
    """
    dependencies = [Depends(auth_dependency)] if auth_dependency is not None else []
    added: list[tuple[str, str]] = []

    def add(path: str, endpoint: Callable[..., Any], method: str) -> None:
        # response_model=None: the return annotations are Response classes, never models to validate against.
        app.add_api_route(
            prefix + path,
            endpoint,
            methods=[method],
            dependencies=dependencies,
            response_model=None,
            name=f"embtrain_{endpoint.__name__}",
        )
        added.append((method, prefix + path))

    background: set[asyncio.Task[Any]] = set()  # strong references: the event loop keeps only weak ones

    def on_server_workers(work: Callable[[], None]) -> None:
        """Run ``work`` on the server's worker threads, where the host's own jobs (txt2img, its trainer) run: the
        thread reuses the CPU thread team torch already made there instead of adding one that competes with it."""
        task = asyncio.get_running_loop().create_task(run_in_threadpool(work))
        background.add(task)
        task.add_done_callback(background.discard)

    def base(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{prefix}"

    def with_preview_urls(status: dict[str, Any], request: Request) -> dict[str, Any]:
        paths = status["previews"]
        status["preview_paths"] = paths
        status["previews"] = [f"{base(request)}/runs/{status['id']}/previews/{n}" for n in range(len(paths))]
        return status

    async def create_run(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            return _invalid("body", f"is not valid JSON ({error})")
        if not isinstance(body, dict):
            return _invalid("body", f"expected a JSON object of config fields, got {type(body).__name__}")
        launches: list[Callable[[], None]] = []
        try:
            preview = PreviewOptions.pop_from(body)
            # Off the event loop: the checks read the template and every image.
            job_id = await run_in_threadpool(lambda: manager.start(body, preview=preview, launch=launches.append))
        except (ConfigError, DatasetError) as error:
            return _invalid(error.field or "body", _message(error))
        except RunActiveError as error:
            return JSONResponse({"detail": str(error), "active_id": error.active_id}, status_code=409)
        except EmbeddingFileError as error:  # the embedding exists and overwrite is off: a conflict, not a bad field
            return JSONResponse({"detail": str(error)}, status_code=409)
        for work in launches:  # now that the worker that ran the checks is free again: the run gets it
            on_server_workers(work)
        status = manager.status(job_id)
        return JSONResponse({"id": job_id, "state": status["state"], "url": f"{base(request)}/runs/{job_id}"})

    def list_runs(request: Request) -> JSONResponse:
        runs = [with_preview_urls(run, request) for run in manager.list_runs()]
        return JSONResponse({"runs": runs, "active_id": manager.active_id})

    def get_run(job_id: str, request: Request) -> JSONResponse:
        try:
            status = manager.status(job_id)
        except RunNotFoundError as error:
            return _not_found(error)
        return JSONResponse(with_preview_urls(status, request))

    def _stop(job_id: str | None) -> JSONResponse:
        try:
            stopped = manager.stop(job_id)
        except RunNotFoundError as error:
            return _not_found(error)
        except RunNotActiveError as error:
            return JSONResponse({"detail": str(error)}, status_code=409)
        status = manager.status(stopped)
        return JSONResponse({"id": stopped, "state": status["state"], "stop_requested": True})

    def stop_run(job_id: str) -> JSONResponse:
        return _stop(job_id)

    def stop_active() -> JSONResponse:
        return _stop(None)

    def get_preview(job_id: str, index: str) -> FileResponse | JSONResponse:
        try:
            previews = manager.status(job_id)["previews"]
        except RunNotFoundError as error:
            return _not_found(error)
        if not index.isdigit() or int(index) >= len(previews):
            return JSONResponse(
                {"detail": f"run {job_id} has no preview {index!r} (it has {len(previews)})"}, status_code=404
            )
        path = Path(previews[int(index)])
        if not path.is_file():
            return JSONResponse({"detail": f"preview file {path} no longer exists"}, status_code=404)
        media_type = mimetypes.guess_type(path.name)[0] or "image/png"
        return FileResponse(path, media_type=media_type)

    def get_config_schema() -> JSONResponse:
        return JSONResponse(config_schema())

    add("/runs", create_run, "POST")
    add("/runs", list_runs, "GET")
    add("/runs/{job_id}", get_run, "GET")
    add("/runs/{job_id}/stop", stop_run, "POST")
    add("/stop", stop_active, "POST")
    add("/runs/{job_id}/previews/{index}", get_preview, "GET")
    add("/config-schema", get_config_schema, "GET")
    return added


def basic_auth_dependency(credentials: Mapping[str, str]) -> Callable[..., None]:
    """A FastAPI dependency that admits HTTP Basic requests matching one ``user -> password`` pair.

    Failures raise a 401 ``HTTPException`` with ``WWW-Authenticate: Basic``. Inside the WebUI its exception handler
    turns that into ``{"error": "HTTPException", "detail": <the detail>, "body": "", "errors": ""}`` and drops the
    header (seen on v1.10.1; the README tells clients). Comparison is constant-time (``secrets.compare_digest``
    on UTF-8 bytes) and checks every pair, so timing reveals neither which user exists nor how much matched.
    """
    if not credentials:
        raise ValueError("no credentials given: pass {user: password} pairs (as from the WebUI's --api-auth)")
    pairs = [(user.encode("utf-8"), password.encode("utf-8")) for user, password in credentials.items()]
    basic = HTTPBasic(auto_error=False)

    def embtrain_basic_auth(given: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if given is not None:
            user, password = given.username.encode("utf-8"), given.password.encode("utf-8")
            matched = False
            for known_user, known_password in pairs:
                same_user = secrets.compare_digest(user, known_user)
                same_password = secrets.compare_digest(password, known_password)
                matched |= same_user and same_password
            if matched:
                return
        detail = "Incorrect username or password" if given is not None else "Authentication required"
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Basic"})

    return embtrain_basic_auth


def _invalid(field: str, message: str) -> JSONResponse:
    return JSONResponse({"detail": [{"field": field, "message": message}]}, status_code=422)


def _not_found(error: RunNotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


def _message(error: ConfigError | DatasetError) -> str:
    """The message without the ``field: `` prefix that both errors put in front."""
    text = str(error)
    prefix = f"{error.field}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
