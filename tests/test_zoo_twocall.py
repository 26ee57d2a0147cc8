"""The two-call and list-layout derived pipelines (tests/tiny_zoo_twocall.py): native CFG reproduced bit for bit;
on the token-conditioned builds (Qwen-Image Edit, Flux Kontext inpaint, LongCat-Image Edit), guides are handed exactly the latent the
scheduler steps and its level, and APG / CFG++ equal few-line oracles (tests/test_pipeline_zoo.py's check)."""

import pytest

import test_pipeline_zoo as zoo
import tiny_zoo_twocall as builds
from zoo_harness import assert_build_reproduces_native


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


@pytest.mark.parametrize("name, key", [("QwenImageEditPipeline", "qwen-edit"),
                                       ("QwenImageEditInpaintPipeline", "qwen-editinpaint"),
                                       ("FluxKontextInpaintPipeline", "flux-kontextinpaint"),
                                       ("LongCatImageEditPipeline", "longcat-edit")])
def test_token_conditioned_guides_see_the_stepped_latent_and_level_and_apg_cfgpp_match_oracles(monkeypatch, name,
                                                                                               key):
    """Image tokens appended to the sequence (and cut from the output), img2img start on the inpaint builds."""
    monkeypatch.setitem(zoo.FIRST_LAYER, "longcat", "x_embedder")
    monkeypatch.setitem(zoo.tiny_zoo.BUILDS, key, builds.BUILDS[name])
    monkeypatch.setitem(zoo._BUILT, key, builds.BUILDS[name][0]())
    zoo.test_guides_see_the_stepped_latent_and_level_and_apg_cfgpp_match_oracles(key)


@pytest.mark.parametrize("name, arg", [("LongCatImagePipeline", dict(enable_cfg_renorm=True)),
                                       ("ChronoEditPipeline", dict(enable_temporal_reasoning=True))])
def test_native_extras_that_are_not_cfg_are_refused_up_front(name, arg):
    """LongCat's clamped norm rescale and ChronoEdit's mid-run frame drop are not CFG's block: refused, named."""
    from diffguide import guidance

    make, call = builds.BUILDS[name]
    pipe = make()
    key = next(iter(arg))
    with pytest.raises(ValueError, match=f"{key} must be False under guidance.apply"):
        with guidance.apply(pipe, guidance.CFG(3.0)):
            pipe(**dict(call(3.0), **arg))
