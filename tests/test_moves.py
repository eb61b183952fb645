"""Issue 13: the C-MOVEs in flight (``spool.moves``), and how moved objects find their job."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from fastroute.spool import Spool
from fastroute.spool.moves import Move, move_key


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    yield sp
    sp.close()


def test_register_lookup_unregister(spool: Spool) -> None:
    t = 1000.0
    assert spool.moves.register("FASTROUTE", 7, "job1", "1.2.3", ("newpacs", "backup"), t + 60, now=t)
    move = spool.moves.lookup("FASTROUTE", 7, now=t + 1)
    assert move == Move("FASTROUTE", 7, "job1", "1.2.3", ("newpacs", "backup"), t + 60, t)
    # the AE title as it comes off the wire (space-padded) finds the same move
    assert spool.moves.lookup("FASTROUTE       ", 7, now=t + 1) == move
    assert spool.moves.lookup("FASTROUTE", 8, now=t + 1) is None      # another id
    assert spool.moves.lookup("OTHER", 7, now=t + 1) is None          # another originator
    assert spool.moves.unregister("FASTROUTE", 7)
    assert spool.moves.lookup("FASTROUTE", 7, now=t + 1) is None
    assert not spool.moves.unregister("FASTROUTE", 7)


def test_an_active_id_is_refused_and_an_expired_one_reused(spool: Spool) -> None:
    t = 1000.0
    assert spool.moves.register("FR", 1, "job1", "1.1", ("a",), t + 10, now=t)
    assert not spool.moves.register("FR", 1, "job2", "2.2", ("b",), t + 10, now=t + 5)
    move = spool.moves.lookup("FR", 1, now=t + 5)
    assert move is not None and move.job == "job1"                   # the refused one changed nothing
    assert spool.moves.register("OTHER", 1, "job2", "2.2", ("b",), t + 10, now=t + 5)   # key is (AE, id)
    # expired: invisible to lookups, and the id may be registered again
    assert spool.moves.lookup("FR", 1, now=t + 11) is None
    assert spool.moves.register("FR", 1, "job3", "3.3", ("c",), t + 30, now=t + 11)
    move = spool.moves.lookup("FR", 1, now=t + 12)
    assert move is not None and (move.job, move.study_uid, move.destinations) == ("job3", "3.3", ("c",))


def test_prune_removes_only_expired_moves(spool: Spool) -> None:
    t = 1000.0
    spool.moves.register("FR", 1, "j", "1.1", ("a",), t + 10, now=t)
    spool.moves.register("FR", 2, "j", "1.2", ("a",), t + 100, now=t)
    spool.moves.register("FR", 0xFFFF, "j", "1.3", ("a",), t + 5, now=t)
    assert [m.message_id for m in spool.moves.active(now=t + 20)] == [2]
    assert spool.moves.prune(now=t + 20) == 2
    assert spool.moves.prune(now=t + 20) == 0
    assert [m.message_id for m in spool.moves.active(now=t)] == [2]


def test_message_ids_are_16_bit(spool: Spool) -> None:
    with pytest.raises(ValueError):
        spool.moves.register("FR", 0x10000, "j", "1.1", ("a",), 2e9)
    with pytest.raises(ValueError):
        spool.moves.register("FR", -1, "j", "1.1", ("a",), 2e9)
    # ids that differ only in their high byte are different keys
    assert move_key("FR", 0x0102) != move_key("FR", 0x0201)


def test_another_process_sees_a_registration(tmp_path: Path) -> None:
    """The runner (another process) registers, the listener looks up."""
    import subprocess
    import sys
    listener = Spool(tmp_path / "s", map_size=64 * 1024**2)
    try:
        assert listener.moves.lookup("FR", 3) is None
        code = ("import sys; from fastroute.spool import Spool; s = Spool(sys.argv[1], map_size=1 << 26); "
                "print(s.moves.register('FR', 3, 'j', '1.1', ('a',), 2e9))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.strip() == "True"
        move = listener.moves.lookup("FR", 3)
        assert move is not None and move.destinations == ("a",)
    finally:
        listener.close()
