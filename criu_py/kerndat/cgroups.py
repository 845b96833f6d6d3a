# The cgroup layout fact (v1 hierarchies, the cgroup2 mount). Apart from the other probes
# because it depends on the mount namespace: a cached load re-reads it, cheaply and without
# cffi, when the caller's mount namespace differs from the one it was probed in.
from criu_py.kerndat import procfs
from criu_py.kerndat.facts import CgroupMount

# cgroup v1 super options that are not controllers.
CGROUP_V1_FLAGS = {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode",
                   "favordynmods", "nsdelegate", "none"}


def probe_cgroup_layout() -> dict:
    """cgroup v1 hierarchies and the cgroup2 mount of our mount namespace (first mount of
    each hierarchy wins; its super options name the controllers)."""
    v1, seen, v2 = [], set(), ""
    for mnt in procfs.read_mountinfo():
        if mnt.fstype == "cgroup2" and not v2:
            v2 = mnt.mountpoint
        elif mnt.fstype == "cgroup":
            controllers = ",".join(opt for opt in mnt.super_options.split(",")
                                   if opt.startswith("name=") or
                                   ("=" not in opt and opt not in CGROUP_V1_FLAGS))
            if controllers not in seen:
                seen.add(controllers)
                v1.append(CgroupMount(controllers, mnt.mountpoint))
    return {"cgroup_v1": tuple(v1), "cgroup2_mount": v2,
            "cgroup_mnt_ns": procfs.read_namespaces().get("mnt", 0),
            "cgroup2_controllers": _first_line(v2 + "/cgroup.controllers") if v2 else "",
            "cgroup_controllers": " ".join(_kernel_controllers())}


def _first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _kernel_controllers() -> list[str]:
    """/proc/cgroups: name, hierarchy, number of cgroups, enabled."""
    out = []
    try:
        with open("/proc/cgroups") as f:
            for line in f:
                fields = line.split()
                if fields and not line.startswith("#") and fields[-1] == "1":
                    out.append(fields[0])
    except OSError:
        pass
    return out
