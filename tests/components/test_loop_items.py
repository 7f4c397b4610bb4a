"""The kfp.local loop-item workaround: the tracking context rides in each item and comes out."""

from regmix.components.loop_items import split_tracking, with_tracking


def test_items_carry_the_tracking_context_and_give_it_back():
    tracking = {"uri": "sqlite:///x.db", "experiment_id": "1", "pipeline_run": "r",
                "parent_run_id": "p"}
    tasks = [{"task": 0, "mixtures": [{"id": "m0000"}]}, {"task": 1, "mixtures": []}]
    items = with_tracking(tasks, tracking)
    assert all(item["tracking"] == tracking for item in items)
    assert [split_tracking(item) for item in items] == [(task, tracking) for task in tasks]
    assert "tracking" not in tasks[0]  # the core's own items are left as they were
