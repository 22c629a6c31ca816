"""The SAE grid's keys are defined once (visae.sae.config): the schema, the validation, the
workflow's train: defaults and the modules' constructors all agree with the dataclasses."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from visae.errors import VisaeError
from visae.sae import config as C

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def schema():
    return yaml.safe_load(SCHEMA.read_text())


def test_schema_saes_section_equals_the_dataclasses():
    branches = schema()["properties"]["saes"]["additionalProperties"]
    assert branches["if"] == {"type": "object", "required": ["import"]}  # `import:` picks the branch
    entry, imported = branches["else"], branches["then"]
    props = dict(entry["properties"])
    assert props.pop("pass")["type"] == "string"  # the one workflow-only key
    assert props == C.schema_properties()  # keys, types, enums, ranges; defaults in the descriptions
    assert entry["allOf"] == C.schema_required()
    assert entry["required"] == ["architecture"] and entry["additionalProperties"] is False
    assert imported["properties"] == C.schema_import_properties()  # an SAE trained elsewhere
    assert imported["required"] == list(C.IMPORT_REQUIRED) and imported["additionalProperties"] is False


def test_schema_train_defaults_equal_the_dataclasses():
    train = schema()["properties"]["train"]["properties"]
    assert C.TRAIN_DEFAULTS == ("lr_warmup", "l1_warmup", "tokens", "batch_size")
    for key in C.TRAIN_DEFAULTS:
        assert train[key] == C.field_schema(C.COMMON[key], describe=False), key


def test_schema_descriptions_state_the_defaults():
    props = C.schema_properties()
    assert props["lr"]["description"] == "default: 0.0003"
    assert props["aux_alpha"]["description"].endswith("default: 0.03125")
    assert props["adam_betas"]["description"] == "default: [0.9, 0.999]"


@pytest.mark.parametrize("arch", C.ARCHITECTURES)
def test_module_constructor_defaults_are_the_dataclass_defaults(arch):
    from visae.sae.modules import CLASSES, SAE
    fields = {f.name: f for f in dataclasses.fields(C.CONFIGS[arch])}
    params = {}
    for cls in reversed(CLASSES[arch].__mro__):  # the constructor chain: a subclass's default wins
        if "__init__" in vars(cls) and issubclass(cls, SAE):
            params.update(inspect.signature(cls.__init__).parameters)
    for key in C.ARCH_KEYS[arch]:
        p, f = params[key], fields[key]
        if key in C.REQUIRED[arch]:
            assert p.default is inspect.Parameter.empty, key
        else:
            assert p.default == f.default, (arch, key, p.default, f.default)
    assert params["init"].default == C.COMMON_DEFAULTS["init"]


@pytest.mark.parametrize("arch", C.ARCHITECTURES)
def test_required_and_sparsity_keys_come_from_the_dataclasses(arch):
    base = {"name": "x", "architecture": arch, "k": 4, "l1": 1e-3, "l0": 1e-3}
    base = {k: v for k, v in base.items() if k in ("name", "architecture") or k in C.ARCH_FIELDS[arch]}
    for key in C.REQUIRED[arch]:
        entry = {k: v for k, v in base.items() if k != key}
        with pytest.raises(VisaeError, match=f"grid entry 'x': missing key '{key}' \\(required by architecture '{arch}'\\)"):
            C.validate_grid([entry], 16)
    if arch in C.SPARSITY_KEY:
        key = C.SPARSITY_KEY[arch]
        with pytest.raises(VisaeError, match=f"key '{key}' \\(the sparsity coefficient λ\\) must be >= 0, got -1"):
            C.validate_grid([{**base, key: -1}], 16)


def test_entry_is_the_common_defaults_then_the_given_keys():
    """What config.json records and the run hash covers: every common key in the dataclass's
    order with its default, then the architecture's keys as given (their defaults stay the module's)."""
    [e] = C.validate_grid([{"name": "t", "architecture": "topk", "k": 4, "lr": 1, "dead_tokens": 4096}], 16)
    assert list(e) == list(C.COMMON) + ["k", "dead_tokens"]
    assert e == {**C.COMMON_DEFAULTS, "name": "t", "architecture": "topk", "expansion": 32.0, "width": 512,
                 "lr": 1.0, "k": 4, "dead_tokens": 4096}
    assert type(e["lr"]) is float and type(e["expansion"]) is float


@pytest.mark.parametrize("change, message", [
    ({"prefixes": [16, 64]}, "key 'prefixes' must be a list of numbers in (0, 1], got [16, 64]"),
    ({"prefixes": [0, 0.5]}, "key 'prefixes' must be a list of numbers in (0, 1]"),
    ({"prefixes": []}, "key 'prefixes' must be a list of numbers in (0, 1]"),
    ({"threshold_momentum": 1.5}, "key 'threshold_momentum' must be in [0, 1], got 1.5"),
    ({"adam_betas": [0.9]}, "key 'adam_betas' must be a list of 2 numbers in [0, 1), got [0.9]"),
    ({"adam_betas": [0.9, 1.0]}, "key 'adam_betas' must be a list of 2 numbers in [0, 1)"),
    ({"normalize": "yes"}, "key 'normalize' must be true or false, got 'yes'"),
    ({"inner": "dense"}, "key 'inner' is 'dense'; allowed: topk, batchtopk"),
])
def test_matryoshka_keys_are_checked_against_their_ranges(change, message):
    with pytest.raises(VisaeError) as err:
        C.validate_grid([{"name": "m", "architecture": "matryoshka", "k": 4, **change}], 16)
    assert str(err.value).startswith(f"grid entry 'm': {message}"), str(err.value)


def test_jumprelu_bandwidth_must_be_positive():
    with pytest.raises(VisaeError, match="grid entry 'j': key 'bandwidth' must be positive, got 0"):
        C.validate_grid([{"name": "j", "architecture": "jumprelu", "l0": 1e-3, "bandwidth": 0}], 16)


def test_prefixes_are_fractions_of_the_width_everywhere():
    """One meaning: fractions in (0, 1] -- in the grid validation, the schema and the module."""
    from visae.sae.modules import build_sae
    [e] = C.validate_grid([{"name": "m", "architecture": "matryoshka", "k": 4, "width": 64,
                            "prefixes": [0.25, 0.5]}], 16)
    assert e["prefixes"] == [0.25, 0.5]
    assert build_sae("matryoshka", 16, 64, k=4, prefixes=e["prefixes"]).prefix_sizes == [16, 32, 64]
    assert build_sae("matryoshka", 16, 64, k=4).prefix_sizes == [8, 16, 32, 64]
    with pytest.raises(ValueError, match=r"fractions of the width in \(0, 1\], got \[16, 32\]"):
        build_sae("matryoshka", 16, 64, k=4, prefixes=[16, 32])
    entry_schema = schema()["properties"]["saes"]["additionalProperties"]["else"]
    jsonschema.validate({"architecture": "matryoshka", "k": 4, "prefixes": [0.25, 1]}, entry_schema)
    for bad in ([16, 64], []):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"architecture": "matryoshka", "k": 4, "prefixes": bad}, entry_schema)


def test_schema_requires_each_architectures_keys():
    entry_schema = schema()["properties"]["saes"]["additionalProperties"]["else"]
    jsonschema.validate({"architecture": "relu", "l1": 1e-3}, entry_schema)
    with pytest.raises(jsonschema.ValidationError, match="'l1' is a required property"):
        jsonschema.validate({"architecture": "relu"}, entry_schema)


def test_config_module_does_not_import_torch():
    """The workflow imports it at parse time (common.smk's sae_entry)."""
    code = "import sys, visae.sae.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
