"""DICOM radiographs decode to one array, bone bright, whatever the header says.

The files are made here with pydicom (and dcmtk's dcmcjpeg, a second implementation, for
JPEG Lossless when it is installed); pydicom's own three real CR files are read too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from bonexray.dicom import CR, DX_FOR_PRESENTATION, SkippedObject, decode_dicom  # noqa: E402
from bonexray.imaging import ImageError, load_view  # noqa: E402
from bonexray.settings import MAX_IMAGE_PIXELS  # noqa: E402

SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
H, W = 48, 64


def phantom(bits: int = 16) -> np.ndarray:
    """Attenuation: soft tissue everywhere, a bright bone bar, a gradient (values in the
    upper part of the bit range, as detectors give them)."""
    top = 2 ** bits - 1
    image = np.full((H, W), 0.30, dtype=np.float64)
    image += np.linspace(0.0, 0.1, W)[None, :]
    image[16:32, 10:54] = 0.85  # bone
    image[:, :4] = 0.05  # air at the edge
    return np.round(image * top * 0.9).astype(np.uint16 if bits > 8 else np.uint8)


def dataset(pixels: np.ndarray, *, sop: str = CR, photometric: str = "MONOCHROME2",
            bits_stored: int | None = None, syntax: str = ExplicitVRLittleEndian,
            **elements: Any) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR" if sop == CR else "DX"
    ds.PatientID, ds.BodyPartExamined = "P1", "HAND"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def write(tmp: Path, name: str, ds: Dataset) -> Path:
    path = tmp / name
    ds.save_as(path, enforce_file_format=True)
    return path


def decode(path: Path) -> np.ndarray:
    return decode_dicom(path, max_pixels=MAX_IMAGE_PIXELS)


def bone_is_bright(image: np.ndarray) -> bool:
    return float(image[16:32, 10:54].mean()) > float(image[34:, 10:54].mean()) + 60 \
        and float(image[:, :4].mean()) < 40


def test_polarity_follows_the_presentation_lut_shape_then_the_photometric(tmp_path):
    attenuation = phantom()
    top = 2 ** 16 - 1
    mono2 = decode(write(tmp_path, "m2.dcm", dataset(attenuation)))
    assert bone_is_bright(mono2)
    # MONOCHROME1: high attenuation is stored low. Without a shape (CR): inverted once.
    stored_inverse = (top - attenuation.astype(np.int64)).astype(np.uint16)
    mono1 = decode(write(tmp_path, "m1.dcm", dataset(stored_inverse, photometric="MONOCHROME1")))
    assert bone_is_bright(mono1)
    # DX MONOCHROME1 with PresentationLUTShape INVERSE: inverted once, not twice.
    dx = decode(write(tmp_path, "dx.dcm", dataset(stored_inverse, sop=DX_FOR_PRESENTATION,
                                                   photometric="MONOCHROME1",
                                                   PresentationLUTShape="INVERSE")))
    assert bone_is_bright(dx)
    # IDENTITY on MONOCHROME2: as stored.
    ident = decode(write(tmp_path, "id.dcm", dataset(attenuation, sop=DX_FOR_PRESENTATION,
                                                      PresentationLUTShape="IDENTITY")))
    assert np.array_equal(ident, mono2)
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1
    assert np.abs(dx.astype(int) - mono2.astype(int)).max() <= 1


def test_rescale_windows_and_voi_lut_in_their_order(tmp_path):
    attenuation = phantom()
    plain = decode(write(tmp_path, "plain.dcm", dataset(attenuation)))
    # Modality LUT: stored = (value - intercept) / slope decodes like the value itself.
    stored = ((attenuation.astype(np.float64) + 1000.0) / 2.0).astype(np.uint16)
    rescaled = decode(write(tmp_path, "rescaled.dcm", dataset(
        stored, RescaleSlope="2", RescaleIntercept="-1000", RescaleType="US")))
    assert np.abs(rescaled.astype(int) - plain.astype(int)).max() <= 2
    # A window: the value at its centre is mid-grey; the first of several windows is used.
    bone_value = float(attenuation[20, 20])
    windowed = decode(write(tmp_path, "window.dcm", dataset(
        attenuation, WindowCenter=[bone_value, 100.0], WindowWidth=[2000.0, 10.0])))
    assert abs(int(windowed[20, 20]) - 128) <= 2
    assert windowed[40, 40] == 0  # soft tissue far below the window: black
    # A VOI LUT Sequence wins over the window: this one maps everything to a ramp.
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = np.linspace(0, 4095, 4096).astype(np.uint16).tobytes()
    item.LUTExplanation = "ramp"
    seq = decode(write(tmp_path, "voilut.dcm", dataset(
        (attenuation >> 4).astype(np.uint16), bits_stored=12, VOILUTSequence=[item],
        WindowCenter=100.0, WindowWidth=10.0)))
    expected = np.round((attenuation >> 4) / 4095 * 255)
    assert np.abs(seq.astype(int) - expected.astype(int)).max() <= 1


def test_voi_luts_of_8_bits_and_of_words_index_without_wrapping(tmp_path):
    """An 8-bit LUT of 4096 entries (common in CR) and one sent as OW bytes."""
    stored = (phantom() >> 4).astype(np.uint16)  # 12-bit values
    expected = np.round(stored / 4095 * 255).astype(int)
    for name, lut in (("us", np.linspace(0, 255, 4096).round().astype(np.uint16).tolist()),
                      ("ow", np.linspace(0, 255, 4096).round().astype("<u2").tobytes())):
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 8]
        item.add_new(0x00283006, "US" if isinstance(lut, list) else "OW", lut)  # LUTData
        image = decode(write(tmp_path, f"lut8_{name}.dcm",
                             dataset(stored, bits_stored=12, VOILUTSequence=[item])))
        assert np.abs(image.astype(int) - expected).max() <= 1, name
        assert bone_is_bright(image)


def test_a_malformed_header_fails_its_view_in_one_line(tmp_path):
    no_descriptor = Dataset()
    no_descriptor.add_new(0x00283006, "US", [0, 1, 2])  # LUTData, no LUTDescriptor
    for name, ds in (("empty_window.dcm", dataset(phantom(), WindowCenter="",
                                                  WindowWidth="")),
                     ("no_descriptor.dcm", dataset(phantom(), VOILUTSequence=[no_descriptor]))):
        with pytest.raises(ImageError) as caught:
            decode(write(tmp_path, name, ds))
        assert "\n" not in str(caught.value), name


def test_padding_is_left_out_of_the_automatic_window(tmp_path):
    attenuation = phantom()
    padded = attenuation.copy()
    padded[:, -8:] = 65535  # collimator region marked as padding
    image = decode(write(tmp_path, "pad.dcm", dataset(padded, PixelPaddingValue=65535)))
    reference = decode(write(tmp_path, "nopad.dcm", dataset(attenuation)))
    assert np.all(image[:, -8:] == 0)
    # Without the padding rule the 65535 band would squeeze the real range into a few greys.
    assert np.abs(image[:, :-8].astype(int) - reference[:, :-8].astype(int)).max() <= 8
    assert bone_is_bright(image)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths(tmp_path, bits):
    pixels = phantom(8 if bits == 8 else 16)
    if bits == 12:
        pixels = (pixels >> 4).astype(np.uint16)
    image = decode(write(tmp_path, f"b{bits}.dcm", dataset(pixels, bits_stored=bits)))
    assert image.dtype == np.uint8 and image.shape == (H, W) and bone_is_bright(image)


def compressed(tmp: Path, name: str, syntax: str, **kwargs: Any) -> Path:
    ds = dataset(phantom(), **kwargs)
    ds.compress(syntax)
    return write(tmp, name, ds)


def test_every_common_encoding_decodes_to_the_same_image(tmp_path):
    reference = decode(write(tmp_path, "explicit.dcm", dataset(phantom())))
    files = {
        "implicit VR": write(tmp_path, "implicit.dcm",
                             dataset(phantom(), syntax=ImplicitVRLittleEndian)),
        "RLE": compressed(tmp_path, "rle.dcm", RLELossless),
        "JPEG-LS": compressed(tmp_path, "jls.dcm", JPEGLSLossless),
        "JPEG 2000": compressed(tmp_path, "j2k.dcm", JPEG2000Lossless),
    }
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg:  # JPEG Lossless process 14, written by a second implementation (dcmtk)
        target = tmp_path / "jpeg_lossless.dcm"
        subprocess.run([dcmcjpeg, "+e1", str(tmp_path / "explicit.dcm"), str(target)],
                       check=True, capture_output=True)
        files["JPEG Lossless SV1"] = target
    for name, path in files.items():
        image = decode(path)
        assert np.array_equal(image, reference), name
    # The one function for training and inference: load_view reads DICOM too.
    view = load_view(files["RLE"], 32)
    assert view.shape == (32, 32) and view.dtype == np.uint8


def test_objects_that_are_not_radiographs_are_skipped_by_class(tmp_path):
    sr = dataset(phantom(), sop=SR)
    with pytest.raises(SkippedObject, match="Comprehensive SR"):
        decode(write(tmp_path, "sr.dcm", sr))
    with pytest.raises(SkippedObject, match="Processing"):
        decode(write(tmp_path, "proc.dcm", dataset(phantom(), sop=DX_FOR_PROCESSING)))


def test_broken_objects_fail_with_one_line(tmp_path):
    good = write(tmp_path, "good.dcm", dataset(phantom()))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_pixels = dataset(phantom())
    del no_pixels.PixelData
    cases = {
        truncated: "readable DICOM|cannot decode|pixel data",
        write(tmp_path, "nopix.dcm", no_pixels): "no pixel data",
        write(tmp_path, "frames.dcm", dataset(np.stack([phantom()] * 3))): "multi-frame",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageError, match=reason) as caught:
            decode(path)
        assert "\n" not in str(caught.value)
    # An undecodable syntax names itself.
    ds = dataset(phantom())
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # claims JPEG-LS, holds raw bytes
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 32])
    with pytest.raises(ImageError, match="JPEG-LS"):
        decode(write(tmp_path, "liar.dcm", ds))


def test_a_file_named_by_uid_is_found_by_its_preamble(tmp_path):
    path = write(tmp_path, "1.2.826.0.1.3680043.8.498.1", dataset(phantom()))
    assert load_view(path, 16).shape == (16, 16)


def test_real_cr_files_monochrome1_without_a_shape_come_out_bone_bright():
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(f"dicomdirtests/77654033/{name}")
             for name in ("CR1/6154", "CR2/6247", "CR3/6278")]
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert "PresentationLUTShape" not in ds
        stored = ds.pixel_array.astype(np.float64)
        image = decode(Path(path)).astype(np.float64)
        # Inverted once: what is stored low (bone, in MONOCHROME1) comes out bright.
        assert np.corrcoef(stored.ravel(), image.ravel())[0, 1] < -0.9, path
        assert load_view(path, 64).shape == (64, 64)


@pytest.mark.parametrize("header", [
    {},
    {"PixelPaddingValue": 0},
    {"PixelPaddingValue": 0, "PixelPaddingRangeLimit": 40, "PhotometricInterpretation":
     "MONOCHROME1"},
    {"RescaleSlope": -2.0, "RescaleIntercept": 100.0},
    {"WindowCenter": 2000, "WindowWidth": 1500},
    {"WindowCenter": [1800, 40], "WindowWidth": [900, 400], "VOILUTFunction": "SIGMOID"},
    {"PresentationLUTShape": "INVERSE", "WindowCenter": 2048, "WindowWidth": 4096,
     "VOILUTFunction": "LINEAR_EXACT"},
])
def test_the_lookup_table_path_shows_what_pixel_by_pixel_shows(header):
    """to_display maps integer images through a table over their levels, the robust window
    from the levels' histogram: the same picture as computing every pixel."""
    from bonexray.dicom import _display_pixels, to_display

    rng = np.random.default_rng(len(str(header)))
    stored = np.clip(rng.normal(2100, 500, (120, 90)), 0, 4095).astype(np.uint16)
    stored[:10] = 0  # a padded band
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in header.items():
        setattr(ds, key, value)
    fast, slow = to_display(ds, stored), _display_pixels(ds, stored)
    assert fast.dtype == slow.dtype == np.uint8
    assert int(np.abs(fast.astype(int) - slow.astype(int)).max()) <= 1
    assert np.mean(fast == slow) > 0.999
    # Signed data, and values that start far from zero, take the table too.
    signed = (stored.astype(np.int16) - 3000)
    assert np.abs(to_display(ds, signed).astype(int)
                  - _display_pixels(ds, signed).astype(int)).max() <= 1
