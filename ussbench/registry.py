"""Plugin registry: one decorator registers a class under (kind, name); parameters come from ``__init__``.

Follows timm's model registry (a decorator per family file) and scikit-learn's estimator contract (all
parameters in the constructor with defaults), so ``ussbench list`` and grid validation can read every
plugin's parameters, defaults and presets from its signature without running it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, PluginError

KINDS: tuple[str, ...] = (
    "dataset",
    "backbone",
    "feature_learner",
    "image_clusterer",
    "dataset_clusterer",
    "postprocess",
)
ENTRY_POINT_GROUP = "ussbench.plugins"
_BUILTIN_PACKAGES = (
    "ussbench.datasets",
    "ussbench.backbones",
    "ussbench.feature_learners",
    "ussbench.image_clusterers",
    "ussbench.dataset_clusterers",
    "ussbench.postprocess",
)
_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class ParamSpec:
    """One constructor parameter of a plugin: its name, type annotation and default (or required)."""

    name: str
    annotation: Any
    default: Any = _REQUIRED
    inferred: bool = (
        False  # no type hint: the annotation is the default's type (:func:`_inferred_annotation`)
    )

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def type_name(self) -> str:
        if self.inferred:
            return f"{_type_name(self.annotation)} (the type of its default {self.default!r}; it has no type hint)"
        return _type_name(self.annotation)


@dataclass
class PluginSpec:
    """A registered plugin: kind, name, class, parameters and named presets."""

    kind: str
    name: str
    cls: type
    params: dict[str, ParamSpec]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    line: int = 0  # the line of the registering decorator (a re-imported module registers again, same line)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params.values() if not p.required}


_registry: dict[str, dict[str, PluginSpec]] = {kind: {} for kind in KINDS}
_USER_MODULE_PREFIX = "ussbench_user_plugin_"  # plugin files are imported under this prefix + stem + hash
_builtins_loaded = False
_entry_points_loaded = False


def register(kind: str, name: str | None = None, *, presets: dict[str, dict[str, Any]] | None = None):
    """Class decorator: register ``cls`` as plugin ``name`` of ``kind`` (name defaults to the class name)."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")

    def decorate(cls: type) -> type:
        plugin_name = name or cls.__name__.lower()
        base = _base_class(kind)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"{getattr(cls, '__qualname__', cls)!s} is registered as a {kind} but does not subclass "
                f"ussbench.base.{base.__name__} (whose methods ussbench calls)"
            )
        existing = _registry[kind].get(plugin_name)
        source = f"{cls.__module__}.{cls.__qualname__}"
        line = sys._getframe(1).f_lineno  # where the decorated class is: two classes of one name in one file
        if existing is not None and (existing.source != source or existing.line != line):
            raise PluginError(
                f"{kind} plugin {plugin_name!r} is already registered by {_where(existing.cls)}; "
                f"{_where(cls)} must register its class under another name"
            )
        spec = PluginSpec(
            kind=kind,
            name=plugin_name,
            cls=cls,
            params=_signature_params(cls),
            presets=dict(presets or getattr(cls, "presets", {}) or {}),
            source=source,
            line=line,
        )
        for preset_name, preset in spec.presets.items():
            validate_params(spec, preset, where=f"preset {preset_name!r} of {kind} {plugin_name!r}")
        _registry[kind][plugin_name] = spec
        cls.plugin_kind = kind
        cls.plugin_name = plugin_name
        return cls

    return decorate


def _base_class(kind: str) -> type:
    """The ussbench.base class a plugin of ``kind`` subclasses."""
    from . import base

    return {"dataset": base.Dataset, "backbone": base.Backbone, "feature_learner": base.FeatureLearner,
            "image_clusterer": base.ImageClusterer, "dataset_clusterer": base.DatasetClusterer,
            "postprocess": base.PostProcess}[kind]  # fmt: skip


def _where(cls: type) -> str:
    """A registered class as a user finds it: ``ussbench.x.Class``, or ``Class in /path/plugin.py`` for a
    plugin file (whose module name is generated)."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if cls.__module__.startswith(_USER_MODULE_PREFIX) and path:
        return f"{cls.__qualname__} in {path}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _signature_params(cls: type) -> dict[str, ParamSpec]:
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = {}
    params: dict[str, ParamSpec] = {}
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if isinstance(
            p.default, (list, dict, set, bytearray)
        ):  # shared by every instance, mutated across cells
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__}: parameter {pname!r} has a mutable default "
                f"({p.default!r}); use None or a tuple"
            )
        annotation = hints.get(pname, p.annotation)
        inferred = _inferred_annotation(annotation, p.default)
        params[pname] = ParamSpec(pname, inferred or annotation, p.default, inferred is not None)
    return params


def _inferred_annotation(annotation: Any, default: Any) -> type | None:
    """The type a parameter without a type hint is checked against: its default's, when that is a bool, int,
    float or str; so ``n_clusters: 7.9`` for ``n_clusters=8`` is refused instead of truncated by the plugin."""
    if annotation is not _REQUIRED or default is _REQUIRED:
        return None
    return next((t for t in (bool, int, float, str) if type(default) is t), None)


def load_builtins() -> None:
    """Import every module of ussbench's plugin packages so their decorators run."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for package_name in _BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, prefix=package_name + "."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(info.name)


