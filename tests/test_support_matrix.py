"""README's support matrix is what benchmarks/support_matrix.py measures now (it cannot go stale)."""

import support_matrix


def test_readme_support_matrix_is_fresh():
    table = support_matrix.compute()
    assert {row[0] for row in table} >= {"StableDiffusion3Pipeline", "FluxPipeline", "QwenImagePipeline",
                                         "WanPipeline", "ZImagePipeline", "StableDiffusionPipeline"}
    assert all(row[3] in ("exact", "~exact (1e-06)") for row in table)  # every native CFG reproduced
    text = support_matrix.render(table)
    assert text in support_matrix.README.read_text(), "run python benchmarks/support_matrix.py"
