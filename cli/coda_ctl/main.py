"""`coda-ctl`: submit, inspect and sample CodaTrainingRuns; run one on this machine.

Commands are thin: cluster I/O lives in `kube`, formatting in `views`, spec checks in `runspec`, the
local pipeline in `localplan`/`localrun`. Every failure leaves through `CtlError` with a documented
exit code (`errors.Exit`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from coda_ctl import runspec, samplerclient, views
from coda_ctl.errors import EXIT_CODES_HELP, CtlError, Exit
from coda_ctl.kube import DEFAULT_REQUEST_TIMEOUT_S, JOBSET_NAME_LABEL, Cluster, Target

app = typer.Typer(
    name="coda-ctl",
    help="Train and serve CoDA diffusion coders on Kubernetes (and on this machine).\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
local_app = typer.Typer(
    help="Run a CodaTrainingRun on this machine, no cluster needed.", no_args_is_help=True
)
app.add_typer(local_app, name="local")

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Turn CtlError (and a few well-known exceptions) into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtlError as e:
            _fail(e.message, int(e.code))
        except KeyboardInterrupt as e:  # Ctrl-C: 130; localrun.RunnerStopped: 128 + its signal
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        except BrokenPipeError:  # `coda-ctl logs ... | head`
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def _tty() -> bool:
    return sys.stdout.isatty()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cluster(ctx: typer.Context) -> Cluster:
    return Cluster(ctx.obj)


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    if _tty():
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    else:
        typer.echo(views.plain_table(headers, rows))


# --------------------------------------------------------------------------------------- globals

Namespace = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="Namespace (default: the context's, else 'default')."),
]


@app.callback()
def _globals(
    ctx: typer.Context,
    kubeconfig: Annotated[
        str | None,
        typer.Option(
            "--kubeconfig",
            envvar="KUBECONFIG",
            help="kubeconfig file, or a list of files separated by ':' merged as kubectl merges "
            "them (first definition wins).",
        ),
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="kubeconfig context to use.")
    ] = None,
    namespace: Namespace = None,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            min=0.1,
            help="Seconds to wait for each answer of the API server (one attempt, no retries); "
            "connecting gives up after 5 s.",
        ),
    ] = DEFAULT_REQUEST_TIMEOUT_S,
) -> None:
    ctx.obj = Target(
        kubeconfig=kubeconfig, context=context, namespace=namespace, request_timeout=request_timeout
    )


def _with_ns(ctx: typer.Context, namespace: str | None) -> None:
    """Accept -n after the verb too (`coda-ctl get -n ml`), as kubectl does."""
    if namespace:
        t: Target = ctx.obj
        ctx.obj = dataclasses.replace(t, namespace=namespace)


# --------------------------------------------------------------------------------------- completion


def _completion_target(ctx: typer.Context) -> Target:
    """The cluster a completion asks: global flags already typed on the line (the group's
    callback does not run while completing), -n after the verb included."""
    root = ctx.find_root().params
    return Target(
        kubeconfig=root.get("kubeconfig"),
        context=root.get("context"),
        namespace=ctx.params.get("namespace") or root.get("namespace"),
        request_timeout=min(float(root.get("request_timeout") or 5.0), 5.0),
    )


def _complete_runs(ctx: typer.Context, incomplete: str) -> list[str]:
    """Run names in the namespace for shell completion; nothing (never an error) without a cluster."""
    try:
        runs = Cluster(_completion_target(ctx)).list_runs()
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [r["metadata"]["name"] for r in runs if r["metadata"]["name"].startswith(incomplete)]


def _complete_stages(ctx: typer.Context, incomplete: str) -> list[str]:
    """Stage names of the run already on the line (`logs RUN --stage <TAB>`)."""
    # While an option is completed, click leaves the positional arguments unparsed in ctx.args.
    run = ctx.params.get("run") or next(iter(ctx.args), None)
    if not run:
        return []
    try:
        obj = Cluster(_completion_target(ctx)).get_run(run)
    except Exception:  # as above
        return []
    names = [s.get("name", "") for s in (obj.get("spec") or {}).get("stages") or []]
    return [n for n in names if n.startswith(incomplete)]


# --------------------------------------------------------------------------------------- verbs


class DryRun(enum.StrEnum):
    """kubectl's --dry-run values."""

    none = "none"
    client = "client"
    server = "server"


