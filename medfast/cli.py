"""The ``medfast`` command line: ``medfast info``, ``medfast demo`` (``python -m medfast`` too).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to the function that runs it; adding a subcommand means writing one such pair and
listing it in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _format_info(info: dict) -> str:
    """Aligned, human-readable text for ``medfast.build_info()``."""
    cuda_kernels = _yes_no(info["cuda_kernels"])
    if info["cuda_kernels"]:
        cuda_kernels += f" (archs: {info['cuda_archs'] or 'unknown'})"
    if info["gpu_visible"]:
        gpus = ", ".join(f"[{i}] {name}" for i, name in enumerate(info["gpus"]))
    else:
        gpus = "none visible"
    rows = [
        ("medfast", info["medfast"]),
        ("torch", info["torch"]),
        ("torch built against", info["torch_built_against"]),
        ("CUDA kernels", cuda_kernels),
        ("CUDA version", info["cuda_version"] or "-"),
        ("OpenMP", _yes_no(info["openmp"])),
        ("CPU SIMD path", info.get("cpu_simd", "-")),
        ("compiler", info.get("compiler") or "-"),
        ("CPU threads", f"{info['cpu_threads']} (of {info.get('cpu_count') or '?'} cores)"),
        ("GPU", gpus),
    ]
    variants = info.get("cuda_variants")
    if info["cuda_kernels"] and variants:
        rows.append(("CUDA variants", f"ultrasound march {variants['ussim_march']} (MEDFAST_USSIM_CUDA_MARCH), "
                                      f"ultrasound scatter {variants['ussim_scatter']} (MEDFAST_USSIM_CUDA_SCATTER), "
                                      f"warp scatter {variants['warp_scatter']} (MEDFAST_WARP_CUDA_SCATTER), "
                                      f"warp forward {variants['warp_forward']} (MEDFAST_WARP_CUDA_FORWARD), "
                                      f"loss sums {variants['loss_sums']} (MEDFAST_LOSS_CUDA_SUMS)"))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    if info["gpu_visible"] and not info["cuda_kernels"]:
        # The commonest surprise: a GPU machine with a CPU-only build silently runs on CPU.
        lines.append(
            "note: a GPU is visible but medfast was built without CUDA kernels; rebuild with a CUDA "
            "toolkit on PATH (scripts/setup.sh) to use it"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from medfast import build_info

    info = build_info()
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="versions, build options and visible devices",
        description="Shows how medfast was built (torch, CUDA kernels, OpenMP) and what it can use now.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # finite too: `demo --magnitude inf` was accepted and wrote a NaN displacement field (`not nan > 0` holds already)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # (argparse's own message would name this function: "invalid _positive_int value")
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from medfast.demo import DemoError, run_warp_demo

    try:
        run_warp_demo(
            args.out,
            device=args.device,
            seed=args.seed,
            magnitude=args.magnitude,
            repeats=args.repeats,
            image_path=args.image,
        )
    except (DemoError, ImportError) as exc:
        # Expected setup problems (missing nilearn, no CUDA build, unreadable image): no traceback.
        return command_error("demo", exc)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from medfast.demo import DEFAULT_MAGNITUDE, DEFAULT_OUT, DEFAULT_REPEATS

    p = sub.add_parser(
        "demo",
        help="warp the MNI152 T1 by a random smooth deformation and time it against grid_sample",
        description=(
            "Warps the MNI152 2009a T1 template (shipped in the nilearn wheel) by a random diffeomorphic "
            "deformation, writes NIfTI images, a PNG figure and demo.json, and times medfast.warp "
            "against the F.grid_sample route."
        ),
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when a GPU is visible and medfast has CUDA kernels (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random deformation (default: 0)")
    p.add_argument(
        "--magnitude",
        type=_positive_float,
        default=DEFAULT_MAGNITUDE,
        metavar="VOXELS",
        help="largest displacement, in voxels (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=DEFAULT_REPEATS,
        help="timed runs per measurement; the median is reported (default: %(default)s)",
    )
    p.add_argument("--image", default=None, metavar="NIFTI", help="warp this 3D NIfTI instead of the MNI152 template")
    p.set_defaults(func=_cmd_demo)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from medfast.train.commands import add_train_arguments, run_train

    p = sub.add_parser(
        "train",
        help="train a network from YAML configs (segmentation, ...); works under torchrun",
        description=(
            "Trains the task named by the config (YAML files merged in order, --set overrides), writing the "
            "resolved config, logs, curves, checkpoints and results to trainer.out_dir. Under torchrun it "
            "trains with DistributedDataParallel."
        ),
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from medfast.train.commands import add_predict_arguments, run_predict

    p = sub.add_parser(
        "predict",
        help="segment, classify or synthesize with a trained checkpoint (by its task)",
        description=(
            "Runs a checkpoint written by medfast train on new inputs, as its task does. Segmentation: segments "
            "each image with sliding-window inference and writes <name>_seg.nii.gz label maps with the input's "
            "affine and header (a case stored one file per channel, nnU-Net's <name>_0000, <name>_0001, ..., "
            "given as files or a folder, is one image: its _0000 file's affine and header). Classification: "
            "writes predictions.csv (class and, with --probabilities, class probabilities per image) and, for 2D "
            "images, Grad-CAM overlays (cam/*.png). Synthesis: generates ultrasound frames at the poses of each "
            "probe-pose file (JSON/.npy, or a folder of them) as medfast synthesize writes them, into --out "
            "(one file) or --out/<its name less the suffix> (several)."
        ),
    )
    add_predict_arguments(p)
    p.set_defaults(func=run_predict)


def _cmd_register(args: argparse.Namespace) -> int:
    from medfast.tasks.registration import run_register

    return run_register(args)


def _add_register(sub: argparse._SubParsersAction) -> None:
    from medfast.tasks.registration import configure_register_parser

    p = sub.add_parser(
        "register",
        help="register a moving image to a fixed one (instance optimization or a trained model)",
        description=(
            "Affine then deformable registration of MOVING to FIXED (NIfTI) by instance optimization "
            "(LNCC + bending energy, optional label Dice), or one pass of a trained network (--model). "
            "Writes the warped image, the displacement (mm, fixed space), Dice before/after when labels "
            "are given, and a PNG overlay. --demo registers Colin27 to MNI152."
        ),
    )
    configure_register_parser(p)
    p.set_defaults(func=_cmd_register)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from medfast.tasks.evaluation import add_parser

    add_parser(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from medfast.ultrasound.cli import add_parser

    add_parser(sub)


def _add_synthesize(sub: argparse._SubParsersAction) -> None:
    from medfast.tasks.synthesis.generate import add_parser

    add_parser(sub)


def _cmd_bench(args: argparse.Namespace) -> int:
    from medfast.bench import main

    return main(args)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from medfast.bench.runner import add_arguments

    p = sub.add_parser(
        "bench",
        help="run the benchmark suites against their peers; JSON + Markdown + PNG reports",
        description=(
            "Runs every benchmark suite (each op family against its peers, and the training steps), each in its "
            "own process, and writes bench_<device>_<host>_<date>.{json,md,png} and bench_<device>_latest.* with "
            "the medfast/peer speed ratios and peak memory. Suites missing a library they need are skipped (a "
            "missing optional peer is reported as its own row, see --list); --replot JSON renders a report's "
            "Markdown and chart again."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_info,
    _add_demo,
    _add_train,
    _add_predict,
    _add_evaluate,
    _add_register,
    _add_simulate,
    _add_synthesize,
    _add_bench,
)


# Optional modules that subcommands import when they run -> the extra of pyproject.toml that installs them
# (pyyaml and tqdm are dependencies: missing means a broken install, which `pip install "medfast[cli]"` repairs).
OPTIONAL_MODULES: dict[str, str] = {
    "nibabel": "io",
    "pydicom": "io",
    "PIL": "io",
    "matplotlib": "cli",
    "nilearn": "cli",
    "psutil": "cli",
    "yaml": "cli",
    "tqdm": "cli",
}


def _version() -> str:
    """The installed distribution's version (no import of the compiled extension); a source tree on
    ``PYTHONPATH`` without installed metadata falls back to ``medfast.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medfast")
    except PackageNotFoundError:
        from medfast import __version__

        return __version__


