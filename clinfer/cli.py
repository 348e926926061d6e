"""The ``clinfer`` command line."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from clinfer.errors import ClinferError

if TYPE_CHECKING:
    from clinfer.validation.report import ValidationReport
    from clinfer.workers.pipeline import JobSummary

# Frames per Triton request of `clinfer score` and `clinfer run`: the default of
# clinfer.workers.pipeline.JobOptions.batch_size, not imported here because that
# module takes a second to import.
DEFAULT_BATCH_SIZE = 8

app = typer.Typer(
    help="Clinical ML inference on Triton Inference Server with Ray workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
logger = logging.getLogger("clinfer.cli")

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_MODEL = "cxr_resnet"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("ray", "ray.data", "urllib3", "highdicom", "openjpeg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log DEBUG lines.")
    ] = False,
) -> None:
    _setup_logging(verbose)


@app.command()
def export(
    repository: Annotated[
        Path, typer.Option(help="Model repository folder to write.")
    ] = (DEFAULT_REPOSITORY),
    seed: Annotated[int, typer.Option(help="Seed of the untrained weights.")] = 0,
    tolerance: Annotated[
        float, typer.Option(help="Maximum absolute ONNX Runtime vs PyTorch difference.")
    ] = 1e-4,
) -> None:
    """Export the bundled chest-radiograph classifier into the model repository."""
    from clinfer.export.cxr import export_cxr_model

    try:
        result = export_cxr_model(repository, seed=seed, tolerance=tolerance)
    except ClinferError as exc:
        _fail(exc)
    state = "published" if result.created else "unchanged, kept"
    console.print(
        f"{result.name} version {result.version} {state} in {repository} "
        f"(ONNX Runtime vs PyTorch max abs diff {result.parity.max_abs_diff:.2e}, "
        f"tolerance {result.parity.tolerance:.0e}). Weights are UNTRAINED."
    )


@app.command()
def serve(
    repository: Annotated[Path, typer.Option(help="Model repository to serve.")] = (
        DEFAULT_REPOSITORY
    ),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    http_port: Annotated[
        int, typer.Option(help="HTTP port (0: any free port).")
    ] = 8000,
    grpc_port: Annotated[
        int, typer.Option(help="gRPC port (0: any free port).")
    ] = 8001,
    metrics_port: Annotated[
        int, typer.Option(help="Metrics port (0: any free port).")
    ] = 8002,
    log_file: Annotated[Path, typer.Option(help="Server log file.")] = Path(
        "tritonserver.log"
    ),
) -> None:
    """Run the embedded Triton server in the foreground until SIGINT or SIGTERM."""
    from clinfer.server import EmbeddedTritonServer

    server = EmbeddedTritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=log_file,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server.start()
    except ClinferError as exc:
        _fail(exc)
    # Scripts parse this line for the server's addresses.
    print(
        f"ready grpc={server.grpc_url} http={server.http_url} "
        f"metrics={server.metrics_url}",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                console.print(f"tritonserver exited; see {server.log_file}")
                raise typer.Exit(1)
    finally:
        server.stop()
    console.print("tritonserver stopped")


@app.command()
def score(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders to score, recursively.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder for results.sqlite.")] = Path(
        "results"
    ),
    triton_url: Annotated[
        list[str] | None,
        typer.Option(
            help="Triton gRPC address HOST:PORT; repeat to spread batches. "
            "Without it an embedded server is started for the job."
        ),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster to join.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model as NAME or NAME:VERSION.")
    ] = DEFAULT_MODEL,
    repository: Annotated[
        Path, typer.Option(help="Model repository for the embedded server.")
    ] = DEFAULT_REPOSITORY,
    batch_size: Annotated[
        int, typer.Option(help="Frames per Triton request.")
    ] = DEFAULT_BATCH_SIZE,
    infer_actors: Annotated[int, typer.Option(help="Ray actors sending requests.")] = 2,
    strict: Annotated[
        bool, typer.Option(help="Reject DICOM files without a preamble or file meta.")
    ] = False,
    commit_every: Annotated[
        int, typer.Option(help="Instances written per database transaction.")
    ] = 64,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve job metrics on this port while the job runs (0: any free port)."
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address of the job metrics endpoint.")
    ] = "127.0.0.1",
    emr: Annotated[
        Path | None,
        typer.Option(
            help="EMR CSV joined by PatientID and AccessionNumber, for "
            "models with an EMR input."
        ),
    ] = None,
    dicom_out: Annotated[
        Path | None,
        typer.Option(
            help="Write a DICOM SR and a heatmap Secondary Capture per "
            "study into this folder."
        ),
    ] = None,
) -> None:
    """Score every DICOM file under PATHS and store results in OUT/results.sqlite."""
    _run_score(
        paths,
        out,
        triton_url or [],
        ray_address,
        model,
        repository,
        batch_size,
        infer_actors,
        strict,
        commit_every,
        metrics_port,
        metrics_host,
        emr_csv=emr,
        dicom_out=dicom_out,
    )


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="Output folder of the corpus job.")] = Path(
        "results/corpus"
    ),
    repository: Annotated[
        Path, typer.Option(help="Model repository.")
    ] = DEFAULT_REPOSITORY,
    workdir: Annotated[
        Path,
        typer.Option(
            help="Folder of the cohort, trained models, validation reports "
            "and the cohort job's results."
        ),
    ] = Path("results"),
    cohort_size: Annotated[
        int, typer.Option(help="Patients in the synthetic cohort.", min=100)
    ] = 600,
    corpus_only: Annotated[
        bool, typer.Option(help="Score the bundled corpus only.")
    ] = False,
) -> None:
    """Score the bundled corpus, then train, validate and serve the fusion model.

    1. Export the untrained ``cxr_resnet`` and score the real DICOM corpus.
    2. Generate the synthetic cohort, train the image, EMR and fusion models,
       validate them, export them with their parity gates into the repository,
       and score the cohort with the ``multimodal`` composition, EMR rows joined,
       writing a DICOM SR and a heatmap Secondary Capture per study.
    Every step keeps what an earlier run produced, so a second run scores nothing new.
    """
    from clinfer.corpus import corpus_dirs

    export(repository=repository, seed=0, tolerance=1e-4)
    dirs = corpus_dirs()
    console.print("corpus: " + ", ".join(str(d) for d in dirs))
    _run_score(
        dirs, out, [], None, DEFAULT_MODEL, repository, DEFAULT_BATCH_SIZE, 2, False, 64
    )
    if not corpus_only:
        _run_cohort(workdir, repository, cohort_size)


def _run_cohort(workdir: Path, repository: Path, cohort_size: int) -> None:
    from clinfer.export.multimodal import export_trained_models
    from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest, generate_cohort
    from clinfer.train.training import train_all
    from clinfer.validation.report import validate_all

    cohort_dir = workdir / "cohort"
    models_dir = workdir / "models"
    try:
        if (cohort_dir / "manifest.json").is_file():
            CohortManifest.load(cohort_dir)
            console.print(f"cohort: {cohort_dir} (kept from an earlier run)")
        else:
            console.print(f"cohort: generating {cohort_size} synthetic patients")
            generate_cohort(cohort_size, cohort_dir, seed=0)
        if not (models_dir / "fusion" / "metadata.json").is_file():
            console.print("training the image, EMR, fusion and Wisconsin models")
            train_all(cohort_dir, models_dir, seed=0)
        reports = validate_all(
            models_dir, workdir / "validation", cohort_dir=cohort_dir
        )
        for report in reports:
            console.print(f"validation: {_report_line(report)}")
        exported = export_trained_models(
            models_dir,
            cohort_dir,
            repository,
            seed=0,
            validation_dir=workdir / "validation",
        )
    except (ClinferError, ValueError) as exc:
        _fail(exc)
    _copy_model_cards(exported.models, models_dir, repository)
    console.print(
        f"multimodal version {exported.composition_version} published in {repository}"
    )
    _run_score(
        [cohort_dir / "dicom"],
        workdir / "cohort-scores",
        [],
        None,
        "multimodal",
        repository,
        DEFAULT_BATCH_SIZE,
        2,
        False,
        64,
        emr_csv=cohort_dir / EMR_CSV_NAME,
        dicom_out=workdir / "cohort-scores" / "dicom",
    )


def _copy_model_cards(exports: dict, models_dir: Path, repository: Path) -> None:
    """Copy each trained model's card into the version folder it was published as."""
    import shutil

    for name, model_export in exports.items():
        if model_export.version is None:
            continue
        version_dir = repository / name / str(model_export.version)
        for card in ("model_card.md", "model_card.json"):
            source = models_dir / name / card
            if source.is_file() and version_dir.is_dir():
                shutil.copyfile(source, version_dir / card)