@app.command()
@handles_errors
def submit(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Option("--filename", "-f", help="CodaTrainingRun YAML ('-' for stdin).")
    ],
    dry_run: Annotated[
        DryRun,
        typer.Option(
            "--dry-run",
            help="client: validate offline, create nothing; server: also ask the API server "
            "(admission and strict field validation included) without persisting; none: create.",
        ),
    ] = DryRun.none,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="name: print only resource/name.")
    ] = None,
    namespace: Namespace = None,
) -> None:
    """Validate a CodaTrainingRun file locally (CRD schema + operator model), then create it with
    strict server-side field validation (a field the cluster's CRD lacks fails, never vanishes)."""
    _with_ns(ctx, namespace)
    if output not in (None, "name"):
        raise CtlError(f"unknown output format {output!r}: use name", Exit.USAGE)
    runs = runspec.load_runs(file)

    def report(name: str, what: str) -> None:
        typer.echo(f"{RESOURCE}/{name}" + ("" if output == "name" else f" {what}"))

    if dry_run is DryRun.client:
        for r in runs:
            report(r["metadata"]["name"], "valid (dry run)")
        return
    cluster = _cluster(ctx)
    for r in runs:
        in_file = r["metadata"].get("namespace")
        if namespace and in_file and in_file != namespace:
            raise CtlError(
                f'the namespace from the file ("{in_file}") does not match --namespace "{namespace}"',
                Exit.USAGE,
            )
    for r in runs:
        created = cluster.create_run(r, server_dry_run=dry_run is DryRun.server)
        report(
            created["metadata"]["name"],
            "created (server dry run)" if dry_run is DryRun.server else "created",
        )


RESOURCE = "codatrainingrun.coda.dev"
GET_FORMATS = "wide, json, yaml, name, jsonpath=TEMPLATE, custom-columns=NAME:.path,..."


@app.command()
@handles_errors
def get(
    ctx: typer.Context,
    runs_named: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[RUN]...",
            help="Run names; all runs in the namespace if omitted.",
            autocompletion=_complete_runs,
        ),
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help=GET_FORMATS)] = None,
    selector: Annotated[
        str | None,
        typer.Option("--selector", "-l", help="Label selector: k=v, k!=v, k, !k (comma: and)."),
    ] = None,
    watch_: Annotated[
        bool,
        typer.Option("--watch", "-w", help="After the list, print a row each time a run changes."),
    ] = False,
    watch_timeout: Annotated[
        float | None,
        typer.Option(help="With -w: stop after this many seconds (default: until Ctrl-C)."),
    ] = None,
    interval: Annotated[float, typer.Option(help="With -w: seconds between polls.")] = 2.0,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
    namespace: Namespace = None,
) -> None:
    """List runs: phase, stage, step/total, loss, age (kubectl's -o, -l, -w)."""
    _with_ns(ctx, namespace)
    fmt = views.parse_output(output)  # raises CtlError(USAGE) on an unknown format
    names = runs_named or []
    if names and selector:
        raise CtlError("give run names or --selector, not both", Exit.USAGE)
    cluster = _cluster(ctx)

    def fetch() -> list[dict[str, Any]]:
        if names:
            return [cluster.get_run(n) for n in names]
        return cluster.list_runs(all_namespaces, selector)

    runs = fetch()
    if fmt.kind in ("json", "yaml", "name", "jsonpath"):
        _print_documents(fmt, runs, single=len(names) == 1)
        return
    if not runs and not watch_:
        where = "any namespace" if all_namespaces else f'namespace "{cluster.namespace}"'
        typer.echo(f"No CodaTrainingRuns in {where}.", err=True)
        return
    if runs:
        _print_run_table(fmt, runs, header=True, all_namespaces=all_namespaces)
    if watch_:
        _watch_run_table(fetch, fmt, runs, all_namespaces, watch_timeout, interval)


def _print_documents(fmt: views.OutputFormat, runs: list[dict[str, Any]], *, single: bool) -> None:
    """`get -o json|yaml|name|jsonpath`: one run's object when one was named, else a List."""
    if fmt.kind in ("json", "yaml"):
        typer.echo(views.dump(runs[0] if single else views.as_list(runs), fmt.kind))
        return
    text = views.render_output(fmt, runs, single=single)
    if text:
        typer.echo(text)


