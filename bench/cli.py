"""The ``clinfer bench`` commands."""

from __future__ import annotations

import importlib
import logging
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from clinfer.bench.report import failed_result, summary, write_report
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series
from rich.console import Console
from rich.table import Table

from clinfer.errors import ClinferError

logger = logging.getLogger(__name__)
console = Console()

bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)

# Target of the real-time benchmark: loaded p99 at most 1.5 times the idle p99.
REALTIME_P99_TARGET = 1.5

SmallOption = Annotated[
    bool, typer.Option(help="Run the small configuration (seconds to a minute).")
]
WorkDirOption = Annotated[
    Path | None,
    typer.Option(
        help="Folder for generated data, repositories and job results; kept after "
        "the run. Default: a temporary folder, removed afterwards."
    ),
]


def _out_option(name: str) -> Any:
    return typer.Option(help=f"Folder of the report. Default: results/bench/{name}.")


def _row(summary: dict[str, Any]) -> list[str]:
    def fmt(value: Any, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return [
        summary["design"],
        fmt(summary["idle_p50_ms"]),
        fmt(summary["idle_p99_ms"]),
        fmt(summary["loaded_p50_ms"]),
        fmt(summary["loaded_p99_ms"]),
        fmt(summary["p99_ratio"], 2),
        fmt(summary["batch_alone_fps"]),
        fmt(summary["batch_kept_ratio"], 2),
    ]


def realtime_result(summaries: list[dict[str, Any]], command: str) -> BenchResult:
    """Turn the real-time benchmark's design summaries into a :class:`BenchResult`.

    Each design gives two ratios: loaded p99 over idle p99 (target at most 1.5) and
    batch frames/s under real-time load over batch alone (no target).
    """
    ratios: list[Ratio] = []
    for item in summaries:
        design = item["design"]
        if item["p99_ratio"] is not None:
            ratios.append(
                Ratio(
                    name=f"realtime_p99_{design}",
                    value=item["p99_ratio"],
                    numerator=item["loaded_p99_ms"],
                    denominator=item["idle_p99_ms"],
                    unit="ms",
                    description=f"{design}: real-time p99 under batch load over idle",
                    target=REALTIME_P99_TARGET,
                    higher_is_better=False,
                )
            )
        if item["batch_kept_ratio"] is not None:
            ratios.append(
                Ratio(
                    name=f"realtime_kept_{design}",
                    value=item["batch_kept_ratio"],
                    numerator=item["batch_loaded_fps"],
                    denominator=item["batch_alone_fps"],
                    unit="frames/s",
                    description=(
                        f"{design}: batch throughput with real-time requests over "
                        "batch alone"
                    ),
                )
            )
    designs = [item["design"] for item in summaries]
    indices = [float(i) for i in range(len(designs))]

    def values(key: str) -> list[float]:
        return [
            float("nan") if item[key] is None else float(item[key])
            for item in summaries
        ]

    plot = Plot(
        name="latency",
        title="real-time latency per serving design",
        x_label="design",
        y_label="latency (ms)",
        series=[
            Series("idle p50", indices, values("idle_p50_ms")),
            Series("idle p99", indices, values("idle_p99_ms")),
            Series("loaded p50", indices, values("loaded_p50_ms")),
            Series("loaded p99", indices, values("loaded_p99_ms")),
        ],
        categories=designs,
    )
    errors = sum(int(item["errors"]) for item in summaries)
    notes = [
        "Latency is the gRPC round trip of a preprocessed one-frame tensor at "
        "priority 1; DICOM reading and preprocessing are not included.",
    ]
    if errors:
        notes.append(f"{errors} requests failed during the run.")
    return BenchResult(
        name="realtime",
        title="Real-time latency under a batch load",
        command=command,
        ratios=ratios,
        plots=[plot],
        raw={"designs": summaries},
        notes=notes,
    )


@contextmanager
def _work_dir(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix="clinfer-bench-") as tmp:
        yield Path(tmp)


def _config_class(run: Callable[..., BenchResult]) -> type:
    """Return the config class that a benchmark's ``run`` is annotated with.

    Raises
    ------
    ClinferError
        If ``run`` has no resolvable annotation for ``config``.
    """
    try:
        hints = typing.get_type_hints(run)
    except (NameError, TypeError) as exc:
        raise ClinferError(
            f"cannot resolve the type hints of {run.__module__}.{run.__name__}; "
            "annotate its config parameter with the config dataclass."
        ) from exc
    config_class = hints.get("config")
    if not isinstance(config_class, type):
        raise ClinferError(
            f"{run.__module__}.{run.__name__} has no config annotation; annotate it "
            "with the config dataclass."
        )
    return config_class


def _parse_value(kind: Any, text: str, option: str) -> Any:
    """Convert ``text`` to the scalar type ``kind`` of a config field.

    Raises
    ------
    ClinferError
        If ``text`` is not a valid value of that type.
    """
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kinds = [item for item in typing.get_args(kind) if item is not type(None)]
        if text.lower() == "none":
            return None
        kind = kinds[0]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in (int, float, str, Path):
            return kind(text)
    except ValueError as exc:
        raise ClinferError(
            f"invalid value {text!r} for {option}; give a {kind.__name__}."
        ) from exc
    raise ClinferError(f"{option} has the type {kind}, which cannot be set here.")


def config_from_options(config: Any, args: list[str]) -> Any:
    """Return ``config`` with the fields that ``--field-name VALUE`` options set.

    An option names a field of the config dataclass in kebab case. A tuple field
    also takes its singular name (``--syntax`` for ``syntaxes``) and one value per
    occurrence, and the first occurrence replaces the default. ``--flag`` and
    ``--no-flag`` set a bool field.

    Raises
    ------
    ClinferError
        If an option names no field, lacks its value or has an invalid value.
    """
    hints = typing.get_type_hints(type(config))
    names = {item.name for item in fields(config)}
    changes: dict[str, Any] = {}
    index = 0
    while index < len(args):
        option = args[index]
        index += 1
        if not option.startswith("--"):
            raise ClinferError(f"unexpected argument {option!r}; pass --FIELD VALUE.")
        name = option[2:].replace("-", "_")
        negated = name.startswith("no_") and hints.get(name[3:]) is bool
        if negated:
            name = name[3:]
        for candidate in (name, name + "s", name + "es"):
            if candidate in names:
                name = candidate
                break
        else:
            raise ClinferError(
                f"unknown option {option} for {type(config).__name__}; choose from "
                f"{', '.join('--' + n.replace('_', '-') for n in sorted(names))}."
            )
        kind = hints[name]
        if kind is bool and (negated or index >= len(args) or args[index][:2] == "--"):
            changes[name] = not negated
            continue
        if index >= len(args):
            raise ClinferError(f"option {option} is missing its value.")
        text = args[index]
        index += 1
        if typing.get_origin(kind) is tuple:
            item_kind = typing.get_args(kind)[0]
            previous = changes.get(name, ())
            changes[name] = (*previous, _parse_value(item_kind, text, option))
        else:
            changes[name] = _parse_value(kind, text, option)
    return replace(config, **changes)


def _run_module(
    module_name: str, small: bool, work_dir: Path, args: list[str] | None = None
) -> BenchResult:
    """Run ``module_name.run`` with its config's defaults or ``small()``.

    The module is imported here, so the other commands work while it is missing.
    ``args`` are ``--field-name VALUE`` options applied to the config.

    Raises
    ------
    ClinferError
        If the config class cannot be found or an option is invalid.
    """
    module = importlib.import_module(module_name)
    run = module.run
    config_class = _config_class(run)
    config = config_class.small() if small else config_class()
    if args:
        config = config_from_options(config, args)
    return run(config, work_dir)


def _check_options(module_name: str, small: bool, args: list[str]) -> None:
    """Exit with status 2 if ``args`` are invalid for the module's config."""
    if not args:
        return
    try:
        module = importlib.import_module(module_name)
        config_class = _config_class(module.run)
        config_from_options(config_class.small() if small else config_class(), args)
    except (ClinferError, ImportError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from exc


def _run_realtime(small: bool, work_dir: Path) -> BenchResult:
    from clinfer.bench.realtime import BenchConfig, run_bench, tiny_config

    if small:
        config = tiny_config(("realtime_model",))
        command = "clinfer bench realtime --tiny --design realtime_model"
    else:
        config = BenchConfig()
        command = "clinfer bench realtime"
    summaries = run_bench(config, work_dir / "realtime.json")
    return realtime_result(summaries, command)


def _run_p1(small: bool, work_dir: Path) -> BenchResult:
    from clinfer.bench.pipeline import PipelineConfig, run_p1

    return run_p1(PipelineConfig.small() if small else PipelineConfig(), work_dir)


def _run_p5(small: bool, work_dir: Path) -> BenchResult:
    from clinfer.bench.pipeline import MemoryConfig, run_p5

    return run_p5(MemoryConfig.small() if small else MemoryConfig(), work_dir)


def _run_sweep(small: bool, work_dir: Path) -> BenchResult:
    from clinfer.bench.sweep import SweepConfig, run

    return run(SweepConfig.small() if small else SweepConfig(), work_dir)


def _run_serving(small: bool, work_dir: Path) -> BenchResult:
    return _run_module("clinfer.bench.serving", small, work_dir)


def _run_decode(small: bool, work_dir: Path) -> BenchResult:
    return _run_module("clinfer.bench.decode", small, work_dir)


# name in the report when it fails, title, command, runner taking (small, work dir)
BENCHMARKS: dict[str, tuple[str, str, str, Callable[[bool, Path], BenchResult]]] = {
    "realtime": (
        "realtime",
        "Real-time latency under a batch load",
        "clinfer bench realtime",
        _run_realtime,
    ),
    "pipeline": (
        "p1",
        "Scoring job against an in-process multiprocessing loop",
        "clinfer bench pipeline",
        _run_p1,
    ),
    "memory": ("p5", "Job memory against job size", "clinfer bench memory", _run_p5),
    "serving": ("p2", "Serving", "clinfer bench serving", _run_serving),
    "decode": ("p4", "Decoding", "clinfer bench decode", _run_decode),
    "sweep": (
        "sweep_pipeline",
        "Pipeline throughput against batch size and actor counts",
        "clinfer bench sweep",
        _run_sweep,
    ),
}


def run_benchmark(
    key: str,
    runner: Callable[[Path], BenchResult],
    work_dir: Path,
    *,
    small: bool = False,
) -> BenchResult:
    """Run one benchmark and return its result, or a failed result on any error.

    ``runner`` gets the benchmark's own folder under ``work_dir``. Errors are logged
    and recorded so that the other benchmarks of a report still run.
    """
    name, title, command, _ = BENCHMARKS[key]
    if small:
        command += " --small"
    target = work_dir / key
    logger.info("benchmark %s starting in %s", key, target)
    try:
        return runner(target)
    except Exception as exc:  # recorded in the report, so the other benchmarks run
        logger.exception("benchmark %s failed", key)
        return failed_result(name, title, command, exc)


def _report(
    results: list[BenchResult], out: Path, command: str, *, strict: bool = True
) -> None:
    paths = write_report(results, out, command=command)
    console.print(summary(results))
    console.print(f"report: {paths.markdown} and {paths.json}")
    failed = [result.name for result in results if "error" in result.raw]
    if failed and strict:
        Console(stderr=True).print(f"[red]failed:[/red] {', '.join(failed)}")
        raise typer.Exit(code=1)


def _single(
    key: str,
    runner: Callable[[Path], BenchResult],
    out: Path | None,
    work_dir: Path | None,
    small: bool,
) -> None:
    out_dir = out or Path("results/bench") / key
    with _work_dir(work_dir) as folder:
        result = run_benchmark(key, runner, folder, small=small)
    _report([result], out_dir, result.command)


@bench_app.command("pipeline")
def pipeline_command(
    small: SmallOption = False,
    instances: Annotated[
        int, typer.Option(help="Synthetic instances scored per run.")
    ] = 1000,
    repeats: Annotated[
        int, typer.Option(help="Interleaved runs of each side after the warm-up.")
    ] = 3,
    batch_size: Annotated[
        int, typer.Option(help="Frames per Triton request and per loop batch.")
    ] = 32,
    out: Annotated[Path | None, _out_option("pipeline")] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Measure P1: the scoring job's instances/s over a multiprocessing loop's."""
    from clinfer.bench.pipeline import PipelineConfig, run_p1

    config = PipelineConfig(instances=instances, repeats=repeats, batch_size=batch_size)
    if small:
        config = PipelineConfig.small()
    _single("pipeline", lambda folder: run_p1(config, folder), out, work_dir, small)


@bench_app.command("memory")
def memory_command(
    small: SmallOption = False,
    small_instances: Annotated[
        int, typer.Option(help="Instances of the smaller job.")
    ] = 1000,
    large_instances: Annotated[
        int, typer.Option(help="Instances of the larger job.")
    ] = 10000,
    repeats: Annotated[int, typer.Option(help="Interleaved runs of each size.")] = 1,
    out: Annotated[Path | None, _out_option("memory")] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Measure P5: peak PSS of a large `clinfer score` job over a small one."""
    from clinfer.bench.pipeline import MemoryConfig, run_p5

    config = MemoryConfig(
        small_instances=small_instances,
        large_instances=large_instances,
        repeats=repeats,
    )
    if small:
        config = MemoryConfig.small()
    _single("memory", lambda folder: run_p5(config, folder), out, work_dir, small)


@bench_app.command("sweep")
def sweep_command(
    small: SmallOption = False,
    instances: Annotated[
        int, typer.Option(help="Synthetic instances scored by each job.")
    ] = 500,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            help="Batch size to measure; repeat for several. Default: 8 16 32 64."
        ),
    ] = None,
    infer_actors: Annotated[
        list[int] | None,
        typer.Option(help="Inference actor count; repeat for several. Default: 1 2 4."),
    ] = None,
    decode_batch_size: Annotated[
        list[int] | None,
        typer.Option(help="Instances per actor call; repeat for several. Default: 32."),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Interleaved runs of every point.")] = 2,
    out: Annotated[Path | None, _out_option("sweep")] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Sweep the job's batch size and actor counts and choose an operating point."""
    from clinfer.bench.sweep import SweepConfig, run

    defaults = SweepConfig()
    config = SweepConfig(
        instances=instances,
        batch_sizes=tuple(batch_size or defaults.batch_sizes),
        infer_actors=tuple(infer_actors or defaults.infer_actors),
        decode_batch_sizes=tuple(decode_batch_size or defaults.decode_batch_sizes),
        repeats=repeats,
    )
    if small:
        config = SweepConfig.small()
    _single("sweep", lambda folder: run(config, folder), out, work_dir, small)


# Lets serving and decode take --FIELD VALUE options for their config dataclasses.
CONFIG_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}


@bench_app.command("serving", context_settings=CONFIG_OPTIONS)
def serving_command(
    context: typer.Context,
    small: SmallOption = False,
    out: Annotated[Path | None, _out_option("serving")] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Measure P2 (clinfer.bench.serving).

    Further --FIELD VALUE options set fields of ServingConfig, for example
    --batch-size 16 or --sweep-batch-sizes 8 --sweep-batch-sizes 32.
    """
    args = list(context.args)
    _check_options("clinfer.bench.serving", small, args)
    _single(
        "serving",
        lambda folder: _run_module("clinfer.bench.serving", small, folder, args),
        out,
        work_dir,
        small,
    )


@bench_app.command("decode", context_settings=CONFIG_OPTIONS)
def decode_command(
    context: typer.Context,
    small: SmallOption = False,
    out: Annotated[Path | None, _out_option("decode")] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Measure P4 (clinfer.bench.decode).

    Further --FIELD VALUE options set fields of DecodeConfig, for example
    --files-per-syntax 1 or --syntax RLELossless --syntax JPEG2000.
    """
    args = list(context.args)
    _check_options("clinfer.bench.decode", small, args)
    _single(
        "decode",
        lambda folder: _run_module("clinfer.bench.decode", small, folder, args),
        out,
        work_dir,
        small,
    )


@bench_app.command("all")
def all_command(
    small: SmallOption = False,
    out: Annotated[Path, typer.Option(help="Folder of the combined report.")] = Path(
        "results/bench"
    ),
    work_dir: WorkDirOption = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Benchmark to run; repeat for several. Default: all of "
            f"{', '.join(BENCHMARKS)}."
        ),
    ] = None,
) -> None:
    """Run every benchmark, write one report and print its summary.

    A failed benchmark is recorded with its error, the others still run, and the
    command exits with status 1.
    """
    keys = list(only or BENCHMARKS)
    unknown = [key for key in keys if key not in BENCHMARKS]
    if unknown:
        Console(stderr=True).print(
            f"[red]error:[/red] unknown benchmark(s) {unknown}; choose from "
            f"{', '.join(BENCHMARKS)}."
        )
        raise typer.Exit(code=2)
    results = []
    with _work_dir(work_dir) as folder:
        for key in keys:
            runner = BENCHMARKS[key][3]
            result = run_benchmark(
                key, lambda target, run=runner: run(small, target), folder, small=small
            )
            results.append(result)
            logger.info("benchmark %s finished", key)
    command = "clinfer bench all" + (" --small" if small else "")
    if only:
        command += "".join(f" --only {key}" for key in keys)
    _report(results, out, command)


@bench_app.command("realtime")
def realtime_command(
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path(
        "results/bench/realtime.json"
    ),
    design: Annotated[
        list[str] | None,
        typer.Option(help="Design to measure; repeat for several. Default: all."),
    ] = None,
    batch_clients: Annotated[
        int, typer.Option(help="Batch client threads sending at priority 2.")
    ] = 6,
    batch_size: Annotated[int, typer.Option(help="Frames per batch request.")] = 32,
    requests: Annotated[
        int, typer.Option(help="Real-time requests per phase and repeat.")
    ] = 60,
    gap_ms: Annotated[
        float, typer.Option(help="Pause after each real-time response, in ms.")
    ] = 100.0,
    phase_s: Annotated[
        float, typer.Option(help="Seconds of the batch-alone phase.")
    ] = 6.0,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats.")] = 3,
    tiny: Annotated[
        bool, typer.Option(help="Run in seconds with minimal load (smoke test).")
    ] = False,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the Markdown and JSON report. Default: a realtime "
            "folder next to the JSON file."
        ),
    ] = None,
) -> None:
    """Measure real-time latency idle and under batch load for serving designs."""
    from clinfer.bench.realtime import DESIGNS, BenchConfig, run_bench, tiny_config

    designs = tuple(design or DESIGNS)
    if tiny:
        config = tiny_config(designs)
    else:
        config = replace(
            BenchConfig(),
            designs=designs,
            batch_clients=batch_clients,
            batch_size=batch_size,
            realtime_requests=requests,
            realtime_gap_s=gap_ms / 1000.0,
            batch_phase_s=phase_s,
            repeats=repeats,
        )
    table = Table(title="real-time latency (ms) and batch throughput (frames/s)")
    for column in (
        "design",
        "idle p50",
        "idle p99",
        "loaded p50",
        "loaded p99",
        "p99 ratio",
        "batch fps",
        "batch kept",
    ):
        table.add_column(column)

    def report(summary: dict[str, Any]) -> None:
        console.print(" ".join(_row(summary)))

    try:
        summaries = run_bench(config, out, report=report)
    except ClinferError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    for item in summaries:
        table.add_row(*_row(item))
    console.print(table)
    console.print(f"wrote {out}")
    command = "clinfer bench realtime" + (" --tiny" if tiny else "")
    command += "".join(f" --design {name}" for name in design or ())
    paths = write_report(
        [realtime_result(summaries, command)],
        report_dir or out.parent / "realtime",
        command=command,
    )
    console.print(f"report: {paths.markdown}")


def register(app: typer.Typer) -> None:
    """Add ``clinfer bench`` to the command line."""
    app.add_typer(bench_app, name="bench")
