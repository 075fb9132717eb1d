"""DICOM files become studies from their headers: by StudyInstanceUID and body part,
wherever they lie, each object once, non-radiographs left out and counted; no PHI in SQL."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from sqlalchemy import inspect, select, text  # noqa: E402

from bonexray.db.session import open_database, session_scope  # noqa: E402
from bonexray.db.tables import Study, View  # noqa: E402
from bonexray.dicom import CR, DX_FOR_PRESENTATION  # noqa: E402
from bonexray.dicom_studies import body_part_of, patient_hash  # noqa: E402
from bonexray.export.cheap import write_cheap_model  # noqa: E402
from bonexray.studies import scan_studies  # noqa: E402
from tests.cli_helpers import bonexray  # noqa: E402
from tests.test_dicom import DX_FOR_PROCESSING, SR, dataset, phantom  # noqa: E402

PATIENT_ID, PATIENT_NAME, BIRTH_DATE = "MRN-4711-X", "Doe^Jane", "19610203"


def radiograph(study_uid: str, *, sop: str = CR, part: str | None = "HAND",
               **elements: Any) -> Dataset:
    ds = dataset(phantom(), sop=sop, **elements)
    ds.StudyInstanceUID = study_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = PATIENT_ID, PATIENT_NAME, BIRTH_DATE
    ds.AccessionNumber = "ACC" + study_uid[-6:]
    if part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = part
    return ds


def save(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def structured_report(study_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SR, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality, ds.PatientID = study_uid, "SR", PATIENT_ID
    ds.SeriesInstanceUID = generate_uid()
    return ds


def archive(root: Path) -> dict[str, Any]:
    """A messy archive: a study spread over folders and sent twice, a study that mixes two
    body parts, an SR and a DX For Processing beside them, a file whose header is cut off,
    and an ordinary image folder."""
    u1, u2 = generate_uid(), generate_uid()
    first = radiograph(u1)
    save(root / "pacs" / "a" / "b" / "IM0001", first)  # no extension: found by the preamble
    second = save(root / "pacs" / "c" / "IM0002.dcm", radiograph(u1))
    save(root / "resend" / "copy_of_IM0001.dcm", first)  # the same object again
    save(root / "pacs" / "a" / "SR0001", structured_report(u1))
    save(root / "pacs" / "c" / "proc.dcm", radiograph(u1, sop=DX_FOR_PROCESSING))
    wrist = save(root / "mixed" / "w.dcm", radiograph(u2, sop=DX_FOR_PRESENTATION,
                                                      part="WRIST"))
    hand = save(root / "mixed" / "h.dcm", radiograph(u2, part=None,
                                                     SeriesDescription="PA hand"))
    cut = root / "mixed" / "cut.dcm"
    cut.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")  # header cut off
    # A whole header, pixel data cut short: grouped with its study, fails at decode.
    short = save(root / "mixed" / "short.dcm", radiograph(u2, sop=DX_FOR_PRESENTATION,
                                                          part="WRIST"))
    short.write_bytes(short.read_bytes()[: -len(phantom().tobytes()) // 2])
    folder = root / "XR_WRIST" / "patient1" / "study1_positive"
    folder.mkdir(parents=True)
    (folder / "image1.png").write_bytes(b"not checked while grouping")
    return {"u1": u1, "u2": u2, "first": first, "second": second, "wrist": wrist,
            "hand": hand, "cut": cut, "short": short, "folder": folder}


def test_a_dicom_tree_is_grouped_by_study_and_body_part(tmp_path: Path) -> None:
    a = archive(tmp_path)
    scan = scan_studies(tmp_path, patient_key="k")
    by_key = {s.key: s for s in scan.studies}
    u1, u2 = a["u1"], a["u2"]
    assert set(by_key) == {f"{u1}/hand", f"{u2}/wrist", f"{u2}/hand", str(a["cut"]),
                           str(a["folder"].resolve())}
    hand = by_key[f"{u1}/hand"]
    # One view per SOPInstanceUID, read from the first of its files in path order.
    assert hand.views == (str((tmp_path / "pacs" / "a" / "b" / "IM0001").resolve()),
                          str(a["second"].resolve()))
    assert sorted(hand.view_uids) == sorted([a["first"].SOPInstanceUID,
                                             pydicom.dcmread(a["second"]).SOPInstanceUID])
    assert (hand.study_uid, hand.accession, hand.body_part) == (u1, "ACC" + u1[-6:], "hand")
    assert hand.patient == patient_hash(PATIENT_ID, "k") and PATIENT_ID not in hand.patient
    assert by_key[f"{u2}/wrist"].views == (str(a["short"].resolve()), str(a["wrist"].resolve()))
    assert by_key[f"{u2}/hand"].views == (str(a["hand"].resolve()),)
    assert by_key[str(a["cut"])].views == (str(a["cut"]),) and \
        by_key[str(a["cut"])].study_uid is None
    # The image folder is a study as before; DICOM-only folders are not empty studies.
    assert by_key[str(a["folder"].resolve())].views[0].endswith("image1.png")
    assert scan.dicom is not None
    assert scan.dicom.not_radiographs == Counter({
        "Comprehensive SR Storage": 1, "Digital X-Ray Image Storage - For Processing": 1})
    assert (scan.dicom.duplicates, scan.dicom.unreadable) == (1, 1)
    assert scan.left_out is not None and "Comprehensive SR Storage" in scan.left_out


def _ds(**elements: Any) -> Dataset:
    ds = Dataset()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def _region(code: str, meaning: str) -> Dataset:
    return _ds(CodeValue=code, CodingSchemeDesignator="SCT", CodeMeaning=meaning)


@pytest.mark.parametrize(("elements", "part"), [
    ({"BodyPartExamined": "WRIST", "SeriesDescription": "hand"}, "wrist"),
    ({"BodyPartExamined": "L WRIST"}, "wrist"),
    ({"BodyPartExamined": "UPPER ARM"}, "humerus"),
    ({"BodyPartExamined": "CSPINE"}, "cspine"),  # kept, not MURA's
    ({"AnatomicRegionSequence": [_region("85562004", "Hand")]}, "hand"),
    ({"AnatomicRegionSequence": [_region("999", "Left elbow")]}, "elbow"),
    ({"SeriesDescription": "Fingers 2 views", "StudyDescription": "XR HAND"}, "finger"),
    ({"SeriesDescription": "Hand and wrist", "StudyDescription": "XR Wrist"}, "wrist"),
    ({"StudyDescription": "Shoulders, both"}, "shoulder"),
    ({"StudyDescription": "Hand and wrist"}, None),  # two parts: neither
    ({"StudyDescription": "Chest PA"}, None),
    ({}, None),
])
def test_body_part_from_the_header_in_order(elements: dict[str, Any], part: str | None) -> None:
    assert body_part_of(_ds(**elements)) == part


def test_patient_ids_are_stored_only_as_a_keyed_hash() -> None:
    assert patient_hash(PATIENT_ID, "") is None and patient_hash(None, "k") is None
    digest = patient_hash(PATIENT_ID, "k")
    assert digest is not None and re.fullmatch(r"[0-9a-f]{32}", digest)
    assert digest == patient_hash(f" {PATIENT_ID} ", "k") != patient_hash(PATIENT_ID, "k2")


def test_a_dicomdir_names_the_files_of_its_studies() -> None:
    dicomdir = Path(get_testdata_file("DICOMDIR"))
    scan = scan_studies(dicomdir, patient_key="")
    cr = [s for s in scan.studies if s.body_part == "cspine"]
    assert len(cr) == 1 and len(cr[0].views) == 3 and cr[0].patient is None
    assert cr[0].key == f"{cr[0].study_uid}/cspine"
    assert all(Path(v).parent.parent.name == "77654033" for v in cr[0].views)
    assert scan.dicom is not None
    assert set(scan.dicom.not_radiographs) == {"CT Image Storage", "MR Image Storage"}
    assert len(scan.studies) == 1  # CT and MR are left out, not studies
    # The folder holding the DICOMDIR gives the same radiograph study.
    folder = scan_studies(dicomdir.parent, patient_key="")
    assert [s.views for s in folder.studies if s.body_part == "cspine"] == [cr[0].views]


def test_run_classifies_a_dicom_archive_and_keeps_no_phi(tmp_path: Path) -> None:
    a = archive(tmp_path / "archive")
    os.remove(a["folder"] / "image1.png")  # DICOM only
    model = write_cheap_model(tmp_path / "cheap.onnx", image_size=32)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    env = {"BONEXRAY_DATABASE_URL": url, "BONEXRAY_PATIENT_KEY": "site-secret"}
    done = bonexray("run", str(tmp_path / "archive"), "--model", model, "--json",
                    env={**env, "BONEXRAY_LOG_LEVEL": "DEBUG"})
    assert "left out 2 DICOM objects" in done.stderr and "Comprehensive SR" in done.stderr
    assert not any(phi in done.stdout + done.stderr for phi in (PATIENT_ID, "Doe", BIRTH_DATE))
    rows = json.loads(bonexray("results", "--json", env=env).stdout)
    by_key = {r["study"]: r for r in rows}
    u1, u2 = a["u1"], a["u2"]
    assert {f"{u1}/hand", f"{u2}/wrist", f"{u2}/hand"} <= set(by_key)
    for key in (f"{u1}/hand", f"{u2}/wrist", f"{u2}/hand"):
        assert by_key[key]["status"] == "done" and by_key[key]["score"] is not None
    # The view whose pixel data is cut short fails; its study is scored from the other.
    wrist = by_key[f"{u2}/wrist"]
    assert wrist["partial"] and [v["error"] is None for v in wrist["views"]] == [False, True]
    assert len(by_key[f"{u1}/hand"]["views"]) == 2
    cut = by_key[str(a["cut"])]
    assert cut["status"] == "failed" and "no SOPClassUID" in cut["views"][0]["error"]
    # The table shows DICOM keys as they are, not as paths relative to the root.
    table = bonexray("results", env=env).stdout
    assert u2[:20] in table
    engine = open_database(url)
    with session_scope(engine) as session:
        study = session.scalars(select(Study).where(Study.key == f"{u1}/hand")).one()
        assert (study.study_uid, study.accession, study.body_part) == (u1, "ACC" + u1[-6:],
                                                                       "hand")
        assert study.patient == patient_hash(PATIENT_ID, "site-secret")
        uids = set(session.scalars(select(View.sop_uid).where(View.study_id == study.id)))
        assert a["first"].SOPInstanceUID in uids and len(uids) == 2
        # No PatientID, name or birth date anywhere in the database.
        for table_name in inspect(engine).get_table_names():
            for row in session.execute(text(f'SELECT * FROM "{table_name}"')):
                dump = " ".join(str(v) for v in row)
                for phi in (PATIENT_ID, "Doe", BIRTH_DATE):
                    assert phi not in dump, (table_name, phi)


def test_decoding_a_view_read_from_a_grouped_study(tmp_path: Path) -> None:
    """The views grouping returns are what load_view decodes: bone bright, right size."""
    from bonexray.imaging import load_view

    a = archive(tmp_path)
    scan = scan_studies(tmp_path, patient_key="")
    views = next(s for s in scan.studies if s.key == f"{a['u2']}/wrist").views
    assert str(a["wrist"].resolve()) in views
    image = load_view(str(a["wrist"].resolve()), 32)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert image[12:20, 6:26].mean() > image[22:28, 6:26].mean() + 40  # the bone bar


def test_a_messy_tree_neither_hangs_nor_crashes_the_scan(tmp_path: Path) -> None:
    """A FIFO is never opened; a header pydicom cannot parse, an over-long UID, a
    multi-valued body part and a file outside the data roots each stay with their study
    or fail as their own, and the scan goes on."""
    from bonexray.settings import get_settings

    u1 = generate_uid()
    save(tmp_path / "a" / "good.dcm", radiograph(u1))
    os.mkfifo(tmp_path / "a" / "pipe")  # opening it would block for ever
    bad_vr = save(tmp_path / "a" / "badvr.dcm", radiograph(u1))
    raw = bad_vr.read_bytes()
    # PatientID (0010,0020) with an unknown VR "LX": pydicom raises NotImplementedError.
    at = raw.index(b"\x10\x00\x20\x00LO")
    bad_vr.write_bytes(raw[:at] + b"\x10\x00\x20\x00LX" + raw[at + 6:])
    long_uid = "1.2." + "9" * 80  # not a UID a column can hold
    save(tmp_path / "b" / "long.dcm", radiograph(long_uid, part=None))
    multi = radiograph(u1, part=None)
    multi.BodyPartExamined = ["HAND", "WRIST"]
    save(tmp_path / "a" / "multi.dcm", multi)
    outside = save(tmp_path.parent / f"{tmp_path.name}-outside" / "x.dcm", radiograph(u1))
    os.symlink(outside, tmp_path / "a" / "link.dcm")
    os.environ["BONEXRAY_DATA_ROOTS"] = str(tmp_path)
    get_settings.cache_clear()
    try:
        scan = scan_studies(tmp_path, patient_key="")
    finally:
        del os.environ["BONEXRAY_DATA_ROOTS"]
        get_settings.cache_clear()
    by_key = {s.key: s for s in scan.studies}
    # A PatientID pydicom cannot parse: the object keeps its study (no patient hash).
    assert by_key[f"{u1}/hand"].views == (str(bad_vr.resolve()),
                                          str((tmp_path / "a" / "good.dcm").resolve()))
    assert by_key[u1].views == (str((tmp_path / "a" / "multi.dcm").resolve()),)  # two parts
    long = by_key[long_uid]
    assert long.study_uid is None and long.view_uids == (
        pydicom.dcmread(tmp_path / "b" / "long.dcm").SOPInstanceUID,)
    link = str(tmp_path.resolve() / "a" / "link.dcm")
    assert by_key[link].views == (link,)  # not read: outside the roots
    assert not any("pipe" in k for k in by_key)


def test_damaged_headers_say_why_without_quoting_their_bytes(tmp_path: Path) -> None:
    from bonexray.dicom import safe_reason
    from bonexray.dicom_studies import read_header
    from bonexray.imaging import ImageError

    path = save(tmp_path / "x.dcm", radiograph(generate_uid()))
    raw = path.read_bytes()
    # SOPClassUID, in the dataset and in the file meta, with a VR pydicom cannot read.
    for tag in (b"\x08\x00\x16\x00", b"\x02\x00\x02\x00"):
        at = raw.index(tag + b"UI")
        raw = raw[:at] + tag + b"LX" + raw[at + 6:]
    path.write_bytes(raw)
    with pytest.raises(ImageError, match="no SOPClassUID") as caught:
        read_header(str(path))
    assert PATIENT_ID not in str(caught.value)
    # Readers' messages quote raw header bytes: those are cut out of the reason.
    quoted = ValueError(f"bad value b'\\x10\\x00 {PATIENT_ID}' at (0010,0020)\nmore")
    reason = safe_reason(quoted)
    assert PATIENT_ID not in reason and reason.startswith("ValueError: bad value")
    assert "\n" not in reason
