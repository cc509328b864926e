"""The store: analysis results as compact blobs plus a small row, on SQLite or PostgreSQL.

Typical use::

    engine = create_engine_for(settings.sqlalchemy_url)
    run_migrations(engine)
    with session_factory(engine)() as session:
        artefact = create_artefact(session, kind="attention", model_name="smollm2-135m",
                                   input_text="Hello", params={}, arrays={"attn": attn})
        arrays = load_arrays(get_artefact(session, artefact.slug))
"""

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
from tzoo.store.models import VISIBILITIES, Artefact, ArtefactPart, Base, Visibility

__all__ = [
    "VISIBILITIES",
    "Artefact",
    "ArtefactPart",
    "Base",
    "BlobFormatError",
    "Precision",
    "SlugCollisionError",
    "Visibility",
    "alembic_config",
    "create_artefact",
    "create_engine_for",
    "decode_array_header",
    "decode_arrays",
    "delete_artefact",
    "encode_arrays",
    "get_artefact",
    "list_artefacts",
    "load_arrays",
    "load_part",
    "new_slug",
    "part_names",
    "run_migrations",
    "session_factory",
    "stored_bytes",
]
