"""Documentation that drifted from the code (a docs hunt): defaults, missing-module errors, parameter lists,
help texts, counts and tables that the docs state and the code decides."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import medfast
from medfast import cli

ROOT = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    """``text`` with every run of whitespace one space (help texts wrap where the terminal width says)."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# 1. The LNCC module's default window
# ---------------------------------------------------------------------------------------------


def test_lncc_module_default_window_is_documented():
    """The module defaults to MONAI's kernel_size=3, lncc_loss to 9: the docs said "Module form of lncc_loss" and put
    both in one table row after kernel_size=9."""
    from medfast.losses import LocalNormalizedCrossCorrelationLoss as L

    assert inspect.signature(L).parameters["kernel_size"].default == 3
    assert inspect.signature(medfast.lncc_loss).parameters["kernel_size"].default == 9
    assert "``kernel_size=3``" in L.__doc__ and "``kernel_size=9``" in L.__doc__
    row = next(line for line in (ROOT / "docs" / "registration.md").read_text().splitlines()
               if line.startswith("| `medfast.lncc_loss("))
    assert "`losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=3, ...)`" in row


# ---------------------------------------------------------------------------------------------
# 2-3. A missing optional module is named before any work, in the one documented line
# ---------------------------------------------------------------------------------------------


def _needs(command: str, module: str, extra: str) -> str:
    return f'medfast {command}: error: needs {module}: pip install "medfast[{extra}]"'


def _not_reached(*args, **kwargs):
    raise AssertionError("the work started before the missing module was named")


@pytest.mark.parametrize("module, extra", [("nibabel", "io"), ("PIL", "io")])
def test_simulate_without_a_needed_module_fails_before_any_work(tmp_path, monkeypatch, capsys, module, extra):
    """Without nibabel (or pillow) the whole sweep was simulated and the PNG frames written before exit 2."""
    import medfast.ultrasound

    monkeypatch.setattr(medfast.ultrasound, "simulate", _not_reached)
    out = tmp_path / "sim"
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError(name=module)
    rc = cli.main(["simulate", "--frames", "2", "--lines", "32", "--samples", "128", "--out", str(out)])
    assert rc == 2
    assert _needs("simulate", module, extra) in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def small_nifti(tmp_path) -> Path:
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).random((12, 14, 10)).astype(np.float32)
    path = tmp_path / "small.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    return path


