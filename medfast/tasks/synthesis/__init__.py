"""Synthesis of ultrasound frames with conditional GANs, trained on frames simulated on the fly.

* :mod:`~medfast.tasks.synthesis.task`: the ``synthesis`` task (image-to-image and pose-conditioned modes).
* :mod:`~medfast.tasks.synthesis.data`: volumes, probe poses and simulated training pairs.
* :mod:`~medfast.tasks.synthesis.metrics`: PSNR, SSIM, patch sliced-Wasserstein distance, PNG grids.
* :mod:`~medfast.tasks.synthesis.generate`: frames from a trained checkpoint (``medfast synthesize``).
"""

from medfast.tasks.synthesis.data import SynthesisSource, load_source, random_pose, sweep_pose
from medfast.tasks.synthesis.generate import generate, generate_frames, load_generator
from medfast.tasks.synthesis.metrics import psnr, save_grid, sliced_wasserstein, ssim
from medfast.tasks.synthesis.task import SynthesisArgs, SynthesisTask, build_gan, parse_synthesis_args

__all__ = ["SynthesisArgs", "SynthesisSource", "SynthesisTask", "build_gan", "generate", "generate_frames",
           "load_generator", "load_source", "parse_synthesis_args", "psnr", "random_pose", "save_grid",
           "sliced_wasserstein", "ssim", "sweep_pose"]
