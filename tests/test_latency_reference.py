"""The latency studies' shared pieces (mess_tf.latency.reference), as the benchmarks use them."""
from mess_tf import report
from mess_tf.latency import reference

EXITS = ["block_3_add:fcn_w32_b1", "block_6_add:fcn_w32_b1", "block_10_add:fcn_w32_b1"]


def test_configurations_are_budgeted_at_each_exit_and_dynamic_with_the_first_k():
    configs = reference.configurations(EXITS)
    assert list(configs) == ["budgeted@1", "budgeted@2", "budgeted@3", "dynamic x1", "dynamic x2", "dynamic x3"]
    assert [c.exit_ids[:-1] for name, c in configs.items() if name.startswith("dynamic")] == [
        EXITS[:1], EXITS[:2], EXITS]


def test_forced_exit_thresholds_leave_at_the_chosen_exit_only():
    assert reference.forced_exit(1, 3) == [float("inf"), 0.0, float("inf")]
    assert reference.forced_exit(3, 3) == [float("inf")] * 3  # the final exit


def test_random_images_are_float_images_in_the_pixel_range():
    images = reference.random_images(2, (8, 6))
    assert [im.shape for im in images] == [(8, 6, 3)] * 2
    assert all(im.dtype.name == "float32" and im.min() >= 0 and im.max() <= 255 for im in images)


def test_markdown_section_titles_a_table_of_formatted_cells():
    assert report.markdown_section("T", ["a", "b"], [("1", None)]) == "\n### T\n\n| a | b |\n|---|---|\n| 1 | - |"
