"""Optional dependencies and process-wide state.

* matplotlib (the ``cli`` extra) is optional for the work commands: training, prediction and simulation
  complete without it and write everything but their figures (one note says they were skipped);
* a command that needs a missing optional module says which extra installs it, exit status 2, whether or
  not it catches its own errors;
* the figure writers leave the process' matplotlib backend (a notebook's, a GUI's) alone;
* pydicom 2.x is refused with the version it needs; the simulator's memory limit without psutil is measured.

"Not installed" is emulated in a subprocess as the interpreter sees it: the path finder does not find the hidden
top-level packages (``import`` raises its own ModuleNotFoundError, ``find_spec`` returns None).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import train_tiny_segmentation

_HIDE = """\
import importlib.machinery as _machinery, importlib.util as _util
_hidden = {hidden!r}
_find = _machinery.PathFinder.find_spec
def _find_spec(name, path=None, target=None):
    return None if name.partition(".")[0] in _hidden else _find(name, path, target)
_machinery.PathFinder.find_spec = staticmethod(_find_spec)
assert all(_util.find_spec(n) is None for n in _hidden), "a hidden module was found"
"""


def run_hidden(hidden: set[str], code: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter in which the modules ``hidden`` are not installed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _HIDE.format(hidden=set(hidden)) + textwrap.dedent(code)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(hidden: set[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``medfast ARGV`` with the modules ``hidden``; its exit status is the process'."""
    return run_hidden(hidden, f"from medfast.cli import main\nraise SystemExit(main({argv!r}))\n", cwd)


def _pngs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


NOTE = "note: matplotlib is not installed: figures (PNG plots) are skipped"


# ------------------------------------------------------------------------------------------------------------
# data written by the parent process (which has the io readers)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory) -> Path:
    """A 40^3 1 mm CT phantom (HU): soft tissue with a bone ball."""
    nib = pytest.importorskip("nibabel")
    n = 40
    i, j, k = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    ct = np.full((n, n, n), 40.0, np.float32)
    ct[(i - 20) ** 2 + (j - 18) ** 2 + (k - 20) ** 2 < 36] = 1000.0
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def classification_without_matplotlib(tmp_path_factory):
    """Trains a tiny 2D classifier on PNGs, then classifies two of them, with matplotlib hidden."""
    Image = pytest.importorskip("PIL.Image")
    base = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (base / "data" / name).mkdir(parents=True)
        for i in range(4):
            img = (rng.random((32, 32)) * 100 + 120 * c).astype(np.uint8)
            Image.fromarray(img).save(base / "data" / name / f"{i}.png")
    cfg = base / "cls.yaml"
    cfg.write_text(f"""
task: classification
data: {{root: {base / 'data'}, shape: [32, 32], normalize: minmax, val_fraction: 0.25, cache: none}}
model: {{name: sononet, spatial_dims: 2, in_channels: 1, out_channels: 2, channels: [4],
        kwargs: {{encoding: nominal, convs_per_block: [1, 1]}}}}
trainer: {{max_steps: 2, batch_size: 2, val_every: 2, checkpoint_every: 2, device: cpu, threads: 1,
          progress: false, tensorboard: false, plots: true}}
""")
    train = run_cli({"matplotlib"}, ["train", str(cfg), "--out", str(base / "run")], base)
    predict = run_cli({"matplotlib"}, ["predict", "--model", str(base / "run" / "checkpoints" / "last.pt"),
                                       str(base / "data" / "a"), "--out", str(base / "pred"), "--device", "cpu"], base)
    return base, train, predict


@pytest.fixture(scope="module")
def synthesis_without_matplotlib(tmp_path_factory, phantom_ct):
    """Trains the synthesis task (validation and samples every step) with matplotlib hidden."""
    base = tmp_path_factory.mktemp("syn")
    cfg = base / "synth.yaml"
    cfg.write_text(f"""
task: synthesis
task_args: {{mode: image, source: {phantom_ct}, probe: L11-5v, n_lines: 16, n_samples: 64, depth_mm: 24,
            image_rows: 16, position: [20, -1, 20], shift_mm: [4, 2, 2], val_sets: 1, val_frames: 2,
            disc_channels: 4, disc_layers: 1, swd_patches: 64, samples_per_epoch: 8}}
model: {{spatial_dims: 2, channels: [4, 8], norm: instance}}
optim: {{name: adam, lr: 0.0005, betas: [0.5, 0.999], weight_decay: 0, scheduler: constant, grad_clip: null}}
trainer: {{max_steps: 2, batch_size: 2, val_every: 1, checkpoint_every: 2, device: cpu, threads: 1,
          progress: false, tensorboard: false, plots: true}}
""")
    return base, run_cli({"matplotlib"}, ["train", str(cfg), "--out", str(base / "run")], base)


