"""Run one validation in a process of its own: ``python -m tzoo.validation.worker SPEC``.

The web page's jobs run here, not in the server: a user's ``model.py`` may crash, hang,
exit or fill memory, and then only this process is lost (the server kills it at the
timeout). SPEC is a JSON file: ``{"model", "config", "tiers", "checks", "seed",
"report", "output_dir"}``. Progress goes to stdout as one JSON object a line
(``{"done", "total", "what"}``); the report is written to ``report`` as JSON. Exit codes:
0 all passed, 1 a check failed, 2 the model could not be loaded (the message is the last
stdout line, ``{"error": ...}``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def main(argv: list[str]) -> int:
    from tzoo.runtime.errors import ModelError
    from tzoo.validation import ModelCodeError, ValidationOptions, validate

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))

    def progress(done: int, total: int, what: str) -> None:
        print(json.dumps({"done": done, "total": total, "what": what}), flush=True)

    output_dir = spec.get("output_dir")
    try:
        report = validate(
            spec["model"],
            spec.get("config"),
            spec.get("tiers", [1, 2]),
            checks=spec.get("checks"),
            seed=int(spec.get("seed", 0)),
            options=ValidationOptions(output_dir=Path(output_dir) if output_dir else None),
            # The server decided already: uploads are local files, never URLs.
            trust_remote_code=False,
            progress=progress,
        )
    except (ModelCodeError, ModelError, ValueError, PermissionError) as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return EXIT_BAD_INPUT
    Path(spec["report"]).write_text(report.to_json(), encoding="utf-8")
    return EXIT_FAILED if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
