"""Training: the loop, plain and debiased training, knowledge distillation."""
from circuitkd.train.loop import Batch, TrainResult, cross_entropy_loss, train_loop
from circuitkd.train.train import train_model
from circuitkd.train.distill import distill, init_from_teacher, kd_loss
from circuitkd.train.attention_transfer import AttentionTransfer

__all__ = ["Batch", "TrainResult", "cross_entropy_loss", "train_loop", "train_model", "distill", "init_from_teacher", "kd_loss",
           "AttentionTransfer"]
