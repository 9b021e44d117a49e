"""rayps.worker.models: exact gradients (vs. finite differences), the loss (vs. a hand-written one), training."""

import math

import numpy as np
import pytest

from rayps.worker.data import iterate_minibatches, load_dataset
from rayps.worker.models import MLP, ModelGradFn, SoftmaxRegression, build_model, grad_fn_for


def _tiny_problem(num_features=5, num_classes=3, n=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, num_features)), rng.integers(0, num_classes, n)


def _reference_loss(model, params, x, y):
    """Mean cross-entropy written sample by sample with Python floats (no shared code with the model)."""
    total = 0.0
    for row, label in zip(x.tolist(), y.tolist()):
        h = row
        for i in range(model.num_layers):
            w, b = params[f"W{i}"].tolist(), params[f"b{i}"].tolist()
            z = [sum(h[k] * w[k][j] for k in range(len(h))) + b[j] for j in range(len(b))]
            h = [max(v, 0.0) for v in z] if i < model.num_layers - 1 else z
        top = max(h)
        log_sum = top + math.log(sum(math.exp(v - top) for v in h))
        total += log_sum - h[label]
    return total / len(y)


def _finite_difference_grads(model, params, x, y, eps=1e-6):
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            grad[index] = (model.loss_and_grads(plus, x, y)[0] - model.loss_and_grads(minus, x, y)[0]) / (2 * eps)
        grads[name] = grad
    return grads


@pytest.mark.parametrize("model", [SoftmaxRegression(5, 3), MLP(5, (4, 6), 3)], ids=["softmax", "mlp-4-6"])
def test_gradients_match_central_finite_differences(model):
    x, y = _tiny_problem()
    params = model.init_params(seed=1, dtype=np.float64)
    params = {k: v + 0.1 * np.random.default_rng(2).standard_normal(v.shape) for k, v in params.items()}
    loss, grads = model.loss_and_grads(params, x, y)
    numeric = _finite_difference_grads(model, params, x, y)
    assert list(grads) == list(params)
    for name in params:
        assert grads[name].shape == params[name].shape and grads[name].dtype == np.float64
        np.testing.assert_allclose(grads[name], numeric[name], rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("model", [SoftmaxRegression(5, 3), MLP(5, (4, 6), 3)], ids=["softmax", "mlp-4-6"])
def test_loss_equals_hand_written_cross_entropy(model):
    x, y = _tiny_problem(seed=3)
    params = model.init_params(seed=4, dtype=np.float64)
    params = {k: v + 0.5 * np.random.default_rng(5).standard_normal(v.shape) for k, v in params.items()}
    loss, _ = model.loss_and_grads(params, x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(_reference_loss(model, params, x, y), rel=1e-12)
    # predictions agree with the largest logit, written out the same way
    assert model.accuracy(params, x, y) == np.mean(model.predict(params, x) == y)


def test_loss_is_stable_for_huge_logits():
    model = SoftmaxRegression(2, 3)
    params = {"W0": np.array([[1e4, 0, -1e4], [0, 0, 0]], np.float32), "b0": np.zeros(3, np.float32)}
    x, y = np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 2])
    loss, grads = model.loss_and_grads(params, x, y)
    assert loss == pytest.approx(1e4, rel=1e-6)  # sample 0: ~0; sample 1: 2e4
    assert all(np.isfinite(g).all() for g in grads.values())


def test_params_names_shapes_dtypes_and_deterministic_init():
    model = MLP(64, (32, 16), 10)
    params = model.init_params(seed=0)
    assert list(params) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    assert [p.shape for p in params.values()] == [(64, 32), (32,), (32, 16), (16,), (16, 10), (10,)]
    assert all(p.dtype == np.float32 for p in params.values())
    again = model.init_params(seed=0)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["W0"], model.init_params(seed=1)["W0"])
    wide = model.init_params(seed=0, dtype=np.float64)
    np.testing.assert_array_equal(wide["W0"].astype(np.float32), params["W0"])
    assert np.std(params["W0"]) == pytest.approx(math.sqrt(2 / 64), rel=0.1)  # He
    x, y = _tiny_problem(num_features=64, num_classes=10, n=9)
    for dtype, p in ((np.float32, params), (np.float64, wide)):
        _, grads = model.loss_and_grads(p, x, y)
        assert all(grads[k].dtype == dtype and grads[k].shape == p[k].shape for k in p)
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got float16"):
        model.init_params(0, dtype=np.float16)


