"""predict.py against the rules `cog build` applies to its source, and against the library's constants.

`tests/cog_schema.py` mirrors Cog's static schema generator (replicate/cog pkg/schema/python,
commit 6110c912); each broken copy below was checked against the real generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wanlora.frontends.service import MODEL_CHOICES

from .cog_schema import input_problems

ROOT = Path(__file__).resolve().parents[1]


PREDICT = (ROOT / "predict.py").read_text()
MODELS_LITERAL = "choices=[" + ", ".join(f'"{choice}"' for choice in MODEL_CHOICES) + "]"  # as predict.py writes it
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
            MODELS_LITERAL,
            "choices=list(MODEL_CHOICES)",
            "model: choices expression cannot be statically resolved",
        ),  # MODEL_CHOICES would come from wanlora.frontends.service: Cog never resolves an import
        ('choices=["480p", "720p"]', 'choices=["480p"] + RESOLUTIONS', "resolution: choices expression"),
        ("description=LORA_HELP", 'description=f"A LoRA: {LORA_HELP}"', "lora_weights: description is dropped"),
        (FPS_HELP, 'description=("Frames per second " "of the MP4.")', "fps: description is dropped"),
        (FPS_HELP, 'description="Frames per second " "of the MP4."', "fps: description is garbled"),
        ("ge=5,", "ge=MIN_FRAMES,", "num_frames: ge is not a number literal"),
        ("default=80,", "default_factory=lambda: 80,", "output_quality: default_factory is not supported"),
        ('default="Off"', 'default=FAST_MODES["off"]', "fast_mode: default is dropped: the input becomes required"),
        # the eight that an earlier mirror let through, each seen to break the real build
        ('choices=["480p", "720p"]', 'choices=[\n    "480p",  # the default\n    "720p",\n]', "resolution: choices"),
        (FPS_HELP, 'description=(\n    "Frames per second of the MP4."\n)', "fps: description is dropped"),
        (FPS_HELP, 'description=R"Frames per second of the MP4."', "fps: description is dropped"),
        (FPS_HELP, 'description=r"""Frames per second of the MP4."""', "fps: description is garbled"),
        ("default=80,", "default=(80),", "output_quality: default is dropped: the input becomes required"),
        ("ge=5,", "ge=- 5,", "num_frames: ge is not a number literal"),
    ],
    ids=[
        "imported-name",
        "unbound-name",
        "f-string",
        "parenthesized",
        "concatenated",
        "bound-name",
        "factory",
        "call",
        "comment-in-choices",
        "multi-line-parentheses",
        "upper-raw",
        "raw-triple",
        "parenthesized-default",
        "spaced-minus",
    ],  # fmt: skip
)
def test_the_rules_catch_what_cog_refuses_or_drops(old, new, words):
    problems = input_problems(_edited(old, new))
    assert any(words in problem for problem in problems), problems


def _with_constant(source: str, line: str) -> str:
    """`source` with a module-level constant of predict.py defined before the class."""
    return source.replace("\nclass Predictor", f"\n{line}\n\n\nclass Predictor", 1)


def test_positional_defaults_parenthesized_constants_and_named_bounds_are_lost_as_cog_loses_them():
    positional = _edited("output_quality: int = Input(\n", "output_quality: int = Input(\n            80,\n")
    positional = positional.replace("            default=80,\n", "", 1)
    assert "output_quality: a positional argument is ignored: the input becomes required" in input_problems(positional)
    constant = _with_constant(_edited(FPS_HELP, "description=FPS_TEXT"), 'FPS_TEXT = (\n    "Frames per second."\n)')
    assert any(p.startswith("fps: description is dropped") for p in input_problems(constant))
    plain = _with_constant(_edited(FPS_HELP, "description=FPS_TEXT"), 'FPS_TEXT = "Frames per second."')
    assert input_problems(plain) == []
    bound = _with_constant(_edited("ge=5,", "ge=FEWEST,"), "FEWEST = 5")  # bounds never resolve a name
    assert input_problems(bound) == ["num_frames: ge is not a number literal: Cog drops it"]


def test_module_constants_of_predict_py_pass_where_imports_do_not():
    bound = _edited(MODELS_LITERAL, "choices=MODELS").replace(
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
    for forms in (
        "owner/repo",
        "civitai.com/models/ID?modelVersionId=V",
        "civitai:V",
        "replicate.com/owner/model",
        "https://",
    ):
        assert forms in inputs["lora_weights"].description, forms


def test_predictor_literals_equal_the_librarys_constants(inputs):
    from wanlora.frontends import service
    from wanlora.models import CATALOGUE
    from wanlora.settings import (
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
    assert inputs["aspect_ratio"].choices == list(service.ASPECT_CHOICES)
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


def test_the_service_reads_the_predictors_inputs_as_one_object_equal_to_the_signature(inputs):
    """predict.py's inputs are PredictorInputs' fields and the options marked `predictor=True`, no more, no less.

    The rule for the marked ones: each is an input of the option's own name with the option's own default
    (the service passes it through as it is), so a new one needs no edit in wanlora/frontends/service.py."""
    import dataclasses

    from wanlora.frontends.service import PredictorInputs, carried_options, declared_inputs
    from wanlora.options import default_of

    fields = [field for field in dataclasses.fields(PredictorInputs) if field.name in declared_inputs()]
    assert [field.name for field in fields] == [name for name in inputs if name in declared_inputs()]  # its order
    assert set(inputs) == {*declared_inputs(), *carried_options()}  # every input, once
    assert [field.name for field in fields if field.default is dataclasses.MISSING] == ["prompt"]  # as in Cog
    for field in fields[1:]:
        assert field.default == inputs[field.name].default, field.name
    for name in carried_options():
        assert inputs[name].default == default_of(name), name
