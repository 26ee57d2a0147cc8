import pytest

import tiny_zoo_dit as builds
from zoo_harness import assert_build_reproduces_native


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)
