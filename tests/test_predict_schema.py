"""predict.py against the rules `cog build` applies to its source, and against the library's constants.

`cog build`, `cog predict` and `cog push` generate the OpenAPI schema from predict.py's
text with a tree-sitter parser written in Go, before Docker starts; the Cog CLI is not on
PyPI, so CI cannot run that step. `input_problems` mirrors it. The rules are read from
replicate/cog, pkg/schema/python (inputs.go: parseInputCall; module_scope.go:
collectModuleScope, resolveChoicesExpr, resolveStringExpr; literals.go: parseStringLiteral,
parseNumberLiteral), commit 6110c912 of 2026-08-21 (v0.22.0-5), which the 0.23 SDK that
cog.yaml pins builds with. Re-read those files after upgrading Cog.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMPLE_TYPES = {"str", "int", "float", "bool", "Path", "Secret", "File"}
NUMBER_BOUNDS = ("ge", "le", "min_length", "max_length")


def _is_literal(node: ast.AST) -> bool:
    """What Cog's parseDefaultValue accepts: None, bools, numbers (negative ones too), strings, lists, dicts."""
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, (bool, int, float, str))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_literal(item) for item in node.elts)
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values, strict=True)
        return all(k is not None and _is_literal(k) and _is_literal(v) for k, v in pairs)
    return False


def _plain_string(source: str, node: ast.AST) -> str | None:
    """Why Cog would drop or garble a string argument written as `node`, or None when it reads it whole.

    Cog reads one string token, unescaped: a parenthesized string, an f-string, an implicit
    concatenation or a backslash escape does not come through as written.
    """
    text = ast.get_source_segment(source, node, padded=False)
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.STRING]
    if len(tokens) != 1:
        return "an implicit concatenation: Cog keeps the raw text between the first and last quote"
    token = tokens[0].string
    if token.lstrip("rR")[0] not in "'\"":
        return f"a {token[: token.index(token.lstrip('bBfFuUrR')[0])]}-prefixed string: Cog drops it"
    if "\\" in token:
        return "a backslash escape: Cog shows it verbatim"
    return None


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tree = ast.parse(source)
        self.scope: dict[str, ast.AST] = {}  # Cog's collectModuleScope: module-level NAME = literal
        for statement in self.tree.body:
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and _is_literal(statement.value)
                and not self._parenthesized(statement.value)
            ):
                self.scope[statement.targets[0].id] = statement.value

    def _parenthesized(self, node: ast.AST) -> bool:
        before = self.source.splitlines()[node.lineno - 1][: node.col_offset].rstrip()
        return before.endswith("(")

    def choices(self, node: ast.AST) -> bool:
        """Cog's resolveChoicesExpr."""
        if isinstance(node, ast.List):
            return _is_literal(node)
        if isinstance(node, ast.Name):
            return isinstance(self.scope.get(node.id), ast.List)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.choices(node.left) and self.choices(node.right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list":
            inner = node.args[0] if len(node.args) == 1 else None
            return (
                isinstance(inner, ast.Call)
                and isinstance(inner.func, ast.Attribute)
                and inner.func.attr in ("keys", "values")
                and isinstance(inner.func.value, ast.Name)
                and isinstance(self.scope.get(inner.func.value.id), ast.Dict)
            )
        return False

    def string(self, node: ast.AST) -> str | None:
        """Cog's resolveStringExpr: a string literal, or a module-level name bound to one."""
        if isinstance(node, ast.Name):
            bound = self.scope.get(node.id)
            if not (isinstance(bound, ast.Constant) and isinstance(bound.value, str)):
                return f"the name {node.id} is not a string constant of predict.py: Cog drops it"
            node = bound
        elif not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return "not a string literal: Cog drops it"
        if self._parenthesized(node):
            return "a parenthesized string: Cog drops it"
        return _plain_string(self.source, node)

    def annotation(self, node: ast.AST | None) -> bool:
        if isinstance(node, ast.Name):
            return node.id in SIMPLE_TYPES
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
            return self.annotation(node.left) and isinstance(node.right, ast.Constant) and node.right.value is None
        return False

    def problems(self) -> list[str]:
        found = []
        runner = next(
            f
            for c in self.tree.body
            if isinstance(c, ast.ClassDef)
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name in ("run", "predict")
        )
        arguments = runner.args.args[1:]  # after self
        with_defaults = [a.arg for a in arguments[len(arguments) - len(runner.args.defaults) :]]
        defaults = dict(zip(with_defaults, runner.args.defaults, strict=True))
        for argument in arguments:
            name = argument.arg
            if not self.annotation(argument.annotation):
                found.append(f"{name}: a type Cog's schema cannot take")
            default = defaults.get(name)
            if default is None:
                continue
            if not (
                isinstance(default, ast.Call) and isinstance(default.func, ast.Name) and default.func.id == "Input"
            ):
                if not (_is_literal(default) or isinstance(default, ast.Name) and default.id in self.scope):
                    found.append(f"{name}: default cannot be statically resolved (the build fails)")
                continue
            for keyword in default.keywords:
                key, value = keyword.arg, keyword.value
                if key == "choices" and not self.choices(value):
                    found.append(f"{name}: choices expression cannot be statically resolved (the build fails)")
                elif key == "default" and not (
                    _is_literal(value) or isinstance(value, ast.Name) and value.id in self.scope
                ):
                    found.append(f"{name}: default cannot be statically resolved")
                elif key == "default_factory":
                    found.append(f"{name}: default_factory is not supported (the build fails)")
                elif key == "description" and (why := self.string(value)):
                    found.append(f"{name}: description is {why}")
                elif key in NUMBER_BOUNDS and not (_is_literal(value) and not isinstance(value, ast.Name)):
                    found.append(f"{name}: {key} is not a number literal: Cog drops it")
        return found


def input_problems(source: str) -> list[str]:
    """Every Input() argument that Cog's static schema generator would refuse, drop or garble."""
    return _Checker(source).problems()


PREDICT = (ROOT / "predict.py").read_text()
FPS_HELP = 'description="Frames per second of the MP4. Empty: the model\'s own, 16 (Wan2.1, 2.2-a14b) or 24 (2.2-5b)."'


def test_predict_py_follows_cogs_static_schema_rules():
    assert input_problems(PREDICT) == []


def _edited(old: str, new: str) -> str:
    assert old in PREDICT, old
    return PREDICT.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (
            'choices=["14b", "1.3b", "2.2-a14b", "2.2-5b"]',
            "choices=list(MODEL_CHOICES)",
            "model: choices expression cannot be statically resolved",
        ),  # MODEL_CHOICES would come from wanlora.service: Cog never resolves an import
        ('choices=["480p", "720p"]', 'choices=["480p"] + RESOLUTIONS', "resolution: choices expression"),
        ("description=LORA_HELP", 'description=f"A LoRA: {LORA_HELP}"', "lora_weights: description is not a string"),
        (
            FPS_HELP,
            'description=("Frames per second " "of the MP4.")',
            "fps: description is a parenthesized string",
        ),
        (
            FPS_HELP,
            'description="Frames per second " "of the MP4."',
            "fps: description is an implicit concatenation",
        ),
        ("ge=5,", "ge=MIN_FRAMES,", "num_frames: ge is not a number literal"),
        ("default=80,", "default_factory=lambda: 80,", "output_quality: default_factory is not supported"),
        ('default="Off"', 'default=FAST_MODES["off"]', "fast_mode: default cannot be statically resolved"),
    ],
    ids=["imported-name", "unbound-name", "f-string", "parenthesized", "concatenated", "bound-name", "factory", "call"],
)
def test_the_rules_catch_what_cog_refuses_or_drops(old, new, words):
    problems = input_problems(_edited(old, new))
    assert any(words in problem for problem in problems), problems


