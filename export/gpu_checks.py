"""GPU checks in one go: build TensorRT fp16 engines and compare them with ONNX Runtime.

Run on a machine with a CUDA GPU, the ``tensorrt`` package and CUDA-enabled torch::

    python -m clinfer.export.gpu_checks --models MODELS --cohort COHORT

For every trained model it exports ONNX (with the fp32 parity gates), builds an fp16
engine, and prints max abs diff and the held-out AUROC under ONNX Runtime and
TensorRT. It exits 0 when every engine is within the AUROC tolerance, 1 when one is
not, and 3 with a message when TensorRT or a GPU is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from clinfer.export import tensorrt_engine

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3


def run_checks(models: Path, cohort: Path, max_batch_size: int) -> list:
    """Build and check one engine per model; return the ``TensorRtResult`` list.

    Raises
    ------
    clinfer.errors.ClinferError
        If a model, the cohort, an export or an engine build fails.
    """
    from clinfer.export.multimodal import (
        build_plans,
        cohort_inputs,
        export_and_gate,
        real_inputs,
    )

    plans = build_plans(models)
    real = real_inputs(plans, cohort_inputs(cohort))
    results = []
    with tempfile.TemporaryDirectory(prefix="clinfer-gpu-checks-") as tmp:
        for name, plan in plans.items():
            export = export_and_gate(plan, Path(tmp) / f"{name}.onnx", real[name])
            engine = tensorrt_engine.build_engine(
                export.onnx_path,
                Path(tmp) / f"{name}.plan",
                plan.inputs,
                max_batch_size=max_batch_size,
            )
            results.append(
                tensorrt_engine.check_engine(
                    name,
                    export.onnx_path,
                    engine,
                    real[name].batches,
                    real[name].labels,
                )
            )
    return results


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print a table; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m clinfer.export.gpu_checks")
    parser.add_argument(
        "--models", type=Path, required=True, help="clinfer train output"
    )
    parser.add_argument("--cohort", type=Path, required=True, help="training cohort")
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    reason = tensorrt_engine.tensorrt_unavailable_reason()
    if reason:
        print(
            f"GPU checks not run: {reason}. Run this on a machine with a CUDA GPU, "
            "the tensorrt package and CUDA-enabled torch.",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE

    results = run_checks(args.models, args.cohort, args.max_batch_size)
    header = f"{'model':<24} {'status':<8} {'max abs diff':>12} {'AUROC ORT':>10} "
    print(header + f"{'AUROC TRT':>10} {'delta':>8}")
    for result in results:
        print(
            f"{result.model:<24} {result.status:<8} "
            f"{_format(result.max_abs_diff, '.3g'):>12} "
            f"{_format(result.auroc_onnx, '.4f'):>10} "
            f"{_format(result.auroc_tensorrt, '.4f'):>10} "
            f"{_format(result.auroc_delta, '+.4f'):>8}"
        )
    failed = [r for r in results if r.status != tensorrt_engine.PASSED]
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
