"""Portable, atomic checkpoints of parameters and engine state.

A checkpoint is one plain, uncompressed ``.npz`` file (a zip archive of
``.npy`` files, as written by :func:`numpy.savez`), readable by NumPy alone
with ``allow_pickle=False``; nothing in it is pickled. Its entries are

``__sdze__``
    A 0-d unicode array holding a JSON document (written first, so reading
    it is cheap)::

        {"format": 1,                    # FORMAT_VERSION
         "sdze": "0.1.0",                # version that wrote the file
         "config": {...},                # the run's configuration (JSON)
         "extra": {...},                 # free-form JSON (metrics, timings, ...)
         "params": [["W", "b"], ...],    # the entry names of each layer, in order
         "state": <structure>}           # the engine state, arrays by reference

``params/<l>/W``, ``params/<l>/b``
    The parameters of layer ``l`` (``W`` of shape (out, in), ``b`` of shape
    (out,)), in the dtype they were trained in.

``state/<n>``
    The arrays of the engine state, numbered in the order met.

The state structure is JSON: ``None``, booleans, integers, strings and
finite floats stand for themselves (floats round-trip exactly) and lists
for lists; every other value is a one-key (or two-key) tagged object:

====================================  ========================================
``{"__tuple__": [...]}``              a tuple
``{"__float__": "inf"}``              ``inf``, ``-inf`` or ``nan``
``{"__key__": [hi, lo]}``             a :class:`~sdze_core.keys.Key`
``{"__array__": "state/3"}``          an array, stored in entry ``state/3``
``{"__namedtuple__": "m:Q",           a NamedTuple, class ``Q`` of module
``"fields": {...}}``                  ``m`` (an ``sdze*`` module)
``{"__dict__": {...}}``               a dict whose keys collide with a tag
====================================  ========================================

and any other JSON object is a dict (string keys).

The network: :func:`load_network` returns its weights as plain NumPy
arrays. ``params/<l>/W`` alone is *not* the network of an SDZE run with
the default :class:`~sdze_core.samplers.LowRankSubspace` sampler: the steps
since its last basis refresh are held in the state as an r × r matrix A
per layer, and the weight is W + U A Vᵀ (U, V the layer's stored bases).
Reading a checkpoint with NumPy alone::

    >>> import json
    >>> import numpy as np
    >>> with np.load("run.npz", allow_pickle=False) as z:
    ...     header = json.loads(str(z["__sdze__"]))
    ...     sampler = header["state"]["fields"]["sampler"]["fields"]
    ...     W0 = z["params/0/W"]                      # first layer's stored weights
    ...     if sampler["pending"] is not None:        # the pending update A, bases U, V
    ...         A = z[sampler["pending"]["__tuple__"][0]["__array__"]]
    ...         U, V = (z[a["__array__"]]
    ...                 for a in sampler["bases"]["__tuple__"][0]["__tuple__"])
    ...         W0 = W0 + U @ A @ V.T                 # the first layer's weights
    >>> header["config"]["model"]["sizes"]
    [1000, 128, 1]
    >>> header["state"]["fields"]["step"]             # an SDZEState's step
    5000

Writes are atomic: the file is written to a temporary file next to the
target (``.<name>.tmp-<pid>-<random>``), flushed and ``fsync``-ed, then
renamed onto the target with :func:`os.replace`, and the directory is
synced. Whenever the writer is killed, the path holds either the previous
complete checkpoint or the new complete one; the next successful save of
the same path removes temporary files left by dead writers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pathlib
import re
import secrets
import zipfile
from typing import Any, NamedTuple

import numpy as np

from sdze_core.keys import Key
from sdze_core.registry import backend_of, get_backend, make_backend

from ._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "read_config",
    "load_network",
]

#: Version of the file layout; files of a newer version are refused.
FORMAT_VERSION = 1

HEADER_ENTRY = "__sdze__"
_ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local file header (np.savez writes one)
_NPY_MAGIC = b"\x93NUMPY"
_TAGS = ("__tuple__", "__float__", "__key__", "__array__", "__namedtuple__", "__dict__")
_TEMP_MARK = ".tmp-"


class CheckpointError(ValueError):
    """The file is unreadable, corrupt, of a newer format, or not an sdze checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is valid but does not match what the caller expects.

    Attributes
    ----------
    mismatches : list of (str, object, object)
        Each ``(field, value in the checkpoint, expected value)``; a field
        missing from the checkpoint's config has a value whose repr is
        ``<missing>``.
    """

    def __init__(self, message: str, mismatches=()):
        super().__init__(message)
        self.mismatches = list(mismatches)


class CheckpointWriteError(OSError):
    """A save failed (e.g. a full disk): the path still holds the previous checkpoint, if
    there was one, untouched, and the temporary file is removed. ``errno`` is the cause's."""


