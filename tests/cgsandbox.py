# Test-only cgroups: every directory a cgroup test makes lives under
# criu-py-test-<pid>-<n>/ below the cgroup this test process runs in, on each hierarchy
# (the machine's own cgroups are never touched), and is removed afterwards, children
# first, with whatever a test or a restore made inside.
import itertools
import os
import time
from pathlib import Path

_counter = itertools.count()


def mounts() -> dict:
    """{hierarchy name as /proc/self/cgroup says it: mount point}."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fstype, _, opts = (right.split() + ["", "", ""])[:3]
            where = left.split()[4]
            if fstype == "cgroup2":
                out.setdefault("", where)
            elif fstype == "cgroup":
                words = opts.split(",")
                names = [w for w in words if w.startswith("name=")]
                out.setdefault(None, {})
                for w in words:
                    out[None].setdefault(w, where)
                if names:
                    out.setdefault(names[0], where)
    return out


def own() -> dict:
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, name, path = line.rstrip("\n").split(":", 2)
            out[name] = path
    return out


class Sandbox:
    def __init__(self):
        self._mounts = mounts()
        self.own = own()
        self.base = f"criu-py-test-{os.getpid()}-{next(_counter)}"
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return self.mountpoint(name) is not None and name in self.own

    def mountpoint(self, name: str):
        if name == "" or name.startswith("name="):
            return self._mounts.get(name)
        return self._mounts.get(None, {}).get(name)

    def path(self, name: str, sub: str = "") -> str:
        """Cgroup path (as /proc/PID/cgroup shows it) of base/sub on hierarchy `name`."""
        parent = self.own[name].rstrip("/")
        return f"{parent}/{self.base}" + (f"/{sub}" if sub else "")

    def dir(self, name: str, sub: str = "") -> Path:
        return Path(self.mountpoint(name) + self.path(name, sub))

    def make(self, name: str, sub: str = "", **props) -> Path:
        """mkdir -p base/sub on hierarchy `name`, then write props (dots as __: memory__max)."""
        self.used.add(name)
        d = self.dir(name, sub)
        d.mkdir(parents=True, exist_ok=True)
        for key, value in props.items():
            (d / key.replace("__", ".")).write_text(str(value))
        return d

    def put(self, name: str, sub: str, pid: int) -> None:
        (self.dir(name, sub) / "cgroup.procs").write_text(str(pid))

    def read(self, name: str, sub: str, prop: str) -> str:
        return (self.dir(name, sub) / prop).read_text().strip()

    def cleanup(self) -> list:
        """Remove every test cgroup (deepest first); returns what could not be removed."""
        left = []
        for name in self.used:
            top = self.dir(name)
            if not top.exists():
                continue
            dirs = sorted((Path(root) for root, _, _ in os.walk(top)),
                          key=lambda p: len(p.parts), reverse=True)
            for d in dirs:
                for _ in range(200):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.01)
                else:
                    left.append(str(d))
        return left


def yard_mounts() -> list[str]:
    """Lines of /proc/self/mountinfo that belong to a criu-py cgroup yard."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "criu-py-cgyard-" in line]
