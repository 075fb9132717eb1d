"""Tests for finding studies in folders (bonexray.studies)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.studies import Study, StudyError, describe_path, find_studies


def _view(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), 128, dtype=np.uint8)).save(path, format="PNG")
    return path


def _by_name(studies: list[Study], root: Path) -> dict[str, Study]:
    return {Path(s.key).relative_to(root.resolve()).as_posix(): s for s in studies}


@pytest.fixture
def mura(tmp_path: Path) -> Path:
    root = tmp_path / "MURA-v1.1"
    for rel in (
        "train/XR_WRIST/patient00001/study1_positive/image1.png",
        "train/XR_WRIST/patient00001/study1_positive/image2.png",
        "train/XR_WRIST/patient00001/study2_negative/image1.png",
        "train/XR_ELBOW/patient00002/study1_negative/image1.png",
        "valid/XR_SHOULDER/patient11185/study1_positive/image1.png",
        "valid/XR_SHOULDER/patient11185/study1_positive/image3.png",
    ):
        _view(root / rel)
    return root


def test_mura_layout(mura: Path) -> None:
    studies = find_studies(mura)
    assert [s.key for s in studies] == sorted(s.key for s in studies)
    found = _by_name(studies, mura)
    assert sorted(found) == [
        "train/XR_ELBOW/patient00002/study1_negative",
        "train/XR_WRIST/patient00001/study1_positive",
        "train/XR_WRIST/patient00001/study2_negative",
        "valid/XR_SHOULDER/patient11185/study1_positive",
    ]
    wrist = found["train/XR_WRIST/patient00001/study1_positive"]
    assert wrist.label == 1 and wrist.body_part == "wrist"
    assert wrist.patient == "00001" and wrist.split == "train"
    assert wrist.views == tuple(str(mura.resolve() / "train/XR_WRIST/patient00001/"
                                    f"study1_positive/image{k}.png") for k in (1, 2))
    assert all(os.path.isabs(v) for s in studies for v in s.views)
    assert os.path.isabs(wrist.key)
    elbow = found["train/XR_ELBOW/patient00002/study1_negative"]
    assert (elbow.label, elbow.body_part, elbow.patient) == (0, "elbow", "00002")
    shoulder = found["valid/XR_SHOULDER/patient11185/study1_positive"]
    assert (shoulder.split, shoulder.body_part, len(shoulder.views)) == ("valid", "shoulder", 2)


def test_describe_path_is_case_insensitive() -> None:
    info = describe_path("/data/Valid/xr_Hand/Patient123/study3_POSITIVE")
    assert info == {"body_part": "hand", "patient": "123", "label": 1, "split": "valid"}
    assert describe_path("/data/scans/today")["label"] is None


def _write_csvs(mura: Path) -> None:
    name = mura.name
    (mura / "train_labeled_studies.csv").write_text(
        f"{name}/train/XR_WRIST/patient00001/study1_positive/,1\n"
        f"{name}/train/XR_WRIST/patient00001/study2_negative/,0\n"
        f"{name}/train/XR_ELBOW/patient00002/study1_negative/,0\n"
        # No suffix on disk: only the CSV knows this label.
        f"{name}/train/XR_HAND/patient00003/study1/,1\n"
    )
    (mura / "train_image_paths.csv").write_text(
        f"{name}/train/XR_WRIST/patient00001/study1_positive/image1.png\n"
        f"{name}/train/XR_WRIST/patient00001/study1_positive/image2.png\n"
        # Listed, but missing on disk: still one of the study's views (it fails at decode).
        f"{name}/train/XR_WRIST/patient00001/study1_positive/image3.png\n"
        f"{name}/train/XR_HAND/patient00003/study1/image1.png\n"
    )
    (mura / "valid_labeled_studies.csv").write_text(
        f"{name}/valid/XR_SHOULDER/patient11185/study1_positive/,1\n"
    )
    (mura / "valid_image_paths.csv").write_text(
        f"{name}/valid/XR_SHOULDER/patient11185/study1_positive/image1.png\n"
        f"{name}/valid/XR_SHOULDER/patient11185/study1_positive/image3.png\n"
    )


@pytest.mark.parametrize("from_parent", [False, True])
def test_mura_csvs(mura: Path, from_parent: bool) -> None:
    _view(mura / "train/XR_HAND/patient00003/study1/image1.png")
    _write_csvs(mura)
    root = mura.parent if from_parent else mura
    found = _by_name(find_studies(root), mura)
    assert len(found) == 5
    hand = found["train/XR_HAND/patient00003/study1"]
    assert hand.label == 1 and hand.body_part == "hand" and hand.patient == "00003"
    wrist = found["train/XR_WRIST/patient00001/study1_positive"]
    assert [Path(v).name for v in wrist.views] == ["image1.png", "image2.png", "image3.png"]
    assert not Path(wrist.views[2]).exists()
    assert found["valid/XR_SHOULDER/patient11185/study1_positive"].label == 1
    assert found["train/XR_WRIST/patient00001/study2_negative"].label == 0


def test_csv_label_wins_over_the_folder_name(mura: Path) -> None:
    (mura / "train_labeled_studies.csv").write_text(
        f"{mura.name}/train/XR_ELBOW/patient00002/study1_negative/,1\n"
    )
    found = _by_name(find_studies(mura), mura)
    assert found["train/XR_ELBOW/patient00002/study1_negative"].label == 1
    assert found["train/XR_WRIST/patient00001/study2_negative"].label == 0


def test_csv_with_bom_and_malformed_rows(mura: Path) -> None:
    (mura / "train_labeled_studies.csv").write_text(
        "\ufeff" + f"{mura.name}/train/XR_ELBOW/patient00002/study1_negative/,1\n"
        "\nnot a row\nsomething,maybe\n",
        encoding="utf-8",
    )
    found = _by_name(find_studies(mura), mura)
    assert found["train/XR_ELBOW/patient00002/study1_negative"].label == 1
    assert len(found) == 4


def test_plain_folder_of_images_is_one_study(tmp_path: Path) -> None:
    _view(tmp_path / "a.png")
    _view(tmp_path / "b.jpg")
    studies = find_studies(tmp_path)
    assert len(studies) == 1
    study = studies[0]
    assert study.key == str(tmp_path.resolve())
    assert [Path(v).name for v in study.views] == ["a.png", "b.jpg"]
    assert study.label is None and study.patient is None and study.body_part is None


def test_nested_plain_folders(tmp_path: Path) -> None:
    _view(tmp_path / "ward 1" / "x.png")
    _view(tmp_path / "ward 2" / "bed 3" / "y.png")
    _view(tmp_path / "ward 2" / "bed 4" / "z.png")
    _view(tmp_path / "ward 2" / "bed 4" / "deeper" / "w.png")
    found = _by_name(find_studies(tmp_path), tmp_path)
    # "ward 2" holds only folders: not a study. "bed 4" holds views and a folder: both are.
    assert sorted(found) == ["ward 1", "ward 2/bed 3", "ward 2/bed 4", "ward 2/bed 4/deeper"]
    assert [Path(v).name for v in found["ward 2/bed 4"].views] == ["z.png"]


def test_empty_leaf_folder_is_an_empty_study(tmp_path: Path) -> None:
    _view(tmp_path / "full" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-notes").mkdir()
    (tmp_path / "only-notes" / "readme.txt").write_text("no views here")
    found = _by_name(find_studies(tmp_path), tmp_path)
    assert sorted(found) == ["empty", "full", "only-notes"]
    assert found["empty"].is_empty and found["empty"].views == ()
    assert found["only-notes"].is_empty
    assert not found["full"].is_empty


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    study = tmp_path / "study"
    _view(study / "image1.png")
    _view(study / ".image2.png")
    _view(study / "._image1.png")
    (study / "notes.txt").write_text("x")
    (study / "scan.dcm").write_bytes(b"DICM")
    (study / "Thumbs.db").write_bytes(b"x")
    _view(tmp_path / ".cache" / "thumb.png")
    _view(study / ".git" / "x.png")
    found = _by_name(find_studies(tmp_path), tmp_path)
    # A file named DICOM is never ignored: unreadable, it is a study of its own that will
    # fail with its reason (bonexray.dicom_studies).
    assert sorted(found) == ["study", "study/scan.dcm"]
    assert [Path(v).name for v in found["study"].views] == ["image1.png"]
    assert found["study/scan.dcm"].views == (str(study.resolve() / "scan.dcm"),)


def test_upper_case_extensions(tmp_path: Path) -> None:
    for name in ("A.PNG", "b.JPG", "c.Jpeg", "d.jpeg"):
        _view(tmp_path / "s" / name)
    (tmp_path / "s" / "e.TXT").write_text("x")
    studies = find_studies(tmp_path)
    assert [Path(v).name for v in studies[0].views] == ["A.PNG", "b.JPG", "c.Jpeg", "d.jpeg"]


def test_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    folder = tmp_path / "Müller, Jürgen" / "XR_WRIST" / "patient 0007 é" / "étude 1_positive"
    _view(folder / "vue 1 – face.png")
    _view(folder / "画像2.jpg")
    studies = find_studies(tmp_path)
    assert len(studies) == 1
    study = studies[0]
    assert study.key == str(folder.resolve())
    assert sorted(Path(v).name for v in study.views) == ["vue 1 – face.png", "画像2.jpg"]
    assert all(Path(v).is_file() for v in study.views)
    assert study.label == 1 and study.body_part == "wrist" and study.patient == " 0007 é"


def test_symlinked_folder_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _view(root / "real" / "a.png")
    outside = tmp_path / "outside"
    _view(outside / "secret.png")
    os.symlink(outside, root / "link-out")
    os.symlink(root / "real", root / "link-in")
    found = _by_name(find_studies(root), root)
    assert sorted(found) == ["real"]
    assert all("secret" not in v for s in found.values() for v in s.views)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="not found") as info:
        find_studies(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    path = _view(tmp_path / "a.png")
    with pytest.raises(StudyError, match="not a folder"):
        find_studies(path)


def test_root_that_is_a_single_study_folder(mura: Path) -> None:
    folder = mura / "valid/XR_SHOULDER/patient11185/study1_positive"
    studies = find_studies(folder)
    assert len(studies) == 1
    study = studies[0]
    assert study.key == str(folder.resolve())
    assert (study.label, study.body_part, study.patient, study.split) == (
        1, "shoulder", "11185", "valid")
    assert len(study.views) == 2


def test_root_given_relative(mura: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mura.parent)
    studies = find_studies(mura.name)
    assert len(studies) == 4 and all(os.path.isabs(s.key) for s in studies)
