"""The classification image readers against independent references: DICOM against pydicom's own transforms
(apply_modality_lut, apply_color_lut, convert_color_space), PNG/JPEG against PIL (16-bit grey + alpha, EXIF
orientation), and folder inputs of ``medfast predict``."""

from __future__ import annotations

import csv
import struct
import zlib

import numpy as np
import pytest

from medfast.data import DatasetError
from medfast.tasks.classification import ImageFolderDataset, read_image
from medfast.tasks.classification.data import probe_channels

pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402


def _dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, frames=None, **attrs):
    """A DICOM file of ``pixels``: grey ``(H, W)`` / ``(F, H, W)`` or colour ``(..., H, W, 3)``; its dtype gives
    BitsAllocated and PixelRepresentation. ``attrs`` are set on the dataset (sequences included)."""
    pixels = np.ascontiguousarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if frames:
        ds.NumberOfFrames = frames
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pvt(slope, intercept):
    """A functional group item holding a Pixel Value Transformation (an enhanced file's rescale)."""
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = str(slope), str(intercept), "HU"
    group = Dataset()
    group.PixelValueTransformationSequence = [pvt]
    return group


# ---- MONOCHROME1 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,bits,slope,intercept", [
    (np.uint16, 12, None, None), (np.uint16, 12, 2.0, -100.0), (np.int16, 16, 1.0, -1024.0),
    (np.int16, 12, -0.5, 10.0), (np.uint8, 8, None, None)])
def test_monochrome1_reads_as_its_monochrome2_twin(tmp_path, dtype, bits, slope, intercept):
    signed = np.dtype(dtype).kind == "i"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    rng = np.random.default_rng(bits)
    stored = rng.integers(lo, hi + 1, (6, 7)).astype(dtype)
    rescale = {} if slope is None else {"RescaleSlope": slope, "RescaleIntercept": intercept}
    mono2 = _dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", bits, **rescale)
    mono1 = _dicom(tmp_path / "m1.dcm", (lo + hi - stored.astype(np.int64)).astype(dtype), "MONOCHROME1", bits,
                   **rescale)
    ds = pydicom.dcmread(mono2)
    ref = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(read_image(mono2)[0], ref, rtol=1e-6)
    np.testing.assert_allclose(read_image(mono1)[0], ref, rtol=1e-6, atol=1e-3)  # was stored: inverted


def test_monochrome1_with_a_modality_lut(tmp_path):
    stored = np.arange(48, dtype=np.uint16).reshape(6, 8) * 5
    ds = pydicom.dcmread(_dicom(tmp_path / "m2.dcm", stored, bits_stored=8, ModalityLUTSequence=[_lut()]))
    ref = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    m1 = _dicom(tmp_path / "m1.dcm", 255 - stored, "MONOCHROME1", 8, ModalityLUTSequence=[_lut()])
    # a linear LUT: MONOCHROME1's lo + hi - x equals the MONOCHROME2 twin's values
    np.testing.assert_allclose(read_image(m1)[0], ref)


# ---- modality transforms -----------------------------------------------------------------------------------
def _lut(entries=256, first=0, scale=10):
    lut = Dataset()
    lut.LUTDescriptor = [entries, first, 16]
    lut["LUTDescriptor"].VR = "US"
    lut.ModalityLUTType = "OD"
    lut.LUTData = (np.arange(entries, dtype="<u2") * scale + 7).tobytes()
    lut["LUTData"].VR = "OW"
    return lut


