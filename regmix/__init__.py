"""regmix: find a pre-training data mixture by regression (RegMix, Liu et al., ICLR 2025).

The core library: everything that thinks (config, data, training, regression, search, gate,
evidence, tracking, report), with each pipeline stage a plain `run_<stage>` function. It never
imports kfp; `regmix.components` (the KFP ops) and `regmix.pipelines` (wiring, runners, CLI)
sit above it.
"""
