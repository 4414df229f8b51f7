"""ringlab.engine.launch: results in rank order, and no silent hang or orphan when a rank fails."""

import multiprocessing
import time

import pytest
import workers

from ringlab.engine.launch import RankError, launch

pytestmark = pytest.mark.distributed


def test_results_in_rank_order_with_one_thread_each():
    assert launch(workers.rank_and_size, 3, timeout=120) == [(0, 3, 1), (1, 3, 1), (2, 3, 1)]


def test_rank_that_raises_is_named_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed") as info:
        launch(workers.raise_on, 3, args=(1,), timeout=60)
    assert "rank 1 fails on purpose" in str(info.value)
    assert info.value.ranks[0] == 1
    assert time.monotonic() - t0 < 60
    assert not multiprocessing.active_children()


def test_rank_that_dies_is_named():
    with pytest.raises(RankError, match="rank 0 failed") as info:
        launch(workers.exit_on, 2, args=(0,), timeout=60)
    assert "exit code 3" in str(info.value)
    assert not multiprocessing.active_children()


def test_hung_rank_ends_within_timeout():
    t0 = time.monotonic()
    # 20 s: every rank must have joined the group before the timeout, even on a loaded machine.
    with pytest.raises(RankError, match=r"did not finish within 20 s") as info:
        launch(workers.hang_on, 2, args=(1,), timeout=20)
    assert 1 in info.value.ranks
    assert "rank 1 joined the group" in str(info.value)
    assert time.monotonic() - t0 < 60
    assert not multiprocessing.active_children()


def test_function_not_importable_by_name():
    with pytest.raises(TypeError, match="importable by name"):
        launch(lambda: None, 2)
    with pytest.raises(TypeError, match="importable by name"):
        launch(_nested(), 2)


def _nested():
    def inner():
        pass
    return inner


@pytest.mark.parametrize("bad, kind", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_bad_world_size(bad, kind):
    with pytest.raises(kind, match="world_size must be an int"):
        launch(workers.rank_and_size, bad)
