"""rayps.worker.torch_adapter: a torch nn.Module's NumPy grads equal the rayps MLP's for the same weights."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is optional (pip install 'rayps[torch]')")

from rayps.worker.models import MLP  # noqa: E402
from rayps.worker.torch_adapter import TorchModule  # noqa: E402


def _sequential(num_features=6, hidden=5, num_classes=4, dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(num_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes)).to(dtype)


def _torch_to_rayps(params):
    """torch's Linear stores weight as (out, in) and computes x @ weight.T; rayps stores W as (in, out)."""
    return {"W0": params["0.weight"].T.copy(), "b0": params["0.bias"].copy(),
            "W1": params["2.weight"].T.copy(), "b1": params["2.bias"].copy()}


def _batch(n=9, num_features=6, num_classes=4):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, num_features)), rng.integers(0, num_classes, n)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_grads_equal_rayps_mlp_with_the_same_weights(dtype, tolerance):
    adapter = TorchModule(_sequential(dtype=dtype))
    params = adapter.init_params()
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert params["0.weight"].shape == (5, 6) and all(p.dtype == np_dtype for p in params.values())
    x, y = _batch()
    loss, grads = adapter.loss_and_grads(params, x, y)

    mlp = MLP(6, (5,), 4)
    ours = _torch_to_rayps(params)
    expected_loss, expected = mlp.loss_and_grads(ours, x, y)
    assert isinstance(loss, float) and loss == pytest.approx(expected_loss, rel=tolerance)
    assert list(grads) == list(params)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape and grad.dtype == np_dtype, name
    np.testing.assert_allclose(grads["0.weight"], expected["W0"].T, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(grads["0.bias"], expected["b0"], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(grads["2.weight"], expected["W1"].T, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(grads["2.bias"], expected["b1"], rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(adapter.predict(params, x), mlp.predict(ours, x))
    assert adapter.accuracy(params, x, y) == mlp.accuracy(ours, x, y)


def test_params_are_loaded_from_numpy_each_call():
    adapter = TorchModule(_sequential())
    params = adapter.init_params()
    x, y = _batch()
    moved = {name: value + 0.25 for name, value in params.items()}
    for value in moved.values():
        value.flags.writeable = False  # arrays pulled through Ray's object store are read-only
    loss_moved, grads_moved = adapter.loss_and_grads(moved, x, y)
    loss, _ = adapter.loss_and_grads(params, x, y)
    expected_loss, expected = MLP(6, (5,), 4).loss_and_grads(_torch_to_rayps(moved), x, y)
    assert loss_moved == pytest.approx(expected_loss, rel=1e-12) and loss != loss_moved
    np.testing.assert_allclose(grads_moved["0.weight"], expected["W0"].T, rtol=1e-12, atol=1e-14)
    # the first call's grads are not overwritten by the second call
    assert not np.allclose(grads_moved["2.bias"], adapter.loss_and_grads(params, x, y)[1]["2.bias"])


def test_init_params_with_seed_is_reproducible_and_restores_the_rng():
    adapter = TorchModule(_sequential())
    state = torch.random.get_rng_state()
    first = adapter.init_params(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = adapter.init_params(seed=3)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["0.weight"], adapter.init_params(seed=4)["0.weight"])
    assert adapter.init_params(dtype=np.float32)["0.bias"].dtype == np.float32


def test_name_and_shape_errors():
    adapter = TorchModule(_sequential())
    params = adapter.init_params()
    x, y = _batch()
    missing = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing \['2.bias'\] and unknown \[\]"):
        adapter.loss_and_grads(missing, x, y)
    with pytest.raises(ValueError, match=r"missing \[\] and unknown \['W0'\]"):
        adapter.loss_and_grads({**params, "W0": params["0.weight"]}, x, y)
    with pytest.raises(ValueError, match=r"param '0.weight' has shape \(6, 5\), expected \(5, 6\)"):
        adapter.loss_and_grads({**params, "0.weight": params["0.weight"].T}, x, y)
    with pytest.raises(ValueError, match=r"param '2.bias' has shape \(3,\), expected \(4,\)"):
        adapter.predict({**params, "2.bias": params["2.bias"][:3]}, x)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got dict"):
        TorchModule({})
    with pytest.raises(ValueError, match=r"parameter '0.weight' has dtype torch.bfloat16"):
        TorchModule(_sequential(dtype=torch.bfloat16))


def test_import_without_torch_fails_only_at_construction():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from rayps.worker.torch_adapter import TorchModule\n"
        "try:\n"
        "    TorchModule(object())\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "rayps[torch]"' in result.stdout
