"""Hostile input files: NIfTI headers that claim more voxel data than the file holds (refused before the
allocation), MemoryError named, float labels beyond int64, a huge pixdim in `evaluate`, pose files that are
nested too deeply, hold huge integers, lie in their .npy header, are truncated or repeat a key, and macOS
AppleDouble "._*" companions in NIfTI folders."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medfast.data.dataset import find_pairs
from medfast.data.io import DatasetError, load_nifti, read_failure
from medfast.tasks.evaluation import evaluate_pair, find_evaluation_pairs
from medfast.tasks.segmentation import _input_entries
from medfast.ultrasound.io import read_volume
from medfast.ultrasound.poses import read_poses


def _lying_nifti(path, shape, dtype=np.int16, data_bytes=1000, members=1):
    """A valid header claiming ``shape`` followed by only ``data_bytes`` bytes of voxel data."""
    h = nib.Nifti1Header()
    h.set_data_dtype(dtype)
    h.set_data_shape(shape)
    h.set_sform(np.eye(4), 1)
    h["vox_offset"] = 352
    body = h.binaryblock + b"\0" * 4 + bytes(range(256)) * (data_bytes // 256) + b"\0" * (data_bytes % 256)
    if str(path).endswith(".gz"):
        cut = len(body) // members
        body = b"".join(gzip.compress(body[i * cut:(i + 1) * cut if i < members - 1 else None])
                        for i in range(members))
    path.write_bytes(body)
    return path


def test_lying_gzip_header_refused_before_allocating(tmp_path):
    # 70 bytes claiming 2 GiB: before the fix load_nifti allocated it; under a 1 GiB address-space margin the
    # read then failed with an empty message. Run in a child so that an unfixed reader cannot hurt the machine.
    path = _lying_nifti(tmp_path / "lie.nii.gz", (1024, 1024, 1024))
    code = (
        "import resource, sys\n"
        "from medfast.data.io import load_nifti\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    load_nifti(sys.argv[1])\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DatasetError"), out.stdout
    assert "lie.nii.gz" in out.stdout and "claims 2.15 GB" in out.stdout, out.stdout


#: The readers of user files that call nibabel themselves: (import, call of ``p``, the error type each raises for a
#: bad file). Before they checked the claim (all but ultrasound's), each allocated it: a MemoryError under the
#: cap (RegistrationError / DatasetError with an empty message), 2-4 GB without it.
_OWN_READERS = {
    "register image": ("from medfast.tasks.registration import load_nifti as read", "read(p)", "RegistrationError"),
    "register ddf": ("from medfast.tasks.registration import load_ddf as read", "read(p)", "RegistrationError"),
    "classification image": ("from medfast.tasks.classification import read_image as read",
                             "read(p, spatial_dims=3)", "DatasetError"),
    "brain volume": ("from medfast.tasks.classification import load_brain_volume as read", "read({'path': p})",
                     "DatasetError"),
    "ultrasound volume": ("from medfast.ultrasound.io import read_volume as read", "read(p)", "ValueError"),
}


@pytest.mark.parametrize("reader", list(_OWN_READERS))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_readers_refuse_a_lying_header_before_allocating(tmp_path, reader, suffix):
    # in a child under a 1 GiB address-space margin, as above: an unchecked reader cannot hurt the machine
    imports, call, error = _OWN_READERS[reader]
    path = _lying_nifti(tmp_path / f"lie{suffix}", (1024, 1024, 1024))
    code = (
        f"import resource, sys\n{imports}\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n"
        "p = sys.argv[1]\n"
        "try:\n"
        f"    {call}\n"
        "except BaseException as e:\n"
        "    print(type(e).__name__, str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(error), out.stdout
    assert f"lie{suffix}: the header claims 2.15 GB" in out.stdout, out.stdout


def test_gzip_trailer_size_refuses_a_small_lie_and_multi_member_files_still_load(tmp_path):
    # 32^3 float32 = 131 kB: within what 1 kB of deflate could hold, so only the ISIZE trailer (and the stream
    # count that confirms it) tells that the data is not there
    with pytest.raises(DatasetError, match=r"small\.nii\.gz: the header claims .*more than the compressed file"):
        load_nifti(_lying_nifti(tmp_path / "small.nii.gz", (32, 32, 32), np.float32))
    # a legitimate file in 3 gzip members: the last member's ISIZE is only a third of the data
    data = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    raw = gzip.decompress(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes()))
    cut = len(raw) // 3
    (tmp_path / "multi.nii.gz").write_bytes(b"".join(gzip.compress(raw[i * cut:(i + 1) * cut if i < 2 else None])
                                                      for i in range(3)))
    np.testing.assert_array_equal(load_nifti(tmp_path / "multi.nii.gz").data[0], data)


def test_truncated_plain_nifti_refused_with_sizes(tmp_path):
    with pytest.raises(DatasetError, match=r"short\.nii: the header claims .* but the file has 1352 bytes"):
        load_nifti(_lying_nifti(tmp_path / "short.nii", (64, 64, 64)))


def test_memory_error_is_named(tmp_path, monkeypatch):
    assert read_failure(MemoryError(), 2**31) == "MemoryError: the image needs 2.15 GB"
    assert read_failure(RecursionError()) == "RecursionError"
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)

    def oom(self, *args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", oom)
    with pytest.raises(DatasetError, match=r"ok\.nii\.gz: MemoryError: the image needs 128 bytes"):
        load_nifti(path)
    with pytest.raises(ValueError, match=r"ok\.nii\.gz: cannot read the voxel data: MemoryError: the image needs"):
        read_volume(path)


def test_ultrasound_read_volume_refuses_lying_header(tmp_path):
    with pytest.raises(ValueError, match=r"lie\.nii\.gz: the header claims 2\.15 GB"):
        read_volume(_lying_nifti(tmp_path / "lie.nii.gz", (1024, 1024, 1024)))


def test_float_label_beyond_int64_named(tmp_path):
    lab = np.zeros((6, 6, 6))
    lab[0, 0, 0] = 1e300  # astype(int64) gave INT64_MIN: "negative values (min -9223372036854775808)"
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "big.nii.gz")
    with pytest.raises(DatasetError, match=r"big\.nii\.gz: label map holds the value 1e\+300"):
        load_nifti(tmp_path / "big.nii.gz", label=True)
    lab[0, 0, 0] = 2.0**53
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "big.nii.gz")
    with pytest.raises(DatasetError, match=r"label map holds the value 9\.0072e\+15"):
        load_nifti(tmp_path / "big.nii.gz", label=True)


def test_evaluate_huge_pixdim_names_the_file(tmp_path):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    aff = np.diag([1e20, 1.0, 1.0, 1.0])
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(ref, aff), tmp_path / name)
    with pytest.raises(DatasetError, match=r"b\.nii\.gz: the voxel size from its header cannot be scored"):
        evaluate_pair(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")


def _poses(path, text):
    path.write_text(text)
    return path


def test_pose_json_hostile(tmp_path):
    with pytest.raises(ValueError, match=r"deep\.json: .*nested too deeply"):
        read_poses(_poses(tmp_path / "deep.json", "[" * 100000 + "]" * 100000))
    with pytest.raises(ValueError, match=r"bigint\.json: .*too large for a float"):
        read_poses(_poses(tmp_path / "bigint.json", "[[1,0,0," + "9" * 400 + "],[0,1,0,0],[0,0,1,0],[0,0,0,1]]"))
    eye = np.eye(4).tolist()
    dup = f"{{\"poses\": {json.dumps([eye])}, \"poses\": {json.dumps([eye, eye])}}}"
    with pytest.raises(ValueError, match=r"dup\.json: the key 'poses' appears twice"):
        read_poses(_poses(tmp_path / "dup.json", dup))
    assert read_poses(_poses(tmp_path / "ok.json", json.dumps({"poses": [eye, eye]}))).shape == (2, 4, 4)


def test_pose_npy_hostile(tmp_path):
    b = tmp_path / "lie.npy"
    with open(b, "wb") as f:  # a header claiming 10^9 poses (119 GiB) over one pose of data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 4, 4)})
        f.write(np.eye(4).tobytes())
    with pytest.raises(ValueError, match=r"lie\.npy: the \.npy header claims an array of shape \(1000000000, 4, 4\)"):
        read_poses(b)
    np.save(tmp_path / "full.npy", np.tile(np.eye(4), (3, 1, 1)))
    raw = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[:-40])  # numpy's "Failed to read all data" named no file
    with pytest.raises(ValueError, match=r"trunc\.npy: "):
        read_poses(tmp_path / "trunc.npy")
    assert read_poses(tmp_path / "full.npy").shape == (3, 4, 4)


def test_appledouble_files_skipped(tmp_path):
    appledouble = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 200
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / sub / "case_000.nii.gz")
        (tmp_path / sub / "._case_000.nii.gz").write_bytes(appledouble)
    images, labels = find_pairs(tmp_path)
    assert [str(p).rsplit("/", 1)[-1] for p in images] == ["case_000.nii.gz"]
    assert len(labels) == 1
    assert [e.rsplit("/", 1)[-1] for e in _input_entries([tmp_path / "images"])] == ["case_000.nii.gz"]
    pairs = find_evaluation_pairs(tmp_path / "labels", tmp_path / "labels")
    assert [r.name for _, r in pairs] == ["case_000.nii.gz"]


def test_a_checkpoint_config_for_a_huge_network_fails_before_building_it(tmp_path):
    # channels [4096, 8192] in an edited checkpoint's config: ~11 GB of parameters were built and initialised
    # before the weights were found not to fit; the child's address space is capped so a regression fails fast
    import subprocess
    import sys
    import textwrap

    import torch

    from tests.conftest import train_tiny_segmentation

    data, _, checkpoint = train_tiny_segmentation(tmp_path, steps=1)
    image = sorted((data / "images").iterdir())[0]
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["channels"] = [4096, 8192]
    torch.save(state, tmp_path / "edited.pt")
    code = textwrap.dedent(f"""
        import resource, sys
        from medfast.tasks.segmentation import predict_files
        from medfast.train import CheckpointError
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
        try:
            predict_files({str(tmp_path / 'edited.pt')!r}, [{str(image)!r}], {str(tmp_path / 'pred')!r})
        except CheckpointError as exc:
            print("refused:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: the weights in" in proc.stdout, proc.stderr[-2000:]


#: A child's first lines: its address space capped 1 GiB above what it has mapped after its imports, so that a
#: regression fails fast (MemoryError / torch's "can't allocate memory") instead of taking the machine's memory.
_CAP = ("import resource\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))\n")


def _capped(code, timeout=300):
    """``code`` run in a python child under the cap above (imports first, then :data:`_CAP`); its stdout and
    stderr."""
    imports, _, body = code.partition("#CAP\n")
    proc = subprocess.run([sys.executable, "-c", imports + _CAP + body], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_a_huge_sliding_window_is_refused_before_allocating(tmp_path):
    # inference.roi_size [4096] * 3 in an edited checkpoint: the 12^3 image was padded to the window and the window
    # weights built (275 GB each) before anything failed, with torch's "can't allocate memory" (a traceback from
    # medfast predict); now refused before the network is built, one line naming the key and the checkpoint
    import torch

    from medfast.cli import main
    from tests.conftest import train_tiny_segmentation

    data, _, checkpoint = train_tiny_segmentation(tmp_path, steps=1)
    image = sorted((data / "images").iterdir())[0]
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["inference"]["roi_size"] = [4096] * 3
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    out, err = _capped(
        "import sys, torch\nfrom medfast.cli import main\n"
        "from medfast.train.sliding_window import importance_map, sliding_window_inference\n#CAP\n"
        "conv = torch.nn.Conv3d(1, 2, 3, padding=1)\n"
        "for call in (lambda: sliding_window_inference(torch.randn(1, 1, 12, 12, 12), [4096] * 3, conv),\n"
        "             lambda: importance_map([4096] * 3)):\n"
        "    try:\n"
        "        call()\n"
        "    except BaseException as e:\n"
        "        print(type(e).__name__, e)\n"
        f"code = main(['predict', '--model', {str(edited)!r}, {str(image)!r}, '--out', {str(tmp_path / 'p')!r}])\n"
        "print('exit', code)\n")
    lines = out.splitlines()
    assert lines[0].startswith("ValueError roi_size (4096, 4096, 4096): sliding windows of [4096, 4096, 4096] "
                               "voxels over a 1 x 1 x [12, 12, 12] input need at least 1.92 TB of cpu memory"), out
    assert lines[1].startswith("ValueError roi_size (4096, 4096, 4096): its weights need 550 GB of cpu memory"), out
    assert lines[2] == "exit 1", out
    # medfast predict: one line, the key, the checkpoint, the way out; nothing written
    assert len(err.strip().splitlines()) == 1, err
    assert f"inference.roi_size=[4096, 4096, 4096] (in the config of {edited}): sliding windows of" in err, err
    assert "give a smaller one (the training patch: augment.patch_size=[8, 8, 8])" in err, err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    # the checkpoint's own window still predicts, and a sane window set over the edited one gives the same files
    assert main(["predict", "--model", str(checkpoint), str(image), "--out", str(tmp_path / "ok")]) == 0
    assert main(["predict", "--model", str(edited), str(image), "--out", str(tmp_path / "ok2"),
                 "--set", "inference.roi_size=[8, 8, 8]"]) == 0
    for a in sorted((tmp_path / "ok").iterdir()):
        assert a.read_bytes() == (tmp_path / "ok2" / a.name).read_bytes()


def test_window_memory_bound(monkeypatch):
    # the refusal sits exactly at the counted buffers: one byte less memory than they need refuses the call, as
    # much as they need runs it (and gives MONAI's result: nothing else changed)
    import torch

    from medfast.tasks.segmentation import check_window
    from medfast.train import load_config
    from medfast.train import sliding_window as sw

    monai_inf = pytest.importorskip("monai.inferers")
    x = torch.randn(2, 1, 6, 8, 5)  # smaller than the window on two axes: padded to it, one window per image
    roi, vox = (8, 8, 8), 512
    # float32 input padded + 2 windows per call, Gaussian weights + their clamped copy, the windows' outputs (K
    # channels), the blended sums (K + 1): with K = 2, and K = 1 where the predictor is not known yet
    need = (2 * vox + 2 * vox) * 4 + 2 * vox * 4 + 2 * 2 * vox * 4 + 2 * 3 * vox * 4
    need_k1 = (2 * vox + 2 * vox) * 4 + 2 * vox * 4 + 2 * 1 * vox * 4 + 2 * 2 * vox * 4
    assert sw.window_memory_problem(x.shape[2:], roi, batch=2, out_channels=2, sw_batch_size=3) is None
    conv = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    for have, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(sw, "_memory_of", lambda device, have=have: (have, "in this test"))
        problem = sw.window_memory_problem(x.shape[2:], roi, batch=2, out_channels=2, sw_batch_size=3)
        assert (problem is not None) == refused
        if refused:
            assert f"need at least {need} bytes of cpu memory" in problem and "2 window(s)" in problem
            monkeypatch.setattr(sw, "_memory_of", lambda device: (need_k1 - 1, "in this test"))
            with pytest.raises(ValueError, match=r"roi_size \(8, 8, 8\): sliding windows of \[8, 8, 8\] voxels over "
                                                 rf"a 2 x 1 x \[6, 8, 5\] input need at least {need_k1} bytes"):
                sw.sliding_window_inference(x, roi, conv, sw_batch_size=3)
        else:
            with torch.no_grad():
                torch.testing.assert_close(sw.sliding_window_inference(x, roi, conv, sw_batch_size=3),
                                           monai_inf.sliding_window_inference(x, roi, 3, conv, overlap=0.5),
                                           atol=1e-5, rtol=1e-4)
    # predict's check names the key; a window inside the image is not the window's fault (not refused there)
    config = load_config([], ["model.channels=[2, 4]", "model.out_channels=2", "inference.roi_size=[8, 8, 8]",
                              "inference.sw_batch_size=3"])
    monkeypatch.setattr(sw, "_memory_of", lambda device: (need - 1, "in this test"))
    with pytest.raises(ValueError, match=r"^inference.roi_size=\[8, 8, 8\] \(from here\): sliding windows"):
        check_window(config, [6, 8, 5], 2, source=" (from here)")
    check_window(config, [8, 9, 8], 1)
    config = load_config([], ["model.channels=[2, 4]", "model.out_channels=2", "augment.patch_size=[8, 8, 8]",
                              "inference.sw_batch_size=3"])
    with pytest.raises(ValueError, match=r"^augment.patch_size \(the window: inference.roi_size is unset\)=\[8, 8, 8\]"
                                         r".* set a smaller inference.roi_size$"):
        check_window(config, [6, 8, 5], 2)


def test_resume_into_a_huge_network_fails_before_building_it(tmp_path):
    # `medfast train --resume` with an edited config (model.channels [4096, 8192]) built and initialised the
    # network (torch's "can't allocate memory" traceback under the cap, ~11 GB without) before the checkpoint's
    # weights were found not to fit; now one line naming the checkpoint and the setting, and nothing changed (a
    # normal resume then continues; its exactness: tests/test_train_trainer.py)
    from medfast.cli import main
    from medfast.train import load_checkpoint
    from tests.conftest import train_tiny_segmentation

    _, cfg, checkpoint = train_tiny_segmentation(tmp_path, steps=2)
    run = tmp_path / "run"
    before = (run / "config.yaml").read_text()
    out, err = _capped(
        "import sys\nfrom medfast.cli import main\n#CAP\n"
        f"code = main(['train', {str(cfg)!r}, '--out', {str(run)!r}, '--resume', '--set', "
        "'model.channels=[4096, 8192]', '--set', 'trainer.max_steps=4'])\n"
        "print('exit', code)\n")
    assert out.strip().endswith("exit 1"), out
    assert len(err.strip().splitlines()) == 1, err
    assert f"the weights in {checkpoint} do not fit the network" in err, err
    assert "model.channels ([2, 4] in the checkpoint, [4096, 8192] now)" in err, err
    assert (run / "config.yaml").read_text() == before
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--set", "trainer.max_steps=4"]) == 0
    assert load_checkpoint(checkpoint)["step"] == 4
