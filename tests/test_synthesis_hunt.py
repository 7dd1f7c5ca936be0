"""Synthesis fixes from a bug hunt: the SWD's standardization floor (relative, near-constant sets do not jump) and
its documented bounds, the generator's batch-norm statistics updated once per GAN step, the pose range of a
pose-mode checkpoint (a warning for extrapolated poses), and negative or oversized pose ranges refused."""

import warnings

import pytest
import torch

from medfast.nets import ConditionalGAN, PatchDiscriminator, UNetGenerator
from medfast.tasks.synthesis import SynthesisTask, parse_synthesis_args, sliced_wasserstein
from medfast.train import ConfigError, Trainer
from tests import test_synthesis as ts

_config = ts._config
phantom = ts.phantom  # the 56^3 CT phantom fixture (module scope)
POSE = {"task_args.mode": "pose", "model.norm": "batch", "task_args.coord_frequencies": 2}

# ----------------------------------------------------------------------------------------------------------
# sliced Wasserstein distance
# ----------------------------------------------------------------------------------------------------------


def test_sliced_wasserstein_near_constant_sets_do_not_jump():
    # the absolute floor 1e-8 of the pooled std made zeros vs zeros + 3e-8 score 0.52, as far apart as zeros vs
    # ones: a rounding error scored as a different generator
    z = torch.zeros(4, 1, 32, 32, dtype=torch.float64)
    d = [float(sliced_wasserstein(z, z + e)) for e in (1e-9, 1e-8, 3e-8, 1e-7, 1e-6)]
    assert d[0] < 1e-3 and d[2] < 0.02, d
    assert d == sorted(d), d  # grows with the offset
    assert float(sliced_wasserstein(z, z)) == 0.0
    # the floor follows data_range: the same sets scaled by k with data_range k score alike
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for a, b in ((z, z + 3e-8), (x, x * 1.5)):
        torch.testing.assert_close(sliced_wasserstein(a * 1000, b * 1000, data_range=1000.0),
                                   sliced_wasserstein(a, b))
    with pytest.raises(ValueError, match="data_range must be a positive"):
        sliced_wasserstein(x, x, data_range=0)


def test_sliced_wasserstein_is_bounded_and_scale_invariant_as_documented():
    # docs/synthesis.md: it saturates once the sets differ by much more than their spread, and scaling both sets
    # alike does not change it (absolute brightness errors are PSNR's and L1's to show)
    g = torch.Generator().manual_seed(1)
    x = 0.25 + 0.05 * torch.randn(8, 1, 40, 40, dtype=torch.float64, generator=g)
    far1, far1000 = (float(sliced_wasserstein(x, x + s, n_patches=1024)) for s in (1.0, 1000.0))
    assert abs(far1 - far1000) < 1e-3
    near = float(sliced_wasserstein(x, x + 0.02, n_patches=1024))
    assert 0 < near < far1
    torch.testing.assert_close(sliced_wasserstein(3 * x, 3 * x + 0.06, n_patches=1024), torch.tensor(
        near, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# batch norm statistics in the discriminator phase
# ----------------------------------------------------------------------------------------------------------


def _bn_gan(**kw):
    torch.manual_seed(0)
    g = UNetGenerator(3, 1, channels=(4, 8), norm="batch")
    return ConditionalGAN(g, PatchDiscriminator(4, channels=4, n_layers=1), **kw)


def test_discriminator_phase_leaves_the_generators_running_statistics_alone():
    gan = _bn_gan().train()
    cond, real = torch.randn(2, 3, 24, 24), torch.rand(2, 1, 24, 24)
    bns = [m for m in gan.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    fake_train = gan(cond, mode="generate").detach()  # batch statistics (this call updates the buffers)
    for m, b in zip(bns, before):
        m.load_state_dict(b)
    gan(cond, real, mode="discriminator")
    for m, b in zip(bns, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k]), k
        assert m.track_running_stats  # restored
    # the forward itself still normalizes with batch statistics: the fake frames the discriminator sees
    seen = []
    h = gan.discriminator.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, 3:].clone()))
    gan(cond, real, mode="discriminator")
    h.remove()
    torch.testing.assert_close(seen[1], fake_train)


