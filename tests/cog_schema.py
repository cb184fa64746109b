"""How `cog build` reads predict.py's Input() arguments, mirrored for tests.

`cog build`, `cog predict` and `cog push` generate the OpenAPI schema from predict.py's text
with a tree-sitter parser written in Go, before Docker starts; the Cog CLI is not on PyPI, so
CI cannot run that step. This module reads predict.py as that parser does: each argument is
judged by the tree-sitter node it would be (a parenthesized expression, a concatenated
string, a list with a comment inside, ...), from its exact source text, and resolved by the
same rules. The rules are replicate/cog's pkg/schema/python, commit 6110c912 (v0.22.0-5,
which the 0.23 SDK that cog.yaml pins builds with): inputs.go (parseInputCall),
module_scope.go (collectModuleScope, resolveStringExpr, resolveDefaultExpr,
resolveChoicesExpr) and literals.go (parseDefaultValue, parseStringLiteral,
parseNumberLiteral, parseListLiteral). Re-read those files after upgrading Cog.

Python's ast drops parentheses and comments, so a node's kind is decided from its text.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass

SIMPLE_TYPES = {"str", "int", "float", "bool", "Path", "Secret", "File"}
NUMBER_BOUNDS = ("ge", "le", "min_length", "max_length")
UNRESOLVED = object()  # what a failed parse gives


@dataclass(frozen=True)
class Node:
    """An expression as tree-sitter sees it: its node type, and its exact text."""

    ast: ast.expr
    text: str

    @property
    def kind(self) -> str:
        if self.text.startswith("(") and not isinstance(self.ast, ast.Tuple):
            return "parenthesized_expression"
        if isinstance(self.ast, ast.Constant):
            value = self.ast.value
            if value is None or isinstance(value, bool):
                return {None: "none", True: "true", False: "false"}[value]
            if isinstance(value, str):
                return "concatenated_string" if len(_tokens(self.text, tokenize.STRING)) > 1 else "string"
            return {int: "integer", float: "float"}.get(type(value), "other")
        kinds = {ast.UnaryOp: "unary_operator", ast.List: "list", ast.Dict: "dictionary", ast.Set: "set",
                 ast.Tuple: "tuple", ast.Name: "identifier", ast.Call: "call", ast.BinOp: "binary_operator",
                 ast.JoinedStr: "string"}  # fmt: skip
        return kinds.get(type(self.ast), "other")

    def children(self, source: str) -> list[Node]:
        return [node_of(source, child) for child in getattr(self.ast, "elts", [])]

    @property
    def has_comment(self) -> bool:
        """tree-sitter makes a comment a named child of the list it sits in."""
        return bool(_tokens(self.text, tokenize.COMMENT))


def _tokens(text: str, kind: int) -> list[str]:
    try:
        return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == kind]
    except (tokenize.TokenError, IndentationError):
        return []


def node_of(source: str, expr: ast.expr) -> Node:
    return Node(expr, ast.get_source_segment(source, expr) or "")


def keyword_node(source: str, keyword: ast.keyword) -> Node:
    """A keyword argument's value, parentheses included (ast's own node leaves them out)."""
    text = (ast.get_source_segment(source, keyword) or "").split("=", 1)[1].strip()
    return Node(keyword.value, text)


def parse_string_literal(node: Node) -> str | None:
    """literals.go: the text between the quotes, unescaped never; only "…", '…', triple quotes and r"…"."""
    text = node.text
    if node.kind not in ("string", "concatenated_string"):
        return None
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else None
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else None
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else None
    return None


def parse_number_literal(node: Node) -> float | None:
    """literals.go: Go's strconv.ParseFloat of the trimmed text, whatever the node is."""
    try:
        return float(node.text.strip())
    except ValueError:
        return None


def parse_default_value(source: str, node: Node) -> object:
    """literals.go parseDefaultValue: the value, or UNRESOLVED."""
    kind, text = node.kind, node.text
    if kind in ("none", "true", "false"):
        return node.ast.value
    if kind in ("integer", "float", "unary_operator"):
        try:
            return int(text.strip(), 0) if kind != "float" else float(text)
        except ValueError:
            number = parse_number_literal(node) if kind == "unary_operator" else None
            return UNRESOLVED if number is None else number
    if kind in ("string", "concatenated_string"):
        parsed = parse_string_literal(node)
        return UNRESOLVED if parsed is None else parsed
    if kind in ("list", "set"):
        return parse_list_literal(source, node)
    if kind == "dictionary":  # pairs that do not parse are skipped, not fatal
        pairs = zip(node.ast.keys, node.ast.values, strict=True)
        parsed = [
            (parse_default_value(source, node_of(source, k)), parse_default_value(source, node_of(source, v)))
            for k, v in pairs
            if k is not None
        ]
        return {key: value for key, value in parsed if UNRESOLVED not in (key, value)}
    if kind == "tuple":  # unparseable items are skipped, not fatal
        items = [parse_default_value(source, child) for child in node.children(source)]
        return [item for item in items if item is not UNRESOLVED]
    return UNRESOLVED


def parse_list_literal(source: str, node: Node) -> object:
    if node.kind not in ("list", "set") or node.has_comment:
        return UNRESOLVED
    items = [parse_default_value(source, child) for child in node.children(source)]
    return UNRESOLVED if UNRESOLVED in items else items


