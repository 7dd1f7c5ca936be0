"""DLPack interop (medfast.interop): zero-copy in and out, with NumPy on the CPU (always) and CuPy on the GPU
(where CuPy and a GPU are present)."""

import numpy as np
import pytest
import torch

import medfast as mf
from medfast import interop


def test_numpy_arrays_in_and_out_without_copies():
    rng = np.random.default_rng(0)
    image = rng.random((1, 2, 6, 7, 8), dtype=np.float32)
    ddf = (rng.standard_normal((1, 3, 6, 7, 8)) * 0.5).astype(np.float32)
    out = interop.call(mf.warp, image, ddf, mode="linear")
    assert isinstance(out, np.ndarray) and out.shape == image.shape
    want = mf.warp(torch.from_numpy(image), torch.from_numpy(ddf), mode="linear").numpy()
    np.testing.assert_array_equal(out, want)
    view = interop.as_tensor(image)
    assert view.data_ptr() == image.ctypes.data  # shares memory
    image[0, 0, 0, 0, 0] = 42.0
    assert float(view[0, 0, 0, 0, 0]) == 42.0


def test_keyword_arrays_tuple_results_and_plain_tensors():
    labels = np.zeros((1, 9, 9, 9), dtype=np.int64)
    labels[0, 2:7, 2:7, 2:7] = 1
    logits = np.random.default_rng(1).standard_normal((1, 2, 9, 9, 9)).astype(np.float32)
    loss = interop.call(mf.dice_ce_loss, logits, target=labels)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    assert interop.call(lambda a: (a, [a * 2]), np.ones(3))[1][0].tolist() == [2.0, 2.0, 2.0]
    t = torch.ones(2)
    assert interop.call(torch.add, t, t) is not None and isinstance(interop.call(torch.add, t, t), torch.Tensor)


def test_clear_errors():
    with pytest.raises(TypeError, match="__dlpack__"):
        interop.as_tensor([1, 2, 3])
    with pytest.raises(TypeError, match="medfast.interop"):
        mf.warp(np.zeros((1, 1, 4, 4, 4), np.float32), torch.zeros(1, 3, 4, 4, 4))


def test_cupy_on_gpu_is_zero_copy():
    cp = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    image = cp.random.rand(1, 1, 16, 17, 18, dtype=cp.float32)
    ddf = cp.random.standard_normal((1, 3, 16, 17, 18), dtype=cp.float32)
    out = interop.call(mf.warp, image, ddf)
    assert isinstance(out, cp.ndarray) and out.device.id == image.device.id
    want = mf.warp(torch.as_tensor(cp.asnumpy(image)).cuda(), torch.as_tensor(cp.asnumpy(ddf)).cuda())
    np.testing.assert_allclose(cp.asnumpy(out), want.cpu().numpy(), rtol=1e-6, atol=1e-6)
    assert interop.as_tensor(image).data_ptr() == image.data.ptr


def test_star_import_gives_the_public_functions_only():
    # (without __all__ it also bound np, torch, importlib, Any, Callable, ... over the user's own names)
    ns: dict = {}
    exec("from medfast.interop import *", ns)
    assert sorted(k for k in ns if not k.startswith("__")) == ["as_tensor", "call", "from_tensor", "is_foreign_array"]
