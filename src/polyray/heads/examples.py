"""Uploaded training examples and training options: parsed and checked before any work is queued.

Everything a client can get wrong is caught here, with an ``InvalidRequest`` that names the
offending field (``examples[3].label``, ``options.threshold``) and a stable ``code``, so a bad
upload fails at once instead of after minutes of embedding. Labels per kind:

* classifier: a string, or an int (stored as its string, so ``1`` and ``"1"`` are one label);
* multilabel: a list of such labels, possibly empty (no label applies); a lone label is a
  one-element list;
* regressor: a finite number (not a bool);
* projection: no label (ignored when given).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from polyray.errors import InvalidRequest
from polyray.heads.kinds import HeadKind

MIN_EXAMPLES = 10
MIN_EXAMPLES_PER_CLASS = 2  # a stratified split needs two of each class: one to train, one to check
MAX_EXAMPLES = 50_000
MAX_LABELS = 1_000  # every label is a weight row and appears in every response of the head
MAX_LABEL_CHARS = 200
MIN_VALIDATION_EXAMPLES = 2  # r2 and F1 are undefined on one example
RECORD_FIELDS = frozenset({"text", "label"})

Label = str | float | tuple[str, ...] | None


@dataclass(frozen=True)
class Example:
    """One checked example: ``label`` is str (classifier), sorted tuple (multilabel), float, or None."""

    text: str
    label: Label


@dataclass(frozen=True)
class TrainOptions:
    """How to fit a head; see ``from_mapping`` for the rules each option follows.

    ``validation_fraction``: share of the examples held out to measure the head (0 < f < 0.5).
    ``dimensions``: output size of a projection (required there, 1 <= d < dim_in).
    ``threshold``: a multilabel head's decision threshold on each sigmoid score (0 < t < 1).
    ``seed``: fixes the split and any randomized solver, so retraining reproduces a head.
    ``regularization``: inverse strength ``C`` of a logistic regression, ``alpha`` of a ridge.
    """

    validation_fraction: float = 0.2
    dimensions: int | None = None
    threshold: float = 0.5
    seed: int = 0
    regularization: float = 1.0

    @classmethod
    def from_mapping(
        cls, kind: HeadKind, mapping: Mapping[str, object] | None, *, dim_in: int | None = None
    ) -> TrainOptions:
        """Check a client's options. ``dim_in`` (the model's dimension), when known, bounds ``dimensions``.

        ``threshold`` and ``regularization`` are accepted for every kind (so ``as_dict`` output
        always parses back) and used where they apply; ``dimensions`` is refused outside a
        projection because it means nothing there and signals a confused request.
        """
        if mapping is not None and not isinstance(mapping, Mapping):
            raise InvalidRequest("options must be an object", param="options", code="invalid_option")
        values = dict(mapping or {})
        for name in values:
            if name not in _OPTION_NAMES:
                known = ", ".join(sorted(_OPTION_NAMES))
                raise _option_error(name, f"unknown option {name!r}; known options: {known}")
        fraction = _float_option(values, "validation_fraction", cls.validation_fraction)
        if not 0.0 < fraction < 0.5:
            raise _option_error("validation_fraction", f"validation_fraction must be in (0, 0.5), not {fraction}")
        threshold = _float_option(values, "threshold", cls.threshold)
        if not 0.0 < threshold < 1.0:
            raise _option_error("threshold", f"threshold must be in (0, 1), not {threshold}")
        regularization = _float_option(values, "regularization", cls.regularization)
        if not regularization > 0.0:
            raise _option_error("regularization", f"regularization must be > 0, not {regularization}")
        seed = _int_option(values, "seed", cls.seed)
        if not 0 <= seed < 2**32:
            raise _option_error("seed", f"seed must be in [0, 2**32), not {seed}")
        dimensions = _dimensions_option(kind, values.get("dimensions"), dim_in)
        return cls(fraction, dimensions, threshold, seed, regularization)

    def as_dict(self) -> dict[str, Any]:
        """The options as stored with a head (``dimensions`` only when set)."""
        out = asdict(self)
        if self.dimensions is None:
            del out["dimensions"]
        return out


_OPTION_NAMES = frozenset(TrainOptions.__dataclass_fields__)


def _option_error(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"options.{name}", code="invalid_option")


def _float_option(values: Mapping[str, object], name: str, default: float) -> float:
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _option_error(name, f"{name} must be a finite number, not {value!r}")
    return float(value)


def _int_option(values: Mapping[str, object], name: str, default: int) -> int:
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _option_error(name, f"{name} must be an integer, not {value!r}")
    return value


def _dimensions_option(kind: HeadKind, value: object, dim_in: int | None) -> int | None:
    if kind is not HeadKind.PROJECTION:
        if value is not None:
            raise _option_error("dimensions", f"dimensions applies only to projection heads, not {kind.value}")
        return None
    if value is None:
        raise _option_error("dimensions", "a projection head needs options.dimensions (its output size)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _option_error("dimensions", f"dimensions must be a positive integer, not {value!r}")
    if dim_in is not None and value >= dim_in:
        raise _option_error("dimensions", f"dimensions must be below the model's dimension {dim_in}, not {value}")
    return value


def validation_size(num_examples: int, fraction: float, *, num_classes: int = 0) -> int:
    """Examples held out: ``ceil(fraction * n)`` (sklearn's rounding), at least 2 and one per class."""
    return max(math.ceil(fraction * num_examples), MIN_VALIDATION_EXAMPLES, num_classes)


def min_examples(kind: HeadKind, options: TrainOptions | None = None) -> int:
    """Fewest examples a head of ``kind`` may train on.

    A projection of ``d`` dimensions needs at least ``d + 1`` *training* examples after the
    validation split (centered data of ``n`` rows has rank ``n - 1``, so fewer leave components
    undetermined), which is more than ``max(10, d + 1)`` examples in total.
    """
    if kind is not HeadKind.PROJECTION or options is None or options.dimensions is None:
        return MIN_EXAMPLES
    need_train = options.dimensions + 1
    total = max(MIN_EXAMPLES, need_train)
    while total - validation_size(total, options.validation_fraction) < need_train:
        total += 1
    return total


def parse_jsonl(text: str) -> list[object]:
    """One JSON object per non-empty line; line numbers in errors count from 1.

    Lines split on ``\\n`` only: JSON strings may hold a raw U+2028, which ``splitlines`` would
    break on. ``NaN``/``Infinity`` are not JSON and are refused. Stops at ``MAX_EXAMPLES + 1``.
    """
    records: list[object] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise InvalidRequest(
                f"line {number}: not valid JSON ({reason})", param="examples", code="invalid_jsonl"
            ) from None
        if not isinstance(record, dict):
            raise InvalidRequest(
                f"line {number}: expected a JSON object, got {type(record).__name__}",
                param="examples",
                code="invalid_jsonl",
            )
        records.append(record)
        if len(records) > MAX_EXAMPLES:
            raise _too_many(len(records))
    return records


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _too_many(count: int) -> InvalidRequest:
    return InvalidRequest(
        f"more than {MAX_EXAMPLES} examples ({count}+ given)", param="examples", code="too_many_examples"
    )


def parse_examples(kind: HeadKind, records: Sequence[object], options: TrainOptions | None = None) -> list[Example]:
    """Check every record, then the set as a whole (counts and labels); ``options`` sizes a projection."""
    if len(records) > MAX_EXAMPLES:
        raise _too_many(len(records))
    examples = [_parse_record(kind, i, record) for i, record in enumerate(records)]
    needed = min_examples(kind, options)
    if len(examples) < needed:
        raise InvalidRequest(
            f"a {kind.value} head needs at least {needed} examples, got {len(examples)}",
            param="examples",
            code="too_few_examples",
        )
    if kind in (HeadKind.CLASSIFIER, HeadKind.MULTILABEL):
        _check_label_counts(kind, examples)
    return examples


def _parse_record(kind: HeadKind, index: int, record: object) -> Example:
    where = f"examples[{index}]"
    if not isinstance(record, Mapping):
        raise InvalidRequest(f"{where} must be an object with 'text' and 'label'", param=where, code="invalid_example")
    for key in record:
        if key not in RECORD_FIELDS:
            raise InvalidRequest(
                f"{where} has unknown field {key!r}; allowed: text, label",
                param=f"{where}.{key}",
                code="invalid_example",
            )
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"{where}.text must be a non-empty string", param=f"{where}.text", code="invalid_example")
    if kind is HeadKind.PROJECTION:
        return Example(text, None)
    if "label" not in record:
        raise InvalidRequest(f"{where} has no label", param=f"{where}.label", code="invalid_label")
    return Example(text, _parse_label(kind, record["label"], f"{where}.label"))


