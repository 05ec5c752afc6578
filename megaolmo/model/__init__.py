"""OLMo as plain modules (olmo.py), laid out over TP x PP x DP (parallelize.py), trained by the engine (engine.py).

The engine is imported from megaolmo.model.engine, not from here: it pulls in torch.distributed.pipelining,
which imports Triton, and `megaolmo.load` must not (Triton's interpreter is chosen before Triton is imported).
"""

from megaolmo.model.olmo import OLMo, OLMoBlock, build_model

__all__ = ["OLMo", "OLMoBlock", "build_model"]
