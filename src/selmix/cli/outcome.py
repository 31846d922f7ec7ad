"""What a fine-tuning run tells its user beyond the metrics: the preprocessing it used
(recorded in ``config.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _note_preprocessing(path: Path, preprocessing: Any) -> None:
    """Appends to a run's config.yaml, as comments (the file stays a valid ``--config``),
    the preprocessing the run used: one ``# preprocessing KEY: JSON`` line per entry."""
    from selmix._io import atomic_write_text

    lines = [
        f"# preprocessing {key}: {json.dumps(value)}"
        for key, value in preprocessing.to_dict().items()
    ]
    atomic_write_text(path, path.read_text() + "\n".join(lines) + "\n")
