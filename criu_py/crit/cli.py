# click commands of the image tool (`criu-py crit ...`, console script `crit-py`). Kept light:
# protobuf and the codec are imported only when a command runs.
import functools
import json
import os
import sys

import click

from criu_py.errors import CriuError


def _one_line_errors(fn):
    """Domain and OS errors become one line on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CriuError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # The reader went away (crit-py ... | head): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - damaged input must never give a traceback
            if os.environ.get("CRIU_PY_TRACEBACK") == "1":
                raise
            why = " ".join(str(exc).split())
            click.echo(f"Error: cannot read the input ({type(exc).__name__}"
                       f"{': ' + why if why else ''})", err=True)
            sys.exit(1)
    return wrapper


def _read_input(path):
    if path in (None, "-"):
        return "<stdin>", sys.stdin.buffer.read()
    from criu_py.errors import ImageError
    try:
        with open(path, "rb") as f:
            return path, f.read()
    except FileNotFoundError:
        raise ImageError(f"{path}: missing (no such file)") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None


def _raw_description(label, data) -> str:
    pages = os.sysconf("SC_PAGE_SIZE")
    n, rest = divmod(len(data), pages)
    tail = f" + {rest} bytes" if rest else ""
    return f"{label}: raw image of {len(data)} bytes ({n} pages of {pages}{tail})"


def _decode_doc(label, data, pretty):
    import criu_py.images as img
    from criu_py.crit import codec
    from criu_py.errors import ImageError
    name = os.path.basename(label)
    if img.kind_of(name) == img.RAW:
        raise ImageError(_raw_description(label, data) + "; raw images are not decoded to JSON")
    kind, entries = img.decode_bytes(name, data, label=label)
    return codec.image_to_json(kind, entries, pretty)


def _write_json(doc, out, pretty):
    text = json.dumps(doc, indent=4 if pretty else None)
    if out in (None, "-"):
        sys.stdout.write(text + "\n")
    else:
        with open(out, "w") as f:
            f.write(text)


@click.group(name="crit", context_settings={"help_option_names": ["-h", "--help"]},
             no_args_is_help=False)
def crit():
    """CRIU image tool: decode, encode, show and explore checkpoint images.

    JSON has the shape upstream crit prints ({"magic": "CORE", "entries": [...]}), so scripts
    written for crit work on its output."""


@crit.command()
@click.option("-i", "--in", "inp", default=None, help="Binary image (default: stdin).")
@click.option("-o", "--out", default=None, help="Where to write the JSON (default: stdout).")
@click.option("--pretty", is_flag=True,
              help="Indented, with addresses in hex and flags by name, as crit --pretty.")
@_one_line_errors
def decode(inp, out, pretty):
    """Convert a binary image to JSON."""
    label, data = _read_input(inp)
    _write_json(_decode_doc(label, data, pretty), out, pretty)


@crit.command()
@click.argument("image")
@_one_line_errors
def show(image):
    """Decode IMAGE with --pretty to stdout."""
    label, data = _read_input(image)
    _write_json(_decode_doc(label, data, True), None, True)


@crit.command()
@click.option("-i", "--in", "inp", default=None, help="JSON document (default: stdin).")
@click.option("-o", "--out", default=None, help="Binary image to write (default: stdout).")
@_one_line_errors
def encode(inp, out):
    """Convert JSON (as decode prints it, plain or pretty) back to a binary image."""
    from criu_py.crit import codec
    from criu_py.errors import ImageError
    label, text = _read_input(inp)
    try:
        doc = json.loads(text)
    except UnicodeDecodeError:
        raise ImageError(f"{label}: not JSON text (binary data; encode wants decode's JSON)") from None
    except json.JSONDecodeError as exc:
        raise ImageError(f"{label}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    data = codec.json_to_image(doc, label)
    if out in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(data)


@crit.command()
@click.argument("image")
@_one_line_errors
def info(image):
    """Print IMAGE's kind and entry count (raw images: their size)."""
    import criu_py.images as img
    label, data = _read_input(image)
    name = os.path.basename(label)
    if img.kind_of(name) == img.RAW:
        pages = os.sysconf("SC_PAGE_SIZE")
        doc = {"magic": "RAW", "size": len(data), "pages": len(data) // pages}
    else:
        kind, entries = img.decode_bytes(name, data, label=label)
        count = len(entries) - (1 if kind in img.HEADS else 0)
        doc = {"magic": kind.upper(), "count": count}
    click.echo(json.dumps(doc, indent=4))


@crit.command(name="x")
@click.argument("dir", type=click.Path(file_okay=False))
@click.argument("what", type=click.Choice(["ps", "fds", "mems", "rss"]))
@_one_line_errors
def explore(dir, what):
    """Explore a checkpoint: ps (process tree), fds (open files), mems (VMAs and dumped pages),
    rss (resident pages per process)."""
    from criu_py.crit.explore import EXPLORERS, Checkpoint
    for line in EXPLORERS[what](Checkpoint(dir)):
        click.echo(line)


@crit.command(name="make-lazy")
@click.argument("dir", type=click.Path(file_okay=False))
@click.argument("outdir", type=click.Path(file_okay=False))
@_one_line_errors
def make_lazy_cmd(dir, outdir):
    """Copy the checkpoint DIR to OUTDIR without the pages a lazy restore can fetch later.

    Pages of private anonymous VMAs (not stack, vdso, vvar, vsyscall, locked or hugetlb) leave
    pages-N.img and stay in the pagemap as PE_LAZY; every other image is copied unchanged. A
    restore from OUTDIR then starts quickly while a lazy-pages server serves the rest from DIR.
    DIR is never modified; an existing non-empty OUTDIR is refused."""
    from criu_py.crit.lazy import make_lazy
    rep = make_lazy(dir, outdir)
    ps = rep.page_size
    for pid, kept, lazy in rep.processes:
        click.echo(f"{pid}: {kept} pages kept, {lazy} pages made lazy")
    click.echo(f"total: {rep.kept} pages kept ({rep.kept * ps >> 10} KiB), {rep.lazy} lazy"
               f" ({rep.lazy * ps >> 10} KiB), {rep.copied_files} other files copied")


def register(group):
    group.add_command(crit)


def main(argv: list[str] | None = None):
    from criu_py.usage import last_resort, one_line_usage_errors
    one_line_usage_errors()
    last_resort(lambda: crit.main(args=sys.argv[1:] if argv is None else argv, prog_name="crit-py"))
