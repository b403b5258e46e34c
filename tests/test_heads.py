"""The exit-head design space and its ids."""
import pytest

from mess_tf import heads


def test_default_space_spans_bare_classifier_to_light_aspp():
    space = heads.default_head_space()
    assert len(space) >= 8
    assert space[0] == heads.ExitHeadConfig("fcn", 0, 0)
    assert any(h.kind == "aspp" for h in space)
    assert len({h.id for h in space}) == len(space)


@pytest.mark.parametrize("head", heads.default_head_space())
def test_ids_round_trip(head):
    assert heads.ExitHeadConfig.from_id(head.id) == head


def test_ids_are_stable():
    assert heads.ExitHeadConfig("fcn", 64, 2, True).id == "fcn_w64_b2_rd"
    assert heads.ExitHeadConfig("aspp", 128).id == "aspp_w128"


@pytest.mark.parametrize("bad", ["", "fcn_w64", "aspp_w64_b1", "conv_w1_b1", "fcn_w-1_b0"])
def test_unknown_head_id_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown exit-head id"):
        heads.ExitHeadConfig.from_id(bad)


def test_invalid_head_configs():
    with pytest.raises(ValueError, match="bare fcn classifier"):
        heads.ExitHeadConfig("fcn", 0, 1)
    with pytest.raises(ValueError, match="unknown exit-head kind"):
        heads.ExitHeadConfig("mlp", 8)
    with pytest.raises(ValueError, match="unknown final head"):
        heads.FinalHeadConfig("pspnet")


def test_final_head_rates_scale_with_output_stride():
    config = heads.FinalHeadConfig()
    assert config.atrous_rates(16) == (6, 12, 18)
    assert config.atrous_rates(8) == (12, 24, 36)
    assert heads.FinalHeadConfig(rates=(1, 2, 3)).atrous_rates(8) == (1, 2, 3)
