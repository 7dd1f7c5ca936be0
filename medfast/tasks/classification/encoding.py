"""Label encoders: class indices <-> network targets and network outputs -> classes / probabilities.

Three encodings, each with ``encode`` (targets for the loss), ``decode`` (predicted class from the network's
output) and ``probabilities`` (class probabilities, ``(N, C)``):

* ``nominal``: unordered classes; targets are indices ``(N,)`` (or one-hot ``(N, C)``); outputs ``C`` logits.
* ``binary``: two classes; targets ``(N, 1)`` floats in {0, 1}; output one logit (of class 1).
* ``ordinal``: ordered classes ``0 < 1 < ... < K-1`` (e.g. pT2 < pT3a < pT3b < pT4); cumulative-link (CORAL,
  Cao et al. 2020) targets ``(N, K-1)`` with ``t[:, k] = [y > k]``; outputs ``K-1`` logits of ``P(y > k)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch

from medfast.tasks.classification.metrics import _indices

__all__ = ["BinaryEncoder", "NominalEncoder", "OrdinalEncoder", "make_encoder"]


class _Encoder:
    encoding = "?"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = [str(c) for c in class_names] if class_names is not None else [
            str(i) for i in range(self.num_classes)]
        dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate class names {dup} in {self.class_names}")

    def _outputs(self, output: torch.Tensor, what: str = "output") -> torch.Tensor:
        """``output`` as ``(N, num_outputs)``; raises ValueError naming the expected shape otherwise."""
        k = self.num_outputs
        if not isinstance(output, torch.Tensor):
            output = torch.as_tensor(output)
        if output.dim() == 1 and k == 1:
            output = output[:, None]
        if output.dim() != 2 or output.shape[1] != k:
            raise ValueError(f"{what} must be (N, {k}) for the {self.encoding} encoding of {self.num_classes} "
                             f"classes, got {tuple(output.shape)}")
        return output

    @property
    def num_outputs(self) -> int:
        """Number of network outputs (logits) this encoding needs."""
        raise NotImplementedError

    def index(self, labels: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        """Class indices ``(N,)`` (int64) of labels given as indices or as class names.

        Float indices must be whole numbers (ValueError for 0.7, which is not class 0), as in the metrics."""
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.is_complex():
                _indices("labels", labels)  # raises for non-integer values (copies float labels to the CPU)
            y = labels.long().reshape(-1)
        else:
            lookup = {n: i for i, n in enumerate(self.class_names)}
            out = []
            for lab in labels:
                if isinstance(lab, str):
                    if lab not in lookup:
                        raise ValueError(f"unknown class {lab!r}; classes: {self.class_names}")
                    out.append(lookup[lab])
                else:
                    out.append(int(_indices("labels", lab)[0]))
            y = torch.tensor(out, dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"class indices must lie in [0, {self.num_classes - 1}], got {y.min()}..{y.max()}")
        return y

    def names(self, indices: torch.Tensor) -> list[str]:
        """Class names of indices ``(N,)``; raises ValueError for an index outside ``[0, C-1]``."""
        return [self.class_names[int(i)] for i in self.index(torch.as_tensor(indices))]

    # The interface every encoding implements (what make_encoder's callers use).
    def encode(self, labels: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        """Targets for the loss of class labels given as indices or as class names."""
        raise NotImplementedError

    def decode(self, output: torch.Tensor, *, logits: bool | None = None) -> torch.Tensor:
        """Classes ``(N,)`` from network outputs (``logits=True``) or from targets."""
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C)`` of network outputs."""
        raise NotImplementedError


