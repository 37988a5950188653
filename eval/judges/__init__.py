"""Judges of a run's image pairs, by name (see base.JUDGES; add one with base.register)."""

from .base import JUDGES, Judge, JudgeOptions, get_judge, judge_run, register

__all__ = ["JUDGES", "Judge", "JudgeOptions", "get_judge", "judge_run", "register"]
