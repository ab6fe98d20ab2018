"""Training: the loop, plain and debiased training, knowledge distillation."""
from circuitkd.train.loop import Batch, TrainResult, cross_entropy_loss, train_loop
from circuitkd.train.train import train_model

__all__ = ["Batch", "TrainResult", "cross_entropy_loss", "train_loop", "train_model"]
