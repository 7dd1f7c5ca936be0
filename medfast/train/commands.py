"""``medfast train`` and ``medfast predict``: argument declarations and implementations (``medfast/cli.py``
only registers them)."""

from __future__ import annotations

import argparse
import signal
import sys

from medfast._signals import Terminated  # (SIGTERM during medfast train stops like Ctrl-C)

__all__ = ["add_predict_arguments", "add_train_arguments", "run_predict", "run_train"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config files, merged in order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.max_steps=200 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (sets trainer.out_dir; taken verbatim)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or when given alone from the newest checkpoint in OUT/checkpoints "
                        "(last.pt, or a step_*.pt written after it); if OUT has no checkpoint yet, a message says so "
                        "and the run starts from step 0; a run already at trainer.max_steps is left as it is")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets trainer.device)")
    p.add_argument("--print-config", action="store_true",
                   help="check the config as train does before it reads any data (all but the device) and print "
                        "it resolved, then exit")


def _ignore_signal(signum, frame) -> None:
    pass


def _stop_on_sigterm():
    """Makes SIGTERM raise :class:`Terminated` in the main thread, so a scheduler's stop ends the run as Ctrl-C
    does (the fit's cleanup runs: TensorBoard flushed, the lock released; one line names the checkpoint to resume
    from) instead of killing it silently. Returns the previous handler (None off the main thread)."""
    def stop(signum, frame):
        # `timeout`, scancel and Kubernetes signal the whole process group, so the data-loader workers die too:
        # torch's SIGCHLD handler would raise "DataLoader worker ... is killed by signal" in the middle of the
        # cleanup, a traceback instead of this stop. Their death is expected now: a pending SIGCHLD is dropped, by a
        # handler that does nothing (with SIG_DFL, a SIGCHLD already pending, a worker that died while the main
        # thread was inside a C call, printed "OSError: Signal 17 ignored due to race condition" with a traceback).
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, _ignore_signal)
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding application's worker): leave signals alone
        return None


def _check_before_printing(config) -> None:
    """The config checks train makes before it reads any data (the shared ones, the task's, the output folder,
    ``trainer.amp`` and the optimizer settings), on a copy: --print-config exited 0 for a config train refuses.
    Not the device (a config for another machine may name its GPUs) and not the data."""
    import copy

    import torch

    from medfast.train import ConfigError
    from medfast.train.config import check_choice_setting, check_config
    from medfast.train.files import OutputError, check_out_dir
    from medfast.train.task import get_task
    from medfast.train.trainer import build_optimizer, build_scheduler

    config = copy.deepcopy(config)  # (a task may resolve settings in place; what is printed stays as given)
    check_config(config)
    get_task(config.task)(config)
    try:
        check_out_dir(config.trainer.out_dir, "trainer.out_dir (--out)")
    except OutputError as exc:
        raise ConfigError(str(exc)) from None
    check_choice_setting("trainer.amp", config.trainer.amp)
    try:  # on one stand-in parameter: the settings are checked as the run's optimizer checks them
        build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(1))], config.optim), config.optim,
                        config.trainer.max_steps)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"optim: the optimizer cannot be built from this config's optim settings "
                          f"(optim.name={config.optim.name!r}): {exc}") from exc


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from medfast.cli import command_error
    from medfast.data import DatasetError
    from medfast.train import CheckpointError, ConfigError, NonFiniteLossError, Trainer, config_to_dict, load_config

    # the flags' values are paths and device names: set verbatim, never parsed as YAML like --set values
    values = {key: value for key, value in (("trainer.out_dir", args.out), ("trainer.resume", args.resume),
                                            ("trainer.device", args.device)) if value is not None}
    trainer = None
    previous = _stop_on_sigterm()
    try:
        config = load_config(args.configs, args.overrides, values=values)
        if args.print_config:
            _check_before_printing(config)
            print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            return 0
        trainer = Trainer(config)
        results = trainer.fit()
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ImportError) as exc:
        return command_error("train", exc)  # a missing optional module: its extra, exit status 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line, not a traceback (checkpoints are atomic)
        if trainer is None or trainer.rank == 0:
            note = trainer.interrupted_message() if trainer is not None else "interrupted"
            print(f"medfast train: {note}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130  # 128 + the signal, as a shell reports it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if results:
        def number(v) -> str:  # (null in results.json: NaN, e.g. a metric of a class absent from the data)
            return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"

        val = results.get("validation") or {}
        summary = ", ".join(f"{k}={number(v)}" for k, v in val.items() if k.endswith("mean"))
        val_text = f"; validation {summary}" if summary else ""
        print(f"medfast train: {results.get('step')} steps in {results.get('seconds') or 0:.0f} s; loss "
              f"{number(results.get('first_loss'))} -> {number(results.get('last_loss'))}{val_text}; outputs in "
              f"{config.trainer.out_dir}")
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE",
                   help="images to segment (NIfTI files or folders of them; for a model of several input channels "
                        "a case stored one file per channel, nnU-Net's case_0000, case_0001, ..., is one image) or "
                        "classify (PNG/JPEG/NIfTI/DICOM files or folders of them), or probe-pose files (JSON/.npy, "
                        "or folders of them) to synthesize frames at, by the checkpoint's task")
    p.add_argument("--model", "--checkpoint", dest="checkpoint", required=True,
                   help="checkpoint written by medfast train (e.g. RUN/checkpoints/last.pt)")
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. --set inference.overlap=0.25")
    p.add_argument("--probabilities", action="store_true", help="also write class probabilities")
    p.add_argument("--no-cam", action="store_true",
                   help="classification of 2D images: do not write the Grad-CAM overlays (cam/*.png; they are "
                        "skipped anyway, with a note, when matplotlib is not installed)")


def run_predict(args: argparse.Namespace) -> int:
    from medfast.cli import command_error
    from medfast.data import DatasetError
    from medfast.tasks.segmentation import predict_files
    from medfast.train import ConfigError

    try:
        from medfast.train.files import check_out_dir
        from medfast.train.trainer import load_checkpoint

        check_out_dir(args.out, "--out")
        task = (load_checkpoint(args.checkpoint).get("config") or {}).get("task")
        if args.no_cam and task != "classification":  # (it was accepted and ignored)
            raise ValueError(f"--no-cam applies to classification checkpoints (their Grad-CAM overlays); "
                             f"{args.checkpoint} is a {task or 'segmentation'} checkpoint: leave --no-cam out")
        extra = {}
        if task == "classification":
            from medfast.tasks.classification.task import predict_files

            extra["save_cam"] = not args.no_cam
        elif task == "synthesis":
            from medfast.tasks.synthesis.generate import predict_files
        written = predict_files(args.checkpoint, args.inputs, args.out, device=args.device,
                                overrides=args.overrides, save_probabilities=args.probabilities, **extra)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, ImportError) as exc:
        return command_error("predict", exc)  # a missing optional module: its extra, exit status 2
    for path in written:
        print(path)
    return 0
