"""RegMix pipeline stages: one module per stage, plain typed functions plus a thin KFP component."""

import os

# The image every component runs in on a cluster (kfp.local ignores it). Set REGMIX_IMAGE
# before compiling to point at your registry; docker/ builds it.
IMAGE = os.environ.get("REGMIX_IMAGE", "ghcr.io/regmix/regmix:0.1.0")
