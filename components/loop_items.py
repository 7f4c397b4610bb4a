"""kfp.local 2.17 workaround: the tracking context rides inside each ParallelFor item.

kfp.local 2.17 replaces every upstream task-output parameter inside a ParallelFor body with
the loop item, so a loop body may take only the item, pipeline parameters, constants and
artifacts. The planning ops therefore put the tracking context (an upstream output) into each
item, and the training ops take it back out; the core's planners and trainers never see it.
"""


def with_tracking(items: list[dict], tracking: dict) -> list[dict]:
    """Loop items that carry the tracking context."""
    return [{**item, "tracking": tracking} for item in items]


def split_tracking(item: dict) -> tuple[dict, dict]:
    """A loop item as the core's plain item and the tracking context it carried."""
    plain = {k: v for k, v in item.items() if k != "tracking"}
    return plain, item["tracking"]
