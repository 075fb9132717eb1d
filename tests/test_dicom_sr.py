"""Results go back as DICOM: one TID 1500 Comprehensive 3D SR per scored DICOM study, in
the study it reports on, valid for dicom3tools' dciodvfy, and read back to the figures
bonexray stored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from bonexray.export.cheap import write_cheap_model  # noqa: E402
from tests.cli_helpers import bonexray  # noqa: E402
from tests.test_dicom_studies import PATIENT_ID, archive  # noqa: E402

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def dciodvfy() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is missing: .ci/run installs it")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return found


def content_items(ds: Any) -> list[Any]:
    """Every content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out


def concept(item: Any) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


@pytest.fixture
def scored(tmp_path: Path) -> dict[str, Any]:
    a = archive(tmp_path / "archive")
    model = write_cheap_model(tmp_path / "cheap.onnx", image_size=32)
    env = {"BONEXRAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    bonexray("run", str(tmp_path / "archive"), "--model", model, "--json", env=env)
    rows = json.loads(bonexray("results", "--json", env=env).stdout)
    models = json.loads(bonexray("models", "list", "--json", env=env).stdout)
    return {**a, "env": env, "results": {r["study"]: r for r in rows}, "model": models[0]}


def test_each_scored_dicom_study_gets_a_valid_sr_in_its_own_study(scored: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    validator = dciodvfy()
    out = tmp_path / "sr"
    done = json.loads(bonexray("export-dicom", "--out", str(out), "--json",
                               env=scored["env"]).stdout)
    u1, u2 = scored["u1"], scored["u2"]
    # Three scored DICOM studies; the unreadable file and the image folder get none.
    assert (done["written"], done["failed"], done["not_dicom"]) == (3, 0, 2)
    by_key = {}
    for path in done["files"]:
        check = subprocess.run([validator, path], capture_output=True, text=True, check=False)
        errors = [line for line in (check.stdout + check.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], path
        sr = pydicom.dcmread(path)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and Path(path).parent.name == \
            sr.StudyInstanceUID
        items = content_items(sr)
        part = next(str(i.ConceptCodeSequence[0].CodeMeaning) for i in items
                    if concept(i) == "Finding Site")
        by_key[f"{sr.StudyInstanceUID}/{part.split()[0].lower()}"] = (sr, items)
    assert set(by_key) == {f"{u1}/hand", f"{u2}/wrist", f"{u2}/hand"}
    for key, (sr, items) in by_key.items():
        result = scored["results"][key]
        assert sr.PatientID == PATIENT_ID  # the patient module is copied from the views
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        value = next(i for i in items if concept(i) == "Probability of abnormality")
        assert float(value.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            result["score"], abs=1e-6)
        finding = next(i for i in items if concept(i) == "Finding")
        assert finding.ConceptCodeSequence[0].CodeValue == (
            "263654008" if result["prediction"] == "abnormal" else "17621005")
        assert next(str(i.TextValue) for i in items
                    if concept(i) == "Algorithm Name") == scored["model"]["model"]
        assert next(str(i.TextValue) for i in items
                    if concept(i) == "Algorithm Version") == scored["model"]["sha256"]
        # Every view the score came from is a source image; the failed one is not.
        sources = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in items
                   if i.ValueType == "IMAGE"}
        scored_views = {pydicom.dcmread(v["source"], stop_before_pixels=True).SOPInstanceUID
                        for v in result["views"] if v["error"] is None}
        assert sources == scored_views
        evidence = {str(ref.ReferencedSOPInstanceUID)
                    for item in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in item.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence}
        assert evidence == scored_views
    assert len(by_key[f"{u2}/wrist"][1]) and scored["results"][f"{u2}/wrist"]["partial"]


def test_a_study_whose_files_are_gone_is_reported_and_the_rest_written(
        scored: dict[str, Any], tmp_path: Path) -> None:
    os.remove(scored["wrist"])
    done = json.loads(bonexray("export-dicom", "--out", str(tmp_path / "sr"), "--json",
                               env=scored["env"]).stdout)
    assert (done["written"], done["failed"]) == (2, 1)
    assert "cannot read view w.dcm again" in next(iter(done["errors"].values()))


def test_an_sr_built_again_has_the_same_uids_and_stow_answers_are_read_per_instance(
        scored: dict[str, Any], tmp_path: Path) -> None:
    """A resend after a lost answer replaces the SR in the PACS instead of adding one."""
    from bonexray.delivery import _stow_stored

    first = json.loads(bonexray("export-dicom", "--out", str(tmp_path / "a"), "--json",
                                env=scored["env"]).stdout)
    second = json.loads(bonexray("export-dicom", "--out", str(tmp_path / "b"), "--json",
                                 env=scored["env"]).stdout)
    uids = [sorted(Path(f).name for f in run["files"]) for run in (first, second)]
    assert uids[0] == uids[1] and len(set(uids[0])) == 3
    answer = {"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.4"]}}]}}
    assert _stow_stored(json.dumps(answer).encode()) == {"1.2.3"}
    assert _stow_stored(b"") is None and _stow_stored(b"<html>") is None