def _print_run_table(
    fmt: views.OutputFormat, items: list[dict[str, Any]], *, header: bool, all_namespaces: bool
) -> None:
    """`get`'s table (plain, wide or custom columns); without its header for `-w`'s later rows."""
    if fmt.kind == "custom-columns":
        headers, rows = views.custom_columns(fmt.spec, items)
    else:
        headers, rows = views.get_table(items, _now(), wide=fmt.kind == "wide")
    if all_namespaces:
        headers = ["NAMESPACE", *headers]
        rows = [
            [r["metadata"].get("namespace", ""), *row] for r, row in zip(items, rows, strict=True)
        ]
    # -o wide and custom columns are for reading whole values (checkpoint URIs, sampler
    # URLs): never cropped to the terminal's width, as kubectl does not.
    if header and _tty() and fmt.kind == "table":
        _print_table(headers, rows)
    else:
        text = views.plain_table(headers, rows)
        typer.echo(text if header else "\n".join(text.splitlines()[1:]))


def _watch_run_table(
    fetch: Callable[[], list[dict[str, Any]]],
    fmt: views.OutputFormat,
    runs: list[dict[str, Any]],
    all_namespaces: bool,
    watch_timeout: float | None,
    interval: float,
) -> None:
    """`get -w`: poll every `interval` seconds and print a row for each run that changed (the
    header once, before the first row), until `watch_timeout` or Ctrl-C."""
    header_printed = bool(runs)
    seen = {_key(r): _version(r) for r in runs}
    deadline = None if watch_timeout is None else time.monotonic() + watch_timeout
    while deadline is None or time.monotonic() < deadline:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        time.sleep(interval if left is None else min(interval, left))
        changed = []
        for r in fetch():
            version = _version(r)
            if seen.get(_key(r)) != version:
                changed.append(r)
                seen[_key(r)] = version
        if changed:
            _print_run_table(fmt, changed, header=not header_printed, all_namespaces=all_namespaces)
            header_printed = True


def _version(run: dict[str, Any]) -> str:
    """What changes when the run changes: resourceVersion, else (a server that keeps none) the
    object itself."""
    return run["metadata"].get("resourceVersion") or json.dumps(run, sort_keys=True)


def _key(run: dict[str, Any]) -> tuple[str, str]:
    return (run["metadata"].get("namespace", ""), run["metadata"]["name"])


@app.command()
@handles_errors
def describe(
    ctx: typer.Context,
    runs_named: Annotated[
        list[str],
        typer.Argument(metavar="RUN...", help="Run names.", autocompletion=_complete_runs),
    ],
    namespace: Namespace = None,
) -> None:
    """Stages, checkpoints, conditions, events and the sampler endpoint of runs, joined with their
    JobSets, Jobs, pods (phase, reason, host, node selector), pod events, Kueue admission, and
    the first thing blocking each run."""
    from coda_ctl import describe as describing
    from coda_ctl import diagnose

    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    texts = []
    for run in runs_named:
        obj = cluster.get_run(run)
        now = _now()
        texts.append(
            describing.describe_text(obj, cluster.events_for(obj), now)
            + "\n"
            + diagnose.workloads_text(cluster.snapshot(obj), now)
        )
    typer.echo("\n\n".join(texts))


@app.command()
@handles_errors
def doctor(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.", autocompletion=_complete_runs)],
    namespace: Namespace = None,
) -> None:
    """Name the first thing blocking a run (operator not acting, missing ServiceAccount, Kueue not
    admitting, image pull, no accelerator capacity, a failing host) and how to fix it. Exit 0 when
    nothing blocks it, 1 when something does."""
    from coda_ctl import diagnose

    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    snap = cluster.snapshot(cluster.get_run(run))
    typer.echo(diagnose.doctor_text(snap))
    if diagnose.findings(snap):
        raise typer.Exit(int(Exit.ERROR))


