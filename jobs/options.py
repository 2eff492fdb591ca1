"""A command's options, declared once as pydantic dataclasses, as command-line flags and job-config keys.

Each field of a command's dataclasses (names unique across them) is one flag, `--field-name`, whose help
is the field's description plus its default or "(required)"; argparse only collects the strings given
(`default=SUPPRESS`, no `type`): a bool is `--x/--no-x`, a `Literal` shows its choices. `build` merges a
YAML job config (keys = field names) with the flags given, which override it, and validates the result
with pydantic in one place, so a bad value reads the same whichever way it came:

    mumic: error: --max-pixels: Input should be greater than or equal to 1 (got -1)
    mumic: error: config file job.yaml: max_pixels: Input should be greater than or equal to 1 (got -1)

Field metadata, `Field(..., json_schema_extra={"cli": {...}})`:
    {"positional": "METAVAR"}  a positional argument (a list field takes one or more values)
    {"required": True}         required by the command although the dataclass has a default
    {"hidden": True}           not an option (e.g. a test hook)
    {"aliases": ["--from"]}    more flags for the same option (a short name the contract promises); a
                               flag's own prefix would do only while no other flag shares it
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo

from .errors import EXIT_USAGE, UserError

MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, or a saved model folder (local or s3://)"
OUTPUT_HELP = "the retag output location: a folder or s3:// prefix holding the tables"
WORKDIR_HELP = "folder of the default mlflow.db (default: cwd)"


def model_field() -> Any:
    """The `--model` option every command that scores takes."""
    return Field(description=MODEL_HELP)


def output_field() -> Any:
    """The `--output` option of every command that writes or reads the tables."""
    return Field(description=OUTPUT_HELP)


def json_field(what: str) -> Any:
    """The `--json` switch: machine-readable output."""
    return Field(False, description=f"print {what} as JSON")


RESERVED = frozenset({"command", "config", "log_level", "help"})  # names the CLI itself uses


@dataclasses.dataclass(frozen=True)
class Option:
    """One field of a command's options, as the command line and a job config see it."""

    name: str  # the field name, which is also the job-config key
    schema: type  # the dataclass it belongs to
    info: FieldInfo

    @property
    def meta(self) -> dict[str, Any]:
        extra = self.info.json_schema_extra
        return dict(extra.get("cli") or {}) if isinstance(extra, dict) else {}

    @property
    def positional(self) -> bool:
        return "positional" in self.meta

    @property
    def flag(self) -> str:
        """How the command line names it: `--top-k`, or a positional's metavar."""
        return self.meta["positional"] if self.positional else "--" + self.name.replace("_", "-")

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other flags that set it (`cli.aliases`); a positional has none."""
        names = tuple(self.meta.get("aliases") or ())
        if names and self.positional:
            raise TypeError(f"positional option {self.name!r} cannot have flag aliases")
        if any(not n.startswith("--") for n in names):
            raise TypeError(f"aliases of option {self.name!r} must be --flags: {list(names)}")
        return names

    @property
    def required(self) -> bool:
        return self.info.is_required() or bool(self.meta.get("required"))

    @property
    def is_bool(self) -> bool:
        return self.info.annotation is bool

    @property
    def is_list(self) -> bool:
        return get_origin(self.info.annotation) is list

    @property
    def choices(self) -> tuple | None:
        return get_args(self.info.annotation) if get_origin(self.info.annotation) is Literal else None

    @property
    def default(self) -> Any:
        return None if self.info.is_required() else self.info.get_default(call_default_factory=True)

    @property
    def takes_text(self) -> bool:
        """A `str` or `str | None` field: what a flag gives it as is."""
        ann = self.info.annotation
        return ann is str or (get_origin(ann) in (Union, types.UnionType) and str in get_args(ann))

    @property
    def help(self) -> str:
        if self.required:
            suffix = "(required)"
        elif self.default is not None:
            suffix = f"(default: {self.default})"
        else:
            suffix = ""
        return " ".join(s for s in (self.info.description, suffix) if s).replace("%", "%%")


def fields(schemas: Sequence[type]) -> dict[str, Option]:
    """The options of a command's dataclasses, in declaration order (hidden fields left out)."""
    out: dict[str, Option] = {}
    for schema in schemas:
        for name, info in schema.__pydantic_fields__.items():
            option = Option(name, schema, info)
            if option.meta.get("hidden"):
                continue
            if name in out or name in RESERVED:
                raise TypeError(f"option {name!r} of {schema.__name__} is already taken")
            out[name] = option
    return out


def add_options(
    parser: argparse.ArgumentParser, options: Mapping[str, Option], groups: Mapping[str, Sequence[str]]
) -> None:
    """One argparse argument per option, in `groups` (title → field names) where listed."""
    group_of = {name: title for title, names in groups.items() for name in names}
    if set(group_of) - set(options):
        raise TypeError(f"groups name unknown options: {sorted(set(group_of) - set(options))}")
    made = {title: parser.add_argument_group(title) for title in groups}
    for option in options.values():
        target = made[group_of[option.name]] if option.name in group_of else parser
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": option.help}
        aliases = option.aliases  # checked for every option, positional or not
        if option.positional:
            target.add_argument(option.name, metavar=option.flag, nargs="*", **kwargs)
            continue
        if option.is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = option.choices
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}" if choices else option.name.upper()
            if option.is_list:
                kwargs["nargs"] = "+"
        target.add_argument(option.flag, *aliases, dest=option.name, **kwargs)


def load_job_config(path: str) -> dict[str, Any]:
    """A YAML mapping of option: value ('-' in a key read as '_')."""
    import yaml

    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode("utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}", EXIT_USAGE) from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value", EXIT_USAGE)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _as_given(option: Option, value: Any) -> Any:
    """A config value as the flag would give it: YAML reads `version: 3` or `run_date: 2026-01-02` as a
    number or a date, which a text option takes as the text written."""
    if option.takes_text and isinstance(value, int | float | dt.date) and not isinstance(value, bool):
        return value.isoformat() if isinstance(value, dt.date) else str(value)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return repr(value)


def _one_line(error: ValidationError, where: Callable[[str], str]) -> str:
    """The first problem: `OPTION: what is wrong (got VALUE)`, OPTION named by `where(field)`."""
    first = error.errors(include_url=False)[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message
    if repr(first["input"]) not in message:  # a validator's own message may show it already
        message += f" (got {_shown(first['input'])})"
    return f"{where(str(first['loc'][0]))}: {message}"


def build(
    schemas: Sequence[type], given: Mapping[str, Any], config: Mapping[str, Any], config_path: str | None
) -> tuple:
    """The command's dataclass instances from `config` overridden by the flags `given`, validated once.

    Every problem is a one-line `UserError` (exit 2) naming the option the way it was given.
    """
    options = fields(schemas)
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise UserError(f"config file {config_path}: unknown options {unknown}", EXIT_USAGE)
    values = {name: _as_given(options[name], value) for name, value in config.items()}
    values.update(given)
    for option in options.values():
        if option.required and option.name not in values:
            raise UserError(f"{option.flag} is required (or {option.name}: in --config)", EXIT_USAGE)

    def where(name: str) -> str:
        if name in given and name in options:
            return options[name].flag
        return f"config file {config_path}: {name}" if name in config else name

    instances = []
    for schema in schemas:
        mine = {k: v for k, v in values.items() if k in options and options[k].schema is schema}
        try:
            instances.append(schema(**mine))
        except ValidationError as e:
            raise UserError(_one_line(e, where), EXIT_USAGE) from None
    return tuple(instances)
