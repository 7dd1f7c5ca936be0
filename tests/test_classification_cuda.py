"""The classification renderer on a GPU: the CUDA graph replay of a batch (SimulatedUltrasound with
``cuda_graphs``) against the eager rendering of one simulation per (volume, probe) group. Skipped without a
GPU; tests/test_classification_sim.py checks the fixed-shape form the graph captures on the CPU."""

from __future__ import annotations

import torch

from medfast.data import collate
from medfast.tasks.classification import SimulatedUltrasound
from tests.conftest import requires_cuda
from tests.test_classification_sim import SMALL


@requires_cuda
def test_cuda_graph_render_equals_eager():
    ds_kw = {**SMALL, "probes": ["C5-2v", "P4-2v"], "variants": 3, "sub_rays": 2}
    graphed, eager = SimulatedUltrasound(**ds_kw), SimulatedUltrasound(**ds_kw, cuda_graphs=False)
    ds = graphed.train_dataset(64)
    batches = [collate([ds[(i, s + i)] for i in range(16)]) for s in (0, 100, 200)]
    for k, batch in enumerate(batches):
        img = graphed.render(batch, "cuda")
        ref = eager.render(batch, "cuda")
        torch.testing.assert_close(img, ref, rtol=0, atol=1e-5)
        assert graphed.cuda_graphs and graphed.graph_replays == k + 1  # captured once, then replayed
    assert eager.graph_replays == 0
    # the replay's output is a copy: the next batch does not overwrite the images of the last one
    first = graphed.render(batches[0], "cuda")
    graphed.render(batches[1], "cuda")
    torch.testing.assert_close(first, eager.render(batches[0], "cuda"), rtol=0, atol=1e-5)
