"""Load manifests (files, directories, stdin) and validate a batch before anything is stored."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from config.resources import (
    KINDS,
    FieldError,
    HTTPRouteSpec,
    Resource,
    ResourceKey,
    parse_resource,
)

DEFAULT_NAMESPACE = "default"
ROOT_NAMESPACE = "istio-system"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Document:
    """One manifest and where it came from (`index` counts documents in the file from 1)."""

    source: str
    index: int
    obj: Any
    prefix: str = ""  # field-path prefix for items of a `kind: List` document

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "prefix": self.prefix,
            "object": self.obj,
        }

    @classmethod
    def from_json(cls, d: Any) -> Document:
        if not isinstance(d, dict) or "object" not in d:
            raise ValueError("each document must be an object with an 'object' field")
        return cls(
            str(d.get("source", "<request>")),
            int(d.get("index", 1)),
            d["object"],
            str(d.get("prefix", "")),
        )


@dataclass(frozen=True)
class Problem:
    """One reason a batch was refused, in the words shown to the operator."""

    source: str
    index: int
    resource: str  # "Service default/web", or "?" when the manifest has no usable identity
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: document {self.index}"
        if self.resource:
            where += f" ({self.resource})"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "resource": self.resource,
            "path": self.path,
            "message": self.message,
        }


class ValidationFailed(Exception):
    """The batch was refused; nothing of it was applied."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def resource_label(obj: Any, default_namespace: str = DEFAULT_NAMESPACE) -> str:
    """Best-effort `Kind ns/name` of a manifest that may be malformed."""
    if not isinstance(obj, dict):
        return ""
    kind = obj.get("kind") if isinstance(obj.get("kind"), str) else "?"
    md = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(md, dict)
    name = md.get("name") if isinstance(md.get("name"), str) else "?"
    info = KINDS.get(str(kind))
    if info is not None and not info.namespaced:
        return f"{kind} {name}"
    ns = md.get("namespace") if isinstance(md.get("namespace"), str) else default_namespace
    return f"{kind} {ns}/{name}"


def load_text(text: str, source: str) -> list[Document]:
    """Split a multi-document YAML (or JSON) text; `kind: List` documents are expanded."""
    docs: list[Document] = []
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        index = 1
        if mark is not None:
            lines = text.splitlines()
            seps = [i for i, ln in enumerate(lines) if ln.startswith("---")]
            index = 1 + sum(1 for i in seps if i < mark.line)
            first_content = next(
                (i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")), 0
            )
            if seps and seps[0] == first_content and seps[0] < mark.line:
                index -= 1
        raise ValidationFailed(
            [Problem(source, max(index, 1), "", "", f"not valid YAML{where}: {problem}")]
        ) from None
    position = 0
    for obj in raw:
        position += 1
        if obj is None:
            continue
        if (
            isinstance(obj, dict)
            and obj.get("kind") == "List"
            and isinstance(obj.get("items"), list)
        ):
            for i, item in enumerate(obj["items"]):
                docs.append(Document(source, position, item, f"items[{i}]"))
            continue
        docs.append(Document(source, position, obj))
    return docs


def load_paths(paths: Iterable[str], stdin: TextIO | None = None) -> list[Document]:
    """Read manifests from files, directories (their *.yaml/*.yml/*.json, sorted) and `-`."""
    docs: list[Document] = []
    for p in paths:
        if p == "-":
            if stdin is None:
                raise ValidationFailed([Problem("<stdin>", 1, "", "", "stdin is not available")])
            docs.extend(load_text(stdin.read(), "<stdin>"))
            continue
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.endswith(MANIFEST_SUFFIXES))
            if not names:
                raise ValidationFailed(
                    [Problem(p, 1, "", "", "directory holds no *.yaml, *.yml or *.json files")]
                )
            for n in names:
                docs.extend(_load_file(os.path.join(p, n)))
            continue
        docs.extend(_load_file(p))
    return docs


def _load_file(path: str) -> list[Document]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValidationFailed([Problem(path, 1, "", "", "no such file or directory")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationFailed([Problem(path, 1, "", "", f"cannot read: {e}")]) from None
    return load_text(text, path)


def _problem(doc: Document, resource: str, path: str, message: str) -> Problem:
    if doc.prefix:
        path = f"{doc.prefix}.{path}" if path else doc.prefix
    return Problem(doc.source, doc.index, resource, path, message)


def validate_batch(
    docs: Sequence[Document],
    exists: Callable[[ResourceKey], bool],
    *,
    default_namespace: str = DEFAULT_NAMESPACE,
) -> list[tuple[Document, Resource]]:
    """Parse every document and check the batch as a whole; raise ValidationFailed on any problem.

    `exists` says whether a resource is already stored (used for references to parents:
    a namespaced resource needs its Namespace, an HTTPRoute ExtensionRef needs its target).
    """
    problems: list[Problem] = []
    parsed: list[tuple[Document, Resource]] = []
    seen: dict[ResourceKey, Document] = {}
    if not docs:
        raise ValidationFailed([Problem("<request>", 1, "", "", "no resources given")])
    for doc in docs:
        try:
            res = parse_resource(doc.obj, default_namespace=default_namespace)
        except FieldError as e:
            problems.append(
                _problem(doc, resource_label(doc.obj, default_namespace), e.path, e.message)
            )
            continue
        first = seen.get(res.key)
        if first is not None:
            problems.append(
                _problem(
                    doc,
                    str(res.key),
                    "metadata.name",
                    f"duplicate: also defined in {first.source} document {first.index}",
                )
            )
            continue
        seen[res.key] = doc
        parsed.append((doc, res))

    def present(key: ResourceKey) -> bool:
        return key in seen or exists(key)

    for doc, res in parsed:
        ns = res.meta.namespace
        if ns and not present(ResourceKey("Namespace", "", ns)):
            problems.append(
                _problem(
                    doc,
                    str(res.key),
                    "metadata.namespace",
                    f"namespace {ns!r} does not exist: create it (kind "
                    "Namespace) first or in the same apply",
                )
            )
            continue
        if isinstance(res.spec, HTTPRouteSpec):
            for ri, rule in enumerate(res.spec.rules):
                for fi, flt in enumerate(rule.filters):
                    ref = flt.extension_ref
                    if ref is None:
                        continue
                    if not present(ResourceKey(ref.kind, ref.namespace, ref.name)):
                        problems.append(
                            _problem(
                                doc,
                                str(res.key),
                                f"spec.rules[{ri}].filters[{fi}].extensionRef",
                                f"{ref.kind} {ref.namespace}/{ref.name} does not exist: apply it "
                                "first or in the same apply",
                            )
                        )
    if problems:
        raise ValidationFailed(problems)
    return parsed
