"""What a run tells its user beyond the metrics: the preprocessing it used (one console
line, recorded in ``config.yaml``) and whether it worked (the verdict line)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from selmix.cli.run import _load_data


def _load_model_data(settings: dict[str, Any]) -> tuple[Any, Any]:
    """The data splits in the starting model's preprocessing (``settings["preprocessing"]``,
    :func:`selmix.models.preprocessing.resolve_preprocessing`), and that preprocessing; rank 0
    prints which it is in one line."""
    from selmix.models.preprocessing import resolve_preprocessing

    preprocessing = resolve_preprocessing(
        settings["preprocessing"], settings["checkpoint"], settings.get("model"),
        settings.get("image_size"), resizable=str(settings["data"]).startswith("imagefolder:"),
    )  # fmt: skip
    splits = _load_data(settings, preprocessing)
    if os.environ.get("RANK", "0") == "0":
        print(preprocessing.describe())
    return splits, preprocessing


def _note_preprocessing(path: Path, preprocessing: Any) -> None:
    """Appends to a run's config.yaml, as comments (the file stays a valid ``--config``),
    the preprocessing the run used: one ``# preprocessing KEY: JSON`` line per entry."""
    from selmix._io import atomic_write_text

    lines = [
        f"# preprocessing {key}: {json.dumps(value)}"
        for key, value in preprocessing.to_dict().items()
    ]
    atomic_write_text(path, path.read_text() + "\n".join(lines) + "\n")


def _verdict(config: Any, before: dict[str, Any], after: dict[str, Any]) -> str:
    """The run's verdict line (:func:`selmix.report.format_verdict`) for its resolved
    configuration (objective and, for a coverage objective, its ``alpha``)."""
    from selmix.report import format_verdict

    params = config.objective_params or {}
    return format_verdict(config.objective, before, after, alpha=params.get("alpha"))
