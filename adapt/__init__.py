"""Downstream adaptation of the scorer (the paper's section 3.4): regression-data construction,
fine-tuning and selection-quality evaluation. Filled in by a later issue."""
