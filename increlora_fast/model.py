"""Finding targets in any `nn.Module`, replacing them with `IncreLoRALinear`, and merging back."""
from __future__ import annotations

import ast
import copy
import difflib
import functools
import inspect
import operator
import re
import sys
import textwrap
import warnings
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

from .config import DEFAULT_TARGET_MODULES, IncreLoRAConfig
from .layer import (SHARED_FROZEN, IncreLoRALinear, _names_by_id, _other_names_of_base_weight,
                    class_name, derived_weight_message, is_quantized_base, is_supported_base,
                    own_forward_problem, shared_holders)

CONFIG_ATTR = "increlora_config"
# Set by `merge_and_unload` on the model it returns: its adapters are folded into the base.
UNLOADED_ATTR = "increlora_merged_and_unloaded"
ALL_LINEAR = "all-linear"


def suffix_match(name: str, suffix: str) -> bool:
    """Whether the module name ``name`` is ``suffix`` or ends with ``"." + suffix`` (how
    ``target_modules`` and ``modules_to_save`` entries select modules, as in peft), read as the
    plain model's name (`plain_name`): the same entries select the same modules whatever wraps
    the model's blocks."""
    name = plain_name(name)
    return name == suffix or name.endswith("." + suffix)


def _similar_names(key: str, names: List[str]) -> str:
    """The module names closest to ``key`` (for an error message), or, with none close, every
    distinct leaf name the model has (as the plain model names them; the first 12 of its names
    themselves where each ends in an index, as in an nn.Sequential)."""
    names = [plain_name(n) for n in names]
    leaves = sorted({n.split(".")[-1] for n in names} | set(names))
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    if close:
        return str(close)
    short = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()})
    if not short:  # (every name ends in an index: an nn.Sequential's)
        return f"none close; the model's module names are {names[:12]}"
    return f"none close; the model's module names end in {short}"


def _find_targets(model: nn.Module, config: IncreLoRAConfig) -> List[str]:
    """The names of the modules to adapt: those ``target_modules`` selects, less those of
    ``exclude_modules`` and, as in peft, those inside ``modules_to_save`` (trained in full);
    a listed name that matches only such modules is refused."""
    # (not the parametrizations' own modules under a parametrized layer: ``0.parametrizations.
    # weight.0`` is no layer a ``target_modules`` entry "0" means)
    # every name of a module registered under several names (a linear shared by two parents)
    names = [n for n, _ in model.named_modules(remove_duplicate=False)
             if n and not _in_parametrizations(n, model)]
    spec = config.target_modules
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        modules = dict(model.named_modules(remove_duplicate=False))
        chosen = {id(modules[n]) for n in _all_linear_targets(model, config)}
        selected = [n for n in names if id(modules[n]) in chosen]  # under all their names
        return _one_name_each(model, _without_excluded(selected, config.exclude_modules, names),
                              selected)
    selected = _selected_targets(model, spec, names)
    targets = _one_name_each(model, _without_excluded(selected, config.exclude_modules, names),
                             selected)
    # as in peft: a linear inside a module to save trains in full and gets no adapter
    inside = _inside_saved_modules(model, config.modules_to_save)
    modules = dict(model.named_modules(remove_duplicate=False))
    kept = [n for n in targets if id(modules[n]) not in inside]
    target_ids, kept_ids = {id(modules[n]) for n in targets}, {id(modules[n]) for n in kept}
    for key in spec if isinstance(spec, list) else []:  # (by any name of a shared module)
        named = {id(modules[n]) for n in selected if suffix_match(n, key)}
        if named & target_ids and not named & kept_ids:
            raise ValueError(f"target module {key!r} matches only modules inside "
                             f"modules_to_save {config.modules_to_save}, which train in full "
                             "and get no adapter (as in peft); leave it out of one of the two")
    if targets and not kept:  # (none at all: `inject_increlora` says why)
        raise ValueError(f"target_modules={spec!r}: every target lies inside modules_to_save "
                         f"{config.modules_to_save}, which trains it in full and gives it no "
                         "adapter (as in peft); nothing would be adapted")
    holders = _unregistered_holders(model)
    for n in kept:
        _refuse_weight_readers(model, n, holders)
    return kept


def _one_name_each(model: nn.Module, kept: List[str], selected: List[str]) -> List[str]:
    """The modules of ``kept`` (of the names ``selected``, less the excluded) under their first
    names, in module order, less those excluded under another name: a module registered under
    several names is adapted once, and left out when any of its names is excluded."""
    modules = dict(model.named_modules(remove_duplicate=False))
    left_out = set(selected) - set(kept)
    return _first_names(model, {id(modules[n]) for n in kept} - {id(modules[n]) for n in left_out})


def _first_names(model: nn.Module, chosen: Set[int]) -> List[str]:
    """The first names (`named_modules`'), in module order, of the submodules whose ids are in
    ``chosen``."""
    return [n for n, m in model.named_modules() if n and id(m) in chosen]


def _in_parametrizations(name: str, model: nn.Module) -> bool:
    """Whether module ``name`` lies in the ``parametrizations`` a ``torch.nn.utils.parametrize``
    registration adds to a layer (the parametrization modules, such as weight_norm's)."""
    parts = name.split(".")
    if "parametrizations" not in parts:
        return False
    owner = ".".join(parts[:parts.index("parametrizations")])
    return parametrize.is_parametrized(model.get_submodule(owner) if owner else model)


def _selected_targets(model: nn.Module, spec, names: List[str]) -> List[str]:
    """The linears the ``target_modules`` value ``spec`` (None, a regex string or a list of
    suffixes) selects; raises where it selects nothing or names what is not a linear."""
    if isinstance(spec, str):
        matched = [n for n in names if re.fullmatch(spec, plain_name(n))]
        if not matched:
            plain = [plain_name(n) for n in names]
            as_suffix = next((n for n in plain if suffix_match(n, spec)), None)
            partial = next((n for n in plain if re.search(spec, n)), None)
            if as_suffix is not None:
                hint = (f"a regex must match the full name, such as {as_suffix!r}; to match "
                        f"name suffixes pass a list: target_modules=[{spec!r}]")
            elif partial is not None:
                hint = (f"a regex must match the full name, and it matches only part of names "
                        f"such as {partial!r}; to match names ending in it use "
                        f"target_modules={'(?:.*[.])?(?:' + spec + ')'!r}")
            else:
                hint = f"similar names: {_similar_names(spec, names)}"
            raise ValueError(f"target_modules regex {spec!r} matches no module name; {hint}")
    else:
        suffixes = list(DEFAULT_TARGET_MODULES) if spec is None else spec
        matched = [n for n in names if any(suffix_match(n, s) for s in suffixes)]
        if spec is None and not matched:
            raise ValueError("target_modules=None found none of the default attention/FFN names "
                             f"{list(DEFAULT_TARGET_MODULES)}; set target_modules")
        if spec is not None:
            for s in spec:
                if not any(suffix_match(n, s) for n in names):
                    raise ValueError(f"target module {s!r} matches no module name; "
                                     f"similar names: {_similar_names(s, names)}")
    modules = dict(model.named_modules(remove_duplicate=False))
    targets = []
    for n in matched:
        module = modules[n]
        if isinstance(module, IncreLoRALinear) or _wrapped_by_adapter(n, modules):
            continue
        if is_supported_base(module):
            targets.append(n)
        elif spec is not None and isinstance(module, nn.Linear):
            raise TypeError(f"target module {n!r} is a {class_name(type(module))}, an nn.Linear "
                            f"subclass that cannot take an adapter added onto its output: "
                            f"{own_forward_problem(module)}; IncreLoRA adapts nn.Linear and "
                            "subclasses whose forward is F.linear(x, weight, bias) (bitsandbytes "
                            "4-bit and 8-bit included) and transformers Conv1D layers")
        elif spec is not None and not any(is_supported_base(m) for m in module.modules()):
            raise TypeError(f"target_modules selects {n!r}, a {class_name(type(module))}; "
                            "IncreLoRA adapts nn.Linear (bitsandbytes 4-bit and 8-bit included) "
                            f"and transformers Conv1D layers: {_linear_names(modules)}")
    if isinstance(spec, list):  # as in peft, a listed name must name linears, not their parents
        for s in spec:
            if not any(suffix_match(n, s) for n in targets):
                n = next(n for n in matched if suffix_match(n, s))
                kind = type(modules[n])
                raise TypeError(f"target module {s!r} matches only modules that are not nn.Linear "
                                f"or Conv1D, e.g. {n!r}, a {kind.__module__}.{kind.__qualname__}; "
                                "name the linear layers inside it instead")
    elif not targets and not any(isinstance(modules[n], nn.Linear) for n in matched):
        n = matched[0]  # (a regex, or the default names, matching only parents of linears)
        raise TypeError(f"target_modules={spec!r} matches only modules that are not nn.Linear "
                        f"or Conv1D, e.g. {n!r}, a {class_name(type(modules[n]))}; match the "
                        f"linear layers inside them instead: {_linear_names(modules)}")
    return targets


