"""A panel of the paper as data: one YAML spec per panel and profile, expanded into points.

A spec (``configs/experiments/<profile>/<panel>.yaml``) says everything a panel needs::

    panel: fig3b                   # the paper's figure label
    title: All layers at rank r    # one line
    paper: Fig. 3b                 # where the paper shows it
    claim: ...                     # what the panel tests, in words
    notes: ...                     # why the settings are what they are (optional)
    kind: train                    # train (default): raftorch train runs; theory: raftorch.theory
    base: {data: fashion-mnist, model: mlp, ...}     # TrainConfig fields shared by every point
    seeds: [0, 1, 2]
    max_seeds: 8                   # --decide adds seeds up to this many per point (default: 8,
                                   # or the number of seeds where that is more)
    control: no feedback           # the series of the no-feedback control (rule frozen): a
                                   # reference line, and every point's gain over it
    series:                        # the curves and reference lines of the figure
      - name: RAF
        set: {rule: raf}           # settings of this series (mappings merge into base's; {} clears)
        grid: {rank: [1, 2, 5, 10]}   # a mapping (all combinations) or a list of mappings (union)
      - name: BP
        set: {rule: bp, rank: null}
    figure: {x: rank, xlabel: ..., xscale: log, group: layer}
    published: [{series: RAF, rank: 10, value: 61.8}, ...]    # the paper's numbers (markers)
    claims: [...]                  # see raftorch.experiments.claims
    cost: {seconds_per_point: 6, hardware: one CPU thread}        # for --dry-run and --list
    threads_per_point: 2           # threads one point runs fastest with (measured; default 1):
                                   # the runner then runs cores / threads_per_point points at once

A variant of another spec says only what differs::

    extends: ../experiments/quick/fig4cd.yaml   # the parent spec, relative to this file
    panel: fig4cd-weight-decay                  # every key given replaces the parent's ...
    base: {optimizer: adamw, weight_decay: 3.0} # ... except base, merged into the parent's base

The parent may extend another spec in turn (a cycle is an error). ``base`` merges like a
series' ``set`` (mappings one level deep, so ``model_options: {channels: 16}`` keeps the
parent's other model options; ``{}`` clears); ``series``, ``claims``, ``figure`` and every
other key are replaced whole (a variant that gives its own ``series`` drops the parent's
``control`` unless it names one again).

Grid variables that are :class:`~raftorch.training.config.TrainConfig` fields (``rank``, ``lr``, ...)
set that field; any other name is a template variable for ``set``: a string ``"{layer}"``
becomes the variable's value (its type kept), ``"fashion-mnist:{K}"`` is formatted, and
mapping keys are formatted too (``ranks: {"{layer}": "{rank}"}``). A grid value may also be
``{value: V, set: {...}}``: the value names the point, ``set`` adds settings.

A point is one training run: series x one combination of the grid x one seed. Its id
(``raf_rank-10_s0``) names its run folder. Besides the spec's ``seeds``, a point may have
*extra seeds* (``Panel.extra_seeds``): the seeds ``raftorch reproduce --decide`` added to the
points an undecided claim needs, found again from their run folders
(:func:`raftorch.experiments.aggregate.find_extra_seeds`), so every later run, redraw and
report counts them.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raftorch.experiments.claims import COMMON, TYPES, matches
from raftorch.training.config import TrainConfig, load_config_file

# the panel specs ship inside the package (raftorch/configs/experiments, package data): found the
# same way from a checkout (where ./configs links to them) and from an installed wheel
SPEC_DIR = Path(str(resources.files("raftorch") / "configs" / "experiments"))
DEFAULT_MAX_SEEDS = 8
KINDS = ("train", "theory")
SPEC_KEYS = {"panel", "title", "paper", "claim", "notes", "kind", "base", "seeds", "series", "figure",
             "published", "claims", "cost", "theory", "threads_per_point", "analysis", "extends", "max_seeds", "control"}
ANALYSIS_KEYS = {"layer", "method", "steps"}
SERIES_KEYS = {"name", "set", "grid", "cost"}
FIGURE_KEYS = {"x", "xlabel", "ylabel", "xscale", "group", "title", "curves", "lines", "xticks", "labels",
               "history", "table"}  # history, table: raftorch.experiments.study
COST_KEYS = {"seconds_per_point", "hardware"}


class SpecError(ValueError):
    """A panel spec is malformed; the message names the file, the place and the fix."""


@dataclass
class Series:
    name: str
    set: dict[str, Any]
    grid: list[dict[str, list]]  # a union of products; [{}] for a single point
    cost: float | None = None  # seconds per point, overriding the panel's

    @property
    def slug(self) -> str:
        return slug(self.name)

    @property
    def variables(self) -> list[str]:
        names: list[str] = []
        for g in self.grid:
            names += [k for k in g if k not in names]
        return names


@dataclass
class Point:
    """One run of a panel: a series, one value per grid variable, one seed."""

    panel: str
    series: str
    values: dict[str, Any]  # grid variable -> value (the point's coordinates)
    seed: int
    config: dict[str, Any]  # TrainConfig fields (kind train) or theory settings (kind theory)
    cost: float | None = None

    @property
    def stem(self) -> str:
        """The id without its seed: the same for every seed of the point (``raf_rank-10``)."""
        return "_".join([slug(self.series)] + [f"{slug(k)}-{slug(str(v))}" for k, v in self.values.items()])

    @property
    def id(self) -> str:
        return f"{self.stem}_s{self.seed}"

    @property
    def key(self) -> tuple:
        """The point without its seed: runs with the same key are averaged."""
        return (self.series, tuple(self.values.items()))


@dataclass
class Panel:
    id: str
    profile: str
    path: Path
    title: str
    paper: str
    claim: str
    kind: str
    base: dict[str, Any]
    seeds: list[int]
    series: list[Series]
    figure: dict[str, Any]
    published: list[dict[str, Any]]
    claims: list[dict[str, Any]]
    cost: dict[str, Any]
    notes: str = ""
    theory: dict[str, Any] = field(default_factory=dict)
    threads_per_point: int = 1
    # receptive fields of every finished run (raftorch.analysis.analyze_run): {layer, method,
    # steps}; its scores become the summary columns orientedness, centre_surround_index
    analysis: dict[str, Any] = field(default_factory=dict)
    max_seeds: int = DEFAULT_MAX_SEEDS  # the cap of --decide, seeds per point
    control: str | None = None  # the series of the no-feedback control
    # seeds beyond ``seeds`` of some points: point key -> seeds (added by --decide)
    extra_seeds: dict[tuple, list[int]] = field(default_factory=dict)

    @property
    def variables(self) -> list[str]:
        """Every grid variable of every series, in order of appearance."""
        names: list[str] = []
        for s in self.series:
            names += [v for v in s.variables if v not in names]
        return names

    def series_named(self, name: str) -> Series:
        """The series called ``name``; ``KeyError`` if the panel has none."""
        for s in self.series:
            if s.name == name:
                return s
        raise KeyError(name)

    def points(self) -> list[Point]:
        """Every point, in spec order (series, grid, then seed)."""
        out: list[Point] = []
        seen: set[str] = set()
        for s in self.series:
            for values, extra in _combinations(s):
                key = (s.name, tuple(values.items()))
                for seed in self.seeds + [x for x in self.extra_seeds.get(key, []) if x not in self.seeds]:
                    config = self._config(s, values, extra, seed)
                    p = Point(self.id, s.name, values, seed, config,
                              s.cost if s.cost is not None else self.cost.get("seconds_per_point"))
                    if p.id in seen:
                        raise SpecError(f"{self.path}: two points share the id {p.id!r}; give the series "
                                        f"distinct names or the grid distinct values")
                    seen.add(p.id)
                    out.append(p)
        return out

    def _config(self, s: Series, values: dict, extra: dict, seed: int) -> dict[str, Any]:
        settings = _merge(copy.deepcopy(self.base), _substitute(s.set, values))
        settings = _merge(settings, _substitute(extra, values))
        fields = TrainConfig.fields() if self.kind == "train" else None
        for k, v in values.items():
            if fields is None or k in fields:
                settings[k] = v
        settings["seed"] = seed
        if self.kind == "train":
            settings.pop("out", None)
            try:
                TrainConfig.from_dict(settings, source=f"{self.path}: series {s.name!r}")
            except ValueError as exc:
                raise SpecError(str(exc)) from None
        return settings


def slug(text: str) -> str:
    """A file-name-safe form of ``text``: letters, digits, ``.`` and ``-`` (``*`` -> ``all``)."""
    text = text.replace("*", "all").replace("/", "-")
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-").lower() or "x"


def _merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``; mappings merge one level deep (model_options, ranks, ...),
    except an empty mapping, which clears the setting (``layer_options: {}``)."""
    for k, v in extra.items():
        if isinstance(v, dict) and v and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = copy.deepcopy(v)
    return base


