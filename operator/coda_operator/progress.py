"""Re-export of the trainer's progress reporter (`coda_trainer.k8s_progress`).

Writing `status.progress` is trainer behaviour: the trainer's process 0 merge-patches its
CodaTrainingRun's status subresource (see that module for why and how). The operator only sets the
pod env that enables it (`render.py`) and resets `progress` when a stage starts (`planner.py`).
"""

from __future__ import annotations

from coda_trainer.k8s_progress import BackgroundProgress, ProgressReporter

__all__ = ["BackgroundProgress", "ProgressReporter"]