def _linear_names(modules: Dict[str, nn.Module]) -> str:
    """A few of the names of the layers IncreLoRA can adapt among ``modules`` (for an error
    message), as the plain model names them."""
    names = [plain_name(n) for n, m in modules.items() if n and is_supported_base(m)]
    if not names:
        return "this model has none"
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return f"this model's linears are {', '.join(repr(n) for n in names[:4])}{more}"


def saved_module_names(model: nn.Module, modules_to_save: Optional[List[str]]) -> List[str]:
    """The names (each module's first, `named_modules`) of the modules ``modules_to_save``
    entries select: those any of whose names ends in an entry (a module registered under
    several names is selected by each, as by ``target_modules``)."""
    keys = modules_to_save or []
    return _first_names(model, {id(m) for n, m in model.named_modules(remove_duplicate=False)
                                if n and any(suffix_match(n, key) for key in keys)})


def _inside_saved_modules(model: nn.Module, modules_to_save: Optional[List[str]]) -> Set[int]:
    """The ids of the modules to save (`saved_module_names`) and of every module inside them."""
    return {id(m) for root in saved_module_names(model, modules_to_save)
            for m in model.get_submodule(root).modules()}


def saved_root(name: str, modules_to_save: Optional[List[str]]) -> Optional[str]:
    """The ``modules_to_save`` entry (a module-name suffix) that module ``name`` lies in (or
    is), or None."""
    prefixes = [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]
    return next((key for key in modules_to_save or []
                 if any(suffix_match(p, key) for p in prefixes)), None)


def _without_excluded(targets: List[str], exclude, names: List[str]) -> List[str]:
    """``targets`` less those ``exclude`` (``exclude_modules``) names, as in peft: a regex string
    matched against the full name, or suffixes; an entry that leaves no target out, or an
    exclusion that leaves none in, raises ValueError."""
    if exclude is None or exclude == [] or not targets:  # (none: `inject_increlora` says so)
        return targets
    if isinstance(exclude, str):
        kept = [n for n in targets if not re.fullmatch(exclude, plain_name(n))]
        if len(kept) == len(targets):
            raise ValueError(f"exclude_modules regex {exclude!r} matches none of the "
                             f"{len(targets)} target modules (it must match the full name, "
                             f"such as {plain_name(targets[0])!r})")
    else:
        for key in exclude:
            if not any(suffix_match(n, key) for n in targets):
                holder = next((n for n in names if suffix_match(n, key)), None)
                inside = holder is not None and any(n.startswith(holder + ".")
                                                    for n in targets)
                where = (f"it names {holder!r}, not a target; an entry leaves out the targets "
                         "whose own name ends in it, so leave out the targets inside it with "
                         f"a regex string such as r'{re.escape(holder)}\\..*'" if inside else
                         f"it names {holder!r}, which is not a target and holds none"
                         if holder is not None else
                         f"similar names: {_similar_names(key, names)}")
                raise ValueError(f"exclude_modules entry {key!r} leaves out none of the "
                                 f"{len(targets)} target modules ({where})")
        kept = [n for n in targets if not any(suffix_match(n, key) for key in exclude)]
    if not kept:
        raise ValueError(f"exclude_modules={exclude!r} leaves out every one of the "
                         f"{len(targets)} target modules; nothing would be adapted")
    return kept


def _wrapped_by_adapter(name: str, modules: Dict[str, nn.Module]) -> bool:
    """Whether the module ``name`` is the layer an IncreLoRALinear wraps (its ``base_layer``);
    a user's own module of that name is not."""
    parent, _, child = name.rpartition(".")
    return child == "base_layer" and isinstance(modules.get(parent), IncreLoRALinear)


