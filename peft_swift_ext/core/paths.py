"""Module names: which modules a config targets, and paths that see through tuner wrappers.

Regexes in configs come from files (a downloaded checkpoint), and Python's ``re`` cannot be interrupted: a
pattern with nested quantifiers can take longer than the universe's age to fail on one module name. Every
config regex is therefore matched here with the ``regex`` engine and a time budget (:data:`PATTERN_BUDGET_S`),
and while a tuner injects, the config's patterns are replaced by literal equivalents (:func:`literal_patterns`)
that PEFT's own ``re`` matching runs in linear time.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Iterator

import regex
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn


def find_target_modules(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules of ``model`` that ``config.target_modules`` selects.

    Matching follows PEFT (and SWIFT): a string is a regex that must match the whole module name, a list
    matches names equal to an entry or ending in ``.entry``; ``base_layer`` segments of wrapped modules
    are ignored. The empty string selects the root model itself (``[""]``), as in SWIFT. Returns the
    actual module names, for a module wrapped by tuner layers the outermost layer's. Raises ``ValueError``
    naming the pattern and a few module names when nothing matches.

    Args:
        model: the model to search; modules inside existing tuner layers (other than the wrapped
            ``base_layer``) are skipped.
        config: any config with ``target_modules`` (and optionally ``exclude_modules``).
    """
    if config.target_modules == "":
        return [""]  # SWIFT's name for the root model; only tuners with ``wraps_root`` accept it
    names = base_module_names(model)
    # Match on names without the "base_layer" segments other tuners' wrappers add, so targets keep
    # meaning the same modules however many tuners are stacked.
    matched = [name for name in names if check_target_module_exists(config, canonical_path(name))]
    # A wrapped module is listed as its wrapper and as the wrapper's base_layer: the outermost comes first.
    matched = list({canonical_path(name): name for name in reversed(matched)}.values())[::-1]
    if not matched:
        raise no_match_error(config, config.target_modules, model, names)
    return matched


def no_match_error(config: PeftConfig, targets: object, model: nn.Module, names: Iterable[str]) -> ValueError:
    """The error for ``targets`` (as the user gave them) selecting nothing: names the pattern and a few modules."""
    canonical = list(dict.fromkeys(canonical_path(name) for name in names))
    sample = ", ".join(canonical[:8]) + (", ..." if len(canonical) > 8 else "")
    shown = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
    return ValueError(
        f"{type(config).__name__}.target_modules={shown!r} matches no module of "
        f"{type(model).__name__}; module names look like: {sample}"
    )


def canonical_path(path: str) -> str:
    """Drop the ``base_layer`` segments that tuner wrappers add to module paths."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def base_module_names(model: nn.Module) -> list[str]:
    """Names of the modules of the base model, leaving out the adapters' own sub-modules."""
    tuner_layers: list[str] = []
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        owner = max((t for t in tuner_layers if name.startswith(t + ".")), key=len, default=None)
        if owner is not None and not name[len(owner) + 1 :].startswith("base_layer"):
            continue
        names.append(name)
        if isinstance(module, BaseTunerLayer):
            tuner_layers.append(name)
    return names


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the module at ``path``, seeing through tuner layers.

    ``path`` may be canonical (without ``base_layer`` segments): wherever a segment is not a real child of a
    tuner layer, the walk continues in the module the layer wraps. The parent returned is the module that
    really holds the child, so ``setattr(parent, name, ...)`` replaces it where the model's own code calls
    it (never on a wrapper, which would only shadow it).

    Args:
        model: the root module.
        path: a dotted module path; ``""`` (the root) gives ``(model, "")``.
    """
    if not path:
        return model, ""
    *parents, child = path.split(".")
    module = model
    for part in parents:
        module = _child(module, part, path)
    while isinstance(module, BaseTunerLayer) and child not in module._modules:
        module = module.base_layer
    return module, child


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` (canonical or actual; ``""``: the root), the outermost tuner layer where one wraps it."""
    parent, child = parent_of(model, path)
    return parent if not path else _child(parent, child, path)


def canonical_module_names(model: nn.Module) -> list[str]:
    """The base model's module names without ``base_layer`` segments, each once, in model order."""
    return list(dict.fromkeys(canonical_path(name) for name in base_module_names(model)))


def _child(module: nn.Module, name: str, path: str) -> nn.Module:
    while name not in module._modules and isinstance(module, BaseTunerLayer):
        module = module.base_layer
    if name not in module._modules:
        raise AttributeError(f"no module at '{path}': {type(module).__name__} has no child '{name}'")
    return module._modules[name]


