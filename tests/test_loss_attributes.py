"""The loss modules' hyper-parameters are attributes read at each call (as MONAI's): setting one after
construction acts as passing it; the class weight is a buffer; bool flags are checked; GMI takes mixed dtypes."""

import warnings

import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice
from monai.losses import GlobalMutualInformationLoss as MonaiMI

import medfast as mf
from medfast.losses import (
    BendingEnergyLoss,
    DiceCELoss,
    DiceLoss,
    GlobalMutualInformationLoss,
    GradientNormLoss,
    bending_energy,
    global_mutual_information,
    gradient_norm,
)


def _seg_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (2, 1, 6, 6, 5), generator=g)
    return x, y


# value each attribute is changed to; the MONAI module to set it on (DiceCELoss keeps the Dice settings in .dice)
DICE_CHANGES = [("include_background", False), ("batch", True), ("smooth_nr", 0.5), ("smooth_dr", 2.0),
                ("reduction", "sum")]


@pytest.mark.parametrize("name,value", DICE_CHANGES)
def test_dice_loss_attribute_set_after_construction(name, value):
    x, y = _seg_data()
    ours = DiceLoss()
    setattr(ours, name, value)
    built = DiceLoss(**{name: value})
    monai = MonaiDice(to_onehot_y=True, softmax=True)
    setattr(monai, name, value)  # MONAI reads these at call time too
    assert getattr(ours, name) == value
    got = ours(x, y)
    torch.testing.assert_close(got, built(x, y), rtol=0, atol=0)
    torch.testing.assert_close(got, monai(x, y).reshape(got.shape), rtol=1e-10, atol=1e-12)
    assert got != DiceLoss()(x, y)  # the change matters


@pytest.mark.parametrize("name,value", DICE_CHANGES[:4] + [("lambda_dice", 0.25), ("lambda_ce", 0.0)])
def test_dice_ce_loss_attribute_set_after_construction(name, value):
    x, y = _seg_data()
    ours = DiceCELoss()
    setattr(ours, name, value)
    built = DiceCELoss(**{name: value})
    monai = MonaiDiceCE(to_onehot_y=True, softmax=True)
    setattr(monai if name.startswith("lambda") else monai.dice, name, value)
    got = ours(x, y)
    torch.testing.assert_close(got, built(x, y), rtol=0, atol=0)
    torch.testing.assert_close(got, monai(x, y), rtol=1e-10, atol=1e-12)
    assert got != DiceCELoss()(x, y)


def test_dice_ce_reduction_and_flags_set_after_construction():
    x, y = _seg_data()
    loss = DiceCELoss()
    loss.reduction = "sum"
    torch.testing.assert_close(loss(x, y), DiceCELoss(reduction="sum")(x, y), rtol=0, atol=0)
    torch.testing.assert_close(loss(x, y), MonaiDiceCE(to_onehot_y=True, softmax=True, reduction="sum")(x, y),
                               rtol=1e-10, atol=1e-12)
    loss.reduction = "none"  # refused by the op, naming the attribute's argument
    with pytest.raises(ValueError, match="reduction"):
        loss(x, y)
    loss = DiceCELoss()
    loss.sigmoid = True
    torch.testing.assert_close(loss(x, (y == 1).expand_as(x).double()),
                               DiceCELoss(sigmoid=True)(x, (y == 1).expand_as(x).double()), rtol=0, atol=0)
    loss.sigmoid = "False"  # a truthy string is not silently a sigmoid
    with pytest.raises(TypeError, match="sigmoid must be a bool"):
        loss(x, y)
    loss = DiceLoss()
    loss.batch = "no"
    with pytest.raises(TypeError, match="batch_dice must be a bool"):
        loss(x, y)


def test_attribute_names_and_defaults_as_monai():
    for ours, monai in ((DiceLoss(), MonaiDice(to_onehot_y=True, softmax=True)),
                        (DiceCELoss(), MonaiDiceCE(to_onehot_y=True, softmax=True).dice)):
        for name in ("include_background", "batch", "smooth_nr", "smooth_dr", "reduction", "class_weight"):
            assert getattr(ours, name) == getattr(monai, name), name
    ce = DiceCELoss(lambda_dice=0.5, lambda_ce=2)
    assert (ce.lambda_dice, ce.lambda_ce) == (0.5, 2.0)
    gmi, monai_gmi = GlobalMutualInformationLoss(num_bins=12), MonaiMI(num_bins=12)
    for name in ("kernel_type", "num_bins", "reduction", "smooth_nr", "smooth_dr"):
        assert getattr(gmi, name) == getattr(monai_gmi, name), name
    assert gmi.sigma_ratio == 0.5


