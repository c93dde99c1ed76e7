"""Evaluation suites and offline tasks for `lt2convert eval`, installed as package data of `lt2convert.evals`:
suites.yaml names the suites, tasks/ holds lm-eval task YAMLs (with loaders.py), data/ their small fixtures."""
