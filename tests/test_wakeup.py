"""Sender wake-ups must work wherever the spool lives, a deep folder included."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastroute.spool.wakeup import MAX_UNIX_PATH, Notifier, Waker, socket_address


@pytest.mark.parametrize("depth", [0, 12])
def test_notifier_wakes_the_waker(tmp_path: Path, depth: int) -> None:
    spool = tmp_path.joinpath(*(["a-rather-long-folder-name"] * depth), "spool")
    spool.mkdir(parents=True)
    long_path = len(str(spool / "run" / "pacs.wake")) > MAX_UNIX_PATH
    assert long_path == (depth > 0)
    waker, notifier = Waker(spool, "pacs"), Notifier(spool)
    try:
        assert waker.wait(0.01) is False                 # nothing sent: times out
        notifier.notify("pacs")
        notifier.notify("pacs")
        assert waker.wait(5.0) is True                   # woken; both datagrams drained
        assert waker.wait(0.01) is False
        notifier.notify("other")                         # nobody listens: never raises
    finally:
        waker.close()
        notifier.close()
    assert socket_address(spool, "pacs").startswith("\0") == long_path
    assert socket_address(spool, "pacs") != socket_address(spool, "ct")