def load_entry_points(force: bool = False) -> list[str]:
    """Import the modules that installed packages declare under the ``ussbench.plugins`` entry point."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one
            raise PluginError(
                f"entry point {ep.name!r} = {ep.value!r} ({ENTRY_POINT_GROUP}) failed: {exc}"
            ) from exc
        loaded.append(ep.value)
    return loaded


def import_plugin_module(ref: str, base_dir: Path | None = None) -> types.ModuleType:
    """Import a user's plugin module by dotted name or by path to a ``.py`` file (relative to base_dir).

    Any exception the module raises while importing becomes one PluginError line naming the module, the
    exception and the module's line where it was raised.
    """
    if ref.endswith(".py") or "/" in ref:
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise PluginError(f"plugin module file {str(path)!r} does not exist")
        # the same name in every process (str hashes are salted per process): Ray workers unpickle its objects
        module_name = f"{_USER_MODULE_PREFIX}{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # a plugin that calls sys.exit() on import says so too
            del sys.modules[module_name]
            raise PluginError(_import_failure(str(path), exc, path.resolve())) from exc
        return module
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise PluginError(f"plugin module {ref!r} could not be imported: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise PluginError(_import_failure(ref, exc, _module_file(ref))) from exc


def _module_file(ref: str) -> Path | None:
    """The file of an importable module (to name the line where it raised), or None."""
    try:
        spec = importlib.util.find_spec(ref)
    except Exception:  # its package raises too
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def _import_failure(ref: str, exc: Exception, path: Path | None) -> str:
    """One line: which plugin module raised what, and on which of its lines."""
    if isinstance(exc, SyntaxError):
        line = exc.lineno
    else:
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if path is not None and Path(f.filename).resolve() == path
        ]
        line = frames[-1].lineno if frames else None
    at = f" (line {line})" if line is not None else ""
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    message = text.splitlines()[0] if text else ""
    return f"plugin module {ref!r} raised {type(exc).__name__} on import{at}" + (
        f": {message}" if message else ""
    )


def _ensure_loaded() -> None:
    load_builtins()
    load_entry_points()


def available(kind: str | None = None) -> dict[str, dict[str, PluginSpec]]:
    """All registered plugins, by kind (built-ins and entry points are loaded first)."""
    _ensure_loaded()
    if kind is not None:
        _check_kind(kind)
        return {kind: dict(sorted(_registry[kind].items()))}
    return {k: dict(sorted(v.items())) for k, v in _registry.items()}


def get(kind: str, name: str) -> PluginSpec:
    """The plugin ``name`` of ``kind``; an unknown name lists what is registered."""
    _ensure_loaded()
    _check_kind(kind)
    try:
        return _registry[kind][name]
    except KeyError:
        known = ", ".join(sorted(_registry[kind])) or "none"
        raise PluginError(f"unknown {kind} plugin {name!r}; registered: {known}") from None


def unregister(kind: str, name: str) -> None:
    """Remove a plugin (used by tests that register throwaway plugins)."""
    _registry[kind].pop(name, None)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")


def resolve_params(
    spec: PluginSpec, params: dict[str, Any] | None, preset: str | None = None, where: str = ""
) -> dict[str, Any]:
    """Merge a named preset under explicit params and validate names and types against the signature."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in spec.presets:
            known = ", ".join(sorted(spec.presets)) or "none"
            raise ConfigError(
                f"{where}: unknown preset {preset!r} for {spec.kind} {spec.name!r}; known: {known}"
            )
        merged.update(spec.presets[preset])
    merged.update(params or {})
    validate_params(spec, merged, where)
    return merged


def validate_params(spec: PluginSpec, params: dict[str, Any], where: str = "") -> None:
    """Raise ConfigError for an unknown parameter name or a value of the wrong type."""
    prefix = f"{where}: " if where else ""
    for key, value in params.items():
        if key not in spec.params:
            accepted = ", ".join(spec.params) or "no parameters"
            raise ConfigError(
                f"{prefix}{spec.kind} {spec.name!r} has no parameter {key!r}; accepted: {accepted}"
            )
        p = spec.params[key]
        if not _matches(value, p.annotation):
            raise ConfigError(
                f"{prefix}parameter {key!r} of {spec.kind} {spec.name!r} expects {p.type_name()}, "
                f"got {value!r} ({type(value).__name__})"
            )


def instantiate(spec: PluginSpec, params: dict[str, Any]) -> Any:
    """Build the plugin with validated params; missing required params are a ConfigError."""
    missing = [p.name for p in spec.params.values() if p.required and p.name not in params]
    if missing:
        raise ConfigError(f"{spec.kind} {spec.name!r} needs parameter(s) {', '.join(missing)}")
    plugin = spec.cls(**params)
    hidden = [name for name in spec.params if not hasattr(plugin, name)]
    if hidden:  # get_params() would miss them: cache keys and results could not tell settings apart
        raise PluginError(
            f"{spec.kind} {spec.name!r} ({_where(spec.cls)}) does not keep its parameter(s) "
            f"{', '.join(hidden)} as attributes of the same name; store each constructor parameter as "
            f"self.<name> (scikit-learn's estimator contract): ussbench reads them for cache keys and results"
        )
    return plugin


def _matches(value: Any, annotation: Any) -> bool:
    """A deliberately small runtime type check covering the annotations plugins use."""
    if annotation is _REQUIRED or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        if annotation.__module__ == "pathlib" or annotation is Path:
            return isinstance(value, (str, Path))
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    if annotation is _REQUIRED:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))
