"""A run's status as the operator's typed model (`coda_operator.api.CodaTrainingRunStatus`), for
every view of the CLI: `get`, `watch`, `logs`, `retry`, `describe`, `doctor`.

The models are the ones the operator writes the status with (lenient: extra fields ignored), so a
field renamed there is renamed here by the type checker, not found missing at run time. A status
entry that does not validate (hand-edited, or written by another version) is left out, never a
crash: `read_status` says which, and `describe` prints them.

Importing this module costs the operator's models (~0.1 s): `views` imports it inside the
functions that read a status, so `coda-ctl --help` does not pay it.
"""

from __future__ import annotations

import copy
from typing import Any

from coda_operator.api import CodaTrainingRunStatus, Progress
from pydantic import ValidationError

__all__ = ["CodaTrainingRunStatus", "current_progress", "read_status", "status_of"]

# A status that keeps failing validation after this many entries were left out is not read at all.
_MAX_INVALID_ENTRIES = 32


def read_status(run: dict[str, Any]) -> tuple[CodaTrainingRunStatus, list[str]]:
    """The run's status as the typed model, and the paths of the entries left out because they
    do not validate (`conditions[0]`, `progress.step`): the smallest entry holding each error,
    a list item or map value of a top-level field, else the field."""
    raw = run.get("status")
    raw = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    left_out: list[str] = []
    while len(left_out) < _MAX_INVALID_ENTRIES:
        try:
            return CodaTrainingRunStatus.model_validate(raw), left_out
        except ValidationError as e:
            loc = e.errors()[0]["loc"]
        holder = raw.get(loc[0]) if isinstance(loc[0], str) else None
        if len(loc) > 1 and isinstance(holder, list | dict):
            del holder[loc[1]]  # a list item (int) or a map entry (str)
            left_out.append(
                f"{loc[0]}[{loc[1]}]" if isinstance(loc[1], int) else f"{loc[0]}.{loc[1]}"
            )
        else:
            raw.pop(loc[0], None)
            left_out.append(str(loc[0]))
    return CodaTrainingRunStatus(), [*left_out, "status"]


def status_of(run: dict[str, Any]) -> CodaTrainingRunStatus:
    """The run's typed status (entries that do not validate left out)."""
    return read_status(run)[0]


def current_progress(status: CodaTrainingRunStatus) -> Progress:
    """status.progress, unless it is absent or a late write from an earlier stage (it carries
    its stage): then an empty Progress (every field None, `model_fields_set` empty)."""
    progress = status.progress
    if progress is None or (progress.stage and status.stage and progress.stage != status.stage):
        return Progress()
    return progress
