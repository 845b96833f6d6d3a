# Compiles the C workloads (tests/workloads/*.c) with gcc; shared by the tests'
# conftest, bench/dump_restore.py and tools/demo.py so all three run the same programs.
import subprocess
from pathlib import Path

WORKLOADS = Path(__file__).resolve().parent


def cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return flag in line.split(":", 1)[1].split()
    return False


HAS_AVX512 = cpu_has("avx512f")

# extra gcc flags per workload (default: none)
BUILD_FLAGS = {
    "vecregs": ["-mavx512f", "-DUSE_ZMM"] if HAS_AVX512 else ["-mavx"],
    "unsupported": ["-pthread"],
    "threads": ["-pthread"],
    "creds": ["-pthread"],
    "spawner": ["-pthread"],
    "rewriter": ["-pthread"],
    "timers": ["-pthread"],
}


def build_workloads(out_dir: Path, names: list[str] | None = None) -> dict:
    """Compile tests/workloads/NAME.c (all, or `names`) into out_dir; return {name: path}."""
    bins = {}
    for src in sorted(WORKLOADS.glob("*.c")):
        if names is not None and src.stem not in names:
            continue
        binary = Path(out_dir) / src.stem
        cmd = ["gcc", "-O2", "-Wall", "-g", *BUILD_FLAGS.get(src.stem, []), "-o", str(binary), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building {src.name} failed:\n{res.stderr}")
        bins[src.stem] = binary
    return bins
