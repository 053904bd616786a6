"""The I/O edges of `coda-ctl local run` without JAX: how trainer exit codes become messages and
exit codes (real child processes standing in for the trainer), progress output, server command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from coda_ctl import localplan, localrun
from coda_ctl.errors import CtlError, Exit
from coda_trainer.serve.__main__ import parse_args as serve_args

# The one stage of the edges run (ctl_testkit.local_run): the fake trainers write its directory.
ONLY = [{"name": "only"}]


def _fake_trainer(code: int, make_final: bool = False) -> Any:
    """A real process in place of the trainer: writes status.json (and final/), exits `code`."""

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        config = Path(cmd[-1])
        stage_dir = config.parent.parent / "only"
        script = (
            "import json, os, sys, pathlib\n"
            f"d = pathlib.Path({str(stage_dir)!r}); d.mkdir(parents=True, exist_ok=True)\n"
            "(d / 'status.json').write_text(json.dumps({'step': 10, 'total_steps': 10, 'loss': 1.5}))\n"
            + ("(d / 'final').mkdir()\n" if make_final else "")
            + f"print('trainer says hello'); print('boom', file=sys.stderr); sys.exit({code})\n"
        )
        return subprocess.Popen([sys.executable, "-c", script], **kwargs)

    return popen


@pytest.mark.parametrize(
    ("code", "final", "exit_code", "needle"),
    [
        (0, True, None, None),
        (0, False, Exit.ERROR, "exited 0 but"),
        (75, False, Exit.ERROR, "rerun to resume"),
        (78, False, Exit.INVALID, "invalid configuration or data (exit 78)"),
        (1, False, Exit.ERROR, "failed with exit code 1"),
    ],
)
def test_trainer_exit_codes(
    tmp_path: Path,
    make_local_run: Callable[..., dict[str, Any]],
    code: int,
    final: bool,
    exit_code: Exit | None,
    needle: str | None,
) -> None:
    (stage,) = localplan.plan_local_run(make_local_run(ONLY, "edges"), tmp_path).stages
    progress = localrun.PlainProgress(None)  # type: ignore[arg-type]
    if exit_code is None:
        localrun.run_stage(stage, progress, popen=_fake_trainer(code, final))
        assert stage.final_dir.is_dir()
        assert "trainer says hello" in stage.log_path.read_text()
        assert localplan.job_yaml(stage) == stage.config_path.read_text()
        return
    with pytest.raises(CtlError) as err:
        localrun.run_stage(stage, progress, popen=_fake_trainer(code, final))
    assert err.value.code == exit_code and needle in err.value.message
    assert (
        str(stage.log_path) in err.value.message and "boom" in err.value.message
    )  # the log's tail


def test_progress_printers(
    tmp_path: Path,
    make_local_run: Callable[..., dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = localplan.plan_local_run(make_local_run(ONLY, "edges"), tmp_path)
    (stage,) = plan.stages
    plain = localrun.PlainProgress(plan)
    plain.update(stage, localplan.Progress(step=5, total=10, loss=2.5, tokens_per_second=1000.0))
    plain.update(stage, localplan.Progress(step=5, total=10, loss=2.5))  # same step: no new line
    plain.update(stage, localplan.Progress(), note="done")
    assert capsys.readouterr().out.splitlines() == [
        "[only] step 5/10 loss 2.5000 · 1,000 tok/s · ETA 0s",
        "[only] done",
    ]
    with localrun.RichProgress(plan) as bars:  # renders without a terminal too
        bars.update(stage, localplan.Progress(step=3, total=10, loss=1.0))
        bars.update(stage, localplan.Progress(step=10, total=10), note="done in 1s")


def test_sampler_command_parses_with_the_servers_own_cli(tmp_path: Path) -> None:
    for for_eval in (False, True):
        cmd = localrun.serve_command(tmp_path / "final", 8123, for_eval=for_eval)
        assert cmd[1:3] == ["-m", "coda_trainer.serve"]
        args = serve_args(cmd[3:])
        assert args.host == "127.0.0.1" and args.port == 8123 and args.max_batch == 1
        assert max(args.gen_buckets) >= (
            localrun.EVAL_MAX_TOKENS if for_eval else localrun.SAMPLE_MAX_TOKENS
        )


def test_steps_scale_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODA_STEPS_SCALE", raising=False)
    assert localrun.steps_scale_from(None) == 1.0
    monkeypatch.setenv("CODA_STEPS_SCALE", "0.25")
    assert localrun.steps_scale_from(None) == 0.25 and localrun.steps_scale_from(0.5) == 0.5
    for bad in ("zero", "0", "-1"):
        monkeypatch.setenv("CODA_STEPS_SCALE", bad)
        with pytest.raises(CtlError):
            localrun.steps_scale_from(None)
