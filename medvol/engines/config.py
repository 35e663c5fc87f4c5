"""Helpers that bundle configs call: required folders and files, one-line configuration errors, and the
check of command-line overrides.

Datalists, splits and labeled subsets live in :mod:`medvol.io` (``medvol.io.image_datalist``, ...).

``python -m monai.bundle run`` prints a long chained traceback for any error raised while a config resolves
(MONAI wraps it in "Failed to instantiate ..." and ignite adds its own frames). A bundle's ``initialize`` list
starts with :func:`install_error_hook`, after which a :class:`~medvol.errors.MedvolError` anywhere in the chain
(missing dataset folder, empty folder, label without image, unknown backbone, bad split file, unreadable
checkpoint) is reported as one ``medvol: ...`` line and exit code 2, and log records of it lose their traceback
(``MEDVOL_DEBUG=1`` keeps the tracebacks).

MONAI adds any ``--key value`` it does not know to the config, so ``--max_epoch 1`` (for ``max_epochs``) would
train the default 100 epochs without a word. :func:`install_error_hook` therefore also checks the overrides of
the ``python -m monai.bundle run`` command line it runs under against the config files named there
(:func:`check_overrides`): an unknown key is an error that suggests the closest known key. New keys are
allowed with ``--allow_new_keys true``.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from medvol.errors import ConfigError, MedvolError, find_error

__all__ = ["install_error_hook", "require_dir", "require_file", "check_overrides", "config_ids",
           "bundle_run_overrides", "check_command_line_overrides", "ALLOW_NEW_KEYS", "RUN_ARGUMENTS"]

ALLOW_NEW_KEYS = "allow_new_keys"
# arguments of monai.bundle's run / run_workflow / ConfigWorkflow: not config ids
RUN_ARGUMENTS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                           "args_file", "workflow_type", "workflow_name", "properties_path", "bundle_root",
                           ALLOW_NEW_KEYS})
_ARGV_CHECKED = False


def install_error_hook() -> bool:
    """Report medvol errors as one line (exit code 2) instead of a traceback; other errors are untouched.

    Under ``python -m monai.bundle run`` it then checks the command line's overrides against the config
    (:func:`check_command_line_overrides`), so a typo'd key stops the run before anything is built.

    Returns True so it can sit in a config's ``initialize`` list.

    Raises:
        ConfigError: an override key that is not in the config (the closest known key is suggested).
    """
    _install_hook()
    check_command_line_overrides()
    return True


def _install_hook() -> None:
    previous = sys.excepthook
    if getattr(previous, "_medvol_hook", False):
        return  # already installed (train.json and multi_gpu_train.json both call it)

    def hook(exc_type, exc, tb):
        err = find_error(exc, MedvolError)
        if err is None:
            return previous(exc_type, exc, tb)
        if _debug():
            previous(exc_type, exc, tb)
        print(f"medvol: error: {err}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # skip interpreter teardown messages from half-built ignite/torch objects

    hook._medvol_hook = True
    sys.excepthook = hook
    if not _debug():
        _drop_logged_tracebacks()


def _debug() -> bool:
    return os.environ.get("MEDVOL_DEBUG", "") not in ("", "0")


def _drop_logged_tracebacks() -> None:
    """Log records of a medvol error keep their message but lose the traceback.

    MONAI's ``StatsHandler`` logs every exception that ends a run with ``logger.exception`` (a traceback of
    ~30 lines) before the error reaches the hook; for a medvol error the hook's one line says it all.
    ``MEDVOL_DEBUG=1`` keeps the tracebacks.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_medvol_factory", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None and find_error(record.exc_info[1], MedvolError):
            record.exc_info, record.exc_text = None, None
        return record

    factory._medvol_factory = True
    logging.setLogRecordFactory(factory)


def config_ids(config, prefix: str = "") -> set[str]:
    """Every id of a (nested) config as ``monai.bundle`` names it on the command line: ``a``, ``a#b``, ``a#0``."""
    ids: set[str] = set()
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        ids.add(name)
        ids |= config_ids(value, name)
    return ids


def _normalize(key: str) -> str:
    return str(key).replace("::", "#")  # MONAI accepts both separators