def _missing_optional_module(exc: BaseException) -> str | None:
    """The top-level name of the optional module whose absence raised ``exc`` (itself, or the error it was
    raised from, such as ``ImportError("reading NIfTI needs nibabel ...") from exc``), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        name = (getattr(seen, "name", None) or "").partition(".")[0]
        if isinstance(seen, ModuleNotFoundError) and name in OPTIONAL_MODULES:
            return name
        seen = seen.__cause__
    return None


# argparse reads a value that starts with '-' as an option unless it matches the parser's negative-number pattern,
# which matches plain numbers only (-1, -.5): `simulate --travel -10,0,0` and `--gain -1e1` failed with "expected one
# argument" (the `--travel=-10,0,0` form worked). No medfast option looks like a number, so anything starting with
# -digit or -.digit is a value.
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def _accept_negative_values(parser: argparse.ArgumentParser) -> None:
    """Lets ``parser`` and its subcommands' parsers take ``-10,0,0``, ``-1e1`` ... as option values and positionals
    (unless one of their options itself looks like a negative number: then argparse's rule stays)."""
    options = [s for action in parser._actions for s in action.option_strings]
    if not any(_NEGATIVE_VALUE.match(s) for s in options):
        parser._negative_number_matcher = _NEGATIVE_VALUE
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _accept_negative_values(subparser)


def os_error_text(exc: OSError) -> str:
    """``FILE: reason`` of an operating-system error (``[Errno 28] ...: 'FILE'`` otherwise)."""
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{exc.strerror or exc}"


def command_error(command: str, exc: BaseException) -> int:
    """Prints the one-line error of ``medfast <command>`` for ``exc`` to stderr and returns the exit status.

    Every subcommand that catches its expected errors (ImportError among them) reports them through this, so
    that a missing optional module reads the same everywhere: ``needs X: pip install "medfast[extra]"``, exit
    status 2, when ``exc`` or an error it was raised from is that module's ModuleNotFoundError (see
    :data:`OPTIONAL_MODULES`); otherwise the exception's own message, exit status 1.
    """
    module = _missing_optional_module(exc)
    if module is not None:
        print(f'medfast {command}: error: needs {module}: pip install "medfast[{OPTIONAL_MODULES[module]}]"',
              file=sys.stderr)
        return 2
    print(f"medfast {command}: error: {_own_message(exc)}", file=sys.stderr)
    return 1


def _own_message(exc: BaseException) -> str:
    """The message of ``exc``; for an error raised in a DataLoader worker (torch re-raises it in the main process
    with "Caught X in DataLoader worker process N" and the worker's whole traceback as its message) the worker's
    own message, the part after the quoted traceback's last ``X: `` line."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", text, re.MULTILINE))
    return text[found[-1].end():].rstrip() if found else text


def build_parser() -> argparse.ArgumentParser:
    """The ``medfast`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="medfast",
        description="Fast, differentiable C++/CUDA operators for medical imaging.",
    )
    parser.add_argument("--version", action="version", version=f"medfast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    _accept_negative_values(parser)
    return parser


@contextlib.contextmanager
def _plain_warnings(command: str):
    """medfast's own warnings (poses beyond a model's training range, a sheared reference grid, ...) shown as
    one ``medfast COMMAND: warning: ...`` line, as the errors, not Python's two-line ``FILE:LINE: UserWarning``
    form that quotes our source. Only the formatting changes: filters and ``catch_warnings(record=True)``
    (pytest.warns) see the same warnings."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    original = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
            return f"medfast {command}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfast`` console script and ``python -m medfast``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status (0 on success; 2 when a subcommand needs an optional module that is not installed:
        one line names it and the extra that installs it; 1 for an operating-system error such as an unusable
        output folder or a full disk, named in one line; 130 after Ctrl-C, 143 after SIGTERM for train).
        Invalid arguments raise ``SystemExit(2)`` (argparse).
    """
    # (Without its compiled extension medfast fails to import before this runs; medfast._extension makes the
    # console script print that error in one line.)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train" and extra:
        # `medfast train a.yaml --set k=v b.yaml`: argparse stops the CONFIG list at the first option; the files
        # after it are configs too, merged in the order given (the --set overrides apply after all of them)
        options = [a for a in extra if a.startswith("-")]
        if not options:
            args.configs += extra
        extra = options
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    world = os.environ.get("WORLD_SIZE", "1")
    if args.command not in ("train", "info") and world.isdigit() and int(world) > 1:
        # under torchrun every process would do all the work and write (and print) every output twice
        print(f"medfast {args.command}: error: runs in one process, not under torchrun (WORLD_SIZE={world}): "
              f"start it without torchrun (`medfast train` is the command that uses several processes)",
              file=sys.stderr)
        return 2
    try:
        with _plain_warnings(args.command):
            return args.func(args)
    except ImportError as exc:
        if _missing_optional_module(exc) is None:
            raise
        return command_error(args.command, exc)
    except BrokenPipeError:  # `medfast info | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail
        return 0
    except OSError as exc:  # an unusable --out, a full disk: one line naming the file, not a traceback
        print(f"medfast {args.command}: error: {os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C (train reports its checkpoint itself): one line, as a shell expects
        print(f"medfast {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT


if __name__ == "__main__":
    sys.exit(main())