def _write_failed(path: pathlib.Path, cause: OSError) -> CheckpointWriteError:
    kept = (f"the previous checkpoint at {path} is intact" if path.exists()
            else f"no file was created at {path}")
    return CheckpointWriteError(
        cause.errno,
        f"could not save the checkpoint {path}: {cause.strerror or cause}; {kept} "
        "(the temporary file was removed)",
    )


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    Attributes
    ----------
    params : list of dict
        Per layer ``{"W": (out, in), "b": (out,)}`` arrays of the load backend.
    state : Any
        The engine state (e.g. :class:`~sdze_core.engine.SDZEState`), arrays
        on the load backend, or ``None`` if none was saved.
    config : dict
        The run's configuration as saved (tuples come back as lists).
    extra : dict
        The free-form extra data as saved (``{}`` if none was given).
    """

    params: list
    state: Any
    config: dict
    extra: dict


# -- encoding ------------------------------------------------------------------------------


def _is_array(x) -> bool:
    return hasattr(x, "__array_namespace__") or (hasattr(x, "shape") and hasattr(x, "dtype"))


def _host(x) -> np.ndarray:
    """``x`` as a NumPy array: no copy for NumPy (and PyTorch CPU) arrays."""
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(backend_of(x).to_host(x))


def _importable_module(module: str) -> bool:
    top = module.split(".", 1)[0]
    return top == "sdze" or top.startswith("sdze_")


class _StateEncoder:
    """Turns a state pytree into JSON, collecting its arrays (not copied yet)."""

    def __init__(self):
        self.arrays: list[tuple[str, Any]] = []

    def encode(self, x, where: str = "state"):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, np.generic) and not isinstance(x, np.void):
            return self.encode(x.item(), where)
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            x = float(x)
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, Key):
            return {"__key__": [x.hi, x.lo]}
        if isinstance(x, tuple) and hasattr(type(x), "_fields"):
            cls = type(x)
            if not _importable_module(cls.__module__) or "<locals>" in cls.__qualname__:
                raise TypeError(
                    f"{where}: cannot checkpoint the NamedTuple {cls.__module__}."
                    f"{cls.__qualname__}: only classes defined at module level in sdze "
                    "modules can be restored"
                )
            return {
                "__namedtuple__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {
                    name: self.encode(value, f"{where}.{name}")
                    for name, value in zip(cls._fields, x, strict=True)
                },
            }
        if isinstance(x, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str):
                    raise TypeError(f"{where}: dict keys must be strings, got {k!r}")
            encoded = {k: self.encode(v, f"{where}[{k!r}]") for k, v in x.items()}
            if any(k in _TAGS for k in encoded):
                return {"__dict__": encoded}
            return encoded
        if _is_array(x):
            name = f"state/{len(self.arrays)}"
            self.arrays.append((name, x))
            return {"__array__": name}
        raise TypeError(f"{where}: cannot checkpoint a {type(x).__module__}.{type(x).__qualname__}")


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"config and extra must be JSON data; got a {type(x).__qualname__}")


# -- decoding ------------------------------------------------------------------------------


def _resolve_namedtuple(target: str, path) -> type:
    module_name, _, qualname = target.partition(":")
    if not _importable_module(module_name):
        raise CheckpointError(
            f"{path}: refusing to import {module_name!r} for the NamedTuple {target!r}: "
            "only sdze modules are imported from checkpoints"
        )
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the state's class {target!r} does not exist") from exc
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise CheckpointError(f"{path}: {target!r} is not a NamedTuple class")
    return obj


def _decode(x, load_array, path):
    if isinstance(x, list):
        return [_decode(v, load_array, path) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tuple__" in x:
        return tuple(_decode(v, load_array, path) for v in x["__tuple__"])
    if "__float__" in x:
        return float(x["__float__"])
    if "__key__" in x:
        hi, lo = x["__key__"]
        return Key(hi, lo)
    if "__array__" in x:
        return load_array(x["__array__"])
    if "__namedtuple__" in x:
        cls = _resolve_namedtuple(x["__namedtuple__"], path)
        fields = {k: _decode(v, load_array, path) for k, v in x["fields"].items()}
        unknown = sorted(set(fields) - set(cls._fields))
        if unknown:
            raise CheckpointError(
                f"{path}: {x['__namedtuple__']} has no field(s) {unknown}; the checkpoint was "
                "written by an incompatible sdze version"
            )
        try:
            return cls(**fields)
        except TypeError as exc:
            raise CheckpointError(f"{path}: cannot rebuild {x['__namedtuple__']}: {exc}") from exc
    if "__dict__" in x:
        x = x["__dict__"]
    return {k: _decode(v, load_array, path) for k, v in x.items()}


# -- writing -------------------------------------------------------------------------------


def _write_entry(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    """Write one ``name.npy`` member (streamed in chunks, no copy of the array)."""
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(r"\." + re.escape(name) + re.escape(_TEMP_MARK) + r"(\d+)-[0-9a-f]+")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (POSIX only: signal 0 probes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: exists, someone else's
    return True


def _remove_stale_temps(path: pathlib.Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` files of writers that no longer run."""
    pattern = _temp_pattern(path.name)
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or (os.name == "posix" and _pid_alive(pid)):
            continue  # possibly a save in progress (another thread or process)
        with contextlib.suppress(OSError):  # on Windows: still open by a live writer
            candidate.unlink()


