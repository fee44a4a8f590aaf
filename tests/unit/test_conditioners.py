"""The scalar conditioner: Fourier features of a continuous value, a learned null vector."""

from __future__ import annotations

import pytest
import torch

import unfog
from unfog.errors import ConfigError, DataError


def scalar(**kw):  # noqa: ANN003, ANN201
    torch.manual_seed(0)
    return unfog.create("conditioner", "scalar", **{"dim": 16, **kw})


def test_embeds_each_value_and_tells_close_values_apart():
    c = scalar(low=0.0, high=10.0)
    out = c(torch.tensor([1.0, 1.1, 9.0]))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # 1% of the range apart still differs
    torch.testing.assert_close(c(torch.tensor([1.0])), out[:1])  # a row does not depend on the batch


def test_nan_and_dropped_rows_get_the_null_vector():
    c = scalar()
    with torch.no_grad():
        c.null.fill_(0.5)
    out = c(torch.tensor([0.2, float("nan"), 0.7]), torch.tensor([False, False, True]))
    torch.testing.assert_close(out[1], c.null.detach())
    torch.testing.assert_close(out[2], c.null.detach())
    assert not torch.allclose(out[0], c.null.detach())


def test_integer_values_work_and_bad_values_fail_naming_the_field():
    c = scalar(field="brightness")
    assert c(torch.tensor([0, 1])).shape == (2, 16)
    with pytest.raises(DataError, match="'brightness'.*infinite"):
        c(torch.tensor([float("inf")]))
    with pytest.raises(DataError, match="'brightness' must be a 1-D tensor"):
        c(torch.zeros(2, 2))


def test_bad_settings_refused():
    with pytest.raises(ConfigError, match="low < high"):
        scalar(low=1.0, high=1.0)
    with pytest.raises(ConfigError, match="dropout"):
        scalar(dropout=1.0)


def test_grid_values_span_the_range():
    from unfog.model import DiffusionModel
    from unfog.sampling import default_values

    backbone = unfog.create("backbone", "mlp", data_shape=(2,), cond_dim=16)
    model = DiffusionModel(backbone, {"s": scalar(low=-1.0, high=3.0, field="v")})
    values = default_values(model.conditioners, 5)
    torch.testing.assert_close(values["v"], torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0]))
