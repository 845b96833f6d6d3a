# click commands of the image tool (`criu-py crit ...`, console script `crit-py`).


def register(group):
    pass


def main():
    raise SystemExit("crit-py: not built yet")
