"""The new config fields (tower kind, connector order and heads, cross-attention variants) mirror to
YAML 1:1, take CLI overrides, and reject bad values naming the field."""

from __future__ import annotations

import pytest

from resampler.config import load_config, save_config
from vlm import InjectionConfig, ProjectorConfig, VLMConfig
from vlm.convert import idefics2_config, idefics_config
from vlm.convert.tiny import tiny_idefics, tiny_idefics2


@pytest.mark.parametrize("build, convert", [(tiny_idefics, idefics_config), (tiny_idefics2, idefics2_config)])
def test_converted_configs_round_trip_through_yaml(build, convert, tmp_path):
    config = convert(build()[0])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(VLMConfig, tmp_path / "c.yaml") == config


def test_overrides_of_the_variant_fields(tmp_path):
    save_config(VLMConfig(), tmp_path / "c.yaml")
    overrides = [
        "vision.kind=siglip",
        "vision.name=google/siglip-base-patch16-224",
        "projector.kind=swiglu",
        "projector.order=project_then_resample",
        "injection.mode=cross_attention",
        "injection.xattn_layers=last",
        "injection.xattn_gate=vector",
        "injection.xattn_qk_norm=rmsnorm",
        "injection.xattn_ff_scope=after_image",
    ]
    config = load_config(VLMConfig, tmp_path / "c.yaml", overrides)
    assert config.vision.pretrained is None  # the open_clip tag default does not apply to a transformers tower
    assert config.projector.order == "project_then_resample" and config.injection.xattn_gate == "vector"
    attn, ff, norm = config.injection.xattn_specs()
    assert attn.qk_norm == "rmsnorm" and norm.kind == "layernorm" and not ff.gated


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ProjectorConfig(kind="none", order="project_then_resample"), "needs a projector"),
        (lambda: ProjectorConfig(activation="tanh"), "projector.activation must be one of"),
        (lambda: InjectionConfig(xattn_ff_activation="swish"), "activation must be one of"),
        (lambda: InjectionConfig(xattn_ff_hidden_dim=0), "xattn_ff_hidden_dim must be positive"),
        (lambda: InjectionConfig(xattn_norm="batchnorm"), "norm must be 'layernorm' or 'rmsnorm'"),
    ],
)
def test_bad_values_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_literal_fields_are_checked_when_loading(tmp_path):
    save_config(VLMConfig(), tmp_path / "c.yaml")
    with pytest.raises(ValueError, match=r"injection.xattn_gate: must be one of \['scalar', 'vector'\]"):
        load_config(VLMConfig, tmp_path / "c.yaml", ["injection.xattn_gate=matrix"])
    with pytest.raises(ValueError, match=r"vision.kind: must be one of"):
        load_config(VLMConfig, tmp_path / "c.yaml", ["vision.kind=timm"])
