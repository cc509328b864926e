"""Every setting of Transformer Zoo, in one place.

Settings come from the environment (prefix ``TZOO_``) or a ``.env`` file in the working
directory. Each field carries a description: ``tzoo doctor`` and the docs list them, and a
test fails when a field has none.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
DtypeChoice = Literal["auto", "float32", "float16", "bfloat16"]

_PLACEHOLDER_SECRET = "change-me-in-production"


class Settings(BaseSettings):
    """Runtime configuration. Construct with keyword overrides in tests."""

    model_config = SettingsConfigDict(
        env_prefix="TZOO_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: Literal["development", "production", "test"] = Field(
        "development",
        description="Deployment mode; production refuses unsafe defaults such as the "
        "placeholder secret key.",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("tzoo")),
        description="Where the SQLite database and stored artefacts live.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("tzoo")),
        description="Where converted model weights (GGUF -> safetensors) are cached.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host/db. "
        "Empty: a SQLite file under data_dir.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL for shared caches and per-client limits (logins, sign-ups, "
        "rate limits); empty: in-process only.",
    )
    secret_key: str = Field(
        _PLACEHOLDER_SECRET,
        description="Key that signs session cookies; must be changed in production.",
    )
    host: str = Field("127.0.0.1", description="Address `tzoo serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `tzoo serve` listens on.")
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model names loaded at start-up; /ready answers 503 until they are loaded.",
    )
    device: DeviceChoice = Field(
        "auto", description="Device for models: auto picks cuda, then mps, then cpu."
    )
    dtype: DtypeChoice = Field(
        "auto",
        description="Weight dtype: auto keeps float32 on CPU, bfloat16 (else float16) on CUDA, "
        "float16 on MPS.",
    )
    memory_budget_mb: float = Field(
        4096,
        gt=0,
        description="Most memory (MiB) the loaded models and the token-wheel sessions' "
        "key/value caches may take together; the least recently used idle model is unloaded "
        "to make room, a model larger than the budget is refused, and a session cache that "
        "does not fit is refused (507).",
    )
    max_model_size_mb: float = Field(
        6144,
        gt=0,
        description="Largest single model (MiB in memory at the chosen dtype) that may be "
        "loaded at all.",
    )
    hub_cache_dir: Path | None = Field(
        None,
        description="Where models downloaded from the hub are kept; empty: the hub "
        "client's own default (HF_HUB_CACHE).",
    )
    hub_offline: bool = Field(
        False,
        description="Never contact the model hub; only local directories, bundled models "
        "and the hub cache are used.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: same origin only."
    )
    attention_max_tokens: int = Field(
        512,
        ge=2,
        le=4096,
        description="Longest input (in tokens) the attention explorer accepts; longer "
        "input gets a clear error instead of being truncated silently.",
    )
    result_cache_ttl_seconds: int = Field(
        86400,
        ge=0,
        description="How long a computed result stays in the result cache (Redis when "
        "TZOO_REDIS_URL is set, else in-process); 0 disables the cache.",
    )
    result_cache_max_entries: int = Field(
        64,
        ge=1,
        description="Most results the in-process result cache keeps (least recently used "
        "are dropped first).",
    )
    public_url: str | None = Field(
        None,
        description="Base URL printed in share links (e.g. https://zoo.example.org); "
        "empty: http://HOST:PORT.",
    )
    session_cookie_secure: bool | None = Field(
        None,
        description="Send the login cookie only over HTTPS; empty: on in production, off "
        "in development (so http://127.0.0.1 works).",
    )
    wheel_session_ttl_seconds: int = Field(
        3600, ge=1, description="A token-wheel session idle this long expires (seconds)."
    )
    wheel_cleanup_interval_seconds: int = Field(
        300, ge=1, description="How often expired token-wheel sessions are removed (seconds)."
    )
    wheel_max_sessions: int = Field(
        100, ge=1, description="Most live token-wheel sessions; more are refused with 429."
    )
    wheel_max_context_tokens: int = Field(
        1024,
        ge=2,
        description="Longest context (prompt plus appended tokens) of a token-wheel session; "
        "longer is refused with 413.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging level of the server and CLI."
    )
    tuned_lens_dir: Path | None = Field(
        None,
        description="Where `tzoo lens train` saves tuned lenses (one folder per model) and "
        "where tzoo.tuned_lens looks for them; empty: cache_dir/lenses.",
    )

    # -- the lens service (REFERENCE-SYSTEMS section 5; the same names, with TZOO_) --------
    model_groups_file: Path | None = Field(
        None,
        description="JSON file of model groups (a base model plus its lenses) for the lens "
        "service; empty: the bundled groups (tzoo/data/model_groups.json).",
    )
    default_group: str | None = Field(
        None,
        description="Model group used when a lens request names none; empty: the groups "
        "file's default_group, else none (requests must name a group).",
    )
    lazy_load_model: bool = Field(
        True,
        description="Load a group's model on its first request; false: load the default "
        "group's model at start-up (/ready waits for it).",
    )
    api_key: str | None = Field(
        None,
        description="The operator's key: its holder (Authorization: Bearer KEY) may load, "
        "unload and switch models, as an admin account may. When set, the lens service "
        "asks for it on /analyze, /status, /ws (also as ?api_key=), /api/v2, "
        "/api/gpu_stats and /metrics; empty: no key.",
    )
    max_queue_size: int = Field(
        100, ge=1, description="Most lens requests waiting in the queue; more are refused (503)."
    )
    max_text_length: int = Field(
        20000, ge=1, description="Longest text (characters) a lens request may send (413)."
    )
    request_timeout: float = Field(
        300,
        gt=0,
        description="Seconds a lens request may take, queued and running; a running "
        "verbalisation then stops between batches and returns what it has.",
    )
    rate_limit_per_minute: int = Field(
        60,
        ge=0,
        description="Lens requests one client (IP address) may submit per minute; more get "
        "429 with Retry-After. 0: no limit.",
    )
    batch_size: int = Field(
        8, ge=1, description="Positions a verbalisation decodes together in one batch."
    )
    dynamic_batching: bool = Field(
        True,
        description="Run queued lens requests for the same group and analysis together in "
        "one padded forward pass.",
    )
    auto_batch_size_max: int = Field(
        16, ge=1, description="Most queued requests one dynamic batch takes."
    )
    batch_wait_ms: float = Field(
        10,
        ge=0,
        le=1000,
        description="With dynamic batching, how long a worker waits for more requests "
        "before running a batch that is not full (clients answered by the last batch send "
        "their next request in this time).",
    )
    lens_batch_max_tokens: int = Field(
        8192,
        ge=1,
        description="Most padded tokens (requests x longest) in one dynamic batch; bounds "
        "its memory.",
    )
    num_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Lens jobs run at once (on different groups; one group's model runs one "
        "job or batch at a time).",
    )
    job_retention_seconds: int = Field(
        3600,
        ge=1,
        description="How long a finished lens request's result stays readable at "
        "/status/{request_id}.",
    )
    job_results_max_mb: float = Field(
        256,
        gt=0,
        description="Most memory (MiB of JSON) the kept results of finished lens requests "
        "take together; the oldest are forgotten first.",
    )

    # -- circuits -------------------------------------------------------------------------
    transcoders_dir: Path | None = Field(
        None,
        description="Where `tzoo transcoders train` saves transcoders (one folder per model "
        "and run, in circuit-tracer's format) and where the circuit tools look; empty: "
        "cache_dir/transcoders.",
    )
    autointerp_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint (e.g. https://api.openai.com/v1) that labels "
        "features; empty: the bundled instruct model labels them locally.",
    )
    autointerp_api_key: str | None = Field(
        None, description="Key for TZOO_AUTOINTERP_URL (sent as a Bearer token)."
    )
    autointerp_model: str = Field(
        "smollm2-135m",
        description="Model that writes feature labels: a catalogue name when local, the "
        "endpoint's model name with TZOO_AUTOINTERP_URL.",
    )

    # -- validation -----------------------------------------------------------------------
    validation_uploads: bool = Field(
        False,
        description="Let the /validate page take a model.py upload. It runs on this server "
        "(in a subprocess, with the server's rights): turn it on only where every user may "
        "run code here. Catalogue models can be validated either way.",
    )
    validation_timeout: int = Field(
        1800, ge=10, description="Seconds a web validation job may run before it is stopped."
    )
    validation_max_upload_kb: int = Field(
        1024, ge=1, description="Largest model.py or config.json the /validate page takes, KiB."
    )

    # -- hardening: who may do what, and how much -----------------------------------------
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders under which the web API may load a local model directory or "
        "GGUF file (comma-separated); empty: the web API loads catalogue models and hub ids "
        "only. The CLI and the Python API load any local path.",
    )
    hub_load_workers: int = Field(
        2,
        ge=1,
        le=32,
        description="Model loads the web API runs at once (a small pool, apart from the "
        "request threads); more wait in line.",
    )
    hub_load_timeout: float = Field(
        120,
        gt=0,
        description="Seconds a web request waits for a model load before answering 504 (the "
        "load itself goes on in the pool and the model is there for the next request).",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body (bytes) any route reads; a bigger one gets 413 "
        "before the rest is read.",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto "
        "headers are believed (comma-separated, '*' for any); empty: none, the client "
        "address is the connection's.",
    )
    wheel_sessions_per_client: int = Field(
        8,
        ge=1,
        description="Most live token-wheel sessions one client (account, or address when "
        "anonymous) may hold; more get 429 with Retry-After.",
    )
    visualizations_per_minute: int = Field(
        30,
        ge=0,
        description="Visualizations (attention, graphs) one client may create per minute; "
        "more get 429 with Retry-After. 0: no limit.",
    )
    validations_per_account: int = Field(
        2,
        ge=1,
        description="Validation runs one account (or anonymous address) may have queued or "
        "running at once; more get 429 with Retry-After.",
    )
    signups_per_hour: int = Field(
        5,
        ge=0,
        description="Accounts one address may create per hour; more get 429 with "
        "Retry-After. 0: no limit.",
    )
    login_failures_per_account: int = Field(
        10,
        ge=1,
        description="An address's failed logins on one account that come freely within "
        "TZOO_LOGIN_WINDOW_SECONDS; each further attempt from it waits 5, 10, 20, then 30 s. "
        "Addresses that have not failed on the account are never slowed, so its owner gets in.",
    )
    login_failures_per_ip: int = Field(
        20,
        ge=1,
        description="Failed logins one address may make within TZOO_LOGIN_WINDOW_SECONDS, "
        "whatever usernames it tries; then it is refused with 429 until the window passes.",
    )
    login_window_seconds: int = Field(
        300, ge=1, description="The window (seconds) the login limits count failures in."
    )
    ws_max_message_bytes: int = Field(
        65536,
        ge=256,
        description="Largest WebSocket message (bytes) the lens socket reads; a bigger one "
        "gets an error reply.",
    )
    json_max_depth: int = Field(
        32,
        ge=2,
        le=512,
        description="Deepest nesting of JSON a WebSocket message may have; deeper gets an "
        "error reply, never a dropped connection.",
    )

    @field_validator(
        "preload", "allowed_origins", "model_dirs", "forwarded_allow_ips", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # Allow TZOO_PRELOAD=a,b as well as a JSON list.
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production" and self.secret_key == _PLACEHOLDER_SECRET:
            raise ValueError(
                "TZOO_SECRET_KEY must be set to a private value when TZOO_ENVIRONMENT=production"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The store's URL: TZOO_DATABASE_URL, or a SQLite file in data_dir."""
        if self.database_url:
            return normalise_database_url(self.database_url)
        return f"sqlite:///{self.data_dir / 'tzoo.sqlite3'}"

    @property
    def base_url(self) -> str:
        """Where this server is reached, for share links."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def cookies_secure(self) -> bool:
        if self.session_cookie_secure is not None:
            return self.session_cookie_secure
        return self.environment == "production"

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    @property
    def max_model_size_bytes(self) -> int:
        return int(self.max_model_size_mb * 1024 * 1024)


def normalise_database_url(url: str) -> str:
    """Map plain ``postgresql://`` URLs onto the psycopg 3 driver we install."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