class Predictor:
    """predict.py's module scope and its run() parameters, read as Cog reads them."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.tree = ast.parse(source)
        self.scope: dict[str, object] = {}  # collectModuleScope: module-level NAME = literal, as Cog reads it
        self.meaning: dict[str, object] = {}  # the same names as Python reads them
        for statement in self.tree.body:
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                target = statement.targets[0]
                value = self._assigned(statement)
                if isinstance(target, ast.Name) and value is not UNRESOLVED:
                    self.scope[target.id] = value
                    self.meaning[target.id] = ast.literal_eval(statement.value)

    def _assigned(self, statement: ast.Assign) -> object:
        segment = ast.get_source_segment(self.source, statement) or ""
        return parse_default_value(self.source, Node(statement.value, segment.split("=", 1)[1].strip()))

    def resolve_string(self, node: Node) -> str | None:
        parsed = parse_string_literal(node)
        if parsed is None and node.kind == "identifier":
            bound = self.scope.get(node.ast.id)
            parsed = bound if isinstance(bound, str) else None
        return parsed

    def resolve_default(self, node: Node) -> object:
        value = parse_default_value(self.source, node)
        if value is UNRESOLVED and node.kind == "identifier":
            value = self.scope.get(node.ast.id, UNRESOLVED)
        return value

    def resolve_choices(self, node: Node) -> object:
        kind = node.kind
        if kind == "list":
            return parse_list_literal(self.source, node)
        if kind == "identifier":
            bound = self.scope.get(node.ast.id, UNRESOLVED)
            return bound if isinstance(bound, list) else UNRESOLVED
        if kind == "binary_operator" and isinstance(node.ast.op, ast.Add):
            left = self.resolve_choices(node_of(self.source, node.ast.left))
            right = self.resolve_choices(node_of(self.source, node.ast.right))
            return UNRESOLVED if UNRESOLVED in (left, right) else [*left, *right]
        if kind == "call" and isinstance(node.ast.func, ast.Name) and node.ast.func.id == "list" and node.ast.args:
            inner = node.ast.args[0]
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute):
                table = inner.func.value
                bound = self.scope.get(table.id) if isinstance(table, ast.Name) else None
                if isinstance(bound, dict) and inner.func.attr in ("keys", "values"):
                    return list(bound) if inner.func.attr == "keys" else list(bound.values())
        return UNRESOLVED

    def problems(self) -> list[str]:
        """Every Input() argument that Cog would refuse (the build fails), drop or garble."""
        runner = next(
            f
            for c in self.tree.body
            if isinstance(c, ast.ClassDef)
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name in ("run", "predict")
        )
        arguments = runner.args.args[1:]  # after self
        defaults = dict(
            zip(
                [a.arg for a in arguments][len(arguments) - len(runner.args.defaults) :],
                runner.args.defaults,
                strict=True,
            )
        )
        found = []
        for argument in arguments:
            name = argument.arg
            if not _simple_annotation(argument.annotation):
                found.append(f"{name}: a type Cog's schema cannot take")
            default = defaults.get(name)
            if default is None:
                continue
            if isinstance(default, ast.Call) and isinstance(default.func, ast.Name) and default.func.id == "Input":
                found += [f"{name}: {problem}" for problem in self._input_problems(default)]
            elif self.resolve_default(node_of(self.source, default)) is UNRESOLVED:
                found.append(f"{name}: default cannot be statically resolved (the build fails)")
        return found

    def _input_problems(self, call: ast.Call) -> list[str]:
        found = []
        if call.args:
            found.append("a positional argument is ignored: the input becomes required")
        for keyword in call.keywords:
            key, node = keyword.arg, keyword_node(self.source, keyword)
            if key == "choices" and self.resolve_choices(node) is UNRESOLVED:
                found.append("choices expression cannot be statically resolved (the build fails)")
            elif key == "default_factory":
                found.append("default_factory is not supported (the build fails)")
            elif key == "default" and self.resolve_default(node) is UNRESOLVED:
                found.append("default is dropped: the input becomes required")
            elif key == "description":
                found += self._description_problems(node)
            elif key in NUMBER_BOUNDS and parse_number_literal(node) is None:
                found.append(f"{key} is not a number literal: Cog drops it")
        return found

    def _description_problems(self, node: Node) -> list[str]:
        text = self.resolve_string(node)
        if text is None:
            return [f"description is dropped ({node.kind} {node.text[:40]!r})"]
        meant = self.meaning[node.ast.id] if node.kind == "identifier" else ast.literal_eval(node.ast)
        if text != meant:  # a concatenation, r"""...""", or an escape that Cog shows verbatim
            return [f"description is garbled: Cog shows {text[:40]!r}"]
        return []


def _simple_annotation(node: ast.AST | None) -> bool:
    if isinstance(node, ast.Name):
        return node.id in SIMPLE_TYPES
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        return _simple_annotation(node.left) and isinstance(node.right, ast.Constant) and node.right.value is None
    return False


def input_problems(source: str) -> list[str]:
    """Every Input() argument that Cog's static schema generator would refuse, drop or garble."""
    return Predictor(source).problems()
