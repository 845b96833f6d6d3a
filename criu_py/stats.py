# --display-stats: what a dump or a restore measured (the stats-dump and stats-restore
# images, as CRIU writes them), printed on stdout at the end in CRIU's words and order,
# so that whatever reads CRIU's summary reads ours.
import sys


def _pages(what: str, n: int) -> str:
    return f"{what}: {n} ({n:#x})"


def display(entry) -> None:
    """Print a stats_entry: its dump part, or its restore part."""
    lines = []
    if entry.HasField("dump"):
        d = entry.dump
        lines += ["Displaying dump stats:",
                  f"Freezing time: {d.freezing_time} us",
                  f"Frozen time: {d.frozen_time} us",
                  f"Memory dump time: {d.memdump_time} us",
                  f"Memory write time: {d.memwrite_time} us",
                  f"IRMAP resolve time: {d.irmap_resolve} us",
                  _pages("Memory pages scanned", d.pages_scanned),
                  _pages("Memory pages skipped from parent", d.pages_skipped_parent),
                  _pages("Memory pages written", d.pages_written),
                  _pages("Lazy memory pages", d.pages_lazy)]
    if entry.HasField("restore"):
        r = entry.restore
        lines += ["Displaying restore stats:",
                  _pages("Pages compared", r.pages_compared),
                  _pages("Pages skipped COW", r.pages_skipped_cow),
                  _pages("Pages restored", r.pages_restored),
                  f"Restore time: {r.restore_time} us",
                  f"Forking time: {r.forking_time} us"]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
