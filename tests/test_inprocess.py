"""The threads an in-process pool runs plain `def` handlers on (`inprocess._Threads`): calls run at once when they
must, a call past its timeout is abandoned without holding up the next, and a closed pool takes no more calls.
Fast: no NATS, no service."""

from __future__ import annotations

import threading

import anyio
import pytest

from eventfn.invoke.inprocess import _Deadlines, _Threads, _TimedOut


async def test_calls_that_wait_for_each_other_each_get_a_thread() -> None:
    """Three calls that only return together (a barrier of three): a thread each, although a call first waits for
    an awake thread (`SPARE_AFTER`)."""
    threads = _Threads("test", _Deadlines(20.0), limit=4)
    barrier = threading.Barrier(3, timeout=10)
    results: list[int] = []

    async def one() -> None:
        results.append(await threads.call(barrier.wait))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
    assert sorted(results) == [0, 1, 2]
    threads.close()


async def test_a_call_past_its_timeout_is_abandoned_and_the_next_runs() -> None:
    threads = _Threads("test", _Deadlines(0.2), limit=4)
    stuck = threading.Event()
    with anyio.fail_after(20):
        with pytest.raises(_TimedOut):
            await threads.call(stuck.wait)
        assert await threads.call(lambda: 42) == 42
        with pytest.raises(ZeroDivisionError):
            await threads.call(lambda: 1 / 0)
    stuck.set()
    threads.close()
    with pytest.raises(RuntimeError):
        await threads.call(lambda: 1)


async def test_deadlines_expire_in_the_order_they_began_and_not_once_finished() -> None:
    """One timer watches every invocation of a pool; a finished one never expires, the others each do once."""
    deadlines = _Deadlines(0.05)
    expired: list[int] = []
    watches = [deadlines.watch(expired.append, n) for n in range(4)]
    deadlines.finish(watches[1])
    with anyio.fail_after(10):
        while len(expired) < 3:  # noqa: ASYNC110 - the expiries are what this test watches for
            await anyio.sleep(0.01)
    later = deadlines.watch(expired.append, 9)
    deadlines.finish(later)
    await anyio.sleep(0.1)
    assert expired == [0, 2, 3]
    assert [w.expired for w in watches] == [True, False, True, True]
