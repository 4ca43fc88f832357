"""Labeling tasks as typed YAML: what to ask a model about an image, and which answers count.

Tasks live beside the tables because a task defines what a table's label columns hold
(:mod:`lance_io.labels`); the labeler, the tagging job, training and evaluation all read them
from here. Pure Python (pydantic, yaml): importable in every environment, vLLM's included.

A task is one of five kinds (the ``kind`` key picks the model):

- ``classify``: one label from a closed label set (optional per-label descriptions);
- ``attributes``: several named attributes, each with its own closed set of values;
- ``caption``: free text, at most ``max_tokens`` tokens;
- ``score``: an integer in ``[min_score, max_score]`` judged against a rubric;
- ``generate``: text written from a row's columns (attributes, labels, metadata) and
  optionally its image, by any OpenAI-compatible chat model (docs/descriptions.md).

Every backend asks the same :class:`Question` objects (``task.questions()``), so a task means
the same thing whichever backend serves it.

Example::

    from lance_io.tasks import load_task
    task = load_task("hotel")              # configs/tasks/hotel.yaml
    task = load_task("my_tasks/shoes.yaml")
    q = task.questions()[0]
    q.prompt, q.choices[:2], q.values[:2]  # text to ask, answers to score, labels they mean
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from lance_io.reasons import ReasonError

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR_ENV = "LANCETAG_TASKS_DIR"
BUILTIN_TASKS_DIR = REPO_ROOT / "configs" / "tasks"

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class TaskConfigError(ReasonError):
    """A task file that cannot be used; the message names the file and the field."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_task", message)


def _check_placeholders(template: str, allowed: set[str], field: str) -> str:
    """Refuse ``{name}`` placeholders other than ``allowed`` (``{}`` stays literal text)."""
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - allowed)
    if unknown:
        choices = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
        raise ValueError(f"{field}: unknown placeholder {{{unknown[0]}}}; allowed: {choices}")
    return template


