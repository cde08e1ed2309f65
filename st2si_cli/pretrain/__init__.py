"""`pretrain`: full tuning and top-K layer tuning of the ST2SI module end to end.

`full.py` runs a pretrain (inputs, staging, resume); `loop.py` the training loop over `corpus.py`'s
samples with `evaluation.py`'s validation and `checkpoint.py`'s resumable state; `top.py` and
`activations.py` tune only the top layers on cached activations; `distributed/` holds the engines
(one process, DDP, DeepSpeed); `result.py` stores the run, backbone and heads.
"""