_WHOLE = re.compile(r"^\{(\w+)\}$")


def _substitute(obj, values: dict):
    """Fill ``{name}`` templates in strings and mapping keys with the grid values."""
    if isinstance(obj, dict):
        return {_substitute(k, values): _substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values) for v in obj]
    if isinstance(obj, str) and "{" in obj:
        whole = _WHOLE.match(obj)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        try:
            return obj.format(**values)
        except KeyError as exc:
            raise SpecError(f"template {obj!r} names {exc.args[0]!r}, which is not a grid variable "
                            f"of its series") from None
    return obj


def _combinations(s: Series):
    """(values, extra settings) of every grid combination of a series."""
    for grid in s.grid:
        names = list(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            values, extra = {}, {}
            for name, item in zip(names, combo):
                if isinstance(item, dict):
                    values[name] = item["value"]
                    extra = _merge(extra, item.get("set", {}))
                else:
                    values[name] = item
            yield values, extra


# --------------------------------------------------------------------------- loading

def _check_study(figure: dict, names: set[str], bad) -> None:
    """``figure.history`` / ``figure.table`` (:mod:`raftorch.experiments.study`) name series
    that exist."""
    history, table = figure.get("history"), figure.get("table")
    if history is not None:
        pairs = history.get("gaps", []) if isinstance(history, dict) else None
        if (pairs is None or set(history) - {"gaps"} or not isinstance(pairs, list)
                or not all(isinstance(p, list) and len(p) == 2 for p in pairs)):
            bad(f"figure.history must be a mapping {{gaps: [[series A, series B], ...]}}, got {history!r}")
        unknown = sorted({n for p in pairs for n in p} - names)
        if unknown:
            bad(f"figure.history.gaps names no series {', '.join(map(repr, unknown))}; series: {', '.join(sorted(names))}")
    if table is not None:
        against = table.get("against") if isinstance(table, dict) else None
        if (against is None or set(table) - {"against"} or not isinstance(against, list)
                or not all(isinstance(a, dict) and "series" in a for a in against)):
            bad(f"figure.table must be a mapping {{against: [{{series: NAME, <grid variable>: value}}, ...]}}, "
                f"got {table!r}")
        unknown = sorted({a["series"] for a in against} - names)
        if unknown:
            bad(f"figure.table.against names no series {', '.join(map(repr, unknown))}; series: {', '.join(sorted(names))}")


def spec_path(panel: str, profile: str, spec_dir: Path | None = None) -> Path:
    """The YAML file of ``panel`` in ``profile``: ``PROFILE/PANEL.yaml`` under ``spec_dir`` (default
    :data:`SPEC_DIR`)."""
    return Path(spec_dir or SPEC_DIR) / profile / f"{panel}.yaml"


def available(profile: str, spec_dir: Path | None = None) -> list[str]:
    """Panel ids of a profile, in the order of ``order.yaml`` (else alphabetical)."""
    folder = Path(spec_dir or SPEC_DIR) / profile
    if not folder.is_dir():
        return []
    names = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "order")
    order_file = folder / "order.yaml"
    if order_file.exists():
        order = yaml.safe_load(order_file.read_text()) or []
        names = [n for n in order if n in names] + [n for n in names if n not in order]
    return names


