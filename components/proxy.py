"""KFP op: train a task's proxies."""

import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
import numpy as np
import torch
from kfp import dsl
from kfp.dsl import Input



@component
def train_proxy_op(config: dict, task: dict, data: Input[dsl.Dataset], stage: str = "proxy") -> dict:
    """Train one proxy task's mixtures; returns `{task, results: [proxy result, ...]}`."""
    from regmix.config.loading import parse_config
    from regmix.train.proxy import train_task

    return train_task(data.path, task, parse_config(config), stage)