@app.command()
@handles_errors
def logs(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.", autocompletion=_complete_runs)],
    stage: Annotated[
        str | None,
        typer.Option(
            "--stage",
            "-s",
            help="Stage (default: the current one).",
            autocompletion=_complete_stages,
        ),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    container: Annotated[
        str | None, typer.Option("--container", "-c", help="Container (default: trainer).")
    ] = None,
    previous: Annotated[
        bool,
        typer.Option(
            "--previous", "-p", help="The previous (crashed) instance's logs, as kubectl."
        ),
    ] = False,
    all_hosts: Annotated[
        bool,
        typer.Option(
            "--all-hosts",
            help="Every host of the stage, each line prefixed with [slice J host C] (no -f).",
        ),
    ] = False,
    namespace: Namespace = None,
) -> None:
    """Logs of a stage's leader pod (JobSet job 0, completion index 0), or of every host."""
    from coda_ctl.diagnose import host_of

    _with_ns(ctx, namespace)
    if all_hosts and follow:
        raise CtlError("--all-hosts reads each host's log once: use it without -f", Exit.USAGE)
    cluster = _cluster(ctx)
    obj = cluster.get_run(run)
    stage_name, jobset = views.stage_jobset(obj, stage)
    labels = {JOBSET_NAME_LABEL: jobset} if all_hosts else views.leader_labels(jobset)
    pods = cluster.pods(labels)
    if not pods:
        what = "pods" if all_hosts else "leader pod"
        raise CtlError(
            f'stage "{stage_name}" of run "{run}" has no {what} yet (JobSet {jobset})',
            Exit.NOT_FOUND,
        )
    if all_hosts:  # slice by slice, host by host
        pods.sort(
            key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in host_of(p).split()[1::2])
        )
    out = sys.stdout.buffer
    for pod in pods if all_hosts else pods[:1]:
        containers = [c.get("name") for c in pod.get("spec", {}).get("containers", [])]
        chosen = container or (
            "trainer"
            if "trainer" in containers
            else (containers[0] if len(containers) > 1 else None)
        )
        chunks = cluster.stream_logs(
            pod["metadata"]["name"], container=chosen, follow=follow, tail=tail, previous=previous
        )
        if not all_hosts:
            for chunk in chunks:
                out.write(chunk)
                out.flush()
            continue
        prefix = f"[{host_of(pod)}] ".encode()
        text = b"".join(chunks)
        for line in text.splitlines(keepends=True):
            out.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
        out.flush()


@app.command()
@handles_errors
def watch(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.", autocompletion=_complete_runs)],
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 5.0,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 1).")
    ] = None,
    namespace: Namespace = None,
) -> None:
    """Live progress per stage, then the evaluation (pass@1 per benchmark, the gate), until the
    run succeeds (exit 0) or fails (exit 1)."""
    from coda_ctl.runstatus import status_of

    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    deadline = None if timeout is None else time.monotonic() + timeout
    obj = cluster.get_run(run)
    if _tty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        ) as bars:
            tasks = {
                n: bars.add_task(n, total=max(t, 1), info="")
                for n, _, t, _ in views.stage_progress(obj)
            }
            shown = None  # the evaluation line last printed
            while True:
                progress = status_of(obj).progress
                loss = progress.loss if progress is not None else None
                for name, done, total, phase in views.stage_progress(obj):
                    info = phase + (
                        f"  loss {loss:.4f}" if phase == "Running" and loss is not None else ""
                    )
                    bars.update(tasks[name], completed=done, total=max(total, 1), info=info)
                evaluation = views.evaluation_progress(obj)
                if evaluation and evaluation != shown:
                    bars.console.print(evaluation)
                    shown = evaluation
                if _watch_done(obj, deadline):
                    break
                time.sleep(interval)
                obj = cluster.get_run(run)
    else:
        last = None
        while True:
            line = "  ".join(f"{n} {d}/{t} {p}" for n, d, t, p in views.stage_progress(obj))
            line = f"{views.phase_of(obj)}  {line}"
            if evaluation := views.evaluation_progress(obj):
                line += f"  {evaluation}"
            if line != last:
                typer.echo(line)
                last = line
            if _watch_done(obj, deadline):
                break
            time.sleep(interval)
            obj = cluster.get_run(run)
    status = status_of(obj)
    phase = status.phase
    if phase == "Failed":
        failed = status.condition("Failed")
        raise CtlError(
            f'run "{run}" failed' + (f": {failed.message}" if failed else ""), Exit.ERROR
        )
    if phase != "Succeeded":
        raise CtlError(f'timed out watching run "{run}" (phase {phase})', Exit.ERROR)
    typer.echo(f'run "{run}" succeeded')


def _watch_done(obj: dict[str, Any], deadline: float | None) -> bool:
    return views.phase_of(obj) in views.TERMINAL_PHASES or (
        deadline is not None and time.monotonic() > deadline
    )


