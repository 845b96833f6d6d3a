# Facts about the process running criu-py (credentials, capabilities, cgroup, namespaces).
# They change from one run to the next, so they are read in every run, never cached;
# CallerFacts reads each group the first time it is used.
import os

from criu_py.kerndat import procfs
from criu_py.kerndat.facts import CallerFacts


def read_credentials() -> dict:
    status = procfs.read_status()
    return {"euid": os.geteuid(), "egid": os.getegid(),
            "cap_eff": int(status.get("CapEff", "0"), 16),
            "cap_prm": int(status.get("CapPrm", "0"), 16),
            "cap_bnd": int(status.get("CapBnd", "0"), 16),
            "no_new_privs": status.get("NoNewPrivs", "0") == "1",
            "seccomp": int(status.get("Seccomp", "0"))}


def read_cgroups() -> dict:
    return {"cgroups": tuple(tuple(line) for line in procfs.read_cgroup())}


def read_namespaces() -> dict:
    return {"namespaces": procfs.read_namespaces()}


# CallerFacts attribute -> the reader that fills it (and its group).
GROUPS = {"cgroups": read_cgroups, "namespaces": read_namespaces}


def read_group(name: str) -> dict:
    return GROUPS.get(name, read_credentials)()


def probe_caller(eager: bool = False) -> CallerFacts:
    """The caller facts of this run; `eager` reads every group now instead of on use."""
    facts = CallerFacts()
    if eager:
        for reader in (read_credentials, read_cgroups, read_namespaces):
            for name, value in reader().items():
                setattr(facts, name, value)
    return facts