def load_panel(panel: str, profile: str, spec_dir: Path | None = None) -> Panel:
    """Load the spec of ``panel`` in ``profile``; a bad name or file raises :class:`SpecError`."""
    folder = Path(spec_dir or SPEC_DIR)
    profiles = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if profile not in profiles:
        raise SpecError(f"unknown profile {profile!r}; choose one of {', '.join(profiles) or '(none found in ' + str(folder) + ')'}")
    path = spec_path(panel, profile, folder)
    if not path.exists():
        raise SpecError(f"unknown panel {panel!r} in profile {profile!r}; choose one of "
                        f"{', '.join(available(profile, folder))} (or 'all'); raftorch reproduce --list shows them")
    return load_spec(path, profile)


def load_spec(path: str | Path, profile: str | None = None) -> Panel:
    """Read and check one spec file (any path: also a user's own panel)."""
    path = Path(path)
    raw = _read_spec(path, ())

    def bad(msg: str):
        raise SpecError(f"{path}: {msg}")

    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        bad(f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("panel", "title", "series", "seeds"):
        if key not in raw:
            bad(f"missing key {key!r}")
    kind = raw.get("kind", "train")
    if kind not in KINDS:
        bad(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    seeds = raw["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        bad(f"seeds must be a list of distinct non-negative whole numbers, got {seeds!r}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        bad("base must be a mapping of settings")
    if kind == "train":
        unknown = sorted(set(base) - set(TrainConfig.fields()))
        if unknown:
            bad(f"base: unknown setting(s) {', '.join(map(repr, unknown))}; known settings: "
                f"{', '.join(TrainConfig.fields())}")
    series = []
    if not isinstance(raw["series"], list) or not raw["series"]:
        bad("series must be a non-empty list of {name, set, grid}")
    for i, item in enumerate(raw["series"]):
        if not isinstance(item, dict) or "name" not in item:
            bad(f"series {i + 1} must be a mapping with a 'name'")
        unknown = sorted(set(item) - SERIES_KEYS)
        if unknown:
            bad(f"series {item['name']!r}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                f"{', '.join(sorted(SERIES_KEYS))}")
        grid = item.get("grid") or {}
        grids = grid if isinstance(grid, list) else [grid]
        for g in grids:
            if not isinstance(g, dict) or not all(isinstance(v, list) and v for v in g.values()):
                bad(f"series {item['name']!r}: grid must map variable names to non-empty lists "
                    f"(or be a list of such mappings)")
            for name, vals in g.items():
                if any(isinstance(v, dict) and "value" not in v for v in vals):
                    bad(f"series {item['name']!r}: grid value mappings need a 'value' (and optionally 'set')")
            if kind == "train":
                _check_variables(path, item, g)
        series.append(Series(str(item["name"]), dict(item.get("set") or {}), grids or [{}], item.get("cost")))
    names = [s.name for s in series]
    if len(set(names)) != len(names):
        bad("series names must be distinct")
    figure = raw.get("figure") or {}
    unknown = sorted(set(figure) - FIGURE_KEYS)
    if unknown:
        bad(f"figure: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(FIGURE_KEYS))}")
    _check_study(figure, {s.name for s in series}, bad)
    tpp = raw.get("threads_per_point", 1)
    if not isinstance(tpp, int) or isinstance(tpp, bool) or tpp < 1:
        bad(f"threads_per_point must be a positive whole number, got {tpp!r}")
    cost = raw.get("cost") or {}
    unknown = sorted(set(cost) - COST_KEYS)
    if unknown:
        bad(f"cost: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(COST_KEYS))}")
    analysis = raw.get("analysis") or {}
    if not isinstance(analysis, dict) or set(analysis) - ANALYSIS_KEYS or (analysis and kind != "train"):
        bad(f"analysis must be a mapping with keys {', '.join(sorted(ANALYSIS_KEYS))} (training panels "
            f"only), e.g. {{layer: retina.conv2, method: gradient}}; got {analysis!r}")
    from raftorch.analysis.fields import METHODS

    if analysis.get("method", "gradient") not in METHODS:
        bad(f"analysis: method must be one of {', '.join(METHODS)}, got {analysis.get('method')!r}")
    max_seeds = raw.get("max_seeds", max(DEFAULT_MAX_SEEDS, len(seeds)))
    if not isinstance(max_seeds, int) or isinstance(max_seeds, bool) or max_seeds < len(seeds):
        bad(f"max_seeds must be a whole number at least the number of seeds ({len(seeds)}), got {max_seeds!r}")
    control = raw.get("control")
    if control is not None and str(control) not in [s.name for s in series]:
        bad(f"control names the series of the no-feedback control; {control!r} is not one of "
            f"{', '.join(repr(s.name) for s in series)}")
    panel = Panel(id=str(raw["panel"]), profile=profile or path.parent.name, path=path, title=str(raw["title"]),
                  paper=str(raw.get("paper", "")), claim=str(raw.get("claim", "")), kind=kind, base=base,
                  seeds=list(seeds), series=series, figure=figure, published=list(raw.get("published") or []),
                  claims=list(raw.get("claims") or []), cost=cost, notes=str(raw.get("notes", "")),
                  theory=dict(raw.get("theory") or {}), threads_per_point=tpp,
                  analysis=dict(analysis), max_seeds=max_seeds,
                  control=None if control is None else str(control))
    check_claim_specs(panel)
    for pub in panel.published:
        if not isinstance(pub, dict) or "series" not in pub or "value" not in pub:
            bad(f"published entries need 'series' and 'value' (and the grid values), got {pub!r}")
    panel.points()  # every point must make a valid config
    return panel


def _read_spec(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The spec file's mapping with its ``extends`` chain resolved (module docstring)."""
    try:
        raw = load_config_file(path, "spec file")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise SpecError(f"{path}: extends must be the path of another spec file (relative to this one), "
                        f"got {parent!r}")
    target = (path.parent / parent).resolve()
    chain = (*chain, path.resolve())
    if target in chain:
        raise SpecError(f"{path}: extends {parent!r}, which extends it back ({' -> '.join(p.name for p in (*chain, target))}); "
                        f"break the cycle")
    if not target.exists():
        raise SpecError(f"{path}: extends {parent!r}, but {target} does not exist (the path is relative "
                        f"to {path.parent})")
    merged = _read_spec(target, chain)
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, dict):
            raise SpecError(f"{path}: base must be a mapping of settings")
        merged["base"] = _merge(copy.deepcopy(merged.get("base") or {}), base)
    if "series" in raw and "control" not in raw:  # the parent's control names one of its own series
        merged.pop("control", None)
    merged.update(raw)
    return merged


def _check_variables(path: Path, item: dict, grid: dict) -> None:
    """Every grid variable sets a TrainConfig field or is used by a template of ``set``."""
    used = set(re.findall(r"\{(\w+)\}", yaml.safe_dump(item.get("set") or {})))
    for vals in grid.values():
        for v in vals:
            if isinstance(v, dict):
                used |= set(re.findall(r"\{(\w+)\}", yaml.safe_dump(v.get("set") or {})))
    for name in grid:
        if name not in TrainConfig.fields() and name not in used and not any(
                isinstance(v, dict) and v.get("set") for v in grid[name]):
            raise SpecError(f"{path}: series {item['name']!r}: grid variable {name!r} is neither a training "
                            f"setting nor used in 'set' (as '{{{name}}}'), so it would change nothing")


def check_claim_specs(panel) -> None:
    """Raise a :class:`SpecError` for a malformed claim, or (for training panels) a selector
    that does not pick exactly one point of the panel."""
    keys = None
    if panel.kind == "train":
        keys = [dict(series=s, **dict(values)) for s, values in {p.key for p in panel.points()}]
    for i, claim in enumerate(panel.claims):
        where = f"{panel.path}: claim {i + 1}"
        if not isinstance(claim, dict) or "type" not in claim or "text" not in claim:
            raise SpecError(f"{where}: a claim needs 'text' and 'type' ({', '.join(TYPES)})")
        if claim["type"] not in TYPES:
            raise SpecError(f"{where}: unknown claim type {claim['type']!r}; choose one of {', '.join(TYPES)}")
        unknown = sorted(set(claim) - TYPES[claim["type"]] - COMMON)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for type "
                            f"{claim['type']!r}; known: {', '.join(sorted(TYPES[claim['type']] | COMMON))}")
        if not isinstance(claim.get("paired", True), bool):
            raise SpecError(f"{where}: paired must be true (pair the points' seeds) or false (Welch), "
                            f"got {claim['paired']!r}")
        if claim.get("source", "paper") not in ("paper", "ours"):
            raise SpecError(f"{where}: source must be 'paper' (the paper's claim) or 'ours', got {claim['source']!r}")
        kind = claim["type"]
        if kind in ("at_least", "at_most", "close"):
            if "a" not in claim or ("b" in claim) == ("value" in claim):
                raise SpecError(f"{where}: {kind} needs 'a' and exactly one of 'b' (a selector) or 'value'")
            selectors = [claim["a"]] + ([claim["b"]] if "b" in claim else [])
        elif kind == "ordered":
            if not isinstance(claim.get("points"), list) or len(claim["points"]) < 2:
                raise SpecError(f"{where}: ordered needs 'points', a list of at least two selectors")
            selectors = claim["points"]
        else:
            missing = {"x", "over", "curve", "reference"} - set(claim)
            if missing:
                raise SpecError(f"{where}: min_x_grows needs {', '.join(sorted(missing))}")
            selectors = []
        for sel in selectors:
            if not isinstance(sel, dict) or "series" not in sel:
                raise SpecError(f"{where}: a selector is a mapping with 'series' and grid values, got {sel!r}")
            if keys is not None:
                n = sum(matches(k, sel) for k in keys)
                if n != 1:
                    raise SpecError(f"{where}: selector {sel} picks {n} points of the panel; it must pick "
                                    f"exactly one (name the series and every grid value)")