def _all_linear_targets(model: nn.Module, config: IncreLoRAConfig) -> List[str]:
    """peft's ``"all-linear"``: every linear but the output layer (``get_output_embeddings``),
    those inside ``modules_to_save`` (trained in full) and those whose parent or another ancestor
    computes with their weight without calling them or that a plain container holds too
    (`_unregistered_holders`): their adapter would never run; one warning names them."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    modules = dict(model.named_modules())
    holders = _unregistered_holders(model)
    inside = _inside_saved_modules(model, config.modules_to_save)
    targets, skipped = [], []
    for n, module in modules.items():
        if (not n or not is_supported_base(module) or module is head
                or _wrapped_by_adapter(n, modules) or id(module) in inside):
            continue
        reason = direct_weight_reader(model, n) or holders.get(id(module))
        if reason is None:
            targets.append(n)
        else:
            skipped.append(f"{n!r} ({reason})")
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"inject_increlora: target_modules='all-linear' leaves out {len(skipped)} "
                      "linear(s) whose parent or another ancestor computes with their weight "
                      "without calling them, or that a plain container holds too, so an "
                      "adapter there would never run: "
                      f"{', '.join(skipped[:3])}{more}")
    fused = _fused_expert_modules(modules)
    if fused:
        more = f" and {len(fused) - 3} more" if len(fused) > 3 else ""
        warnings.warn(f"inject_increlora: target_modules='all-linear' adapts no mixture-of-"
                      f"experts weights in {len(fused)} module(s) that hold them as one 3-D "
                      "parameter per weight (transformers 5's fused experts), which IncreLoRA "
                      "does not adapt; their experts stay frozen: "
                      f"{', '.join(repr(n) for n in fused[:3])}{more}")
    return targets


def _fused_expert_modules(modules: Dict[str, nn.Module]) -> List[str]:
    """Names of the modules holding a mixture of experts' weights fused into parameters of 3 or
    more dimensions (one slice per expert; transformers 5's ``MixtralExperts``,
    ``Qwen2MoeExperts``, ...): class names with ``Experts`` and such a parameter of their own.
    No linear layer holds them, so ``"all-linear"`` leaves them out."""
    return [n for n, m in modules.items()
            if "Experts" in type(m).__name__
            and any(p.dim() >= 3 for p in m.parameters(recurse=False))]


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


# Methods that set weights up rather than compute with them.
_SETUP_METHODS = re.compile(r"(^__init__$|init|reset_parameters|extra_repr|__repr__|tie)")
# Reading these from a weight only describes it (dtype casts, device checks): harmless.
_METADATA_NAMES = r"(dtype|device|shape|size|ndim|numel|requires_grad|is_\w+|element_size)"


# The guard of one direct read: an ``if`` (or ``x if c else y``) test and whether the read lies
# in its true branch.
_Guard = Tuple[ast.expr, bool]


# A module's path below an ancestor: its names (an attribute, or a container's key: "0").
_Path = Tuple[str, ...]
# A path as a method's source spells it from ``self``: each attribute name or constant key, or
# None for an index that is not a constant (``self.blocks[i]``: any entry).
_Steps = Tuple[Optional[str], ...]
# One ``self.<steps>.weight`` a method computes with, and its guards (enclosing ``if`` tests).
_Read = Tuple[_Steps, Tuple[_Guard, ...]]


def _source_path(path: _Path) -> str:
    """``path`` as source reads it from ``self``: ``self.blocks[0].fc``."""
    return "self" + "".join(f".{p}" if p.isidentifier() else f"[{p}]" for p in path)


def _ast_steps(node: ast.AST, owner: str) -> Optional[_Steps]:
    """The steps of ``node`` when it is ``owner`` (the method's first argument, ``self``)
    followed by attributes and subscripts."""
    steps: List[Optional[str]] = []
    while not (isinstance(node, ast.Name) and node.id == owner):
        if isinstance(node, ast.Attribute):
            steps.append(node.attr)
        elif isinstance(node, ast.Subscript):
            steps.append(str(node.slice.value) if isinstance(node.slice, ast.Constant) else None)
        else:
            return None
        node = node.value
    return tuple(reversed(steps))


def _reaches(steps: _Steps, path: _Path) -> bool:
    """Whether source ``steps`` may name the module at ``path``: each step is its name (an
    attribute, or a ModuleDict's key), or a non-constant index into a list of modules."""
    return len(steps) == len(path) and all(
        step == part if step is not None else not part.isidentifier()
        for step, part in zip(steps, path))


def _weight_reads(fn: object) -> List[_Read]:
    """Each ``self.<steps>.weight`` (below ``self``: at least one step) that the code of ``fn``
    computes with, not only reading its dtype, device or shape nor asking ``isinstance`` of it,
    with its guards. Read from the syntax tree, so that words in a docstring or comment are no
    read; none for a function without source to read (a class made by ``exec``)."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return []
    if ".weight" not in source:  # most methods: no tree to build
        return []
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:  # (a source inspect cuts from a larger statement: none to read)
        return []
    # the module is the method's first argument, whatever its name (``def forward(s, x)``)
    function = tree.body[0] if tree.body else None
    args = (function.args.posonlyargs + function.args.args
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) else [])
    owner = args[0].arg if args else "self"
    reads: List[_Read] = []

    def visit(node: ast.AST, parent: Optional[ast.AST], guards: Tuple[_Guard, ...]) -> None:
        if (isinstance(node, ast.Attribute) and node.attr == "weight"
                and not (isinstance(parent, ast.Attribute)
                         and re.fullmatch(_METADATA_NAMES, parent.attr))
                and not (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name)
                         and parent.func.id == "isinstance" and parent.args[:1] == [node])):
            steps = _ast_steps(node.value, owner)
            if steps:  # (``self.weight``: the module's own)
                reads.append((steps, guards))
        for field, value in ast.iter_fields(node):
            inner = guards
            if isinstance(node, (ast.If, ast.IfExp)) and field in ("body", "orelse"):
                inner = guards + ((node.test, field == "body"),)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ast.AST):
                    visit(item, node, inner)

    visit(tree, None, ())
    return reads


@functools.lru_cache(maxsize=None)
def _own_weight_reads(klass: type) -> Tuple[Tuple[str, Tuple[_Read, ...]], ...]:
    """Each method that ``klass`` itself defines and that computes with the weight of a module
    below it (`_weight_reads`): its qualified name and those reads. Read once per class (a
    base class such as transformers' PreTrainedModel is shared by every model and target)."""
    found = []
    for attr, fn in vars(klass).items():
        if _SETUP_METHODS.search(attr) or not inspect.isfunction(fn):
            continue
        reads = _weight_reads(fn)
        if reads:
            found.append((f"{klass.__name__}.{attr}", tuple(reads)))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _weight_reading_methods(cls: type, path: _Path
                            ) -> Tuple[Tuple[str, Tuple[Tuple[_Guard, ...], ...]], ...]:
    """Each method of ``cls`` (torch's own classes included) whose code computes with
    ``self.<path>.weight`` directly instead of calling that module, by name, with the guards of
    each such read."""
    found = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for method, reads in _own_weight_reads(klass):
            guards = tuple(g for steps, g in reads if _reaches(steps, path))
            if guards:
                found.append((method, guards))
    return tuple(found)


_UNKNOWN = object()
_COMPARE = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_,
            ast.IsNot: operator.is_not}


def _config_value(expr: ast.expr, owner: nn.Module, configs: List[object]) -> object:
    """The value of ``expr`` in a method of ``owner`` where it is fixed by the model's config:
    a constant, ``self.config.<name>`` or ``self.<name>`` equal to a config's ``<name>`` (set
    from the config when the module was built), compared or combined with and/or/not;
    `_UNKNOWN` for anything else (an argument, ``self.training``, a global, a tensor)."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) \
            and expr.value.id == "self" and expr.attr != "training":
        value = getattr(owner, expr.attr, _UNKNOWN)
        if not _plain(value) or not any(_plain(getattr(c, expr.attr, _UNKNOWN))
                                        and getattr(c, expr.attr) == value for c in configs):
            return _UNKNOWN
    elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Attribute) \
            and isinstance(expr.value.value, ast.Name) and expr.value.value.id == "self" \
            and expr.value.attr == "config" \
            and any(c is getattr(owner, "config", None) for c in configs):
        value = getattr(owner.config, expr.attr, _UNKNOWN)
    elif isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        value = _config_value(expr.operand, owner, configs)
        return _UNKNOWN if value is _UNKNOWN else not value
    elif isinstance(expr, ast.BoolOp):  # its value, as Python gives it (compared: `tp or 1`)
        for operand in expr.values:
            value = _config_value(operand, owner, configs)
            if value is _UNKNOWN or bool(value) is isinstance(expr.op, ast.Or):
                return value  # unknown, or the operand that settles it
        return value
    elif isinstance(expr, ast.Compare) and all(type(op) in _COMPARE for op in expr.ops):
        values = [_config_value(v, owner, configs) for v in [expr.left] + expr.comparators]
        if any(v is _UNKNOWN for v in values):
            return _UNKNOWN
        try:
            return all(_COMPARE[type(op)](a, b)
                       for op, a, b in zip(expr.ops, values, values[1:]))
        except TypeError:
            return _UNKNOWN
    else:
        return _UNKNOWN
    return value if _plain(value) else _UNKNOWN


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _config_truth(expr: ast.expr, owner: nn.Module, configs: List[object]) -> object:
    """The truth of ``expr`` as an ``if`` test (`_config_value`), or `_UNKNOWN`: an ``and``
    or ``or`` is settled by one operand the config decides (``self.training and
    self.config.x`` with ``x`` false) even where its value is not known."""
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        truth = _config_truth(expr.operand, owner, configs)
        return _UNKNOWN if truth is _UNKNOWN else not truth
    if isinstance(expr, ast.BoolOp):
        truths = [_config_truth(v, owner, configs) for v in expr.values]
        decisive = isinstance(expr.op, ast.Or)  # the truth that settles it
        if any(t is not _UNKNOWN and t is decisive for t in truths):
            return decisive
        return not decisive if all(t is not _UNKNOWN for t in truths) else _UNKNOWN
    value = _config_value(expr, owner, configs)
    return _UNKNOWN if value is _UNKNOWN else bool(value)


def _skipped(test: ast.expr, taken: bool, owner: nn.Module, configs: List[object]) -> bool:
    """Whether the config decides the ``if`` test ``test`` against the branch ``taken``."""
    truth = _config_truth(test, owner, configs)
    return truth is not _UNKNOWN and truth is not taken


def _configs(model: nn.Module, name: str) -> List[object]:
    """The ``config`` attributes (transformers configs) of ``model`` and of the modules on the
    way down to module ``name``."""
    parts = name.split(".")
    holders = [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
    configs = [getattr(m, "config", None) for m in holders]
    return [c for c in configs if c is not None and not isinstance(c, (nn.Module, torch.Tensor))]


def direct_weight_reader(model: nn.Module, name: str) -> Optional[str]:
    """Why an adapter on module ``name`` would be skipped, or None when it is always called.

    A parent that computes with its child's weight without calling the child (nn.MultiheadAttention
    with out_proj, Mamba mixers with their projections) would bypass the adapter, and so would a
    module further up reading it through a path (``F.linear(h, self.attn.proj.weight)``,
    ``self.blocks[0].fc.weight @ x``). Found by reading the source of the parent and of every
    other ancestor for ``self.<path>.weight`` used other than for its dtype, device or shape;
    torch's TransformerEncoderLayer is adapted instead (its fast path is kept off, see
    `_keep_module_path`). A read under an ``if`` that the model's config decides and that is
    false for this model (Bloom's ``pretraining_tp > 1 and slow_but_exact``) cannot happen and
    does not count: decided here, once, from the values the model holds now.
    """
    parts = tuple(name.split("."))
    parent, child = _parent(model, name), parts[-1]
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention reads out_proj.weight and out_proj.bias directly and "
                "never calls out_proj")
    configs: Optional[List[object]] = None
    for depth in range(len(parts) - 1, -1, -1):  # the parent first, then up to the model
        owner, path = model.get_submodule(".".join(parts[:depth])), parts[depth:]
        if depth == len(parts) - 1 and isinstance(owner, nn.TransformerEncoderLayer) \
                and child in ("linear1", "linear2"):
            continue
        methods = _weight_reading_methods(type(owner), path)
        if methods and configs is None:
            configs = _configs(model, name)
        for method, reads in methods:
            if any(not any(_skipped(test, taken, owner, configs) for test, taken in guards)
                   for guards in reads):
                where = "" if depth == len(parts) - 1 else \
                    f" (module {'.'.join(parts[:depth])!r})" if depth else " (the model)"
                return (f"{method}{where} computes with {_source_path(path)}.weight directly "
                        "instead of calling it")
    return None


# The attributes every nn.Module has in its ``__dict__`` (its registries and hook tables).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _unregistered_holders(model: nn.Module) -> Dict[int, str]:
    """{id(module): where} for each module of ``model`` that a module also holds in a plain
    Python list, tuple or dict attribute (``self.steps = [self.cell]``), not registered: the
    container keeps the layer `inject_increlora` replaces, so calls through it would skip the
    adapter. ``where`` says so, for a refusal or warning."""
    mine = {id(m) for m in model.modules()}
    found: Dict[int, str] = {}
    for owner_name, owner in model.named_modules():
        for attr, value in vars(owner).items():
            if attr in _MODULE_INTERNALS or not isinstance(value, (list, tuple, dict)):
                continue
            for item in value.values() if isinstance(value, dict) else value:
                if isinstance(item, nn.Module) and id(item) in mine:
                    found.setdefault(id(item), (
                        f"{f'module {owner_name!r}' if owner_name else 'the model'} also "
                        f"holds it in the plain "
                        f"{type(value).__name__} {attr!r}, not registered, which would keep "
                        "the unadapted layer (hold it in an nn.ModuleList or nn.ModuleDict "
                        "instead)"))
    return found


def _refuse_weight_readers(model: nn.Module, name: str, holders: Dict[int, str]) -> None:
    """Refuse a target whose parent or another ancestor computes with the target's weight
    without calling it, so an adapter there would be skipped (silently, now that the wrapper
    exposes ``weight``); or that a plain container holds too (``holders``,
    `_unregistered_holders`), whose calls would skip it."""
    reason = direct_weight_reader(model, name) or holders.get(id(model.get_submodule(name)))
    if reason is not None:
        raise ValueError(f"target module {name!r} cannot be adapted: {reason}, so its adapter "
                         "would be skipped; target other modules")


def _keep_module_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. torch's TransformerEncoderLayer skips its fused inference fast
    path, which reads linear1/linear2 weights without calling them (and so would skip their
    adapters), whenever one of its modules has a hook."""
    return None


def keep_adapters_in_fast_paths(model: nn.Module) -> None:
    """Keep the fused inference fast path off (`_keep_module_path`) in every
    nn.TransformerEncoderLayer of ``model`` that holds an IncreLoRA layer as a child, so that
    its adapters run in eval under no_grad too. `inject_increlora` does it for the layers it
    adds; `IncreLoRAController` and `create_optimizer` do it again for layers built by hand
    (the layer cannot: it does not know its parent). Adds each hook once."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
                isinstance(child, IncreLoRALinear) for child in module.children()) and not any(
                hook is _keep_module_path for hook in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_keep_module_path)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _peft_adapter_layer(model: nn.Module) -> Optional[str]:
    """Name of a peft adapter layer (a peft ``BaseTunerLayer``, e.g. lora.Linear) in ``model``."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # not imported: no model holds them
    if tuners is None:
        return None
    return next((n for n, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)),
                None)


