"""End-to-end scoring job on the real corpus, real Ray and a real Triton server."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
import tritonclient.grpc as triton_grpc
from clinfer.workers import reasons
from clinfer.workers.discovery import discover_files
from clinfer.workers.pipeline import RESULTS_FILE, JobOptions, JobSummary, run_job
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

from clinfer.corpus import corpus_dirs, find_test_file
from clinfer.server import EmbeddedTritonServer


def _run(paths: list[Path], out: Path, urls: list[str], **kwargs: object) -> JobSummary:
    options = JobOptions(
        paths=[str(p) for p in paths], out_dir=out, triton_urls=urls, model="cxr_resnet",
        **kwargs,  # type: ignore[arg-type]
    )
    return run_job(options)


def _rows(out: Path, query: str) -> list[tuple]:
    with sqlite3.connect(out / RESULTS_FILE) as db:
        return db.execute(query).fetchall()


@pytest.fixture(scope="module")
def corpus_job(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, JobSummary]:
    out = tmp_path_factory.mktemp("corpus_job")
    summary = _run(corpus_dirs(), out, [triton_server.grpc_url])
    return out, summary


def test_corpus_every_file_accounted(corpus_job: tuple[Path, JobSummary]) -> None:
    out, summary = corpus_job
    files = {f.path for f in discover_files(corpus_dirs())}
    scored = {p for (p,) in _rows(out, "SELECT path FROM instances")}
    rejected = {p for (p,) in _rows(out, "SELECT path FROM failures")}
    assert scored.isdisjoint(rejected)
    assert scored | rejected == files


def test_corpus_counts_add_up(corpus_job: tuple[Path, JobSummary]) -> None:
    _, summary = corpus_job
    rejected = sum(summary.failed.values()) + sum(summary.skipped.values())
    assert summary.instances_scored + rejected == summary.files_found


def test_corpus_scores_most_images(corpus_job: tuple[Path, JobSummary]) -> None:
    _, summary = corpus_job
    # 59 of the 244 corpus files are single-channel images with distinct UIDs
    # (pydicom 3.0.2 and pydicom-data 1.0.0).
    assert summary.instances_scored >= 50
    assert summary.total_studies >= 20


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "MR2_J2KR.dcm", "JPEG2000.dcm",
     "emri_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "liver.dcm"],
)
def test_corpus_known_image_scored_or_duplicate(
    corpus_job: tuple[Path, JobSummary], name: str
) -> None:
    out, _ = corpus_job
    path = str(find_test_file(name))
    scored = _rows(out, f"SELECT COUNT(*) FROM instances WHERE path = '{path}'")[0][0]
    duplicate = _rows(
        out,
        f"SELECT COUNT(*) FROM failures WHERE path = '{path}' AND reason = "
        f"'{reasons.DUPLICATE_INSTANCE}'",
    )[0][0]
    assert scored + duplicate == 1


def test_corpus_failure_reasons_known(corpus_job: tuple[Path, JobSummary]) -> None:
    out, _ = corpus_job
    for outcome, reason, message in _rows(out, "SELECT outcome, reason, message FROM failures"):
        assert reasons.outcome_of(reason) == outcome
        assert message


def test_corpus_dicomdir_skipped(corpus_job: tuple[Path, JobSummary]) -> None:
    _, summary = corpus_job
    assert summary.skipped.get(reasons.DICOMDIR, 0) >= 1


def test_corpus_colour_skipped(corpus_job: tuple[Path, JobSummary]) -> None:
    out, _ = corpus_job
    path = str(find_test_file("SC_rgb.dcm"))
    rows = _rows(out, f"SELECT outcome, reason FROM failures WHERE path = '{path}'")
    assert rows == [(reasons.SKIPPED, reasons.IMAGE_TYPE_NOT_ACCEPTED)]


def test_corpus_multiframe_scored_per_frame(corpus_job: tuple[Path, JobSummary]) -> None:
    out, _ = corpus_job
    path = str(find_test_file("emri_small.dcm"))
    ((num_frames, frame_scores),) = _rows(
        out, f"SELECT num_frames, frame_scores_json FROM instances WHERE path = '{path}'"
    )
    assert num_frames == pydicom.dcmread(path).NumberOfFrames
    assert len(json.loads(frame_scores)) == num_frames


def test_corpus_study_rows_aggregate(corpus_job: tuple[Path, JobSummary]) -> None:
    out, _ = corpus_job
    mismatched = _rows(
        out,
        "SELECT s.study_instance_uid FROM studies s JOIN (SELECT study_instance_uid, "
        "MAX(score) AS score, COUNT(*) AS n FROM instances GROUP BY study_instance_uid) i "
        "USING (study_instance_uid) WHERE s.score != i.score OR s.num_instances != i.n",
    )
    assert mismatched == []


def test_corpus_rows_name_model_version(corpus_job: tuple[Path, JobSummary]) -> None:
    out, summary = corpus_job
    rows = set(_rows(out, "SELECT model_name, model_version, model_sha256 FROM instances"))
    assert rows == {("cxr_resnet", "1", summary.model_sha256)}


def test_corpus_preprocessing_recorded(corpus_job: tuple[Path, JobSummary]) -> None:
    out, _ = corpus_job
    for (settings,) in _rows(out, "SELECT preprocessing_json FROM instances LIMIT 20"):
        assert "voi" in json.loads(settings)


def test_results_match_in_process_onnx(
    corpus_job: tuple[Path, JobSummary], model_repository: Path
) -> None:
    out, _ = corpus_job
    session = ort.InferenceSession(
        str(model_repository / "cxr_resnet" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    config = PreprocessConfig(height=224, width=224)
    rows = _rows(out, "SELECT path, frame_scores_json FROM instances ORDER BY path")
    rng = np.random.default_rng()
    sample = [rows[i] for i in rng.choice(len(rows), size=min(25, len(rows)), replace=False)]
    for path, frame_scores in sample:
        frames = load_and_preprocess(path, config).frames
        (probabilities,) = session.run(None, {"image": frames})
        np.testing.assert_allclose(
            probabilities[:, 1], json.loads(frame_scores), atol=1e-5, err_msg=path
        )


def test_rerun_scores_nothing_new(
    corpus_job: tuple[Path, JobSummary], triton_server: EmbeddedTritonServer
) -> None:
    out, first = corpus_job
    second = _run(corpus_dirs(), out, [triton_server.grpc_url])
    assert second.instances_scored == 0
    assert second.total_instances == first.total_instances
    # Failed files and copies of an instance (duplicates) are read again.
    read_again = sum(first.failed.values()) + first.skipped[reasons.DUPLICATE_INSTANCE]
    assert second.files_unchanged == first.files_found - read_again


def _bad_input_folder(root: Path) -> dict[str, Path]:
    root.mkdir()
    good = root / "good"
    good.mkdir()
    shutil.copy(find_test_file("CT_small.dcm"), good / "ct.dcm")
    shutil.copy(find_test_file("MR_small.dcm"), good / "mr")
    source = find_test_file("CT_small.dcm").read_bytes()
    files = {
        "truncated": root / "truncated.dcm",
        "no_pixels": root / "image_without_pixels.dcm",
        "not_image": root / "plan.dcm",
        "not_dicom": root / "notes.dcm",
        "empty": root / "empty.dcm",
    }
    files["truncated"].write_bytes(source[: len(source) * 2 // 3])
    image = pydicom.dcmread(find_test_file("MR_small.dcm"))
    image.SOPInstanceUID = pydicom.uid.generate_uid()
    del image.PixelData
    image.save_as(files["no_pixels"])
    shutil.copy(find_test_file("rtplan.dcm"), files["not_image"])
    files["not_dicom"].write_text("Patient notes, not a DICOM file.\n" * 20)
    files["empty"].write_bytes(b"")
    return files


def test_bad_inputs_get_reasons(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path: Path
) -> None:
    files = _bad_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    summary = _run([tmp_path / "in"], out, [triton_server.grpc_url])
    got = dict(_rows(out, "SELECT path, reason FROM failures"))
    assert got[str(files["truncated"])] == reasons.TRUNCATED
    assert got[str(files["no_pixels"])] == reasons.NO_PIXEL_DATA
    assert got[str(files["not_image"])] == reasons.NON_IMAGE_OBJECT
    assert got[str(files["not_dicom"])] == reasons.NOT_DICOM
    assert got[str(files["empty"])] == reasons.EMPTY_FILE
    assert summary.instances_scored == 2


def test_two_servers_share_batches(
    triton_server: EmbeddedTritonServer,
    second_triton_server: EmbeddedTritonServer,
    local_ray: None,
    tmp_path: Path,
) -> None:
    def inference_count(server: EmbeddedTritonServer) -> int:
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        stats = client.get_inference_statistics("cxr_resnet", as_json=True)
        client.close()
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    folder = tmp_path / "in"
    folder.mkdir()
    # 12 frames in batches of 4: with two actors, one of them sends at least two
    # batches, and each actor alternates between the servers.
    for name in ("emri_small.dcm", "CT_small.dcm", "MR_small.dcm"):
        shutil.copy(find_test_file(name), folder / name)
    before = [inference_count(s) for s in (triton_server, second_triton_server)]
    summary = _run(
        [folder],
        tmp_path / "out",
        [triton_server.grpc_url, second_triton_server.grpc_url],
        batch_size=4,
    )
    after = [inference_count(s) for s in (triton_server, second_triton_server)]
    assert summary.instances_scored > 0
    assert after[0] > before[0]
    assert after[1] > before[1]


CLINFER = str(Path(__import__("sys").executable).with_name("clinfer"))


def _instance_count(out: Path) -> int:
    try:
        return _rows(out, "SELECT COUNT(*) FROM instances")[0][0]
    except sqlite3.OperationalError:  # the job has not created the tables yet
        return 0


def test_killed_job_resumes_exactly_once(
    corpus_job: tuple[Path, JobSummary], triton_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import time

    reference_out, reference = corpus_job
    out = tmp_path / "out"
    command = [CLINFER, "score", *map(str, corpus_dirs()), "--out", str(out),
               "--triton-url", triton_server.grpc_url, "--batch-size", "1",
               "--commit-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while _instance_count(out) < 5 and time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = _instance_count(out)
    assert 0 < partial < reference.total_instances

    subprocess.run(command, check=True, capture_output=True, timeout=600)
    ((summary_json,),) = _rows(out, "SELECT summary_json FROM jobs WHERE status = "
                                    "'completed' ORDER BY started_at DESC LIMIT 1")
    rerun = json.loads(summary_json)
    uids = _rows(out, "SELECT sop_instance_uid FROM instances")
    expected = _rows(reference_out, "SELECT sop_instance_uid FROM instances")
    assert len(uids) == len(set(uids))
    assert set(uids) == set(expected)
    assert partial + rerun["instances_scored"] == len(expected)


def test_corpus_duplicate_scored_when_first_fails(
    corpus_job: tuple[Path, JobSummary],
) -> None:
    # JPEG-lossy.dcm and JPGExtended.dcm share a SOPInstanceUID; the first one in
    # path order does not decode, so the other copy is scored.
    out, _ = corpus_job
    lossy = str(find_test_file("JPEG-lossy.dcm"))
    extended = str(find_test_file("JPGExtended.dcm"))
    # After the first run JPEG-lossy.dcm has failed; a rerun finds it a duplicate of
    # the scored copy.
    rejected = _rows(out, f"SELECT reason FROM failures WHERE path = '{lossy}'")
    scored = _rows(out, f"SELECT COUNT(*) FROM instances WHERE path = '{extended}'")
    assert rejected in ([(reasons.DECODE_FAILED,)], [(reasons.DUPLICATE_INSTANCE,)])
    assert scored == [(1,)]


def test_moved_file_keeps_its_result(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(find_test_file("CT_small.dcm"), folder / "a.dcm")
    out = tmp_path / "out"
    _run([folder], out, [triton_server.grpc_url])
    (folder / "a.dcm").rename(folder / "b.dcm")
    summary = _run([folder], out, [triton_server.grpc_url])
    assert summary.instances_scored == 0
    assert _rows(out, "SELECT path FROM instances") == [(str(folder / "b.dcm"),)]


def test_copied_file_is_duplicate(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(find_test_file("CT_small.dcm"), folder / "a.dcm")
    out = tmp_path / "out"
    _run([folder], out, [triton_server.grpc_url])
    shutil.copy(folder / "a.dcm", folder / "copy.dcm")
    _run([folder], out, [triton_server.grpc_url])
    rows = _rows(out, "SELECT path, reason FROM failures")
    assert rows == [(str(folder / "copy.dcm"), reasons.DUPLICATE_INSTANCE)]


def test_rewritten_file_drops_old_result(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "a.dcm"
    shutil.copy(find_test_file("CT_small.dcm"), path)
    out = tmp_path / "out"
    _run([folder], out, [triton_server.grpc_url])
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    _run([folder], out, [triton_server.grpc_url])
    rows = _rows(out, "SELECT sop_instance_uid FROM instances")
    assert rows == [(ds.SOPInstanceUID,)]


def test_unreachable_server_left_out(
    triton_server: EmbeddedTritonServer, local_ray: None, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(find_test_file("CT_small.dcm"), folder / "a.dcm")
    summary = _run([folder], tmp_path / "out", ["127.0.0.1:1", triton_server.grpc_url])
    assert summary.instances_scored == 1


def test_unknown_model_names_served_ones(
    triton_server: EmbeddedTritonServer, tmp_path: Path
) -> None:
    from clinfer.errors import ModelSpecError

    options = JobOptions(
        paths=[str(tmp_path)], out_dir=tmp_path / "out",
        triton_urls=[triton_server.grpc_url], model="nosuch",
    )
    with pytest.raises(ModelSpecError, match="cxr_resnet"):
        run_job(options)