def _report_line(report: ValidationReport) -> str:
    """Return one line naming a validation report's model, decision and folder."""
    return f"{report.model_name} {report.overall} ({report.directory / 'report.md'})"


@app.command()
def corpus() -> None:
    """Print the folders of the bundled DICOM corpus (pydicom and pydicom-data files)."""
    from clinfer.corpus import corpus_dirs

    for folder in corpus_dirs():
        print(folder)


def _run_score(
    paths: list[Path],
    out: Path,
    urls: list[str],
    ray_address: str | None,
    model: str,
    repository: Path,
    batch_size: int,
    infer_actors: int,
    strict: bool,
    commit_every: int,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    emr_csv: Path | None = None,
    dicom_out: Path | None = None,
) -> JobSummary:
    from clinfer.client.triton import parse_model_ref
    from clinfer.server import EmbeddedTritonServer
    from clinfer.workers.pipeline import JobOptions, run_job

    try:
        name, version = parse_model_ref(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    for path in paths:
        if not Path(path).exists():
            raise typer.BadParameter(
                f"{path} does not exist; give DICOM files or folders to score.",
                param_hint="PATHS",
            )
    for url in urls:
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter(
                f"{url!r} is not HOST:PORT; give the gRPC address of a Triton server, "
                "for example 127.0.0.1:8001.",
                param_hint="--triton-url",
            )
    server = None
    if not urls:
        server = EmbeddedTritonServer(
            repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            log_file=out / "tritonserver.log",
        )
    options = JobOptions(
        paths=[str(p) for p in paths],
        out_dir=out,
        triton_urls=urls,
        model=name,
        version=version,
        ray_address=ray_address,
        batch_size=batch_size,
        infer_actors=infer_actors,
        strict=strict,
        flush_every=commit_every,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        emr_csv=emr_csv,
        dicom_out=dicom_out,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        label = {"scan": "reading headers", "score": "scoring instances"}[stage]
        if stage not in tasks:
            tasks[stage] = progress.add_task(label, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        if server is not None:
            server.start()
            options.triton_urls = [server.grpc_url]
        with progress:
            summary = run_job(options, report)
    except ClinferError as exc:
        _fail(exc)
    finally:
        if server is not None:
            server.stop()
    _print_summary(summary, out)
    return summary


def _print_summary(summary, out: Path) -> None:  # type: ignore[no-untyped-def]
    table = Table(
        title=f"clinfer job {summary.job_id}: {summary.model}:{summary.model_version}"
        f" (sha256 {summary.model_sha256[:12]})"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("files found", summary.files_found),
        ("files unchanged since an earlier run", summary.files_unchanged),
        ("instances scored in this run", summary.instances_scored),
        ("frames scored in this run", summary.frames_scored),
        ("studies in store", summary.total_studies),
        ("series in store", summary.total_series),
        ("instances in store", summary.total_instances),
    ]
    for reason, count in sorted(summary.failed.items()):
        rows.append((f"failed: {reason}", count))
    for reason, count in sorted(summary.skipped.items()):
        rows.append((f"skipped: {reason}", count))
    rows += [
        ("throughput (instances/s)", f"{summary.instances_per_s:.1f}"),
        ("throughput (frames/s)", f"{summary.frames_per_s:.1f}"),
        ("wall time (s)", f"{summary.wall_s:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    if summary.model_training:
        Console().print(f"model training: {summary.model_training}")
    Console().print(
        f"results: {out / 'results.sqlite'} (tables instances, studies, failures)"
    )


def _fail(exc: BaseException) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


# Modules that add commands to the CLI through a ``register(app)`` function.
COMMAND_MODULES = (
    "clinfer.train.cli",
    "clinfer.client.cli",
    "clinfer.monitoring.cli",
    "clinfer.export.cli",
    "clinfer.bench.cli",
    "clinfer.validation.cli",
    "clinfer.gateway.cli",
)


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a module that is absent from this installation is skipped; an
            # import error inside an existing module propagates.
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.register(app)


_register_commands()
