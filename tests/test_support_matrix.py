"""The support matrix (docs/support_matrix.md, README's summary) lists every served class; recomputing it in full
(~35 s on one thread: every measured class x guide) is its own step of .ci/run (``support_matrix.py --check``)."""

import re

import support_matrix
from diffguide.guidance.families import FAMILIES, supported_pipelines


def test_matrix_lists_every_served_class_once_and_readme_links_it():
    text = support_matrix.MATRIX.read_text()
    names = [n for n in re.findall(r"^\| (\w+) \|", text, re.M) if n != "pipeline"]
    assert sorted(names) == sorted(supported_pipelines()), "run python benchmarks/support_matrix.py"
    measured = [line for line in text.splitlines() if line.count("|") == 12 and line.startswith("| ") and not line.startswith("| pipeline")]
    assert len(measured) >= 28 and all(" exact " in line or "~exact" in line for line in measured)
    readme = support_matrix.README.read_text()
    assert f"`apply` serves {len(supported_pipelines())} diffusers pipeline classes" in readme
    assert "(docs/support_matrix.md)" in readme
    assert all(f"| {family.pipelines[0]} | {len(family.pipelines)} |" in readme for family in FAMILIES)


def test_summary_is_rendered_from_the_measured_table():
    table = [["StableDiffusionPipeline", "uc", "`CFG(s)`", "exact"] + ["runs"] * 7]
    short = support_matrix.summary(table)
    assert "| StableDiffusionPipeline | " in short and "| 1 | exact |" in short
    assert support_matrix.render(table).count("\n| StableDiffusionPipeline |") == 1  # measured, not listed twice
