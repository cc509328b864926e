"""The store: analysis results as compact blobs plus a small row, on SQLite or PostgreSQL.

Typical use::

    engine = create_engine_for(settings.sqlalchemy_url)
    run_migrations(engine)
    with session_factory(engine)() as session:
        artefact = create_artefact(session, kind="attention", model_name="smollm2-135m",
                                   input_text="Hello", params={}, arrays={"attn": attn})
        arrays = load_arrays(get_artefact(session, artefact.slug))
"""

from tzoo.store.accounts import (
    AccountError,
    UsernameTakenError,
    create_api_token,
    create_user,
    end_login_session,
    find_api_token,
    find_login_session,
    get_user,
    list_api_tokens,
    revoke_api_token,
    start_login_session,
)
from tzoo.store.annotations import (
    Anchor,
    AnnotationError,
    create_annotation,
    delete_annotation,
    edit_annotation,
    get_annotation,
    list_annotations,
)
from tzoo.store.artefacts import (
    SlugCollisionError,
    create_artefact,
    delete_artefact,
    get_artefact,
    list_artefacts,
    load_arrays,
    load_part,
    new_slug,
    part_names,
    stored_bytes,
)
from tzoo.store.codec import (
    BlobFormatError,
    Precision,
    decode_array_header,
    decode_arrays,
    encode_arrays,
)
from tzoo.store.db import alembic_config, create_engine_for, run_migrations, session_factory
from tzoo.store.models import (
    VISIBILITIES,
    Annotation,
    ApiToken,
    Artefact,
    ArtefactPart,
    Base,
    LoginSession,
    User,
    Visibility,
)

__all__ = [
    "VISIBILITIES",
    "AccountError",
    "Anchor",
    "Annotation",
    "AnnotationError",
    "ApiToken",
    "Artefact",
    "ArtefactPart",
    "Base",
    "BlobFormatError",
    "LoginSession",
    "Precision",
    "SlugCollisionError",
    "User",
    "UsernameTakenError",
    "Visibility",
    "alembic_config",
    "create_annotation",
    "create_api_token",
    "create_artefact",
    "create_engine_for",
    "create_user",
    "decode_array_header",
    "decode_arrays",
    "delete_annotation",
    "delete_artefact",
    "edit_annotation",
    "encode_arrays",
    "end_login_session",
    "find_api_token",
    "find_login_session",
    "get_annotation",
    "get_artefact",
    "get_user",
    "list_annotations",
    "list_api_tokens",
    "list_artefacts",
    "load_arrays",
    "load_part",
    "new_slug",
    "part_names",
    "revoke_api_token",
    "run_migrations",
    "session_factory",
    "start_login_session",
    "stored_bytes",
]
