"""Console commands: a parser and a dispatch table over `vlm.pipeline`, all driven by a `RunConfig`.

    pvlm-make-shards          --config configs/tiny/make_shards.yaml   shards: synthetic / folder / coco / karpathy / nocaps / img2dataset
    pvlm-precompute-features  --config ...   the frozen tower's patch features (fp16) as new shards
    pvlm-train                --config ...   train resampler + projection + LoRA (torchrun for N processes)
    pvlm-eval                 --config ...   COCO protocol: CIDEr / BLEU / METEOR, COCO results files, the no-image ablation
    pvlm-caption              --config ... --images a.png photos/ 'more/*.jpg' [--batch-size 32] [--output captions.jsonl]
    pvlm-demo                 [--config ...]   the embedded default (shipped as vlm/configs/default.yaml), offline
    python -m vlm.cli <command> ...          the same, e.g. under torchrun

Every command reads ``--config file.yaml`` plus ``section.field=value`` overrides through
`resampler.config.parse_cli`; what parse_cli does not cover lives here: a command's own options
(``--adapter``, ``--images``), the demo's default config, and a ``--help`` that lists the config
fields the command reads, generated from the dataclasses (type, default and the field's comment).

The console scripts add what a person at a terminal needs (`run` itself stays plain Python that
raises): every field is checked before any work starts (``train.device`` included); an error
prints one line ``pvlm-<command>: error: ...`` and exits 2 when the command line or config is wrong,
1 when the run fails (``--debug`` or ``PVLM_DEBUG=1`` prints the traceback too); a command holds the
exclusive lock of its ``output_dir`` (`vlm.lock`) from start to end, except ``pvlm-eval`` while a
training command holds it (it then says which adapter step it scores) and ``pvlm-caption`` (read
only); and the ``vlm`` loggers' INFO lines (per-pass skip and conversion counts of the data reader,
the base models an adapter's manifest names) are printed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import logging
import os
import sys
import textwrap
import tokenize
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from resampler.config import parse_cli

from . import pipeline
from .distributed import print0, rank, world_size
from .io import describe_os_error
from .lock import DirectoryLocked, try_lock
from .pipeline.config import RunConfig, default_config_file
from .threads import set_threads
from .training.config import resolve_device

__all__ = ["COMMANDS", "Command", "parse", "run", "main", "fields_help"] + [
    f"main_{name}" for name in ("make_shards", "precompute_features", "train", "eval", "caption", "demo")
]

_ADAPTER = (("--adapter",), {"default": None, "help": "adapter directory (default: <output_dir>/adapter)"})
_IMAGES = (("--images",), {"nargs": "+", "required": True, "help": "image files, folders or globs to caption"})
_BATCH = (("--batch-size",), {"type": int, "default": None, "help": "images per batch (default: eval.batch_size)"})
_OUTPUT = (("--output",), {"default": None, "help": 'also write {"image", "caption"} JSON lines to this file'})
_TOP = ("output_dir", "threads")  # every command reads these


@dataclasses.dataclass(frozen=True)
class Command:
    """One console command: the pipeline function it runs and what it reads."""

    run: Callable[..., Any]  # run(cfg, **options)
    description: str
    reads: tuple[str, ...]  # RunConfig sections, sub-sections or fields, e.g. "train", "model.vision", "seed"
    options: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()  # argparse (flags, kwargs) of its own
    default_config: bool = False  # --config defaults to the shipped embedded default


_PREPARE = ("make_synthetic", "synthetic", "standin", "shards.output_dir", "features")
COMMANDS: dict[str, Command] = {
    "make-shards": Command(
        pipeline.make_shards,
        "Write webdataset shards: the synthetic world, a folder + captions file, COCO / Karpathy / NoCaps, img2dataset.",
        (*_TOP, "shards", "synthetic"),
    ),
    "precompute-features": Command(
        pipeline.cache_features,
        "Cache the frozen vision tower's patch features (fp16) as new shards.",
        (*_TOP, *_PREPARE, "data", "model.vision"),
    ),
    "train": Command(
        pipeline.train_adapter,
        "Train resampler + projection + LoRA on caption shards (torchrun for N processes).",
        (*_TOP, "seed", *_PREPARE, "data", "model", "train"),
    ),
    "eval": Command(
        pipeline.evaluate_adapter,
        "Evaluate a trained adapter in the COCO protocol (or score a COCO results file): CIDEr, BLEU, METEOR.",
        (*_TOP, *_PREPARE, "data", "model.vision", "eval"),
        options=(_ADAPTER,),
    ),
    "caption": Command(
        pipeline.caption_files,
        "Caption image files, folders or globs with a trained adapter (bad files are skipped and counted).",
        (
            *_TOP,
            "standin.enabled",
            "standin.dir",
            "eval.max_new_tokens",
            "eval.batch_size",
            "eval.progress",
            "data.max_image_pixels",
        ),
        options=(_ADAPTER, _IMAGES, _BATCH, _OUTPUT),
    ),
    "demo": Command(
        pipeline.demo,
        "The embedded default, offline: synthetic world, stand-in backbones, train, evaluate.",
        (*_TOP, "seed", *_PREPARE, "data", "model", "train", "eval"),
        default_config=True,
    ),
}


# ----------------------------------------------------------------------------------------------
# Parsing and dispatch


def parse(name: str, argv: list[str] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """``argv`` of command ``name`` -> (the RunConfig, the command's own options as keyword arguments)."""
    command = COMMANDS[name]
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _help_parser(name, command).print_help()
        raise SystemExit(0)
    own = argparse.ArgumentParser(prog=f"pvlm-{name}", add_help=False, allow_abbrev=False)
    for flags, kwargs in command.options:
        own.add_argument(*flags, **kwargs)
    options, rest = own.parse_known_args(argv)
    if command.default_config and not any(a == "--config" or a.startswith("--config=") for a in rest):
        with default_config_file() as path:
            cfg = parse_cli(RunConfig, ["--config", str(path), *rest], command.description)
    else:
        cfg = parse_cli(RunConfig, rest, command.description)
    set_threads(cfg.threads)
    if any(r == "train" or r.startswith("train.") for r in command.reads):
        resolve_device(cfg.train.device)  # a device this machine lacks is a config error, before any work
    return cfg, vars(options)


def run(name: str, argv: list[str] | None = None) -> Any:
    """Parse ``argv`` for command ``name`` and run it under its ``output_dir`` lock; returns what the
    pipeline step returns (errors raise: `main` and the console scripts turn them into one line)."""
    cfg, options = parse(name, argv)
    with _command_lock(name, cfg, options):
        return COMMANDS[name].run(cfg, **options)


def main(argv: list[str] | None = None) -> None:
    """``python -m vlm.cli <command> [--config file.yaml] [section.field=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m vlm.cli {{{','.join(COMMANDS)}}} [--config file.yaml] [overrides]  (<command> --help)"
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] in (["-h"], ["--help"]):
            print(usage)
            raise SystemExit(0)
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    _guarded(argv[0], argv[1:])


DEBUG_ENV = "PVLM_DEBUG"
_TRAINING = ("train", "demo")  # commands whose output_dir an evaluation may read while they run


def _guarded(name: str, argv: list[str] | None) -> Any:
    """`run` for a terminal: one clear line and exit 2 (usage) or 1 (failure) instead of a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _console_logging()
    try:
        cfg, options = parse(name, argv)
    except Exception as err:
        _fail(name, err, 2, debug)
    try:
        with _command_lock(name, cfg, options):
            return COMMANDS[name].run(cfg, **options)
    except Exception as err:
        _fail(name, err, 1, debug)


def _fail(name: str, err: BaseException, code: int, debug: bool) -> typing.NoReturn:
    if debug:
        traceback.print_exception(err)
    hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 for the traceback)"
    print(f"pvlm-{name}: error: {describe_error(err)}{hint}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe_error(err: BaseException) -> str:
    """An exception as one line: OSErrors as ``path: cause (ERRNO)``, others by their message, with
    the type in front unless it is one of the expected kinds (bad input, I/O, a locked directory, a
    run stopped by non-finite steps)."""
    if isinstance(err, OSError) and err.errno is not None:
        text = describe_os_error(err)
    else:
        text = " ".join(str(err).split()) or "(no message)"
    return text if isinstance(err, _EXPECTED) else f"{type(err).__name__}: {text}"


_EXPECTED = (ValueError, OSError, DirectoryLocked, FloatingPointError)  # their messages say it all


@contextlib.contextmanager
def _command_lock(name: str, cfg: RunConfig, options: dict[str, Any]) -> Iterator[None]:
    """The output_dir lock for the whole command (see the module docstring)."""
    if name == "caption":
        yield
        return
    fd, refused = try_lock(cfg.out, name)
    if name == "eval":
        adapter = Path(options.get("adapter") or cfg.out / "adapter")
        if refused is not None and refused.command not in _TRAINING:
            raise refused
        busy = f"{cfg.out} is being trained by pid {refused.pid}; " if refused is not None else ""
        print0(f"pvlm-eval: {busy}scoring {_adapter_step(adapter)}")
    elif refused is not None:
        raise refused
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _adapter_step(adapter: Path) -> str:
    from .checkpoint import read_manifest

    try:
        step = read_manifest(adapter).get("step")
    except (OSError, ValueError):
        return f"{adapter} (not a readable adapter yet)"
    return f"the adapter saved at step {step} ({adapter})" if step is not None else f"{adapter}"


class _ConsoleHandler(logging.StreamHandler):
    """INFO lines of the ``vlm`` loggers on the current ``sys.stdout`` (looked up at each record)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[rank {rank()}] " if world_size() > 1 else ""
        return prefix + record.getMessage()


def _console_logging() -> None:
    logger = logging.getLogger("vlm")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def _console_script(name: str) -> Callable[[list[str] | None], None]:
    """The ``pvlm-<name>`` entry point (pyproject's [project.scripts]): runs the command, returns None."""

    def entry(argv: list[str] | None = None) -> None:
        _guarded(name, argv)

    entry.__name__ = entry.__qualname__ = f"main_{name.replace('-', '_')}"
    entry.__doc__ = f"``pvlm-{name}``: {COMMANDS[name].description}"
    return entry


main_make_shards = _console_script("make-shards")
main_precompute_features = _console_script("precompute-features")
main_train = _console_script("train")
main_eval = _console_script("eval")
main_caption = _console_script("caption")
main_demo = _console_script("demo")


# ----------------------------------------------------------------------------------------------
# --help: the config fields a command reads, from the dataclasses


def _help_parser(name: str, command: Command) -> argparse.ArgumentParser:
    default = " (default: the shipped embedded default)" if command.default_config else ""
    parser = argparse.ArgumentParser(
        prog=f"pvlm-{name}",
        description=command.description,
        epilog=fields_help(command.reads),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help=f"RunConfig YAML (see configs/){default}")
    for flags, kwargs in command.options:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (or {DEBUG_ENV}=1)")
    parser.add_argument("overrides", nargs="*", help="section.field=value (value parsed as YAML), e.g. train.lr=1e-3")
    return parser


def fields_help(reads: tuple[str, ...], root: type = RunConfig) -> str:
    """The listing ``--help`` prints: every field under ``reads`` with its type, default and comment."""
    lines = ["config fields this command reads (set them in the YAML or as section.field=value):"]
    for path in reads:
        cls, field = _resolve(root, path)
        if field is None:
            lines += _section_lines(cls, path)
        else:
            lines += _section_lines(cls, path.rpartition(".")[0], only=field)
    return "\n".join(lines)


def _resolve(root: type, path: str) -> tuple[type, str | None]:
    """``"model.vision"`` -> (VisionConfig, None); ``"shards.output_dir"`` -> (ShardsConfig, "output_dir")."""
    cls = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            raise KeyError(f"{cls.__name__} has no field {part!r} (in {path!r})")
        if not dataclasses.is_dataclass(hint):
            if i != len(parts) - 1:
                raise KeyError(f"{path!r}: {part!r} is not a section")
            return cls, part
        cls = hint
    return cls, None


def _section_lines(cls: type, prefix: str, only: str | None = None) -> list[str]:
    """A section's own fields first, then each sub-section; ``only`` picks one field."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    header = textwrap.fill(f"{prefix}: {_summary(cls.__doc__)}", 110, initial_indent="  ", subsequent_indent="      ")
    lines = [] if only is not None else [header]
    nested = []
    for f in dataclasses.fields(cls):
        if not f.init or (only is not None and f.name != only):
            continue
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((hints[f.name], name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{name}: {_type_name(hints[f.name])} = {default!r}"
        if f.name in comments:
            text += f"  -- {comments[f.name]}"
        lines.append(textwrap.fill(text, 110, initial_indent="    ", subsequent_indent="        "))
    for sub, name in nested:
        lines += _section_lines(sub, name)
    return lines


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


@cache
def _field_comments(cls: type) -> dict[str, str]:
    """A dataclass's field comments from its source: the ``# ...`` after a field, else the lines above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    by_line = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    code_lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = by_line.get(node.end_lineno)
            above, line = [], node.lineno - 1
            while line in by_line and code_lines[line - 1].lstrip().startswith("#"):
                above.insert(0, by_line[line])
                line -= 1
            text = after if after else " ".join(above)
            if text:
                out[node.target.id] = text
    return out


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


if __name__ == "__main__":  # python -m vlm.cli <command> ...
    main()
