"""circuitkd: does a distilled student keep its debiased teacher's robustness, and which circuits explain it?"""
from circuitkd.errors import CircuitKDError
from circuitkd.types import Edge, Node, PromptPairs
from circuitkd.config import ModelSpec, TrainCfg

__all__ = ["CircuitKDError", "Edge", "Node", "PromptPairs", "ModelSpec", "TrainCfg"]
__version__ = "0.1.0"
