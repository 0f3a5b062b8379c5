"""The plugin manager: built-in sinks, entry-point plugins and plugins named in the YAML.

Built-in sinks (``plugins/``) are registered through exactly the hook third-party plugins use.
Third-party plugins come from the ``webhook_router`` entry-point group of installed packages, or
from the ``plugins:`` list of the configuration (a module name, or a path to a ``.py`` file
relative to the configuration file).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Awaitable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pluggy

from router import hookspecs
from router.sink import Sink

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "webhook_router"
DEFAULT_PLUGINS = (
    "plugins.file",
    "plugins.http",
    "plugins.kafka",
    "plugins.slack",
    "plugins.download",
)
OBSERVER_TIMEOUT = 5.0


class PluginLoadError(Exception):
    """A plugin could not be imported or registered; the message says why."""


#: Entry points (by name) not to load, comma-separated: a broken installed plugin can be
#: switched off without uninstalling it.
DISABLE_ENV = "WEBHOOK_ROUTER_DISABLE_PLUGINS"


def new_manager(
    *, entry_points: bool = True, problems: list[str] | None = None
) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, the built-in sinks and installed plugins. An
    installed plugin that fails to load is reported in ``problems`` (naming its entry point and
    distribution) and left out; without ``problems`` it raises ``PluginLoadError``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        register(pm, importlib.import_module(name), name)
    if entry_points:
        found = load_entry_points(pm)
        if found and problems is None:
            raise PluginLoadError(found[0])
        if problems is not None:
            problems.extend(found)
    return pm


def load_entry_points(pm: pluggy.PluginManager) -> list[str]:
    """Register every plugin of the ``webhook_router`` entry-point group, one by one; return
    the problems (one per plugin that could not be loaded or registered)."""
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    problems = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.name!r} ({ep.value})"
        if dist is not None:
            origin += f" of {dist.metadata['Name']} {dist.version}"
        hint = f"; to run without it: {DISABLE_ENV}={ep.name}"
        try:
            plugin = ep.load()
        except Exception as e:
            problems.append(f"{origin} failed to load: {_short(e)}{hint}")
            continue
        try:
            register(pm, plugin, ep.name)
        except PluginLoadError as e:
            problems.append(f"{origin}: {e}{hint}")
    return problems


def register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register a plugin object, checking its hooks against the specs."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as e:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        raise PluginLoadError(_validation_message(e)) from e
    undecorated = sorted(_undecorated_hooks(pm, plugin))
    if undecorated:
        pm.unregister(plugin)
        raise PluginLoadError(
            f"plugin {name}: {', '.join(undecorated)} look like hooks but are not decorated"
            " with @router.hookimpl (or are misspelt): they would never be called"
        )
    _guard(pm, plugin)


def _undecorated_hooks(pm: pluggy.PluginManager, plugin: object) -> set[str]:
    """``router_*`` functions of a plugin that pluggy did not register as hook implementations
    (a forgotten ``@hookimpl``, which pluggy silently ignores)."""
    registered = {impl.function.__name__ for impl in _impls_of(pm, plugin)}
    return {
        attr
        for attr in dir(plugin)
        if attr.startswith("router_") and callable(getattr(plugin, attr, None))
    } - registered


def _impls_of(pm: pluggy.PluginManager, plugin: object) -> list[pluggy.HookImpl]:
    callers = pm.get_hookcallers(plugin) or []
    return [impl for caller in callers for impl in caller.get_hookimpls() if impl.plugin is plugin]


def _validation_message(e: Exception) -> str:
    text = str(e)
    if "unknown hook" in text:
        return f"{text} (hooks are named router_*: see router/hookspecs.py)"
    return text


def load_named(pm: pluggy.PluginManager, spec: str, base_dir: Path) -> None:
    """Load one ``plugins:`` entry: a ``.py`` file path or an importable module name."""
    if spec.endswith(".py") or "/" in spec:
        module = _import_file((base_dir / spec).resolve())
    else:
        try:
            module = importlib.import_module(spec)
        except Exception as e:
            raise PluginLoadError(f"cannot import plugin module {spec!r}: {_short(e)}") from e
    if pm.is_registered(module):
        return
    register(pm, module, spec)


_FILE_MODULES: dict[Path, tuple[tuple[int, int], ModuleType]] = {}


def _import_file(path: Path) -> ModuleType:
    """Import a plugin file, once per version of it: a reload that finds the file unchanged
    gets the same module (so its sink classes, and the sinks, stay the same); an edited file
    is imported afresh."""
    if not path.is_file():
        raise PluginLoadError(f"plugin file {path} does not exist")
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _FILE_MODULES.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    module = _exec_file(path)
    _FILE_MODULES[path] = (version, module)
    return module


def _exec_file(path: Path) -> ModuleType:
    name = f"webhook_router_plugin_{abs(hash(str(path))):x}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PluginLoadError(f"plugin file {path} failed to import: {_short(e)}") from e
    return module


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _describe(value: object) -> str:
    """A plugin's value for an error message: a class by its name and source file, not by the
    internal module name a plugin file is imported under."""
    if inspect.isclass(value):
        try:
            where = f" ({Path(inspect.getfile(value)).name}:{inspect.getsourcelines(value)[1]})"
        except (OSError, TypeError):
            where = ""
        return f"class {value.__qualname__}{where}"
    return f"{type(value).__name__} {value!r}"[:200]


def sink_types(pm: pluggy.PluginManager) -> tuple[dict[str, type[Sink[Any]]], list[str]]:
    """Collect sink classes from every plugin: (types by name, problems found)."""
    found: dict[str, type[Sink[Any]]] = {}
    owners: dict[str, str] = {}
    problems: list[str] = []
    for impl in pm.hook.router_sink_types.get_hookimpls():
        owner = impl.plugin_name
        try:
            classes = impl.function()
        except Exception as e:
            problems.append(f"plugin {owner}: router_sink_types failed: {_short(e)}")
            continue
        if classes is None:
            continue
        if not isinstance(classes, list | tuple):
            problems.append(
                f"plugin {owner}: router_sink_types must return a list of Sink classes,"
                f" not {_describe(classes)}"
            )
            continue
        for cls in classes:
            name = getattr(cls, "type", None)
            if not (inspect.isclass(cls) and issubclass(cls, Sink) and isinstance(name, str)):
                problems.append(
                    f"plugin {owner}: {_describe(cls)} is not a Sink subclass with a type name"
                )
            elif name in found:
                problems.append(
                    f"sink type {name!r} is provided by both {owners[name]} and {owner}"
                )
            else:
                found[name] = cls
                owners[name] = owner
    return found, problems


#: The observer hooks: called through ``pm.hook`` (pluggy's order, ``tryfirst``/``trylast``,
#: wrappers and tracing all apply), each implementation guarded so that its failure is logged
#: and never reaches the pipeline or the other plugins.
OBSERVERS = (
    "router_message_received",
    "router_message_delivered",
    "router_delivery_failed",
    "router_message_dead_lettered",
)


def _guard(pm: pluggy.PluginManager, plugin: object) -> None:
    """Wrap each of ``plugin``'s observer implementations (not its wrappers) so that an
    exception it raises is logged instead of stopping the hook call."""
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.name not in OBSERVERS:
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                impl.function = _guarded(  # type: ignore[misc]  # pluggy's Final, on purpose
                    impl.function, impl.plugin_name, caller.name
                )


def _guarded(fn: Any, plugin: str, hook: str) -> Any:
    if getattr(fn, "_router_guarded", False):
        return fn

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            _log_observer_error(plugin, hook, e)
            return None
        if inspect.isawaitable(result):
            return _awaited(result, plugin, hook)
        return result

    call._router_guarded = True  # type: ignore[attr-defined]
    return call


async def _awaited(result: Awaitable[Any], plugin: str, hook: str) -> None:
    try:
        with anyio.fail_after(OBSERVER_TIMEOUT):
            await result
    except Exception as e:
        _log_observer_error(plugin, hook, e)


def _log_observer_error(plugin: str, hook: str, e: BaseException) -> None:
    # The exception's text may quote whatever the plugin touched: its class and where it was
    # raised only; at debug level also the frames (files, lines, code: no values, no text).
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    if isinstance(e, TimeoutError):
        where = f" (not done within {OBSERVER_TIMEOUT:g}s)"
    text = f"plugin {plugin}: hook {hook} raised {type(e).__name__}{where}"
    if frames and log.isEnabledFor(logging.DEBUG):
        text += "\n" + "".join(traceback.format_list(frames)).rstrip()
    log.error(text)


async def notify(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call an observer hook through pluggy; a failure of any plugin is logged, never raised
    (each implementation is guarded at registration). An ``async`` implementation is awaited,
    each within ``OBSERVER_TIMEOUT`` seconds."""
    caller = getattr(pm.hook, hook)
    if not caller.get_hookimpls():
        return
    try:
        results = caller(**kwargs)
    except Exception as e:  # a wrapper failed: pluggy's call itself
        _log_observer_error("(a hook wrapper)", hook, e)
        return
    for result in results:
        if inspect.isawaitable(result):
            await result  # guarded: see _awaited