def name_matches(name: str, pattern: str | list[str] | tuple[str, ...] | None) -> bool:
    """SWIFT's and PEFT's module-name rule: a str is a regex matching the whole name, a list names modules by
    suffix (equal to an entry, or ending in ``.entry``); None matches everything."""
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return PatternMatcher(pattern, "pattern").matches(name)
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that adapters added: everything in a tuner layer or wrapper but what it wraps.

    Args:
        model: a model, possibly with tuner layers and PEFT's auxiliary wrappers in it.
    """
    wrapped = {"base_layer", "original_module"}
    return {
        id(param)
        for module in model.modules()
        if isinstance(module, BaseTunerLayer) or hasattr(module, "original_module")
        for name, child in module.named_children()
        if name not in wrapped
        for param in child.parameters()
    }


#: The time one config pattern may spend matching a model's module names before it is refused. The ``regex``
#: engine checks its clock only every so often: a budget of 0.4 s ends a catastrophic match after about 1 s (measured
#: 2.5x over). A plain pattern matches a 20,000-module model's names in well under 0.1 s.
PATTERN_BUDGET_S = 0.4
#: Config fields holding module names that PEFT pastes into regexes: only name characters are accepted there.
NAME_LIST_FIELDS = ("modules_to_save", "layers_pattern")
_NAME = re.compile(r"[\w.\-]+")


class PatternMatcher:
    """One regex from a config, matched against module names within a shared time budget.

    Args:
        pattern: the regex (the source text, as the config holds it).
        what: ``Config.field`` for messages.
        template: how the pattern is used, e.g. ``"(.*\\.)?({})$"`` for PEFT's rank patterns.
        budget: seconds for all the matches of this matcher together.
    """

    def __init__(self, pattern: str, what: str, template: str = "{}", budget: float = PATTERN_BUDGET_S) -> None:
        self.pattern, self.what, self.budget = pattern, what, budget
        try:
            self._compiled = regex.compile(template.format(pattern), flags=regex.VERSION0)
        except (regex.error, ValueError, OverflowError, RecursionError) as error:
            raise ValueError(f"{what}={pattern!r} is not a valid regex: {error}") from None
        self._deadline = time.monotonic() + budget

    def matches(self, name: str, full: bool = True) -> bool:
        """Whether the pattern matches ``name`` (all of it, or from its start with ``full=False``).

        Args:
            name: a module name.
            full: ``fullmatch`` (PEFT's target rule) or ``match`` (PEFT's rank-pattern rule).
        """
        method = self._compiled.fullmatch if full else self._compiled.match
        try:
            return method(name, timeout=max(self._deadline - time.monotonic(), 0.001)) is not None
        except TimeoutError:
            raise ValueError(
                f"{self.what}={self.pattern!r} did not finish matching module name {name!r} within "
                f"{self.budget:g} s (catastrophic backtracking); use a simpler regex or a list of module names"
            ) from None


def literal_regex(names: Iterable[str]) -> str:
    """A regex matching exactly ``names``, as a character trie: ``re`` matches it in time linear in the name."""
    trie: dict = {}
    for name in names:
        node = trie
        for char in name:
            node = node.setdefault(char, {})
        node[""] = {}
    return _emit(trie) if trie else "(?!)"


def _emit(node: dict) -> str:
    branches = [re.escape(char) + _emit(child) for char, child in sorted(node.items()) if char]
    ends = "" in node
    if not branches:
        return ""
    if len(branches) == 1 and not ends:
        return branches[0]
    return "(?:" + "|".join(branches) + ")" + ("?" if ends else "")


@contextlib.contextmanager
def literal_patterns(model: nn.Module, config: PeftConfig) -> Iterator[None]:
    """Inside the block, the config's regexes are literal equivalents for ``model``; restored afterwards.

    ``target_modules`` / ``exclude_modules`` given as one regex, and the keys of ``rank_pattern`` /
    ``alpha_pattern``, are matched here (bounded, :class:`PatternMatcher`) against the model's canonical module
    names and replaced by :func:`literal_regex` of what they matched, so PEFT's unbounded ``re`` never sees a
    config's pattern. Module names that PEFT pastes into its own regexes (``modules_to_save``,
    ``layers_pattern``) must be plain names. A pattern that exceeds the budget raises ``ValueError``.

    Args:
        model: the model the config is about to be injected into.
        config: the adapter's config (changed only inside the block).
    """
    kind = type(config).__name__
    for field in NAME_LIST_FIELDS:
        value = getattr(config, field, None)
        entries = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple, set)) else []
        bad = [entry for entry in entries if not isinstance(entry, str) or not _NAME.fullmatch(entry)]
        if bad:
            raise ValueError(f"{kind}.{field} must list module names (letters, digits, '_', '.', '-'), got {bad[:3]}")
    names: list[str] | None = None
    replaced: dict[str, object] = {}
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field, None)
        if isinstance(value, str) and value not in ("", "all-linear"):
            names = names if names is not None else canonical_module_names(model)
            matcher = PatternMatcher(value, f"{kind}.{field}")
            matched = [name for name in names if matcher.matches(name)]
            if field == "target_modules" and not matched and not getattr(config, "target_parameters", None):
                # said here, with the pattern as given: past this point PEFT would only see the literal "(?!)"
                raise no_match_error(config, value, model, names)
            replaced[field] = literal_regex(matched)
    for field in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, field, None)
        if isinstance(value, dict) and value:
            names = names if names is not None else canonical_module_names(model)
            literal: dict = {}
            for key, setting in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"{kind}.{field} keys must be regexes (str), got {key!r}")
                matcher = PatternMatcher(key, f"{kind}.{field}", template=r"(.*\.)?({})$")
                literal.setdefault(literal_regex(n for n in names if matcher.matches(n, full=False)), setting)
            replaced[field] = literal
    originals = {field: getattr(config, field) for field in replaced}
    for field, value in replaced.items():
        setattr(config, field, value)
    try:
        yield
    finally:
        for field, value in originals.items():
            setattr(config, field, value)
