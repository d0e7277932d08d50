"""A plan is data: which ggml type every quantizable tensor gets, the budget, what it achieves,
and where it came from. Plain versioned JSON, validated against the model it is applied to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Protocol

from windq import __version__, llamacpp, registry
from windq.errors import IllegalTypeError, InputError, PlanError, WindqError
from windq.files import atomic_write_text

SCHEMA_VERSION = 1


class Model(Protocol):
    """What a plan needs of a model (models.gguf_model.GGUFModel is one): the foundation names
    no stage, so it asks for these attributes instead of importing the class."""

    path: Path
    sha256: str
    n_real_weights: int
    architecture: str
    tensors: Mapping  # name → TensorInfo (shape, type_name, n_per_row, nbytes, n_elements)

    def field(self, key: str, default=None): ...
    def quantizable(self) -> list: ...
    def zero_padded(self, name: str) -> bool: ...


_TOP_KEYS = {"schema_version", "model", "method", "granularity", "budget_bpw", "achieved_bpw", "total_bytes", "tensors", "provenance"}
_MODEL_KEYS = {"name", "sha256", "n_weights", "architecture"}


@dataclass(frozen=True)
class ModelRef:
    name: str
    sha256: str | None
    n_weights: int
    architecture: str


@dataclass(frozen=True)
class Plan:
    model: ModelRef
    tensors: Mapping[str, str]  # tensor name → ggml type name
    method: str = "manual"
    granularity: str = "tensor"
    budget_bpw: float | None = None
    achieved_bpw: float | None = None
    total_bytes: int | None = None
    provenance: Mapping[str, object] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["tensors"] = dict(self.tensors)
        d["provenance"] = dict(self.provenance)
        # schema_version first, so a reader sees which schema before anything else
        return json.dumps({"schema_version": d.pop("schema_version"), **d}, indent=1) + "\n"

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def model_ref(model: Model) -> ModelRef:
    return ModelRef(
        name=model.field("general.name", model.path.stem),
        sha256=model.sha256,
        n_weights=model.n_real_weights,
        architecture=model.architecture,
    )


def file_bytes(model: Model, tensors: Mapping[str, str]) -> int:
    """Exact tensor-data bytes of the GGUF that `tensors` produces: planned tensors at their
    type's size, every other tensor (norms, anything llama.cpp copies) as it is in the source."""
    total = 0
    for name, info in model.tensors.items():
        if name in tensors:
            total += registry.get(tensors[name]).nbytes(info.shape)
        else:
            total += info.nbytes
    return total


def bits_per_weight(model: Model, tensors: Mapping[str, str]) -> float:
    return registry.bits_per_weight(file_bytes(model, tensors), model.n_real_weights)


def make_plan(
    model: Model,
    tensors: Mapping[str, str],
    *,
    method: str,
    budget_bpw: float | None = None,
    granularity: str = "tensor",
    provenance: Mapping[str, object] | None = None,
) -> Plan:
    nbytes = file_bytes(model, tensors)
    prov = {"windq": __version__, "llama_cpp_python": llamacpp.version()}
    prov.update(provenance or {})
    return Plan(
        model=model_ref(model),
        tensors=dict(tensors),
        method=method,
        granularity=granularity,
        budget_bpw=budget_bpw,
        achieved_bpw=registry.bits_per_weight(nbytes, model.n_real_weights),
        total_bytes=nbytes,
        provenance=prov,
    )


def uniform_plan(model: Model, type_name: str) -> Plan:
    """One type on every quantizable tensor; refuses (never falls back) where it cannot be written."""
    qt = registry.get(type_name)
    bad = [t.name for t in model.quantizable() if not qt.fits_row(t.n_per_row)]
    if bad:
        raise IllegalTypeError(
            f"{qt.name} does not fit {len(bad)} tensors (first: {bad[0]}, rows of {model.tensors[bad[0]].n_per_row}); "
            f"a uniform plan needs a type whose block ({qt.block_size}) divides every row, or an aligned model"
        )
    return make_plan(model, {t.name: qt.name for t in model.quantizable()}, method=f"uniform:{qt.name}")


def validate(plan: Plan, model: Model, *, imatrix_tensors: Collection[str] = ()) -> None:
    """Refuse a plan that llama.cpp would not write exactly as planned.

    `imatrix_tensors`: the tensors that have importance data (legality of IQ types depends on it).
    """
    # identity first: a plan for another model would otherwise fail on a type or a name, misleadingly
    if plan.model.sha256 and plan.model.sha256 != model.sha256:
        raise PlanError(f"plan was made for another model ({plan.model.name}, sha256 {plan.model.sha256[:12]}…), not {model.path.name}")
    quantizable = {t.name: t for t in model.quantizable()}
    for name, type_name in plan.tensors.items():
        if name not in model.tensors:
            raise PlanError(f"plan names tensor {name}, which {model.path.name} does not have")
        if name not in quantizable:
            raise PlanError(f"plan names tensor {name}, which llama.cpp never quantizes (norms and 1-D tensors are kept)")
        registry.get(type_name).check(
            name, quantizable[name].n_per_row, has_imatrix=name in imatrix_tensors, zero_padded=model.zero_padded(name)
        )
    missing = [n for n in quantizable if n not in plan.tensors]
    if missing:
        raise PlanError(f"plan has no type for tensor {missing[0]} ({len(missing)} tensors missing)")


def save_plan(plan: Plan, path: str | Path) -> Path:
    return atomic_write_text(Path(path), plan.to_json())


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such plan file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON plan ({e})") from e
    if not isinstance(d, dict) or "schema_version" not in d:
        raise PlanError(f"{path}: not a windq plan (no schema_version)")
    if d["schema_version"] != SCHEMA_VERSION:
        raise PlanError(f"{path}: plan schema {d['schema_version']} is not supported (this windq reads {SCHEMA_VERSION})")
    extra = set(d) - _TOP_KEYS
    if extra:
        raise PlanError(f"{path}: unknown plan field(s) {', '.join(sorted(extra))}")
    model = d.get("model") or {}
    if set(model) != _MODEL_KEYS:
        raise PlanError(f"{path}: plan 'model' must have exactly the fields {', '.join(sorted(_MODEL_KEYS))}")
    tensors = d.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise PlanError(f"{path}: plan 'tensors' must map tensor names to ggml type names")
    for name, type_name in tensors.items():
        try:
            registry.get(type_name)
        except WindqError as e:
            raise PlanError(f"{path}: {name}: {e}") from None
    return Plan(
        model=ModelRef(**model),
        tensors=tensors,
        method=d.get("method", "manual"),
        granularity=d.get("granularity", "tensor"),
        budget_bpw=d.get("budget_bpw"),
        achieved_bpw=d.get("achieved_bpw"),
        total_bytes=d.get("total_bytes"),
        provenance=d.get("provenance") or {},
        schema_version=d["schema_version"],
    )
