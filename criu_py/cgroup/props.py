# Which cgroup properties (files) a dump saves, and in what order a restore writes them.
# One table per controller holds the cgroup v1 and the cgroup v2 names together (a file
# a directory lacks is simply not saved), so `--cgroup-props` speaks of "memory" for both.
# --cgroup-props / --cgroup-props-file take CRIU's small description language:
#
#   "memory":
#    - "strategy": "merge"          (add to the built-in list; "replace": instead of it)
#    - "properties": ["memory.high", "memory.swap.max"]
#
# Names may be shell patterns ("hugetlb.*.max") matched against the directory's files.
from criu_py.errors import CriuError

BUILTIN = {
    # v1 names first, in the order they must be written (limit before memsw.limit).
    "cpu": ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.rt_period_us",
            "cpu.rt_runtime_us",
            "cpu.weight", "cpu.max", "cpu.max.burst", "cpu.idle", "cpu.uclamp.min",
            "cpu.uclamp.max"],
    "memory": ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness",
               "memory.soft_limit_in_bytes", "memory.move_charge_at_immigrate",
               "memory.oom_control", "memory.use_hierarchy", "memory.kmem.limit_in_bytes",
               "memory.kmem.tcp.limit_in_bytes",
               "memory.min", "memory.low", "memory.high", "memory.max", "memory.swap.high",
               "memory.swap.max", "memory.zswap.max", "memory.oom.group"],
    "cpuset": ["cpuset.cpus", "cpuset.mems", "cpuset.memory_migrate", "cpuset.cpu_exclusive",
               "cpuset.mem_exclusive", "cpuset.mem_hardwall", "cpuset.memory_spread_page",
               "cpuset.memory_spread_slab", "cpuset.sched_load_balance",
               "cpuset.sched_relax_domain_level"],
    "blkio": ["blkio.weight"],
    "io": ["io.weight", "io.max"],
    "freezer": [],
    "perf_event": [],
    "net_cls": ["net_cls.classid"],
    "net_prio": ["net_prio.ifpriomap"],
    "pids": ["pids.max"],
    "devices": ["devices.list"],
    "hugetlb": ["hugetlb.*.limit_in_bytes", "hugetlb.*.rsvd.limit_in_bytes",
                "hugetlb.*.max", "hugetlb.*.rsvd.max"],
    "misc": ["misc.max"],
    "rdma": ["rdma.max"],
}
# Saved in every directory of a v1 hierarchy / of the v2 hierarchy.
GLOBAL_V1 = ["cgroup.clone_children", "notify_on_release", "cgroup.procs", "tasks"]
GLOBAL_V2 = ["cgroup.subtree_control", "cgroup.max.descendants", "cgroup.max.depth",
             "cgroup.freeze", "cgroup.type"]

# Written when the restore creates the directory, before any task enters it: the kernel
# refuses them later (cpuset needs cpus/mems before a task moves in; a v2 parent must
# enable controllers before its children can use them and while it holds no task).
EARLY = {"cpuset.cpus", "cpuset.mems", "devices.list", "memory.kmem.limit_in_bytes",
         "memory.swappiness", "memory.oom_control", "memory.use_hierarchy", "cgroup.type",
         "cgroup.subtree_control"}
# Of the early ones, what a directory that existed already still gets in the late pass
# (full, props): everything else early is refused by the kernel once tasks are inside.
LATE_TOO = {"cgroup.subtree_control"}
# Only their permissions are restored: their content is the tasks.
MEMBERSHIP = {"cgroup.procs", "tasks", "cgroup.threads"}
# Values that are a list of lines, written one line per write(2).
BY_LINE = {"io.max", "io.weight", "rdma.max", "misc.max", "devices.list", "net_prio.ifpriomap"}


class PropsConfig:
    """The property lists of this dump: the built-ins, changed by --cgroup-props and
    --cgroup-props-file (in that order), and the --cgroup-dump-controller filter."""

    def __init__(self, text: str | None = None, path: str | None = None, controllers=()):
        self.table = {name: list(props) for name, props in BUILTIN.items()}
        if text:
            self.apply(parse(text, "--cgroup-props"))
        if path:
            try:
                with open(path) as f:
                    data = f.read()
            except OSError as exc:
                raise CriuError(f"--cgroup-props-file {path}: {exc.strerror}") from None
            self.apply(parse(data, f"--cgroup-props-file {path}"))
        self.only = set(controllers)

    def apply(self, entries) -> None:
        for name, strategy, props in entries:
            if strategy == "merge" and name in self.table:
                self.table[name] += [p for p in props if p not in self.table[name]]
            else:
                self.table[name] = list(props)

    def props_of(self, controller: str) -> list[str]:
        return self.table.get(controller, [])

    def skip(self, name: str) -> bool:
        """--cgroup-dump-controller given and hierarchy `name` is not among them (cgroup2
        may be named "" or "unified")."""
        if not self.only:
            return False
        return name not in self.only and not (name == "" and "unified" in self.only)


def parse(text: str, where: str) -> list[tuple[str, str, list[str]]]:
    """CRIU's property description -> [(controller, strategy, [property])]."""
    tokens = _tokens(text, where)
    out, i = [], 0

    def expect(kind, what):
        nonlocal i
        if i >= len(tokens) or tokens[i][0] != kind:
            got = repr(tokens[i][1]) if i < len(tokens) else "the end"
            raise CriuError(f"{where}: expected {what}, found {got}")
        i += 1
        return tokens[i - 1][1]

    while i < len(tokens):
        name = expect("str", "a quoted controller name")
        expect(":", f"':' after \"{name}\"")
        expect("-", f"'- \"strategy\"' in \"{name}\"")
        if expect("str", f"\"strategy\" in \"{name}\"") != "strategy":
            raise CriuError(f"{where}: expected \"strategy\" in \"{name}\"")
        expect(":", f"':' after \"strategy\" in \"{name}\"")
        strategy = expect("str", f"a quoted strategy in \"{name}\"")
        if strategy not in ("merge", "replace"):
            raise CriuError(f"{where}: unknown strategy \"{strategy}\" in \"{name}\" "
                            f"(merge or replace)")
        expect("-", f"'- \"properties\"' in \"{name}\"")
        if expect("str", f"\"properties\" in \"{name}\"") != "properties":
            raise CriuError(f"{where}: expected \"properties\" in \"{name}\"")
        expect(":", f"':' after \"properties\" in \"{name}\"")
        expect("[", f"'[' to open the properties of \"{name}\"")
        props = []
        while i < len(tokens) and tokens[i][0] == "str":
            props.append(tokens[i][1])
            i += 1
            if i < len(tokens) and tokens[i][0] == ",":
                i += 1
        expect("]", f"']' to close the properties of \"{name}\"")
        for prop in props:
            if not prop or "/" in prop or prop in (".", ".."):
                raise CriuError(f"{where}: bad property name \"{prop}\" in \"{name}\"")
        out.append((name, strategy, props))
    return out


def _tokens(text: str, where: str) -> list[tuple[str, str]]:
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise CriuError(f"{where}: unterminated quoted string at offset {i}")
            out.append(("str", text[i + 1:end]))
            i = end + 1
        elif ch in ":-[],":
            out.append((ch, ch))
            i += 1
        else:
            raise CriuError(f"{where}: unexpected {ch!r} at offset {i}")
    return out