@app.command()
@handles_errors
def suspend(
    ctx: typer.Context,
    runs_named: Annotated[
        list[str], typer.Argument(metavar="RUN...", autocompletion=_complete_runs)
    ],
    namespace: Namespace = None,
) -> None:
    """Suspend a run: its JobSets are suspended (pods stop, checkpoints stay), not deleted."""
    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    for run in runs_named:
        cluster.patch_run(run, {"spec": {"suspend": True}})
        typer.echo(f"codatrainingrun.coda.dev/{run} suspended")


@app.command()
@handles_errors
def resume(
    ctx: typer.Context,
    runs_named: Annotated[
        list[str], typer.Argument(metavar="RUN...", autocompletion=_complete_runs)
    ],
    namespace: Namespace = None,
) -> None:
    """Resume a suspended run; the trainer continues from its newest checkpoint."""
    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    for run in runs_named:
        cluster.patch_run(run, {"spec": {"suspend": False}})
        typer.echo(f"codatrainingrun.coda.dev/{run} resumed")


@app.command()
@handles_errors
def retry(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(autocompletion=_complete_runs)],
    namespace: Namespace = None,
) -> None:
    """Retry a failed run: its failed stage (a new JobSet that resumes from the stage's newest
    checkpoint) or its failed evaluation (a new evaluation Job; nothing trains again). After
    QualityGateFailed nothing is evaluated again (same checkpoint and seed, same score): the gate
    is checked against the current spec, so lower minPassAt1 first (else the operator ignores it)."""
    from coda_trainer.contract import RETRY_ANNOTATION

    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    obj = cluster.get_run(run)
    if views.phase_of(obj) != "Failed":
        raise CtlError(
            f'run "{run}" is {views.phase_of(obj)}, not Failed: nothing to retry', Exit.CONFLICT
        )
    # Microseconds: two retries in the same second must still be two distinct requests.
    stamp = _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.patch_run(run, {"metadata": {"annotations": {RETRY_ANNOTATION: stamp}}})
    typer.echo(f"codatrainingrun.coda.dev/{run} retry requested")


@app.command()
@handles_errors
def delete(
    ctx: typer.Context,
    runs_named: Annotated[
        list[str], typer.Argument(metavar="RUN...", autocompletion=_complete_runs)
    ],
    namespace: Namespace = None,
) -> None:
    """Delete a run (its JobSets, ConfigMaps and sampler go with it; checkpoints stay in storage)."""
    _with_ns(ctx, namespace)
    cluster = _cluster(ctx)
    for run in runs_named:
        cluster.delete_run(run)
        typer.echo(f'codatrainingrun.coda.dev "{run}" deleted')


def _sampler_call(
    ctx: typer.Context, run: str | None, url: str | None, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    from coda_operator.api import parse_spec
    from coda_operator.render import sampler_api_key
    from coda_trainer.contract import ENV_API_KEY

    if url:  # a sampler reached directly takes its key from the environment, like the server
        return samplerclient.post(url, path, body, api_key=os.environ.get(ENV_API_KEY) or None)
    if not run:
        raise CtlError("give a RUN (sampler reached through the API server) or --url", Exit.USAGE)
    cluster = _cluster(ctx)
    obj = cluster.get_run(run)
    service, port = samplerclient.service_of(obj)
    ref = sampler_api_key(obj["metadata"]["name"], parse_spec(obj.get("spec")))
    api_key = cluster.secret_value(ref.name, ref.key)
    return cluster.service_post(service, port, path, body, api_key=api_key)


@app.command()
@handles_errors
def sample(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run whose sampler Service to use.")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to complete.")] = "",
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens to generate (default: the server's).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Diffusion steps (default: the server's).")
    ] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    url: Annotated[
        str | None, typer.Option(help="Sampler base URL instead of the service proxy.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="json: print the whole reply.")
    ] = None,
    namespace: Namespace = None,
) -> None:
    """Complete a prompt with a run's sampler (through the API server's service proxy, or --url)."""
    _with_ns(ctx, namespace)
    if not prompt:
        raise CtlError("--prompt is required", Exit.USAGE)
    body = samplerclient.completion_body(
        prompt, max_tokens, steps, temperature, model=run or "coda"
    )
    reply = _sampler_call(ctx, run, url, "/v1/completions", body)
    typer.echo(
        json.dumps(reply, indent=2) if output == "json" else samplerclient.completion_text(reply)
    )


