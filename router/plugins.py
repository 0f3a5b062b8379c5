"""The plugin manager: built-in sinks, entry-point plugins and plugins named in the YAML.

Built-in sinks (``plugins/``) are registered through exactly the hook third-party plugins use.
Third-party plugins come from the ``webhook_router`` entry-point group of installed packages, or
from the ``plugins:`` list of the configuration (a module name, or a path to a ``.py`` file
relative to the configuration file). An entry of ``plugins:`` may carry options for its plugin
(``- NAME: {options}``, NAME being any of those or an installed plugin's entry-point name),
validated by the model the plugin returns from ``router_plugin_options``.

Each plugin is known by one name everywhere (errors, logs, ``webhook-router plugins``): a
built-in by its module (``plugins.file``), an installed one by its entry-point name, a file by
its absolute path, a module by its module name. ``Manager.origins`` says where each came from.
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import pluggy
from pydantic import BaseModel, ConfigDict, ValidationError

from router import hookspecs, yamlsource
from router.sink import Sink

if TYPE_CHECKING:
    from router.config import Config

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
#: The deadline on each ``async`` ``router_startup`` / ``router_shutdown`` implementation.
LIFECYCLE_TIMEOUT = 30.0


class PluginLoadError(Exception):
    """A plugin could not be imported or registered; the message says why."""


class PluginOptions(BaseModel):
    """Base class of a plugin's options model (returned by its ``router_plugin_options``):
    strict (unknown keys are errors) and frozen, like a sink's ``Options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Entry points (by name) not to load, comma-separated: a broken installed plugin can be
#: switched off without uninstalling it.
DISABLE_ENV = "WEBHOOK_ROUTER_DISABLE_PLUGINS"

Kind = Literal["built in", "entry point", "file", "module", "inline"]


@dataclass(frozen=True)
class Origin:
    """Where a plugin came from, for ``webhook-router plugins`` and ``check``."""

    kind: Kind
    #: The built-in's or plugin module's name, ``NAME = VALUE`` of an entry point, or a file's
    #: absolute path.
    source: str
    #: ``NAME VERSION`` of the installed distribution it came from, when there is one.
    distribution: str | None = None

    def __str__(self) -> str:
        if self.kind == "built in":
            return "built in"
        if self.kind == "entry point":
            return f"{self.distribution or 'unknown distribution'} (entry point {self.source})"
        if self.kind == "file":
            return f"file {self.source}"
        if self.kind == "module":
            return f"module {self.source}" + (
                f" of {self.distribution}" if self.distribution else ""
            )
        return "passed to load_config (extra_plugins)"


