"""Exit codes scripts can rely on, and the one exception type commands raise to use them."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """Process exit status of every `coda-ctl` command (documented in `coda-ctl --help`)."""

    OK = 0
    ERROR = 1  # anything else: server error, failed stage, sampler unreachable, ...
    USAGE = 2  # bad flags or arguments (typer/click's own code)
    NOT_FOUND = 3  # the named run, stage, pod or file does not exist
    INVALID = 4  # the spec file was rejected (schema or model validation)
    NO_CLUSTER = 5  # no kubeconfig / context, API server unreachable or silent, no CRD in it
    CONFLICT = 6  # the run already exists (submit) or the action does not fit its state
    WONT_RUN = 7  # plan: a stage would fail on its slice (shape arithmetic or out of HBM)


EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid spec, 5 no cluster (or no CRD in "
    "it), 6 conflict, 7 a stage would fail on its slice (plan)."
)


class CtlError(Exception):
    """A failure to report to the user as one clear message and a documented exit code."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
