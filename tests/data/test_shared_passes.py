"""Pass orders and window tables shared by a loader's processes through files (SharedPasses):
the same windows as computed in memory, one computation for many processes, and every way a
file can be missing, wrong or unwritable falls back to computing."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from megadoc_pl.data.views import ViewOptions, build_view, real_units
from megadoc_pl.data.windows import SharedPasses, StreamWindows

from helpers import fill_filesystem
from test_views import HELDOUT, make_corpus

T = 16


@pytest.fixture(scope="module")
def units(tmp_path_factory, tiny_tokenizer_path):
    corpus = make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer_path)
    R, S = corpus["real"], corpus["synth"]
    return real_units(R, HELDOUT), build_view(R, S, ViewOptions(view="stitch", generations=2, short_pool="drop"),
                                              HELDOUT)


def _draws(st: StreamWindows, passes: int) -> np.ndarray:
    first, _ = st.pass_windows(np.arange(passes + 1))
    return np.arange(int(first[passes]))


def _same_clips(a: StreamWindows, b: StreamWindows, j: np.ndarray) -> None:
    for chunk in np.array_split(j, 7):  # each pass drawn from several times: its table is made
        x, y = a.clips(chunk), b.clips(chunk)
        for k in x.__dataclass_fields__:
            assert np.array_equal(getattr(x, k), getattr(y, k)), k


def _mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is (a view of) a memory-mapped file."""
    while a is not None and not isinstance(a, np.memmap):
        a = getattr(a, "base", None)
    return a is not None


def test_shared_passes_give_the_windows_computed_in_memory(units, tmp_path):
    for st_units, name in ((units[0], "real"), (units[1], "synthetic")):
        shared = SharedPasses(tmp_path / "passes", keep=2)
        mem = StreamWindows(st_units, T, 5, name)
        first = StreamWindows(st_units, T, 5, name, shared=shared)
        j = _draws(mem, 5)
        _same_clips(mem, first, j)
        # a second process (here: object) maps what the first wrote, and reads the same windows
        again = StreamWindows(st_units, T, 5, name, shared=SharedPasses(tmp_path / "passes", keep=2))
        _same_clips(mem, again, j[-len(j) // 5:])
        perm, starts = again.pass_order(4)
        assert _mapped(perm) and _mapped(starts)
        assert np.array_equal(perm, mem.pass_order(4)[0]) and np.array_equal(starts, mem.pass_order(4)[1])
        # the offsets too are mapped from the first one's files (8 bytes a unit and a piece)
        for k in ("canon_start", "piece_key"):
            assert _mapped(getattr(again, k)) and np.array_equal(getattr(again, k), getattr(mem, k))
    kept: dict[str, set[int]] = {}
    for f in (tmp_path / "passes").glob("*.npy"):
        name, rest = f.name.rsplit("-p", 1)
        kept.setdefault(name, set()).add(int(rest.split("-")[0]))
    offsets = {n: v for n, v in kept.items() if n.startswith(("units-", "pieces-"))}
    # real: one piece a unit, so its piece offsets are its unit offsets; stitch: both
    assert sorted(n.split("-")[0] for n in offsets) == ["pieces", "units", "units"] and \
        all(v == {0} for v in offsets.values()), offsets
    # 2 streams x (orders, window tables); old passes were deleted as new ones were written
    passes = {n: v for n, v in kept.items() if n not in offsets}
    assert len(passes) == 4 and all(min(v) >= 3 for v in passes.values()), kept


def test_only_the_newest_passes_stay_and_a_deleted_one_stays_readable(tmp_path):
    shared = SharedPasses(tmp_path, keep=2)
    first = shared.arrays("order-x", 0, [(4, np.int64)], lambda: (np.arange(4),))[0]
    for p in range(1, 6):
        shared.arrays("order-x", p, [(4, np.int64)], lambda: (np.arange(4) + p,))
    shared.arrays("windows-y", 0, [(2, np.int32)], lambda: (np.zeros(2, np.int32),))
    assert sorted(f.name for f in tmp_path.glob("*.npy")) == ["order-x-p4-0.npy", "order-x-p5-0.npy",
                                                              "windows-y-p0-0.npy"]
    assert first.tolist() == [0, 1, 2, 3]  # its file is gone; the mapping is not


def test_a_killed_writers_temporary_file_goes_when_its_pass_is_next_written(tmp_path):
    from megadoc_pl.utils import file_lock

    dead0 = tmp_path / ".order-x-p0-0.npy.k1ll.tmp"  # what a worker killed mid-write leaves
    other = tmp_path / ".order-x-p1-0.npy.l1ve.tmp"  # another pass's, its writer alive (holds the lock)
    for f in (dead0, other):
        f.write_bytes(b"half")
    with file_lock(tmp_path / ".order-x-p1.lock"):
        SharedPasses(tmp_path).arrays("order-x", 0, [(3, np.int64)], lambda: (np.arange(3),))
    assert not dead0.exists() and other.exists()
    assert SharedPasses(tmp_path).arrays("order-x", 0, [(3, np.int64)], lambda: 1 / 0)[0].tolist() == [0, 1, 2]


def test_a_file_that_is_not_what_its_name_says_is_computed_again(units, tmp_path):
    st_units = units[1]
    mem = StreamWindows(st_units, T, 5, "synthetic")
    shared = SharedPasses(tmp_path)
    StreamWindows(st_units, T, 5, "synthetic", shared=shared).pass_order(0)
    perm_file, starts_file = sorted(tmp_path.glob("order-*-p0-*.npy"))
    want = mem.pass_order(0)
    for spoil in (lambda: perm_file.write_bytes(perm_file.read_bytes()[:-8]),  # torn
                  lambda: np.save(starts_file, np.zeros(len(want[1]), np.int32)),  # another type
                  lambda: np.save(starts_file, np.zeros(3, np.int64))):  # another shape
        spoil()
        perm, starts = StreamWindows(st_units, T, 5, "synthetic", shared=shared).pass_order(0)
        assert np.array_equal(perm, want[0]) and np.array_equal(starts, want[1])
        assert np.array_equal(np.load(perm_file), want[0]) and np.array_equal(np.load(starts_file), want[1])  # rewritten


def _ask(root: str, log: str, barrier) -> None:
    def compute():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return (np.arange(1000, dtype=np.int64) * 3,)

    barrier.wait()
    (a,) = SharedPasses(root).arrays("order-x", 7, [(1000, np.int64)], compute)
    assert np.array_equal(a, np.arange(1000) * 3)


def test_many_processes_compute_a_pass_once(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    log = tmp_path / "computed.txt"
    procs = [ctx.Process(target=_ask, args=(str(tmp_path / "passes"), str(log), barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(log.read_text().split()) == 1  # one computed it; the others waited and mapped its file


def test_where_files_cannot_be_written_each_process_computes_its_own(units, tmp_path, tmpfs, capsys):
    st_units = units[1]
    mem = StreamWindows(st_units, T, 5, "synthetic")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    full = tmpfs("full", size="1m")
    fill_filesystem(full, leave=0)
    fails = []
    for root in (blocked / "passes", full / "passes"):
        shared = SharedPasses(root)
        st = StreamWindows(st_units, T, 5, "synthetic", shared=shared)
        _same_clips(mem, st, _draws(mem, 3))
        assert shared.failed and f"cannot share pass arrays under {root} (" in capsys.readouterr().err
        fails.append(shared.failed)
    assert fails[0].startswith("NotADirectoryError") and "No space left" in fails[1], fails
    assert not list(full.glob("passes/.*.tmp")) and not list(full.glob("passes/*.npy"))  # nothing half written