def test_one_pose_mode_step_updates_the_generators_batch_norm_once(tmp_path, phantom):
    # the discriminator phase ran the generator in train mode: num_batches_tracked was 2 after one step
    tr = Trainer(_config(tmp_path, phantom, "bn", **POSE, **{"trainer.max_steps": 1}))
    seen = []

    def record(mod, inp):
        if mod.training:  # (not the final validation's eval-mode forward)
            x = inp[0].detach().double()
            seen.append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)))

    build = tr.task.build_model

    def build_and_hook():  # the generator's first batch norm records the batch statistics it sees
        model = build()
        next(m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)).register_forward_pre_hook(
            record)
        return model

    tr.task.build_model = build_and_hook
    tr.fit()
    bn = next(m for m in tr.model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1
    assert len(seen) == 2  # both phases ran the generator in train mode, on the same batch and weights
    torch.testing.assert_close(seen[0], seen[1])
    mean, var = seen[1]
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# the pose range of a pose-mode checkpoint
# ----------------------------------------------------------------------------------------------------------


def test_conditional_gan_range_buffer_loads_from_a_state_without_it():
    gan = _bn_gan(range_channels=3)
    assert gan.known_range() is None
    gan.extend_range(torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 3.0]))
    gan.extend_range(torch.tensor([0.0, -1.0, 2.5]), torch.tensor([0.5, 0.25, 4.0]))
    torch.testing.assert_close(gan.known_range(), torch.tensor([[-1.0, -1.0, 2.0], [1.0, 0.5, 4.0]]))
    state = gan.state_dict()
    assert "cond_range" in state and "cond_range" not in _bn_gan().state_dict()  # image mode: no key
    fresh = _bn_gan(range_channels=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.known_range(), gan.known_range())
    del state["cond_range"]  # a checkpoint saved before the range was kept: loads, range unknown
    gan.load_state_dict(state)
    assert gan.known_range() is None
    with pytest.raises(ValueError, match="range_channels"):
        _bn_gan(range_channels=-1)


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory, phantom):
    tmp = tmp_path_factory.mktemp("pose_range")
    Trainer(_config(tmp, phantom, "run", **POSE, **{"trainer.max_steps": 2, "trainer.checkpoint_every": 2})).fit()
    return tmp / "run" / "checkpoints" / "last.pt"


def _far_poses(task):
    far = task.source.reference_pose.clone()[None].repeat(2, 1, 1)
    far[0, 2, 3] += 20.0  # 20 mm along z, the travel: beyond the sweeps' +-15 mm (+-3 mm jitter)
    far[1, 0, 3] -= 20.0  # and 20 mm to the side
    return far


def test_pose_mode_checkpoint_records_the_training_range_and_warns_beyond_it(pose_run, tmp_path, capsys):
    from medfast.cli import main
    from medfast.tasks.synthesis.generate import PoseRangeWarning, generate, load_generator

    task, model = load_generator(pose_run)
    rng = model.known_range()
    assert rng is not None  # saved with the weights
    torch.testing.assert_close(rng, task.training_coord_range().float())
    # the training frames' coordinates lie inside
    c = task.source.frames(task.poses(list(range(100, 108)))).coords[:, :3]
    assert bool((c.amin(dim=(0, 2, 3)) >= rng[0] - 1e-6).all() and (c.amax(dim=(0, 2, 3)) <= rng[1] + 1e-6).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoseRangeWarning)
        generate(pose_run, tmp_path / "in", frames=4, device="cpu")  # a held-out sweep: no warning
    far = _far_poses(task)
    with pytest.warns(PoseRangeWarning, match=r"the poses: 2 of 2 poses reach outside the training sweeps' range, "
                                              r"by up to \d+\.\d mm along world x .*extrapolations"):
        generate(pose_run, tmp_path / "far", poses=far, device="cpu")
    import numpy as np

    np.save(tmp_path / "far.npy", far.numpy())
    capsys.readouterr()
    assert main(["synthesize", str(pose_run), "--poses", str(tmp_path / "far.npy"), "--out", str(tmp_path / "cli"),
                 "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "extrapolations" in line]
    assert len(err) == 1 and err[0].startswith("medfast synthesize: warning: the poses: 2 of 2 poses"), err


def test_a_pose_checkpoint_without_the_range_generates_without_a_check(pose_run, tmp_path):
    from medfast.tasks.synthesis.generate import PoseRangeWarning, generate, load_generator

    state = torch.load(pose_run, weights_only=False)
    del state["model"]["cond_range"]
    torch.save(state, tmp_path / "old.pt")
    task, model = load_generator(tmp_path / "old.pt")
    assert model.known_range() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoseRangeWarning)
        generate(tmp_path / "old.pt", tmp_path / "far", poses=_far_poses(task), device="cpu")


# ----------------------------------------------------------------------------------------------------------
# pose ranges in the config
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,match", [
    ({"task_args.tilt_deg": -10}, "task_args.tilt_deg must be >= 0"),
    ({"task_args.twist_deg": -1}, "task_args.twist_deg must be >= 0"),
    ({"task_args.shift_mm": "[-6, 4, 4]"}, r"task_args.shift_mm must be >= 0 .*got \[-6.0, 4.0, 4.0\]"),
    ({**POSE, "task_args.start_jitter_mm": -3}, "task_args.start_jitter_mm must be >= 0"),
    ({"task_args.tilt_deg": 400}, "task_args.tilt_deg must be at most 180"),
    ({"task_args.twist_deg": 180.5}, "task_args.twist_deg must be at most 180"),
])
def test_negative_or_oversized_pose_ranges_are_refused(tmp_path, phantom, extra, match):
    cfg = _config(tmp_path, phantom, **extra)
    with pytest.raises(ConfigError, match=match):
        parse_synthesis_args(cfg)
    # a trained checkpoint's config (refuse_unused=False) with such a range still loads: it generated before
    parse_synthesis_args(_config(tmp_path, phantom, **extra), refuse_unused=False)


def test_pose_ranges_at_their_limits_are_accepted(tmp_path, phantom):
    a = SynthesisTask(_config(tmp_path, phantom, **{"task_args.tilt_deg": 180, "task_args.twist_deg": 0,
                                                    "task_args.shift_mm": "[0, 0, 0]"})).args
    assert (a.tilt_deg, a.twist_deg, a.shift_mm) == (180, 0, [0, 0, 0])
