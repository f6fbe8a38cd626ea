"""Unpickling a .bin verification set without letting the file run code.

A .bin is a pickle, and a plain pickle.load calls whatever callable the file names (a downloaded .bin can run
`os.system`). What insightface's .bin files hold is small: a pair (images, issame) of lists or tuples, the
images bytes (python 2's str, read with encoding='bytes') and issame python bools - in some files a numpy
bool array or numpy bool scalars, and images as uint8 arrays. So only the callables those need are handed
out, each checking its arguments: numpy's array and scalar rebuilders for bool / uint8 / int8 data,
`_codecs.encode` with latin-1 (how protocol 0-2 pickles of python 3 spell bytes) and bytearray. Any other
global is refused before anything is called.
"""
import pickle

import numpy as np

from ..errors import DataError

# numpy's own rebuilders, found from objects rather than by their module path (numpy 1.x: numpy.core, 2.x:
# numpy._core)
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_NUMPY_SCALAR = np.True_.__reduce__()[0]
_FORMAT_DTYPES = (np.dtype(bool), np.dtype(np.uint8), np.dtype(np.int8))
_ARRAY_CLASS = object()  # stands for numpy.ndarray: only the array rebuilder accepts it, nothing can call it


class NotBinFormat(pickle.UnpicklingError):
    """The pickle asks for something a .bin verification set never contains."""


def _text(value):
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _format_dtype(spec, align=False, copy=True):
    dtype = np.dtype(_text(spec), bool(align), bool(copy))
    if dtype not in _FORMAT_DTYPES:
        raise NotBinFormat(f"a numpy array of dtype {dtype}")
    return dtype


def _rebuild_array(subtype, shape, typecode):
    if subtype is not _ARRAY_CLASS:
        raise NotBinFormat(f"an array rebuilt as {subtype!r}")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, _text(typecode))


def _array_from_buffer(buffer, dtype, shape, order):
    if not isinstance(dtype, np.dtype) or dtype not in _FORMAT_DTYPES:
        raise NotBinFormat(f"a numpy array of dtype {dtype!r}")
    return np.frombuffer(memoryview(buffer), dtype=dtype).reshape(shape, order=_text(order)).copy()


def _scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype not in _FORMAT_DTYPES:
        raise NotBinFormat(f"a numpy scalar of dtype {dtype!r}")
    return _NUMPY_SCALAR(dtype, data)


def _latin1_bytes(text, encoding="utf-8"):
    if _text(encoding).lower().replace("_", "-") not in ("latin1", "latin-1") or not isinstance(text, str):
        raise NotBinFormat(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _bytearray(data=b"", encoding=None):
    if isinstance(data, str):
        return bytearray(_latin1_bytes(data, encoding or ""))
    if not isinstance(data, (bytes, bytearray)):
        raise NotBinFormat(f"bytearray of a {type(data).__name__}")
    return bytearray(data)


_ALLOWED = {
    **{f"{package}.multiarray._reconstruct": _rebuild_array for package in ("numpy.core", "numpy._core")},
    **{f"{package}.multiarray.scalar": _scalar for package in ("numpy.core", "numpy._core")},
    **{f"{package}.numeric._frombuffer": _array_from_buffer for package in ("numpy.core", "numpy._core")},
    "numpy.ndarray": _ARRAY_CLASS,
    "numpy.dtype": _format_dtype,
    "_codecs.encode": _latin1_bytes,
    "builtins.bytearray": _bytearray,
    "__builtin__.bytearray": _bytearray,
}


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise NotBinFormat(f"the global {module}.{name}")
        return found


def load_bin_pickle(path):
    """The unpickled (images, issame) of a .bin, python 2 or 3; DataError for anything else, before it runs."""
    for encoding in ("ASCII", "bytes"):  # python 2 pickles of the original release hold non-ASCII str
        try:
            with open(path, "rb") as f:
                return _BinUnpickler(f, encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except NotBinFormat as err:
            raise DataError(f"{path}: refused to unpickle it, it asks for {err}; a .bin verification set holds "
                            "only (images, issame): bytes, lists, tuples, bools and numpy bool / uint8 arrays, and "
                            "unpickling anything else could run code from the file") from None
        except Exception as err:  # truncated or junk files: many pickle and numpy error types
            raise DataError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from None
    raise DataError(f"{path} is not a readable pickle (text that is neither ASCII nor python 2 bytes)")
