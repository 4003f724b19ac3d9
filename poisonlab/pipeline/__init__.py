"""The run as a list of stage modules.

`runner` lists the stages (`poisonlab.pipeline.runner.run(cfg)` runs one experiment); each
stage module (`data`, `model`, `finetune`, `evaluation`, `detection`, `defend`, `record`) is a
set of plain functions of the run's `context`; `store` keeps computed stages and `keys` says
what their keys are made of. This file imports nothing: a stage's code identity is the import
closure of its own module, and importing any stage module runs this file too.
"""