def test_module_constants_of_predict_py_pass_where_imports_do_not():
    bound = _edited('choices=["14b", "1.3b", "2.2-a14b", "2.2-5b"]', "choices=MODELS").replace(
        "\nclass Predictor", '\nMODELS = ["14b", "1.3b"]\n\n\nclass Predictor', 1
    )
    assert input_problems(bound) == []
    keys = bound.replace('MODELS = ["14b", "1.3b"]', 'SIZES = {"14b": 1, "1.3b": 2}').replace(
        "choices=MODELS", "choices=list(SIZES.keys())"
    )
    assert input_problems(keys) == []


# ------------------------------------------------------------------ the literals against the library


@pytest.fixture(scope="module")
def inputs():
    from cog._inspector import create_predictor

    return create_predictor("predict", "Predictor").inputs


def test_every_input_tells_a_person_what_to_put_in_it(inputs):
    for name, field in inputs.items():
        assert field.description and len(field.description) >= 30, name
    for forms in ("owner/repo", "civitai.com/models/ID?modelVersionId=V", "civitai:V", "replicate.com/owner/model",
                  "https://"):  # fmt: skip
        assert forms in inputs["lora_weights"].description, forms


def test_predictor_literals_equal_the_librarys_constants(inputs):
    from wanlora import service
    from wanlora.models import CATALOGUE
    from wanlora.settings import (
        ASPECT_RATIOS,
        DEFAULT_QUALITY,
        LORA_SCALE_RANGE,
        MAX_FPS,
        MAX_GUIDANCE,
        MAX_SHIFT,
        MAX_STEPS,
        MIN_FRAMES,
        MIN_SHIFT,
        QUALITY_RANGE,
        RESOLUTIONS,
    )

    def bounds(name):
        return inputs[name].ge, inputs[name].le

    assert inputs["model"].choices == list(service.MODEL_CHOICES)
    assert inputs["fast_mode"].choices == list(service.FAST_MODES)
    assert inputs["accelerator"].choices == list(service.ACCELERATORS)
    assert inputs["resolution"].choices == list(RESOLUTIONS)
    assert inputs["aspect_ratio"].choices == list(ASPECT_RATIOS)
    max_frames = max(spec.max_frames for name, spec in CATALOGUE.items() if name in service.MODEL_CHOICES.values())
    assert bounds("num_frames") == (MIN_FRAMES, max_frames)
    assert bounds("fps") == (1, MAX_FPS)
    assert bounds("sample_steps") == (1, MAX_STEPS)
    assert bounds("sample_guide_scale") == bounds("sample_guide_scale_2") == (0, MAX_GUIDANCE)
    assert bounds("sample_shift") == (MIN_SHIFT, MAX_SHIFT)
    scales = ("lora_scale", "extra_lora_scale", "lora_scale_transformer", "lora_scale_transformer_2")
    assert {bounds(name) for name in scales} == {LORA_SCALE_RANGE}
    assert bounds("output_quality") == QUALITY_RANGE and inputs["output_quality"].default == DEFAULT_QUALITY
    assert f"Empty: {service.DEFAULT_SAMPLE_STEPS}," in inputs["sample_steps"].description
