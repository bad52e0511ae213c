"""What every command-line entry point shares: bad input ends as ONE line naming the cause, exit status 2.

``python -m pretrain`` and ``python -m data_pipeline`` are Hydra apps. Hydra reports its own errors
(unknown key, wrong type, unknown preset, bad override syntax) over several lines with exit status 1, and
an override it accepts with ``+`` (``+trainer.foo=1``, as its own message suggests) fails later in
``OmegaConf.to_object`` with an ``AttributeError`` traceback. :func:`one_line_errors` and :func:`to_object`
turn both into ``config error: ...`` lines with exit status 2, like the project's own ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable, NoReturn

from common.errors import ConfigError, DataError

BAD_INPUT = 2
"""Exit status of every ``config error:`` / ``data error:`` / ``conversion error:`` line."""

# Lines of Hydra's and OmegaConf's messages that only repeat what the first line says, or advise the
# `+key=` form, which a typed schema refuses too.
_NOISE = ("full_key:", "reference_type=", "object_type=", "To append to your config", "See https://")


def exit_bad_input(prefix: str, exc: BaseException | str) -> NoReturn:
    """Print ``<prefix>: <message on one line>`` to stderr and exit with status 2."""
    print(f"{prefix}: {one_line(exc)}", file=sys.stderr)
    sys.exit(BAD_INPUT)


def one_line(exc: BaseException | str) -> str:
    """A (Hydra, OmegaConf or own) error message on one line; an OmegaConf cause is appended once."""
    texts = [str(exc)]
    cause = getattr(exc, "__cause__", None)
    if cause is not None and str(cause).splitlines() and str(cause).splitlines()[0] not in texts[0]:
        texts.append(str(cause))
    parts = []
    for text in texts:
        text = text.split("Config search path:")[0]  # MissingConfigException: Hydra's search path follows
        items: list[str] = []  # tab-indented list items (e.g. the presets of a config group)
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(_NOISE):
                continue
            if raw.startswith("\t"):
                items.append(line)
                continue
            if items:
                parts[-1] += " " + ", ".join(items)
                items = []
            parts.append(line)
        if items and parts:
            parts[-1] += " " + ", ".join(items)
    return "; ".join(p.rstrip(".") for p in parts) or type(exc).__name__


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``@hydra.main`` function (put it above ``@hydra.main``): Hydra's config-composition errors,
    OmegaConf errors and a ``ConfigError``/``DataError`` that escapes the task (a sweep re-raises them for its
    launcher) each print one line and exit 2. Other exceptions keep their full traceback (exit 1)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        previous = os.environ.get("HYDRA_FULL_ERROR")
        # Hydra has no hook for its error report: with this set it re-raises instead of printing and exiting 1.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return main(*args, **kwargs)
        except DataError as exc:
            exit_bad_input("data error", exc)
        except (HydraException, OmegaConfBaseException, ConfigError) as exc:
            exit_bad_input("config error", exc)
        finally:
            if previous is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = previous

    return wrapped


def to_object(cfg) -> Any:
    """``OmegaConf.to_object`` of a composed config, refusing first any key its dataclass schema does not
    have (``+section.key=...`` adds one; the dataclass would then fail with an ``AttributeError``)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def check(node, path: str) -> None:
        if not isinstance(node, DictConfig):
            return
        schema = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            where = f"{path}.{key}" if path else str(key)
            if known is not None and key not in known:
                raise ConfigError(f"{where} is not a setting: {schema.__name__} has no field {key!r} "
                                  f"(check the spelling; `+{where}=...` cannot add it either)")
            if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
                check(node._get_node(key), where)

    check(cfg, "")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a mandatory value left at ??? (raised in the task: Hydra
        raise ConfigError(one_line(e)) from e  # would print its "Error executing job" line first)
