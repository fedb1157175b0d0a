"""Activation studies: a grid of activations x seeds (x variants) trained on the same data and
budget, then compared with paired confidence intervals. ``toolkits/studies/run_study.py`` is the
command; ``spec`` reads the study YAML, ``runner`` launches the runs (here or as a SLURM array),
``stats`` and ``report`` turn the runs' metrics into the Markdown/JSON/PNG report."""
