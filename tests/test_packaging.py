"""Packaging: declared dependencies and extras cover the imports, the command line names the extra of a
missing optional module, a missing compiled extension is one clear error, release settings."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfast import cli

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# import name -> distribution name, where they differ beyond case and - / _
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "interpol": "torch-interpol",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements) -> set[str]:
    """Normalized distribution names of PEP 508 requirement strings."""
    return {_normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)) for req in requirements}


def _distribution(module: str) -> str:
    return _normalize(DISTRIBUTIONS.get(module, module))


def _required() -> set[str]:
    """The dependencies of a wheel: [project] dependencies plus what the [[tool.dynamic-metadata]] providers add
    (build_support/torch_pin.py: torch and numpy; the template entry: the command line's pyyaml, tqdm)."""
    reqs = list(PYPROJECT["project"].get("dependencies", []))
    for entry in PYPROJECT["tool"].get("dynamic-metadata", []):
        provider = entry["provider"]
        if provider == "scikit_build_core.metadata.template":
            assert entry["field"] == "dependencies"
            reqs += entry["result"]
        else:
            path = ROOT / provider["path"] / f"{provider['module']}.py"
            spec = importlib.util.spec_from_file_location("_medfast_test_provider", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            reqs += module.dynamic_metadata({}, {}).get("dependencies", [])
    return _names(reqs)


def _extra(name: str) -> set[str]:
    return _names(PYPROJECT["project"]["optional-dependencies"][name])


def _third_party_imports(files, top_level_only: bool = False) -> dict[str, set[str]]:
    """{top-level module: files importing it} of the absolute imports in ``files`` that are neither the
    standard library nor medfast / the tests themselves; ``top_level_only``: only imports run at import time
    of the module (its body, including module-level try/if blocks), not those inside functions."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        if top_level_only:
            nodes = []
            for stmt in tree.body:
                nodes += list(ast.walk(stmt)) if isinstance(stmt, (ast.Try, ast.If)) else [stmt]
        else:
            nodes = list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("medfast", "tests", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


# ---------------------------------------------------------------------------------------------
# Dependencies and extras
# ---------------------------------------------------------------------------------------------


def test_every_third_party_import_of_medfast_is_declared():
    imports = _third_party_imports(sorted((ROOT / "medfast").rglob("*.py")))
    assert {"torch", "numpy", "yaml", "nibabel"} <= imports.keys()  # the scan itself works
    declared = _required() | set().union(*map(_extra, PYPROJECT["project"]["optional-dependencies"]))
    missing = {m: sorted(files) for m, files in imports.items() if _distribution(m) not in declared}
    assert not missing, f"imported by medfast but in no dependency or extra of pyproject.toml: {missing}"
    # the cli extra (and all) cover every command: everything medfast imports is required or in them
    not_cli = sorted(m for m in imports if _distribution(m) not in _required() | _extra("cli"))
    assert not not_cli, f"not installed by medfast[cli]: {not_cli}"
    assert _extra("cli") <= _extra("all") and _extra("io") <= _extra("cli") and _extra("bench") <= _extra("all")


def test_yaml_and_tqdm_are_required_torch_is_pinned_by_the_build():
    required = _required()
    assert {"torch", "numpy", "pyyaml", "tqdm"} <= required
    assert "dependencies" in PYPROJECT["project"]["dynamic"]


def test_test_extra_is_enough_to_collect_the_suite():
    files = sorted((ROOT / "tests").glob("*.py"))
    imports = _third_party_imports(files, top_level_only=True)
    assert "pytest" in imports and "yaml" in imports
    have = _required() | _extra("test")
    missing = {m: sorted(f) for m, f in imports.items() if _distribution(m) not in have}
    assert not missing, f"imported at module level by tests but not installed by medfast[test]: {missing}"


@pytest.mark.parametrize("module", sorted(cli.OPTIONAL_MODULES))
def test_cli_names_an_extra_that_installs_the_module(module):
    extra = cli.OPTIONAL_MODULES[module]
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    assert _distribution(module) in _extra(extra) | _required()


# ---------------------------------------------------------------------------------------------
# The command line and missing optional modules
# ---------------------------------------------------------------------------------------------


def test_missing_optional_module_is_one_line_with_the_extra(monkeypatch, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: segmentation\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ModuleNotFoundError
    assert cli.main(["train", str(config), "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.err == 'medfast train: error: needs yaml: pip install "medfast[cli]"\n'
    assert captured.out == ""


@pytest.mark.parametrize(
    "error, message",
    [
        (ModuleNotFoundError("No module named 'PIL.Image'", name="PIL.Image"),
         'medfast info: error: needs PIL: pip install "medfast[io]"\n'),
        (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
         'medfast info: error: needs matplotlib: pip install "medfast[cli]"\n'),
    ],
)
def test_missing_module_names_its_extra(monkeypatch, capsys, error, message):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_info", fails)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == message


def test_error_raised_from_a_missing_module_names_its_extra(monkeypatch, capsys):
    def fails(args):  # as medfast.data.io does: its own message, raised from the ModuleNotFoundError
        try:
            raise ModuleNotFoundError("No module named 'nibabel'", name="nibabel")
        except ImportError as exc:
            raise ImportError("reading NIfTI needs nibabel: pip install nibabel") from exc

    monkeypatch.setattr(cli, "_cmd_info", fails)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == 'medfast info: error: needs nibabel: pip install "medfast[io]"\n'


@pytest.mark.parametrize(
    "error",
    [ModuleNotFoundError("No module named 'not_ours'", name="not_ours"), ImportError("cannot import name 'x'")],
)
def test_other_import_errors_propagate(monkeypatch, error):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_info", fails)
    with pytest.raises(ImportError) as info:
        cli.main(["info"])
    assert info.value is error


def test_version_comes_from_the_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"medfast {version('medfast')}"


# ---------------------------------------------------------------------------------------------
# The compiled extension missing
# ---------------------------------------------------------------------------------------------

# Imports the copy on PYTHONPATH even where medfast is an editable install (scikit-build-core's editable
# finder sits in front of sys.meta_path and would redirect `medfast` to the source tree).
_SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
"""


@pytest.fixture(scope="module")
def without_extension(tmp_path_factory):
    """(environment, package dir): the Python package medfast without its compiled extension, first on the path."""
    base = tmp_path_factory.mktemp("no_extension")
    package = base / "site" / "medfast"
    shutil.copytree(ROOT / "medfast", package, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (base / "custom").mkdir()
    (base / "custom" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([str(base / "site"), str(base / "custom")])
    script = base / "bin" / "medfast"  # stands for the console script pip writes
    script.parent.mkdir()
    script.write_text("import sys\n\nfrom medfast.cli import main\n\nsys.exit(main())\n")
    return env, package, script


def _run(args, env, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_missing_extension_is_one_clear_import_error(without_extension, tmp_path):
    env, package, _ = without_extension
    r = _run(["-c", "import medfast"], env, tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("Traceback (most recent call last)") == 1, r.stderr
    for noise in ("circular import", "partially initialized", "direct cause", "During handling"):
        assert noise not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: medfast's compiled extension could not be loaded: medfast._C (_C*.so) "
                           f"is not in {package}."), last
    assert "pip install --no-build-isolation" in last  # a source checkout: rebuild
    assert "wheel built for torch" in last  # a wheel: reinstall the right one


@pytest.mark.parametrize("how", ["script", "-m"])
@pytest.mark.parametrize("args", [["--help"], ["info"]])
def test_cli_without_extension_prints_one_line(without_extension, tmp_path, how, args):
    env, package, script = without_extension
    r = _run([str(script) if how == "script" else "-m", *([] if how == "script" else ["medfast"]), *args],
             env, tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("medfast: error: medfast's compiled extension could not be loaded"), lines[0]
    assert str(package) in lines[0] and r.stdout == ""


# ---------------------------------------------------------------------------------------------
# Release settings
# ---------------------------------------------------------------------------------------------


def test_license_file_is_declared_and_is_apache_2():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the full text


def test_package_is_marked_typed():
    # PEP 561: without medfast/py.typed a type checker ignores medfast's annotations (every import an error)
    import medfast

    assert (Path(medfast.__file__).parent / "py.typed").is_file()
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]
    # the wheel takes every file under medfast/ except the benchmark logs
    wheel = PYPROJECT["tool"]["scikit-build"]["wheel"]
    assert wheel["packages"]["medfast"] == "medfast" and not any("typed" in e for e in wheel["exclude"])


def test_sdist_leaves_out_benchmark_logs_but_keeps_the_build():
    skb = PYPROJECT["tool"]["scikit-build"]
    excluded = skb["sdist"]["exclude"]
    assert "benchmarks/results/" in excluded and ".ci/" in excluded
    for needed in ("csrc", "build_support", "CMakeLists.txt", "medfast", "benchmarks", "LICENSE"):
        assert not any(needed == e.strip("/") for e in excluded), needed


def test_release_wheels_do_not_vendor_libgomp():
    repair = PYPROJECT["tool"]["cibuildwheel"]["repair-wheel-command"]
    for lib in ("libgomp.so*", "libtorch*.so", "libc10*.so"):
        assert f"--exclude '{lib}'" in repair


def test_cpu_wheel_tests_against_the_cpu_torch_it_was_built_with():
    script = (ROOT / "scripts" / "build_wheels.sh").read_text()
    pin = re.search(r"torch==([0-9.]+)", PYPROJECT["tool"]["cibuildwheel"]["before-build"]).group(1)
    cpu = script[script.index("cpu)"):]
    assert re.search(r'TORCH_CPU="pip install --index-url https://download.pytorch.org/whl/cpu '
                     rf"'torch=={re.escape(pin)}'\"", cpu), cpu
    assert 'export CIBW_BEFORE_TEST="$TORCH_CPU"' in cpu and 'CIBW_BEFORE_BUILD="$TORCH_CPU' in cpu


def test_install_docs_name_the_build_tools_of_pyproject():
    requires = PYPROJECT["build-system"]["requires"]
    skbuild = next(r for r in requires if r.startswith("scikit-build-core"))
    cmake = re.search(r"cmake_minimum_required\(VERSION ([0-9.]+)\)", (ROOT / "CMakeLists.txt").read_text()).group(1)
    line = f'pip install "{skbuild}" "cmake>={cmake}" ninja numpy'
    assert line in (ROOT / "README.md").read_text()
    assert line + " build" in (ROOT / "docs" / "install.md").read_text()


def _torch_pin(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "build_support"))
    import torch_pin

    return torch_pin


def test_cpu_wheel_carries_a_local_version_label(monkeypatch):
    """The CPU-only and the CUDA wheel of one release differ in name and version (torch's own "+cpu")."""
    torch_pin = _torch_pin(monkeypatch)
    monkeypatch.setattr(torch_pin, "_state", "wheel")
    monkeypatch.delenv("MEDFAST_LOCAL_VERSION", raising=False)
    assert torch_pin.dynamic_metadata({}, {})["version"] == torch_pin.VERSION
    # the fallback of a never-installed source tree is the same release
    assert f'return "{torch_pin.VERSION}"' in (ROOT / "medfast" / "__init__.py").read_text()
    monkeypatch.setenv("MEDFAST_LOCAL_VERSION", "cpu")
    assert torch_pin.dynamic_metadata({}, {})["version"] == f"{torch_pin.VERSION}+cpu"
    # one version per build (scikit-build-core refuses a wheel version other than its sdist's): the release
    # scripts build the sdist without the label
    assert "version" not in torch_pin.dynamic_wheel({})
    monkeypatch.setattr(torch_pin, "_state", "sdist")
    assert torch_pin.dynamic_metadata({}, {})["version"] == f"{torch_pin.VERSION}+cpu"
    monkeypatch.setattr(torch_pin, "_state", "wheel")
    monkeypatch.setenv("MEDFAST_LOCAL_VERSION", "CPU build")
    with pytest.raises(ValueError, match="MEDFAST_LOCAL_VERSION='CPU build'"):
        torch_pin.dynamic_metadata({}, {})
    # the release scripts set it for the CPU wheel only
    cpu = (ROOT / "scripts" / "build_wheels.sh").read_text().split("cpu)")[1]
    assert 'CIBW_ENVIRONMENT="MEDFAST_CUDA=0 MEDFAST_LOCAL_VERSION=cpu"' in cpu
    assert "MEDFAST_LOCAL_VERSION" not in str(PYPROJECT["tool"]["cibuildwheel"]["environment"])
    check = (ROOT / "scripts" / "wheel_check.sh").read_text()
    assert "MEDFAST_LOCAL_VERSION=cpu .venv/bin/python -m build --no-isolation --wheel" in check
    assert ".venv/bin/python -m build --no-isolation --sdist -o" in check


def test_module_version_is_the_distribution_version(monkeypatch):
    from importlib.metadata import version

    import medfast

    assert medfast.__version__ == version("medfast")
    # (the editable install's 0.1.0 equals the fallback: a labelled distribution tells them apart)
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0+cpu")
    assert medfast._distribution_version() == "0.1.0+cpu"
