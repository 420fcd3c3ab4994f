"""The Python face of a shared-memory replay buffer: validation in numpy terms, copies in Rust."""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
from types import TracebackType
from typing import Any, Literal, Mapping, overload

import numpy as np

from . import _core, _sigterm
from ._batches import Batches
from ._limiters import Limiter, limiter_args, limiter_of
from ._samplers import Prioritized, Queue, Sampler, Uniform, sampler_args, sampler_of
from ._types import FieldSpec, LimiterInfo, PathLike, SampleInfo, Stats

FieldTypes = dict[str, tuple[tuple[int, ...], np.dtype]]

_KINDS = {"b": "bool", "u": "unsigned integer", "i": "signed integer", "f": "floating point"}
_CODES = {"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"}
_MAX_DIMENSION = 1 << 40
_DEFAULT_BETA = 0.4
# The keywords add takes besides the fields: no field may take their names.
_PRIORITY = "priority"
_TIMEOUT = "timeout"
# The stats dict's keys, in the order of the typed dict.
_STATS_KEYS = tuple(Stats.__annotations__)


def _dtype_code(field: str, dtype: Any) -> tuple[np.dtype, str]:
    """Normalises a field's dtype and returns it with the core's short code (``"u1"``...)."""
    if dtype is None:  # np.dtype(None) is float64
        raise TypeError(f"field {field!r}: dtype must be given, got None")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as e:  # ValueError: e.g. a structured dtype naming a field twice
        raise TypeError(f"field {field!r}: {dtype!r} is not a numpy dtype ({e})") from e
    if f"{dt.kind}{dt.itemsize}" not in _CODES or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(
            f"field {field!r}: dtype {dt} is not supported "
            "(use bool, int8-64, uint8-64 or float16/32/64)"
        )
    if dt.byteorder == ">":
        raise TypeError(f"field {field!r}: big-endian dtype {dt} is not supported")
    return dt.newbyteorder("="), f"{dt.kind}{dt.itemsize}"


def _shape(field: str, shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"field {field!r}: shape must be an int or a tuple of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"field {field!r}: shape must be an int or a tuple of ints, got {shape!r}")
        if not 1 <= d <= _MAX_DIMENSION:
            raise ValueError(
                f"field {field!r}: every dimension must be between 1 and 2**40, got shape {shape!r}"
            )
    return tuple(int(d) for d in dims)


# The gymnasium spaces a field may be given as: each is one fixed-shape numpy array.
_SPACES = ("Box", "Discrete", "MultiBinary", "MultiDiscrete")


def _space_pair(field: str, spec: Any) -> tuple[Any, Any] | None:
    """``(shape, dtype)`` of a gymnasium space (``None`` if ``spec`` is not one): ``Box``,
    ``MultiBinary`` and ``MultiDiscrete`` by their ``shape`` and ``dtype``, ``Discrete`` a
    scalar of its dtype (int64). Other spaces are refused with a ``TypeError``.

    gymnasium is an optional dependency, never imported here: a space exists only if its
    program imported gymnasium already."""
    gymnasium = sys.modules.get("gymnasium")
    spaces = getattr(gymnasium, "spaces", None)
    if spaces is None or not isinstance(spec, spaces.Space):
        return None
    if isinstance(spec, spaces.Discrete):
        return (), spec.dtype
    if isinstance(spec, (spaces.Box, spaces.MultiBinary, spaces.MultiDiscrete)):
        return spec.shape, spec.dtype
    hint = (
        " (a Dict space can be the whole fields= mapping, one field per entry)"
        if isinstance(spec, spaces.Dict)
        else ""
    )
    raise TypeError(
        f"field {field!r}: a gymnasium {type(spec).__name__} space ({spec!r}) cannot be a field; "
        f"fields take {', '.join(_SPACES)} spaces or (shape, dtype) pairs{hint}"
    )


def _parse_fields(fields: Any) -> list[tuple[str, str, list[int]]]:
    if not isinstance(fields, Mapping):
        raise TypeError(
            "fields must be a mapping {name: (shape, dtype) or gymnasium space} "
            f"(or a gymnasium Dict space), got {type(fields).__name__}"
        )
    if not fields:
        raise ValueError("fields must name at least one field")
    parsed = []
    for name, spec in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"field names must be strings, got {name!r}")
        if name in (_PRIORITY, _TIMEOUT):
            raise ValueError(
                f"a field may not be named {name!r}: add/extend take their {name} under that name"
            )
        pair = _space_pair(name, spec)
        if pair is not None:
            spec = pair
        elif not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise TypeError(
                f"field {name!r}: expected a (shape, dtype) pair or a gymnasium space "
                f"({', '.join(_SPACES)}), got {spec!r}"
            )
        shape, dtype = spec
        parsed.append((name, _dtype_code(name, dtype)[1], list(_shape(name, shape))))
    return parsed