# ------------------------------------------------------------------------------------------------------------
# without matplotlib: the work completes, the figures are skipped with one note
# ------------------------------------------------------------------------------------------------------------


def test_classification_trains_without_matplotlib(classification_without_matplotlib):
    base, train, _ = classification_without_matplotlib
    assert train.returncode == 0, train.stderr
    out = base / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and "classification" in results
    assert (out / "classification_report.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert _pngs(out) == []  # no curves, confusion matrices or cam.png
    assert train.stderr.count(NOTE) == 1 and "medfast train: " + NOTE in train.stderr


def test_classification_predicts_without_matplotlib(classification_without_matplotlib):
    base, _, predict = classification_without_matplotlib
    assert predict.returncode == 0, predict.stderr
    rows = (base / "pred" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("file,class,index") and len(rows) == 1 + 4
    assert _pngs(base / "pred") == []  # no Grad-CAM PNGs
    assert "medfast predict: " + NOTE in predict.stderr


def test_predict_no_cam_writes_no_cam_pngs(classification_without_matplotlib, tmp_path):
    pytest.importorskip("matplotlib")
    from medfast.cli import main

    base, train, _ = classification_without_matplotlib
    assert train.returncode == 0, train.stderr
    ckpt, images = str(base / "run" / "checkpoints" / "last.pt"), str(base / "data" / "a")
    assert main(["predict", "--model", ckpt, images, "--out", str(tmp_path / "cam"), "--device", "cpu"]) == 0
    assert len(_pngs(tmp_path / "cam")) == 4  # (with matplotlib, the maps are written by default)
    assert main(["predict", "--model", ckpt, images, "--out", str(tmp_path / "nocam"), "--device", "cpu",
                 "--no-cam"]) == 0
    assert (tmp_path / "nocam" / "predictions.csv").is_file() and _pngs(tmp_path / "nocam") == []


def test_synthesis_trains_without_matplotlib(synthesis_without_matplotlib):
    base, train = synthesis_without_matplotlib
    assert train.returncode == 0, train.stderr
    out = base / "run"
    for name in ("results.json", "synthesis_metrics.json", "checkpoints/last.pt", "val_log.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "val_log.jsonl").read_text().splitlines()) == 2  # both validations ran
    assert _pngs(out) == []
    assert train.stderr.count(NOTE) == 1


def test_simulate_without_matplotlib(phantom_ct, tmp_path):
    proc = run_cli({"matplotlib"}, ["simulate", str(phantom_ct), "--out", str(tmp_path / "sim"), "--lines", "16",
                                    "--samples", "64", "--frames", "2", "--batch", "2", "--device", "cpu",
                                    "--centre", "20,20,20"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "sim"
    assert (out / "frames.nii.gz").is_file() and json.loads((out / "simulate.json").read_text())["frames"] == 2
    assert _pngs(out) == ["frames/frame_000.png", "frames/frame_001.png"]  # no figure.png
    assert "medfast simulate: " + NOTE in proc.stderr


def test_register_without_matplotlib(tmp_path):
    # the overlay PNG needed matplotlib: the registration ran, then the command failed at its last file
    import nibabel as nib
    import numpy as np

    g = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"), -1).astype(float)
    for name, c in (("f", (5, 6, 6)), ("m", (6, 5, 6))):
        blob = np.exp(-(((g - c) / 3) ** 2).sum(-1)) * 100
        nib.save(nib.Nifti1Image(blob.astype(np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "reg"
    out.mkdir()
    (out / "overlay.png").write_bytes(b"an earlier run's")
    proc = run_cli({"matplotlib"}, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--out",
                                    str(out), "--affine-levels", "1", "--affine-iters", "2", "--deform-levels", "1",
                                    "--deform-iters", "2", "--kernel-size", "3", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "warped.nii.gz").is_file() and (out / "metrics.json").is_file()
    assert not (out / "overlay.png").exists() and "medfast register: " + NOTE in proc.stderr


# ------------------------------------------------------------------------------------------------------------
# a missing optional module: one line naming the extra, exit status 2, in every command
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    return train_tiny_segmentation(tmp_path_factory.mktemp("seg"), steps=1)


def _needs(proc: subprocess.CompletedProcess, command: str, module: str, extra: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == (
        f'medfast {command}: error: needs {module}: pip install "medfast[{extra}]"')


def test_train_names_the_extra(segmentation_run, tmp_path):
    _, config, _ = segmentation_run
    _needs(run_cli({"nibabel"}, ["train", str(config), "--out", str(tmp_path / "run")], tmp_path),
           "train", "nibabel", "io")


def test_predict_names_the_extra(segmentation_run, tmp_path):
    data, _, checkpoint = segmentation_run
    image = sorted((data / "images").glob("*.nii.gz"))[0]
    _needs(run_cli({"nibabel"}, ["predict", "--model", str(checkpoint), str(image), "--out", str(tmp_path / "p"),
                                 "--device", "cpu"], tmp_path), "predict", "nibabel", "io")


def test_demo_names_the_extra(phantom_ct, tmp_path):
    _needs(run_cli({"nibabel"}, ["demo", "--image", str(phantom_ct), "--out", str(tmp_path / "d"), "--device", "cpu",
                                 "--repeats", "1"], tmp_path), "demo", "nibabel", "io")


def test_simulate_names_the_extra(phantom_ct, tmp_path):
    _needs(run_cli({"nibabel"}, ["simulate", str(phantom_ct), "--out", str(tmp_path / "s"), "--frames", "2"],
                   tmp_path), "simulate", "nibabel", "io")


def test_synthesize_names_the_extra(synthesis_without_matplotlib, tmp_path):
    base, train = synthesis_without_matplotlib
    assert train.returncode == 0, train.stderr
    _needs(run_cli({"PIL"}, ["synthesize", str(base / "run" / "checkpoints" / "last.pt"), "--out",
                             str(tmp_path / "g"), "--frames", "2", "--device", "cpu"], tmp_path),
           "synthesize", "PIL", "io")


def test_command_error_formats_both_kinds(capsys):
    from medfast.cli import command_error

    try:
        try:
            raise ModuleNotFoundError("No module named 'pydicom'", name="pydicom")
        except ImportError as exc:
            raise ValueError("x.dcm: reading .dcm files needs pydicom") from exc
    except ValueError as exc:
        assert command_error("predict", exc) == 2
    assert capsys.readouterr().err == 'medfast predict: error: needs pydicom: pip install "medfast[io]"\n'
    assert command_error("predict", ValueError("bad --set")) == 1
    assert capsys.readouterr().err == "medfast predict: error: bad --set\n"


# ------------------------------------------------------------------------------------------------------------
# figures leave the user's matplotlib backend alone
# ------------------------------------------------------------------------------------------------------------

_USER_BACKEND = """\
# a stand-in for an inline (Jupyter) or GUI backend: show() reports the figures it displays
from matplotlib.backend_bases import _Backend, FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
SHOWN = []
@_Backend.export
class _UserBackend(_Backend):
    FigureCanvas = FigureCanvasAgg
    FigureManager = FigureManagerBase
    @staticmethod
    def show(*args, **kwargs):
        import matplotlib.pyplot as plt
        SHOWN.append(list(plt.get_fignums()))
"""

_WRITERS = """\
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("module://userbackend")
import matplotlib.pyplot as plt
import numpy as np, torch
out = Path(sys.argv[1])
backends = {}
def check(name, write):
    plt.figure()  # the user's own figure, open while medfast writes its PNGs
    write()
    backends[name] = (matplotlib.get_backend(), plt.get_fignums())
    plt.show()
    plt.close("all")
g = torch.Generator().manual_seed(0)
from medfast.tasks.classification import save_confusion_png, save_cam_png
check("confusion", lambda: save_confusion_png(np.array([[3, 1], [0, 4]]), out / "confusion.png", ["a", "b"]))
check("cam", lambda: save_cam_png(torch.rand(3, 1, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g),
                                  out / "cam.png", ["x", "y", "z"]))
from medfast.tasks.synthesis import save_grid
check("grid", lambda: save_grid(out / "grid.png", [("a", torch.rand(4, 1, 16, 20, generator=g)),
                                                   ("b", torch.rand(4, 1, 16, 20, generator=g))], title="t"))
from medfast.tasks.registration import save_overlay
check("overlay", lambda: save_overlay(out / "overlay.png", torch.rand(8, 9, 10, generator=g),
                                      {"before": torch.rand(8, 9, 10, generator=g)}, title="t"))
from medfast.train.trainer import plot_curves
check("curves", lambda: plot_curves([{"step": i, "loss": 1 / i} for i in range(1, 30)],
                                    [{"step": i, "dice_1": i / 10, "dice_mean": i / 10} for i in range(1, 5)],
                                    out / "curves.png"))
from medfast.bench import runner
meta = {"device_name": "cpu", "host": "h", "threads": 1, "quick": True, "date": "20990101-000000"}
check("bench", lambda: runner.plot(meta, [runner.Row("s", "case", "peer", 1.0, 3.0, 3.0, 5.0, 7.0)],
                                   out / "bench.png"))
from medfast.ultrasound.figures import physics_figure
check("physics", lambda: physics_figure(str(out / "physics.png")))
from medfast.train import Trainer, load_config  # curves.png and samples_*.png (SegmentationTask.save_samples)
cfg = load_config([sys.argv[2]], [f"trainer.out_dir={out / 'run'}", "trainer.max_steps=1", "trainer.val_every=1",
                                  "trainer.checkpoint_every=1", "trainer.plots=true",
                                  "data.val_fraction=0.5"])
check("fit", lambda: Trainer(cfg).fit())
import userbackend
print(json.dumps({"backends": backends, "shown": userbackend.SHOWN}))
"""

# (width, height) of each PNG, as the writers made them before they stopped using pyplot (dpi x figsize)
_SIZES = {"confusion.png": (400, 280), "cam.png": (621, 225), "grid.png": (630, 266), "overlay.png": (288, 864),
          "curves.png": (968, 374), "physics.png": (1760, 396), "run/curves.png": (1452, 374),
          "run/samples_step0000001.png": (900, 900)}


def test_figure_writers_keep_the_users_backend(segmentation_run, tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    _, config, _ = segmentation_run
    (tmp_path / "userbackend.py").write_text(_USER_BACKEND)
    (tmp_path / "out").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", _WRITERS, str(tmp_path / "out"), str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (backend, figures) in got["backends"].items():
        # the backend is still the user's, and medfast added no figure to pyplot's list
        assert (backend, figures) == ("module://userbackend", [1]), name
    assert got["shown"] == [[1]] * len(got["backends"])  # and plt.show() still displays the user's figure
    for name, size in _SIZES.items():
        with Image.open(tmp_path / "out" / name) as im:
            assert (im.format, im.size) == ("PNG", size), name
            im.load()  # the whole file decodes
    with Image.open(tmp_path / "out" / "bench.png") as im:  # (tight bounding box: its size follows the fonts)
        assert im.format == "PNG" and im.size[0] > 1000
        im.load()


# ------------------------------------------------------------------------------------------------------------
# pydicom 3 and the memory probe without psutil
# ------------------------------------------------------------------------------------------------------------


def test_pydicom_2_is_refused_with_the_version_needed(tmp_path, monkeypatch):
    import types

    from medfast.data import DatasetError
    from medfast.tasks.classification import read_image

    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 132)
    monkeypatch.setitem(sys.modules, "pydicom", types.SimpleNamespace(__version__="2.4.4"))  # `import pydicom`
    with pytest.raises(DatasetError, match=r"x\.dcm: reading \.dcm files needs pydicom >= 3 \(found 2\.4\.4\)"):
        read_image(path)


def test_every_extra_requires_pydicom_3():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = [req for reqs in project["optional-dependencies"].values() for req in reqs if req.startswith("pydicom")]
    assert pins and set(pins) == {"pydicom>=3"}


def test_available_memory_without_psutil_is_measured(tmp_path):
    psutil = pytest.importorskip("psutil")  # the reference: what psutil reports in this process
    if not (Path("/proc/meminfo").is_file() or hasattr(os, "sysconf")):
        pytest.skip("no /proc/meminfo or sysconf")
    proc = run_hidden({"psutil"}, """
        import torch
        from medfast.ultrasound.simulate import _available_bytes
        print(_available_bytes(torch.device("cpu")))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got, ref = int(proc.stdout.split()[-1]), psutil.virtual_memory().available
    assert got != 8 << 30
    assert abs(got - ref) < max(0.25 * ref, 512 << 20)  # (other processes allocate meanwhile)
