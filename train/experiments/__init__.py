"""Experiments and checks that run longer than a test: each module is a command
(``python -m train.experiments.NAME``)."""
