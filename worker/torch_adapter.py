"""A PyTorch ``nn.Module`` as a rayps model: NumPy parameters in, NumPy gradients out, keyed by torch's names.

The parameter server stores NumPy arrays named as ``module.named_parameters()`` names them (``"0.weight"``,
``"0.bias"``, ...), in the module's own layout (a ``Linear`` weight is ``(out, in)``) and dtype. Each step the
pulled arrays are copied into the module, forward and backward run on the batch, and the ``.grad`` of every
parameter comes back as NumPy. Buffers (e.g. BatchNorm running statistics) stay local to each worker's module.

torch is optional (``pip install "rayps[torch]"``) and imported only when a ``TorchModule`` is built.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import numpy as np

TORCH_INSTALL_HINT = 'pip install "rayps[torch]"'


def _import_torch():
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(f"TorchModule needs PyTorch, which is not installed; {TORCH_INSTALL_HINT}") from exc
    return torch


def _as_tensor(torch, array: np.ndarray):
    """A tensor sharing ``array``'s memory; read-only arrays (Ray's zero-copy views) are only ever read here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


class TorchModule:
    """Wraps ``module`` so it trains with rayps: ``init_params``, ``loss_and_grads``, ``predict``, ``accuracy``.

    ``loss_fn(outputs, targets) -> scalar tensor`` defaults to ``torch.nn.functional.cross_entropy`` (mean over
    the batch, as the built-in NumPy models). Parameters must be float32 or float64.
    """

    def __init__(self, module: Any, loss_fn: Callable | None = None):
        torch = _import_torch()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchModule: module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.loss_fn = torch.nn.functional.cross_entropy if loss_fn is None else loss_fn
        if not self._params:
            raise ValueError("TorchModule: the module has no parameters")
        for name, param in self._params.items():
            if _numpy_dtype(param.dtype) is None:
                raise ValueError(f"TorchModule: parameter {name!r} has dtype {param.dtype}; "
                                 f"rayps needs float32 or float64 (call module.float() or module.double())")

    @property
    def _params(self) -> dict:
        """The module's parameters by name (looked up each time, so ``module.double()`` etc. are seen)."""
        return dict(self.module.named_parameters())

    @property
    def param_names(self) -> list[str]:
        """Parameter names in ``named_parameters()`` order."""
        return list(self._params)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """``name -> shape`` as torch lays the parameters out."""
        return {name: tuple(param.shape) for name, param in self._params.items()}

    def init_params(self, seed: int | None = None, dtype=None) -> dict[str, np.ndarray]:
        """The module's parameters as fresh NumPy arrays (dtype kept unless ``dtype`` is given).

        With ``seed``, every submodule that has ``reset_parameters()`` is re-initialized first under
        ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards), so runs are reproducible.
        """
        torch = _import_torch()
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for submodule in self.module.modules():
                    reset = getattr(submodule, "reset_parameters", None)
                    if callable(reset):
                        reset()
        params = {}
        for name, param in self._params.items():
            array = param.detach().cpu().numpy().copy()
            params[name] = array if dtype is None else array.astype(dtype)
        return params

    def _load(self, params: Mapping[str, np.ndarray]) -> None:
        """Copies ``params`` into the module after checking names and shapes."""
        torch = _import_torch()
        if not isinstance(params, Mapping):
            raise TypeError(f"TorchModule: params must be a mapping name -> array, got {type(params).__name__}")
        module_params = self._params
        missing = [name for name in module_params if name not in params]
        unknown = [name for name in params if name not in module_params]
        if missing or unknown:
            raise ValueError(f"TorchModule: params missing {missing} and unknown {unknown}; "
                             f"expected the module's names {list(module_params)}")
        for name, param in module_params.items():
            shape = tuple(np.shape(params[name]))
            if shape != tuple(param.shape):
                raise ValueError(f"TorchModule: param {name!r} has shape {shape}, "
                                 f"expected {tuple(param.shape)} (torch layout)")
        with torch.no_grad():
            for name, param in module_params.items():
                param.copy_(_as_tensor(torch, np.asarray(params[name])))

    def _inputs(self, x):
        torch = _import_torch()
        first = next(iter(self._params.values()))
        x = np.asarray(x, dtype=_numpy_dtype(first.dtype))
        return _as_tensor(torch, x).to(first.device)

    def loss_and_grads(self, params: Mapping[str, np.ndarray], x, y) -> tuple[float, dict[str, np.ndarray]]:
        """Loss on the batch ``(x, y)`` at ``params`` and its gradients (same names, shapes and dtypes as params).

        ``x`` is cast to the module's parameter dtype; ``y`` is passed to ``loss_fn`` as int64 class ids, or,
        when it is floating (regression targets, e.g. ``loss_fn=torch.nn.functional.mse_loss``), in the module's
        parameter dtype. A parameter the forward pass does not use gets a zero gradient.
        """
        torch = _import_torch()
        self._load(params)
        inputs = self._inputs(x)
        y = np.asarray(y)
        dtype = _numpy_dtype(next(iter(self._params.values())).dtype)
        targets = _as_tensor(torch, y.astype(np.int64) if y.dtype.kind in "biu" else y.astype(dtype, copy=False))
        targets = targets.to(inputs.device)
        self.module.train()
        self.module.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.module(inputs), targets)
        loss.backward()
        grads = {}
        for name, param in self.module.named_parameters():
            dtype = np.asarray(params[name]).dtype
            if param.grad is None:
                grads[name] = np.zeros(tuple(param.shape), dtype=dtype)
            else:
                grads[name] = param.grad.detach().cpu().numpy().astype(dtype, copy=False)
        self.module.zero_grad(set_to_none=True)  # the returned arrays now own the gradient memory
        return float(loss.detach()), grads

    def predict(self, params: Mapping[str, np.ndarray], x) -> np.ndarray:
        """Class ids (int64) of the largest output for each row of ``x`` (module in eval mode, no grad)."""
        torch = _import_torch()
        self._load(params)
        self.module.eval()
        with torch.no_grad():
            outputs = self.module(self._inputs(x))
        return outputs.argmax(dim=1).cpu().numpy().astype(np.int64)

    def accuracy(self, params: Mapping[str, np.ndarray], x, y) -> float:
        """Fraction of rows of ``x`` whose predicted class equals ``y``."""
        return float(np.mean(self.predict(params, x) == np.asarray(y)))

    def __repr__(self) -> str:
        return f"TorchModule({type(self.module).__name__}, params={self.param_names})"


def _numpy_dtype(torch_dtype) -> np.dtype | None:
    """The NumPy dtype of a torch float32/float64 dtype; None for any other (float16, bfloat16, ints)."""
    names = {"torch.float32": np.dtype(np.float32), "torch.float64": np.dtype(np.float64)}
    return names.get(str(torch_dtype))
