"""Puts scripts/ on the path, so the tests import coregate_bench as
scripts/bench does."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
