"""Regression: predict a proxy's loss from its data mixture (RegMix, Liu et al. 2025).

One module per member kind (boosted, linear, law, gp), `selection` (cross-validation, blends,
outliers, which model), `saved` (the saved format and prediction), `pyfunc` (the MLflow model),
`stage` (the pipeline stage). Imports nothing: a logged model carries some of these modules.
"""