def check_overrides(config: Mapping, overrides: Iterable[str], allow_new_keys: bool = False) -> None:
    """Check override ids against a config; an unknown id is a :class:`ConfigError` naming the closest known one.

    Args:
        config: the merged config (e.g. ``ConfigParser.load_config_files([...])``).
        overrides: the override ids (``max_epochs``, ``train#trainer#max_epochs``, ``method::queue_size``).
        allow_new_keys: accept ids that are not in the config (they are added to it, as MONAI does).

    Raises:
        ConfigError: listing every unknown id, each with a "did you mean" when one is close.

    Example:
        >>> check_overrides({"max_epochs": 100}, ["max_epoch"])  # doctest: +SKIP
        ConfigError: unknown override --max_epoch (did you mean --max_epochs?) ...
    """
    if allow_new_keys:
        return
    known = config_ids(config)
    unknown = [k for k in map(_normalize, overrides)
               if k not in known and k not in RUN_ARGUMENTS and not k.startswith("_meta_")]
    if not unknown:
        return
    candidates = sorted(known)
    described = []
    for key in unknown:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        described.append(f"--{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
    raise ConfigError(f"unknown override{'s' if len(unknown) > 1 else ''} {', '.join(described)}: the config has "
                      f"no such key{'s' if len(unknown) > 1 else ''}; to add new keys on purpose pass "
                      f"--{ALLOW_NEW_KEYS} true")


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_flag(token: str) -> bool:  # as python-fire decides (a negative number is a value)
    return token.startswith("--") or bool(re.match(r"^-[a-zA-Z]", token))


def bundle_run_overrides(argv: list[str] | None = None) -> dict | None:
    """The ``--key value`` arguments of a ``python -m monai.bundle run|run_workflow`` command line, parsed as
    python-fire parses them (``--k=v``, ``--flag`` = True, ``-`` in names read as ``_``), plus the entries of its
    ``--args_file``; ``None`` when ``argv`` (default ``sys.argv``) is not such a command line."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py"):
        return None
    if argv[1] not in ("run", "run_workflow"):
        return None
    args: dict = {}
    tokens, i = argv[2:], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":  # python-fire's own flags follow
            break
        if not _is_flag(token):
            i += 1  # a positional value (run_id)
            continue
        key = token.lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not _is_flag(tokens[i + 1]):
            value, i = tokens[i + 1], i + 2
        else:
            value, i = "True", i + 1
        args[key.replace("-", "_")] = _literal(value)
    if args.get("args_file"):
        from monai.bundle import ConfigParser

        try:
            from_file = ConfigParser.load_config_file(str(args["args_file"]))
        except Exception as e:  # noqa: BLE001 - MONAI reports a bad args_file itself
            raise ConfigError(f"args_file '{args['args_file']}' cannot be read: {e}") from None
        args = {**dict(from_file or {}), **args}
    return args


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def check_command_line_overrides(argv: list[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``: :func:`check_overrides` of its overrides against its config files.

    Checked once per process; outside such a command line (tests, ``medvol demo``, notebooks) nothing happens.

    Raises:
        ConfigError: an override key that is not in the config files (``--allow_new_keys true`` allows them).
    """
    global _ARGV_CHECKED
    if _ARGV_CHECKED and argv is None:
        return
    args = bundle_run_overrides(argv)
    if args is None or not args.get("config_file"):
        return
    from monai.bundle import ConfigParser

    files = args["config_file"]
    try:
        config = ConfigParser.load_config_files(files if isinstance(files, (list, tuple)) else str(files))
    except Exception:  # noqa: BLE001 - MONAI has read these files already; nothing to check against
        return
    overrides = [k for k in args if k not in RUN_ARGUMENTS]
    if argv is None:
        _ARGV_CHECKED = True
    check_overrides(config, overrides, allow_new_keys=_truthy(args.get(ALLOW_NEW_KEYS, False)))


def _given(path, name: str, kind: str) -> Path:
    if path is None or str(path).strip() in ("", "None"):
        raise ConfigError(f"{name} is not set: pass --{name} {kind}")
    return Path(path)


def require_dir(path, name: str = "dataset_dir") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when it is missing or not a folder."""
    p = _given(path, name, "FOLDER")
    if not p.exists():
        raise ConfigError(f"{name} '{path}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{name} '{path}' is not a folder")
    return p


def require_file(path, name: str = "ckpt_path") -> Path:
    """``path`` as a Path, or a ConfigError naming the config key when the file is missing."""
    p = _given(path, name, "FILE")
    if not p.is_file():
        raise ConfigError(f"{name} '{path}' does not exist (train first, or pass --{name})")
    return p
