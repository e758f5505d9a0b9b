"""The `vheads sweep` command: a study file or --models x --datasets, every `vheads run` option, a live view.

The `vheads run` options are taken from that command's own definitions (same flags, defaults and help), so a
sweep accepts every one of them, on the command line and as study-file keys.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import typer

from vheads.cli.common import RUN_FIELDS, check_choice, errors, fail, parse_stages_option, setup_logging
from vheads.cli.output import check_format, console, emit, err, frame_table, say
from vheads.cli.run import run as run_command

NOT_IN_SWEEP = ("ctx", "model", "dataset", "name", "shard", "resume", "verbose")
RUN_OPTIONS = {name: param for name, param in inspect.signature(run_command).parameters.items()
               if name not in NOT_IN_SWEEP}


def option_spellings() -> dict[str, str]:
    """Every accepted spelling of a `vheads run` option (name, flag, flag with underscores) -> its parameter name."""
    names: dict[str, str] = {}
    for name, param in RUN_OPTIONS.items():
        names[name] = name
        for flag in param.default.param_decls or ():
            if flag.startswith("--"):
                names[flag[2:]] = names[flag[2:].replace("-", "_")] = name
    names.update(model="model", dataset="dataset", name="name")
    return names


def option_kinds() -> dict[str, Any]:
    """What a study file's value of each `vheads run` option and sweep setting must be: the command-line option's
    type, its least value (the option's own `min`, or `pipeline.config.LEAST`) and whether it may be empty."""
    from vheads.pipeline.config import LEAST
    from vheads.sweep.study import SETTINGS, Kind

    hints = get_type_hints(run_command)
    params = {**RUN_OPTIONS, **{name: inspect.signature(sweep).parameters[name] for name in SETTINGS}}
    hints.update({name: get_type_hints(sweep).get(name, params[name].annotation) for name in SETTINGS})
    kinds = {}
    for name, param in params.items():
        info = param.default
        least = LEAST.get(name, getattr(info, "min", None))
        types = (str, list) if name == "stages" else (hints[name],)
        kinds[name] = Kind(types, least, nullable=getattr(info, "default", None) is None)
    kinds.update(model=Kind((str,)), dataset=Kind((str,), nullable=False), name=Kind((str,)))
    return kinds


def sweep(
    ctx: typer.Context,
    study: Path = typer.Argument(None, help="Study file (TOML, or YAML): models x datasets x prompt styles x "
                                 "readouts x ablations, each entry taking any `vheads run` option."),
    models: str = typer.Option(None, "--models", "-m", help="Comma list of hub ids or model folders (demo: the "
                               "embedded demo LLaVA). Distinct folder names: they name the runs. Default: demo."),
    datasets: str = typer.Option(None, "--datasets", "-d", help="Comma list of datasets, NAME or NAME:PATH "
                                 "(e.g. shapes,pope:/data/pope.jsonl). Default: shapes."),
    shards: int = typer.Option(None, "--shards", min=1, help="Cut each run into N shards computed side by side "
                               "(default 1)."),
    retries: int = typer.Option(None, "--retries", min=0, help="Try a failed shard again this many times "
                                "(default 1; bad input is not retried)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (auto, ray://HOST:10001); default: "
                                "start a local Ray."),
    gpus_per_task: float = typer.Option(None, "--gpus-per-task", min=0, help="GPUs per worker (default: 1 when "
                                        "the cluster has GPUs as the worker starts, else 0; 0.5 packs two)."),
    cpus_per_task: float = typer.Option(None, "--cpus-per-task", min=0.1, help="CPUs per worker, and its torch "
                                        "threads on CPU (default 1)."),
    no_ray: bool = typer.Option(False, "--no-ray", help="One worker in this process (no Ray needed)."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (the shard rows, errors included)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log lines."),
    **options: Any,
) -> None:
    """Run many models x datasets (x options) on Ray workers and store every run in one store.

    Workers compute; this process is the store's one writer. Re-running the same command continues: runs done
    with the same settings are kept, unfinished ones resume.
    """
    setup_logging(verbose)
    with errors():
        check_format(fmt)
    from vheads.sweep.driver import SweepError, plan, run_sweep
    from vheads.sweep.study import AXES, StudyError, axis_entry, expand, given_keys, read_study

    given = {k for k in options if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    spellings = option_spellings()
    settings: dict[str, Any] = {}
    axes: dict[str, list[dict[str, Any]]] = {"models": [{"model": None}], "datasets": [{"dataset": "shapes"}]}
    base = dict(options)
    explicit = set(given)
    with errors():
        if study is not None:
            try:
                loaded = read_study(study, spellings, option_kinds())
            except StudyError as exc:
                fail(str(exc))
            settings, axes = loaded.settings, {**axes, **loaded.axes}
            base.update(loaded.base)
            base.update({k: options[k] for k in given})
            explicit |= set(loaded.base)
        if models:
            axes["models"] = [axis_entry("models", m, spellings) for m in _items(models)]
        if datasets:
            axes["datasets"] = [axis_entry("datasets", d, spellings) for d in _items(datasets)]
        for axis, flag in (("shards", shards), ("retries", retries), ("address", address),
                           ("gpus_per_task", gpus_per_task), ("cpus_per_task", cpus_per_task)):
            if flag is not None:
                settings[axis] = flag
        ordered = {a: axes[a] for a in AXES if a in axes}
        combos = zip(expand(base, ordered), given_keys(explicit, ordered), strict=True)
        store = str(base["store"])
        runs = plan([run_config(combo, store, keys) for combo, keys in combos])
        where = "in this process" if no_ray else f"on Ray ({settings.get('address') or 'local'})"
        say(f"{len(runs)} run(s) x {settings.get('shards', 1)} shard(s) {where}, into {store}", err)
        view = SweepView(err)
        try:
            with view:
                result = run_sweep(runs, store, shards=int(settings.get("shards", 1)), address=settings.get("address"),
                                   gpus_per_task=settings.get("gpus_per_task"),
                                   cpus_per_task=float(settings.get("cpus_per_task", 1)), local=no_ray,
                                   retries=int(settings.get("retries", 1)), on_event=view)
        except SweepError as exc:
            fail(str(exc))
    if fmt == "table":
        _print_table(result)
    else:
        emit(result.tasks, fmt)
    if not result.ok:
        failed = result.tasks[result.tasks["status"] != "done"]
        for row in failed.itertuples():
            say(f"failed {row.run} {row.shard}: {row.error}", err)
        say(f"{len(failed)} of {len(result.tasks)} shard(s) did not finish; run the same command again to retry "
            "them", err)
        raise typer.Exit(1)


def run_config(options: dict[str, Any], store: str, given: set[str] | None = None) -> Any:
    """A `RunConfig` from `vheads run` options (selectors in --ablate resolved, as `vheads run` does; `plan` applies
    its preset and checks it); `given`: the options the user set (on the command line or in the study file), which
    a preset does not override."""
    from vheads.analysis.selectors import run_option_heads
    from vheads.pipeline.config import RunConfig

    known = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in options.items() if k in known and k not in ("ablate", "shard", "store", "explicit")}
    spec, from_run = options.get("ablate_heads"), options.get("from_run")
    values["readout"] = check_choice(values.get("readout", "prompt"), "readout")
    values["ablation"] = check_choice(values.get("ablation", "zero"), "ablation")
    stages = values.get("stages")
    values["stages"] = parse_stages_option(stages) if isinstance(stages, str) else stages
    values["max_pixels"] = values.get("max_pixels") or None
    heads = run_option_heads(spec, from_run, store, values.get("model"), bool(values.get("trust_remote_code")),
                             values["stages"], values["ablation"])
    tags = {"ablate": spec, **({"from_run": from_run} if from_run else {})} if spec else {}
    explicit = None if given is None else tuple(sorted({RUN_FIELDS.get(k, k) for k in given} & known))
    return RunConfig(**values, ablate=heads, store=store, tags=tags, explicit=explicit)


class SweepView:
    """The driver's live view: per run, samples stored / total, rate, ETA and status; failures as they happen.

    On a terminal it redraws one table; otherwise it writes plain lines (progress at most every 10 s a run).
    """

    def __init__(self, console: Any, every: float = 10.0) -> None:
        self.console = console
        self.every = every
        self.runs: dict[str, dict[str, Any]] = {}
        self.live: Any = None

    def __enter__(self) -> SweepView:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        """Take one event of the driver."""
        now = time.time()
        if event.run:
            run = self.runs.setdefault(event.run, {"began": now, "status": "running", "printed": 0.0})
            run.update(done=event.done, total=event.total, new=event.new)
            if event.kind == "finished":
                run["status"] = event.text
        if event.kind in ("worker", "failure") or (event.kind in ("open", "finished") and self.live is None):
            style = "red" if event.kind == "failure" else "dim"
            label = f"{event.run} {event.shard}".strip() + ": " if event.run else ""
            kind = "" if event.kind == "worker" else f"[{style}]{event.kind}[/] "
            self._print(f"{kind}{label}{event.text}")
        elif event.kind == "progress" and self.live is None and now - run["printed"] >= self.every:
            run["printed"] = now
            self._print(f"{event.run}: {self._line(run, now)}")
        if self.live is not None:
            self.live.update(self._table())

    def _print(self, text: str) -> None:
        (self.live.console if self.live is not None else self.console).print(text, highlight=False, soft_wrap=True)

    def _line(self, run: dict[str, Any], now: float) -> str:
        rate = run["new"] / max(now - run["began"], 1e-9)
        left = max(run["total"] - run["done"], 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "-"
        return f"{run['done']}/{run['total']} samples, {rate:.1f}/s, ETA {eta}"

    def _table(self) -> Any:
        from rich.table import Table

        table = Table("run", "samples", "rate", "ETA", "status", header_style="bold")
        now = time.time()
        for name, run in self.runs.items():
            done, rate, eta = self._line(run, now).split(", ")
            table.add_row(name, done.split()[0], rate, eta.removeprefix("ETA "), run["status"])
        return table


def _print_table(result: Any) -> None:
    """The shards as a narrow table, then the time taken."""
    import pandas as pd

    tasks = result.tasks
    shown = tasks[["run", "shard", "status", "samples"]].assign(
        accuracy=[f"{a:.3f}" if pd.notna(a) else "" for a in tasks["accuracy"]],
        seconds=[f"{s:.1f}" for s in tasks["seconds"]])
    console.print(frame_table(shown, title="sweep"))
    t = result.timing
    console.print(f"{t.get('wall', 0):.1f} s in all; starting Ray {t.get('start', 0):.1f} s, loading models and "
                  f"data {t.get('load', 0):.1f} worker-s", highlight=False)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """`sweep`'s own parameters followed by the `vheads run` options, with their resolved types."""
    own = inspect.signature(sweep).parameters
    hints = {**get_type_hints(run_command), **get_type_hints(sweep)}
    params = [p.replace(annotation=hints.get(n, p.annotation)) for n, p in own.items() if n != "options"]
    taken = set(own)
    params += [p.replace(annotation=hints[n], kind=inspect.Parameter.KEYWORD_ONLY)
               for n, p in RUN_OPTIONS.items() if n not in taken]
    return inspect.Signature(params), {p.name: p.annotation for p in params}


def register(app: typer.Typer) -> None:
    """Add `sweep` to the command line."""
    sweep.__signature__, sweep.__annotations__ = _signature()
    app.command()(sweep)