@pytest.mark.parametrize("module", ["matplotlib", "nibabel"])
def test_demo_without_a_needed_module_fails_before_any_work(tmp_path, monkeypatch, capsys, small_nifti, module):
    """Without matplotlib the demo deformed, timed and wrote the NIfTIs, then exited 2 at the figure."""
    from medfast import demo

    monkeypatch.setattr(demo, "load_volume", _not_reached)
    out = tmp_path / "demo"
    monkeypatch.setitem(sys.modules, module, None)
    rc = cli.main(["demo", "--image", str(small_nifti), "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 2
    assert _needs("demo", module, cli.OPTIONAL_MODULES[module]) in capsys.readouterr().err
    assert not out.exists()


def test_demo_without_nilearn_is_the_documented_missing_module_error(tmp_path, monkeypatch, capsys):
    """docs/install.md: a command that misses a module says `needs X: pip install "medfast[extra]"` and exits 2; the
    demo without nilearn printed its own message and exited 1. The way around it (--image) is still said."""
    from medfast import demo

    monkeypatch.setattr(demo, "load_volume", _not_reached)
    out = tmp_path / "demo"
    monkeypatch.setitem(sys.modules, "nilearn", None)  # (importlib.util.find_spec then returns None)
    rc = cli.main(["demo", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert _needs("demo", "nilearn", "cli") in err
    assert "--image NIFTI" in err
    assert not out.exists()
    assert cli.OPTIONAL_MODULES["nilearn"] == "cli"
    install = _flat((ROOT / "docs" / "install.md").read_text())
    assert 'says `needs X: pip install "medfast[extra]"` and exits with status 2' in install


# ---------------------------------------------------------------------------------------------
# 4. Every parameter is in its docstring's Parameters section
# ---------------------------------------------------------------------------------------------


def _documented(doc: str | None) -> set[str]:
    """The names a numpy-style ``Parameters`` section lists (``a, b : type`` lines at the section's indent)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names: set[str] = set()
    for i in range(len(lines) - 1):
        if lines[i].strip() != "Parameters" or set(lines[i + 1].strip()) != {"-"}:
            continue
        for j in range(i + 2, len(lines)):
            line = lines[j]
            if j + 1 < len(lines) and line.strip() and set(lines[j + 1].strip()) == {"-"}:
                break  # the next section's title
            if line and not line[0].isspace():
                names.update(n.strip().lstrip("*") for n in line.split(" : ")[0].split(","))
    return names


def _documented_callables():
    from medfast import losses
    from medfast.tasks import classification, registration, synthesis

    return [
        synthesis.SynthesisSource, synthesis.load_source, synthesis.generate, synthesis.save_grid, synthesis.ssim,
        classification.save_cam_png, classification.ImageFolderDataset,
        registration.RegistrationNet, registration.mni_t1_path,
        losses.DiceCELoss, losses.DiceLoss, losses.LocalNormalizedCrossCorrelationLoss, losses.BendingEnergyLoss,
        losses.GradientNormLoss, losses.DiffusionLoss, losses.GlobalMutualInformationLoss, losses.SSDLoss,
        losses.ssd_loss, medfast.cross_entropy, medfast.dice_ce_loss, medfast.dice_loss,
    ]


@pytest.mark.parametrize("obj", _documented_callables(), ids=lambda o: o.__qualname__)
def test_every_parameter_is_documented(obj):
    assert (obj.__doc__ or "").strip(), f"{obj.__qualname__} has no docstring"
    params = [name for name, p in inspect.signature(obj).parameters.items()
              if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    docs = [obj.__doc__]
    if inspect.isclass(obj) and obj.__init__ is not object.__init__:
        docs.append(obj.__init__.__doc__)
    documented = set().union(*(_documented(d) for d in docs))
    missing = [p for p in params if p not in documented]
    assert not missing, f"{obj.__qualname__}: {missing} not in its docstring's Parameters section"


def test_the_parameter_parser_sees_a_gap():
    def f(a, b, *args, c=1, **kwargs):
        """Doc.

        Parameters
        ----------
        a, b : int
            Numbers.

        Returns
        -------
        c : int
            Not a parameter.
        """

    assert _documented(f.__doc__) == {"a", "b"}


# ---------------------------------------------------------------------------------------------
# 5. medfast predict runs every task's checkpoint
# ---------------------------------------------------------------------------------------------


def test_predict_help_names_every_task(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = _flat(capsys.readouterr().out)
    assert "predict segment, classify or synthesize with a trained checkpoint (by its task)" in top
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = _flat(capsys.readouterr().out)
    for part in ("Segmentation: segments each image", "Classification: writes predictions.csv",
                 "Synthesis: generates ultrasound frames"):
        assert part in text


# ---------------------------------------------------------------------------------------------
# 6. Counts and tables
# ---------------------------------------------------------------------------------------------


def _requirement(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def test_install_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = {}
    for line in (ROOT / "docs" / "install.md").read_text().splitlines():
        found = re.match(r"^\| `(\w+)` \| ([^|]*) \|", line)
        if found:
            rows[found.group(1)] = found.group(2)

    def expand(name: str) -> set[str]:
        out = set()
        for part in re.split(r"[,+]", rows[name]):
            part = part.strip()
            inner = re.fullmatch(r"`(\w+)`", part)
            out |= expand(inner.group(1)) if inner else {_requirement(part)}
        return out

    assert set(rows) == set(extras)
    for name, requirements in extras.items():
        assert expand(name) == {_requirement(r) for r in requirements}, name


def test_classification_example_lists_every_network():
    from medfast.tasks.classification.task import check_config
    from medfast.train import ConfigError
    from medfast.train.config import config_from_dict

    with pytest.raises(ConfigError) as exc:
        check_config(config_from_dict({"task": "classification", "model": {"name": "no-such-network"}}))
    accepted = set(re.findall(r"'(\w+)'", str(exc.value).split(":", 1)[1]))
    text = (ROOT / "configs" / "classification_example.yaml").read_text()
    comment = re.search(r"^model:\n(?:  .*\n)*?  name: \w+ +# (.*)$", text, re.M).group(1)
    listed = {part.split()[0] for part in comment.split("|")}
    assert listed == accepted == {"sononet", "resnet", "densenet"}
