"""The KFP layer: one thin op per stage around the core's `run_<stage>`.

An op parses its KFP inputs, calls the stage's `run_<stage>` in `regmix/`, and writes its KFP
outputs. KFP ships only an op's source to its pod, so each op imports what it calls inside its
body (the image holds the project); that is the one place a project module is imported inside
a function. The kfp.local workarounds live in `loop_items.py` and in `pipelines/local.py`.
"""

import os

from kfp import dsl

# The image every component runs in on a cluster (kfp.local ignores it); docker/ builds it.
# A config's `cluster.image` overrides it per task, else set REGMIX_IMAGE before compiling.
IMAGE = os.environ.get("REGMIX_IMAGE", "ghcr.io/regmix/regmix:0.1.0")


def component(func):
    """`@dsl.component` on the project image, which already holds kfp and the project.

    Nothing is pip-installed when a pod starts (KFP's default installs kfp there): pods start
    fast, need no route to PyPI, and run exactly the image's pinned versions.
    Inside a KFP executor `kfp.dsl` is a runtime subset without the decorator; there the op
    modules are only imported for their plain functions, so the function is returned as is.
    """
    if not hasattr(dsl, "component"):
        return func
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(func)
