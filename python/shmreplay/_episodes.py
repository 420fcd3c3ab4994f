"""Episode streams: each frame stored once; stacks, n-step returns and sequences built when sampled."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Literal, Mapping, Sequence, overload

import numpy as np

from . import _core, _sigterm
from ._buffer import (
    _PHYSICAL_MEMORY,
    FieldTypes,
    OutLayout,
    ReplayBuffer,
    _Handle,
    _beta_arg,
    _bool_arg,
    _dir_arg,
    _int_arg,
    _out_arrays,
    _parse_fields,
    _priorities,
    _seed_arg,
    _timeout,
    _to_column,
    _warn_without_huge_pages,
)
from ._batches import Batches
from ._limiters import Limiter, limiter_args
from ._samplers import Prioritized, Queue, Sampler, sampler_args
from ._types import FieldSpec, PathLike, SampleInfo, Stats

# Keys of sample outputs and keywords of the writer: no field may take these names.
_RESERVED = ("discount", "terminated", "truncated", "is_first", "mask", "priority", "timeout", "envs")


def _names_arg(what: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a field name or a non-empty sequence of field names, got {value!r}")


def _flags_arg(name: str, value: Any, num_envs: int | None) -> list[bool]:
    array = np.asarray(value)
    if array.dtype.kind not in "biu" or (array.dtype.kind != "b" and not np.isin(array, (0, 1)).all()):
        raise TypeError(f"{name} must be bools, got {array.dtype} values")
    expected: tuple[int, ...] = () if num_envs is None else (num_envs,)
    if array.shape != expected:
        raise ValueError(f"{name}: expected shape {expected} (one per env), got {array.shape}")
    return [bool(v) for v in array.reshape(-1)]


def _reattach(name: str, path: str | None) -> "EpisodeBuffer":
    return EpisodeBuffer.attach(name, path=path)


class EpisodeBuffer(_Handle):
    """Episodes of many writers in one shared-memory ring, each frame stored once.

    Writers (:meth:`writer`, one per vector env, in any number of processes) append steps;
    samplers draw steps with frame stacks and n-step returns (:meth:`sample`) or sequences
    (:meth:`sample_sequences`), rebuilt from the stored frames. Create one with :meth:`create`,
    open it elsewhere with :meth:`attach` (or pass it to a child process: it pickles by name).

    A slot holds one frame: an episode's first observation, or the observation after a step
    together with that step's other fields and flags. Eviction is oldest first over all
    writers; a step whose window or stack would need an evicted frame is never sampled.
    """

    __slots__ = (
        "_raw", "_ring", "_fields", "_observations", "_reward", "_frame_stack", "_padding", "_n_step", "_gamma",
        "__weakref__",
    )

    def __init__(self, raw: _core.RawEpisodes, path: str | None, owner: bool) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self._raw = raw
        self._ring = ReplayBuffer(raw.ring(), path, owner)
        self._fields: FieldTypes = {name: (tuple(shape), np.dtype(code)) for name, code, shape in raw.fields}
        observations, reward, frame_stack, padding, n_step, gamma = raw.episodes
        self._observations: tuple[str, ...] = tuple(observations)
        self._reward: str | None = reward
        self._frame_stack: int = frame_stack
        self._padding: str = padding
        self._n_step: int = n_step
        self._gamma: float = gamma

    # ---- construction ----

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        capacity: int,
        fields: Mapping[str, FieldSpec],
        observation: str | Sequence[str] = "obs",
        reward: str | None = "reward",
        frame_stack: int = 1,
        stack_padding: Literal["first", "zeros"] = "first",
        n_step: int = 1,
        gamma: float = 0.99,
        sampler: Sampler | None = None,
        limiter: Limiter | None = None,
        path: PathLike | None = None,
        seed: int | None = None,
        cleanup_on_sigterm: bool = False,
        huge_pages: bool = False,
    ) -> "EpisodeBuffer":
        """Creates an episode buffer of ``capacity`` frames (steps and episode starts together).

        Args:
            name: unique on this machine (letters, digits, ``._-``); ``None`` picks one.
            capacity: slots; each holds one frame (an episode's first observation, or the
                observation after a step with that step's other fields).
            fields: ``{name: (shape, dtype) or gymnasium space}`` of one step, as
                :meth:`ReplayBuffer.create`.
            observation: the observation field(s): stored once per frame, stacked when sampled.
            reward: the scalar float32/float64 field summed over ``n_step`` steps by
                :meth:`sample` (``None``: no reward field).
            frame_stack: frames per stacked observation (1: no stacking).
            stack_padding: frames before an episode's start: ``"first"`` repeats its first
                frame (gymnasium's ``FrameStackObservation``), ``"zeros"`` pads with zeros.
            n_step: steps in a sampled return; ``gamma``: its discount, in [0, 1].
            sampler: :class:`Uniform` (the default) or :class:`Prioritized` (a step is drawable
                once its n-step window is complete); a :class:`Queue` is refused.
            limiter: as :meth:`ReplayBuffer.create`: every frame written counts as an insert,
                every item sampled as a sample.
            path: directory of the segment file (default ``/dev/shm``).
            seed: seeds this handle's random draws (see :meth:`seed`; ``None``: unseeded).
            cleanup_on_sigterm: unlink the buffer if this process gets SIGTERM, as
                :meth:`ReplayBuffer.create`.
            huge_pages: back the segment with 2 MiB pages, as :meth:`ReplayBuffer.create`.

        Raises:
            ValueError, TypeError: invalid arguments (an unknown observation or reward field, a
                field named like a sample output: ``discount``, ``terminated``, ``truncated``,
                ``is_first``, ``mask``, ``next_<observation>``, ``priority``, ``timeout``,
                ``envs``).
            FileExistsError, InsufficientSpaceError: as :meth:`ReplayBuffer.create`.
        """
        capacity = _int_arg("capacity", capacity, 1, _core.MAX_CAPACITY)
        parsed = _parse_fields(fields)
        seed = _seed_arg(seed)
        cleanup = _bool_arg("cleanup_on_sigterm", cleanup_on_sigterm)
        huge = _bool_arg("huge_pages", huge_pages)
        names = [f[0] for f in parsed]
        observations = _names_arg("observation", observation)
        if reward is not None and not isinstance(reward, str):
            raise TypeError(f"reward must be a field name or None, got {reward!r}")
        for what, wanted in [("observation", observations), ("reward", [] if reward is None else [reward])]:
            for n in wanted:
                if n not in names:
                    raise ValueError(f"{what} {n!r} is not one of the fields {names}")
        if reward is not None and reward in observations:
            raise ValueError(f"the reward field {reward!r} cannot be an observation too")
        for n in names:
            if n in _RESERVED or (n.startswith("next_") and n[5:] in observations):
                raise ValueError(
                    f"field name {n!r} is taken by the samples of an episode buffer "
                    f"(reserved: {list(_RESERVED)} and next_<observation>)"
                )
        frame_stack = _int_arg("frame_stack", frame_stack, 1, _core.MAX_EPISODE_WINDOW)
        n_step = _int_arg("n_step", n_step, 1, _core.MAX_EPISODE_WINDOW)
        if stack_padding not in ("first", "zeros"):
            raise ValueError(f'stack_padding must be "first" or "zeros", got {stack_padding!r}')
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(f"gamma must be a number, got {type(gamma).__name__}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be between 0 and 1, got {gamma}")
        if isinstance(sampler, Queue):
            raise ValueError(
                "an EpisodeBuffer samples windows of steps, not rows in insert order: it takes "
                "Uniform() or Prioritized(), not Queue()"
            )
        sampling = sampler_args(sampler)
        limiting = limiter_args(limiter)
        if limiting is not None and limiting[2] > capacity:
            raise ValueError(f"{limiting[0]}: min_size {limiting[2]} is larger than the capacity {capacity}")
        directory = _dir_arg(path)
        if name is None:
            name = _core.unique_name()
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        buffer_name = name

        def make() -> "EpisodeBuffer":
            raw = _core.RawEpisodes.create(
                buffer_name, directory, capacity, parsed, observations, reward, frame_stack,
                stack_padding, n_step, float(gamma), sampling, limiting, seed, huge,
            )
            return cls(raw, directory, owner=True)

        buf = _sigterm.created(make, cleanup)
        if huge:
            _warn_without_huge_pages(buf)
        return buf

    @classmethod
    def attach(cls, name: str, *, path: PathLike | None = None, seed: int | None = None) -> "EpisodeBuffer":
        """Opens an existing episode buffer, from any process of the same user; ``seed`` as
        in :meth:`create`.

        Raises ``FileNotFoundError`` (no such buffer), ``ValueError`` (a :class:`ReplayBuffer`,
        not an episode buffer), :class:`CorruptSegmentError`, ``PermissionError``.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        seed = _seed_arg(seed)
        directory = _dir_arg(path)
        return cls(_core.RawEpisodes.attach(name, directory, seed), directory, owner=False)

    # ---- properties ----

    @property
    def name(self) -> str:
        return self._ring.name

    @property
    def path(self) -> str:
        """The segment file."""
        return self._ring.path

    @property
    def capacity(self) -> int:
        """Slots: frames held (steps and episode starts together)."""
        return self._ring.capacity

    @property
    def fields(self) -> FieldTypes:
        """``{name: (shape, dtype)}`` of one step."""
        return dict(self._fields)

    @property
    def observations(self) -> tuple[str, ...]:
        return self._observations

    @property
    def reward(self) -> str | None:
        return self._reward

    @property
    def frame_stack(self) -> int:
        return self._frame_stack

    @property
    def stack_padding(self) -> str:
        return self._padding

    @property
    def n_step(self) -> int:
        return self._n_step

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def sampler(self) -> Sampler:
        return self._ring.sampler

    @property
    def limiter(self) -> Limiter | None:
        return self._ring.limiter

    @property
    def nbytes(self) -> int:
        """Bytes of the segment (everything included)."""
        return self._ring.nbytes

    def huge_page_bytes(self) -> int | None:
        """As :meth:`ReplayBuffer.huge_page_bytes`."""
        return self._ring.huge_page_bytes()

    @property
    def bytes_per_step(self) -> float:
        """Segment bytes per slot (per frame held), everything included."""
        return float(self._raw.bytes_per_step)

    @property
    def is_owner(self) -> bool:
        return self._ring.is_owner

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def __len__(self) -> int:
        """Frames held."""
        return len(self._ring)

    def __repr__(self) -> str:
        return (
            f"<EpisodeBuffer {self.name!r} {len(self)}/{self.capacity} frames, frame_stack "
            f"{self._frame_stack}, n_step {self._n_step}>"
        )

    # ---- writing ----

    def writer(self, num_envs: int | None = None) -> "EpisodeWriter":
        """A writer of ``num_envs`` episode streams, one per env of a vector env (``None``: one
        stream, values without the env axis). Private to this process and not picklable; use
        one per vector env (several threads may share one: their calls take turns)."""
        n = 1 if num_envs is None else _int_arg("num_envs", num_envs, 1)
        return EpisodeWriter(self, self._raw.writer(n), num_envs)

    # ---- reading ----

    def _draw_info(self, drawn: Any, return_info: bool) -> SampleInfo | None:
        if not return_info:
            return None
        index, key, priority = drawn
        info: SampleInfo = {"index": index.view(np.int64), "key": key}
        if priority is not None:
            info["probability"], info["weight"], info["priority"] = priority
        return info

    def _check_call(self, layout: OutLayout, return_info: Any) -> None:
        if not isinstance(return_info, (bool, np.bool_)):
            raise TypeError(f"return_info must be a bool, got {type(return_info).__name__}")
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
        if total > _PHYSICAL_MEMORY:
            raise MemoryError(f"a batch of {total:,} bytes needs more memory than this machine has")

    def _stack_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ((self._frame_stack,) if self._frame_stack > 1 else ()) + shape

    def sample_layout(self, batch_size: int) -> OutLayout:
        """``{key: (shape, dtype)}`` of what :meth:`sample` of ``batch_size`` returns, in order."""
        n = batch_size
        layout: OutLayout = {}
        for name, (shape, dtype) in self._fields.items():
            layout[name] = ((n,) + (self._stack_shape(shape) if name in self._observations else shape), dtype)
        for name in self._observations:
            shape, dtype = self._fields[name]
            layout["next_" + name] = ((n,) + self._stack_shape(shape), dtype)
        layout["discount"] = ((n,), np.dtype(np.float32))
        layout["terminated"] = ((n,), np.dtype(np.bool_))
        layout["truncated"] = ((n,), np.dtype(np.bool_))
        return layout

    def sequence_layout(self, batch_size: int, length: int) -> OutLayout:
        """``{key: (shape, dtype)}`` of what :meth:`sample_sequences` returns, in order."""
        n = batch_size
        layout: OutLayout = {}
        for name, (shape, dtype) in self._fields.items():
            if name in self._observations:
                layout[name] = ((n, length + 1) + self._stack_shape(shape), dtype)
            else:
                layout[name] = ((n, length) + shape, dtype)
        for flag in ("terminated", "truncated", "is_first", "mask"):
            layout[flag] = ((n, length), np.dtype(np.bool_))
        return layout

    @overload
    def sample(
        self, batch_size: int, *, beta: float | None = ..., return_info: Literal[False] = ...,
        out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
    ) -> dict[str, np.ndarray]: ...
    @overload
    def sample(
        self, batch_size: int, *, beta: float | None = ..., return_info: Literal[True],
        out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
    ) -> tuple[dict[str, np.ndarray], SampleInfo]: ...
    @overload
    def sample(
        self, batch_size: int, *, beta: float | None = ..., return_info: bool,
        out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
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
        """Draws ``batch_size`` steps ``t`` whose n-step window is complete (uniformly, or by
        priority), with replacement.

        Returns fresh C-contiguous arrays:

        * each observation field: the stack ``o_{t-frame_stack+1} .. o_t``, shape
          ``(B, frame_stack, *shape)`` (``(B, *shape)`` when ``frame_stack == 1``), padded
          before the episode's start; ``next_<field>``: the stack ending at ``o_{t+k}``;
        * the reward field: ``sum_{j<k} gamma**j * r_{t+j}``, with ``k = min(n_step, steps from
          t to the episode's end)``; every other field at step ``t``;
        * ``"discount"`` (float32 ``gamma**k``), ``"terminated"``, ``"truncated"`` (bool: the
          flags of the window's last step). A learner's target is
          ``reward + discount * (1 - terminated) * Q(next_obs)``.

        ``return_info=True`` adds ``{"index", "key"}`` (the slot and ticket of the step's
        ``o_{t+1}`` frame; ``key`` is what :meth:`update_priorities` takes) and, by priority,
        ``"probability"``, ``"weight"``, ``"priority"`` as :meth:`ReplayBuffer.sample`.
        ``beta``, ``out`` (arrays to refill instead of fresh ones: exactly the keys, dtypes
        and shapes a call returns, C-contiguous and writable) and ``timeout`` as there.

        Raises :class:`EmptyBufferError` when no step is complete (without a limiter).
        """
        n = _int_arg("batch_size", batch_size, 1)
        seconds = _timeout(timeout)
        b = _beta_arg(self.sampler, beta)
        self._check_call(self.sample_layout(n), return_info)
        arrays = _out_arrays(self.sample_layout(n), out)
        drawn = self._raw.sample(list(arrays.values()), n, b, seconds)
        info = self._draw_info(drawn, return_info)
        return arrays if info is None else (arrays, info)

    @overload
    def sample_sequences(
        self, batch_size: int, length: int, period: int | None = ..., *, beta: float | None = ...,
        return_info: Literal[False] = ..., out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
    ) -> dict[str, np.ndarray]: ...
    @overload
    def sample_sequences(
        self, batch_size: int, length: int, period: int | None = ..., *, beta: float | None = ...,
        return_info: Literal[True], out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
    ) -> tuple[dict[str, np.ndarray], SampleInfo]: ...
    @overload
    def sample_sequences(
        self, batch_size: int, length: int, period: int | None = ..., *, beta: float | None = ...,
        return_info: bool, out: Mapping[str, np.ndarray] | None = ..., timeout: float | None = ...,
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], SampleInfo]: ...
    def sample_sequences(
        self,
        batch_size: int,
        length: int,
        period: int | None = None,
        *,
        beta: float | None = None,
        return_info: bool = False,
        out: Mapping[str, np.ndarray] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], SampleInfo]:
        """Draws ``batch_size`` sequences of ``length`` steps, each from one episode, starting
        at a step ``s`` with ``s % period == 0`` (counted from the episode's start; ``period``
        defaults to ``length``) whose ``length`` steps are written or whose episode ended.

        Returns fresh arrays: each observation field ``(B, length + 1, *shape)`` (``o_s ..
        o_{s+length}``, the last to bootstrap; each position a stack of ``frame_stack`` frames,
        ``(B, length + 1, frame_stack, *shape)``, when ``frame_stack > 1``), every other field
        with the raw reward ``(B, length, *shape)``, and ``"terminated"``, ``"truncated"``,
        ``"is_first"``, ``"mask"`` ``(B, length)`` bool (``mask`` False for the padding after the
        episode's end; padding is zeros, the episode's final observation is kept).

        By priority, a sequence is drawn by its first step's priority (``probability`` is that
        step's share of all steps' priorities); ``key``/``index`` are the first step's.
        ``out`` as in :meth:`sample`.
        """
        n = _int_arg("batch_size", batch_size, 1)
        length = _int_arg("length", length, 1, _core.MAX_CAPACITY)
        period = length if period is None else _int_arg("period", period, 1, _core.MAX_CAPACITY)
        seconds = _timeout(timeout)
        b = _beta_arg(self.sampler, beta)
        self._check_call(self.sequence_layout(n, length), return_info)
        arrays = _out_arrays(self.sequence_layout(n, length), out)
        drawn = self._raw.sample_sequences(list(arrays.values()), n, length, period, b, seconds)
        info = self._draw_info(drawn, return_info)
        return arrays if info is None else (arrays, info)

    def batches(
        self,
        batch_size: int,
        *,
        prefetch: int = 2,
        copy: bool = False,
        sequences: bool = False,
        length: int | None = None,
        period: int | None = None,
        beta: float | None = None,
        timeout: float | None = None,
    ) -> Batches:
        """Batches of :meth:`sample` (or, with ``sequences=True``, of
        :meth:`sample_sequences` with ``length`` and ``period``), ``return_info=True``, drawn
        ahead by a background thread: see :meth:`ReplayBuffer.batches`."""
        n = _int_arg("batch_size", batch_size, 1)
        prefetch = _int_arg("prefetch", prefetch, 1, 64)
        b = _beta_arg(self.sampler, beta)
        seconds = _timeout(timeout)
        for name, flag in (("copy", copy), ("sequences", sequences)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if sequences:
            if length is None:
                raise TypeError("batches(sequences=True) needs length=")
            steps = _int_arg("length", length, 1, _core.MAX_CAPACITY)
            every = None if period is None else _int_arg("period", period, 1, _core.MAX_CAPACITY)

            def sample(out: Mapping[str, np.ndarray] | None, wait: float | None) -> tuple[dict[str, np.ndarray], SampleInfo]:
                if out is None:  # the first batch of a slot: checked and allocated as usual
                    return self.sample_sequences(n, steps, every, beta=beta, return_info=True, timeout=wait)
                # Refills: straight to the core, so the thread holds the GIL as briefly as it can.
                drawn = self._raw.sample_sequences(list(out.values()), n, steps, every or steps, b, wait)
                return dict(out), self._draw_info(drawn, True)  # type: ignore[return-value]

        else:
            if length is not None or period is not None:
                raise TypeError("length= and period= are for batches(sequences=True)")

            def sample(out: Mapping[str, np.ndarray] | None, wait: float | None) -> tuple[dict[str, np.ndarray], SampleInfo]:
                if out is None:
                    return self.sample(n, beta=beta, return_info=True, timeout=wait)
                drawn = self._raw.sample(list(out.values()), n, b, wait)
                return dict(out), self._draw_info(drawn, True)  # type: ignore[return-value]

        return Batches(sample, prefetch, bool(copy), seconds)

    def seed(self, seed: int) -> None:
        """Seeds this handle's random draws (:meth:`sample`, :meth:`sample_sequences`,
        :meth:`batches`): as :meth:`ReplayBuffer.seed`."""
        self._ring.seed(seed)

    def update_priorities(self, keys: Any, priorities: Any) -> int:
        """As :meth:`ReplayBuffer.update_priorities`, with the keys :meth:`sample` returns."""
        return self._ring.update_priorities(keys, priorities)

    def priorities(self, keys: Any) -> np.ndarray:
        """As :meth:`ReplayBuffer.priorities` (0 for a step whose window is not complete yet)."""
        return self._ring.priorities(keys)

    # ---- flow control ----

    def can_sample(self, batch_size: int) -> bool:
        """As :meth:`ReplayBuffer.can_sample`."""
        return self._ring.can_sample(batch_size)

    def can_insert(self, rows: int) -> bool:
        """As :meth:`ReplayBuffer.can_insert` (a writer's step inserts one frame per env)."""
        return self._ring.can_insert(rows)

    def shutdown(self) -> None:
        """As :meth:`ReplayBuffer.shutdown`."""
        self._ring.shutdown()

    # ---- lifecycle ----

    def stats(self) -> Stats:
        """:meth:`ReplayBuffer.stats` of the ring of frames (``size`` and ``inserts`` count
        frames, ``samples`` items), plus ``bytes_per_step``: segment bytes per slot."""
        stats = self._ring.stats()
        stats["bytes_per_step"] = self.bytes_per_step
        return stats

    def processes(self) -> list[int]:
        """Pids of the live processes holding a handle to this buffer."""
        return self._ring.processes()

    def close(self) -> None:
        """Releases this handle (idempotent)."""
        self._raw.close()
        self._ring.close()

    def unlink(self) -> None:
        """Removes the segment's name; attached handles keep working until they close."""
        self._ring.unlink()

    def __enter__(self) -> "EpisodeBuffer":
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles by name: unpickling attaches."""
        return (_reattach, (self.name, self._ring._dir))


class EpisodeWriter:
    """Writes the episodes of one vector env into an :class:`EpisodeBuffer` (see
    :meth:`EpisodeBuffer.writer`). Private to the process that made it."""

    __slots__ = ("_buffer", "_raw", "_num_envs", "_pid")

    def __init__(self, buffer: EpisodeBuffer, raw: _core.RawEpisodeWriter, num_envs: int | None) -> None:
        """Internal: use :meth:`EpisodeBuffer.writer`."""
        self._buffer = buffer
        self._raw = raw
        self._num_envs = num_envs
        self._pid = os.getpid()

    @property
    def num_envs(self) -> int | None:
        return self._num_envs

    def _rows(self) -> int:
        return 1 if self._num_envs is None else self._num_envs

    def _columns(self, values: Mapping[str, Any], names: Sequence[str], rows: int, what: str) -> list[np.ndarray]:
        keys = set(values)
        if keys != set(names):
            missing = sorted(set(names) - keys)
            extra = sorted(map(str, keys - set(names)))
            parts = [f"missing field(s) {missing}"] if missing else []
            parts += [f"unknown field(s) {extra}"] if extra else []
            raise ValueError(f"{what}: " + "; ".join(parts) + f" ({what} takes {list(names)})")
        fields = self._buffer._fields
        columns = []
        for name in names:
            if self._num_envs is None:
                column = _to_column(fields, name, values[name], ())[None]
            else:
                column = _to_column(fields, name, values[name], (-1,))
                if column.shape[0] != rows:
                    raise ValueError(f"field {name!r}: {column.shape[0]} rows, expected {rows} (one per env)")
            columns.append(column)
        return columns

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("an EpisodeWriter belongs to the process that made it; make a new one here")

    def reset(self, *, envs: Sequence[int] | np.ndarray | None = None, timeout: float | None = None, **observations: Any) -> None:
        """Starts a new episode with its first observation ``o_0``: one keyword per observation
        field, one row per env (all envs, or those in ``envs``; no env axis when ``num_envs``
        is None). An env's unfinished episode is abandoned (its last steps, whose n-step window
        never completed, are never sampled). ``timeout`` as :meth:`ReplayBuffer.add`."""
        self._check_process()
        if envs is None:
            env_list = list(range(self._rows()))
        else:
            if self._num_envs is None:
                raise ValueError("envs= is for writers of several envs (num_envs=None here)")
            array = np.asarray(envs)
            if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
                raise TypeError(f"envs must be a sequence of env indices, got {envs!r}")
            env_list = [int(e) for e in array]
            bad = [e for e in env_list if not 0 <= e < self._num_envs]
            if bad:
                raise ValueError(f"envs {bad} out of range for {self._num_envs} envs")
            if len(set(env_list)) != len(env_list):
                raise ValueError(f"envs lists an env twice: {env_list}")
        seconds = _timeout(timeout)
        columns = self._columns(observations, self._buffer._observations, len(env_list), "reset")
        self._buffer._raw.reset(self._raw, env_list, columns, seconds)

    def step(
        self,
        *,
        terminated: Any,
        truncated: Any,
        priority: Any = None,
        timeout: float | None = None,
        **values: Any,
    ) -> None:
        """One step of every env: every field (the observation after the step, the action,
        reward, ...) with one row per env, and the ``terminated``/``truncated`` flags.

        An env whose previous step ended its episode starts a new one: this call's
        observation is its first, and its action, reward and flags are ignored (gymnasium's
        autoreset), so a plain vector-env loop needs no special case. ``priority`` (a
        :class:`Prioritized` buffer only): each env's step's raw priority, or one for all,
        applied once its n-step window is complete; omitted, the largest raw priority so far
        (at least 1.0). What the call wrote is committed when it returns.

        Raises ``ValueError``/``TypeError`` (nothing written) for a missing or unknown field, a
        wrong shape or number of rows, flags that are not bools, an env never reset, invalid
        priorities.
        """
        self._check_process()
        rows = self._rows()
        if priority is not None and not isinstance(self._buffer.sampler, Prioritized):
            raise TypeError(f"priority= needs a prioritized buffer; this buffer's sampler is {self._buffer.sampler}")
        priorities = _priorities(priority, None if self._num_envs is None else rows)
        seconds = _timeout(timeout)
        columns = self._columns(values, list(self._buffer._fields), rows, "step")
        flags = [_flags_arg(n, v, self._num_envs) for n, v in (("terminated", terminated), ("truncated", truncated))]
        p = None if priorities is None else [float(x) for x in priorities]
        self._buffer._raw.step(self._raw, columns, flags[0], flags[1], p, seconds)

    def __reduce__(self) -> Any:
        raise TypeError("an EpisodeWriter belongs to its process: make one with EpisodeBuffer.writer() there")