def _fill(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders by plain substitution (no str.format brace escaping)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _normalise(text: str) -> str:
    """Case-, space- and final-period-insensitive form of an answer, for exact matching."""
    return " ".join(text.strip().rstrip(".").split()).casefold()


@dataclass(frozen=True)
class Question:
    """One thing a backend asks about one image.

    ``choices`` are the exact answer texts to score (closed set) and ``values`` the value each
    choice stands for (label, attribute value, score as text), in the same order; both are
    ``None`` for free text (captions), which is generated greedily up to ``max_tokens``.
    The image goes before ``prompt`` in the user turn; ``system`` is the optional system turn.
    """

    key: str
    prompt: str
    choices: tuple[str, ...] | None
    values: tuple[str, ...] | None
    max_tokens: int
    system: str | None = None

    @property
    def closed(self) -> bool:
        """True when the answer must be one of ``choices``."""
        return self.choices is not None

    def match(self, text: str) -> str | None:
        """Return the value whose choice (or bare value) ``text`` states exactly, else None.

        Matching ignores case, surrounding space and a final period; nothing else is coerced.
        """
        if self.choices is None or self.values is None:
            return text
        wanted = _normalise(text)
        for choice, value in zip(self.choices, self.values, strict=True):
            if wanted in (_normalise(choice), _normalise(value)):
                return value
        return None


class _TaskBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Short name; also the default column prefix")
    description: str = Field("", description="For humans; does not reach the model")
    system_prompt: str | None = Field(None, description="Optional system turn before the question")

    def questions(self) -> list[Question]:
        """Return the questions this task asks of every image, in a fixed order."""
        raise NotImplementedError

    def prompt_hash(self) -> str:
        """Return a stable 16-hex-digit hash of everything that changes the model's input or output."""
        payload = self.model_dump(mode="json", exclude={"name", "description"})
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ClassifyTask(_TaskBase):
    """One label from a closed set; the answer is shaped by ``answer_template``."""

    kind: Literal["classify"] = "classify"
    labels: list[str] = Field(min_length=2, description="The closed label set")
    descriptions: dict[str, str] = Field(default_factory=dict, description="Optional label -> description")
    prompt: str = Field(
        "Fill in the blank: this is a photo of a {}, you should select the appropriate "
        "category from the provided labels: [{labels}]",
        description="User text after the image; placeholders {labels} and {descriptions}",
    )
    answer_template: str = Field(
        "this is a photo of {label}.", description="The answer the model gives; placeholder {label}"
    )

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        for label in labels:
            if not label.strip():
                raise ValueError("labels: empty label")
            key = _normalise(label)
            if key in seen:
                raise ValueError(f"labels: duplicate label {label!r}")
            seen.add(key)
        return labels

    @field_validator("prompt")
    @classmethod
    def _prompt_placeholders(cls, prompt: str) -> str:
        return _check_placeholders(prompt, {"labels", "descriptions"}, "prompt")

    @field_validator("answer_template")
    @classmethod
    def _answer_has_label(cls, template: str) -> str:
        _check_placeholders(template, {"label"}, "answer_template")
        if "{label}" not in template:
            raise ValueError("answer_template: must contain {label}")
        return template

    @model_validator(mode="after")
    def _descriptions_name_labels(self) -> ClassifyTask:
        unknown = sorted(set(self.descriptions) - set(self.labels))
        if unknown:
            raise ValueError(f"descriptions: {unknown[0]!r} is not one of the labels")
        return self

    def questions(self) -> list[Question]:
        """Return the single closed-set question over ``labels``."""
        described = "\n".join(f"- {lb}: {self.descriptions.get(lb, lb)}" for lb in self.labels)
        prompt = _fill(self.prompt, labels=", ".join(self.labels), descriptions=described)
        choices = tuple(_fill(self.answer_template, label=lb) for lb in self.labels)
        return [Question("label", prompt, choices, tuple(self.labels), 32, self.system_prompt)]


class Attribute(BaseModel):
    """One named attribute and its allowed values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    values: list[str] = Field(min_length=2, description="The closed set of allowed values")
    description: str | None = Field(None, description="Replaces the name in the prompt, e.g. 'sleeve length'")
    prompt: str | None = Field(None, description="Overrides the task prompt for this attribute")

    @field_validator("values")
    @classmethod
    def _values_unique(cls, values: list[str]) -> list[str]:
        keys = [_normalise(v) for v in values]
        if "" in keys or len(set(keys)) != len(keys):
            raise ValueError("values: empty or duplicate value")
        return values


class AttributesTask(_TaskBase):
    """Several named attributes, each answered from its own closed set."""

    kind: Literal["attributes"] = "attributes"
    attributes: dict[str, Attribute] = Field(min_length=1, description="attribute name -> allowed values")
    prompt: str = Field(
        "What is the {attribute} of the main item in this photo? Choose one of: [{values}]",
        description="User text per attribute; placeholders {attribute} and {values}",
    )
    answer_template: str = Field("{value}", description="The answer the model gives; placeholder {value}")

    @field_validator("attributes")
    @classmethod
    def _names_are_identifiers(cls, attributes: dict[str, Attribute]) -> dict[str, Attribute]:
        for name, attribute in attributes.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"attributes: {name!r} must be an identifier (it becomes a column name)")
            if attribute.prompt is not None:
                _check_placeholders(attribute.prompt, {"attribute", "values"}, f"attributes.{name}.prompt")
        return attributes

    @field_validator("prompt")
    @classmethod
    def _prompt_placeholders(cls, prompt: str) -> str:
        return _check_placeholders(prompt, {"attribute", "values"}, "prompt")

    @field_validator("answer_template")
    @classmethod
    def _answer_has_value(cls, template: str) -> str:
        _check_placeholders(template, {"value", "attribute"}, "answer_template")
        if "{value}" not in template:
            raise ValueError("answer_template: must contain {value}")
        return template

    def questions(self) -> list[Question]:
        """Return one closed-set question per attribute, in file order."""
        out = []
        for name, attribute in self.attributes.items():
            spoken = attribute.description or name.replace("_", " ")
            template = attribute.prompt or self.prompt
            prompt = _fill(template, attribute=spoken, values=", ".join(attribute.values))
            choices = tuple(_fill(self.answer_template, value=v, attribute=spoken) for v in attribute.values)
            out.append(Question(name, prompt, choices, tuple(attribute.values), 32, self.system_prompt))
        return out


class CaptionTask(_TaskBase):
    """Free text, generated greedily."""

    kind: Literal["caption"] = "caption"
    prompt: str = Field("Describe this image in one sentence.", description="User text after the image")
    max_tokens: int = Field(64, ge=1, le=2048, description="Longest caption, in tokens")

    @field_validator("prompt")
    @classmethod
    def _no_placeholders(cls, prompt: str) -> str:
        return _check_placeholders(prompt, set(), "prompt")

    def questions(self) -> list[Question]:
        """Return the single free-text question."""
        return [Question("caption", self.prompt, None, None, self.max_tokens, self.system_prompt)]


class ScoreTask(_TaskBase):
    """An integer score in ``[min_score, max_score]`` judged against ``rubric``."""

    kind: Literal["score"] = "score"
    min_score: int = Field(0, description="Lowest score")
    max_score: int = Field(10, description="Highest score")
    rubric: str = Field("", description="What high and low scores mean; placeholder {rubric} in the prompt")
    prompt: str = Field(
        "Rate this image from {min} to {max}. {rubric} Answer with the number only.",
        description="User text after the image; placeholders {min}, {max}, {rubric}",
    )
    answer_template: str = Field("{score}", description="The answer the model gives; placeholder {score}")

    @field_validator("prompt")
    @classmethod
    def _prompt_placeholders(cls, prompt: str) -> str:
        return _check_placeholders(prompt, {"min", "max", "rubric"}, "prompt")

    @field_validator("answer_template")
    @classmethod
    def _answer_has_score(cls, template: str) -> str:
        _check_placeholders(template, {"score"}, "answer_template")
        if "{score}" not in template:
            raise ValueError("answer_template: must contain {score}")
        return template

    @model_validator(mode="after")
    def _range_is_sane(self) -> ScoreTask:
        if self.max_score <= self.min_score:
            raise ValueError("max_score: must be greater than min_score")
        if self.max_score - self.min_score > 200:
            raise ValueError("max_score: at most 201 distinct scores (every score is a candidate answer)")
        return self

    def questions(self) -> list[Question]:
        """Return the single closed-set question over every integer in the range."""
        scores = [str(s) for s in range(self.min_score, self.max_score + 1)]
        prompt = _fill(self.prompt, min=str(self.min_score), max=str(self.max_score), rubric=self.rubric)
        choices = tuple(_fill(self.answer_template, score=s) for s in scores)
        prompt = re.sub(r" {2,}", " ", prompt).strip()  # an empty rubric leaves a double space
        return [Question("score", prompt, choices, tuple(scores), 8, self.system_prompt)]


class GenerateTask(_TaskBase):
    """Text written from a row's columns (and optionally its image) through a prompt template.

    ``inputs`` maps each placeholder of ``prompt`` to the column it is filled from; the prompt
    may also use ``{attributes}`` (every input as ``name: value`` lines). ``check`` names the
    inputs whose values the text must mention (all by default); values in ``unchecked_values``
    (``none``, ``other``...) are never required.
    """

    kind: Literal["generate"] = "generate"
    inputs: dict[str, str] = Field(min_length=1, description="placeholder -> column it is filled from")
    prompt: str = Field(
        "Write a description of the item with these attributes:\n{attributes}",
        description="User text; placeholders: the inputs' names and {attributes}",
    )
    image: bool = Field(False, description="Send the row's image with the prompt (a vision model)")
    max_tokens: int = Field(400, ge=1, le=4096, description="Longest text, in tokens")
    temperature: float = Field(0.1, ge=0, le=2, description="Sampling temperature")
    check: list[str] | None = Field(None, description="Inputs the text must mention; default: all")
    unchecked_values: list[str] = Field(
        default_factory=lambda: ["none", "other", "not applicable", "unknown"],
        description="Values the text need not mention",
    )

    @field_validator("inputs")
    @classmethod
    def _inputs_are_identifiers(cls, inputs: dict[str, str]) -> dict[str, str]:
        for name, column in inputs.items():
            for what, ident in (("name", name), ("column", column)):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ident):
                    raise ValueError(f"inputs: {what} {ident!r} must be an identifier")
        if "attributes" in inputs:
            raise ValueError("inputs: 'attributes' is reserved for the list of every input")
        return inputs

    @model_validator(mode="after")
    def _placeholders_are_inputs(self) -> GenerateTask:
        _check_placeholders(self.prompt, {*self.inputs, "attributes"}, "prompt")
        unknown = sorted(set(self.check or ()) - set(self.inputs))
        if unknown:
            raise ValueError(f"check: {unknown[0]!r} is not one of the inputs")
        return self

    @property
    def checked_inputs(self) -> list[str]:
        """Return the input names whose values the text must mention."""
        return list(self.inputs) if self.check is None else list(self.check)

    def render(self, values: dict[str, Any]) -> str:
        """Return the user prompt for one row, from its input values (input name -> value)."""
        shown = {name: "" if values.get(name) is None else str(values[name]) for name in self.inputs}
        listed = "\n".join(f"- {name.replace('_', ' ')}: {value}" for name, value in shown.items())
        return _fill(self.prompt, attributes=listed, **shown)

    def questions(self) -> list[Question]:
        """Return the single free-text question (its prompt is the unfilled template: see ``render``)."""
        return [Question("text", self.prompt, None, None, self.max_tokens, self.system_prompt)]


Task = Annotated[
    ClassifyTask | AttributesTask | CaptionTask | ScoreTask | GenerateTask, Field(discriminator="kind")
]
"""Any task; pydantic picks the model from ``kind``."""

_TASK_ADAPTER: TypeAdapter[Task] = TypeAdapter(Task)
TASK_KINDS: tuple[str, ...] = ("classify", "attributes", "caption", "score", "generate")


def task_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> Task:
    """Return the typed task described by ``data``; raise TaskConfigError naming the field."""
    if not isinstance(data, dict):
        raise TaskConfigError(f"{source}: a task must be a mapping, got {type(data).__name__}")
    if data.get("kind") not in TASK_KINDS:
        raise TaskConfigError(
            f"{source}: kind: must be one of {', '.join(TASK_KINDS)}, got {data.get('kind')!r}"
        )
    try:
        return _TASK_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise TaskConfigError(f"{source}: {problems}") from None


def _describe(err: Any) -> str:
    """One pydantic error as 'field.path: message' (our own messages already start with the field)."""
    where = ".".join(str(p) for p in err["loc"][1:])  # loc[0] is the kind (discriminator tag)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not where or msg.startswith(f"{where}:") or msg.startswith(f"{where.split('.')[0]}:"):
        return msg
    return f"{where}: {msg}"


def task_dirs() -> list[Path]:
    """Return the folders searched for task names: $LANCETAG_TASKS_DIR, then configs/tasks of the repo."""
    dirs = [Path(p) for p in os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep) if p]
    return [*dirs, BUILTIN_TASKS_DIR]


def available_tasks() -> list[str]:
    """Return the task names ``load_task`` finds without a path."""
    names = {p.stem for d in task_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def load_task(name_or_path: str | Path) -> Task:
    """Return the task named ``name_or_path`` (found in ``task_dirs()``) or read from that YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [d / f"{name_or_path}.yaml" for d in task_dirs()]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise TaskConfigError(
                f"task {str(name_or_path)!r} not found: give a YAML path or one of {', '.join(available_tasks())}"
            )
        path = found
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return task_from_dict(data, source=str(path))