def _parse_label(kind: HeadKind, value: object, param: str) -> Label:
    if kind is HeadKind.CLASSIFIER:
        return _class_label(value, param)
    if kind is HeadKind.MULTILABEL:
        items = value if isinstance(value, list) else [value]
        return tuple(sorted({_class_label(item, param) for item in items}))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{param} must be a number, not {value!r}", param=param, code="invalid_label")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequest(f"{param} must be a finite number, not {value!r}", param=param, code="invalid_label")
    return number


def _class_label(value: object, param: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{param} must be a string or an integer, not {value!r}", param=param, code="invalid_label"
        )
    if not value.strip() or len(value) > MAX_LABEL_CHARS:
        raise InvalidRequest(
            f"{param} must be a non-empty label of at most {MAX_LABEL_CHARS} characters",
            param=param,
            code="invalid_label",
        )
    return value


def _check_label_counts(kind: HeadKind, examples: Sequence[Example]) -> None:
    counts: Counter[str] = Counter()
    for example in examples:
        if isinstance(example.label, str):
            counts[example.label] += 1
        elif isinstance(example.label, tuple):
            counts.update(example.label)
    if len(counts) < 2:
        raise InvalidRequest(
            f"a {kind.value} head needs at least two distinct labels, got {len(counts)}",
            param="examples",
            code="too_few_labels",
        )
    if len(counts) > MAX_LABELS:
        raise InvalidRequest(
            f"a head may have at most {MAX_LABELS} labels, got {len(counts)}", param="examples", code="too_many_labels"
        )
    if kind is HeadKind.CLASSIFIER:
        scarce = sorted(label for label, count in counts.items() if count < MIN_EXAMPLES_PER_CLASS)
        if scarce:
            shown = ", ".join(repr(label) for label in scarce[:5]) + (" ..." if len(scarce) > 5 else "")
            raise InvalidRequest(
                f"every label needs at least {MIN_EXAMPLES_PER_CLASS} examples; too few for {shown}",
                param="examples",
                code="too_few_examples",
            )


def labels_of(examples: Sequence[Example]) -> tuple[str, ...]:
    """Sorted distinct class labels of classifier or multilabel examples (the heads' output order)."""
    seen: set[str] = set()
    for example in examples:
        if isinstance(example.label, str):
            seen.add(example.label)
        elif isinstance(example.label, tuple):
            seen.update(example.label)
    return tuple(sorted(seen))