@app.command()
@handles_errors
def infill(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run whose sampler Service to use.")] = None,
    prefix: Annotated[str, typer.Option(help="Code before the gap.")] = "",
    suffix: Annotated[str, typer.Option(help="Code after the gap.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Tokens in the gap.")] = 32,
    steps: Annotated[int | None, typer.Option()] = None,
    url: Annotated[
        str | None, typer.Option(help="Sampler base URL instead of the service proxy.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="json: print the whole reply.")
    ] = None,
    namespace: Namespace = None,
) -> None:
    """Fill the gap between --prefix and --suffix (what a bidirectional model is good at)."""
    _with_ns(ctx, namespace)
    body: dict[str, Any] = {"prefix": prefix, "suffix": suffix, "max_tokens": max_tokens}
    if steps is not None:
        body["steps"] = steps
    reply = _sampler_call(ctx, run, url, "/v1/infill", body)
    if output == "json":
        typer.echo(json.dumps(reply, indent=2))
    else:
        typer.echo(prefix + samplerclient.infill_text(reply) + suffix)


@app.command(name="eval")
@handles_errors
def eval_(
    benchmarks: Annotated[
        list[str],
        typer.Argument(
            help="One or more of humaneval, humaneval-plus, mbpp, mbpp-sanitized "
            "(the names of spec.evaluation.benchmarks).",
            metavar="BENCHMARK...",
        ),
    ],
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint to score.")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint to load in-process.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems.")] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out", help="Write the JSON report here (<out>.<benchmark>.json if several)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens per answer (default: the harness's 512).")
    ] = None,
) -> None:
    """pass@1 on code benchmarks, against a running sampler (--url) or a checkpoint. HumanEval
    and HumanEval+ asked together are generated once and scored twice."""
    from coda_trainer.api import BENCHMARKS

    from coda_ctl import evalbridge

    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise CtlError(f"unknown benchmark {unknown[0]!r}: use {', '.join(BENCHMARKS)}", Exit.USAGE)
    if (url is None) == (checkpoint is None):
        raise CtlError("give exactly one of --url or --checkpoint", Exit.USAGE)
    raise typer.Exit(
        evalbridge.run_eval(
            list(dict.fromkeys(benchmarks)),
            url=url,
            checkpoint=checkpoint,
            limit=limit,
            out=out,
            max_new_tokens=max_new_tokens,
        )
    )


@app.command()
@handles_errors
def render(
    file: Annotated[str, typer.Option("--filename", "-f", help="CodaTrainingRun YAML.")],
    output: Annotated[str, typer.Option("--output", "-o", help="yaml | json")] = "yaml",
) -> None:
    """Print every manifest the operator would create for a run (offline, no cluster)."""
    from coda_operator.render import render_all

    _check_format(output, ("yaml", "json"))
    docs = [obj for run in runspec.load_runs(file) for obj in render_all(run)]
    if output == "json":
        typer.echo(views.dump(views.as_list(docs), "json"))
    else:
        typer.echo("\n---\n".join(views.to_yaml(d) for d in docs))


@app.command()
@handles_errors
def plan(
    file: Annotated[str, typer.Option("--filename", "-f", help="CodaTrainingRun YAML.")],
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also compile each TPU stage's train/eval step for its slice on this CPU "
            "(needs the `preflight` extra: libtpu, Linux x86_64) and report peak HBM per chip.",
        ),
    ] = False,
    search: Annotated[
        bool,
        typer.Option(
            "--search", help="With --compile: propose the fastest remat × gradAccum that fits."
        ),
    ] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="table | json | yaml")] = "table",
) -> None:
    """Will each stage start and fit on its slice? Shape arithmetic always; memory with --compile.

    Offline, no cluster. Exit 7 when any stage would fail (the report says why)."""
    from coda_ctl import plan as planner

    if output not in ("table", "json", "yaml"):
        raise CtlError(f"--output: {output!r} is not one of table, json, yaml", Exit.USAGE)
    if search and not compile_:
        raise CtlError(
            "--search needs --compile (it compiles every combination it tries)", Exit.USAGE
        )
    plans = [
        planner.plan_run(doc, compile=compile_, search=search)
        for doc in planner.load_spec_docs(file)
    ]
    if output == "table":
        _print_table(planner.TABLE_HEADERS, [r for p in plans for r in planner.table_rows(p)])
        for p in plans:
            for s in p["stages"]:
                for problem in s["problems"]:
                    typer.echo(f"{p['name']}/{s['name']}: {problem}")
    else:
        typer.echo(views.dump(plans[0] if len(plans) == 1 else {"runs": plans}, output))
    if not all(planner.runnable(p) for p in plans):
        raise typer.Exit(int(Exit.WONT_RUN))


