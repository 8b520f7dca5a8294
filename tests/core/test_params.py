from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedcrypt.core import contribution, params, wire
from fedcrypt.core.messages import FitIns, from_bytes, to_bytes
from fedcrypt.core.params import ParamSpec, flatten, load_flat, unflatten
from fedcrypt.core.wire import FileArray, SpooledMessage
from fedcrypt.models.zoo import McMahanCNN

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    count = draw(st.integers(1, 5))
    state = {}
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(_DTYPES))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            tensor = (torch.randn(shape, generator=gen) * 100).to(dtype)
        elif dtype == torch.bool:
            tensor = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            high = 255 if dtype == torch.uint8 else 2**24 - 1
            tensor = torch.randint(0, high, shape, generator=gen).to(dtype)
        state[f"layer{i}.w"] = tensor
    return state


@given(state_dicts())
@settings(max_examples=100, deadline=None)
def test_flatten_unflatten_round_trips_exactly(state: dict[str, torch.Tensor]) -> None:
    spec = ParamSpec.from_state_dict(state)
    vector = flatten(state, spec)
    assert vector.dtype == np.float32 and vector.shape == (spec.size,)
    restored = unflatten(vector, ParamSpec.from_json(spec.to_json()))
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name


def test_real_model_with_batchnorm_round_trips() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 1, 6, 6))
    model[1].num_batches_tracked += 7
    state = model.state_dict()
    restored = unflatten(flatten(state), ParamSpec.from_state_dict(state))
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert restored["1.num_batches_tracked"].dtype == torch.int64


def test_cnn_parameter_count_matches_mcmahan() -> None:
    assert ParamSpec.from_state_dict(McMahanCNN().state_dict()).size == 1_663_370


def test_load_flat_writes_into_the_module() -> None:
    model = nn.Linear(3, 2)
    spec = ParamSpec.from_state_dict(model.state_dict())
    vector = np.arange(spec.size, dtype=np.float32)
    vector.flags.writeable = False  # as decoded from a message
    load_flat(model, vector, spec)
    np.testing.assert_array_equal(flatten(model.state_dict(), spec), vector)


def test_load_flat_reads_a_spooled_vector_in_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "LAZY_BLOB_BYTES", 16)
    monkeypatch.setattr(params, "WINDOW", 7)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    spec = ParamSpec.from_state_dict(model.state_dict())
    vector = np.arange(spec.size, dtype=np.float32)
    spooled = SpooledMessage()
    spooled.write(to_bytes(FitIns(1, vector, {}, ()), job="j", sender="server"))
    received = from_bytes(spooled).message
    assert isinstance(received, FitIns) and isinstance(received.params, FileArray)
    load_flat(model, received.params, spec)
    np.testing.assert_array_equal(flatten(model.state_dict(), spec), vector)


def test_contribution_is_packed_in_place_from_the_trained_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contribution, "WINDOW", 3)
    rng = np.random.default_rng(1)
    trained, reference = rng.normal(size=10).astype(np.float32), rng.normal(size=10).astype(np.float32)
    buffer = np.empty(11, dtype=np.float32)
    buffer[:-1] = trained
    packed = contribution.pack_trained(buffer, reference, 7.0)
    assert packed is buffer
    np.testing.assert_array_equal(packed, contribution.pack(trained - reference, 7.0))
    with pytest.raises(ValueError, match="reference has shape"):
        contribution.pack_trained(buffer, reference[:-1], 1.0)


def test_inexact_values_are_refused_not_rounded() -> None:
    with pytest.raises(ValueError, match="big.*2\\*\\*24"):
        flatten({"big": torch.tensor([2**24 + 1])})
    with pytest.raises(ValueError, match="precise.*not exactly representable"):
        flatten({"precise": torch.tensor([0.1], dtype=torch.float64)})
    assert flatten({"ok": torch.tensor([0.5], dtype=torch.float64)})[0] == 0.5


def test_mismatched_vector_or_state_is_rejected() -> None:
    spec = ParamSpec.from_state_dict({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        unflatten(np.zeros(4, dtype=np.float32), spec)
    with pytest.raises(ValueError, match="no entry 'a'"):
        flatten({"b": torch.zeros(3)}, spec)
    with pytest.raises(ValueError, match="shape"):
        flatten({"a": torch.zeros(4)}, spec)
    with pytest.raises(ValueError, match="malformed"):
        ParamSpec.from_json("{not json")
