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
    # three batch sizes: three (batch size, groups) keys
    batches = [collate([ds[(i, s + i)] for i in range(n)]) for s, n in ((0, 16), (100, 12), (200, 8))]
    for k, batch in enumerate(batches):
        ref = eager.render(batch, "cuda")
        first = graphed.render(batch, "cuda")  # a new (batch size, groups): rendered eagerly
        assert graphed.graph_replays == k
        again = graphed.render(batch, "cuda")  # the second time: captured and replayed
        assert graphed.cuda_graphs and graphed.graph_replays == k + 1
        torch.testing.assert_close(first, ref, rtol=0, atol=0)
        torch.testing.assert_close(again, ref, rtol=0, atol=1e-5)
    assert eager.graph_replays == 0 and len(graphed._graphs) == len(batches)
    # the replay's output is a copy: the next batch does not overwrite the images of the last one
    out = graphed.render(batches[0], "cuda")
    graphed.render(batches[1], "cuda")
    assert graphed.graph_replays == len(batches) + 2
    torch.testing.assert_close(out, eager.render(batches[0], "cuda"), rtol=0, atol=1e-5)