def _packed_parameter(module: nn.Module) -> Optional[str]:
    """The name of the first parameter of ``module`` holding quantized data: of an integer
    dtype, or the weight of a bitsandbytes layer (its packed data may be stored as a float,
    ``quant_storage``); None without one."""
    quantized = {id(m.weight) for m in module.modules() if is_quantized_base(m)}
    return next((name for name, p in module.named_parameters()
                 if id(p) in quantized or not (p.is_floating_point() or p.is_complex())), None)


def inject_increlora(model: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """Replace the targeted linears of ``model`` in place with `IncreLoRALinear`.

    Every other parameter is frozen except those of ``config.modules_to_save``. The config is
    attached to the model as ``model.increlora_config``. Returns the model. bitsandbytes 4-bit
    layers no longer repack their weights for CPU inference (`_keep_4bit_weights_trainable`):
    gradients through a repacked weight are wrong.

    Everything is checked before the model is changed, and a failure while wrapping undoes
    what was done: a call that raises leaves the model exactly as it was.

    A ``torch.compile`` or DataParallel wrapper is seen through (`unwrapped`): the model it
    holds is adapted under its own names and holds the config, and the wrapper is returned.
    A model wrapped in DistributedDataParallel is refused: inject before wrapping it.

    Raises:
        ValueError: a target or a module to save matches nothing (the message lists similar
            names), the model is already injected, wrapped in DistributedDataParallel or holds
            peft adapter layers or uninitialized lazy parameters (``nn.LazyLinear`` before
            its first forward), the model is one linear layer (none inside it to replace),
            the rank budget does not fit the modules, or a target's
            weights are still on the meta device.
        TypeError: a target is neither a linear layer nor contains one, or a listed name or
            the regex matches only parents of linear layers.
    """
    config.validate()  # a field may have changed since the config was made
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise ValueError("inject_increlora into a model wrapped in DistributedDataParallel: "
                         "DDP registered the parameters to average when it was built, so the "
                         "adapters' gradients would never be averaged across ranks; inject "
                         "into the model first, then wrap it")
    wrapper, model = model, unwrapped(model)
    if getattr(model, CONFIG_ATTR, None) is not None or any(
            isinstance(m, IncreLoRALinear) for m in model.modules()):
        raise ValueError("model already holds IncreLoRA layers; inject once per model")
    peft_layer = _peft_adapter_layer(model)
    if peft_layer is not None:
        raise ValueError(f"model holds peft adapter layers (e.g. {peft_layer!r}), which injection "
                         "would freeze and skip; merge them into the base first (peft's "
                         "merge_and_unload()) or inject into the model without them")
    lazy = next((n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)), None)
    if lazy is not None:  # (freezing the model would fail on it, in torch's words)
        holder = lazy.rpartition(".")[0]
        holder = f"module {holder!r}" if holder else "the model"
        raise ValueError(f"inject_increlora: {holder} holds an uninitialized lazy "
                         f"parameter ({lazy!r}, of a Lazy* module such as nn.LazyLinear): run "
                         "one forward with a dummy batch first to initialize it, then inject")
    if is_supported_base(model) and next(model.children(), None) is None:
        raise ValueError(f"inject_increlora: the model itself is a {class_name(type(model))} "
                         "with no submodules, and injection replaces layers inside a model in "
                         "place; wrap it (model = nn.Sequential(layer)) and target its name '0'")
    targets = _find_targets(model, config)
    if not targets:
        own = {type(m): f"{class_name(type(m))}: {own_forward_problem(m)}"
               for m in model.modules() if isinstance(m, nn.Linear) and not is_supported_base(m)}
        hint = (f"; nn.Linear subclasses whose forward is not F.linear(x, weight, bias) are not "
                f"wrapped, such as this model's {'; '.join(sorted(own.values()))}" if own else "")
        raise ValueError(f"target_modules={config.target_modules!r} selected no module to adapt: "
                         "IncreLoRA adapts nn.Linear (bitsandbytes 4-bit and 8-bit included) "
                         f"and transformers Conv1D layers{hint}")
    config.total_budget(len(targets))
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for key in config.modules_to_save or []:
        if not any(suffix_match(n, key) for n in names):
            raise ValueError(f"modules_to_save entry {key!r} matches no module name; "
                             f"similar names: {_similar_names(key, names)}")
    save_roots = saved_module_names(model, config.modules_to_save)
    for root in save_roots:  # trained in full: a 4/8-bit weight cannot take a gradient
        inner = _packed_parameter(model.get_submodule(root))
        if inner is not None:
            packed = f"{root}.{inner}"
            raise ValueError(f"modules_to_save entry {root!r} holds {packed!r}, quantized data "
                             f"({model.get_parameter(packed).dtype}) that cannot be trained in "
                             "full; leave it out of modules_to_save (adapt its linears with "
                             "target_modules instead) or load that module unquantized "
                             "(transformers: BitsAndBytesConfig(llm_int8_skip_modules="
                             f"[{root!r}]))")
    for name in targets:
        for pname, p in model.get_submodule(name).named_parameters():
            if p.is_meta:
                raise ValueError(f"target module {name!r} has its {pname} on the meta device: "
                                 "load the base weights first (e.g. to_empty() then "
                                 "load_state_dict(), or from_pretrained), then inject; the "
                                 "adapter's slot bookkeeping needs real tensors")
    # Nothing has changed yet; build every layer first, and undo everything if one fails.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    originals = {name: model.get_submodule(name) for name in targets}
    names_of: Dict[int, List[str]] = {}
    for alias, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(alias)
    aliases = {name: names_of[id(module)] for name, module in originals.items()}
    try:
        wrapped = {name: IncreLoRALinear(
            base, r_max=config.r_max, init_r=config.init_r, reserve_rank=config.incre_rank_num,
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            reserve_lambda=config.reserve_lambda, advance_learning=config.advance_learning,
            adapter_dtype=config.adapter_dtype)
            for name, base in originals.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in wrapped.items():
            for alias in aliases[name]:  # a module registered under several names
                _set_submodule(model, alias, layer)
        # each layer learns its model, so that layer.merge() refuses tied base weights too
        parameters = _names_by_id(model.named_parameters(remove_duplicate=False))
        modules = _names_by_id(model.named_modules(remove_duplicate=False))
        for layer in wrapped.values():
            layer._attach_model(model, parameters, modules)
        keep_adapters_in_fast_paths(model)
        for root in save_roots:
            for p in model.get_submodule(root).parameters():
                p.requires_grad_(True)
    except BaseException:
        for name, base in originals.items():
            for alias in aliases[name]:
                _set_submodule(model, alias, base)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    _keep_4bit_weights_trainable(model)
    setattr(model, CONFIG_ATTR, config)
    _warn_narrow(wrapped, config.r_max)
    _warn_frozen_head(model)
    return wrapper


# The heads of transformers' task models by the class name's ending, as peft's task types name
# them (`integrations.peft_export.PEFT_TASK_MODULES`): trained in full by peft's task_type.
TASK_HEADS = {"ForSequenceClassification": ("pre_classifier", "classifier", "score",
                                             "classification_head"),
              "ForTokenClassification": ("classifier", "score"),
              "ForQuestionAnswering": ("qa_outputs",)}


def _warn_frozen_head(model: nn.Module) -> None:
    """One warning when ``model`` is a transformers task model (sequence or token
    classification, question answering) with a linear in its head neither adapted nor in
    ``modules_to_save``, so frozen: a head ``from_pretrained`` initialised at random would
    never train (peft's ``task_type`` trains it in full; IncreLoRAConfig has no task type). A
    head of several linears (RoBERTa's ``dense`` and ``out_proj``) counts each, and a head of
    several modules (DistilBERT's ``pre_classifier`` and ``classifier``) each module."""
    names = next((h for end, h in TASK_HEADS.items() if type(model).__name__.endswith(end)), ())
    frozen: Dict[str, List[str]] = {}
    for name in names:
        head = getattr(model, name, None)
        if not isinstance(head, nn.Module):
            continue
        adapted = {id(inner) for m in head.modules() if isinstance(m, IncreLoRALinear)
                   for inner in m.modules()}
        parts = [f"{name}.{n}" if n else name for n, m in head.named_modules()
                 if id(m) not in adapted and is_supported_base(m)
                 and not any(p.requires_grad for p in m.parameters())]
        if parts:
            frozen[name] = parts
    if frozen:
        shown = ", ".join(repr(n) for parts in frozen.values() for n in parts)
        warnings.warn(f"inject_increlora: the head of {type(model).__name__} leaves {shown} "
                      "frozen (neither a target nor in modules_to_save); a head that "
                      "from_pretrained initialised at random would never train: add "
                      f"modules_to_save={list(frozen)} (what peft's task_type does), or ignore "
                      "this if the head is trained already", UserWarning, stacklevel=3)


def _keep_4bit_weights_trainable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of the model's 4-bit linears and unpack a weight
    it already repacked. bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-bf16 kernels
    at a CPU forward in inference (eval mode, input without grad: a Trainer's evaluate,
    generate) and computes a repacked weight with a kernel that has no autograd: gradients
    through it, to every adapter before it, would be silently wrong."""
    for module in model.modules():
        if not (is_quantized_base(module) and hasattr(module, "support_avx512bf16_for_cpu")):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state)


def _warn_narrow(layers: Dict[str, IncreLoRALinear], r_max: int) -> None:
    """One warning naming the layers whose ``min(in, out)`` is below ``r_max``: rank beyond
    it adds nothing such a layer can express, yet allocation may spend budget on it (peft
    accepts such a rank silently)."""
    narrow = [(name, layer) for name, layer in layers.items()
              if min(layer.in_features, layer.out_features) < r_max]
    if not narrow:
        return
    shown = ", ".join(f"{name!r} ({layer.in_features} -> {layer.out_features})"
                      for name, layer in narrow[:3])
    more = f" and {len(narrow) - 3} more" if len(narrow) > 3 else ""
    warnings.warn(f"inject_increlora: r_max={r_max} exceeds min(in, out) of {len(narrow)} "
                  f"target module(s): {shown}{more}; rank beyond that adds nothing such a "
                  "layer can express, but allocation may still grow it there (leave these "
                  "modules out of target_modules, or lower r_max)", UserWarning, stacklevel=3)


def increlora_layers(model: nn.Module) -> Iterator[Tuple[str, IncreLoRALinear]]:
    """(name, layer) for every IncreLoRA layer, in module order. Named as in the model's state
    dict: without the ``_fsdp_wrapped_module`` of the FSDP1 units wrapping a layer or the
    model, and under the model a ``torch.compile`` or (Distributed)DataParallel wrapper holds
    (`unwrapped`: no ``_orig_mod.`` or ``module.``): the plain model's names (`plain_name`)."""
    for name, module in unwrapped(model).named_modules():
        if isinstance(module, IncreLoRALinear):
            yield plain_name(name), module


def _float_average(avg_fn: Callable, averaged: torch.Tensor, current: torch.Tensor,
                   n_averaged: torch.Tensor) -> torch.Tensor:
    """``avg_fn`` of torch's ``AveragedModel`` for a float or complex tensor; another tensor's
    average is the source's tensor as it is."""
    if averaged.data_ptr() != current.data_ptr() and (averaged.is_floating_point()
                                                      or averaged.is_complex()):
        return avg_fn(averaged, current, n_averaged)
    return current  # (a frozen parameter shared with the source: torch's copy_ skips itself)


def _float_averages(multi_avg_fn: Optional[Callable], averaged: List[torch.Tensor],
                    current: List[torch.Tensor], n_averaged: torch.Tensor) -> None:
    """``multi_avg_fn`` (None: torch's SWA) of torch's ``AveragedModel``, which calls it per
    device and dtype, for float and complex tensors; others are copied from the source. The
    frozen parameters that the copy shares with the source are left out."""
    pairs = [(a, c) for a, c in zip(averaged, current) if a.data_ptr() != c.data_ptr()]
    if not pairs:
        return
    averaged, current = [a for a, _ in pairs], [c for _, c in pairs]
    if averaged[0].is_floating_point() or averaged[0].is_complex():
        (multi_avg_fn or get_swa_multi_avg_fn())(averaged, current, n_averaged)
    else:
        torch._foreach_copy_(averaged, current)


# Where bitsandbytes keeps the quantization state of a frozen weight beside it: on the weight
# (Params4bit.quant_state, Int8Params.CB / SCB), on its module (Linear4bit.quant_state) and in
# the state of an 8-bit linear after its first forward (Linear8bitLt.state.CB / SCB).
_QUANT_STATE_ATTRS = ("quant_state", "CB", "SCB")


def _frozen_memo(model: nn.Module, device: Optional[torch.device]) -> Dict[int, object]:
    """A ``copy.deepcopy`` memo mapping every parameter of ``model`` that requires no grad (on
    ``device``, where given) and its quantization state, if any, to itself: a copy made with it
    shares them with ``model``. Gives the state of bitsandbytes 8-bit linears not called yet
    the CB / SCB their first forward takes from the weight, leaving them on the weight too."""
    memo: Dict[int, object] = {}
    for module in model.modules():
        frozen = [p for p in module.parameters(recurse=False)
                  if not p.requires_grad and (device is None or p.device == device)]
        if not frozen:
            continue
        weight = getattr(module, "weight", None)
        if any(p is weight for p in frozen) and getattr(weight, "CB", None) is not None \
                and hasattr(module, "init_8bit_state"):
            # the 8-bit linear's first forward moves CB / SCB from its weight into its state,
            # and a second module sharing that weight would find them gone: both states hold
            # them, and the weight keeps them (bitsandbytes loads a state dict into it until a
            # forward takes them)
            module.state.CB, module.state.SCB = weight.CB, weight.SCB
        for holder in (*frozen, module, getattr(module, "state", None)):
            for key in _QUANT_STATE_ATTRS:
                value = getattr(holder, key, None)
                if value is not None:
                    memo[id(value)] = value
        memo.update((id(p), p) for p in frozen)
    return memo


def _moved_slots(mine: IncreLoRALinear, theirs: IncreLoRALinear) -> torch.Tensor:
    """The slots (a bool mask on ``mine``'s device) that ``theirs`` allocated or activated
    after ``mine``'s stamps: a stamp later than the one ``mine`` holds. `restart_schedules`
    and an earlier state loaded into the source only lower stamps: no slot moved."""
    later = [getattr(theirs, key).to(getattr(mine, key).device) > getattr(mine, key)
             for key in ("slot_alloc_step", "slot_active_step")]
    return later[0] | later[1]


def _slot_versions(theirs: Iterable[Tuple[str, IncreLoRALinear]],
                   mine: Iterable[Tuple[str, IncreLoRALinear]]) -> List[Tuple[int, int]]:
    """(``slot_version`` of the source's layer, of the copy's) per layer: a pair that changed
    marks slots that may have moved (`_moved_slots`)."""
    return [(t.slot_version, m.slot_version) for (_, t), (_, m) in zip(theirs, mine)]


class IncreLoRAAveragedModel(AveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` (SWA, EMA) for a model with IncreLoRA layers:
    the same arguments, and the layers' slot states and stamps (``slot_state``,
    ``slot_alloc_step``, ``slot_active_step``) copied from the source model at every
    `update_parameters`, with their host record (`IncreLoRALinear.latest_stamp`). Torch's class
    with ``use_buffers=True`` averages those integer buffers like the others, which rounds
    every growth away (a slot's state 0 + (1 - 0) / n is 0): the averaged model would go on
    computing with the slots it was made with, or with averaged stamps. Tensors that are no
    floats (the frozen uint8 / int8 weights of a bitsandbytes 4-bit or 8-bit base; integer
    buffers with ``use_buffers=True``) are copied from the source too: torch's EMA computes
    them in float and truncates, lowering their bytes at every update, and its SWA on CUDA
    fails on them (integer ``addcdiv``). A slot the source allocated (a fresh A row and B
    column) or activated (``normalize_on_activation`` rescales its A and B) since the last
    update restarts its average from the source's A row, B column and lambda entry: averaged
    with its earlier values, content the source no longer has, the new slot would for many
    EMA updates be mostly the old one. The restart sets the slot's average, while SWA's
    ``n_averaged`` stays the model's count. With ``scale_preserving_growth`` the averaged
    lambdas of a grown module's earlier active slots are scaled as the source's were, so that
    their part of dW stays what it was there too.

    The copy shares the parameters that require no grad when it is made (the frozen base
    weights, bitsandbytes' quantized ones with their quantization state) with the source
    instead of copying them, and updates skip them: the copy costs about the trainable
    parameters. The shared weights are the source's own, so what changes them in place changes
    both: ``load_state_dict`` on either, or a new base loaded into the source (a merge gives
    the merged side its own copy first); moving or converting the copy where that would change
    them (``.to()`` another device or dtype, ``.half()``) is refused (`_apply`).
    ``share_frozen=False`` copies everything, as torch's class does."""

    def __init__(self, model: nn.Module, device: Optional[torch.device] = None,
                 avg_fn: Optional[Callable] = None, multi_avg_fn: Optional[Callable] = None,
                 use_buffers: bool = False, share_frozen: bool = True) -> None:
        """torch's ``AveragedModel`` (the same arguments), its ``avg_fn`` or ``multi_avg_fn``
        (torch's SWA where neither is given) applied to float and complex tensors only. The
        copy's layers track no score (a copy made in a score window would, for good) and hold
        no score buffers (the dense gradient of ``exact_step_score`` among them).
        ``share_frozen``: share the parameters of ``model`` that require no grad (on
        ``device``, where given) with it rather than copy them."""
        # (partials of module functions: the averaged model pickles as torch's does)
        multi = None if avg_fn is not None and multi_avg_fn is None else functools.partial(
            _float_averages, multi_avg_fn)  # (where neither is given, torch's SWA)
        average = None if avg_fn is None else functools.partial(_float_average, avg_fn)
        # (where ``.to(device)`` puts a tensor: "cuda" is the current cuda:N, "cpu:0" is cpu)
        memo = _frozen_memo(model, None if device is None else torch.empty(0, device=device)
                            .device) if share_frozen else {}
        shared = frozenset(key for key, value in memo.items() if isinstance(value, nn.Parameter))
        # exact_step_score's dense buffers (an fp32 copy of every target weight while tracking)
        # are not copied only to be released below
        memo.update((id(layer.score_grad), None) for _, layer in increlora_layers(model)
                    if layer.score_grad is not None)
        # (torch's __init__ deep-copies what it is given: a placeholder where the memo applies)
        super().__init__(nn.Module() if memo else model, device, average, multi, use_buffers)
        if memo:
            self.module = copy.deepcopy(model, memo)
            if device is not None:  # (the shared parameters are on it already: left as they are)
                self.module = self.module.to(device)
        if shared:
            SHARED_FROZEN[self] = (weakref.ref(model), shared)
        for _, layer in increlora_layers(self.module):  # (no controller ever reads its scores)
            layer.score_enabled = False
            layer.release_score_buffers()
        self._slot_versions = _slot_versions(increlora_layers(model), increlora_layers(self.module))

    def _apply(self, fn: Callable, recurse: bool = True) -> "IncreLoRAAveragedModel":
        """torch's (``.to()``, ``.half()``, ``.cuda()``, ...), refused in one line, with nothing
        changed, where it would move or convert a frozen parameter that the copy shares with its
        live model or another live copy of it (``share_frozen``): that would change their base
        weights too."""
        entry = SHARED_FROZEN.get(self)
        if entry is not None:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    if id(p) not in entry[1] or all(m is self for m in shared_holders(p)):
                        continue
                    out = fn(p)
                    if out is not p and (out.device != p.device or out.dtype != p.dtype
                                         or out.data_ptr() != p.data_ptr()):
                        raise ValueError(
                            f"IncreLoRAAveragedModel: {name!r} is a frozen parameter the "
                            "averaged copy shares with its model or another copy of it, so "
                            "moving or converting the copy would change their base too; make "
                            "the copy with "
                            "device=... (it copies what is elsewhere), or with "
                            "share_frozen=False")
        return super()._apply(fn, recurse)

    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model``'s float parameters (and buffers with ``use_buffers=True``) into
        this copy; take its IncreLoRA layers' slot states and stamps, the A rows, B columns
        and lambdas of the slots it allocated or activated since the last update (with
        ``scale_preserving_growth``, the earlier lambdas of a grown module scaled as its
        are), and its tensors that are no floats (quantized base weights), as they are.

        Raises:
            ValueError: ``model``'s IncreLoRA layers are not this copy's (another model), or a
                layer of either is merged (`IncreLoRALinear.merge`), or a parameter the copy
                shares with ``model`` (frozen when it was made) now requires grad: its average
                would be ``model``'s current value. Nothing is changed.
        """
        mine_named = list(increlora_layers(self.module))
        theirs_named = list(increlora_layers(model))
        mine_names, theirs_names = [n for n, _ in mine_named], [n for n, _ in theirs_named]
        if mine_names != theirs_names:
            first = next(((t, m) for t, m in zip(theirs_names, mine_names) if t != m), None)
            where = "" if first is None else f"; first {first[0]!r} where it has {first[1]!r}"
            raise ValueError(f"IncreLoRAAveragedModel.update_parameters: the model's IncreLoRA "
                             f"layers ({len(theirs_names)}) are not the averaged copy's "
                             f"({len(mine_names)}){where}: pass the model it was made from")
        merged = next(((name, whose) for whose, named in (("the model", theirs_named),
                                                          ("the averaged copy", mine_named))
                       for name, layer in named if layer.merged), None)
        if merged is not None:  # (its base weight holds the adapter, which it skips)
            raise ValueError(f"IncreLoRAAveragedModel.update_parameters: layer {merged[0]!r} of "
                             f"{merged[1]} is merged (its adapter is in its base weight): "
                             "unmerge() it first")
        theirs = {id(p) for p in model.parameters()}
        unfrozen = next((name for name, p in self.module.named_parameters()
                         if p.requires_grad and id(p) in theirs), None)
        if unfrozen is not None:
            raise ValueError(f"IncreLoRAAveragedModel.update_parameters: {unfrozen!r} requires "
                             "grad now but was frozen when the averaged copy was made, which "
                             "shares it with the model, so its average would be the model's "
                             "current value: make the averaged model after unfreezing, or with "
                             "share_frozen=False")
        preserve = getattr(getattr(self.module, CONFIG_ATTR, None), "scale_preserving_growth",
                           False)
        # only where the slots changed since the last update (allocation rounds, a state loaded
        # into either): no device work or host read per layer at the other steps
        seen = self.__dict__.get("_slot_versions") or [None] * len(mine_named)  # (older pickle)
        changed = [now != last for now, last in
                   zip(_slot_versions(theirs_named, mine_named), seen)]
        with torch.no_grad():  # (before torch's update, which takes the source's buffers)
            moved = [_moved_slots(mine, theirs) if moves else None for (_, mine), (_, theirs),
                     moves in zip(mine_named, theirs_named, changed)]
            for (_, mine), (_, theirs), moves in zip(mine_named, theirs_named, changed):
                if not (preserve and moves):  # (condition_growth's preserve_scale, on averages)
                    continue
                old, new = mine.active_rank, theirs.active_rank
                if new > old > 0:
                    mine.lora_lambda[mine.active_mask] *= new / old
        super().update_parameters(model)
        with torch.no_grad():
            for (_, mine), (_, theirs), slots in zip(mine_named, theirs_named, moved):
                for key, where in (() if slots is None else (
                        ("lora_A", slots[:, None]), ("lora_B", slots), ("lora_lambda", slots))):
                    average, current = getattr(mine, key), getattr(theirs, key)
                    average.copy_(torch.where(where, current.to(average), average))
                for key in ("slot_state", "slot_alloc_step", "slot_active_step"):
                    getattr(mine, key).copy_(getattr(theirs, key))
                mine.mark_slots_changed()
                mine.last_stamp = None  # (a stamp of the source's run)
                mine.latest_stamp = getattr(theirs, "latest_stamp", None)  # (an older pickle)
        self._slot_versions = _slot_versions(theirs_named, mine_named)


# The mark FSDP1 sets on every parameter it flattens into a FlatParameter
# (torch.distributed.fsdp._common_utils.FSDP_FLATTENED).
_FSDP1_FLATTENED = "_fsdp_flattened"
# The attributes under which wrappers of a model or of its blocks hold the module they wrap,
# a part of every name below them that the plain model's names lack: FSDP1's units
# (torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE), torch's activation checkpointing
# (checkpoint_wrapper's _CHECKPOINT_WRAPPED_MODULE) and torch.compile (OptimizedModule).
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def plain_name(name: str) -> str:
    """The module, parameter or buffer ``name`` as the plain model names it: without the parts
    of the FSDP1, activation checkpointing and ``torch.compile`` wrappers around the model or
    its blocks (as torch's ``clean_tensor_name`` drops FSDP's and checkpointing's). The state
    dict of a model under FSDP1 or checkpointing has these names; a block compiled in place of
    itself keeps ``_orig_mod`` there, while ``module.compile()`` renames nothing."""
    if not name.startswith("_") and "._" not in name:  # (every wrapper part starts with "_",
        return name                                       # no part of most names does)
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def older_saved_name(name: str) -> str:
    """A module name saved by increlora_fast before the layers were named by the plain model's
    names (2026-12-07: controller states, adapter files), as `increlora_layers` names it now:
    such names carry the parts of the wrappers around the model or its blocks (`plain_name`)
    and a DDP wrapper's leading ``module.``."""
    name = plain_name(name)
    return name[len("module."):] if name.startswith("module.") else name


def is_fsdp1_flattened(tensor: torch.Tensor) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``) flattened ``tensor`` into one of its flat
    parameters: outside the forward pass it is then this rank's 1-D piece of a shard. With
    FSDP1's default ``use_orig_params=False`` the module holds, in place of its parameter, a
    view of the (flagged) flat parameter, whose storage is freed outside the forward pass."""
    return getattr(tensor, _FSDP1_FLATTENED, False) \
        or getattr(getattr(tensor, "_base", None), _FSDP1_FLATTENED, False)


def fsdp1_sharded_adapter_message(model: nn.Module) -> Optional[str]:
    """The one-line cause and fixes when FSDP1 (``FullyShardedDataParallel``) manages an
    adapter tensor of ``model``, else None. Outside the forward pass such a tensor is this
    rank's piece of a flat shard (1-D, empty on some ranks), while the penalty, the scores,
    allocation and the optimizer work on whole slot tensors."""
    for name, layer in increlora_layers(model):
        kinds = [kind for kind in ("lora_A", "lora_B", "lora_lambda")
                 if is_fsdp1_flattened(getattr(layer, kind))]
        if kinds:
            return (f"FSDP1 (FullyShardedDataParallel) shards the adapter tensors of {name!r} "
                    f"({', '.join(kinds)}), which IncreLoRA needs whole on every rank: wrap "
                    "with use_orig_params=True and ignored_states=[the parameters that require "
                    "grad], averaging their gradients yourself, or shard the base with FSDP2 "
                    "fully_shard(..., ignored_params=set(those parameters)) (see "
                    "docs/distributed.md)")
    return None


def frozen_adapters_message(model: nn.Module) -> Optional[str]:
    """The one-line cause and fixes when every adapter tensor (``lora_A``, ``lora_B`` and
    ``lora_lambda`` of every IncreLoRA layer) of ``model`` is frozen, else None. Training would
    then change nothing; the usual cause is peft's ``prepare_model_for_kbit_training`` called
    after `inject_increlora` (it freezes every parameter). Some adapters frozen on purpose are
    no such case."""
    layers = [layer for _, layer in increlora_layers(model)]
    if not layers or any(getattr(layer, kind).requires_grad for layer in layers
                         for kind in ("lora_A", "lora_B", "lora_lambda")):
        return None
    return (f"IncreLoRA: every adapter tensor (lora_A, lora_B, lora_lambda of the {len(layers)} "
            "adapted modules) is frozen (requires_grad False), so training would change "
            "nothing; peft.prepare_model_for_kbit_training(model) freezes every parameter: call "
            "it before inject_increlora, or re-enable the adapters (requires_grad_(True) on each "
            "IncreLoRA layer's lora_A, lora_B and lora_lambda)")


def unfrozen_bases_message(model: nn.Module) -> Optional[str]:
    """The one-line warning when base weights under IncreLoRA adapters of ``model`` require
    grad, else None: ``model.requires_grad_(True)`` after `inject_increlora` unfreezes them,
    and an optimizer over the trainable parameters then trains each in full beside its
    adapter (and `save_adapter` saves it). Names how many and the first. A base weight tied
    to a parameter of a module in ``modules_to_save`` (an adapted output layer sharing an
    embedding to save) trains in full as the config asks: not named."""
    to_save = _saved_module_parameter_ids(model)  # tied to a module to save: trained by it
    names = [name for name, layer in increlora_layers(model)
             if isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
             and id(layer.weight) not in to_save]
    if not names:
        return None
    return (f"IncreLoRA: the base weights of {len(names)} adapted modules ({names[0]}"
            f"{', ...' if len(names) > 1 else ''}) require grad (model.requires_grad_(True) "
            "after inject_increlora?), so they train in full beside their adapters and "
            "save_adapter saves them; freeze them again with "
            "layer.weight.requires_grad_(False) on each IncreLoRA layer if that is not meant")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wrappers and (Distributed)DataParallel wrappers hold
    (``model`` itself when not wrapped): their module names start with ``_orig_mod.`` or
    ``module.``, which the model saved, loaded or exported under its own names has not."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def get_config(model: nn.Module) -> IncreLoRAConfig:
    """The config ``inject_increlora`` attached to ``model``.

    Raises:
        ValueError: ``model`` has none: it was never injected (its IncreLoRA layers, if any,
            were built by hand), or it is a (Distributed)DataParallel or an EMA / SWA
            (`IncreLoRAAveragedModel`) wrapper of an injected model or another module holding
            one, which must be passed itself.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        inner = model.module if isinstance(model, AveragedModel) else unwrapped(model)
        if inner is not model and getattr(inner, CONFIG_ATTR, None) is not None:
            kind = type(model).__name__
            raise ValueError(f"model is {'an' if kind[0] in 'AEIOU' else 'a'} {kind} wrapper "
                             "of an IncreLoRA model: pass the model it holds (model.module) "
                             "instead")
        if getattr(inner, UNLOADED_ATTR, False):
            raise ValueError("model has no IncreLoRA adapter: merge_and_unload folded it into "
                             "the base weights (save the merged model with save_pretrained; "
                             "save_adapter / export_peft work on the model before merging)")
        held = next((n for n, m in inner.named_modules()
                     if n and getattr(m, CONFIG_ATTR, None) is not None), None)
        if held is not None:
            raise ValueError(f"model holds the IncreLoRA model {held!r}: pass it "
                             f"(model.{held}) instead")
        by_hand = next((n for n, _ in increlora_layers(inner)), None)
        if by_hand is not None:
            raise ValueError(f"model holds IncreLoRA layers built by hand (e.g. {by_hand!r}) "
                             "and no IncreLoRAConfig, which inject_increlora attaches and "
                             "saving, loading and exporting read; build the model with plain "
                             "nn.Linear layers and call inject_increlora(model, config) on it "
                             "instead")
        raise ValueError("model has no IncreLoRA adapter: call inject_increlora(model, config)")
    return config


def _saved_module_parameter_ids(model: nn.Module) -> Set[int]:
    """The ids of the parameters of the modules_to_save of ``model``'s config. By identity: a
    tied parameter (an lm_head to save sharing the input embedding, or an adapted layer's base
    weight shared with an embedding to save) is named after the module that registered it
    first."""
    config = getattr(model, CONFIG_ATTR, None)
    keys = (config.modules_to_save or []) if config is not None else []
    roots = tuple(plain_name(n) + "." for n in saved_module_names(model, keys))
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False)
            if plain_name(n).startswith(roots)}


def saved_module_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters outside the adapters that are saved with them, by full name (the plain
    model's, `plain_name`): those of the modules_to_save, trainable or not (a model frozen
    after training, e.g. by ``requires_grad_(False)`` for inference, still holds its trained
    head), and any other trainable one."""
    to_save = _saved_module_parameter_ids(model)
    return {plain_name(n): p for n, p in model.named_parameters()
            if (p.requires_grad or id(p) in to_save)
            and not n.split(".")[-1].startswith("lora_")}


def saved_module_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Persistent buffers of the modules_to_save (e.g. BatchNorm running statistics), by full
    name (the plain model's, `plain_name`): training changes them like the parameters, so they
    are saved with them. Buffers of IncreLoRA layers inside such a module are left out (the
    adapter's own)."""
    config = get_config(model)
    buffers: Dict[str, torch.Tensor] = {}
    for root in saved_module_names(model, config.modules_to_save):
        adapted: List[str] = []
        for name, module in model.get_submodule(root).named_modules(prefix=root):
            if isinstance(module, IncreLoRALinear):
                adapted.append(name + ".")
            if isinstance(module, IncreLoRALinear) or name.startswith(tuple(adapted)):
                continue
            for buffer_name, buffer in module._buffers.items():
                if buffer is not None and buffer_name not in \
                        module._non_persistent_buffers_set:
                    buffers[plain_name(f"{name}.{buffer_name}")] = buffer
    return buffers


def count_trainable_parameters(model: nn.Module) -> Dict[str, int]:
    """Trainable parameters counted two ways.

    ``active``: adapter parameters of the active slots (rank x (in + out + 1) per module) plus
    the modules to save: the size of the adapter that is saved, exported or merged;
    ``padded``: the allocated capacity (r_max slots) plus the same modules; ``other``: the
    modules to save alone. Reserve slots, and the reserves retired at the budget, train too
    (A and B, with advance learning) but are not part of the adapter: only ``padded`` counts
    them.
    """
    other = sum(p.numel() for p in saved_module_parameters(model).values())
    active = padded = 0
    for _, layer in increlora_layers(model):
        per_slot = layer.in_features + layer.out_features + 1
        active += layer.active_rank * per_slot
        padded += layer.r_max * per_slot
    return {"active": active + other, "padded": padded + other, "other": other}


def _tied_base_weights(model: nn.Module) -> List[str]:
    """``"<layer> with <parameter>"`` for every unmerged IncreLoRA layer whose base weight is
    also a parameter of another module (tied weights, e.g. an adapted ``lm_head`` sharing the
    input embedding): merging into it would change that module too."""
    names = _names_by_id(model.named_parameters(remove_duplicate=False))
    aliases = _names_by_id(model.named_modules(remove_duplicate=False))
    tied = []
    for name, layer in increlora_layers(model):
        if layer.merged:
            continue
        others = _other_names_of_base_weight(layer, names, aliases)
        if others:
            tied.append(f"{name} with {others[0]}")
    return tied


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back in place.

    Returns ``model``; a ``torch.compile`` or (Distributed)DataParallel wrapper is seen through
    (`unwrapped`), so the model it holds loses its config too, as does an injected model held
    by ``model`` (a user's own wrapper module, `IncreLoRAAveragedModel`).

    Raises:
        ValueError: a base is quantized (bitsandbytes 4-bit / 8-bit): its weight cannot take the
            adapter exactly; or a base weight is tied to another module's parameter (an adapted
            ``lm_head`` sharing the input embedding): merging would add the adapter to that
            module too; or a base weight is computed from other tensors on every forward (a
            parametrization, weight_norm, spectral_norm or pruning), where the merged adapter
            would be lost. Nothing is changed. Keep such adapters unmerged (or `export_peft`).
    """
    wrapper, model = model, unwrapped(model)
    quantized = [n for n, layer in increlora_layers(model) if layer.is_quantized]
    if quantized:
        raise ValueError(f"merge_and_unload refuses quantized bases {quantized[:3]}: a 4-bit or "
                         "8-bit weight cannot hold the adapter exactly; keep the adapter "
                         "unmerged, export it with export_peft, or dequantize the base first "
                         "(transformers' model.dequantize()) or load it in full precision to "
                         "merge")
    derived = [n for n, layer in increlora_layers(model)
               if not layer.merged and layer.has_derived_weight()]
    if derived:
        raise ValueError(f"merge_and_unload: {derived_weight_message(derived)}")
    tied = _tied_base_weights(model)
    if tied:
        raise ValueError(f"merge_and_unload refuses tied base weights ({', '.join(tied[:3])}): "
                         "merging would add the adapter to the other module's parameter too; "
                         "keep the adapter unmerged, export it with export_peft, or untie the "
                         "weights (e.g. tie_word_embeddings=False) before injecting")
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _keep_module_path:
                del module._forward_pre_hooks[key]
    aliases = _names_by_id(model.named_modules(remove_duplicate=False))
    for name, layer in list(increlora_layers(model)):
        if not layer.merged:  # ties and quantized bases were refused above, for the whole model
            layer._merge_in_place()
        for alias in aliases[id(layer)]:  # a layer registered under several names
            _set_submodule(model, alias, layer.base_layer)
    for module in model.modules():  # the model, or the injected model a module holds
        if hasattr(module, CONFIG_ATTR):
            delattr(module, CONFIG_ATTR)
            setattr(module, UNLOADED_ATTR, True)
    setattr(model, UNLOADED_ATTR, True)  # for get_config's message
    return wrapper