def _int_arg(name: str, value: Any, minimum: int | None, maximum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {n}")
    return n


def _seed_arg(value: Any, optional: bool = True) -> int | None:
    """A handle's seed: an int in ``[0, 2**64)``, or ``None`` (unseeded) if ``optional``."""
    if value is None and optional:
        return None
    want = "an int or None" if optional else "an int"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"seed must be {want}, got a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"seed must be {want}, got {type(value).__name__}") from None
    if not 0 <= n < 1 << 64:
        raise ValueError(f"seed must be between 0 and 2**64 - 1, got {n}")
    return n


def _warn_without_huge_pages(buf: Any) -> None:
    """Warns if a buffer just created with ``huge_pages=True`` got no huge page at all (not if
    that cannot be told: ``/proc/self/smaps`` unreadable). A warning turned into an error
    leaves nothing behind: the buffer is removed and closed first."""
    if buf.nbytes < _core.HUGE_PAGE_BYTES or buf.huge_page_bytes() != 0:
        return
    import warnings

    try:
        warnings.warn(
            f"huge_pages=True: the kernel gave buffer {buf.name!r} no huge pages (they need "
            "Linux 6.1+, a tmpfs, and free memory); it works on ordinary pages",
            RuntimeWarning,
            stacklevel=3,
        )
    except BaseException:
        try:
            buf.unlink()
        finally:
            buf.close()
        raise


def _bool_arg(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _timeout(value: Any) -> float | None:
    """A flow-control timeout in seconds: None (wait until allowed) or a number >= 0."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"timeout must be None or a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float: no bound at all
        return None
    if not seconds >= 0.0:
        raise ValueError(f"timeout must be None or >= 0 seconds, got {value}")
    return None if math.isinf(seconds) else seconds


def _dir_arg(path: Any) -> str | None:
    if path is None:
        return None
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError("path must be a str or os.PathLike[str]")
    if "\x00" in path:
        raise ValueError(f"path must not contain NUL bytes, got {path!r}")
    return path


def _leaves(value: Any) -> list[Any]:
    """The elements of nested lists and tuples, in order."""
    if not isinstance(value, (list, tuple)):
        return [value]
    return [leaf for v in value for leaf in _leaves(v)]


def _exact_ints(field: str, value: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """``value`` (an int or nested lists/tuples of ints) as an array of integer ``dtype``, or
    ``None`` if it holds anything else. numpy infers float64 (inexact) or object for ints beyond
    int64 or mixing those with negatives, so convert them one by one."""
    leaves = _leaves(value)
    if len(leaves) != math.prod(shape) or not all(isinstance(v, (int, np.integer)) for v in leaves):
        return None
    info = np.iinfo(dtype)
    if not all(info.min <= int(v) <= info.max for v in leaves):
        raise ValueError(f"field {field!r}: values out of range for {dtype}")
    return np.array([int(v) for v in leaves], dtype=dtype).reshape(shape)


_PHYSICAL_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _rows(batch: dict[str, Any]) -> int | None:
    """The leading dimension of a batch's first value, if it is a numpy array or a list (the
    fast path's guess; it checks every value itself)."""
    for value in batch.values():
        if type(value) is np.ndarray:
            return value.shape[0] if value.ndim else None
        return len(value) if type(value) is list else None
    return None


def _priorities(value: Any, rows: int | None) -> np.ndarray | None:
    """Raw priorities as a float64 array: one value for all rows, or one per row (``rows`` of
    them; ``None``: a single ``add``). Refuses non-numbers (TypeError), and NaN, infinite or
    negative values and wrong lengths (ValueError)."""
    if value is None:
        return None
    try:
        array = np.asarray(value)
        if array.dtype.kind == "O":  # Python ints beyond int64, mixed numbers: as floats
            array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"priority must be a number or an array of numbers ({e})") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"priority must be a number or an array of numbers, got dtype {array.dtype}")
    array = np.asarray(array, dtype=np.float64)
    if array.ndim > 1 or (array.ndim == 1 and (rows is None or array.shape[0] != rows)):
        want = "a number" if rows is None else f"a number or {rows} values"
        raise ValueError(f"priority must be {want}, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("priorities must be finite and >= 0")
    return np.ascontiguousarray(array.reshape(-1))


def _keys(keys: Any) -> np.ndarray:
    """Record keys as a uint64 array: integers only (ValueError for other numbers, TypeError
    for non-numbers), one-dimensional, none negative."""
    try:
        array = np.asarray(keys)
    except (TypeError, ValueError) as e:
        raise TypeError(f"keys must be an array of integers ({e})") from None
    if array.size == 0 and array.dtype.kind in "fO":  # np.asarray([]) is float64
        return np.empty(0, np.uint64)
    if array.dtype.kind not in "iu":
        if array.dtype.kind in "fcb":
            raise ValueError(f"keys must be an integer array (as sample returns them), got {array.dtype}")
        raise TypeError(f"keys must be an integer array, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"keys must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise ValueError("keys must be >= 0")
    return np.ascontiguousarray(array, dtype=np.uint64)


def _to_column(fields: FieldTypes, field: str, value: Any, leading: tuple[int, ...]) -> np.ndarray:
    """``value`` as a C-contiguous array of ``field``'s dtype and shape ``leading + shape``
(``leading`` non-empty: any number of rows)."""
    shape, dtype = fields[field]
    try:
        array = np.asarray(value)
    except OverflowError:
        raise ValueError(f"field {field!r}: values out of range for {dtype}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"field {field!r}: cannot convert to an array: {e}") from None
    # Python ints (not numpy arrays) go into any integer field whose range holds them.
    python_ints = not isinstance(value, (np.ndarray, np.generic)) and dtype.kind in "iu"
    if python_ints and array.dtype.kind in "fO":
        exact = _exact_ints(field, value, array.shape, dtype)
        if exact is not None:  # else floats or other objects among them: refused below
            array = exact
    value_checked = python_ints and array.dtype.kind in "iu"  # range-checked below
    if not value_checked and not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise TypeError(
            f"field {field!r}: cannot store {array.dtype} values in a {dtype} field "
            "(numpy 'same_kind' casting refuses it)"
        )
    if leading and array.ndim == 0:
        raise ValueError(
            f"field {field!r}: extend takes rows (a leading dimension), got a single value "
            "(use add for one row, or wrap it in a list)"
        )
    if (array.shape[1:] if leading else array.shape) != shape:
        dims = (["N"] if leading else []) + [str(d) for d in shape]
        want = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
        raise ValueError(f"field {field!r}: expected shape {want}, got {array.shape}")
    if array.dtype.kind in "iu" and dtype.kind in "iu" and not np.can_cast(array.dtype, dtype) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"field {field!r}: values out of range for {dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


def _beta_arg(sampler: Sampler, beta: Any) -> float:
    """``beta`` of a sample call, checked (``None``: the default)."""
    if beta is None:
        return _DEFAULT_BETA
    if not isinstance(sampler, Prioritized):
        raise TypeError(f"beta is for prioritized sampling; this buffer's sampler is {sampler}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be between 0 and 1, got {beta}")
    return float(beta)


def _reattach(name: str, path: str | None) -> "ReplayBuffer":
    return ReplayBuffer.attach(name, path=path)


OutLayout = dict[str, "tuple[tuple[int, ...], np.dtype]"]


def _out_arrays(layout: OutLayout, out: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Fresh arrays of ``layout`` (``{key: (shape, dtype)}``, in output order), or ``out``
    checked against it: exactly its keys, dtypes and shapes, C-contiguous and writable."""
    if out is None:
        return {key: np.empty(shape, dtype) for key, (shape, dtype) in layout.items()}
    if not isinstance(out, Mapping):
        raise TypeError(f"out must be a mapping {{key: array}}, got {type(out).__name__}")
    if set(out) != set(layout):
        raise ValueError(f"out must have exactly the keys {list(layout)}, got {list(out)}")
    arrays = {}
    for key, (shape, dtype) in layout.items():
        a = out[key]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"out[{key!r}] must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(f"out[{key!r}] must have dtype {dtype} and shape {shape}, got {a.dtype} {a.shape}")
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"out[{key!r}] must be C-contiguous and writable")
        arrays[key] = a
    return arrays


class _Handle:
    """What a buffer's handle does as a context manager: the creating process removes the
    segment on exit (a forked child does not), every process closes its handle."""

    __slots__ = ()

    @property
    def is_owner(self) -> bool:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def unlink(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.is_owner and not self.closed:
                try:
                    self.unlink()
                except FileNotFoundError:
                    pass
        finally:
            self.close()


class ReplayBuffer(_Handle):
    """A ring of ``capacity`` fixed-size records in one shared-memory segment.

    Any number of processes can :meth:`add`/:meth:`extend` and :meth:`sample` concurrently:
    each slot is a seqlock, so writers never wait for readers and readers never see a torn
    record. Create one with :meth:`create`, open it from other processes with :meth:`attach`
    (or pass it to a child process: it pickles by name).
    """

    __slots__ = ("_raw", "_fields", "_names", "_dir", "_owner", "_sampler", "_limiter", "__weakref__")

    def __init__(self, raw: _core.RawBuffer, path: str | None, owner: bool) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self._raw = raw
        self._dir = path
        # The creating process owns the buffer; a child that inherits the handle through fork
        # does not (its ``with`` exit must not remove the buffer under everyone else).
        self._owner = os.getpid() if owner else None
        self._fields: FieldTypes = {
            name: (tuple(shape), np.dtype(code)) for name, code, shape in raw.fields
        }
        self._names = frozenset(self._fields)
        self._sampler: Sampler = sampler_of(raw.sampler)
        self._limiter: Limiter | None = limiter_of(raw.limiter)

    # ---- construction ----

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        capacity: int,
        fields: Mapping[str, FieldSpec],
        path: PathLike | None = None,
        sampler: Sampler | None = None,
        limiter: Limiter | None = None,
        seed: int | None = None,
        cleanup_on_sigterm: bool = False,
        huge_pages: bool = False,
    ) -> "ReplayBuffer":
        """Creates a new buffer of ``capacity`` slots.

        Args:
            name: unique on this machine (letters, digits, ``._-``); ``None`` picks one.
            capacity: number of slots (records) in the ring.
            fields: ``{name: (shape, dtype)}``; shape ``()`` for scalars, dtype any numpy
                bool/int/uint/float dtype or its name. A field may be given as a gymnasium
                space instead: ``Box``, ``MultiBinary``, ``MultiDiscrete`` (its shape and
                dtype; bounds are not checked) or ``Discrete`` (a scalar of its dtype, int64);
                a gymnasium ``Dict`` of those can be the whole mapping.
            path: directory for the segment file (default ``/dev/shm``).
            sampler: :class:`Uniform` (the default), :class:`Prioritized` or :class:`Queue`;
                fixed for the buffer's life, and what every process that attaches gets.
            limiter: ``None`` (the default: nothing ever waits), :class:`MinSize` or
                :class:`SampleToInsertRatio`: when samples and inserts may proceed (calls that
                may not yet wait; see ``timeout=``). A :class:`Queue` has its own flow control
                and takes none.
            seed: seeds this handle's random draws (see :meth:`seed`); ``None`` (the default):
                unseeded, different in every handle and process.
            cleanup_on_sigterm: if this process gets SIGTERM while this handle is open,
                unlink the buffer (as leaving the creator's ``with`` block does), then go on as
                before: a Python SIGTERM handler installed earlier runs, else the process dies
                of SIGTERM. Installs a SIGTERM handler the first time, which only the main
                thread can do (``ValueError`` elsewhere). A process that ignores SIGTERM keeps
                ignoring it; a forked child never unlinks its parent's buffers.
            huge_pages: back the segment with 2 MiB pages, so that sampling a large buffer
                takes fewer TLB misses in every process (``sample(256)`` at 1M control slots:
                29.8 µs on 4 KiB pages, 25.4 µs on 2 MiB pages, on the development VM; README,
                "Big buffers: huge pages"). It makes creating slower (the kernel moves every
                page: about 3 s per GiB there), so it is for buffers of hundreds of MB and more.
                Needs Linux 6.1+ and a tmpfs such as ``/dev/shm``; no root. If the kernel gives
                no huge page, a ``RuntimeWarning`` says so and the buffer works on ordinary
                pages. See :meth:`huge_page_bytes`.

        Raises:
            FileExistsError: the name is taken.
            InsufficientSpaceError: the filesystem cannot hold the segment (nothing is created).
            ValueError, TypeError: invalid name, capacity, fields, sampler or limiter (a
                limiter's ``min_size`` above the capacity, a limiter with a :class:`Queue`).
        """
        capacity = _int_arg("capacity", capacity, 1, _core.MAX_CAPACITY)
        parsed = _parse_fields(fields)
        seed = _seed_arg(seed)
        cleanup = _bool_arg("cleanup_on_sigterm", cleanup_on_sigterm)
        huge = _bool_arg("huge_pages", huge_pages)
        sampling = sampler_args(sampler)
        limiting = limiter_args(limiter)
        if limiting is not None:
            if isinstance(sampler, Queue):
                raise ValueError("a Queue() has its own flow control: it takes no limiter")
            if limiting[2] > capacity:
                raise ValueError(
                    f"{limiting[0]}: min_size {limiting[2]} is larger than the capacity {capacity}"
                )
        directory = _dir_arg(path)
        if name is None:
            name = _core.unique_name()
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        buffer_name = name

        def make() -> "ReplayBuffer":
            raw = _core.RawBuffer.create(buffer_name, directory, capacity, parsed, sampling, limiting, seed, huge)
            return cls(raw, directory, owner=True)

        buf = _sigterm.created(make, cleanup)
        if huge:
            _warn_without_huge_pages(buf)
        return buf

    @classmethod
    def attach(cls, name: str, *, path: PathLike | None = None, seed: int | None = None) -> "ReplayBuffer":
        """Opens an existing buffer, from any process of the same user.

        ``seed`` seeds this handle's random draws (see :meth:`seed`; ``None``: unseeded).

        Raises:
            FileNotFoundError: no buffer of that name.
            CorruptSegmentError: the file is not a valid segment.
            PermissionError: the segment belongs to another user.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        seed = _seed_arg(seed)
        directory = _dir_arg(path)
        return cls(_core.RawBuffer.attach(name, directory, seed), directory, owner=False)

    @classmethod
    def inspect(cls, name: str, *, path: PathLike | None = None) -> "ReplayBuffer":
        """Opens an existing buffer just to look at it (``fields``, ``stats()``, ``processes()``).

        Unlike :meth:`attach`, the handle does not count as attached and does not prefault the
        mapping, so looking is cheap and changes nothing. It still can write and sample.
        Raises as :meth:`attach`.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        directory = _dir_arg(path)
        return cls(_core.RawBuffer.inspect(name, directory), directory, owner=False)

    # ---- properties ----

    @property
    def name(self) -> str:
        """The buffer's name (what :meth:`attach` takes)."""
        return self._raw.name

    @property
    def path(self) -> str:
        """The segment file."""
        return str(self._raw.path)

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return self._raw.capacity

    @property
    def fields(self) -> FieldTypes:
        """``{name: (shape, dtype)}`` in record order."""
        return dict(self._fields)

    @property
    def record_bytes(self) -> int:
        """Bytes one record takes in shared memory (each field padded to 8 bytes)."""
        return self._raw.record_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole segment."""
        return self._raw.segment_bytes

    def huge_page_bytes(self) -> int | None:
        """Bytes of this process's mapping of the segment that are on huge (2 MiB) pages (see
        ``huge_pages=`` of :meth:`create`), as ``/proc/self/smaps`` reports; ``None`` where it
        cannot be read. The creator and every attached handle map the whole segment; an
        :meth:`inspect` handle, or one inherited by a forked child, counts only the pages it has
        touched since."""
        return self._raw.huge_page_bytes()

    @property
    def sampler(self) -> Sampler:
        """How this buffer samples: :class:`Uniform`, :class:`Prioritized` or :class:`Queue`
        (fixed at creation)."""
        return self._sampler

    @property
    def limiter(self) -> Limiter | None:
        """The rate limiter (fixed at creation): ``None`` without one, and for a :class:`Queue`
        (whose flow control is its own)."""
        return self._limiter

    @property
    def priority_range(self) -> tuple[float, float] | None:
        """``(largest v, resolution)`` of a prioritized buffer's fixed point: ``v = (p + eps) **
        alpha`` must be at most the first; values are held to the nearest multiple of the second
        (a positive ``v`` below it is held as the resolution itself, so it stays drawable).
        ``None`` for a uniform buffer."""
        return self._raw.priority_range()

    @property
    def is_owner(self) -> bool:
        """True for the handle that created the buffer (it unlinks it on ``with`` exit)."""
        return self._owner == os.getpid()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def __len__(self) -> int:
        """Number of slots holding a committed record; in a :class:`Queue`, the rows inserted
        (or being inserted) and not yet delivered."""
        return len(self._raw)

    def __repr__(self) -> str:
        if self.closed:
            return "<ReplayBuffer (closed)>"
        return f"<ReplayBuffer {self.name!r} {len(self)}/{self.capacity} slots, {self.record_bytes} B/record>"

    # ---- writing ----

    def _column(self, field: str, value: Any, leading: tuple[int, ...]) -> np.ndarray:
        return _to_column(self._fields, field, value, leading)

    def _columns(self, values: Mapping[str, Any], leading: tuple[int, ...]) -> list[np.ndarray]:
        keys = set(values)
        if keys != self._names:
            missing = sorted(self._names - keys)
            extra = sorted(map(str, keys - self._names))
            parts = [f"missing field(s) {missing}"] if missing else []
            parts += [f"unknown field(s) {extra}"] if extra else []
            raise ValueError("; ".join(parts) + f" (the buffer's fields are {list(self._fields)})")
        columns = [self._column(name, values[name], leading) for name in self._fields]
        if leading:
            rows = {name: c.shape[0] for name, c in zip(self._fields, columns)}
            if len(set(rows.values())) > 1:
                raise ValueError(f"fields have different numbers of rows: {rows}")
        return columns

    def add(self, /, *, priority: float | None = None, timeout: float | None = None, **values: Any) -> None:
        """Inserts one transition: one keyword argument per field.

        ``priority``: the raw priority ``p >= 0`` of a :class:`Prioritized` buffer; omitted,
        the largest of 1.0 and every raw priority ever set in the buffer (new transitions are
        drawn at least once soon, as in the PER paper). ``TypeError`` on a uniform buffer.

        ``timeout``: with a limiter or a :class:`Queue`, how long to wait for the insert to be
        allowed: ``None`` (the default) waits until it is (Ctrl-C interrupts), ``0`` never
        waits, a number of seconds raises ``TimeoutError`` when it runs out. Without flow
        control nothing waits.

        Raises ``ValueError``/``TypeError`` naming the field (and writes nothing) on a missing
        or unknown field, a wrong shape, or a dtype numpy's ``same_kind`` casting refuses, and
        ``ValueError`` on a negative, NaN or infinite priority. ``TimeoutError`` and
        :class:`ShutdownError` (the buffer was shut down and the insert would have to wait)
        insert nothing.
        """
        if priority is not None:
            self._require_prioritized("priority=")
        priorities = _priorities(priority, None)
        seconds = _timeout(timeout)
        if not self._raw.put(values, None, priorities, seconds):
            self._raw.extend(
                [c.reshape((1,) + c.shape) for c in self._columns(values, ())], priorities, seconds
            )

    def extend(self, batch: Mapping[str, Any], *, priority: Any = None, timeout: float | None = None) -> None:
        """Inserts N transitions given as ``{field: array of N rows}`` (wrapping around the ring).

        ``priority``: raw priorities of a :class:`Prioritized` buffer, one number for all rows or
        an array of N; omitted, as in :meth:`add`. ``timeout``: as in :meth:`add`; with flow
        control the N rows are admitted together, so a timeout inserts none of them.

        Validates every field and priority before writing anything; errors as for :meth:`add`.
        An extend that could never be allowed (more rows than a queue's capacity, or rows whose
        ``N * samples_per_insert`` exceeds the limiter's window) raises ``ValueError``.
        """
        if priority is not None:
            self._require_prioritized("priority=")
        seconds = _timeout(timeout)
        if type(batch) is dict:
            rows = _rows(batch)
            if rows is not None:
                priorities = _priorities(priority, rows)
                if self._raw.put(batch, rows, priorities, seconds):
                    return
        if not isinstance(batch, Mapping):
            raise TypeError(f"extend takes a mapping {{field: array}}, got {type(batch).__name__}")
        columns = self._columns(batch, (-1,))
        self._raw.extend(columns, _priorities(priority, columns[0].shape[0]), seconds)

    # ---- flow control ----

    def can_sample(self, batch_size: int) -> bool:
        """Whether ``sample(batch_size)`` would proceed now without waiting (without flow
        control: whether the buffer holds a record). Another process may change the answer
        at once."""
        return self._raw.can_sample(_int_arg("batch_size", batch_size, 0))

    def can_insert(self, rows: int) -> bool:
        """Whether an insert of ``rows`` rows would proceed now without waiting (always True
        without flow control)."""
        return self._raw.can_insert(_int_arg("rows", rows, 0))

    def shutdown(self) -> None:
        """Shuts the buffer down, for every process: every call waiting for flow control
        raises :class:`ShutdownError` (within milliseconds), and so does every later call that
        cannot proceed at once, whatever its timeout. Calls that need not wait still succeed (a
        consumer can drain a queue). Permanent for the buffer's life."""
        self._raw.shutdown()

    # ---- reading ----

    @overload
    def sample(
        self,
        batch_size: int,
        *,
        beta: float | None = ...,
        return_info: Literal[False] = ...,
        out: Mapping[str, np.ndarray] | None = ...,
        timeout: float | None = ...,
    ) -> dict[str, np.ndarray]: ...
    @overload
    def sample(
        self,
        batch_size: int,
        *,
        beta: float | None = ...,
        return_info: Literal[True],
        out: Mapping[str, np.ndarray] | None = ...,
        timeout: float | None = ...,
    ) -> tuple[dict[str, np.ndarray], SampleInfo]: ...
    @overload
    def sample(
        self,
        batch_size: int,
        *,
        beta: float | None = ...,
        return_info: bool,
        out: Mapping[str, np.ndarray] | None = ...,
        timeout: float | None = ...,
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], SampleInfo]: ...
    def sample(
        self,
        batch_size: int,
        *,
        beta: float | None = None,
        return_info: bool = False,
        out: Mapping[str, np.ndarray] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], SampleInfo]:
        """Draws ``batch_size`` rows, with replacement, from the committed slots: uniformly, or
        by priority in a :class:`Prioritized` buffer.

        Returns ``{field: array (batch_size, *shape)}`` of fresh arrays, and with
        ``return_info=True`` also ``{"index": int64 slots, "key": uint64 insert tickets}``
        (a key identifies the record: it changes when the slot is overwritten).

        In a prioritized buffer, row ``i`` is drawn with probability ``P(i) = v_i / sum(v)``,
        and the info also holds ``"probability"`` (float64 ``P(i)``), ``"weight"`` (float32
        importance weights ``(v_i / v_min) ** -beta``, ``v_min`` the smallest positive ``v`` in
        the buffer, so every weight is at most 1) and ``"priority"`` (float64 raw ``p``).
        ``beta`` (in ``[0, 1]``, default 0.4) is for prioritized buffers only (``TypeError``
        on a uniform one). Records of priority 0 are never drawn while any has more; if all
        have 0, rows are drawn uniformly with probability ``1/len`` and weight 1.

        ``out`` reuses arrays instead of allocating new ones on every call (large fresh arrays
        cost page faults): one C-contiguous, writable array per field, of the field's dtype and
        shape ``(batch_size, *shape)``. The returned dict then holds those same arrays.

        A :class:`Queue` returns its next ``batch_size`` rows in insert order instead (each
        row to exactly one call), waiting until they are there.

        ``timeout``: with a limiter or a :class:`Queue`, how long to wait until the sample is
        allowed: ``None`` (the default) waits (Ctrl-C interrupts), ``0`` never waits, a number
        of seconds raises ``TimeoutError`` when it runs out; nothing is taken then.

        Raises:
            EmptyBufferError: nothing has been committed yet (only without flow control: with
                a limiter or a queue, the call waits instead).
            TimeoutError: flow control did not allow the sample in time.
            ShutdownError: the buffer was shut down and the sample would have to wait.
            ValueError: a batch that could never be allowed (wider than the limiter's window,
                or more rows than a queue's capacity).
        """
        n = _int_arg("batch_size", batch_size, 1)
        seconds = _timeout(timeout)
        if not isinstance(return_info, (bool, np.bool_)):
            raise TypeError(f"return_info must be a bool, got {type(return_info).__name__}")
        prioritized = isinstance(self._sampler, Prioritized)
        b = _beta_arg(self._sampler, beta)
        if n * self.record_bytes > _PHYSICAL_MEMORY:
            raise MemoryError(
                f"a batch of {n:,} rows of {self.record_bytes:,} bytes needs more memory than this "
                "machine has"
            )
        arrays = _out_arrays({name: ((n,) + shape, dtype) for name, (shape, dtype) in self._fields.items()}, out)
        if prioritized:
            index, key, probability, weight, priority = self._raw.sample_prioritized_into(
                list(arrays.values()), n, b, seconds
            )
            if return_info:
                info: SampleInfo = {
                    "index": index.view(np.int64),
                    "key": key,
                    "probability": probability,
                    "weight": weight,
                    "priority": priority,
                }
                return arrays, info
            return arrays
        index, key = self._raw.sample_into(list(arrays.values()), n, seconds)
        if return_info:
            info = {"index": index.view(np.int64), "key": key}
            return arrays, info
        return arrays

    def batches(
        self,
        batch_size: int,
        *,
        prefetch: int = 2,
        copy: bool = False,
        beta: float | None = None,
        timeout: float | None = None,
    ) -> "Batches":
        """Batches of :meth:`sample` (``return_info=True``) drawn ahead by a background thread,
        so that sampling overlaps the learner's step::

            for batch, info in buf.batches(256, prefetch=2, beta=0.4):
                loss = learner.update(batch, info["weight"])
                buf.update_priorities(info["key"], new_priorities)

        The thread samples (GIL released) into a ring of ``prefetch + 1`` reusable batches: a
        yielded batch stays valid until the following ``next()``; ``copy=True`` hands out fresh
        arrays instead. Arrays are C-contiguous, so ``torch.from_numpy(a)`` and
        ``jax.numpy.asarray(a)`` take them without a copy (moving them to a GPU copies anyway;
        with ``copy=False`` do that before the next ``next()``). Waits for flow control happen
        in the thread: ``timeout`` bounds each batch's (``None``: wait). See :class:`Batches`
        for how the iteration ends (leaving the loop, ``close()``, ``shutdown()``, Ctrl-C).
        """
        n = _int_arg("batch_size", batch_size, 1)
        prefetch = _int_arg("prefetch", prefetch, 1, 64)
        b = _beta_arg(self._sampler, beta)
        prioritized = isinstance(self._sampler, Prioritized)
        seconds = _timeout(timeout)
        if not isinstance(copy, (bool, np.bool_)):
            raise TypeError(f"copy must be a bool, got {type(copy).__name__}")

        def sample(out: Mapping[str, np.ndarray] | None, wait: float | None) -> tuple[dict[str, np.ndarray], SampleInfo]:
            if out is None:  # the first batch of a slot: checked and allocated as usual
                return self.sample(n, beta=beta, return_info=True, timeout=wait)
            # Refills: straight to the core, so the thread holds the GIL as briefly as it can.
            arrays = list(out.values())
            info: SampleInfo
            if prioritized:
                index, key, probability, weight, priority = self._raw.sample_prioritized_into(arrays, n, b, wait)
                info = {"index": index.view(np.int64), "key": key, "probability": probability,
                        "weight": weight, "priority": priority}
            else:
                index, key = self._raw.sample_into(arrays, n, wait)
                info = {"index": index.view(np.int64), "key": key}
            return dict(out), info

        return Batches(sample, prefetch, bool(copy), seconds)

    def seed(self, seed: int) -> None:
        """Seeds this handle's random draws (``sample``, ``batches``), an int in ``[0, 2**64)``.

        From here on the handle draws one fixed sequence: two handles seeded alike, in the same
        process or not, draw the same rows from a buffer in the same state, and a rerun of a
        seeded program reproduces its draws. The seed belongs to this handle only (each process
        seeds its own; a pickled handle arrives unseeded). Unseeded handles draw differently in
        every handle and process.

        * A forked child using a seeded handle it inherited repeats its parent's draws unless
          it calls ``seed()`` with its own value.
        * Each call takes the next state atomically: threads sharing a seeded handle draw
          distinct rows, but which thread gets which is not reproducible.
        * A slot found mid-write is redrawn, which uses up draws: draws reproduce on a buffer
          that nobody writes while they are made.
        """
        n = _seed_arg(seed, optional=False)
        assert n is not None
        self._raw.reseed(n)

    def update_priorities(self, keys: Any, priorities: Any) -> int:
        """Sets the raw priorities of the records ``keys`` (``info["key"]`` of :meth:`sample`),
        from any process, with no lock.

        A key whose slot has been overwritten since it was sampled is ignored and counted in
        ``stats()["stale_updates"]``: an update never lands on a newer record. Of duplicate keys
        the last value wins. Returns how many distinct keys were applied.

        Raises (and applies nothing): ``ValueError`` for NaN, infinite or negative priorities,
        keys that are not integers, or lengths that differ; ``TypeError`` for non-numbers, and
        on a uniform buffer.
        """
        self._require_prioritized("update_priorities")
        if type(keys) is np.ndarray and type(priorities) is np.ndarray:
            # Integer keys and float priorities, as sample() and learners make them: the core
            # checks them itself (lengths, values) without numpy's per-call overhead.
            applied = self._raw.update_priorities(keys, priorities)
            if applied is not None:
                return applied
        k = _keys(keys)
        if np.ndim(priorities) == 0:
            raise ValueError(f"give one priority per key ({k.shape[0]} keys), got a single number")
        p = _priorities(priorities, k.shape[0])
        applied = self._raw.update_priorities(k, p)
        assert applied is not None
        return applied

    def priorities(self, keys: Any) -> np.ndarray:
        """The raw priorities (float64) of the records ``keys``; NaN where the slot has been
        overwritten since the key was sampled."""
        self._require_prioritized("priorities")
        return self._raw.priorities(_keys(keys))

    def _require_prioritized(self, what: str) -> None:
        if not isinstance(self._sampler, Prioritized):
            raise TypeError(f"{what} needs a prioritized buffer; this buffer's sampler is {self._sampler}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """A consistent copy of slot ``index`` (negative counts from ``capacity``).

        Scalar fields come back as numpy scalars. Raises ``IndexError`` for an index out of
        range or a slot that holds no record (never written, or its writer died while writing
        it), and :class:`ContendedError` (a ``TimeoutError``) if a writer that may still be alive
        kept the slot busy for 10 s.
        """
        i = _int_arg("index", index, None)
        if i < 0:
            i += self.capacity
        if not 0 <= i < self.capacity:
            raise IndexError(f"slot {index} is out of range for capacity {self.capacity}")
        out = {name: np.empty(shape, dtype) for name, (shape, dtype) in self._fields.items()}
        if self._raw.read(i, list(out.values())) is None:
            raise IndexError(
                f"slot {index} holds no record (never written, or its writer died while writing it)"
            )
        return {name: a[()] if a.ndim == 0 else a for name, a in out.items()}

    def stats(self) -> Stats:
        """Counters over all processes: capacity, size, inserts, samples (rows), retries,
        recovered, superseded, lost, stale_updates, attached (live handles), deletes (rows
        overwritten, or delivered from a queue), insert_wait_s and sample_wait_s (seconds
        spent waiting for flow control, timeouts included), and limiter (``None``, or a dict of
        kind, samples_per_insert, min_size, min_diff, max_diff: a queue's are Reverb's
        ``Queue``: 1.0, 1, 0, capacity). A prioritized buffer adds priority_total (the sum of
        ``v`` over its records, exact when no call is in flight) and max_priority (the largest
        raw priority ever set, at least 1.0)."""
        raw = self._raw.stats()
        for side in ("insert", "sample"):
            raw[f"{side}_wait_s"] = raw.pop(f"{side}_wait_ns") / 1e9
        raw["limiter"] = self._limiter_info()
        return {key: raw[key] for key in _STATS_KEYS if key in raw}  # type: ignore[return-value]

    def _limiter_info(self) -> LimiterInfo | None:
        if isinstance(self._sampler, Queue):
            return {
                "kind": "Queue",
                "samples_per_insert": 1.0,
                "min_size": 1,
                "min_diff": 0.0,
                "max_diff": float(self.capacity),
            }
        args = limiter_args(self._limiter)
        if args is None:
            return None
        kind, spi, min_size, min_diff, max_diff = args
        return {
            "kind": kind,
            "samples_per_insert": spi,
            "min_size": min_size,
            "min_diff": min_diff,
            "max_diff": max_diff,
        }

    def processes(self) -> list[int]:
        """Pids of the live processes holding a handle to this buffer."""
        return self._raw.processes()

    # ---- lifecycle ----

    def close(self) -> None:
        """Releases this handle (idempotent). Other handles and processes are unaffected."""
        self._raw.close()

    def unlink(self) -> None:
        """Removes the segment's name; attached handles keep working until they close."""
        self._raw.unlink()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles by name: unpickling attaches (it never creates or owns)."""
        return (_reattach, (self.name, self._dir))
