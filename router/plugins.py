"""The plugin manager: built-in sinks, entry-point plugins and plugins named in the YAML.

Built-in sinks (``plugins/``) are registered through exactly the hook third-party plugins use.
Third-party plugins come from the ``webhook_router`` entry-point group of installed packages, or
from the ``plugins:`` list of the configuration (a module name, or a path to a ``.py`` file
relative to the configuration file).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Sequence
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


def new_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, the built-in sinks and installed plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        register(pm, importlib.import_module(name), name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            pm.check_pending()
        except Exception as e:
            raise PluginLoadError(f"entry-point plugin failed to load: {e}") from e
    return pm


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
        for cls in classes or ():  # type: ignore[attr-defined]
            name = getattr(cls, "type", None)
            if not (inspect.isclass(cls) and issubclass(cls, Sink) and isinstance(name, str)):
                problems.append(f"plugin {owner}: {cls!r} is not a Sink subclass with a type name")
            elif name in found:
                problems.append(
                    f"sink type {name!r} is provided by both {owners[name]} and {owner}"
                )
            else:
                found[name] = cls
                owners[name] = owner
    return found, problems


async def notify(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call an observer hook on every plugin, each guarded: a failure is logged, never raised."""
    impls = getattr(pm.hook, hook).get_hookimpls()
    if not impls:
        return
    for impl in impls:
        try:
            result = impl.function(*(kwargs[a] for a in impl.argnames))
            if inspect.isawaitable(result):
                with anyio.fail_after(OBSERVER_TIMEOUT):
                    await result
        except Exception as e:
            # The exception's text may quote whatever the plugin touched: log only its class.
            log.error("plugin %s: hook %s raised %s", impl.plugin_name, hook, type(e).__name__)


def plugin_names(pm: pluggy.PluginManager) -> Sequence[str]:
    return sorted(name for name, _ in pm.list_name_plugin() if name)
