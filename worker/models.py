r"""Built-in NumPy classifiers with exact gradients: softmax regression and a ReLU MLP.

Parameters are a dict ``name -> array``: ``W0, b0, W1, b1, ...`` layer by layer, ``W{i}`` of shape
``(fan_in, fan_out)`` (so a layer is ``h @ W + b``) and ``b{i}`` of shape ``(fan_out,)``. The loss is the
softmax cross-entropy averaged over the batch,

.. math::  L = -\frac{1}{n}\sum_i \log \mathrm{softmax}(z_i)_{y_i},
           \qquad \partial L / \partial z = (\mathrm{softmax}(z) - \mathrm{onehot}(y)) / n,

with the log-softmax computed from ``z - max(z)`` (no overflow). All math runs as matmuls in the parameters'
dtype (float32 or float64); no Python loop over samples.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

MODEL_NAMES = ("softmax", "mlp")
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_size(value, field: str, owner: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {field} must be an integer >= 1, got {value!r}")
    return int(value)


def parse_hidden_sizes(hidden, owner: str = "mlp") -> tuple[int, ...]:
    """Hidden layer sizes from an int, a sequence of ints, or a string like ``"2048,2048"``; at least one, all >= 1."""
    original = hidden
    if isinstance(hidden, str):
        try:
            hidden = [int(part) for part in hidden.split(",")]
        except ValueError:
            raise ValueError(f"{owner}: hidden sizes must be positive integers like '128' or '2048,2048', "
                             f"got {original!r}") from None
    elif isinstance(hidden, numbers.Integral):
        hidden = [hidden]
    try:
        sizes = tuple(hidden)
    except TypeError:
        raise ValueError(f"{owner}: hidden sizes must be an int or a sequence of ints, got {original!r}") from None
    if not sizes:
        raise ValueError(f"{owner}: hidden sizes must name at least one layer, got {original!r}")
    for size in sizes:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{owner}: hidden sizes must be positive integers, got {original!r}")
    return tuple(int(size) for size in sizes)


class DenseClassifier:
    """A stack of dense layers, ReLU between them, softmax cross-entropy on top (no hidden layer: softmax regression).

    ``layer_sizes = (num_features, *hidden_sizes, num_classes)``. Holds no parameters: every method takes them.
    """

    kind = "dense"

    def __init__(self, num_features: int, hidden_sizes: Sequence[int], num_classes: int):
        owner = self.kind
        self.num_features = _check_size(num_features, "num_features", owner)
        self.num_classes = _check_size(num_classes, "num_classes", owner)
        self.hidden_sizes = tuple(_check_size(h, "hidden size", owner) for h in hidden_sizes)
        self.layer_sizes = (self.num_features, *self.hidden_sizes, self.num_classes)

    @property
    def num_layers(self) -> int:
        """Dense layers (hidden layers + the output layer)."""
        return len(self.layer_sizes) - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``name -> shape`` in layer order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    def init_params(self, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
        """Fresh parameters, deterministic for ``seed``: He-normal weights for ReLU layers, Glorot-normal for the
        output layer, zero biases. Drawn in float64 and rounded, so float32 and float64 start at the same point."""
        dtype = np.dtype(dtype)
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"{self.kind}: dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            is_output = i == self.num_layers - 1
            std = np.sqrt(2.0 / (fan_in + fan_out)) if is_output else np.sqrt(2.0 / fan_in)
            params[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) * std).astype(dtype)
            params[f"b{i}"] = np.zeros(fan_out, dtype=dtype)
        return params

    def _check_params(self, params: Mapping[str, np.ndarray]) -> np.dtype:
        if not isinstance(params, Mapping):
            raise TypeError(f"{self.kind}: params must be a mapping name -> array, got {type(params).__name__}")
        shapes = self.param_shapes()
        missing = [name for name in shapes if name not in params]
        unknown = [name for name in params if name not in shapes]
        if missing or unknown:
            raise ValueError(f"{self.kind}: params missing {missing} and unknown {unknown}; "
                             f"expected {list(shapes)}")
        dtype = np.dtype(params["W0"].dtype)
        for name, shape in shapes.items():
            array = params[name]
            if tuple(array.shape) != shape:
                raise ValueError(f"{self.kind}: param {name!r} has shape {tuple(array.shape)}, expected {shape}")
            if array.dtype != dtype or dtype not in PARAM_DTYPES:
                raise ValueError(f"{self.kind}: param {name!r} has dtype {array.dtype}; all params must share "
                                 f"one dtype, float32 or float64 (W0 is {dtype})")
        return dtype

    def _check_inputs(self, x, dtype: np.dtype) -> np.ndarray:
        x = np.asarray(x, dtype=dtype)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{self.kind}: x must have shape (n, {self.num_features}), got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError(f"{self.kind}: x is an empty batch")
        return x

    def _check_labels(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"{self.kind}: y must be {n} integer class ids, got shape {y.shape} dtype {y.dtype}")
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"{self.kind}: y must be class ids in [0, {self.num_classes}), "
                             f"got min {y.min()} max {y.max()}")
        return y

    def _forward(self, params, x) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and the input of every layer (the ReLU outputs, needed by the backward pass)."""
        inputs = [x]
        h = x
        for i in range(self.num_layers):
            z = h @ params[f"W{i}"]
            z += params[f"b{i}"]
            if i < self.num_layers - 1:
                np.maximum(z, 0, out=z)
                inputs.append(z)
            h = z
        return h, inputs

    def loss_and_grads(self, params: Mapping[str, np.ndarray], x, y) -> tuple[float, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy over the batch and its exact gradient w.r.t. every parameter.

        ``x``: ``(n, num_features)`` (cast to the params' dtype), ``y``: ``(n,)`` class ids. The grads have the
        params' names, shapes and dtype.
        """
        dtype = self._check_params(params)
        x = self._check_inputs(x, dtype)
        y = self._check_labels(y, x.shape[0])
        n = x.shape[0]
        logits, inputs = self._forward(params, x)
        rows = np.arange(n)
        # log softmax(z) = (z - max z) - log sum exp(z - max z)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        sum_exp = exp.sum(axis=1, keepdims=True)
        log_probs_true = logits[rows, y] - np.log(sum_exp[:, 0])
        loss = float(-log_probs_true.mean(dtype=np.float64))
        # dL/dz = (softmax(z) - onehot(y)) / n
        delta = exp
        delta /= sum_exp
        delta[rows, y] -= 1
        delta *= dtype.type(1.0 / n)
        grads: dict[str, np.ndarray] = {}
        for i in reversed(range(self.num_layers)):
            h = inputs[i]
            grads[f"W{i}"] = h.T @ delta
            grads[f"b{i}"] = delta.sum(axis=0)
            if i > 0:
                delta = delta @ params[f"W{i}"].T
                delta *= h > 0  # ReLU'(z) = [z > 0] = [relu(z) > 0]
        return loss, {name: grads[name] for name in self.param_shapes()}

    def predict(self, params: Mapping[str, np.ndarray], x) -> np.ndarray:
        """Class ids (int64) of the largest logit for each row of ``x``."""
        dtype = self._check_params(params)
        logits, _ = self._forward(params, self._check_inputs(x, dtype))
        return logits.argmax(axis=1).astype(np.int64)

    def accuracy(self, params: Mapping[str, np.ndarray], x, y) -> float:
        """Fraction of rows of ``x`` whose predicted class equals ``y``."""
        predicted = self.predict(params, x)
        y = self._check_labels(y, predicted.shape[0])
        return float(np.mean(predicted == y))

    def accuracy_and_loss(self, params: Mapping[str, np.ndarray], x, y) -> tuple[float, float]:
        """``accuracy(params, x, y)`` and the loss of ``loss_and_grads`` from ONE forward pass and no backward
        pass: what an evaluation needs (the same numbers, a third of the work)."""
        dtype = self._check_params(params)
        x = self._check_inputs(x, dtype)
        y = self._check_labels(y, x.shape[0])
        logits, _ = self._forward(params, x)
        accuracy = float(np.mean(logits.argmax(axis=1) == y))
        logits -= logits.max(axis=1, keepdims=True)  # the same operations as loss_and_grads, so the same loss
        sum_exp = np.exp(logits).sum(axis=1, keepdims=True)
        log_probs_true = logits[np.arange(x.shape[0]), y] - np.log(sum_exp[:, 0])
        return accuracy, float(-log_probs_true.mean(dtype=np.float64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_sizes={self.layer_sizes})"


class SoftmaxRegression(DenseClassifier):
    """Multinomial logistic regression: one dense layer ``x @ W0 + b0`` and softmax cross-entropy."""

    kind = "softmax"

    def __init__(self, num_features: int, num_classes: int):
        super().__init__(num_features, (), num_classes)


class MLP(DenseClassifier):
    """Multi-layer perceptron: dense layers of ``hidden_sizes`` units with ReLU, then a softmax output layer."""

    kind = "mlp"

    def __init__(self, num_features: int, hidden_sizes: Sequence[int] | int | str, num_classes: int):
        super().__init__(num_features, parse_hidden_sizes(hidden_sizes, "mlp"), num_classes)


class ModelGradFn:
    """``grad_fn(params, batch) -> (loss, grads)`` over a model's ``loss_and_grads``, ``batch = (x, y)``.

    A plain picklable object (ships to Ray workers as is); ``.model`` gives evaluation (``accuracy``) access.
    """

    def __init__(self, model: Any):
        if not callable(getattr(model, "loss_and_grads", None)):
            raise TypeError(f"grad_fn_for: model must have a loss_and_grads(params, x, y) method, "
                            f"got {type(model).__name__}")
        self.model = model

    def __call__(self, params: Mapping[str, np.ndarray], batch) -> tuple[float, dict[str, np.ndarray]]:
        x, y = batch
        return self.model.loss_and_grads(params, x, y)

    def __repr__(self) -> str:
        return f"ModelGradFn({self.model!r})"


def grad_fn_for(model: Any) -> Callable[[Mapping[str, np.ndarray], tuple], tuple[float, dict[str, np.ndarray]]]:
    """The user-facing gradient-function form (``grad_fn(params, (x, y)) -> (loss, grads)``) of a model."""
    return ModelGradFn(model)


def build_model(name: str, num_features: int, num_classes: int,
                hidden: Sequence[int] | int | str = (128,)) -> DenseClassifier:
    """``"softmax"`` (``hidden`` ignored) or ``"mlp"`` with hidden layer sizes ``hidden`` (e.g. ``(2048, 2048)``)."""
    if name == "softmax":
        return SoftmaxRegression(num_features, num_classes)
    if name == "mlp":
        return MLP(num_features, hidden, num_classes)
    raise ValueError(f"model: unknown name {name!r}; expected one of {list(MODEL_NAMES)}")
