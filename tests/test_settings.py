"""Run settings: metadata round trip, precedence, defaults, bad values."""

import pytest

from fluxsr_core.settings import (DEFAULT_GUIDANCE, DEFAULT_T_L, KEY_T_L, RunSettings, merge_settings,
                                  settings_from_metadata)


def test_defaults_are_ours_and_labelled():
    s = RunSettings()
    assert (s.t_l, s.guidance, s.scale) == (0.25, 3.5, 4.0) == (DEFAULT_T_L, DEFAULT_GUIDANCE, 4.0)
    assert "T_L=0.25 (default)" in s.describe()


def test_metadata_round_trip_names_the_source():
    md = RunSettings(t_l=0.4, guidance=2.0, scale=2.0, lora_rank=64).to_metadata()
    assert md[KEY_T_L] == "0.4" and md["fluxsr.lora_rank"] == "64" and md["fluxsr.format"] == "1"
    back = settings_from_metadata((md, "LoRA x.safetensors"))
    assert (back.t_l, back.guidance, back.scale, back.lora_rank) == (0.4, 2.0, 2.0, 64)
    assert back.source["t_l"] == "LoRA x.safetensors"


def test_first_source_wins_per_key_and_missing_keys_default():
    s = settings_from_metadata(({"fluxsr.t_l": "0.3"}, "bundle"), ({"fluxsr.t_l": "0.5", "fluxsr.guidance": "2"}, "lora"))
    assert (s.t_l, s.source["t_l"]) == (0.3, "bundle")
    assert (s.guidance, s.source["guidance"]) == (2.0, "lora")
    assert (s.scale, s.source["scale"]) == (4.0, "default")


def test_merge_prefers_file_values_over_defaults():
    bundle = settings_from_metadata(({"fluxsr.guidance": "1.5"}, "bundle b"))
    lora = settings_from_metadata(({"fluxsr.t_l": "0.35", "fluxsr.guidance": "9"}, "LoRA l"))
    m = merge_settings(bundle, lora)
    assert (m.t_l, m.guidance, m.scale) == (0.35, 1.5, 4.0)
    assert m.source == {"t_l": "LoRA l", "guidance": "bundle b", "scale": "default"}


@pytest.mark.parametrize("md,msg", [({"fluxsr.t_l": "abc"}, "not a number"), ({"fluxsr.t_l": "1.0"}, "T_L")])
def test_bad_values_are_refused(md, msg):
    with pytest.raises(ValueError, match=msg):
        settings_from_metadata((md, "file"))
