"""The forecasting harness: datasets (`data`, the bundled `datasets`), baselines (`zoo`),
the training CLI (``python -m sba_model.forecast.train``) and model comparison
(``python -m sba_model.forecast.compare``). Built on `sba_model.graph` and `sba_model.nn`;
nothing in those imports from here.
"""
