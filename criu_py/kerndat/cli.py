# click commands of the kerndat feature: `criu-py kdat` (show, save or drop the kernel
# facts cache) and `criu-py check` (what is missing and what that turns off). Registered
# on the main group by criu_py/cli.py; light: the work happens in functions imported late.
import click

from criu_py.options import KDAT_PATH_HELP


def _kdat_options(fn):
    fn = click.option("--kdat-path", "kdat_path", default=None, metavar="PATH", help=KDAT_PATH_HELP)(fn)
    fn = click.option("-o", "--log-file", "log_file", default=None,
                      help="Log file ('-' for stderr).")(fn)
    fn = click.option("-v", "--verbosity", "verbosity", type=click.IntRange(0, 4), default=2,
                      show_default=True, help="Log level: -v0 silent .. -v4 debug.")(fn)
    return fn


def _run(opts, action):
    from criu_py.commands import run_command
    opts.setdefault("work_dir", None)
    run_command(opts, action)


def register(group):
    @group.command("kdat")
    @click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
    @click.option("--save", is_flag=True, help="Probe now and write the cache.")
    @click.option("--drop", is_flag=True, help="Remove the cache file (fine when absent).")
    @_kdat_options
    def kdat_command(**opts):
        """Show the kernel facts criu-py works with, and where they came from."""
        _run(opts, kdat_action)

    @group.command("check")
    @click.option("--feature", "features", multiple=True, metavar="NAME",
                  help="Check only this feature ('list' names them). Repeatable.")
    @click.option("--all", "check_all", is_flag=True, help="Also check optional features.")
    @_kdat_options
    def check_command(**opts):
        """Check that this kernel and these privileges allow checkpoint/restore.
        Exit status: 0 all is well, 1 something dump/restore need is missing,
        2 only optional features are missing."""
        _run(opts, check_action)


def kdat_action(opts) -> int:
    from criu_py import kerndat
    from criu_py.errors import CriuError
    if opts["save"] and opts["drop"]:
        raise CriuError("--save and --drop exclude each other")
    if opts["drop"]:
        path, existed = kerndat.drop(opts["kdat_path"])
        if path is None:
            click.echo("No kdat cache location; nothing to drop.")
        else:
            click.echo(f"Removed {path}." if existed else f"No {path}; nothing to drop.")
        return 0
    if opts["save"]:
        facts = kerndat.probe()
        facts.cache_path = kerndat.save(facts, opts["kdat_path"])
    else:
        facts = kerndat.load(opts["kdat_path"])
    if opts["as_json"]:
        import json
        click.echo(json.dumps(_as_json(facts), indent=2))
    else:
        click.echo(format_table(facts))
    return 0


def _as_json(facts) -> dict:
    return {"source": facts.source, "cache_path": facts.cache_path,
            "seconds": facts.load_seconds, "facts": facts.as_dict(),
            "caller": facts.caller.as_dict()}


def _where(facts) -> str:
    ms = facts.load_seconds * 1e3
    if facts.source == "cache":
        return f"Loaded from the cache {facts.cache_path} in {ms:.2f} ms"
    saved = f", saved to {facts.cache_path}" if facts.cache_path else ", no cache"
    return f"Probed the kernel in {ms:.2f} ms{saved}"


def format_table(facts) -> str:
    from criu_py.kerndat.facts import BOOL, FACTS, HEX, LIST_KINDS
    lines = [_where(facts) + ".",
             f"Kernel {facts.kernel_release}, boot {facts.boot_id}, criu-py {facts.criu_py_version}",
             ""]
    width = max(len(name) for name, _, _ in FACTS)
    for name, kind, meaning in FACTS:
        value = getattr(facts, name)
        if kind in LIST_KINDS:
            lines.append(f"  {name:<{width}}  ({len(value)})  {meaning}")
            for item in value:
                lines.append(f"  {'':<{width}}    " + _item(item))
            continue
        if kind == HEX:
            text = f"{value:#x}"
        elif kind == BOOL:
            text = "yes" if value else "no"
        else:
            text = str(value) if value != "" else "-"
        lines.append(f"  {name:<{width}}  {text:<18}  {meaning}")
    lines.append(f"  {'uffd_wp_async':<{width}}  {'yes' if facts.uffd_wp_async else 'no':<18}  "
                 "UFFD_FEATURE_WP_ASYNC offered")
    lines.append(f"  {'mem_tracking':<{width}}  {facts.mem_tracking or 'none':<18}  "
                 "how pre-dump finds written pages")
    for probe, why in sorted(facts.probe_errors.items()):
        lines.append(f"  probe {probe} failed: {why}")
    c = facts.caller
    lines += ["", "Caller (probed every run):",
              f"  euid {c.euid}, egid {c.egid}, CapEff {c.cap_eff:#x}"
              + (f", missing {', '.join(c.missing_caps)}" if c.missing_caps else ""),
              f"  seccomp {c.seccomp}, no_new_privs {'yes' if c.no_new_privs else 'no'}",
              "  cgroups: " + "; ".join(f"{h}:{ctl}:{path}" for h, ctl, path in c.cgroups),
              "  namespaces: " + " ".join(f"{n}:{ino}" for n, ino in c.namespaces.items())]
    return "\n".join(lines)


def _item(item) -> str:
    if hasattr(item, "bit"):
        return f"bit {item.bit}: {item.size} bytes at {item.offset}"
    if hasattr(item, "controllers"):
        return f"{item.controllers} at {item.mountpoint}"
    if hasattr(item, "size"):
        sign = "-" if item.offset < 0 else "+"
        return f"{item.name} {item.size} bytes at [vdso]{sign}{abs(item.offset):#x}"
    return f"{item.name} at {item.offset:#x}"


def check_action(opts) -> int:
    from criu_py import kerndat
    from criu_py.errors import CriuError
    from criu_py.kerndat import check
    names = list(opts["features"]) or None
    if names == ["list"]:
        for feature in check.FEATURES:
            click.echo(f"{feature.name}{'' if feature.default else ' (--all)'}")
        return 0
    unknown = [n for n in names or () if n not in check.BY_NAME]
    if unknown:
        raise CriuError(f"unknown feature {unknown[0]!r} (criu-py check --feature list)")
    facts = kerndat.load(opts["kdat_path"])
    verdicts = check.evaluate(facts, names, opts["check_all"])
    for v in verdicts:
        if v.ok and names:
            detail = check.DETAILS.get(v.feature.name)
            click.echo(f"{v.feature.name} is supported" + (f": {detail(facts)}" if detail else ""))
        elif not v.ok:
            click.echo(f"{v.feature.severity}: {v.feature.name}: {v.text}")
    status = check.exit_status(verdicts)
    if not names and facts.mem_tracking:
        click.echo(f"Memory tracking (pre-dump, --track-mem): {facts.mem_tracking}")
    if status == 0 and not names:
        click.echo("Looks good.")
    elif status == 2 and not names:
        click.echo("Dump and restore work, but the features above are missing.")
    elif status == 1 and not names:
        click.echo("Checkpoint/restore cannot work here: see the errors above.")
    return status