@app.command()
@handles_errors
def crd(
    output: Annotated[str, typer.Option("--output", "-o", help="yaml | json")] = "yaml",
) -> None:
    """Print the CodaTrainingRun CustomResourceDefinition."""
    _check_format(output, ("yaml", "json"))
    typer.echo(views.dump(runspec.crd(), output))


def _check_format(output: str, allowed: tuple[str, ...]) -> None:
    if output not in allowed:
        raise CtlError(f"unknown output format {output!r}: use {' or '.join(allowed)}", Exit.USAGE)


@app.command()
@handles_errors
def version(
    ctx: typer.Context,
    client_only: Annotated[
        bool, typer.Option("--client", help="Only this coda-ctl's version; no cluster needed.")
    ] = False,
) -> None:
    """This coda-ctl's version and API version, and what the cluster serves (its CodaTrainingRun
    CRD versions and Kubernetes version)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from coda_trainer.contract import GROUP, VERSION

    try:
        mine = package_version("coda")
    except PackageNotFoundError:  # running from a source tree without an install
        mine = "unknown"
    typer.echo(f"Client Version: coda-ctl {mine} ({GROUP}/{VERSION})")
    if client_only:
        return
    cluster = _cluster(ctx)
    served, preferred = cluster.served_versions()
    k8s = cluster.server_version() or "unknown"
    typer.echo(f"Kubernetes Version: {k8s} ({cluster.server})")
    if not served:
        raise CtlError(
            "the CodaTrainingRun CRD is not installed in this cluster: "
            "`coda-ctl crd | kubectl apply --server-side -f -`",
            Exit.NO_CLUSTER,
        )
    typer.echo(f"CRD Versions: {', '.join(f'{GROUP}/{v}' for v in served)} (preferred {preferred})")
    if VERSION not in served:
        raise CtlError(
            f"the cluster does not serve {GROUP}/{VERSION}, which this coda-ctl needs: upgrade the CRD",
            Exit.NO_CLUSTER,
        )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[
        str, typer.Option("--config", help="Stage job YAML (what the operator's ConfigMap holds).")
    ],
) -> None:
    """Run one training stage: the container entry point (same as `python -m coda_trainer.train`)."""
    # Imported when the command runs, like every command's trainer imports: JAX costs seconds
    # and `coda-ctl --help` (and tab completion) must not pay them.
    from coda_trainer import api as trainer

    raise typer.Exit(trainer.run_stage(["--config", config, *ctx.args]))


@local_app.command("run")
@handles_errors
def local_run(
    file: Annotated[
        str | None, typer.Argument(help="CodaTrainingRun YAML; the embedded default if omitted.")
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Checkpoints go to WORKDIR/<run>/.")] = Path("runs"),
    steps_scale: Annotated[
        float | None,
        typer.Option(help="Multiply every stage's steps (CI uses < 1). Env: CODA_STEPS_SCALE."),
    ] = None,
    do_eval: Annotated[
        bool, typer.Option("--eval", help="Score a small HumanEval pass@1 at the end.")
    ] = False,
    eval_limit: Annotated[int, typer.Option(help="Problems in the --eval pass.")] = 10,
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the sampler running at the end (Ctrl-C stops it).")
    ] = False,
    port: Annotated[int, typer.Option(help="Sampler port on 127.0.0.1 (0 = any free port).")] = 0,
    no_sample: Annotated[
        bool, typer.Option("--no-sample", help="Train only; do not start the sampler.")
    ] = False,
) -> None:
    """Train every stage of a run here (in order, resumable), then serve and sample the result."""
    from coda_ctl import localrun

    raise typer.Exit(
        localrun.run(
            file,
            workdir=workdir,
            steps_scale=steps_scale,
            do_eval=do_eval,
            eval_limit=eval_limit,
            serve=serve,
            port=port,
            sample=not no_sample,
            tty=_tty(),
        )
    )


@local_app.command("default")
@handles_errors
def local_default() -> None:
    """Print the embedded default run (start your own run.yaml from it)."""
    from coda_ctl.localplan import default_run

    typer.echo(views.to_yaml(default_run()))


def main() -> None:  # pragma: no cover - `python -m coda_ctl`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
