"""A strict CuPy test double backed by NumPy, so that the solver's GPU code path runs in CI without a GPU.

It keeps CuPy's host/device rules (checked against CuPy's cupy/_core/core.pyx and _kernel.pyx):

- ``ndarray`` is a wrapper, not a numpy subclass; ``numpy.asarray(a)`` raises TypeError ("Implicit conversion to a
  NumPy array is not allowed"), as CuPy's ``__array__`` does. The way back to the host is ``asnumpy(a)`` or
  ``a.get()``; ``asarray``/``array`` take host data to the device.
- A numpy array in a device operation (``a + np_array``, ``where(a, np_array, 0)``, ``a[idx] = np_array``) raises
  TypeError, like CuPy's kernels ("Unsupported type"); Python and NumPy scalars are fine. NumPy integer or boolean
  arrays as indices are accepted (CuPy copies them to the device).
- Reductions and scalar indexing return 0-d device arrays, not scalars; ``float``, ``int``, ``bool``, ``.item()``
  and ``.tolist()`` copy to the host (allowed: CuPy synchronizes).
- ``argsort`` is stable and takes no other ``kind`` (CuPy sorts by radix sort).

Stricter than CuPy: numpy functions and ufuncs refuse the double (``np.sum(a)`` raises TypeError), where CuPy would
dispatch them to CuPy through ``__array_function__``/``__array_ufunc__``; the solver calls ``xp.*`` instead.

Every other ``xp.<name>`` (and ``xp.linalg.<name>``...) is NumPy's function with the wrappers unwrapped, numpy arrays
refused, and array results wrapped. Importing this module registers it with onnxcomq.solve.backend, so that
``array_module`` and ``to_numpy`` know it.
"""

from __future__ import annotations

import sys
import types

import numpy as np

from onnxcomq.solve.backend import register_device_module

IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array "
            "explicitly.")


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)} (strict CuPy double: a host numpy array in a device operation)")


def _unwrap(x):
    """The numpy array inside ``x`` (recursively in lists, tuples, dicts); a raw numpy array is an error."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _unwrap_index(key):
    """An index: device arrays unwrapped; numpy index arrays and lists accepted (CuPy copies them over)."""
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key


def _wrap(r):
    """Arrays and numpy scalars (CuPy returns 0-d arrays for them) -> device arrays, through tuples and lists."""
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, np.generic):
        return ndarray(np.asarray(r))
    if isinstance(r, (list, tuple)) and not hasattr(r, "_fields"):
        return type(r)(_wrap(v) for v in r)
    return r


def _sort_kind(name, kwargs):
    if name in ("argsort", "sort"):
        if kwargs.get("kind") not in (None, "stable"):
            raise ValueError(f"{name}: only the stable sort is supported (CuPy), got kind={kwargs['kind']!r}")
        kwargs["kind"] = "stable"


def _device(fn, name):
    """``fn`` (a numpy function or array method) taking and returning device arrays."""
    def call(*args, **kwargs):
        out = kwargs.get("out")
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        _sort_kind(name, kwargs)
        r = fn(*args, **kwargs)
        return out if isinstance(out, ndarray) and r is out._a else _wrap(r)
    call.__name__ = name
    return call


class ndarray:  # noqa: N801 (CuPy's name)
    """A device array: a numpy array that only explicit transfers (``get``, ``asnumpy``) take back to the host."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # numpy ufuncs refuse it; numpy's binary operators defer to the reflected ones below
    __hash__ = None
    created = 0  # device arrays made so far (tests check that a run went through the double)

    def __init__(self, a: np.ndarray):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"ndarray wraps a numpy array, got {type(a)}")
        self._a = a
        ndarray.created += 1

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} got a device array (strict CuPy double): call the array module's "
                        f"{func.__name__} (xp.{func.__name__}) or copy to the host with asnumpy first")

    def get(self, stream=None, order="C", out=None):
        """A host copy (numpy)."""
        return np.array(self._a, order=order)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_a":  # no __array_interface__ etc.: numpy must not read the memory
            raise AttributeError(name)
        attr = getattr(self._a, name)
        return _device(attr, name) if callable(attr) else _wrap(attr)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_index(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap_index(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __repr__(self):
        return "strict_cupy." + repr(self._a)

    def __str__(self):
        return str(self._a)


def _operand(x):
    """An operator's other operand: a device array or a scalar (CuPy's kernels refuse lists and numpy arrays)."""
    if isinstance(x, (list, tuple)):
        raise _unsupported(x)
    return _unwrap(x)


def _operator(name):
    def op(self, *args):
        r = getattr(self._a, name)(*map(_operand, args))
        return r if r is NotImplemented else _wrap(r)
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_operand(other))
        return self
    op.__name__ = name
    return op


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
           "rshift", "divmod"):
    setattr(ndarray, f"__{_n}__", _operator(f"__{_n}__"))
    setattr(ndarray, f"__r{_n}__", _operator(f"__r{_n}__"))
    if _n != "divmod":
        setattr(ndarray, f"__i{_n}__", _inplace(f"__i{_n}__"))
for _n in ("lt", "le", "eq", "ne", "gt", "ge", "neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_n}__", _operator(f"__{_n}__"))


def asarray(a, dtype=None, order=None):
    """Host data (numpy array, list, scalar) or a device array -> a device array (no copy when nothing changes)."""
    if isinstance(a, ndarray):
        b = np.asarray(a._a, dtype=dtype, order=order)
        return a if b is a._a else ndarray(b)
    return ndarray(np.array(_unwrap_index(a), dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    """Like ``asarray``, a copy by default."""
    src = a._a if isinstance(a, ndarray) else _unwrap_index(a)
    return ndarray(np.array(src, dtype=dtype, copy=copy, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None):
    """A host copy of a device array (a numpy array is returned as it is, like CuPy)."""
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


class _Namespace:
    """A numpy submodule (linalg, fft, random) on device arrays."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        return _lookup(self._mod, name)


def _lookup(mod, name):
    if name.startswith("__"):
        raise AttributeError(name)
    obj = getattr(mod, name)
    if isinstance(obj, types.ModuleType):
        return _Namespace(obj)
    if callable(obj) and not isinstance(obj, type):
        return _device(obj, name)
    return obj  # dtypes (float32, float64...), newaxis, pi, inf


_CACHE = {}


def __getattr__(name):
    if name not in _CACHE:
        _CACHE[name] = _lookup(np, name)
    return _CACHE[name]


register_device_module(sys.modules[__name__])