class Manager(pluggy.PluginManager):
    """pluggy's manager with the hook specs, and what the router knows of each plugin."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        #: By plugin name.
        self.origins: dict[str, Origin] = {}
        #: Each plugin's validated options (``None``: it has no options model).
        self.options: dict[str, PluginOptions | None] = {}
        #: Sink type name -> the name of the plugin providing it.
        self.providers: dict[str, str] = {}
        #: Sink classes by type name.
        self.sink_types: dict[str, type[Sink[Any]]] = {}
        #: Entry points that failed to load, by name -> the problem's text.
        self.failed: dict[str, str] = {}
        #: Entry points switched off by ``$WEBHOOK_ROUTER_DISABLE_PLUGINS``.
        self.disabled: set[str] = set()
        #: While a configuration is checked (``build``): which of its problems are load
        #: failures (index, text), and the sink types found unknown meanwhile.
        self.load_failures: list[tuple[int, str]] = []
        self.unknown_types: list[str] = []

    def origin(self, name: str) -> Origin:
        return self.origins.get(name, Origin("inline", name))

    def provider(self, sink_type: str) -> str:
        """Who provides a sink type, in words: ``built in``, ``wr-audit 1.0 (entry point …)``,
        ``file /etc/…/audit.py``."""
        name = self.providers.get(sink_type)
        if name is None:
            return "unknown"
        origin = self.origin(name)
        return str(origin) if origin.kind != "built in" else f"built in ({name})"


def new_manager(*, entry_points: bool = True, problems: list[str] | None = None) -> Manager:
    """A plugin manager with the hook specs, the built-in sinks and installed plugins. An
    installed plugin that fails to load is reported in ``problems`` (naming its entry point and
    distribution) and left out; without ``problems`` it raises ``PluginLoadError``."""
    pm = Manager()
    for name in DEFAULT_PLUGINS:
        register(pm, importlib.import_module(name), name, Origin("built in", name))
    if entry_points:
        found = load_entry_points(pm)
        if found and problems is None:
            raise PluginLoadError(found[0])
        if problems is not None:
            problems.extend(found)
    return pm


def load_entry_points(pm: Manager) -> list[str]:
    """Register every plugin of the ``webhook_router`` entry-point group, one by one; return
    the problems (one per plugin that could not be loaded or registered)."""
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    problems = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled:
            pm.disabled.add(ep.name)
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        dist = getattr(ep, "dist", None)
        distribution = f"{dist.metadata['Name']} {dist.version}" if dist is not None else None
        origin = f"entry point {ep.name!r} ({ep.value})"
        if distribution is not None:
            origin += f" of {distribution}"
        hint = f"; to run without it: {DISABLE_ENV}={ep.name}"
        try:
            plugin = ep.load()
        except Exception as e:
            problems.append(
                pm.failed.setdefault(ep.name, f"{origin} failed to load: {_short(e)}{hint}")
            )
            continue
        try:
            register(
                pm, plugin, ep.name, Origin("entry point", f"{ep.name} = {ep.value}", distribution)
            )
        except PluginLoadError as e:
            problems.append(pm.failed.setdefault(ep.name, f"{origin}: {e}{hint}"))
    return problems


def register(pm: Manager, plugin: object, name: str, origin: Origin | None = None) -> None:
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
    for impl in _impls_of(pm, plugin):
        if impl.hookwrapper or impl.wrapper:
            continue
        if impl.function.__name__ in SYNC_ONLY and inspect.iscoroutinefunction(impl.function):
            pm.unregister(plugin)
            raise PluginLoadError(
                f"plugin {name}: {impl.function.__name__} must be a plain function, not"
                " async def: it runs while the configuration switches, where nothing waits"
            )
    pm.origins[name] = origin or Origin("inline", name)
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


def load_named(pm: Manager, spec: str, base_dir: Path) -> str:
    """Load one ``plugins:`` entry: a ``.py`` file path or an importable module name, or find
    the plugin already registered under that name (an entry point's, a built-in). Returns the
    plugin's name."""
    if pm.get_plugin(spec) is not None:
        return spec
    if spec.endswith(".py") or "/" in spec:
        path = (base_dir / spec).resolve()
        module = _import_file(path)
        name, origin = str(path), Origin("file", str(path))
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name == spec.partition(".")[0] or e.name == spec:
                raise PluginLoadError(_unknown_plugin(pm, spec, e)) from e
            raise PluginLoadError(f"cannot import plugin module {spec!r}: {_short(e)}") from e
        except Exception as e:
            raise PluginLoadError(f"cannot import plugin module {spec!r}: {_short(e)}") from e
        name, origin = spec, Origin("module", spec, _distribution_of(spec))
    if pm.is_registered(module):
        return pm.get_name(module) or name
    register(pm, module, name, origin)
    return name


def _unknown_plugin(pm: Manager, spec: str, e: ModuleNotFoundError) -> str:
    installed = sorted(n for n, o in pm.origins.items() if o.kind == "entry point")
    return (
        f"unknown plugin {spec!r}: not the entry-point name of an installed plugin"
        f" (installed: {', '.join(installed) or 'none'}), nor a module that can be imported"
        f" ({_short(e)}), nor a .py file"
    )


def _distribution_of(module: str) -> str | None:
    """``NAME VERSION`` of the installed distribution a module's top-level package is in."""
    top = module.partition(".")[0]
    try:
        names = importlib.metadata.packages_distributions().get(top) or []
        return f"{names[0]} {importlib.metadata.version(names[0])}" if names else None
    except Exception:  # broken metadata of some distribution: not worth a failure here
        return None


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
    # The module is named by its path: that is what its loggers (logging.getLogger(__name__))
    # and its classes' __module__ show, where an invented name would say nothing.
    name = str(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        if previous is not None:
            sys.modules[name] = previous
        else:
            del sys.modules[name]
        raise PluginLoadError(f"plugin file {path} failed to import: {_short(e)}") from e
    return module


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _describe(value: object) -> str:
    """A plugin's value for an error message: a class by its name and source file."""
    if inspect.isclass(value):
        try:
            where = f" ({inspect.getfile(value)}:{inspect.getsourcelines(value)[1]})"
        except (OSError, TypeError):
            where = ""
        return f"class {value.__qualname__}{where}"
    return f"{type(value).__name__} {value!r}"[:200]


def sink_types(pm: pluggy.PluginManager) -> tuple[dict[str, type[Sink[Any]]], list[str]]:
    """Collect sink classes from every plugin: (types by name, problems found). On a
    ``Manager`` also records each type's provider."""
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
    if isinstance(pm, Manager):
        pm.sink_types = found
        pm.providers = owners
    return found, problems


# --- Building the manager for a configuration file -------------------------------------------

#: ``config._report``: pydantic's errors as problems naming key path and line.
Report = Callable[
    [
        yamlsource.Source,
        yamlsource.KeyPath,
        ValidationError,
        Mapping[yamlsource.KeyPath, type[BaseModel]],
    ],
    None,
]


def _report(
    src: yamlsource.Source,
    prefix: yamlsource.KeyPath,
    error: ValidationError,
    models: Mapping[yamlsource.KeyPath, type[BaseModel]],
) -> None:
    """pydantic's errors as problems, plainly (``load_config`` passes its own, finer one)."""
    for item in error.errors(include_url=False):
        src.problem((*prefix, *item["loc"]), item["msg"].removeprefix("Value error, "))


def inventory(path: Path | None) -> tuple[Manager, list[str]]:
    """The plugins a daemon would load for the configuration file ``path`` (its ``plugins:``
    section alone is read, no secret) or, without one, the built-in and installed plugins;
    and the problems loading them."""
    if path is None:
        problems: list[str] = []
        pm = new_manager(problems=problems)
        sink_types(pm)
        return pm, problems
    path = path.absolute()
    src = yamlsource.load(path, secrets=False)
    if not isinstance(src.data, dict):
        src.data = {}
    pm = build(src, entry_points=True, extra_plugins=(), context={"base_dir": path.parent})
    return pm, [str(p) for p in sorted(src.problems, key=lambda p: p.line or 0)]


def _fail(pm: Manager, src: yamlsource.Source, path: yamlsource.KeyPath, text: str) -> None:
    """A plugin failed to load: a problem, remembered as such (see ``unknown_sink_type``)."""
    pm.load_failures.append((len(src.problems), text))
    src.problem(path, text)


def build(
    src: yamlsource.Source,
    *,
    entry_points: bool,
    extra_plugins: Sequence[object],
    context: Mapping[str, Any],
    report: Report | None = None,
) -> Manager:
    """The plugin part of loading a configuration: the manager with built-ins, installed
    plugins, the ``plugins:`` entries and ``extra_plugins``; the sink types; each plugin's
    options. Problems go to ``src``; a plugin that failed to load is left out."""
    problems: list[str] = []
    pm = new_manager(entry_points=entry_points, problems=problems)
    for text in problems:
        _fail(pm, src, (), text)
    raw_options = _load_entries(pm, src, Path(src.file).parent)
    for i, plugin in enumerate(extra_plugins):
        name = f"extra-{i}-{getattr(plugin, '__name__', 'plugin')}"
        try:
            register(pm, plugin, name, Origin("inline", name))
        except PluginLoadError as e:
            _fail(pm, src, (), str(e))
    _types, type_problems = sink_types(pm)
    for text in type_problems:
        src.problem(("plugins",), text)
    _validate_options(pm, src, raw_options, context, report or _report)
    return pm


def _load_entries(
    pm: Manager, src: yamlsource.Source, base_dir: Path
) -> dict[str, tuple[yamlsource.KeyPath, Any]]:
    """Load the ``plugins:`` entries; return the options given, by plugin name (with where)."""
    entries = src.data.get("plugins") or []
    options: dict[str, tuple[yamlsource.KeyPath, Any]] = {}
    if not isinstance(entries, list):
        return options  # reported by the document model
    for i, entry in enumerate(entries):
        path: yamlsource.KeyPath = ("plugins", i)
        raw: Any = None
        if isinstance(entry, dict):
            if len(entry) != 1:
                src.problem(
                    path,
                    "expected a plugin (module, .py file or entry-point name), or one"
                    " `NAME: {options}`",
                )
                continue
            ((spec, raw),) = entry.items()
            path = (*path, spec)
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                src.problem(path, "expected a mapping of the plugin's options")
                continue
        elif isinstance(entry, str):
            spec = entry
        else:
            continue  # reported by the document model
        if spec in pm.failed:
            continue  # its load failure is reported (once, first)
        if spec in pm.disabled:
            src.warning(path, f"plugin {spec} is switched off by {DISABLE_ENV}: not used")
            continue
        try:
            name = load_named(pm, spec, base_dir)
        except PluginLoadError as e:
            _fail(pm, src, path, str(e))
            continue
        if raw is not None:
            if name in options:
                src.problem(path, f"options for plugin {name} given twice")
                continue
            options[name] = (path, raw)
    return options


def _validate_options(
    pm: Manager,
    src: yamlsource.Source,
    given: Mapping[str, tuple[yamlsource.KeyPath, Any]],
    context: Mapping[str, Any],
    report: Report,
) -> None:
    """Validate each plugin's options with the model its ``router_plugin_options`` returns
    (strict, like a sink's); a plugin without a model takes no options."""
    models: dict[str, type[BaseModel]] = {}
    for impl in pm.hook.router_plugin_options.get_hookimpls():
        try:
            model = impl.function()
        except Exception as e:
            src.problem(
                ("plugins",),
                f"plugin {impl.plugin_name}: router_plugin_options failed: {_short(e)}",
            )
            continue
        if not (inspect.isclass(model) and issubclass(model, BaseModel)):
            src.problem(
                ("plugins",),
                f"plugin {impl.plugin_name}: router_plugin_options must return a"
                f" router.plugins.PluginOptions subclass, not {_describe(model)}",
            )
            continue
        models[impl.plugin_name] = model
    for name, (path, _raw) in given.items():
        if name not in models:
            src.problem(
                path,
                f"plugin {name} takes no options (it has no router_plugin_options hook):"
                " list it without them",
            )
    for name, model in models.items():
        path, raw = given.get(name, (("plugins",), None))
        try:
            pm.options[name] = model.model_validate(raw or {}, context=dict(context))  # type: ignore[assignment]
        except ValidationError as e:
            if raw is not None:
                report(src, path, e, {(): model})
            else:
                missing = ", ".join(".".join(map(str, err["loc"])) for err in e.errors())
                src.problem(
                    path,
                    f"plugin {name} needs options ({missing}): add `- {name}: {{…}}` under"
                    " plugins:",
                )


def unknown_sink_type(
    pm: Manager, src: yamlsource.Source, path: yamlsource.KeyPath, type_name: str
) -> None:
    """Report a sink's unknown type. When a plugin failed to load, that failure is the news
    (the type is likely its): the load failure says so, and no problem of its own is listed
    before it."""
    if not pm.load_failures:
        known = ", ".join(sorted(pm.sink_types)) or "none"
        src.problem(path, f"unknown sink type {type_name!r} (known: {known})")
        return
    pm.unknown_types.append(f"{type_name!r} ({yamlsource.dotted(path)})")
    note = f"; until it loads, sink type {', '.join(pm.unknown_types)} is unknown"
    for index, text in pm.load_failures:
        src.problems[index] = replace(src.problems[index], message=text + note)


# --- Calling hooks -------------------------------------------------------------------------

#: The observer hooks: called through ``pm.hook`` (pluggy's order, ``tryfirst``/``trylast``,
#: wrappers and tracing all apply), each implementation guarded so that its failure is logged
#: and never reaches the pipeline or the other plugins.
OBSERVERS = (
    "router_message_received",
    "router_message_delivered",
    "router_delivery_failed",
    "router_message_dead_lettered",
)
#: The lifecycle hooks, guarded the same way (with their own deadline).
LIFECYCLE = ("router_configure", "router_startup", "router_shutdown")
#: Hooks that must be plain functions (they run where nothing may wait).
SYNC_ONLY = ("router_configure",)
_TIMEOUTS = {name: OBSERVER_TIMEOUT for name in OBSERVERS} | {
    name: LIFECYCLE_TIMEOUT for name in LIFECYCLE
}


def _guard(pm: pluggy.PluginManager, plugin: object) -> None:
    """Wrap each of ``plugin``'s observer and lifecycle implementations (not its wrappers) so
    that an exception it raises is logged instead of stopping the hook call."""
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.name not in _TIMEOUTS:
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
            _log_hook_error(plugin, hook, e)
            return None
        if inspect.isawaitable(result):
            return _awaited(result, plugin, hook)
        return result

    call._router_guarded = True  # type: ignore[attr-defined]
    return call


async def _awaited(result: Awaitable[Any], plugin: str, hook: str) -> None:
    try:
        with anyio.fail_after(_TIMEOUTS[hook]):
            await result
    except Exception as e:
        _log_hook_error(plugin, hook, e)


_ROUTER_DIR = str(Path(__file__).resolve().parent) + os.sep


def raised(e: BaseException) -> str:
    """``ValueError: its text (at file:line)`` for an exception a plugin raised where no
    message is at hand (a sink's constructor, at load): its text says what was wrong."""
    frames = traceback.extract_tb(e.__traceback__)
    # Where the plugin's code called into ours (``context.metrics.counter(...)``) says more
    # than the line of ours that raised.
    theirs = [f for f in frames if not f.filename.startswith(_ROUTER_DIR)]
    frame = (theirs or frames)[-1] if frames else None
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}{': ' + text if text else ''}{where}"


def _log_hook_error(plugin: str, hook: str, e: BaseException) -> None:
    # The exception's text may quote whatever the plugin touched: its class and where it was
    # raised only; at debug level also the frames (files, lines, code: no values, no text).
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    if isinstance(e, TimeoutError):
        where = f" (not done within {_TIMEOUTS.get(hook, OBSERVER_TIMEOUT):g}s)"
    text = f"plugin {plugin}: hook {hook} raised {type(e).__name__}{where}"
    if frames and log.isEnabledFor(logging.DEBUG):
        text += "\n" + "".join(traceback.format_list(frames)).rstrip()
    log.error(text)


def observed(pm: pluggy.PluginManager, hook: str) -> bool:
    """Whether any plugin implements ``hook`` (so a caller may skip building its arguments)."""
    return bool(getattr(pm.hook, hook).get_hookimpls())


async def notify(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> None:
    """Call an observer hook through pluggy; a failure of any plugin is logged, never raised
    (each implementation is guarded at registration). An ``async`` implementation is awaited,
    each within ``OBSERVER_TIMEOUT`` seconds."""
    caller = getattr(pm.hook, hook)
    if caller.get_hookimpls():
        await _call(caller, hook, kwargs)


async def _call(caller: Callable[..., list[Any]], hook: str, kwargs: Mapping[str, Any]) -> None:
    try:
        results = caller(**kwargs)
    except Exception as e:  # a wrapper failed: pluggy's call itself
        _log_hook_error("(a hook wrapper)", hook, e)
        return
    for result in results:
        if inspect.isawaitable(result):
            await result  # guarded: see _awaited


def _subset(
    pm: pluggy.PluginManager, hook: str, keep: Callable[[pluggy.HookImpl], bool]
) -> Callable[..., list[Any]]:
    """A hook call to some plugins only, through pluggy's own call path (its order, wrappers
    and tracing apply). Not ``pm.subset_hook_caller``: that puts plugins in a set, and a
    plugin object need not be hashable."""
    caller: pluggy.HookCaller = getattr(pm.hook, hook)
    impls = [impl for impl in caller.get_hookimpls() if keep(impl)]

    def call(**kwargs: Any) -> list[Any]:
        if not impls:
            return []
        return cast(list[Any], caller._hookexec(hook, impls, kwargs, False))

    return call


def _named(name: str, impl: pluggy.HookImpl) -> bool:
    return impl.plugin_name == name


def configure(config: Config) -> None:
    """Call ``router_configure`` of every plugin, each with its own options: when ``config``
    takes effect (at start, and right after a reload's switch, before anything awaits)."""
    pm = config.plugin_manager
    # In pluggy's call order (the last registered first, tryfirst/trylast honoured).
    impls = reversed(pm.hook.router_configure.get_hookimpls())
    for name in dict.fromkeys(impl.plugin_name for impl in impls):
        call = _subset(pm, "router_configure", functools.partial(_named, name))
        try:
            results = call(config=config, options=pm.options.get(name))
        except Exception as e:  # a wrapper of its own failed
            _log_hook_error(name, "router_configure", e)
            continue
        for result in results:  # guarded at registration; async def refused there
            if inspect.iscoroutine(result):
                result.close()


async def startup(config: Config, *, only_new_since: Config | None = None) -> None:
    """Call ``router_startup``: of every plugin at start, or after a reload of those the
    reload brought in (not in ``only_new_since``'s manager: a new plugin file, an edited file
    imported afresh)."""
    if only_new_since is None:
        await notify(config.plugin_manager, "router_startup", config=config)
        return
    known = _plugins(only_new_since.plugin_manager)
    call = _subset(config.plugin_manager, "router_startup", lambda i: id(i.plugin) not in known)
    await _call(call, "router_startup", {"config": config})


async def shutdown(config: Config, *, only_gone_in: Config | None = None) -> None:
    """Call ``router_shutdown``: of every plugin when the daemon stops, or after a reload of
    those the reload dropped (not in ``only_gone_in``'s manager)."""
    if only_gone_in is None:
        await notify(config.plugin_manager, "router_shutdown", config=config)
        return
    kept = _plugins(only_gone_in.plugin_manager)
    call = _subset(config.plugin_manager, "router_shutdown", lambda i: id(i.plugin) not in kept)
    await _call(call, "router_shutdown", {"config": config})


def departed(old: Config, new: Config) -> bool:
    """Whether a reload from ``old`` to ``new`` drops a plugin that has a ``router_shutdown``."""
    kept = _plugins(new.plugin_manager)
    return any(
        id(impl.plugin) not in kept
        for impl in old.plugin_manager.hook.router_shutdown.get_hookimpls()
    )


def _plugins(pm: pluggy.PluginManager) -> set[int]:
    return {id(p) for _, p in pm.list_name_plugin() if p is not None}


# --- Describing what is loaded -------------------------------------------------------------


@dataclass(frozen=True)
class PluginInfo:
    """One plugin, for ``webhook-router plugins``."""

    name: str
    kind: Kind
    source: str
    distribution: str | None
    sink_types: tuple[str, ...]
    hooks: tuple[str, ...]
    #: Whether it has an options model (``router_plugin_options``), and whether ``plugins:``
    #: gave it options.
    takes_options: bool
    origin: str


def describe(pm: Manager) -> list[PluginInfo]:
    """Every registered plugin: built-ins first, then in registration order."""
    found = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        origin = pm.origin(name)
        hooks = sorted({c.name for c in pm.get_hookcallers(plugin) or []})
        found.append(
            PluginInfo(
                name=name,
                kind=origin.kind,
                source=origin.source,
                distribution=origin.distribution,
                sink_types=tuple(sorted(t for t, owner in pm.providers.items() if owner == name)),
                hooks=tuple(h for h in hooks if h != "router_sink_types"),
                takes_options="router_plugin_options" in hooks,
                origin=str(origin),
            )
        )
    return sorted(found, key=lambda i: i.kind != "built in")
