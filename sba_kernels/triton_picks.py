"""The launch configurations the compile rule favours (`triton_tuning`'s docstring has the rule),
one per launch key (`triton_tuning.pick_key`): what `triton_backend.default_choice` runs when
autotuning is off and no GPU timing decided. Written by ``python bench/tuning_report.py
--write-picks``, one (dtype, head dim) at a time, from ahead-of-time compiles for sm_80 and
sm_90 (compiler facts, not timings); do not edit by hand. A key not here runs the blocks of
`triton_backend.one_tile_blocks` / `blocks_for`.
"""

# (dtype, fp32 dot precision, head dim) -> the report its picks come from
SOURCES: dict = {}

# pick_key -> configuration (fields of triton_backend.Blocks)
PICKS: dict = {}
