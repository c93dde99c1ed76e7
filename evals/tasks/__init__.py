"""lm-eval task YAMLs of the offline suites; loaders.py is imported by lm-eval by path."""