@pytest.mark.parametrize("cls", [DiceLoss, DiceCELoss])
def test_class_weight_is_a_buffer(cls):
    x, y = _seg_data()
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    loss = cls(weight=w)
    assert list(loss.state_dict()) == ["class_weight"]
    assert loss.class_weight is w
    assert torch.equal(loss.state_dict()["class_weight"], w)
    # a sequence becomes a buffer too, with the value the op computed from the numbers before
    torch.testing.assert_close(cls(weight=[1.0, 2.0, 3.0])(x, y), loss(x, y), rtol=0, atol=0)
    assert list(cls(weight=[1.0, 2.0, 3.0]).state_dict()) == ["class_weight"]
    # set after construction: as passing it
    late = cls()
    assert late.class_weight is None and list(late.state_dict()) == []
    late.class_weight = w
    torch.testing.assert_close(late(x, y), loss(x, y), rtol=0, atol=0)
    assert list(late.state_dict()) == ["class_weight"]
    # .to() converts it with the module (meta: a device move without a GPU)
    assert cls(weight=w).to("meta").class_weight.device.type == "meta"
    assert cls(weight=w).double().class_weight.dtype == torch.float64
    # state_dict round trip into a loss built with another weight
    other = cls(weight=torch.ones(3, dtype=torch.float64))
    other.load_state_dict(cls(weight=w).state_dict())
    torch.testing.assert_close(other(x, y), loss(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [DiceLoss, DiceCELoss])
def test_state_dicts_saved_before_the_weight_buffer_still_load(cls):
    x, y = _seg_data()
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    old = cls(weight=w).state_dict()
    old.pop("class_weight")
    old._metadata[""]["version"] = 1  # what the losses saved before (no class_weight entry, module version 1)
    loss = cls(weight=w)
    loss.load_state_dict(old)  # strict: the missing weight of an old state_dict is not an error
    torch.testing.assert_close(loss(x, y), cls(weight=w)(x, y), rtol=0, atol=0)
    # as the submodule of a model too
    model = torch.nn.ModuleDict({"loss": cls(weight=w)})
    sd = model.state_dict()
    sd.pop("loss.class_weight")
    sd._metadata["loss"]["version"] = 1
    model.load_state_dict(sd)
    # a current state_dict without the entry is an error, as for any buffer
    new = cls(weight=w).state_dict()
    new.pop("class_weight")
    with pytest.raises(RuntimeError, match="class_weight"):
        cls(weight=w).load_state_dict(new)


def test_class_weight_that_requires_grad_stays_differentiable():
    x, y = _seg_data()
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    loss = DiceCELoss(weight=w)
    assert loss.class_weight is w and [p is w for p in loss.parameters()] == [True]
    (g,) = torch.autograd.grad(loss(x, y), w)
    assert g.abs().sum() > 0
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    parts = [v[0], v[1], v[2]]  # a sequence of 0-d tensors that require grad: kept as given
    (g2,) = torch.autograd.grad(DiceLoss(weight=parts)(x, y), v)
    assert g2.abs().sum() > 0


def test_dice_loss_weight_forms_from_the_buffer():
    # MONAI's C - 1 foreground weights with include_background=False, and one value for every class
    x, y = _seg_data()
    monai = MonaiDice(to_onehot_y=True, softmax=True, include_background=False, weight=[2.0, 3.0])
    ours = DiceLoss(include_background=False, weight=[2.0, 3.0])
    torch.testing.assert_close(ours(x, y), monai(x, y), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(DiceLoss(weight=2.0)(x, y), 2 * DiceLoss()(x, y), rtol=1e-12, atol=0)


def test_constructor_checks():
    for kwargs, err, match in [(dict(include_background="False"), TypeError, "include_background must be a bool"),
                               (dict(batch=1), TypeError, "batch must be a bool"),
                               (dict(sigmoid="yes"), TypeError, "sigmoid must be a bool"),
                               (dict(reduction="max"), ValueError, "reduction"),
                               (dict(smooth_nr=-1.0), ValueError, "smooth_nr"),
                               (dict(smooth_dr=float("nan")), ValueError, "smooth_dr"),
                               (dict(weight="abc"), TypeError, "weight")]:
        for cls in (DiceLoss, DiceCELoss):
            with pytest.raises(err, match=match):
                cls(**kwargs)
    with pytest.raises(ValueError, match="reduction"):
        DiceCELoss(reduction="none")  # the fused Dice + CE returns a scalar
    with pytest.raises(ValueError, match="lambda_ce"):
        DiceCELoss(lambda_ce=-1.0)
    import numpy as np

    loss = DiceLoss(include_background=np.False_, batch=torch.tensor(True))
    assert loss.include_background is False and loss.batch is True
    with pytest.raises(ValueError, match="num_bins"):
        GlobalMutualInformationLoss(num_bins=1)
    with pytest.raises(ValueError, match="sigma_ratio"):
        GlobalMutualInformationLoss(sigma_ratio=0.0)


@pytest.mark.parametrize("name,value", [("num_bins", 8), ("sigma_ratio", 0.3), ("smooth_nr", 0.1),
                                        ("smooth_dr", 0.2), ("reduction", "sum")])
def test_gmi_attribute_set_after_construction(name, value):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 6, 6, 6, generator=g, dtype=torch.float64), torch.rand(2, 1, 6, 6, 6, generator=g,
                                                                                     dtype=torch.float64)
    ours = GlobalMutualInformationLoss()
    setattr(ours, name, value)
    got = ours(a, b)
    torch.testing.assert_close(got, GlobalMutualInformationLoss(**{name: value})(a, b), rtol=0, atol=0)
    # MONAI's bin centres are fixed in its __init__: compare with MONAI built with the value
    torch.testing.assert_close(got, MonaiMI(**{name: value})(a, b), rtol=1e-7, atol=1e-9)
    assert got != GlobalMutualInformationLoss()(a, b)
    ours.num_bins = 1
    with pytest.raises(ValueError, match="num_bins"):
        ours(a, b)
    ours = GlobalMutualInformationLoss()
    ours.kernel_type = "b-spline"  # not silently Gaussian
    with pytest.raises(ValueError, match="kernel_type must be 'gaussian'"):
        ours(a, b)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_gmi_mixed_dtypes(dtypes):
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 1, 8, 8, 8, generator=g), torch.rand(2, 1, 8, 8, 8, generator=g)
    a, b = a.to(dtypes[0]), b.to(dtypes[1])
    want_dtype = torch.promote_types(torch.promote_types(*dtypes), torch.float32)
    # reference: both inputs (their exact values) in the promoted dtype, by MONAI
    ref = MonaiMI()(a.to(want_dtype), b.to(want_dtype))
    for fn in (global_mutual_information, GlobalMutualInformationLoss()):
        got = fn(a, b)
        assert got.dtype == want_dtype
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_gmi_half_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(1, 1, 8, 8, 8, generator=g).bfloat16(), torch.rand(1, 1, 8, 8, 8, generator=g).bfloat16()
    got = global_mutual_information(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, MonaiMI()(a.float(), b.float()), rtol=1e-5, atol=1e-6)


