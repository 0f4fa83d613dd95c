"""The forecasting harness: datasets (`data`, the bundled `datasets`), baselines (`zoo`),
the training CLI (``python -m sba_model.forecast.train``), model comparison
(``python -m sba_model.forecast.compare``) and the per-sensor error map of a trained run
(``python -m sba_model.forecast.error_map``). Built on `sba_model.graph` and `sba_model.nn`;
nothing in those imports from here.
"""
