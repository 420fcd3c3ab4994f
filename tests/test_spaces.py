"""gymnasium spaces as field specs (issue 13): ``Box``, ``Discrete``, ``MultiBinary`` and
``MultiDiscrete`` wherever a ``(shape, dtype)`` pair is accepted, a ``Dict`` of them as the whole
``fields=`` mapping; every other space refused (naming the field and the space, saying what is
accepted) before anything is created; shmreplay never imports gymnasium itself."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402

import shmreplay  # noqa: E402
from shmreplay import EpisodeBuffer, ReplayBuffer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

KINDS = [ReplayBuffer, EpisodeBuffer]


def _create(kind, name, directory, fields, **kw):
    if kind is EpisodeBuffer:
        kw.setdefault("observation", "obs")
        kw.setdefault("reward", None)
    return kind.create(name, capacity=64, fields=fields, path=directory, **kw)


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize(
    "space, shape, dtype",
    [
        (spaces.Box(0.0, 1.0, (3, 4)), (3, 4), np.float32),
        (spaces.Box(0, 255, (84, 84), np.uint8), (84, 84), np.uint8),
        (spaces.Box(-1.0, 1.0, (), np.float64), (), np.float64),
        (spaces.Box(-5, 5, (2,), np.int16), (2,), np.int16),
        (spaces.Discrete(6), (), np.int64),
        (spaces.Discrete(6, start=-3), (), np.int64),
        (spaces.MultiBinary(5), (5,), np.int8),
        (spaces.MultiBinary([2, 3]), (2, 3), np.int8),
        (spaces.MultiDiscrete([3, 4, 5]), (3,), np.int64),
        (spaces.MultiDiscrete([[2, 3], [4, 5]]), (2, 2), np.int64),
    ],
    ids=lambda v: repr(v) if isinstance(v, spaces.Space) else None,
)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_space_is_its_shape_and_dtype(kind, space, shape, dtype, shm_name, shm_dir):
    fields = {"obs": space, "other": ((2,), np.float32)}
    with _create(kind, shm_name, shm_dir, fields) as buf:
        assert buf.fields == {"obs": (shape, np.dtype(dtype)), "other": ((2,), np.dtype(np.float32))}
        # Values the space makes are stored as they are.
        space.seed(0)
        values = [space.sample() for _ in range(4)]
        if kind is ReplayBuffer:
            for v in values:
                buf.add(obs=v, other=np.zeros(2, np.float32))
            for i, v in enumerate(values):
                np.testing.assert_array_equal(buf[i]["obs"], v)
            assert buf.sample(8)["obs"].shape == (8, *shape)
        else:
            w = buf.writer()
            w.reset(obs=values[0])
            for v in values[1:]:
                w.step(obs=v, other=np.zeros(2, np.float32), terminated=False, truncated=False)
            batch = buf.sample_sequences(2, 3)
            assert batch["obs"].shape == (2, 4, *shape)
            np.testing.assert_array_equal(batch["obs"][0], np.stack(values))


def test_discrete_keeps_its_dtype(shm_name, shm_dir):
    with ReplayBuffer.create(shm_name, capacity=4, fields={"a": spaces.Discrete(3, dtype=np.int32)}, path=shm_dir) as buf:
        assert buf.fields == {"a": ((), np.dtype(np.int32))}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_dict_space_is_the_whole_fields_mapping(kind, shm_name, shm_dir):
    space = spaces.Dict(
        {
            "obs": spaces.Box(0, 255, (4, 4), np.uint8),
            "action": spaces.Discrete(4),
            "legal": spaces.MultiBinary(4),
        }
    )
    with _create(kind, shm_name, shm_dir, space) as buf:
        # gymnasium's Dict keeps its keys sorted: that is the field order.
        assert buf.fields == {
            "action": ((), np.dtype(np.int64)),
            "legal": ((4,), np.dtype(np.int8)),
            "obs": ((4, 4), np.dtype(np.uint8)),
        }
        if kind is ReplayBuffer:
            space.seed(1)
            row = space.sample()
            buf.add(**row)
            got = buf[0]
            for key, value in row.items():
                np.testing.assert_array_equal(got[key], value)


def test_the_spaces_of_a_real_env(shm_name, shm_dir):
    """CleanRL's DQN with CartPole: the buffer made straight from the env's spaces."""
    env = gym.make("CartPole-v1")
    try:
        fields = {
            "obs": env.observation_space,
            "action": env.action_space,
            "reward": ((), np.float32),
            "next_obs": env.observation_space,
            "done": ((), np.bool_),
        }
        with ReplayBuffer.create(shm_name, capacity=100, fields=fields, path=shm_dir, seed=0) as buf:
            obs, _ = env.reset(seed=0)
            for _ in range(50):
                action = env.action_space.sample()
                next_obs, reward, terminated, truncated, _ = env.step(action)
                buf.add(obs=obs, action=action, reward=reward, next_obs=next_obs, done=terminated)
                obs = next_obs
                if terminated or truncated:
                    obs, _ = env.reset()
            batch = buf.sample(16)
            assert batch["obs"].shape == (16, 4) and batch["obs"].dtype == np.float32
            assert batch["action"].shape == (16,) and batch["action"].dtype == np.int64
            assert set(np.unique(batch["action"])) <= {0, 1}
    finally:
        env.close()


REFUSED = [
    spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
    spaces.Dict({"a": spaces.Discrete(2)}),
    spaces.Text(5),
    spaces.Graph(spaces.Box(0.0, 1.0, (2,)), None),
    spaces.Sequence(spaces.Discrete(2)),
    spaces.OneOf((spaces.Discrete(2), spaces.Box(0.0, 1.0, (2,)))),
]


@pytest.mark.parametrize("space", REFUSED, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_other_spaces_are_refused_before_anything_is_made(kind, space, shm_name, shm_dir):
    fields = {"obs": spaces.Box(0.0, 1.0, (2,)), "weird": space}
    before = _files(shm_dir)
    with pytest.raises(TypeError) as e:
        _create(kind, shm_name, shm_dir, fields)
    message = str(e.value)
    assert "'weird'" in message, message
    assert type(space).__name__ in message, message
    for accepted in ("Box", "Discrete", "MultiBinary", "MultiDiscrete"):
        assert accepted in message, message
    if isinstance(space, spaces.Dict):
        assert "whole fields= mapping" in message, message
    assert _files(shm_dir) == before
    with pytest.raises(FileNotFoundError):
        kind.attach(shm_name, path=shm_dir)


def test_a_dict_holding_other_spaces_is_refused(shm_name, shm_dir):
    space = spaces.Dict({"obs": spaces.Box(0.0, 1.0, (2,)), "t": spaces.Tuple((spaces.Discrete(2),))})
    with pytest.raises(TypeError, match="'t'.*Tuple"):
        ReplayBuffer.create(shm_name, capacity=4, fields=space, path=shm_dir)
    assert _files(shm_dir) == []


def test_an_empty_box_is_refused(shm_name, shm_dir):
    with pytest.raises(ValueError, match="'obs'"):
        ReplayBuffer.create(shm_name, capacity=4, fields={"obs": spaces.Box(0.0, 1.0, (3, 0))}, path=shm_dir)
    assert _files(shm_dir) == []


def test_reserved_names_still_refused_for_spaces(shm_name, shm_dir):
    with pytest.raises(ValueError, match="priority"):
        ReplayBuffer.create(shm_name, capacity=4, fields={"priority": spaces.Discrete(2)}, path=shm_dir)
    with pytest.raises(ValueError, match="discount"):
        EpisodeBuffer.create(
            shm_name, capacity=4, fields={"obs": spaces.Discrete(2), "discount": spaces.Discrete(2)},
            reward=None, path=shm_dir,
        )
    assert _files(shm_dir) == []


def test_shmreplay_never_imports_gymnasium(tmp_path):
    """gymnasium is optional: importing shmreplay and making buffers from (shape, dtype) pairs
    leaves it unimported (a space can only exist once its program imported gymnasium)."""
    code = (
        "import sys, numpy as np, shmreplay\n"
        f"b = shmreplay.ReplayBuffer.create(capacity=4, fields={{'x': ((2,), np.float32)}}, path={str(tmp_path)!r})\n"
        "try:\n"
        "    shmreplay.ReplayBuffer.create(capacity=4, fields={'x': object()})\n"
        "except TypeError:\n"
        "    pass\n"
        "b.unlink()\n"
        "assert 'gymnasium' not in sys.modules, 'gymnasium was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_field_spec_type_admits_spaces():
    """``shmreplay.FieldSpec`` names gymnasium's Space (a string, resolved only by type checkers)."""
    assert "Space" in repr(shmreplay.FieldSpec)
