# The stage barrier of a tree restore, as CRIU's task_entries: one MAP_SHARED page
# (struct pie_sync in csrc/pie_restorer.h) made by the restore command before it forks
# the root and inherited by every task, so the restore command, the tasks' Python phases
# and their restorers all see it. The restore command opens a stage with the number of
# tasks taking part; each task does its part, counts itself done and waits for the next
# stage. Nobody goes on to, say, joining process groups before every task exists, or
# returns into its program before every thread of the tree is back. A failing task sets
# the stage to ERROR; everyone waiting then gives up.
import mmap
import os

from criu_py.errors import RestoreError

# Stages, in order. FORK: every task (live, zombie, helper) is created, sets up its
# session and own group, opens what its subtree inherits and forks its children.
# PGID: process groups are joined. CLEANUP: helpers exit and are reaped, zombies die and
# stay unreaped. PREPARE: live tasks open what their restorer needs. FILES: each fd
# table is installed by its owner. RESTORE: the restorers run, every thread counts
# itself ready. GO: the tree returns into its programs.
STAGE_FORK, STAGE_PGID, STAGE_CLEANUP, STAGE_PREPARE, STAGE_FILES, STAGE_RESTORE, STAGE_GO = \
    range(1, 8)
STAGE_NAMES = {STAGE_FORK: "forking the tree", STAGE_PGID: "joining process groups",
               STAGE_CLEANUP: "ending helpers and zombies", STAGE_PREPARE: "opening files",
               STAGE_FILES: "installing fd tables", STAGE_RESTORE: "restoring memory and threads",
               STAGE_GO: "letting the tree run"}
STAGE_ERROR = 0xFFFFFFFF
SYNC_SIZE = 4096
POLL_NS = 100_000_000

# struct pie_sync field offsets
OFF_STAGE, OFF_NR, OFF_ERR_STAGE, OFF_ERR_TID, OFF_ERR_RET, OFF_ERR_ARG = 0, 4, 8, 12, 16, 24
OFF_PAGES_COMPARED, OFF_PAGES_SKIPPED_COW = 32, 36


class Aborted(Exception):
    """The restore was aborted by another task (or the restore command)."""


class SyncPage:
    """The shared page, mapped at `addr` in every task of the restore."""

    def __init__(self, addr: int):
        self.addr = addr
        self._map = None

    @classmethod
    def create(cls, avoid: list[tuple[int, int]]) -> "SyncPage":
        """Map the page where no task of the tree has memory (it must survive every
        restorer's big unmap), shared so that forks keep seeing one page."""
        from criu_py.native import lib
        from criu_py.restore.pie import current_layout, free_gap
        addr = free_gap(SYNC_SIZE, current_layout() + avoid)
        r = lib.criu_py_restore_syscall(9, addr, SYNC_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                                        mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
        if r != addr:
            raise RestoreError(f"cannot map the sync page at {addr:#x}: {os.strerror(-r) if r < 0 else r}")
        return cls(addr)

    def unmap(self) -> None:
        from criu_py.native import lib
        lib.criu_py_restore_syscall(11, self.addr, SYNC_SIZE, 0, 0, 0, 0)

    # -- raw words
    def _load(self, off: int) -> int:
        from criu_py.native import lib
        return lib.criu_py_atomic_load(self.addr + off)

    def _store(self, off: int, value: int) -> None:
        from criu_py.native import lib
        lib.criu_py_atomic_store(self.addr + off, value)

    @property
    def stage(self) -> int:
        return self._load(OFF_STAGE)

    @property
    def nr_in_progress(self) -> int:
        return self._load(OFF_NR)

    def error(self) -> tuple[int, int, int, int] | None:
        """(restorer stage, -errno, pid, detail) of the first restorer failure, if any."""
        import ctypes
        stage = ctypes.c_int32.from_address(self.addr + OFF_ERR_STAGE).value
        if not stage:
            return None
        return (stage, ctypes.c_int64.from_address(self.addr + OFF_ERR_RET).value,
                ctypes.c_int32.from_address(self.addr + OFF_ERR_TID).value,
                ctypes.c_uint64.from_address(self.addr + OFF_ERR_ARG).value)

    def count_cow(self, compared: int, kept: int) -> None:
        """A task's copy-on-write pages: how many it compared, how many stayed shared."""
        from criu_py.native import lib
        lib.criu_py_atomic_add(self.addr + OFF_PAGES_COMPARED, compared)
        lib.criu_py_atomic_add(self.addr + OFF_PAGES_SKIPPED_COW, kept)

    @property
    def cow_counts(self) -> tuple[int, int]:
        return self._load(OFF_PAGES_COMPARED), self._load(OFF_PAGES_SKIPPED_COW)

    # -- the restore command's side
    def open_stage(self, stage: int, participants: int) -> None:
        from criu_py.native import lib
        self._store(OFF_NR, participants)
        self._store(OFF_STAGE, stage)
        lib.criu_py_futex_wake(self.addr + OFF_STAGE)

    def wait_stage_done(self, check) -> None:
        """Wait until every participant counted itself done, calling check() between
        waits (it raises to abort)."""
        from criu_py.native import lib
        while True:
            n = self.nr_in_progress
            if n == 0:
                return
            if self.stage == STAGE_ERROR:
                check()
                raise Aborted()
            lib.criu_py_futex_wait(self.addr + OFF_NR, n, POLL_NS)
            check()

    def abort(self) -> None:
        from criu_py.native import lib
        self._store(OFF_STAGE, STAGE_ERROR)
        lib.criu_py_futex_wake(self.addr + OFF_STAGE)
        lib.criu_py_futex_wake(self.addr + OFF_NR)

    # -- a task's side
    def wait_stage(self, stage: int, alive=None) -> None:
        """Block until the restore reaches `stage`; Aborted if it was aborted. alive:
        called between waits of POLL_NS (it raises Aborted when the restore is gone)."""
        from criu_py.native import lib
        while True:
            cur = self.stage
            if cur == STAGE_ERROR:
                raise Aborted()
            if cur >= stage:
                return
            lib.criu_py_futex_wait(self.addr + OFF_STAGE, cur, -1 if alive is None else POLL_NS)
            if alive is not None:
                alive()

    def done(self) -> None:
        """Count this task done with the current stage."""
        from criu_py.native import lib
        if lib.criu_py_atomic_add(self.addr + OFF_NR, -1) == 0:
            lib.criu_py_futex_wake(self.addr + OFF_NR)

    def stage_done(self, stage: int, alive=None) -> None:
        """done(), then wait until the next stage opens."""
        self.done()
        self.wait_stage(stage + 1, alive)