def test_gmi_shape_rule():
    # (B, N1, ..., Nk), k >= 1: a (B, N) sample set works, a (B,) tensor is refused with the documented rule
    a, b = torch.rand(2, 50, dtype=torch.float64), torch.rand(2, 50, dtype=torch.float64)
    torch.testing.assert_close(global_mutual_information(a, b), MonaiMI()(a, b), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match=r"\(B, N1, \.\.\., Nk\) with k >= 1"):
        global_mutual_information(torch.rand(2), torch.rand(2))


@pytest.mark.parametrize("value", ["False", "no", None, 0.5, 1])
def test_regularizer_normalize_must_be_a_bool(value):
    ddf = torch.randn(1, 3, 6, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (bending_energy, gradient_norm):
            with pytest.raises(TypeError, match="normalize must be a bool"):
                fn(ddf, normalize=value)
        for cls in (BendingEnergyLoss, GradientNormLoss):
            with pytest.raises(TypeError, match="normalize must be a bool"):
                cls(normalize=value)


def test_regularizer_normalize_numpy_bool():
    import numpy as np

    ddf = torch.randn(1, 3, 6, 6, 6)
    assert bending_energy(ddf, normalize=np.True_) == bending_energy(ddf, normalize=True)
    assert BendingEnergyLoss(normalize=np.False_).normalize is False


def test_class_weight_list_of_python_floats_keeps_float64():
    # a list of Python floats is float64: the functional op must not round it to float32 first (the modules don't)
    torch.manual_seed(0)
    z = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 4, 4))
    w = [0.1, 0.7, 1.0 / 3.0]
    wt = torch.tensor(w, dtype=torch.float64)
    assert mf.dice_loss(z, y, class_weight=w).item() == mf.dice_loss(z, y, class_weight=wt).item()
    ref = torch.nn.functional.cross_entropy(z, y, weight=wt)
    torch.testing.assert_close(mf.cross_entropy(z, y, class_weight=w), ref, rtol=1e-14, atol=0)
