"""Training stages: SFT, DPO and merging adapters, on top of TRL, peft, accelerate and DeepSpeed.

``common`` holds what every training stage shares (option parsing, model loading, LoRA settings,
the manifest stage with resume, logging, precision and the DeepSpeed-on-CPU workaround); ``launch``
re-launches a command under ``accelerate launch``; ``sft`` and ``merge`` are the stages. Nothing here
imports torch at module import time.
"""
