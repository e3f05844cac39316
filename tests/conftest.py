"""Shared test settings.

Tiny models run fastest on one thread, and one thread per test process avoids the heavy
slow-downs of oversubscribed cores when other processes share the machine."""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