def test_bad_params_and_inputs_name_the_problem():
    model = MLP(5, (4,), 3)
    params = model.init_params(0)
    x, y = _tiny_problem()
    with pytest.raises(ValueError, match=r"missing \['b1'\] and unknown \['bias'\]"):
        model.loss_and_grads({**{k: v for k, v in params.items() if k != "b1"}, "bias": params["b1"]}, x, y)
    with pytest.raises(ValueError, match=r"param 'W1' has shape \(3, 4\), expected \(4, 3\)"):
        model.loss_and_grads({**params, "W1": params["W1"].T}, x, y)
    with pytest.raises(ValueError, match=r"param 'b0' has dtype float64"):
        model.loss_and_grads({**params, "b0": params["b0"].astype(np.float64)}, x, y)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 5\), got \(7, 4\)"):
        model.loss_and_grads(params, x[:, :4], y)
    with pytest.raises(ValueError, match=r"y must be class ids in \[0, 3\), got min 0 max 3"):
        model.loss_and_grads(params, x, np.array([0, 1, 2, 3, 0, 1, 2]))


def test_build_model_and_grad_fn():
    assert isinstance(build_model("softmax", 64, 10), SoftmaxRegression)
    mlp = build_model("mlp", 64, 10, hidden="2048,2048")
    assert isinstance(mlp, MLP) and mlp.hidden_sizes == (2048, 2048)
    assert build_model("mlp", 64, 10).hidden_sizes == (128,)
    assert build_model("mlp", 64, 10, hidden=7).hidden_sizes == (7,)
    with pytest.raises(ValueError, match=r"model: unknown name 'cnn'; expected one of \['softmax', 'mlp'\]"):
        build_model("cnn", 64, 10)
    for bad in [(), [], "", (0,), (16, -1), "16,x", (2.5,)]:
        with pytest.raises(ValueError, match="mlp: hidden sizes"):
            build_model("mlp", 64, 10, hidden=bad)
    with pytest.raises(ValueError, match="softmax: num_classes must be an integer >= 1, got 0"):
        build_model("softmax", 64, 0)
    model = SoftmaxRegression(5, 3)
    params = model.init_params(0, dtype=np.float64)
    x, y = _tiny_problem()
    grad_fn = grad_fn_for(model)
    assert isinstance(grad_fn, ModelGradFn) and grad_fn.model is model
    loss, grads = grad_fn(params, (x, y))
    expected_loss, expected_grads = model.loss_and_grads(params, x, y)
    assert loss == expected_loss and all(np.array_equal(grads[k], expected_grads[k]) for k in params)
    with pytest.raises(TypeError, match="must have a loss_and_grads"):
        grad_fn_for(object())


def test_large_hidden_layers_run_on_a_batch():
    model = build_model("mlp", 64, 10, hidden=(2048, 2048))
    params = model.init_params(0)
    x, y = _tiny_problem(num_features=64, num_classes=10, n=32)
    loss, grads = model.loss_and_grads(params, x.astype(np.float32), y)
    assert np.isfinite(loss) and grads["W1"].shape == (2048, 2048) and grads["W1"].dtype == np.float32


def test_sgd_on_digits_reaches_90_percent():
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=(32,))
    params = model.init_params(seed=0)
    rng = np.random.default_rng(0)
    steps = 0
    while steps < 300:
        for xb, yb in iterate_minibatches(data.x_train, data.y_train, rng.permutation(data.num_train), 32):
            _, grads = model.loss_and_grads(params, xb, yb)
            for name in params:
                params[name] -= np.float32(0.5) * grads[name]
            steps += 1
    assert model.accuracy(params, data.x_test, data.y_test) >= 0.9


@pytest.mark.parametrize("hidden", [(), (16,), (8, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accuracy_and_loss_equal_accuracy_and_the_loss_of_loss_and_grads(hidden, dtype):
    rng = np.random.default_rng(3)
    model = build_model("mlp", 5, 4, hidden=hidden) if hidden else build_model("softmax", 5, 4)
    params = model.init_params(seed=1, dtype=dtype)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 4, size=30)
    accuracy, loss = model.accuracy_and_loss(params, x, y)
    assert accuracy == model.accuracy(params, x, y)
    assert loss == model.loss_and_grads(params, x, y)[0]
    read_only = {n: a.copy() for n, a in params.items()}
    for array in read_only.values():
        array.flags.writeable = False  # what ParameterServer.pull(copy=False) hands out
    assert model.accuracy_and_loss(read_only, x, y) == (accuracy, loss)
    assert model.loss_and_grads(read_only, x, y)[0] == loss
