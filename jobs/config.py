"""Every config key, its type, default and meaning: ``python -m jobs.config [SECTION ...]``.

The meanings are declared with each field in pipeline/config.py (``key(default, meaning, ...)``),
the one place the config is declared; this reads them from there, so the list cannot drift from the
code. Override any key with ``--set section.key=value`` on ``jobs.train``, or in an experiment YAML
under ``jobs/configs/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from jobs.cli import UsageError
from pipeline import config as config_lib


def describe(sections: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """(section.key, type, default, meaning) for every key, in declaration order."""
    rows, default = [], config_lib.Config()
    for section in dataclasses.fields(config_lib.Config):
        if sections and section.name not in sections:
            continue
        cls = typing.get_type_hints(config_lib.Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(default, section.name), f.name)
            rows.append((f"{section.name}.{f.name}", getattr(hints[f.name], "__name__", str(hints[f.name])),
                         repr(value), f.metadata.get("meaning", "")))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", help="only these sections (model, data, optim, schedule, run, tracking)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    known = [f.name for f in dataclasses.fields(config_lib.Config)]
    unknown = [s for s in args.sections if s not in known]
    if unknown:
        raise UsageError(f"unknown section {unknown[0]!r}; the sections are {', '.join(known)}")
    rows = describe(args.sections)
    width = max(len(k) for k, *_ in rows)
    for key, kind, value, meaning in rows:
        print(f"{key:<{width}}  {kind:<5}  {value:<16}  {meaning}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