def test_modality_lut_sequence_is_applied(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 3
    path = _dicom(tmp_path / "lut.dcm", stored, bits_stored=8, ModalityLUTSequence=[_lut()])
    ds = pydicom.dcmread(path)
    ref = apply_modality_lut(ds.pixel_array, ds)
    assert not np.array_equal(ref, stored)
    np.testing.assert_array_equal(read_image(path)[0], ref)  # was the stored values


def test_enhanced_rescale_from_the_functional_groups(tmp_path):
    stored = np.full((3, 6, 5), 1024, np.uint16)
    stored[:, 2:4, 1:3] = 1064 + np.arange(3, dtype=np.uint16)[:, None, None]
    shared = _dicom(tmp_path / "shared.dcm", stored, frames=3, SharedFunctionalGroupsSequence=[_pvt(1, -1024)])
    x = read_image(shared, spatial_dims=3)
    assert x.shape == (1, 3, 6, 5)
    np.testing.assert_array_equal(x[0], apply_modality_lut(stored, _pvt(1, -1024).PixelValueTransformationSequence[0]))
    assert x[0, 0, 0, 0] == 0  # water: stored 1024 was read as 1024
    frames = [_pvt(1, -1024), _pvt(2, -1000), _pvt(0.5, 3)]
    per_frame = _dicom(tmp_path / "per_frame.dcm", stored, frames=3, PerFrameFunctionalGroupsSequence=frames,
                       SharedFunctionalGroupsSequence=[Dataset()])
    ref = np.stack([apply_modality_lut(stored[f], frames[f].PixelValueTransformationSequence[0]) for f in range(3)])
    np.testing.assert_allclose(read_image(per_frame, spatial_dims=3)[0], ref)
    # a top-level rescale of a classic file is unchanged
    classic = _dicom(tmp_path / "classic.dcm", stored[0], RescaleSlope=2, RescaleIntercept=-5)
    ds = pydicom.dcmread(classic)
    np.testing.assert_array_equal(read_image(classic)[0], apply_modality_lut(ds.pixel_array, ds))


# ---- colour ------------------------------------------------------------------------------------------------
def _palette(ds_attrs, bits=16):
    """Palette attributes: red ramps up, green down, blue constant (8- or 16-bit entries, 16-bit words)."""
    top = 2 ** bits - 1
    ramp = np.arange(256) * top // 255
    tables = {"Red": ramp, "Green": top - ramp, "Blue": np.full(256, top // 3)}
    for colour, table in tables.items():
        ds_attrs[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, bits]
        ds_attrs[f"{colour}PaletteColorLookupTableData"] = table.astype("<u2").tobytes()
    return ds_attrs


@pytest.mark.parametrize("bits", [16, 8])
def test_palette_colour_is_looked_up(tmp_path, bits):
    idx = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = _dicom(tmp_path / "pal.dcm", idx, "PALETTE COLOR", **_palette({}, bits))
    ds = pydicom.dcmread(path)
    for colour in ("Red", "Green", "Blue"):
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
    ref = apply_color_lut(ds.pixel_array, ds)
    assert probe_channels(path) == 3  # was 1
    x = read_image(path)
    assert x.shape == (3, 6, 8)  # was the indices as one channel
    np.testing.assert_allclose(x, np.moveaxis(ref, -1, 0) / (2 ** bits - 1), rtol=1e-6)


def test_colour_dicom_in_unit_range_like_the_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3)).astype(np.uint8)
    png = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(png)
    dcm = _dicom(tmp_path / "rgb.dcm", rgb, "RGB")
    np.testing.assert_array_equal(read_image(dcm), read_image(png))  # was 255 times the PNG
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = _dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL")
    ref = convert_color_space(ybr, "YBR_FULL", "RGB").astype(np.float32) / 255
    np.testing.assert_allclose(read_image(path), np.moveaxis(ref, -1, 0), rtol=1e-6)
    # 12 of 16 bits stored: divided by 4095
    rgb12 = (rgb.astype(np.uint16) * 16)
    np.testing.assert_allclose(read_image(_dicom(tmp_path / "rgb12.dcm", rgb12, "RGB", 12)),
                               np.moveaxis(rgb12 / 4095.0, -1, 0), rtol=1e-6)


def test_multiframe_colour(tmp_path):
    cine = np.random.default_rng(1).integers(0, 256, (4, 6, 8, 3)).astype(np.uint8)
    path = _dicom(tmp_path / "cine.dcm", cine, "RGB", frames=4)
    assert probe_channels(path) == 3
    x = read_image(path, spatial_dims=3)
    ref = pydicom.dcmread(path).pixel_array
    assert ref.shape == (4, 6, 8, 3) and x.shape == (3, 4, 6, 8)  # was refused as "not 3D"
    np.testing.assert_allclose(x, np.moveaxis(ref, -1, 0) / 255.0, rtol=1e-6)
    with pytest.raises(DatasetError, match="cine.dcm: a multi-frame colour DICOM .*4 frames.*spatial_dims=3"):
        read_image(path, spatial_dims=2)


# ---- PNG / JPEG ----------------------------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_grey_alpha16(path, grey, exif: bytes | None = None):
    """A 16-bit grey + alpha PNG (colour type 4), which PIL cannot write; rows cycle through the five PNG
    filters (computed on the raw bytes with 4 bytes per pixel), so that all of them are decoded."""
    h, w = grey.shape
    la = np.stack([grey, (np.arange(w, dtype=np.uint16) * 999)[None].repeat(h, 0)], -1).astype(">u2")
    raw = la.view(np.uint8).reshape(h, w * 4).astype(np.int64)
    rows = []
    for y in range(h):
        r, up = raw[y], (raw[y - 1] if y else np.zeros_like(raw[y]))
        left = np.concatenate([np.zeros(4, np.int64), r[:-4]])
        upleft = np.concatenate([np.zeros(4, np.int64), up[:-4]])
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        kind = y % 5
        pred = [0, left, up, (left + up) // 2, paeth][kind]
        rows.append(bytes([kind]) + ((r - pred) % 256).astype(np.uint8).tobytes())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
                     + (_chunk(b"sBIT", b"\x10\x10") + _chunk(b"bKGD", b"\x00\x00"))  # colour-type dependent
                     + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + (_chunk(b"eXIf", exif) if exif else b"")
                     + _chunk(b"IEND", b""))
    return path


def test_16bit_grey_alpha_png_is_one_grey_channel_at_16_bits(tmp_path):
    grey = (np.arange(9 * 7, dtype=np.uint16).reshape(9, 7) * 1039 + 5)
    (tmp_path / "a").mkdir()
    path = _png_grey_alpha16(tmp_path / "a" / "la16.png", grey)
    with Image.open(path) as im:
        assert im.mode == "RGBA"  # what PIL makes of it: 8-bit colour
    assert probe_channels(path) == 1  # was 3
    x = read_image(path)
    assert x.shape == (1, 9, 7)
    np.testing.assert_allclose(x[0], grey / 65535.0, rtol=1e-6)  # was 8 bits of grey in 3 channels
    # beside ordinary 16-bit grey PNGs: one grey data set (was refused as mixed grey and colour)
    for c in ("a", "b"):
        (tmp_path / c).mkdir(exist_ok=True)
        Image.fromarray(grey).save(tmp_path / c / "grey16.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.num_channels == 1
    np.testing.assert_array_equal(ds[0]["image"].numpy(), read_image(tmp_path / "a" / "grey16.png"))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    grey = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    for name, arr in (("g.jpg", grey), ("rgb.png", rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)),
                      ("g16.png", grey.astype(np.uint16) * 257)):
        path = tmp_path / name
        Image.fromarray(arr).save(path, exif=_exif(orientation), **({"quality": 100} if name.endswith("jpg") else {}))
        with Image.open(path) as im:
            up = ImageOps.exif_transpose(im)
            ref = np.asarray(up, dtype=np.float32) / (65535.0 if up.mode.startswith("I;16") else 255.0)
        ref = np.moveaxis(ref, -1, 0) if ref.ndim == 3 else ref[None]
        x = read_image(path)
        assert x.shape == ref.shape and (x.shape[1:] == (9, 5)) == (orientation >= 5), name  # 5-8: transposed
        np.testing.assert_allclose(x, ref, rtol=1e-6, err_msg=name)
        assert probe_channels(path) == x.shape[0]
    # the 16-bit grey + alpha reader keeps the orientation too
    g16 = rng.integers(0, 65536, (5, 9)).astype(np.uint16)
    path = _png_grey_alpha16(tmp_path / "la16.png", g16, exif=_exif(orientation))
    Image.fromarray(g16).save(tmp_path / "ref16.png", exif=_exif(orientation))
    with Image.open(tmp_path / "ref16.png") as im:
        ref = np.asarray(ImageOps.exif_transpose(im), dtype=np.float32) / 65535.0
    np.testing.assert_allclose(read_image(path)[0], ref, rtol=1e-6)


# ---- medfast predict on a folder ---------------------------------------------------------------------------
def test_predict_a_folder(tmp_path):
    from medfast.cli import main
    from medfast.tasks.classification.task import predict_files

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(4):
            (tmp_path / "img" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    cfg = tmp_path / "cls.yaml"
    cfg.write_text(f"""
task: classification
data: {{root: {tmp_path / 'img'}, shape: [16, 16], normalize: minmax, val_fraction: 0.25, cache: none}}
model: {{name: sononet, spatial_dims: 2, in_channels: 1, out_channels: 2, channels: [4],
        kwargs: {{encoding: nominal, convs_per_block: [1, 1]}}}}
optim: {{lr: 0.001}}
trainer: {{out_dir: {tmp_path / 'run'}, batch_size: 4, max_steps: 1, val_every: 1, checkpoint_every: 1,
          progress: false, tensorboard: false, plots: false, threads: 1, device: cpu}}
""")
    assert main(["train", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    new = tmp_path / "new"
    new.mkdir()
    for name in ("b.png", "a.png", "c.dcm"):
        if name.endswith(".png"):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(new / name)
        else:
            _dicom(new / name, rng.integers(0, 4096, (12, 12)).astype(np.uint16), bits_stored=12)
    (new / "notes.txt").write_text("not an image")
    (new / "._a.png").write_bytes(b"AppleDouble")  # hidden: skipped as in the data set
    (new / "sub").mkdir()  # subfolders are not searched
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(new / "sub" / "z.png")
    assert main(["predict", str(new), "--model", str(ckpt), "--out", str(tmp_path / "pred")]) == 0  # was not found
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv", encoding="utf-8")))
    assert [r["file"] for r in rows] == [str(new / n) for n in ("a.png", "b.png", "c.dcm")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images .* in the input folder .*empty"):
        predict_files(ckpt, [tmp_path / "empty"], tmp_path / "p2", device="cpu")
