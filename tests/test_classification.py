"""Classification: label encoders, CORAL loss against a reference, metrics against sklearn, confusion PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfast.tasks.classification import (
    BinaryEncoder,
    ClassificationLoss,
    NominalEncoder,
    OrdinalEncoder,
    accuracy,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    coral_loss,
    make_encoder,
    precision_recall_f1,
    roc_auc,
    save_confusion_png,
)

# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ordinal_encoder_round_trip_and_targets(k):
    enc = OrdinalEncoder(k)
    y = torch.arange(k).repeat(3)
    t = enc.encode(y)
    assert t.shape == (3 * k, k - 1)
    # cumulative targets: row of class c is c ones then zeros
    for c in range(k):
        assert t[c].tolist() == [1.0] * c + [0.0] * (k - 1 - c)
    assert torch.equal(enc.decode(t), y)
    # logits: large positive for the first c tasks, negative for the rest
    logits = (t * 2 - 1) * 5
    assert torch.equal(enc.decode(logits, logits=True), y)
    probs = enc.probabilities(logits)
    assert probs.shape == (3 * k, k)
    assert torch.allclose(probs.sum(1), torch.ones(3 * k))
    assert torch.equal(probs.argmax(1), y)


def test_ordinal_probabilities_formula():
    enc = OrdinalEncoder(4)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    s = torch.sigmoid(logits)[0]
    expect = torch.tensor([1 - s[0], s[0] - s[1], s[1] - s[2], s[2]])
    assert torch.allclose(enc.probabilities(logits)[0], expect)


def test_ordinal_names_in_order():
    stages = ["pT2", "pT3a", "pT3b", "pT4"]
    enc = make_encoder("ordinal", 4, stages)
    t = enc.encode(["pT3b", "pT2", "pT4"])
    assert t.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert enc.names(enc.decode(t)) == ["pT3b", "pT2", "pT4"]
    with pytest.raises(ValueError, match="unknown class 'pT1'"):
        enc.encode(["pT1"])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        enc.encode(torch.tensor([4]))


def test_nominal_and_binary_round_trip():
    y = torch.tensor([0, 2, 1, 2, 0])
    nom = NominalEncoder(3)
    assert torch.equal(nom.encode(y), y)
    assert torch.equal(nom.decode(nom.encode(y)), y)
    oh = NominalEncoder(3, one_hot=True).encode(y)
    assert oh.shape == (5, 3) and torch.equal(oh.argmax(1), y) and torch.equal(nom.decode(oh), y)
    assert nom.num_outputs == 3
    b = BinaryEncoder(class_names=["benign", "malignant"])
    yb = torch.tensor([1, 0, 0, 1])
    t = b.encode(yb)
    assert t.shape == (4, 1) and t.dtype == torch.float32
    assert torch.equal(b.decode(t), yb)
    assert torch.equal(b.decode(torch.tensor([[3.0], [-0.5], [-2.0], [0.1]])), yb)
    p = b.probabilities(torch.tensor([[0.0], [math.log(3)]]))
    assert torch.allclose(p, torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    assert b.names(yb) == ["malignant", "benign", "benign", "malignant"]
    with pytest.raises(ValueError):
        BinaryEncoder(3)
    with pytest.raises(ValueError):
        make_encoder("multilabel", 3)


# ---------------------------------------------------------------------------------------------- CORAL loss


def _coral_reference(logits: torch.Tensor, levels: torch.Tensor, w=None) -> torch.Tensor:
    """Straightforward CORAL loss (Cao et al. 2020, eq. 4), float64, explicit loops."""
    n, km1 = logits.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        li = torch.zeros((), dtype=torch.float64)
        for k in range(km1):
            p = 1.0 / (1.0 + torch.exp(-logits[i, k]))
            wk = 1.0 if w is None else w[k]
            li = li - wk * (levels[i, k] * torch.log(p) + (1 - levels[i, k]) * torch.log(1 - p))
        total = total + li
    return total / n


@pytest.mark.parametrize("weighted", [False, True])
def test_coral_loss_matches_reference_values_and_gradients(weighted):
    g = torch.Generator().manual_seed(0)
    k = 5
    y = torch.randint(0, k, (7,), generator=g)
    levels = OrdinalEncoder(k).encode(y)
    logits = torch.randn(7, k - 1, generator=g, dtype=torch.float64) * 3
    w = torch.rand(k - 1, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = coral_loss(a.float(), levels, w)
    ref = _coral_reference(b, levels.double(), w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # closed-form gradient: d/dl_k = w_k (sigmoid(l_k) - t_k) / N
    wk = 1.0 if w is None else w
    assert torch.allclose(b.grad, wk * (torch.sigmoid(logits) - levels.double()) / 7, atol=1e-10)


def test_coral_loss_reductions_and_stability():
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0]])
    levels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    per = coral_loss(logits, levels, reduction="none")
    assert per.shape == (2,)
    assert torch.isfinite(per).all()
    assert per[0].item() == pytest.approx(0.0, abs=1e-6)
    assert per[1].item() == pytest.approx(80.0, rel=1e-5)
    assert coral_loss(logits, levels, reduction="sum").item() == pytest.approx(per.sum().item())
    with pytest.raises(ValueError, match="shape"):
        coral_loss(logits, levels[:, :1])


def test_classification_loss_dispatch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    assert ClassificationLoss("nominal")(logits, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item())
    lb = torch.randn(6, 1, generator=g)
    tb = BinaryEncoder().encode(y.clamp(max=1))
    expect = -(tb * torch.log(torch.sigmoid(lb)) + (1 - tb) * torch.log(1 - torch.sigmoid(lb))).mean()
    assert ClassificationLoss("binary")(lb, tb).item() == pytest.approx(expect.item(), rel=1e-5)
    lo = torch.randn(6, 2, generator=g)
    to = OrdinalEncoder(3).encode(y)
    assert ClassificationLoss("ordinal")(lo, to).item() == pytest.approx(
        _coral_reference(lo.double(), to.double()).item(), rel=1e-5)


@pytest.mark.parametrize("encoding", ["nominal", "binary", "ordinal"])
def test_classification_loss_keeps_float64_and_passes_gradcheck(encoding):
    # float64 logits were cast to float32 (a float32 loss, gradcheck failed); half logits still go to float32
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    k = {"nominal": 3, "binary": 1, "ordinal": 2}[encoding]
    logits = torch.randn(6, k, generator=g, dtype=torch.float64, requires_grad=True)
    if encoding == "nominal":
        targets = y
        weights = torch.tensor([1.0, 2.0, 0.5])  # float32 buffer: cast to the logits' dtype
        loss = ClassificationLoss("nominal", class_weights=weights)
        ref = torch.nn.functional.cross_entropy(logits, y, weight=weights.double())
    elif encoding == "binary":
        targets = BinaryEncoder().encode(y.clamp(max=1))
        loss = ClassificationLoss("binary")
        ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.double())
    else:
        targets = OrdinalEncoder(3).encode(y)
        loss = ClassificationLoss("ordinal")
        ref = _coral_reference(logits, targets.double())
    got = loss(logits, targets)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: loss(x, targets), (logits,))
    half = loss(logits.detach().bfloat16(), targets)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, loss(logits.detach().bfloat16().float(), targets), rtol=0, atol=0)


def test_coral_loss_keeps_float64_with_float32_importance():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    levels = OrdinalEncoder(4).encode(torch.tensor([0, 3, 1, 2, 3]))
    w = torch.tensor([0.5, 1.0, 2.0])
    got = coral_loss(logits, levels, w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _coral_reference(logits, levels.double(), w.double()), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda x: coral_loss(x, levels, w, reduction="none"), (logits,))


def test_one_hot_targets_of_float64_logits():
    logits = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    onehot = NominalEncoder(3, one_hot=True).encode(y)  # float32
    got = ClassificationLoss("nominal")(logits, onehot)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, y), rtol=1e-12, atol=0)


def test_every_encoder_decodes_logits_with_the_same_call():
    # one interface for make_encoder's result (task code special-cased nominal: its decode took no logits=)
    g = torch.Generator().manual_seed(4)
    out = torch.randn(5, 3, generator=g)
    nominal = make_encoder("nominal", 3)
    assert torch.equal(nominal.decode(out, logits=True), out.argmax(1))
    assert torch.equal(nominal.decode(out), out.argmax(1))
    with pytest.raises(ValueError, match=r"must be \(N, 3\)"):
        nominal.decode(torch.tensor([0.0, 2.0]), logits=True)  # logits of one class each: not indices
    assert torch.equal(nominal.decode(torch.tensor([0.0, 2.0])), torch.tensor([0, 2]))
    for enc in (make_encoder("binary", 2), make_encoder("ordinal", 4), nominal):
        k = enc.num_outputs
        logits = torch.randn(5, k, generator=g)
        assert enc.decode(logits, logits=True).shape == (5,)
        assert enc.probabilities(logits).shape == (5, enc.num_classes)
        assert torch.equal(enc.decode(enc.encode([1, 0]), logits=False), torch.tensor([1, 0]))


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    target = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert accuracy(pred, target) == pytest.approx(4 / 6)
    assert balanced_accuracy(pred, target, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    prf = precision_recall_f1(pred, target, 3)
    assert prf["precision"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert prf["recall"].tolist() == pytest.approx([2 / 3, 0.5, 1.0])
    assert prf["f1"][0] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    assert prf["support"].tolist() == [3, 2, 1]
    # a class never predicted: precision NaN, class absent from target: recall NaN, ignored by balanced acc
    prf2 = precision_recall_f1(np.array([0, 0]), np.array([0, 1]), 3)
    assert np.isnan(prf2["precision"][1]) and np.isnan(prf2["recall"][2])
    assert balanced_accuracy(np.array([0, 0]), np.array([0, 1]), 3) == pytest.approx(0.5)
    # AUC by hand: scores of positives 0.9, 0.4 vs negatives 0.4, 0.1 -> (1 + 1 + 0.5 + 1) / 4
    assert roc_auc(np.array([0.9, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    assert np.isnan(roc_auc(np.array([0.3, 0.2]), np.array([1, 1])))


def test_metrics_against_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    c, n = 4, 200
    target = rng.integers(0, c, n)
    scores = rng.random((n, c)) + np.eye(c)[target] * rng.random(n)[:, None]
    scores = np.round(scores, 1)  # ties
    scores = scores / scores.sum(1, keepdims=True)
    pred = scores.argmax(1)
    assert np.array_equal(confusion_matrix(pred, target, c), skm.confusion_matrix(target, pred, labels=range(c)))
    assert accuracy(pred, target) == pytest.approx(skm.accuracy_score(target, pred))
    assert balanced_accuracy(pred, target, c) == pytest.approx(skm.balanced_accuracy_score(target, pred))
    p, r, f, s = skm.precision_recall_fscore_support(target, pred, labels=range(c), zero_division=0)
    prf = precision_recall_f1(pred, target, c)
    assert np.allclose(prf["precision"], p) and np.allclose(prf["recall"], r) and np.allclose(prf["f1"], f)
    assert np.array_equal(prf["support"], s)
    assert roc_auc(scores, target, c) == pytest.approx(skm.roc_auc_score(target, scores, multi_class="ovr"))
    per = roc_auc(scores, target, c, average=None)
    for k in range(c):
        assert per[k] == pytest.approx(skm.roc_auc_score(target == k, scores[:, k]))
    rep = classification_report(torch.from_numpy(pred), torch.from_numpy(target), c, torch.from_numpy(scores))
    assert rep["auc"] == pytest.approx(skm.roc_auc_score(target, scores, multi_class="ovr"))
    assert rep["f1"] == pytest.approx(skm.f1_score(target, pred, average="macro"))


def test_metrics_refuse_what_they_would_get_wrong():
    """One-hot or score arrays, a wrong num_classes and binary scores with C > 2 raise instead of giving
    numbers (flattened, a one-hot (N, C) pair read as N * C samples: accuracy 0.667 for a true 0.5)."""
    onehot_p, onehot_t = np.eye(3)[[0, 1, 2, 0]], np.eye(3)[[0, 2, 1, 0]]
    for f in (lambda: accuracy(onehot_p, onehot_t), lambda: confusion_matrix(onehot_p, onehot_t, 3),
              lambda: balanced_accuracy(onehot_p, onehot_t, 3)):
        with pytest.raises(ValueError, match=r"pred must be \(N,\) class indices, got shape \(4, 3\)"):
            f()
    with pytest.raises(ValueError, match="pred must hold class indices"):
        accuracy(np.array([0.2, 0.9, 0.4]), np.array([0, 1, 0]))  # scores, not classes (was 0.0)
    t = np.array([0, 1, 2, 1])
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            confusion_matrix(t, t, bad)
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            roc_auc(np.eye(3)[t], t, bad)
    assert confusion_matrix(t, t, np.int64(3)).trace() == 4 and confusion_matrix(t, t, torch.tensor(3)).trace() == 4
    with pytest.raises(ValueError, match=r"binary \(the score of class 1\), but num_classes is 3"):
        roc_auc(np.array([0.1, 0.8, 0.7, 0.6]), np.array([0, 1, 1, 0]), 3)
    assert roc_auc(np.array([0.1, 0.8, 0.7, 0.6]), np.array([0, 1, 1, 0]), 2) == 1.0
    with pytest.raises(ValueError, match="num_classes is 3"):  # (N, 2) scores reported for 3 classes
        classification_report(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0]), 3, np.eye(2)[[0, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"target must be \(N,\) class indices"):
        roc_auc(np.eye(3)[t], np.eye(3)[t])


def test_confusion_png(tmp_path):
    pytest.importorskip("matplotlib")
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    path = save_confusion_png(cm, tmp_path / "sub" / "cm.png", ["low", "medium", "high"])
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.05