class NominalEncoder(_Encoder):
    """Unordered classes: softmax over ``C`` logits, cross-entropy on class indices.

    Parameters
    ----------
    num_classes : int
        ``C >= 2``.
    class_names : sequence of str, optional
        Names of the classes in index order.
    one_hot : bool
        ``encode`` returns one-hot ``(N, C)`` float targets instead of indices ``(N,)``.
    """

    encoding = "nominal"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, one_hot: bool = False) -> None:
        super().__init__(num_classes, class_names)
        self.one_hot = one_hot

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def encode(self, labels: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        """Indices ``(N,)`` int64, or one-hot ``(N, C)`` float32 if ``one_hot``."""
        y = self.index(labels)
        return torch.nn.functional.one_hot(y, self.num_classes).float() if self.one_hot else y

    def decode(self, output: torch.Tensor, *, logits: bool | None = None) -> torch.Tensor:
        """Classes ``(N,)`` from logits or one-hot/probabilities ``(N, C)`` (argmax), or indices ``(N,)``.

        A 1-D tensor is read as class indices: non-integer values (scores) are a ValueError, not truncated.
        ``logits=True`` (as for the other encodings) requires logits ``(N, C)``."""
        output = torch.as_tensor(output)
        if output.dim() == 1 and not logits:
            try:
                _indices("output", output)
            except ValueError:
                raise ValueError(f"a 1-D output is read as class indices (N,) by the nominal encoding and must hold "
                                 f"whole numbers, got {output[:8].tolist()}; scores or logits must be "
                                 f"(N, {self.num_classes})") from None
            return self.index(output)
        return self._outputs(output).argmax(1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax ``(N, C)`` of logits ``(N, C)``."""
        return self._outputs(logits, "logits").float().softmax(1)


class BinaryEncoder(_Encoder):
    """Two classes, one logit (of class 1), binary cross-entropy."""

    encoding = "binary"

    def __init__(self, num_classes: int = 2, class_names: Sequence[str] | None = None) -> None:
        if num_classes != 2:
            raise ValueError(f"the binary encoding has 2 classes, got {num_classes}")
        super().__init__(2, class_names)

    @property
    def num_outputs(self) -> int:
        return 1

    def encode(self, labels: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        """Float targets ``(N, 1)`` in {0, 1}."""
        return self.index(labels).float()[:, None]

    def decode(self, output: torch.Tensor, *, logits: bool | None = None) -> torch.Tensor:
        """Classes ``(N,)`` from logits ``(N, 1)`` (``logit > 0``) or from 0/1 targets ``(N, 1)``.

        ``logits=None`` guesses: a tensor holding only 0 and 1 is taken as targets.
        """
        out = self._outputs(output)[:, 0]
        if logits is None:
            logits = not bool(((out == 0) | (out == 1)).all())
        return (out > 0).long() if logits else (out > 0.5).long()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, 2)``: ``[1 - p, p]`` with ``p = sigmoid(logit)``."""
        p = self._outputs(logits, "logits").float().sigmoid()
        return torch.cat([1 - p, p], 1)


class OrdinalEncoder(_Encoder):
    """Ordered classes ``0 < ... < K-1`` in the cumulative-link (CORAL) form: ``K-1`` binary tasks ``y > k``.

    ``encode(y)[:, k] = [y > k]``; ``decode`` counts the tasks with ``P(y > k) > 0.5`` (from logits, of the
    non-increasing :meth:`cumulative`) or the ones of targets ``(N, K-1)``, so ``decode(encode(y)) == y``.
    """

    encoding = "ordinal"

    @property
    def num_outputs(self) -> int:
        return self.num_classes - 1

    def encode(self, labels: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        """Cumulative targets ``(N, K-1)`` float32."""
        y = self.index(labels)
        return (y[:, None] > torch.arange(self.num_classes - 1)[None]).float()

    def decode(self, output: torch.Tensor, *, logits: bool | None = None) -> torch.Tensor:
        """Classes ``(N,)`` from logits ``(N, K-1)`` (the number of :meth:`cumulative` ``P(y > k) > 0.5``, i.e. of
        leading ``logits > 0``) or from 0/1 targets ``(N, K-1)``.

        ``logits=None`` guesses: a tensor holding only 0 and 1 is taken as targets.
        """
        output = self._outputs(output)
        if logits is None:
            logits = not bool(((output == 0) | (output == 1)).all())
        if logits:  # from the same monotone P(y > k) as probabilities: the decoded class has probability > 0
            return (self.cumulative(output) > 0.5).long().sum(1)
        return (output > 0.5).long().sum(1)

    def cumulative(self, logits: torch.Tensor) -> torch.Tensor:
        """``P(y > k)`` ``(N, K-1)``, made non-increasing in ``k`` (running minimum of the sigmoids): a head whose
        biases lost their order (training does not keep them ordered) would give ``P(y > 1) > P(y > 0)``; with
        ordered biases this is the sigmoid itself."""
        return self._outputs(logits, "logits").float().sigmoid().cummin(1).values

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, K)``: ``P(y = k) = P(y > k-1) - P(y > k)`` of :meth:`cumulative` (>= 0,
        summing to 1)."""
        p = self.cumulative(logits)
        n = p.shape[0]
        cum = torch.cat([p.new_ones(n, 1), p, p.new_zeros(n, 1)], 1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0)


# (a literal encoding name gives its class: make_encoder("ordinal", 4).cumulative(...) type-checks)
@overload
def make_encoder(encoding: Literal["nominal"], num_classes: int,
                 class_names: Sequence[str] | None = None) -> NominalEncoder: ...
@overload
def make_encoder(encoding: Literal["binary"], num_classes: int,
                 class_names: Sequence[str] | None = None) -> BinaryEncoder: ...
@overload
def make_encoder(encoding: Literal["ordinal"], num_classes: int,
                 class_names: Sequence[str] | None = None) -> OrdinalEncoder: ...
@overload
def make_encoder(encoding: str, num_classes: int, class_names: Sequence[str] | None = None) -> _Encoder: ...
def make_encoder(encoding: str, num_classes: int, class_names: Sequence[str] | None = None) -> _Encoder:
    """The encoder named ``encoding`` (``"nominal"``, ``"binary"`` or ``"ordinal"``)."""
    kinds = {"nominal": NominalEncoder, "binary": BinaryEncoder, "ordinal": OrdinalEncoder}
    if encoding not in kinds:
        raise ValueError(f"encoding must be one of {sorted(kinds)}, got {encoding!r}")
    return kinds[encoding](num_classes, class_names)
