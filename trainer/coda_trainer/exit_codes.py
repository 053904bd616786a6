"""Process exit codes of `python -m coda_trainer.train`, read by the operator and the CLI.

Kept free of pydantic and JAX so the operator image can import it. The numbers follow BSD
`sysexits.h`, which JobSet's podFailurePolicy rules match on:

- ``EXIT_OK`` (0): the stage finished and `<stage>/final` is published.
- ``EXIT_RETRYABLE`` (75, EX_TEMPFAIL): try again and it may work — preemption/SIGTERM after a
  checkpoint was saved, or a transient I/O error. A restart resumes from the newest checkpoint.
- ``EXIT_PERMANENT`` (78, EX_CONFIG): retrying cannot help — invalid config, unreadable or empty
  data, tokenizer/model mismatch. Reported before any device work starts.

Any other non-zero code (e.g. 1 from an unexpected exception, 137 from the OOM killer) is a crash
the operator counts against the run's restart budget.
"""

EXIT_OK = 0
EXIT_RETRYABLE = 75
EXIT_PERMANENT = 78

__all__ = ["EXIT_OK", "EXIT_PERMANENT", "EXIT_RETRYABLE"]