def _fsync_directory(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_params(params) -> list[list[str]]:
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of dicts, got {type(params).__name__}")
    names = []
    for layer, p in enumerate(params):
        if not isinstance(p, dict):
            raise TypeError(f"params[{layer}] must be a dict, got {type(p).__name__}")
        for name, value in p.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"params[{layer}]: bad entry name {name!r}")
            if not _is_array(value):
                raise TypeError(f"params[{layer}][{name!r}] is not an array")
        names.append(list(p))
    return names


def save_checkpoint(
    path, *, params, state=None, config: dict, extra: dict | None = None
) -> pathlib.Path:
    """Write parameters, engine state and configuration to ``path``, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file. Used exactly as given (no ``.npz`` is appended);
        missing parent directories are created.
    params : list of dict
        Per layer a dict of arrays (``{"W": ..., "b": ...}``) of any backend.
        Each array is brought to the host (:meth:`Backend.to_host`) only when
        it is written, so at most one array at a time is copied (none for
        NumPy and PyTorch CPU arrays).
    state : pytree, optional
        The engine state: NamedTuples of sdze modules, tuples, lists, dicts
        with string keys, :class:`~sdze_core.keys.Key`, arrays of any
        backend, NumPy scalars (stored as Python scalars), ``None``, bools,
        ints, floats and strings.
    config : dict
        The run's configuration, JSON data (NumPy scalars allowed; tuples
        are stored as lists). Checked on load by ``expect=``.
    extra : dict, optional
        Free-form JSON data (metrics, wall time, ...).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    TypeError
        If ``params``, ``state``, ``config`` or ``extra`` hold something that
        cannot be stored without pickling. Nothing is written then.
    CheckpointWriteError
        An ``OSError`` (e.g. ``ENOSPC``, a full disk) while writing: the
        message says that the previous checkpoint is intact.
    """
    path = pathlib.Path(os.fspath(path))
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    layer_names = _check_params(params)
    encoder = _StateEncoder()
    header = {
        "format": FORMAT_VERSION,
        "sdze": __version__,
        "config": config,
        "extra": {} if extra is None else extra,
        "params": layer_names,
        "state": encoder.encode(state),
    }
    text = json.dumps(header, default=_json_default, allow_nan=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        with open(temp, "xb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write_entry(zf, HEADER_ENTRY, np.array(text))
                for layer, p in enumerate(params):
                    for name, value in p.items():
                        _write_entry(zf, f"params/{layer}/{name}", _host(value))
                for name, value in encoder.arrays:
                    _write_entry(zf, name, _host(value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise _write_failed(path, error) from error
        raise
    _fsync_directory(path.parent)
    _remove_stale_temps(path)
    return path


# -- reading -------------------------------------------------------------------------------


@contextlib.contextmanager
def _open(path):
    """``np.load`` of an sdze checkpoint: yields ``(npz, header)``."""
    path = pathlib.Path(os.fspath(path))
    with open(path, "rb") as f:  # FileNotFoundError, IsADirectoryError, PermissionError
        magic = f.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        what = "an empty file" if not magic else f"a file starting with {magic!r}"
        if magic == _NPY_MAGIC[: len(magic)]:
            what = "a single .npy array"
        raise CheckpointError(
            f"{path} is not an sdze checkpoint (an .npz zip archive written by "
            f"sdze.save_checkpoint): it is {what}"
        )
    try:
        z = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable sdze checkpoint: {exc}") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path} is a single .npy array, not an sdze checkpoint (.npz)")
    with z:
        if HEADER_ENTRY not in z.files:
            raise CheckpointError(
                f"{path} is an .npz file but not an sdze checkpoint (it has no {HEADER_ENTRY!r})"
            )
        try:
            raw = z[HEADER_ENTRY]
            if raw.dtype == np.uint8:
                text = raw.tobytes().decode("utf-8")
            else:
                text = str(raw[()])
            header = json.loads(text)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, IndexError) as exc:
            raise CheckpointError(f"{path}: corrupt checkpoint header: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(header.get("format"), int):
            raise CheckpointError(f"{path}: the checkpoint header has no format version")
        if header["format"] > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format {header['format']}, newer than this sdze "
                f"({__version__}) reads (format {FORMAT_VERSION}): upgrade sdze to load it"
            )
        for field in ("config", "extra", "params"):
            if field not in header:
                raise CheckpointError(f"{path}: the checkpoint header lacks {field!r}")
        yield path, z, header


def _entry_shape(z, name: str, path) -> tuple:
    """Shape of an entry from its .npy header, without reading the data."""
    try:
        with z.zip.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    except KeyError as exc:
        raise CheckpointError(f"{path}: the checkpoint lacks the entry {name!r}") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt entry {name!r}: {exc}") from exc
    return tuple(shape)


def _read_entry(z, name: str, path) -> np.ndarray:
    try:
        return z[name]
    except KeyError as exc:
        raise CheckpointError(f"{path}: the checkpoint lacks the entry {name!r}") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt entry {name!r}: {exc}") from exc


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _lookup(config, key: str):
    """``config[key]``, where a dotted key also walks nested dicts ("model.sizes")."""
    if not isinstance(config, dict):
        return _MISSING
    if key in config:
        return config[key]
    for i, char in enumerate(key):
        if char == "." and key[:i] in config:
            found = _lookup(config[key[:i]], key[i + 1 :])
            if found is not _MISSING:
                return found
    return _MISSING


def _plain(x):
    """Expected values as JSON would bring them back (tuples as lists, NumPy scalars)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _same(a, b) -> bool:
    """Equality of JSON values: 1 == 1.0, True != 1, nan == nan, [..] element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        return a == b or both_nan
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _mismatches(path, z, header, expect) -> list:
    found = []
    config = header["config"]
    for key, expected in (expect or {}).items():
        value = _lookup(config, key)
        expected = _plain(expected)
        if value is _MISSING:
            found.append((key, "<missing>", expected))
        elif not _same(value, expected):
            found.append((key, value, expected))
    sizes = _lookup(config, "model.sizes")
    if isinstance(sizes, list) and all(isinstance(s, int) for s in sizes):
        layers = header["params"]
        if len(layers) != len(sizes) - 1:
            found.append(("number of layers", len(layers), len(sizes) - 1))
        for layer, names in enumerate(layers[: len(sizes) - 1]):
            want = {"W": (sizes[layer + 1], sizes[layer]), "b": (sizes[layer + 1],)}
            for name, shape in want.items():
                if name in names:
                    got = _entry_shape(z, f"params/{layer}/{name}", path)
                    if got != shape:
                        found.append((f"params[{layer}][{name!r}].shape", got, shape))
    return found


def _format_mismatches(path, found) -> str:
    lines = [f"{path} does not match what was expected ({len(found)} mismatch(es)):"]
    for field, value, expected in found:
        if value is _MISSING:
            lines.append(f"  {field}: missing from the checkpoint's config, expected {expected!r}")
        else:
            lines.append(f"  {field}: checkpoint has {value!r}, expected {expected!r}")
    return "\n".join(lines)


def load_checkpoint(path, backend=None, *, expect: dict | None = None) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    backend : Backend or str, optional
        Where the arrays go (default :func:`sdze.get_backend`); a name is made
        with :func:`sdze_core.registry.make_backend`. Arrays keep their stored
        dtype, whatever backend saved them.
    expect : dict, optional
        Configuration entries the caller requires, e.g.
        ``{"problem": "allen-cahn-two-body", "dim": 1000,
        "model.sizes": [1000, 128, 1]}``; a dotted key walks nested dicts.
        Tuples compare equal to the lists they are stored as.

    Returns
    -------
    Checkpoint
        ``(params, state, config, extra)``.

    Raises
    ------
    CheckpointMismatchError
        If an ``expect`` entry differs from (or is missing in) the config, or
        the weight shapes disagree with ``config["model"]["sizes"]`` (checked
        whenever the config has it). All mismatches are listed in one
        message; nothing big is read before the check.
    CheckpointError
        If the file is not a zip archive, not an sdze checkpoint, corrupt, or
        of a newer format.
    FileNotFoundError
        If there is no file at ``path``.
    """
    if backend is None:
        backend = get_backend()
    elif isinstance(backend, str):
        backend = make_backend(backend)
    with _open(path) as (path, z, header):
        found = _mismatches(path, z, header, expect)
        if found:
            raise CheckpointMismatchError(_format_mismatches(path, found), found)

        def load(name):
            return backend.asarray(_read_entry(z, name, path))

        params = [
            {name: load(f"params/{layer}/{name}") for name in names}
            for layer, names in enumerate(header["params"])
        ]
        try:
            state = _decode(header.get("state"), load, path)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed state structure: {exc!r}") from exc
        return Checkpoint(params, state, header["config"], header["extra"])


def read_config(path) -> dict:
    """The JSON part of a checkpoint, without reading any array.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.

    Returns
    -------
    dict
        ``{"format": int, "sdze": str, "config": dict, "extra": dict}``: the
        format version, the sdze version that wrote it, and the saved config
        and extra data.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint`.
    """
    with _open(path) as (_, _, header):
        return {
            "format": header["format"],
            "sdze": header.get("sdze"),
            "config": header["config"],
            "extra": header["extra"],
        }


def load_network(path) -> list[dict]:
    """The network of a checkpoint: per layer ``{"W": (out, in), "b": (out,)}`` NumPy arrays.

    Pending low-rank updates are merged: with the default
    :class:`~sdze_core.samplers.LowRankSubspace` sampler the weight of layer
    l is W + U A Vᵀ, with W the stored ``params/<l>/W``, A the pending r × r
    update and U, V the bases, all in the state (computed in float64, returned
    in the stored dtype). Parameters of a state without a pending update
    (first-order, full-space Gaussian, ``merge_every="step"``) come as stored.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint`, or if a pending update's bases are not
        stored (``store_bases=False``) and the checkpoint is not a solver
        run's: merge with the sampler that trained it (``SDZE.merge``).
    """
    saved = load_checkpoint(path, "numpy")
    params = [{k: np.asarray(v) for k, v in p.items()} for p in saved.params]
    sampler = getattr(saved.state, "sampler", None)
    pending = getattr(sampler, "pending", None)
    if pending is None:
        return params
    bases = getattr(sampler, "bases", None)
    if bases is None:
        if "solver" not in saved.config:
            raise CheckpointError(
                f"{path}: the pending low-rank update's bases are not stored; merge it "
                "with the sampler that trained the network (SDZE.merge)"
            )
        from .solver import SolverConfig, build

        config = SolverConfig.from_json(saved.config["solver"])
        config.backend, config.device = "numpy", None
        _, merged = build(config).method.merge(saved.params, saved.state)
        return [{k: np.asarray(v) for k, v in p.items()} for p in merged]
    for p, (U, V), A in zip(params, bases, pending, strict=True):
        f64 = [np.asarray(a, dtype=np.float64) for a in (p["W"], U, A, V)]
        p["W"] = (f64[0] + f64[1] @ f64[2] @ f64[3].T).astype(p["W"].dtype)
    return params
